"""The health gate of an update on this host: after the units were started on a new release, wait until
the release really serves, or say why it does not.

`HealthGate.run()` polls every `interval` seconds, for each unit at once: its state in systemd (active,
and which run: its invocation), its health URL (GET, each try bounded by `probe_timeout`) while it is
active, and its container's state and Docker health (the engine's HEALTHCHECK status and the last
check's output). What a round saw goes to the pure gate (norm.core.gate), which decides; the gate
returns as soon as the host passed, or failure is certain. Every round is bounded, so the gate ends
within `healthy_deadline` plus one round.

Which container a unit runs: by default the unit's name without `.service` (`djed-web.service` runs
`docker run --name djed-web ...`, as the sandbox's units and docs/operator.md name them); `containers`
overrides that per unit, None for a unit that runs no container (it is then not checked in Docker).
Without a Docker adapter no container is checked.

Nothing the gate reports or logs carries a health URL (it may hold a token) or a secret the caller
names: outputs are redacted, cleaned and cut (norm.core.gate.cleaned).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import aiohttp
import structlog

from norm.adapters.docker import Docker, DockerError
from norm.adapters.systemd import Systemd, SystemdError
from norm.core import gate
from norm.core.config import Config, health_containers, health_urls
from norm.core.record import Gate
from norm.core.units import UnitState
from norm.services.base import pause
from norm.services.metrics import Metrics
from norm.services.presence import invocation_of

log = structlog.get_logger("norm.gate")

_DOCKER_HEALTH: dict[str, gate.DockerHealth] = {"starting": "starting", "healthy": "healthy",
                                                "unhealthy": "unhealthy"}
_CONTAINER_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{1,254}", re.ASCII)


def container_of(unit: str) -> str | None:
    """The container a unit runs, as the application's units name it: `djed-web.service` runs
    `djed-web`. None when that is no container name (a template's instance, `app@1.service`)."""
    name = unit.removesuffix(".service")
    return name if name != unit and _CONTAINER_NAME.fullmatch(name) else None


@dataclass(frozen=True)
class GateResult:
    """How the gate ended: `passed`, after `seconds`; when it failed, `unit` is the unit that was not
    healthy, `reason` says how, `output` is the last output of its check (all cleaned and redacted)."""

    passed: bool
    seconds: float
    unit: str | None = None
    reason: str = ""
    output: str = ""


class UpdateGates:
    """The executor's gatekeeper: a HealthGate for each start of an update, with this host's checks
    and the rollout's timing."""

    def __init__(self, systemd: Systemd, docker: Docker | None, config: Config, metrics: Metrics,
                 secrets: Callable[[], Iterable[str]] = tuple) -> None:
        """`secrets`: values no gate output may show (read when a gate begins)."""
        self._systemd = systemd
        self._docker = docker
        self._config = config
        self._metrics = metrics
        self._secrets = secrets

    async def passed(self, units: tuple[str, ...], gate: Gate) -> tuple[bool, str | None]:
        result = await HealthGate.for_update(self._systemd, self._docker, self._config, units, gate,
                                             metrics=self._metrics, secrets=self._secrets()).run()
        if result.passed:
            return True, None
        said = result.reason or f"{result.unit}: not healthy"  # the reason names the unit
        return False, f"{said} ({result.output})" if result.output else said


class HealthGate:
    INTERVAL = 0.5  # seconds between rounds
    PROBE_TIMEOUT = 2.0  # seconds one try of a health URL, or one question to systemd or Docker, may take

    def __init__(  # noqa: PLR0913 (the gate's settings, keyword-only)
        self,
        systemd: Systemd,
        docker: Docker | None,
        *,
        units: Sequence[str],
        health_urls: Mapping[str, str | None] | None = None,
        containers: Mapping[str, str | None] | None = None,
        min_healthy: float,
        healthy_deadline: float,
        metrics: Metrics | None = None,
        interval: float = INTERVAL,
        probe_timeout: float = PROBE_TIMEOUT,
        secrets: Iterable[str] = (),
    ) -> None:
        """`units`: the updated units. `health_urls`: a unit's health URL (none for a unit missing or
        None). `containers`: overrides the container each unit runs (see the module). `secrets`: texts
        never to show in a result or a log (the health URLs are added)."""
        urls = {u: url for u, url in (health_urls or {}).items() if url is not None and u in units}
        self._systemd = systemd
        self._docker = docker
        self._urls = urls
        self._containers: dict[str, str] = {}
        if docker is not None:
            given = containers or {}
            for unit in units:
                name = given[unit] if unit in given else container_of(unit)
                if name is not None:
                    self._containers[unit] = name
        self.spec = gate.GateSpec(units=tuple(units), min_healthy=min_healthy,
                                  healthy_deadline=healthy_deadline, with_url=frozenset(urls),
                                  with_container=frozenset(self._containers))
        self._metrics = metrics
        self._interval = interval
        self._probe_timeout = probe_timeout
        self._secrets = tuple(secrets) + tuple(s for url in urls.values() for s in gate.secrets_of_url(url))
        self._http: aiohttp.ClientSession | None = None
        self._seen: dict[str, bool] = {}
        self.rounds = 0  # rounds observed so far (tests read it)

    @classmethod
    def for_update(cls, systemd: Systemd, docker: Docker | None, config: Config, units: Sequence[str],
                   timing: Gate, *, metrics: Metrics | None = None,
                   secrets: Iterable[str] = ()) -> HealthGate:
        """The gate of an update that started `units`: its checks as the host's configuration sets
        them (update.health_checks, and lb.health_url for lb.unit; update.health_containers), its
        timing as the fleet's policy does (the rollout's header carries it)."""
        return cls(systemd, docker, units=units, health_urls=health_urls(config),
                   containers=health_containers(config), min_healthy=timing.min_healthy,
                   healthy_deadline=timing.healthy_deadline, metrics=metrics, secrets=secrets)

    @property
    def health_urls(self) -> Mapping[str, str]:
        """The health URL asked of each unit that has one."""
        return dict(self._urls)

    @property
    def containers(self) -> Mapping[str, str]:
        """The container checked for each unit that has one."""
        return dict(self._containers)

    async def run(self) -> GateResult:
        """Poll until the host passes or fails the gate; the result (never raises for what it saw)."""
        loop = asyncio.get_running_loop()
        spec = self.spec
        started = loop.time()
        state = gate.start(spec, started)
        log.info("gate.started", units=list(spec.units), min_healthy=spec.min_healthy,
                 healthy_deadline=spec.healthy_deadline, with_url=sorted(spec.with_url),
                 containers=self._containers)
        async with aiohttp.ClientSession(trust_env=False) as http:
            self._http = http
            try:
                while True:
                    observations = await self._round()
                    now = loop.time()
                    state = gate.observe_all(spec, state, observations, now)
                    self._log_changes(observations)
                    v = gate.verdict(spec, state, now, self._secrets)
                    if not isinstance(v, gate.Pending):
                        break
                    # The next round, but one at the deadline at the latest (the last chance to pass).
                    deadline_at = started + spec.healthy_deadline
                    wait = min(self._interval, max(0.0, deadline_at - now)) or self._interval
                    await pause(wait)
            finally:
                self._http = None
        result = (GateResult(passed=True, seconds=v.seconds) if isinstance(v, gate.Passed) else
                  GateResult(passed=False, seconds=v.seconds, unit=v.unit, reason=v.reason, output=v.output))
        outcome = "passed" if result.passed else "failed"
        if self._metrics is not None:
            self._metrics.update_gate.labels(outcome).inc()
            self._metrics.update_gate_seconds.observe(result.seconds)
        if result.passed:
            log.info("gate.passed", seconds=round(result.seconds, 3), rounds=self.rounds)
        else:
            log.error("gate.failed", seconds=round(result.seconds, 3), rounds=self.rounds,
                      failing_unit=result.unit, reason=result.reason, output=result.output)
        return result

    # -- one round

    async def _round(self) -> list[gate.Observation]:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(self._observe(unit), name=f"gate-observe-{unit}")
                     for unit in self.spec.units]
        self.rounds += 1
        return [t.result() for t in tasks]

    async def _observe(self, unit: str) -> gate.Observation:
        """One unit now: never raises for what it could not learn (that is what it observed)."""
        container = self._containers.get(unit)
        async with asyncio.TaskGroup() as tg:
            state_task = tg.create_task(self._unit_state(unit), name=f"gate-systemd-{unit}")
            box_task = (tg.create_task(self._container(container), name=f"gate-docker-{unit}")
                        if container is not None else None)
        state, state_text = state_task.result()
        invocation = invocation_of(state)
        http = None
        if invocation is not None and unit in self._urls:
            http = await self._probe(self._urls[unit])
        box = box_task.result() if box_task is not None else None
        return gate.Observation(unit, active=invocation is not None, invocation=invocation, state=state_text,
                                http=http, container=box)

    async def _unit_state(self, unit: str) -> tuple[UnitState | None, str]:
        try:
            async with asyncio.timeout(self._probe_timeout):
                state = await self._systemd.unit(unit)
        except TimeoutError:
            return None, "unknown (systemd did not answer in time)"
        except SystemdError as e:
            return None, f"unknown (systemd: {type(e).__name__})"
        text = state.active_state
        if state.result not in ("", "success"):
            text += f" ({state.result})"
        elif state.sub_state and state.active_state != "active":
            text += f" ({state.sub_state})"
        return state, text

    async def _probe(self, url: str) -> gate.HttpCheck:
        http = self._http
        assert http is not None
        try:
            async with asyncio.timeout(self._probe_timeout):
                async with http.get(url, allow_redirects=False) as r:
                    await r.read()
                    return gate.HttpCheck(r.status)
        except TimeoutError:
            return gate.HttpCheck(None, "timeout")
        except (aiohttp.ClientError, OSError) as e:  # the URL is never shown: it may carry a token
            return gate.HttpCheck(None, type(e).__name__)

    async def _container(self, name: str) -> gate.ContainerCheck:
        docker = self._docker
        assert docker is not None
        try:
            async with asyncio.timeout(self._probe_timeout):
                health = await docker.container_health(name)
        except TimeoutError:
            return gate.ContainerCheck(found=False, error="no answer in time")
        except DockerError as e:
            return gate.ContainerCheck(found=False, error=type(e).__name__)
        if health is None:
            return gate.ContainerCheck(found=False)
        return gate.ContainerCheck(found=True, running=health.running,
                                   health=_DOCKER_HEALTH.get(health.health, "none"),
                                   output=health.output, exit_code=health.exit_code)

    def _log_changes(self, observations: Sequence[gate.Observation]) -> None:
        for obs in observations:
            good = gate.healthy(self.spec, obs)
            if self._seen.get(obs.unit) != good:
                self._seen[obs.unit] = good
                output = gate.cleaned(gate.output_of(self.spec, obs), self._secrets)
                if good:
                    log.info("gate.unit_healthy", unit=obs.unit, output=output)
                else:
                    log.info("gate.unit_not_healthy", unit=obs.unit, output=output)
