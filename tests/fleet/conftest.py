"""The fleet layer: a 3-member etcd cluster and three simulated hosts, each with its own systemd
manager, Docker engine and `norm agent` in update mode, the demo app's units installed, and the
session's registry holding the demo app's versions. One fleet per module (they take seconds to
start); each test leaves every agent running for the next."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandbox import app, updates
from sandbox.fleet import Fleet
from sandbox.registry import Registry

AGENT_ENV = {
    "NORM_ETCD__LEASE_TTL": "4",
    "NORM_ETCD__REQUEST_TIMEOUT": "2",
    "NORM_UPDATE__PULL_TIMEOUT": "60",
    "NORM_UPDATE__STOP_TIMEOUT": "30",
    "NORM_UPDATE__START_TIMEOUT": "60",
    "NORM_UPDATE__MIGRATION_TIMEOUT": "60",
    "NORM_LOG__LEVEL": "debug",
}


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

    def record_lines(self) -> list[str]:
        path = self.fleet.data_dir / "record.log"
        return path.read_text().splitlines() if path.exists() else []

    def ensure_agents(self) -> None:
        for name in self.names():
            if self.fleet.agent_pid(name) is None:
                self.fleet.restart_agent(name)
        self.fleet.wait_registered(timeout=60)


@pytest.fixture(scope="module")
def update_fleet(tmp_path_factory: pytest.TempPathFactory, registry: Registry,
                 demo_app: Callable[..., str]) -> Iterator[UpdateFleet]:
    run_dir: Path = tmp_path_factory.mktemp("fleet")
    fleet = Fleet(run_dir, size=3, image=f"{registry.address}/djed/app", agent_env=AGENT_ENV)
    fleet.up()
    try:
        state = fleet.load_state()
        assert state is not None
        ports = app.install_app(state)
        fleet.wait_registered(timeout=60)
        uf = UpdateFleet(fleet, registry, demo_app, ports)
        first = uf.new_version()
        h = updates.deploy(fleet, first)
        assert h["phase"] == "done", h
        yield uf
    finally:
        fleet.down()


@pytest.fixture
def fleet(update_fleet: UpdateFleet) -> Iterator[UpdateFleet]:
    update_fleet.ensure_agents()
    yield update_fleet
