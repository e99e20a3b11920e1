"""Keeps this host's record in etcd on the agent's lease, and the lease itself alive.

The lease stands for "this agent is alive": the host record and fleet leadership both hang on it.
When it is lost the record vanishes with it; the service takes a new lease and registers again.
On a graceful stop the record is deleted and the lease revoked, so the fleet sees the host leave
at once rather than after the TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import structlog

from norm.adapters.etcd import EtcdError, Lease
from norm.core.backoff import Backoff
from norm.core.host import HostRecord, hosts_key
from norm.services.base import Retry, first_of, pause
from norm.services.context import HostContext

log = structlog.get_logger("norm.registration")


class Registration:
    name = "registration"

    def __init__(self, host: HostContext, record: HostRecord) -> None:
        """`record`: this host's record (its machine id is the host's)."""
        self._etcd = host.etcd
        self.key = hosts_key(host.prefix, record.machine_id)
        self.record = record
        self._metrics = host.metrics
        self.registered = asyncio.Event()
        self._lease: Lease | None = None
        self._lease_ready = asyncio.Condition()

    async def current_lease(self) -> Lease:
        """The live lease, once the host is registered on it."""
        async with self._lease_ready:
            await self._lease_ready.wait_for(
                lambda: self._lease is not None and not self._lease.lost.is_set())
            assert self._lease is not None
            return self._lease

    async def set_release(self, release: str | None) -> None:
        """Show the release this host runs in its record (now if registered, else when it registers)."""
        await self._update(release=release)

    async def set_env_etag(self, etag: str | None) -> None:
        """Show the ETag of the object the running environment file was made from."""
        await self._update(env_etag=etag)

    async def _update(self, **changes: str | None) -> None:
        if all(getattr(self.record, k) == v for k, v in changes.items()):
            return
        self.record = dataclasses.replace(self.record, **changes)  # type: ignore[arg-type]
        lease = self._lease
        if lease is not None and not lease.lost.is_set():
            try:
                await self._etcd.put(self.key, self.record.encode(), lease=lease.id)
            except EtcdError as e:  # the record is put again on the next registration
                log.warning("host.update_failed", error=str(e))

    async def run(self, stopping: asyncio.Event) -> None:
        retry = Retry(Backoff(first=0.2, cap=5.0))
        while not stopping.is_set():
            try:
                async with self._etcd.lease() as lease:
                    await self._etcd.put(self.key, self.record.encode(), lease=lease.id)
                    await self._set_lease(lease)
                    self.registered.set()
                    self._metrics.host_registered.set(1)
                    retry.reset()
                    log.info("host.registered", key=self.key, lease=f"{lease.id:x}")
                    await first_of(stopping=stopping.wait(), lease_lost=lease.lost.wait())
                    await self._set_lease(None)
                    self.registered.clear()
                    self._metrics.host_registered.set(0)
                    if stopping.is_set():
                        with contextlib.suppress(EtcdError, TimeoutError):
                            async with asyncio.timeout(2):
                                await self._etcd.delete(self.key)
                        log.info("host.deregistered", key=self.key)
                        return
                    self._metrics.lease_lost.inc()
                    log.warning("host.lease_lost", reason=lease.lost_reason)
            except EtcdError as e:
                await self._set_lease(None)
                self.registered.clear()
                self._metrics.host_registered.set(0)
                delay = retry.next_delay()
                log.warning("host.register_failed", error=str(e), retry_in=round(delay, 2))
                await pause(delay, stopping)

    async def _set_lease(self, lease: Lease | None) -> None:
        async with self._lease_ready:
            self._lease = lease
            self._lease_ready.notify_all()

