"""Who runs the one-off steps: the leader when its engine has the rollout's image, and otherwise a
participant that pulled it. A leader whose own host takes no part in the rollout (another role, or
left out of the pull) must not run the steps in an image its engine does not have."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from sandbox import updates
from sandbox.procs import wait_for
from tests.fleet.conftest import UpdateFleet


@pytest.fixture
def leader_outside_the_update(fleet: UpdateFleet) -> Iterator[str]:
    """Every agent started again with `update.roles = web`, the one that leads with another role: it
    drives the rollouts and takes no part in them (its engine never pulls their images). Yields the
    leader; afterwards every agent runs as the fleet started it."""
    names = fleet.names()
    first = fleet.wait_leader()
    others = [n for n in names if n != first]
    only_web = {"NORM_UPDATE__ROLES": "web"}
    try:
        for name in [*others, first]:
            fleet.fleet.kill_agent(name, signal.SIGTERM)  # resigns: no leader key is left behind
        fleet.fleet.restart_agent(first, env={**only_web, "NORM_HOST__ROLE": "worker"})
        wait_for(lambda: fleet.leader() == first, timeout=30, what=f"{first} elected", interval=0.05)
        for name in others:
            fleet.fleet.restart_agent(name, env=only_web)
        fleet.fleet.wait_registered(timeout=60)
        yield first
    finally:
        for name in names:
            if fleet.fleet.agent_pid(name) is not None:
                fleet.fleet.kill_agent(name, signal.SIGTERM)
        for name in names:
            fleet.fleet.restart_agent(name)
        fleet.fleet.wait_registered(timeout=60)


def test_a_leader_outside_the_update_has_a_host_with_the_image_run_the_steps(
        fleet: UpdateFleet, leader_outside_the_update: str) -> None:
    leader = leader_outside_the_update
    me = fleet.state_machine_id(leader)
    tag = fleet.new_version()
    revision = updates.set_version(fleet.fleet, tag)
    h = updates.wait_phase(fleet.fleet, revision, timeout=120)
    assert h["phase"] == "done", h
    record = updates.record(fleet.fleet, revision)
    assert record is not None and me not in record["hosts"] and len(record["hosts"]) == 2
    assert h["migrator"] in record["hosts"], h
    assert fleet.leader() == leader  # it led throughout
    assert fleet.steps_of(tag) == ["migrate", "collectstatic"]
