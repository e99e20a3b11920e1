"""Follows the fleet's update policy key (`<prefix>/policy`) and keeps the policy in effect for the
services that carry out rollouts.

While the key is absent, the policy in effect is what this host's [update] section makes
(`policy_from_update_config`), with revision 0. A value the key holds is in effect from its mod
revision on. A value that is not a valid policy is refused: logged with the reason and never the
value, counted (`norm_rejected_values_total{key}`), and the last good policy stays in effect (the one
from this host's [update] section, when the agent started with the key already refused). The key
being deleted puts the [update] section's policy back in effect.

The revision names the policy in effect: etcd's revisions only grow, and 0 is the configuration's,
so `wait_change(revision)` wakes whenever the policy in effect is another than the one a caller
holds (the same policy written again is another revision)."""

from __future__ import annotations

import asyncio

import structlog

from norm.adapters.etcd import Etcd, EtcdError, EtcdRejected, Resync
from norm.core.backoff import Backoff
from norm.core.config import UpdateConfig
from norm.core.errors import InvalidValue
from norm.core.policy import FleetPolicy, policy_from_update_config, policy_key
from norm.services.base import Retry, first_of, pause, wait_or_stop
from norm.services.metrics import Metrics

log = structlog.get_logger("norm.policy")


class PolicyWatcher:
    name = "policy"

    def __init__(self, etcd: Etcd, prefix: str, update: UpdateConfig, metrics: Metrics,
                 resync_interval: float) -> None:
        """Raises InvalidValue when the [update] section makes no policy (a step's command that no
        policy accepts)."""
        self._etcd = etcd
        self.key = policy_key(prefix)
        self._metrics = metrics
        self._resync_interval = resync_interval
        self.fallback = policy_from_update_config(update)  # in effect while the key is absent
        self._policy = self.fallback
        self.revision = 0  # mod revision of the key's value in effect; 0: the [update] section's
        self.refused: str | None = None  # why the key's present value is refused, while it is
        self.synced = asyncio.Event()  # the key read at least once
        self._changed = asyncio.Condition()
        self._seen = 0  # the last revision of the key looked at, accepted or not
        self._present = False  # whether the key held a value when last looked at

    def current(self) -> FleetPolicy:
        """The policy in effect."""
        return self._policy

    async def latest(self) -> FleetPolicy:
        """The policy in etcd now (read, not waited for: a policy written just before a version must
        be the one its rollout follows); the one in effect when etcd cannot say."""
        try:
            snap = await self._etcd.get_one(self.key)
        except EtcdError as e:
            log.info("policy.read_failed", key=self.key, error=str(e))
            return self._policy
        kv = snap.kvs[0] if snap.kvs else None
        if kv is None or kv.mod_revision > self.revision:
            await self._apply(kv.value if kv else None, kv.mod_revision if kv else snap.revision)
        return self._policy

    async def wait_change(self, revision: int) -> tuple[FleetPolicy, int]:
        """Wait until the policy in effect is another than the one of `revision` (at once if it
        already is); the policy then in effect and its revision."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.revision != revision)
            return self._policy, self.revision

    async def run(self, stopping: asyncio.Event) -> None:
        retry = Retry(Backoff(first=1.0, cap=60.0))
        while not stopping.is_set():
            try:
                await first_of(stopping=stopping.wait(), follow=self._follow(),
                               safety_net=self._safety_net(stopping))
                return
            except EtcdRejected as e:
                # Roles made before the policy key existed do not let hosts read it: the [update]
                # section's policy stays in effect, and the operator is told how to fix it.
                delay = retry.next_delay()
                log.error("policy.unreadable", key=self.key, error=str(e), retry_in=round(delay, 1),
                          fix="norm access apply (hosts may read the policy key)")
                self.synced.set()
                if await pause(delay, stopping):
                    return

    async def _follow(self) -> None:
        async with self._etcd.watch(self.key) as w:
            async for item in w:
                if isinstance(item, Resync):
                    if item.reason == "compacted":
                        self._metrics.watch_resyncs.labels(self.key).inc()
                        log.warning("watch.resynced", key=self.key, revision=item.snapshot.revision)
                    kv = item.snapshot.kvs[0] if item.snapshot.kvs else None
                    # A value is known by the revision it was written at, not the listing's.
                    await self._apply(kv.value if kv else None,
                                      kv.mod_revision if kv else item.snapshot.revision)
                    self.synced.set()
                else:
                    self._metrics.watch_events.labels(self.key).inc()
                    await self._apply(item.kv.value if item.kind == "put" else None, item.revision)

    async def _safety_net(self, stopping: asyncio.Event) -> None:
        # The watch delivers every change; this re-read only proves it, rarely and cheaply.
        while not await wait_or_stop(stopping, self._resync_interval):
            try:
                snap = await self._etcd.get_one(self.key)
            except EtcdError as e:
                log.info("watch.safety_net_failed", key=self.key, error=str(e))
                continue
            kv = snap.kvs[0] if snap.kvs else None
            if (kv is not None and kv.mod_revision > self._seen) or (kv is None and self._present):
                log.warning("watch.missed_change", key=self.key, revision=snap.revision, known=self._seen)
                await self._apply(kv.value if kv else None, kv.mod_revision if kv else snap.revision)

    async def _apply(self, raw: bytes | None, revision: int) -> None:
        self._seen = max(revision, self._seen)
        self._present = raw is not None
        if raw is None:
            policy, effective = self.fallback, 0
            self.refused = None
        else:
            try:
                policy, effective = FleetPolicy.decode(raw, self.key), revision
            except InvalidValue as e:
                self.refused = e.reason
                self._metrics.rejected_values.labels(self.key).inc()
                log.error("policy.rejected", key=self.key, revision=revision, reason=e.reason,
                          kept=self.revision)
                return
            self.refused = None
        if effective == self.revision:
            return
        log.info("policy.changed", key=self.key, revision=effective,
                 source="etcd" if effective else "update config", strategy=policy.strategy)
        async with self._changed:
            self._policy, self.revision = policy, effective
            self._changed.notify_all()
