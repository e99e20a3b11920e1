"""The update's health gate (norm.services.gate) against a real systemd manager and a real Docker engine:
the demo app's web unit, run as the sandbox runs it (`docker run --name djed-web ...` from a release
file), on builds of the demo app that serve, answer /healthz with 500, exit after a while, or carry a
Docker HEALTHCHECK."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from norm.adapters.docker import Docker
from norm.adapters.systemd import Systemd
from norm.services.gate import GateResult, HealthGate, container_of
from norm.services.metrics import Metrics
from sandbox import app
from sandbox.docker import DockerEngine
from sandbox.images import DemoOptions
from sandbox.procs import free_port
from sandbox.systemd import SystemdManager

pytestmark = pytest.mark.slow

UNIT = "djed-web.service"
BOUND = 60.0  # seconds any wait of these tests may take at most, on a busy machine
SECRET = "tok-7f3a9c1e"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerEngine]:
    """One engine for this module's tests (an engine takes seconds to start)."""
    e = DockerEngine("gate", tmp_path_factory.mktemp("gate-engine"))
    try:
        e.start()
        yield e
    finally:
        e.stop()


class Host:
    """The web unit of the demo app on this test's systemd manager and the module's engine."""

    def __init__(self, manager: SystemdManager, engine: DockerEngine, tmp_path: Path) -> None:
        self.manager = manager
        self.engine = engine
        self.port = free_port()
        self.release = tmp_path / "release.env"
        units = app.app_units(docker_host=engine.host, release_file=str(self.release), web_port=self.port,
                              api_port=free_port(), docker_config=str(engine.workdir / "client"),
                              log_dir=str(tmp_path))
        manager.write_unit(UNIT, units[UNIT])

    def run(self, tag: str, ref: str) -> None:
        """Pull `ref` (a digest reference), name it in the release file, start the unit (it is active
        once the port answers)."""
        self.engine.docker("pull", ref)
        app.write_release(self.release, tag, ref)
        self.manager.systemctl("start", UNIT)

    def url(self, path: str = "/healthz") -> str:
        return f"http://127.0.0.1:{self.port}{path}?token={SECRET}"

    def stop(self) -> None:
        self.manager.systemctl("stop", UNIT, check=False)


@pytest.fixture
def host(systemd_manager: SystemdManager, engine: DockerEngine, tmp_path: Path) -> Iterator[Host]:
    h = Host(systemd_manager, engine, tmp_path)
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture
async def adapters(systemd_manager: SystemdManager,
                   engine: DockerEngine) -> AsyncIterator[tuple[Systemd, Docker]]:
    async with Systemd(systemd_manager.bus_address) as systemd, \
            Docker(engine.host, call_timeout=10) as docker:
        yield systemd, docker
    left = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("gate-")]
    assert not left, f"tasks left behind: {left}"


def counted(metrics: Metrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value("norm_update_gate_total", {"outcome": outcome})
    return value or 0.0


async def run_gate(gate: HealthGate, deadline: float) -> tuple[GateResult, float]:
    """The gate's result and the seconds it took by the loop's clock (bounded generously)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(deadline + BOUND):
        result = await gate.run()
    return result, loop.time() - started


async def test_a_unit_that_serves_passes_after_min_healthy_and_not_before(
        host: Host, adapters: tuple[Systemd, Docker], demo_app_digest: Callable[..., str]) -> None:
    # A Docker HEALTHCHECK as well as the URL: both must say healthy.
    ref = await asyncio.to_thread(demo_app_digest, "v-gate-ok", 0, DemoOptions(healthcheck=True))
    await asyncio.to_thread(host.run, "v-gate-ok", ref)
    systemd, docker = adapters
    metrics = Metrics(CollectorRegistry())
    min_healthy, deadline = 3.0, 40.0
    gate = HealthGate(systemd, docker, units=[UNIT], health_urls={UNIT: host.url()}, min_healthy=min_healthy,
                      healthy_deadline=deadline, metrics=metrics)
    assert gate.containers == {UNIT: "djed-web"} and container_of(UNIT) == "djed-web"
    with capture_logs() as logs:
        result, took = await run_gate(gate, deadline)

    assert result.passed, result
    assert result.unit is None and result.reason == ""
    assert min_healthy <= result.seconds <= took < deadline
    healthy_at = [e for e in logs if e["event"] == "gate.unit_healthy"]
    assert healthy_at, logs  # ... and the pass came min_healthy after the unit was first healthy
    assert gate.rounds >= min_healthy / HealthGate.INTERVAL
    assert counted(metrics, "passed") == 1 and counted(metrics, "failed") == 0
    assert metrics.registry.get_sample_value("norm_update_gate_seconds_count") == 1
    health = await docker.container_health("djed-web")
    assert health is not None and health.health == "healthy"
    assert SECRET not in repr(logs)


async def test_a_url_answering_500_fails_by_the_deadline_naming_the_unit_and_the_status(
        host: Host, adapters: tuple[Systemd, Docker], demo_app_digest: Callable[..., str]) -> None:
    ref = await asyncio.to_thread(demo_app_digest, "v-gate-500", 0, DemoOptions(healthz_status=500))
    await asyncio.to_thread(host.run, "v-gate-500", ref)
    assert await asyncio.to_thread(app.fetch, host.port) == "v-gate-500", "it serves, but is not healthy"
    systemd, docker = adapters
    metrics = Metrics(CollectorRegistry())
    min_healthy, deadline = 2.0, 6.0
    gate = HealthGate(systemd, docker, units=[UNIT], health_urls={UNIT: host.url()}, min_healthy=min_healthy,
                      healthy_deadline=deadline, metrics=metrics)
    with capture_logs() as logs:
        result, took = await run_gate(gate, deadline)

    assert not result.passed
    assert result.unit == UNIT and result.output == "HTTP 500"
    assert result.reason == f"{UNIT} not healthy within 6s: HTTP 500"
    # Failure is certain once less than min_healthy is left: not sooner, and never past the deadline.
    assert deadline - min_healthy <= result.seconds <= deadline
    assert took < deadline + HealthGate.PROBE_TIMEOUT + 1
    assert counted(metrics, "failed") == 1 and counted(metrics, "passed") == 0
    failed = [e for e in logs if e["event"] == "gate.failed"]
    assert len(failed) == 1 and failed[0]["failing_unit"] == UNIT
    assert SECRET not in repr(logs) and SECRET not in repr(result)


async def test_a_container_that_exits_after_a_few_seconds_fails(
        host: Host, adapters: tuple[Systemd, Docker], demo_app_digest: Callable[..., str]) -> None:
    ref = await asyncio.to_thread(demo_app_digest, "v-gate-exit", 0, DemoOptions(exit_after=5))
    await asyncio.to_thread(host.run, "v-gate-exit", ref)
    systemd, docker = adapters
    # Healthy until it exits: it could pass only by staying up min_healthy (longer than it lives).
    min_healthy, deadline = 8.0, 14.0
    gate = HealthGate(systemd, docker, units=[UNIT], health_urls={UNIT: host.url()}, min_healthy=min_healthy,
                      healthy_deadline=deadline)
    with capture_logs() as logs:
        result, _ = await run_gate(gate, deadline)

    assert not result.passed and result.unit == UNIT
    assert result.output == "unit failed (exit-code)", result
    assert result.seconds <= deadline
    events = [e["event"] for e in logs if e["event"].startswith("gate.unit_")]
    assert events[:2] == ["gate.unit_healthy", "gate.unit_not_healthy"], events
    assert host.manager.unit_property(UNIT, "ActiveState") == "failed"


async def test_a_docker_healthcheck_that_says_unhealthy_fails(
        host: Host, adapters: tuple[Systemd, Docker], demo_app_digest: Callable[..., str]) -> None:
    ref = await asyncio.to_thread(demo_app_digest, "v-gate-hc-bad", 0,
                                  DemoOptions(healthz_status=500, healthcheck=True))
    await asyncio.to_thread(host.run, "v-gate-hc-bad", ref)
    systemd, docker = adapters
    min_healthy, deadline = 1.0, 10.0
    # No URL: the engine's HEALTHCHECK alone says the release does not serve.
    gate = HealthGate(systemd, docker, units=[UNIT], min_healthy=min_healthy, healthy_deadline=deadline)
    result, _ = await run_gate(gate, deadline)

    assert not result.passed and result.unit == UNIT
    assert result.output.startswith("docker health unhealthy (exit 1): "), result
    assert "500" in result.output
    assert deadline - min_healthy <= result.seconds <= deadline


async def test_a_unit_that_flaps_starts_its_clock_again_each_time(
        host: Host, adapters: tuple[Systemd, Docker], demo_app_digest: Callable[..., str]) -> None:
    ref = await asyncio.to_thread(demo_app_digest, "v1")
    await asyncio.to_thread(host.run, "v1", ref)
    systemd, docker = adapters
    # Longer than two rounds and a restart take, even on a busy machine: no run could pass alone.
    min_healthy, deadline = 6.0, 50.0
    gate = HealthGate(systemd, docker, units=[UNIT], health_urls={UNIT: host.url()}, min_healthy=min_healthy,
                      healthy_deadline=deadline)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with capture_logs() as logs:
        task = asyncio.create_task(run_gate(gate, deadline), name="test-gate")
        last_restart = started
        try:
            for _ in range(3):
                # Each time once the gate has seen the unit's run healthy, restart it: a new run.
                seen = gate.rounds
                async with asyncio.timeout(BOUND):
                    while gate.rounds < seen + 2:
                        await asyncio.wait([task], timeout=0.05)
                assert not task.done(), task
                last_restart = loop.time()
                await asyncio.to_thread(host.manager.systemctl, "restart", UNIT)
            result, _ = await task
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    assert result.passed, result
    # It passed min_healthy after the last restart at the earliest, not min_healthy after the start.
    assert started + result.seconds >= last_restart + min_healthy
    assert result.seconds >= 3 * HealthGate.INTERVAL + min_healthy
    changes = [e["event"] for e in logs if e["event"].startswith("gate.unit_")]
    assert changes.count("gate.unit_healthy") >= 1
