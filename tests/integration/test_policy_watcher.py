"""The policy watcher against a real etcd: the policy in effect is the key's, known by the revision
it was written at; the host's [update] section's while the key is absent; and the last good one while
the key holds a value that is refused, which is logged and counted without the value."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from structlog.testing import capture_logs
from structlog.typing import EventDict

from norm.adapters.etcd import Etcd
from norm.core.config import EtcdConfig, UpdateConfig
from norm.core.policy import FleetPolicy, StepPolicy, policy_from_update_config, policy_key
from norm.services.metrics import Metrics
from norm.services.policy import PolicyWatcher
from sandbox.etcd import EtcdCluster, EtcdMember

KEY = policy_key("/norm")
UPDATE = UpdateConfig(steps=("migrate",), roles=("django",), pull_timeout=60.0)
FROM_CONFIG = policy_from_update_config(UPDATE)
ROLLING = FleetPolicy(strategy="rolling", max_unavailable="25%",
                      steps=(StepPolicy("migrate", "migrate"),
                             StepPolicy("contract", "migrate --contract", "post")))
SECRET = "Hunter2-secret"


@asynccontextmanager
async def running_watcher(client: Etcd, metrics: Metrics | None = None) -> AsyncIterator[PolicyWatcher]:
    watcher = PolicyWatcher(client, "/norm", UPDATE, metrics or Metrics(), 300.0)
    stopping = asyncio.Event()
    task = asyncio.create_task(watcher.run(stopping), name="policy-watcher-under-test")
    try:
        async with asyncio.timeout(30):
            await watcher.synced.wait()
        yield watcher
    finally:
        stopping.set()
        async with asyncio.timeout(30):
            await task


def rejected(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value("norm_rejected_values_total", {"key": KEY})
    return value or 0.0


async def test_without_the_key_the_update_section_is_in_effect_and_the_key_then_wins(
        etcd: EtcdMember, etcd_config: Callable[..., EtcdConfig]) -> None:
    async with Etcd(etcd_config(etcd.endpoint)) as client, running_watcher(client) as watcher:
        assert (watcher.current(), watcher.revision, watcher.refused) == (FROM_CONFIG, 0, None)
        assert watcher.current().strategy == "recreate"
        written = await client.put(KEY, ROLLING.encode())
        async with asyncio.timeout(30):
            policy, revision = await watcher.wait_change(0)
        assert (policy, revision) == (ROLLING, written)
        assert (watcher.current(), watcher.revision) == (ROLLING, written)
        # Deleted: the update section's again.
        await client.delete(KEY)
        async with asyncio.timeout(30):
            assert await watcher.wait_change(written) == (FROM_CONFIG, 0)


async def test_a_policy_listed_at_start_keeps_the_revision_it_was_written_at(
        etcd: EtcdMember, etcd_config: Callable[..., EtcdConfig]) -> None:
    async with Etcd(etcd_config(etcd.endpoint)) as client:
        written = await client.put(KEY, ROLLING.encode())
        for i in range(3):  # the store moves on; the policy does not
            await client.put(f"/other/{i}", b"x")
        async with running_watcher(client) as watcher:
            assert (watcher.current(), watcher.revision) == (ROLLING, written)
            # Already another than the configuration's: no wait.
            assert await watcher.wait_change(0) == (ROLLING, written)


async def test_a_refused_value_keeps_the_last_good_policy_and_is_counted_never_shown(
        etcd: EtcdMember, etcd_config: Callable[..., EtcdConfig]) -> None:
    seen_rejection = asyncio.Event()

    def on_log(logger: object, method: str, event: EventDict) -> EventDict:
        if event.get("event") == "policy.rejected":
            seen_rejection.set()
        return event

    metrics = Metrics()
    with capture_logs(processors=[on_log]) as logs:
        async with Etcd(etcd_config(etcd.endpoint)) as client, running_watcher(client, metrics) as watcher:
            good = await client.put(KEY, ROLLING.encode())
            async with asyncio.timeout(30):
                await watcher.wait_change(0)
            bad = await client.put(KEY, json.dumps({"max_unavailable": SECRET}).encode())
            async with asyncio.timeout(30):
                await seen_rejection.wait()
            assert (watcher.current(), watcher.revision) == (ROLLING, good)
            assert watcher.refused is not None and "max_unavailable" in watcher.refused
            assert rejected(metrics) == 1.0
            # A good value again is in effect, and the refusal is over.
            again = await client.put(KEY, FleetPolicy(max_unavailable="2").encode())
            async with asyncio.timeout(30):
                assert await watcher.wait_change(good) == (FleetPolicy(max_unavailable="2"), again)
            assert watcher.refused is None
    (entry,) = [e for e in logs if e["event"] == "policy.rejected"]
    assert (entry["key"], entry["revision"], entry["kept"]) == (KEY, bad, good)
    assert SECRET not in repr(logs)


async def test_a_value_refused_at_start_leaves_the_update_section_in_effect(
        etcd: EtcdMember, etcd_config: Callable[..., EtcdConfig]) -> None:
    metrics = Metrics()
    with capture_logs() as logs:
        async with Etcd(etcd_config(etcd.endpoint)) as client:
            await client.put(KEY, b"not json " + SECRET.encode())
            async with running_watcher(client, metrics) as watcher:
                assert (watcher.current(), watcher.revision) == (FROM_CONFIG, 0)
                assert watcher.refused == "not a fleet policy (not JSON)"
                assert rejected(metrics) == 1.0
    assert SECRET not in repr(logs)


async def test_a_change_made_while_cut_off_and_compacted_away_is_found_by_the_relisting(
        etcd_cluster: EtcdCluster, etcd_config: Callable[..., EtcdConfig]) -> None:
    m0, m1, _ = etcd_cluster.members
    relisted = asyncio.Event()

    def on_resync(logger: object, method: str, event: EventDict) -> EventDict:
        if event.get("event") == "watch.resynced" and event.get("key") == KEY:
            relisted.set()
        return event

    with capture_logs(processors=[on_resync]):
        async with (Etcd(etcd_config(m0.endpoint)) as client,
                    Etcd(etcd_config(m1.endpoint, request_timeout=10.0)) as writer,
                    running_watcher(client) as watcher):
            # Cut the watcher off, change the policy, and compact the history it has not seen.
            await asyncio.to_thread(m0.kill)
            written = await writer.put(KEY, ROLLING.encode())
            last = 0
            for i in range(5):
                last = await writer.put(f"/other/{i}", b"x")
            await writer.compact(last)
            await asyncio.to_thread(m0.start)
            async with asyncio.timeout(60):
                await relisted.wait()
                assert await watcher.wait_change(0) == (ROLLING, written)


async def test_the_latest_policy_is_read_not_waited_for(
        etcd: EtcdMember, etcd_config: Callable[..., EtcdConfig]) -> None:
    """A policy written just before a version must be the one its rollout follows: the leader reads it
    as the rollout begins, whether or not its watch has delivered it yet."""
    async with Etcd(etcd_config(etcd.endpoint)) as client:
        watcher = PolicyWatcher(client, "/norm", UPDATE, Metrics(), 300.0)  # its watch not running
        assert await watcher.latest() == FROM_CONFIG
        written = await client.put(KEY, ROLLING.encode())
        assert await watcher.latest() == ROLLING and watcher.revision == written
        await client.put(KEY, b"{not json")
        assert await watcher.latest() == ROLLING and watcher.refused is not None  # the refused one is not
        await client.delete(KEY)
        assert await watcher.latest() == FROM_CONFIG
