"""The exactly-once ledger on a real fleet: the ledger's keys are what the leader knows of every step
run, whatever became of the rollout header; and a step whose outcome cannot be known (its container
removed while it ran, its host's Docker engine killed under it) halts the rollout naming the step:
it is not run again, and the old release is not started over a migration that may have partly
applied."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from sandbox import updates
from sandbox.docker import DockerEngine
from sandbox.procs import wait_for
from sandbox.systemd import SystemdManager
from tests.fleet.conftest import UpdateFleet, log_time

UNITS = ("djed-web.service", "djed-api.service")


def _engine_of(fleet: UpdateFleet, name: str) -> DockerEngine:
    h = fleet.fleet.host(name)
    return DockerEngine(h["name"], Path(h["docker_dir"]))


def _created(engine: DockerEngine, container: str, since: float) -> int:
    """How many times the engine made a container of that name since `since` (its own events)."""
    out = engine.docker("events", "--since", f"{since:.3f}", "--until", f"{time.time():.3f}",
                        "--filter", "type=container", "--filter", "event=create",
                        "--filter", f"container={container}", "--format", "{{.Actor.Attributes.name}}")
    return sum(1 for line in out.splitlines() if line.strip() == container)


def _step_started(fleet: UpdateFleet, revision: int) -> tuple[str, DockerEngine, str]:
    """Wait until the rollout's first step runs in its container: (migrator, its engine, container)."""
    wait_for(lambda: (updates.header(fleet.fleet) or {}).get("migrating") == "migrate", timeout=60,
             what="the first step issued", interval=0.02)
    migrator = fleet.name_of(updates.header(fleet.fleet)["migrator"])  # type: ignore[index]
    engine = _engine_of(fleet, migrator)
    container = f"norm-migrate-{revision}"

    def running() -> bool:
        out = engine.docker("inspect", "--format", "{{.State.Status}}", container, check=False)
        return out.strip() == "running"

    wait_for(running, timeout=30, what=f"{container} running on {migrator}", interval=0.05)
    return migrator, engine, container


def _halted_naming_the_step(fleet: UpdateFleet, revision: int, tag: str) -> dict[str, object]:
    h = updates.wait_phase(fleet.fleet, revision, timeout=120)
    assert h["phase"] == "halted", h
    assert "step migrate" in h["reason"] and "unknown" in h["reason"], h
    record = updates.record(fleet.fleet, revision)
    assert record is not None and record["phase"] == "halted"
    # The old release was not started again over the step (nor the new one), on any host.
    reports = updates.reports(fleet.fleet, revision)
    assert "started" not in reports, reports.get("started")
    assert not record["rollback"]
    # The ledger says the step's outcome is unknown; the step never completed (no record line).
    entries = [(e["step"], e["ok"], e.get("unknown")) for e in updates.ledger(fleet.fleet)
               if e["revision"] == revision]
    assert entries == [("migrate", False, True)], entries
    assert [v["value"].get("unknown") for v in reports.get("migrated", [])] == [True]
    assert fleet.steps_of(tag) == []
    return h


def _fleet_release(fleet: UpdateFleet) -> str:
    """The tag the fleet runs (the header's, or its previous one after a rollout that did not end
    done)."""
    h = updates.header(fleet.fleet)
    assert h is not None
    return str(h["tag"] if h["phase"] == "done" else h["previous"]["tag"])


def _operator_restarts_the_units(fleet: UpdateFleet, running: str) -> None:
    """What an operator does once the halted step is checked: the units, stopped for the cut-over and
    held by nobody now, are started again on the release every host still has."""
    for h in fleet.state["hosts"]:
        mgr = SystemdManager(h["name"], Path(h["systemd_dir"]))
        mgr.systemctl("start", *UNITS)
    fleet.serving(running, timeout=120)


@pytest.mark.parametrize("damage", ["deleted", "corrupt"])
def test_a_setback_halts_with_the_header_lost_and_a_new_leader(fleet: UpdateFleet, damage: str) -> None:
    older, newer = fleet.new_version(), fleet.new_version()
    for tag in (older, newer):
        assert updates.deploy(fleet.fleet, tag)["phase"] == "done"
    before = fleet.invocations()
    leader = fleet.wait_leader()
    if damage == "deleted":
        fleet.fleet.etcdctl("del", f"{updates.PREFIX}/rollout")
    else:
        updates.put(fleet.fleet, f"{updates.PREFIX}/rollout", '{"revision": "not a header"')
    # The next leader starts from etcd with no readable header.
    killed_at = log_time()
    fleet.fleet.kill_agent(leader, signal.SIGKILL)
    successor = fleet.wait_leader(other_than=leader)
    fleet.wait_event(successor, "updater.leading", timeout=30, where=lambda e: e["timestamp"] > killed_at)
    try:
        revision = updates.set_version(fleet.fleet, older)
        h = updates.wait_phase(fleet.fleet, revision, timeout=60)
        assert h["phase"] == "halted" and "no down-migrations" in h["reason"], h
        assert h["previous"]["tag"] == newer, h  # it knew the release the fleet runs, too
        assert fleet.invocations() == before  # nothing stopped or started
        fleet.serving(newer)
        assert fleet.steps_of(older) == ["migrate", "collectstatic"]  # from its own rollout only
        restored = fleet.wait_event(successor, "updater.header_restored",
                                    where=lambda e: e["timestamp"] > killed_at)
        assert restored[-1]["phase"] == "done"
    finally:
        fleet.fleet.restart_agent(leader)


def test_the_step_container_removed_while_it_runs_halts_naming_the_step(fleet: UpdateFleet) -> None:
    running = _fleet_release(fleet)
    tag = fleet.new_version()
    fleet.steps_env.write_text("NORM_DEMO_TASK_SECONDS=20\n")  # still running when it is removed
    since = time.time()
    revision = updates.set_version(fleet.fleet, tag)
    migrator, engine, container = _step_started(fleet, revision)
    engine.docker("rm", "-f", container)
    try:
        _halted_naming_the_step(fleet, revision, tag)
        # Not made again: the engine created the step's container once.
        assert _created(engine, container, since) == 1
        lost = fleet.wait_event(migrator, "executor.step_lost", where=lambda e: e.get("rollout") == revision)
        assert lost and all(e["step"] == "migrate" for e in lost)
    finally:
        _operator_restarts_the_units(fleet, running)


def test_the_migrators_docker_engine_killed_during_the_step_halts_naming_it(fleet: UpdateFleet) -> None:
    running = _fleet_release(fleet)
    tag = fleet.new_version()
    fleet.steps_env.write_text("NORM_DEMO_TASK_SECONDS=20\n")
    since = time.time()
    revision = updates.set_version(fleet.fleet, tag)
    migrator, _, container = _step_started(fleet, revision)
    fleet.fleet.restart_engine(migrator, crash=True)  # kill -9 of its dockerd, then a new one
    try:
        _halted_naming_the_step(fleet, revision, tag)
        # Claimed once: every later attempt (after the engine came back) only adopts. The new
        # daemon's own events show no container made either.
        steps = [e for e in fleet.log_events(migrator)
                 if e.get("event") == "executor.step_running" and e.get("rollout") == revision]
        assert [e["claimed_before"] for e in steps][:1] == [False]
        assert all(e["claimed_before"] for e in steps[1:])
        assert _created(_engine_of(fleet, migrator), container, since) == 0
    finally:
        _operator_restarts_the_units(fleet, running)


def test_a_restarted_migrator_that_finds_no_container_to_adopt_halts_naming_the_step(
        fleet: UpdateFleet) -> None:
    running = _fleet_release(fleet)
    tag = fleet.new_version()
    fleet.steps_env.write_text("NORM_DEMO_TASK_SECONDS=20\n")
    revision = updates.set_version(fleet.fleet, tag)
    migrator, engine, container = _step_started(fleet, revision)
    # The migrator's agent dies (another agent leads meanwhile), and the step's container is gone
    # by the time systemd has restarted it.
    killed_at = log_time()
    fleet.fleet.kill_agent(migrator, signal.SIGKILL)
    engine.docker("rm", "-f", container)
    fleet.wait_leader(other_than=migrator)  # the migrator was the leader; another one waits for it
    fleet.fleet.restart_agent(migrator)
    try:
        _halted_naming_the_step(fleet, revision, tag)
        lost = fleet.wait_event(migrator, "executor.step_lost",
                                where=lambda e: e.get("rollout") == revision and e["timestamp"] > killed_at)
        assert "no container of that name to adopt" in lost[-1]["error"]
        steps = [e for e in fleet.log_events(migrator) if e.get("event") == "executor.step_running"
                 and e.get("rollout") == revision and e["timestamp"] > killed_at]
        assert steps and all(e["claimed_before"] for e in steps)  # adopted only, never made again
    finally:
        _operator_restarts_the_units(fleet, running)
