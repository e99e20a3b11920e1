"""Environment files from S3: keeps the host's environment file (env.path, read by the units through
`EnvironmentFile=`) equal to the object `s3://env.bucket/env.key`, the key naming the environment that
etcd's keys.environment holds (the host's own environment while that key is absent).

The object is checked at start, whenever keys.environment is written, and every env.interval seconds,
with a conditional GET on the ETag of the file written last: an unchanged object costs no body bytes
and causes no write and no restart. A changed object is validated (shell syntax, core.envfile), written
atomically with mode 0600 and env.owner in its canonical form, with its source and ETag in a header
line, and then, with on_change = "restart", the units that use it are restarted one at a time, each
active again before the next; with "next_rollout" they are left to pick it up when they next start.

Any failure (missing object, access denied, S3 unreachable, a refused file, a failed write) keeps the
file as it was, is logged with a reason that never quotes the content, and is counted. The ETag of the
object the running file was made from is shown in the host's record (`norm hosts`, `norm status`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from norm.adapters.files import OwnerUnknown, read_file, resolve_owner, write_atomic
from norm.adapters.s3 import (
    Fetched,
    NotModified,
    ObjectDenied,
    ObjectMissing,
    ObjectStore,
    ObjectTooLarge,
    StoreError,
)
from norm.adapters.systemd import Systemd, SystemdError, UnitNotLoadable
from norm.core.backoff import Backoff
from norm.core.config import EnvFileConfig
from norm.core.envfile import EnvFile, EnvFileError, Source, object_key, parse_env_file, render, source_of
from norm.core.units import UnitState
from norm.services.base import Retry, first_of
from norm.services.context import HostContext
from norm.services.watcher import DesiredStateWatcher

log = structlog.get_logger("norm.envfiles")

HOLD_OWNER = "envfile"
FILE_MODE = 0o600


class EnvFiles:
    name = "envfiles"

    def __init__(self, host: HostContext, config: EnvFileConfig, store: ObjectStore,
                 watcher: DesiredStateWatcher, host_environment: str,
                 set_etag: Callable[[str | None], Awaitable[None]], *,
                 systemd: Systemd | None = None) -> None:
        """`host_environment`: this host's environment (the object's key may name it); `set_etag`:
        shows the file's ETag in the host record; `systemd`: restarts the units using the file when
        env.on_change says so."""
        assert config.bucket is not None
        self._config = config
        self.bucket: str = config.bucket
        self._store = store
        self._watcher = watcher
        self._host_environment = host_environment
        self._metrics = host.metrics
        self._set_etag = set_etag
        self._systemd = systemd
        self._holds = host.holds
        self._patterns = host.units
        self.running: Source | None = None  # what the file on disk was made from
        self._refused: Source | None = None  # the object's content last refused (not written)
        self.checks = 0  # checks done (for tests and the readiness of whoever waits on a first one)
        self.checked = asyncio.Condition()

    # -- the loop ----------------------------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        structlog.contextvars.bind_contextvars(env_path=self._config.path)
        await self._read_running()
        if await first_of(stopping=stopping.wait(), synced=self._watcher.synced.wait()) == "stopping":
            return
        retry = Retry(_RETRY)
        async with self._store:
            while not stopping.is_set():
                revision = self._watcher.desired.environment_revision
                result = await self.check()
                if result in _FAILED_CHECKS:  # sooner than the interval: someone may be fixing it
                    delay = retry.next_delay()
                else:
                    delay = self._config.interval
                    retry.reset()
                why = await self._wait_next(stopping, revision, min(delay, self._config.interval))
                if why == "environment":
                    log.info("env.environment_changed", environment=self._watcher.desired.environment)

    async def _wait_next(self, stopping: asyncio.Event, revision: int, delay: float) -> str:
        """Until the next check is due: 'interval', 'environment' (keys.environment written), 'stopping'."""
        try:
            async with asyncio.timeout(delay):
                return await first_of(
                    stopping=stopping.wait(),
                    environment=self._watcher.wait_change(lambda d: d.environment_revision != revision))
        except TimeoutError:
            return "interval"

    async def _read_running(self) -> None:
        """What the file on disk was made from, as its header says (nothing for a file not ours)."""
        try:
            raw = await read_file(self._config.path)
        except OSError as e:
            log.warning("env.read_failed", error=f"{type(e).__name__}: {e.strerror}")
            raw = None
        self.running = source_of(raw) if raw is not None else None
        await self._set_etag(self.running.etag if self.running else None)
        if self.running is not None:
            log.info("env.running", source=self.running.url, etag=self.running.etag)

    # -- one check ---------------------------------------------------------------------------------------

    def current_key(self) -> str:
        environment = self._watcher.desired.environment or self._host_environment
        return object_key(self._config.key, environment)

    async def check(self) -> str:
        """Check the object once and act on it; returns the result counted."""
        key = self.current_key()
        url = f"s3://{self.bucket}/{key}"
        known = self._known_etag(key)
        before = self._store.body_bytes
        try:
            got = await self._store.get(self.bucket, key, if_none_match=known)
        except StoreError as e:
            result = _result_of(e)
            log.error("env.fetch_failed", source=url, result=result, error=str(e), kept=self._kept())
            return await self._counted(result, ok=False)
        finally:
            self._metrics.env_body_bytes.inc(self._store.body_bytes - before)
        if isinstance(got, NotModified):
            still_refused = self._refused is not None and self._refused.key == key \
                and self._refused.etag == got.etag
            log.debug("env.unchanged", source=url, etag=got.etag, refused=still_refused)
            return await self._counted("unchanged", ok=not still_refused)
        return await self._apply(Source(self.bucket, key, got.etag), got)

    async def _apply(self, source: Source, got: Fetched) -> str:
        try:
            env = parse_env_file(got.body, source.url)
        except EnvFileError as e:
            self._refused = source
            log.error("env.refused", source=source.url, etag=source.etag, line=e.line, reason=e.reason,
                      kept=self._kept())
            return await self._counted("invalid", ok=False)
        self._refused = None
        if self.running == source:  # the file on disk already is this object (the agent restarted)
            return await self._counted("unchanged", ok=True)
        try:
            owner = resolve_owner(self._config.owner) if self._config.owner else None
            await write_atomic(self._config.path, render(env, [source.header()]), FILE_MODE, owner)
        except (OSError, OwnerUnknown) as e:
            reason = str(e) if isinstance(e, OwnerUnknown) else f"{type(e).__name__}: {e.strerror}"
            log.error("env.write_failed", source=source.url, error=reason, kept=self._kept())
            return await self._counted("write_failed", ok=False)
        previous, self.running = self.running, source
        log.info("env.written", source=source.url, etag=source.etag, variables=len(env.names),
                 previous=previous.etag if previous else None)
        await self._set_etag(source.etag)
        await self._units_follow(env)
        return await self._counted("changed", ok=True)

    def _known_etag(self, key: str) -> str | None:
        """The ETag to send in If-None-Match: that of the content last refused for this key, else that of
        the running file (whatever key it came from: an identical object needs nothing either)."""
        if self._refused is not None and self._refused.key == key:
            return self._refused.etag
        return self.running.etag if self.running is not None else None

    def _kept(self) -> str:
        return f"the file made from {self.running.url} {self.running.etag}" if self.running else "no file"

    async def _counted(self, result: str, *, ok: bool) -> str:
        self._metrics.env_fetches.labels(result).inc()
        self._metrics.env_up_to_date.set(1 if ok else 0)
        if ok:
            self._metrics.env_last_success.set(time.time())
        async with self.checked:
            self.checks += 1
            self.checked.notify_all()
        return result

    # -- the units ---------------------------------------------------------------------------------------

    async def _units_follow(self, env: EnvFile) -> None:
        if self._config.on_change != "restart":
            log.info("env.units_at_next_rollout")
            return
        if self._systemd is None:
            log.warning("env.restart_unavailable", reason="no systemd connection")
            return
        try:
            units = list(self._config.units) or [u.name for u in await self._systemd.units(self._patterns)]
        except SystemdError as e:
            log.error("env.restart_failed", error=str(e))
            return
        restarted = []
        for unit in units:
            outcome = await self._restart_one(unit)
            self._metrics.env_restarts.labels(unit, outcome).inc()
            if outcome == "ok":
                restarted.append(unit)
            elif outcome == "failed":
                rest = units[units.index(unit) + 1:]
                log.error("env.restarts_stopped", unit=unit, not_restarted=rest)
                return
        log.info("env.units_restarted", units=restarted)

    async def _restart_one(self, unit: str) -> str:
        """Restart `unit` if it runs and nobody holds it, and wait until it is active again."""
        with structlog.contextvars.bound_contextvars(unit=unit):
            if self._holds.owners(unit):
                log.info("env.restart_skipped", reason="held", owners=sorted(self._holds.owners(unit)))
                return "held"
            try:
                try:
                    state = await self._systemd_unit(unit)
                except UnitNotLoadable as e:
                    log.warning("env.restart_skipped", reason=str(e))
                    return "inactive"
                if state.active_state not in ("active", "reloading"):
                    log.info("env.restart_skipped", reason=f"not running ({state.active_state})")
                    return "inactive"
                self._holds.hold(unit, HOLD_OWNER)
                try:
                    started = asyncio.get_running_loop().time()
                    await self._systemd_restart(unit)
                    state = await self._systemd_unit(unit)
                finally:
                    self._holds.unhold(unit, HOLD_OWNER)
            except SystemdError as e:
                log.error("env.restart_failed", error=str(e))
                return "failed"
            if state.active_state != "active":
                log.error("env.restart_failed",
                          error=f"{state.active_state}/{state.sub_state} after the restart")
                return "failed"
            log.info("env.unit_restarted", seconds=round(asyncio.get_running_loop().time() - started, 3))
            return "ok"

    async def _systemd_unit(self, unit: str) -> UnitState:
        assert self._systemd is not None
        return await self._systemd.unit(unit)

    async def _systemd_restart(self, unit: str) -> None:
        assert self._systemd is not None
        await self._systemd.restart(unit)  # bounded by the adapter's call_timeout


_FAILED_CHECKS = frozenset({"missing", "denied", "unavailable", "too_large", "write_failed"})
_RETRY = Backoff(first=1.0, factor=2.0, cap=300.0)


def _result_of(e: StoreError) -> str:
    if isinstance(e, ObjectMissing):
        return "missing"
    if isinstance(e, ObjectDenied):
        return "denied"
    if isinstance(e, ObjectTooLarge):
        return "too_large"
    return "unavailable"
