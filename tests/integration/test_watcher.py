"""The desired-state watcher against a real etcd: a version is known by the revision at which an
operator wrote it, whether the watcher saw the write happen, listed the key at its start, or listed
it again after compaction. The updater compares that revision with its rollout's: a watcher that
gave a re-listed version the store's revision would make every new leader start a rollout nobody
asked for."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from structlog.testing import capture_logs
from structlog.typing import EventDict

from norm.adapters.etcd import Etcd
from norm.core.config import EtcdConfig
from norm.services.metrics import Metrics
from norm.services.watcher import DesiredStateWatcher
from sandbox.etcd import EtcdCluster, EtcdMember

SLOW = {"request_timeout": 10.0}


@asynccontextmanager
async def running_watcher(client: Etcd) -> AsyncIterator[DesiredStateWatcher]:
    watcher = DesiredStateWatcher(client, "/djed-version", "/djed-environment", Metrics(), 300.0)
    stopping = asyncio.Event()
    task = asyncio.create_task(watcher.run(stopping), name="watcher-under-test")
    try:
        async with asyncio.timeout(30):
            await watcher.synced.wait()
        yield watcher
    finally:
        stopping.set()
        async with asyncio.timeout(30):
            await task


async def test_a_version_listed_at_start_keeps_the_revision_it_was_written_at(
        etcd: EtcdMember, etcd_config: Callable[..., EtcdConfig]) -> None:
    async with Etcd(etcd_config(etcd.endpoint)) as client:
        written = await client.put("/djed-version", b"v2")
        for i in range(5):  # the store moves on; the version does not
            await client.put(f"/other/{i}", b"x")
        async with running_watcher(client) as watcher:
            assert watcher.desired.version == "v2"
            assert watcher.desired.version_revision == written


async def test_a_refused_version_listed_at_start_keeps_the_revision_it_was_written_at(
        etcd: EtcdMember, etcd_config: Callable[..., EtcdConfig]) -> None:
    async with Etcd(etcd_config(etcd.endpoint)) as client:
        written = await client.put("/djed-version", b"x;reboot")
        await client.put("/other", b"x")
        async with running_watcher(client) as watcher:
            assert watcher.desired.version_refused is not None
            assert watcher.desired.version_revision == written


async def test_a_version_relisted_after_compaction_keeps_the_revision_it_was_written_at(
        etcd_cluster: EtcdCluster, etcd_config: Callable[..., EtcdConfig]) -> None:
    m0, m1, _ = etcd_cluster.members
    relisted = asyncio.Event()

    def on_resync(logger: object, method: str, event: EventDict) -> EventDict:
        if event.get("event") == "watch.resynced" and event.get("key") == "/djed-version":
            relisted.set()
        return event

    with capture_logs(processors=[on_resync]):
        await _relist_after_compaction(m0, m1, etcd_config, relisted)


async def _relist_after_compaction(m0: EtcdMember, m1: EtcdMember, etcd_config: Callable[..., EtcdConfig],
                                   relisted: asyncio.Event) -> None:
    async with Etcd(etcd_config(m0.endpoint)) as client, Etcd(etcd_config(m1.endpoint, **SLOW)) as writer:
        written = await writer.put("/djed-version", b"v2")
        async with running_watcher(client) as watcher:
            assert watcher.desired.version_revision == written
            # Cut the watcher off, write other keys and compact the history it has not seen.
            await asyncio.to_thread(m0.kill)
            last = 0
            for i in range(5):
                last = await writer.put(f"/other/{i}", b"x")
            await writer.compact(last)
            await asyncio.to_thread(m0.start)
            async with asyncio.timeout(60):
                await relisted.wait()
            assert watcher.desired.version == "v2"
            assert watcher.desired.version_revision == written
