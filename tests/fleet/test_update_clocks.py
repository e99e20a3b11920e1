"""Barrier deadlines when the agents' clocks disagree: a successor whose wall clock is 600 s ahead of,
or behind, the leader that began the barrier resumes it, and the barrier lasts what it was given
from the moment the successor took over, neither ending early nor 600 s late.

The two followers run under libfaketime (the Debian package `faketime`; what `faketime -f +600s`
does, set in the agent's environment so that the fleet still knows the process by its command line):
LD_PRELOAD of libfaketime with FAKETIME="+600s" or "-600s" and FAKETIME_DONT_FAKE_MONOTONIC=1. That
skews CLOCK_REALTIME only: time.time() and the log timestamps are off by 600 s; CLOCK_MONOTONIC,
which asyncio's loop.time() and so every timer of the agent reads, stays the machine's, as on a host
whose clock is wrong or after an NTP step. (Without FAKETIME_DONT_FAKE_MONOTONIC libfaketime moves
the monotonic clock too.) `test_faketime_skews_the_wall_clock_only` checks that this is what the
agents get. The leader that begins the rollout runs on the machine's clock.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox import updates
from sandbox.clock import skewed_env
from sandbox.procs import wait_for
from tests.fleet.conftest import UpdateFleet
from tests.fleet.invariants import check_invariants

PULL_TIMEOUT = 8.0  # the pull barrier of this module's rollouts; a frozen engine's host never reports
TOLERANCE = 1.0


def test_faketime_skews_the_wall_clock_only() -> None:
    probe = ("import asyncio, json, time\n"
             "async def main():\n"
             "    return asyncio.get_running_loop().time()\n"
             "print(json.dumps([time.time(), time.monotonic(), asyncio.run(main())]))\n")
    for skew in (600, -600):
        before = (time.time(), time.monotonic())
        out = subprocess.run([sys.executable, "-c", probe], env=skewed_env(skew), check=True,
                             capture_output=True, text=True, timeout=60).stdout
        after = (time.time(), time.monotonic())
        wall, monotonic, loop_time = json.loads(out)
        assert before[0] + skew <= wall <= after[0] + skew
        assert before[1] <= monotonic <= loop_time <= after[1]


@pytest.fixture(params=[600, -600], ids=["ahead", "behind"])
def skewed(fleet: UpdateFleet, request: pytest.FixtureRequest) -> Iterator[tuple[str, int]]:
    """Every agent started again with a short pull barrier: the first one (which leads) on the machine's
    clock, the two others skewed by the parameter. Yields (the leader, the skew); afterwards every agent
    runs as the fleet started it."""
    skew: int = request.param
    short = {"NORM_UPDATE__PULL_TIMEOUT": str(PULL_TIMEOUT)}
    names = fleet.names()
    first = fleet.wait_leader()
    others = [n for n in names if n != first]
    try:
        for name in [*others, first]:
            fleet.fleet.kill_agent(name, signal.SIGTERM)  # resigns: no leader key is left behind
        before = _elections(fleet, first)
        fleet.fleet.restart_agent(first, env=short)
        wait_for(lambda: _elections(fleet, first) > before, timeout=30, what=f"{first} elected",
                 interval=0.05)
        for name in others:
            fleet.fleet.restart_agent(name, env={**short, **skewed_env(skew)})
        fleet.fleet.wait_registered(timeout=60)
        assert fleet.leader() == first
        yield first, skew
    finally:
        for name in names:
            if fleet.fleet.agent_pid(name) is not None:
                fleet.fleet.kill_agent(name, signal.SIGTERM)
        for name in others:
            # Its log entries are 600 s off: later tests compare log timestamps with the machine's.
            log = Path(fleet.fleet.host(name)["dir"]) / "agent.log"
            log.rename(log.with_name(f"agent-skewed-{skew:+d}-{time.time_ns()}.log"))
        for name in names:
            fleet.fleet.restart_agent(name)
        fleet.fleet.wait_registered(timeout=60)


def _elections(fleet: UpdateFleet, name: str) -> int:
    """How many times a host's agents have logged winning the leadership."""
    return sum(e.get("event") == "leader.elected" for e in fleet.log_events(name))


def _excluded(fleet: UpdateFleet, revision: int) -> dict[str, str]:
    """{host name: reason} of the hosts the rollout has excluded so far."""
    record = updates.record(fleet.fleet, revision) or {}
    return {fleet.name_of(e["host"]): e["reason"] for e in record.get("excluded", [])}


def test_a_skewed_successor_gives_the_pull_barrier_its_duration(fleet: UpdateFleet,
                                                               skewed: tuple[str, int]) -> None:
    leader, skew = skewed
    tag = fleet.new_version()
    with contextlib.ExitStack() as frozen:
        # Both skewed hosts' pulls hang; the successor's goes on once it leads (the one-off steps run
        # in the image on the leader's engine); the other one's never finishes: only the deadline ends
        # the barrier.
        for name in fleet.names():
            if name != leader:
                frozen.enter_context(fleet.frozen_engine(name))
        revision = updates.set_version(fleet.fleet, tag)
        updates.wait_phase(fleet.fleet, revision, ("pull",), timeout=30)
        fleet.fleet.kill_agent(leader, signal.SIGKILL)
        successor = fleet.wait_leader(other_than=leader)  # a skewed agent: no other runs
        took_over = time.monotonic()
        os.kill(fleet.fleet.host(successor)["docker"]["pid"], signal.SIGCONT)  # type: ignore[index]
        slow = next(n for n in fleet.names() if n not in (leader, successor))
        # The dead leader's host leaves the barrier as its lease expires (lost); the frozen one only
        # when the deadline passes, which the successor counts from when it resumed the rollout.
        seen: dict[str, str] = {}

        def slow_excluded_or_ended() -> bool:
            seen.clear()
            seen.update(_excluded(fleet, revision))
            h = updates.header(fleet.fleet) or {}
            return slow in seen or h.get("phase") in updates.TERMINAL

        wait_for(slow_excluded_or_ended, timeout=PULL_TIMEOUT + 30, interval=0.02,
                 what=f"the pull deadline on {successor}, whose clock is {skew:+d} s off")
        after = time.monotonic() - took_over
        h = updates.header(fleet.fleet)
        assert h is not None and h["phase"] not in ("failed", "halted"), h
        assert seen == {leader: "lost", slow: "did not pull in time"}, seen
        assert PULL_TIMEOUT - TOLERANCE <= after <= PULL_TIMEOUT + TOLERANCE, \
            f"the pull barrier ended {after:.2f} s after {successor} took over, not {PULL_TIMEOUT}"
    h = updates.wait_phase(fleet.fleet, revision, timeout=120)
    assert h["phase"] == "done", h
    fleet.fleet.restart_agent(leader)  # it catches up on the release it missed
    check_invariants(fleet, revision, tag)


def test_a_skewed_successor_waits_for_a_running_step_instead_of_halting(fleet: UpdateFleet,
                                                                        skewed: tuple[str, int]) -> None:
    leader, _ = skewed
    tag = fleet.new_version()
    fleet.steps_env.write_text("NORM_DEMO_TASK_SECONDS=3\n")  # the step is running when the kill lands
    revision = updates.set_version(fleet.fleet, tag)
    updates.wait_phase(fleet.fleet, revision, ("migrate",), timeout=60)
    wait_for(lambda: (updates.header(fleet.fleet) or {}).get("migrating") == "migrate", timeout=30,
             what="the first step started", interval=0.02)
    assert fleet.name_of(updates.header(fleet.fleet)["migrator"]) == leader  # type: ignore[index]
    fleet.fleet.kill_agent(leader, signal.SIGKILL)
    # The successor's clock disagrees with the one that began the step's wait by 600 s: it waits the
    # step's whole budget all the same, and the migrator's agent, restarted, reports the outcome.
    fleet.wait_leader(other_than=leader)
    fleet.fleet.restart_agent(leader, env={"NORM_UPDATE__PULL_TIMEOUT": str(PULL_TIMEOUT)})
    h = updates.wait_phase(fleet.fleet, revision, timeout=120)
    assert h["phase"] == "done", h
    check_invariants(fleet, revision, tag)
