"""The fleet layer: a 3-member etcd cluster and three simulated hosts, each with its own systemd
manager, Docker engine and `norm agent` in update mode, the demo app's units installed, and the
session's registry holding the demo app's versions. One fleet per session (it takes seconds to
start); before each test every agent runs, every engine answers and the fleet serves one release."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import urllib.request
from collections.abc import Callable, Generator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from sandbox import app, updates
from sandbox.fleet import Fleet
from sandbox.procs import wait_for
from sandbox.registry import Registry
from sandbox.systemd import SystemdManager

AGENT_ENV: dict[str, str] = {
    "NORM_ETCD__LEASE_TTL": "4",
    "NORM_ETCD__REQUEST_TIMEOUT": "2",
    "NORM_UPDATE__PULL_TIMEOUT": "60",
    "NORM_UPDATE__STOP_TIMEOUT": "30",
    "NORM_UPDATE__START_TIMEOUT": "60",
    "NORM_UPDATE__MIGRATION_TIMEOUT": "60",
    "NORM_LOG__LEVEL": "debug",
}


def log_time() -> str:
    """Now, as the agents' log entries have their timestamps (comparable as strings)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class UpdateFleet:
    def __init__(self, fleet: Fleet, registry: Registry, demo_app: Callable[..., str],
                 ports: dict[str, tuple[int, int]]) -> None:
        self.fleet = fleet
        self.registry = registry
        self.demo_app = demo_app
        self.ports = ports
        self.versions = 0

    @property
    def state(self):  # type: ignore[no-untyped-def]
        state = self.fleet.load_state()
        assert state is not None
        return state

    def names(self) -> list[str]:
        return [h["name"] for h in self.state["hosts"]]

    def new_version(self, size_mb: int = 0) -> str:
        """A version never deployed before, pushed to the registry."""
        self.versions += 1
        tag = f"t{self.versions}"
        self.demo_app(tag, size_mb)
        return tag

    def served(self, name: str) -> tuple[str, str]:
        web, api = self.ports[name]
        return app.fetch(web), app.fetch(api)

    def steps_of(self, tag: str) -> list[str]:
        """The one-off steps the record shows run in `tag`'s image, in order."""
        return [ln.split()[1] for ln in self.record_lines() if ln.split()[0] == tag]

    def invocations(self) -> dict[str, str]:
        """Each host's units' InvocationID: a stop or restart gives a unit a new one."""
        out = {}
        for h in self.state["hosts"]:
            mgr = SystemdManager(h["name"], Path(h["systemd_dir"]))
            for unit in app.UNITS:
                out[f"{h['name']}/{unit}"] = mgr.unit_property(unit, "InvocationID")
        return out

    def record_lines(self) -> list[str]:
        path = self.fleet.data_dir / "record.log"
        return path.read_text().splitlines() if path.exists() else []

    @property
    def steps_env(self) -> Path:
        """The environment file of the one-off steps (NORM_DEMO_TASK_SECONDS, NORM_DEMO_TASK_FAIL)."""
        return self.fleet.run_dir / "steps.env"

    def state_machine_id(self, name: str) -> str:
        return self.fleet.host(name)["machine_id"]

    def name_of(self, machine_id: str) -> str:
        return next(h["name"] for h in self.state["hosts"] if h["machine_id"] == machine_id)

    def leader(self) -> str | None:
        """The host whose agent holds the leader key now."""
        kvs = updates.get_kvs(self.fleet, "/norm/leader")
        return self.name_of(kvs[0]["value"].decode()) if kvs else None

    def wait_leader(self, other_than: str | None = None, timeout: float = 30.0) -> str:
        found: list[str] = []

        def elected() -> bool:
            name = self.leader()
            if name is None or name == other_than:
                return False
            found.append(name)
            return True

        wait_for(elected, timeout=timeout, what=f"a leader other than {other_than}", interval=0.05)
        return found[-1]

    def metrics(self, name: str) -> str:
        host = self.fleet.host(name)
        with urllib.request.urlopen(f"http://{host['http_listen']}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def metric(self, name: str, sample: str) -> float:
        """One sample (`norm_x_total{key="..."}`) of a host's /metrics; 0 when absent."""
        for line in self.metrics(name).splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[-1])
        return 0.0

    def wait_metric(self, name: str, sample: str, ok: Callable[[float], bool], timeout: float = 10) -> float:
        """Wait until a sample of a host's /metrics satisfies `ok` (a metric is updated just after the
        etcd write a test sees); its value then."""
        seen: list[float] = []

        def holds() -> bool:
            seen.append(self.metric(name, sample))
            return ok(seen[-1])

        try:
            wait_for(holds, timeout=timeout, what=f"{sample} on {name}", interval=0.05)
        except Exception as e:
            raise AssertionError(f"{e}; last {seen[-1:]}") from None
        return seen[-1]

    def wait_event(self, name: str, event: str | tuple[str, ...], timeout: float = 10,
                   where: Callable[[dict[str, Any]], bool] = lambda e: True) -> list[dict[str, Any]]:
        """Wait until a host's agent has logged `event` for which `where` holds (an agent logs a step
        just after what a test sees of it; the fleet's earlier tests logged theirs too); those log
        entries then."""
        def found() -> list[dict[str, Any]]:
            events = (event,) if isinstance(event, str) else event
            return [e for e in self.log_events(name) if e.get("event") in events and where(e)]

        wait_for(lambda: bool(found()), timeout=timeout, what=f"{event} logged on {name}", interval=0.05)
        return found()

    def log_events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in (Path(self.fleet.host(name)["dir"]) / "agent.log").read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    @contextlib.contextmanager
    def frozen_engine(self, name: str) -> Iterator[None]:
        """The host's dockerd stopped (SIGSTOP) inside the block: its pulls hang until it is thawed."""
        pid = self.fleet.host(name)["docker"]["pid"]  # type: ignore[index]
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            with contextlib.suppress(ProcessLookupError):  # restarted inside the block
                os.kill(pid, signal.SIGCONT)

    def serving(self, tag: str, timeout: float = 60.0) -> None:
        """Wait until every host's web and api units answer `tag`."""
        def all_serve() -> bool:
            try:
                return all(self.served(n) == (tag, tag) for n in self.names())
            except OSError:
                return False

        wait_for(all_serve, timeout=timeout, what=f"every host serving {tag}", interval=0.1)

    def ensure_healthy(self) -> None:
        """Every agent running and registered, no rollout under way, every host serving the fleet's
        release (a host left behind by a test catches up on its own)."""
        for name in self.names():
            if self.fleet.agent_pid(name) is None:
                self.fleet.restart_agent(name)
        self.fleet.wait_registered(timeout=60)
        h = updates.header(self.fleet)
        assert h is not None
        if h["phase"] not in updates.TERMINAL:
            h = updates.wait_phase(self.fleet, int(h["revision"]), timeout=120)
        running = h["tag"] if h["phase"] == "done" else (h["previous"] or {}).get("tag")
        if running is not None:
            self.serving(running, timeout=120)
        self.steps_env.write_text("")


@contextlib.contextmanager
def running_fleet(tmp_path_factory: pytest.TempPathFactory, registry: Registry, name: str, size: int,
                  haproxy: bool = False, agent_env: dict[str, str] | None = None,
                  ) -> Iterator[tuple[Fleet, dict[str, tuple[int, int]]]]:
    """A fleet of `size` hosts in update mode on `registry`'s demo app (with HAProxy in front of the
    web units when asked), its units installed, every agent registered; and the units' ports. Stopped
    when the block ends. `agent_env`: more of the agents' settings."""
    run_dir: Path = tmp_path_factory.mktemp(name)
    (run_dir / "steps.env").write_text("")
    env = dict(AGENT_ENV, NORM_UPDATE__STEPS_ENV_FILE=str(run_dir / "steps.env"), **(agent_env or {}))
    fleet = Fleet(run_dir, size=size, image=f"{registry.address}/djed/app", agent_env=env, haproxy=haproxy)
    fleet.up()
    try:
        state = fleet.load_state()
        assert state is not None
        ports = app.install_app(state)
        fleet.wait_registered(timeout=60)
        yield fleet, ports
    finally:
        fleet.down()


@pytest.fixture(scope="session")
def update_fleet(tmp_path_factory: pytest.TempPathFactory, registry: Registry,
                 demo_app: Callable[..., str]) -> Iterator[UpdateFleet]:
    with running_fleet(tmp_path_factory, registry, "fleet", 3) as (fleet, ports):
        uf = UpdateFleet(fleet, registry, demo_app, ports)
        first = uf.new_version()
        h = updates.deploy(fleet, first)
        assert h["phase"] == "done", h
        yield uf


@pytest.fixture
def fleet(update_fleet: UpdateFleet) -> Iterator[UpdateFleet]:
    update_fleet.ensure_healthy()
    yield update_fleet


def _what_the_agents_said(fleet: Fleet, lines: int = 25) -> str:
    """The rollout header's phase and reason, and each host's last warnings and errors: what a failed
    fleet test needs to be understood from CI's output alone."""
    out = []
    with contextlib.suppress(Exception):
        h = updates.header(fleet)
        if h is not None:
            out.append(f"header: revision {h.get('revision')} {h.get('phase')}: {h.get('reason')}")
    state = fleet.load_state()
    for host in state["hosts"] if state is not None else ():
        log = Path(host["dir"]) / "agent.log"
        kept = [line for line in log.read_text(errors="replace").splitlines()
                if '"level": "warning"' in line or '"level": "error"' in line] if log.exists() else []
        out.append(f"--- {host['name']}: last {min(lines, len(kept))} of {len(kept)} warnings and errors")
        out.extend(kept[-lines:])
    return "\n".join(out)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[
        None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and call.when == "call":
        fleets = [v if isinstance(v, Fleet) else v.fleet for v in getattr(item, "funcargs", {}).values()
                  if isinstance(v, Fleet) or isinstance(getattr(v, "fleet", None), Fleet)]
        for fleet in fleets[:1]:
            report.sections.append(("the fleet's agents", _what_the_agents_said(fleet)))
    return report
