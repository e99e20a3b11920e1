"""A sandbox fleet behind a real HAProxy: two hosts, each with its own systemd manager, Docker engine and
agent in update mode with load-balancer presence on HAProxy (lb.backend = "haproxy"). Each agent puts
its host's server in service once its web unit answers /health, and in an update drains it and puts
it in maintenance before its units stop, then back in service once the new run is healthy. What
HAProxy did is read from HAProxy itself (its Runtime API and its own log); what the agents did, from
their logs."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox import updates
from sandbox.fleet import Fleet, HaproxyState
from sandbox.haproxy import HaproxyServer
from sandbox.procs import wait_for
from sandbox.registry import Registry
from tests.fleet.conftest import running_fleet

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def haproxy_fleet(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Iterator[Fleet]:
    with running_fleet(tmp_path_factory, registry, "haproxy-fleet", 2, haproxy=True) as (fleet, _):
        yield fleet


def admin_states(lb: HaproxyState) -> dict[str, str]:
    return HaproxyServer(Path(lb["dir"]), port=lb["port"]).admin_states(lb["backend"])


def transitions(lb: HaproxyState, server: str, skip: int = 0) -> list[str]:
    """What HAProxy logged of `server`'s state changes, in order, after the first `skip` lines."""
    said = {"is UP/READY (leaving forced maintenance)": "ready", "is UP (leaving forced drain)": "ready",
            "enters drain state": "drain", "going DOWN for maintenance": "maint"}
    lines = Path(lb["proc"]["log"]).read_text().splitlines()[skip:]
    return [word for line in lines if f"Server {lb['backend']}/{server} " in line
            for text, word in said.items() if text in line]


def log_lines(lb: HaproxyState) -> int:
    return len(Path(lb["proc"]["log"]).read_text().splitlines())


def agent_events(fleet: Fleet, name: str, skip: int = 0) -> list[dict[str, Any]]:
    out = []
    for line in (Path(fleet.host(name)["dir"]) / "agent.log").read_text().splitlines()[skip:]:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def agent_log_lines(fleet: Fleet, name: str) -> int:
    return len((Path(fleet.host(name)["dir"]) / "agent.log").read_text().splitlines())


def served(url: str) -> str:
    with urllib.request.urlopen(url + "/version", timeout=5) as r:
        return str(r.read().decode()).strip()


def test_the_agents_keep_their_servers_in_haproxy_through_an_update(
        haproxy_fleet: Fleet, demo_app: Callable[..., str]) -> None:
    fleet = haproxy_fleet
    state = fleet.load_state()
    assert state is not None
    lb = state.get("haproxy")
    assert lb is not None
    names = [h["name"] for h in state["hosts"]]
    assert admin_states(lb) == dict.fromkeys(names, "maint")  # nothing serves yet

    # The first release: the update starts the units; each server goes in once its unit answers.
    demo_app("hp1")
    h = updates.deploy(fleet, "hp1")
    assert h["phase"] == "done", h
    wait_for(lambda: admin_states(lb) == dict.fromkeys(names, "ready"), timeout=30,
             what="every server in service")
    assert served(fleet.haproxy_url()) == "hp1"
    for name in names:
        assert transitions(lb, name)[-1] == "ready"
        started = [e for e in agent_events(fleet, name) if e.get("event") == "lb.presence_started"]
        assert started and started[0]["load_balancer"] == "haproxy" and started[0]["member"] == name

    # The next update: before its units stop, each host's server is drained, then put in maintenance;
    # back in service once the new run answers.
    mark = log_lines(lb)
    marks = {name: agent_log_lines(fleet, name) for name in names}
    demo_app("hp2")
    h = updates.deploy(fleet, "hp2")
    assert h["phase"] == "done", h
    wait_for(lambda: admin_states(lb) == dict.fromkeys(names, "ready"), timeout=30,
             what="every server back in service")
    assert served(fleet.haproxy_url()) == "hp2"
    for name in names:
        assert transitions(lb, name, skip=mark) == ["drain", "maint", "ready"], name
        # (The executor logs its start once every unit is active, which may be after the web unit's
        # run has answered and been registered.)
        events = [e["event"] for e in agent_events(fleet, name, skip=marks[name])]
        steps = [e for e in events if e in ("lb.deregistered", "lb.drained", "executor.units_stopped",
                                            "lb.healthy", "lb.registered")]
        assert steps == ["lb.deregistered", "lb.drained", "executor.units_stopped", "lb.healthy",
                         "lb.registered"], (name, steps)
        assert "executor.units_started" in events and "lb.drain_timeout" not in events
