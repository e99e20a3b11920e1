"""Watches the operator's keys (desired version, environment file name) and keeps the validated
desired state for the other services. Refused values are logged without their content, counted,
and leave the desired state as it was."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import structlog

from norm.adapters.etcd import Etcd, EtcdError, Resync
from norm.core.desired import Desired, parse_environment_name, parse_version
from norm.core.errors import InvalidValue
from norm.services.base import first_of, wait_or_stop
from norm.services.metrics import Metrics

log = structlog.get_logger("norm.watcher")


class DesiredStateWatcher:
    name = "watcher"

    def __init__(self, etcd: Etcd, version_key: str, environment_key: str, metrics: Metrics,
                 resync_interval: float) -> None:
        self._etcd = etcd
        self.version_key = version_key
        self.environment_key = environment_key
        self._metrics = metrics
        self._resync_interval = resync_interval
        self.desired = Desired()
        self.changed = asyncio.Condition()
        self.synced = asyncio.Event()  # both keys read at least once
        self._seen: dict[str, int] = {}  # last revision looked at per key, accepted or not

    async def wait_change(self, predicate: Callable[[Desired], bool]) -> Desired:
        async with self.changed:
            await self.changed.wait_for(lambda: predicate(self.desired))
            return self.desired

    async def run(self, stopping: asyncio.Event) -> None:
        started: set[str] = set()

        async def follow(key: str) -> None:
            async with self._etcd.watch(key) as w:
                async for item in w:
                    if isinstance(item, Resync):
                        if item.reason == "compacted":
                            self._metrics.watch_resyncs.labels(key).inc()
                            log.warning("watch.resynced", key=key, revision=item.snapshot.revision)
                        kv = item.snapshot.kvs[0] if item.snapshot.kvs else None
                        # A value is known by the revision it was written at, never by the store's
                        # revision at the listing: the updater tells a new write from a known one by it.
                        await self._apply(key, kv.value if kv else None, kv.mod_revision if kv else 0)
                        started.add(key)
                        if len(started) == 2:
                            self.synced.set()
                    else:
                        self._metrics.watch_events.labels(key).inc()
                        await self._apply(key, item.kv.value if item.kind == "put" else None,
                                          item.revision)

        async def safety_net() -> None:
            # The watches deliver every change; this re-read only proves it, rarely and cheaply.
            while not await wait_or_stop(stopping, self._resync_interval):
                for key in (self.version_key, self.environment_key):
                    try:
                        kv = await self._etcd.get(key)
                    except EtcdError as e:
                        log.info("watch.safety_net_failed", key=key, error=str(e))
                        continue
                    await self._check(key, kv.value if kv else None, kv.mod_revision if kv else 0)

        await first_of(
            stopping=stopping.wait(),
            version=follow(self.version_key),
            environment=follow(self.environment_key),
            safety_net=safety_net(),
        )

    async def _check(self, key: str, raw: bytes | None, revision: int) -> None:
        known = self._seen.get(key, 0)
        if revision > known:
            log.warning("watch.missed_change", key=key, revision=revision, known=known)
            await self._apply(key, raw, revision)

    async def _apply(self, key: str, raw: bytes | None, revision: int) -> None:
        self._seen[key] = max(revision, self._seen.get(key, 0))
        desired = self.desired
        try:
            if key == self.version_key:
                value = None if raw is None else parse_version(raw, key)
                desired = dataclasses.replace(desired, version=value, version_revision=revision,
                                              version_refused=None)
            else:
                value = None if raw is None else parse_environment_name(raw, key)
                desired = dataclasses.replace(desired, environment=value, environment_revision=revision)
        except InvalidValue as e:
            self._metrics.rejected_values.labels(key).inc()
            log.error("desired.rejected", key=key, revision=revision, reason=e.reason)
            if key != self.version_key:
                return
            # The last good version stays desired; the refusal is told to the updater, which records
            # it as a failed rollout so that operators see why nothing happened.
            desired = dataclasses.replace(desired, version_revision=revision, version_refused=e.reason)
        else:
            log.info("desired.changed", key=key, revision=revision, value=value)
        async with self.changed:
            self.desired = desired
            self.changed.notify_all()
