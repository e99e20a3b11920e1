"""The etcd adapter's watch against real etcd: nothing lost or repeated across restarts, member loss
and compaction."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from norm.adapters.etcd import Etcd, Event, Resync, Watch, WatchItem
from norm.core.config import EtcdConfig
from sandbox.etcd import EtcdCluster, EtcdMember


async def collect(watch: Watch, until: Callable[[list[WatchItem]], bool],
                  timeout: float = 30) -> list[WatchItem]:
    items: list[WatchItem] = []
    async with asyncio.timeout(timeout):
        async for item in watch:
            items.append(item)
            if until(items):
                return items
    raise AssertionError("watch ended")


# Killing a member that happens to be the raft leader stalls writes until the others elect a new
# one; on a loaded machine that can take longer than the usual short test timeout.
SLOW = {"request_timeout": 10.0, "lease_ttl": 15}


def puts(items: list[WatchItem]) -> list[tuple[str, bytes]]:
    return [(i.kv.key, i.kv.value) for i in items if isinstance(i, Event) and i.kind == "put"]


def last_key_is(key: str) -> Callable[[list[WatchItem]], bool]:
    return lambda items: bool(items) and isinstance(items[-1], Event) and items[-1].kv.key == key


async def test_watch_starts_with_a_listing_then_delivers_changes_in_order(
        etcd: EtcdMember, etcd_config: Callable[..., EtcdConfig]) -> None:
    async with Etcd(etcd_config(etcd.endpoint)) as client:
        await client.put("/w/a", b"0")
        async with client.watch("/w/", prefix=True) as w:
            first = await anext(w)
            assert isinstance(first, Resync) and first.reason == "start"
            assert [kv.key for kv in first.snapshot.kvs] == ["/w/a"]
            for i in range(10):
                await client.put(f"/w/{i}", str(i).encode())
            await client.delete("/w/a")
            items = await collect(w, lambda xs: len(xs) == 11)
    assert puts(items) == [(f"/w/{i}", str(i).encode()) for i in range(10)]
    assert isinstance(items[-1], Event) and items[-1].kind == "delete" and items[-1].kv.key == "/w/a"
    revisions = [i.revision for i in items if isinstance(i, Event)]
    assert revisions == sorted(set(revisions))


async def test_watch_loses_nothing_across_an_etcd_restart(
        etcd: EtcdMember, etcd_config: Callable[..., EtcdConfig]) -> None:
    async with Etcd(etcd_config(etcd.endpoint)) as client:
        async with client.watch("/r/", prefix=True) as w:
            assert isinstance(await anext(w), Resync)
            for i in range(5):
                await client.put(f"/r/{i:02}", b"before")
            await asyncio.to_thread(etcd.restart)
            # A second client writes right after the restart, while the watcher is reconnecting.
            async with Etcd(etcd_config(etcd.endpoint)) as writer:
                for i in range(5, 15):
                    await writer.put(f"/r/{i:02}", b"after")
            items = await collect(w, last_key_is("/r/14"))
            assert w.reconnects >= 1
    assert [k for k, _ in puts(items)] == [f"/r/{i:02}" for i in range(15)]


async def test_watch_delivers_what_was_written_while_its_member_was_down(
        etcd_cluster: EtcdCluster, etcd_config: Callable[..., EtcdConfig]) -> None:
    m0, m1, _ = etcd_cluster.members
    # The watcher talks only to m0; the writes go through m1 while m0 is dead.
    async with Etcd(etcd_config(m0.endpoint)) as client, Etcd(etcd_config(m1.endpoint, **SLOW)) as writer:
        async with client.watch("/d/", prefix=True) as w:
            assert isinstance(await anext(w), Resync)
            await writer.put("/d/00", b"x")
            await collect(w, last_key_is("/d/00"))
            await asyncio.to_thread(m0.kill)
            for i in range(1, 21):
                await writer.put(f"/d/{i:02}", b"x")
            await asyncio.to_thread(m0.start)
            items = await collect(w, last_key_is("/d/20"))
    assert [k for k, _ in puts(items)] == [f"/d/{i:02}" for i in range(1, 21)]


async def test_a_compacted_watch_relists_and_continues(
        etcd_cluster: EtcdCluster, etcd_config: Callable[..., EtcdConfig]) -> None:
    m0, m1, _ = etcd_cluster.members
    async with Etcd(etcd_config(m0.endpoint)) as client, Etcd(etcd_config(m1.endpoint, **SLOW)) as writer:
        async with client.watch("/c/", prefix=True) as w:
            assert isinstance(await anext(w), Resync)
            await writer.put("/c/a", b"1")
            await collect(w, last_key_is("/c/a"))
            # Cut the watcher off, change and compact history it has not seen, let it back.
            await asyncio.to_thread(m0.kill)
            await writer.put("/c/a", b"2")
            await writer.put("/c/b", b"1")
            revision = await writer.put("/c/gone", b"1")
            await writer.delete("/c/gone")
            await writer.compact(revision + 1)
            await asyncio.to_thread(m0.start)
            items = await collect(w, lambda xs: any(isinstance(x, Resync) for x in xs))
            resync = items[-1]
            assert isinstance(resync, Resync) and resync.reason == "compacted"
            assert {kv.key: kv.value for kv in resync.snapshot.kvs} == {"/c/a": b"2", "/c/b": b"1"}
            assert w.resyncs == 1
            await writer.put("/c/after", b"1")
            items = await collect(w, last_key_is("/c/after"))
    assert puts(items) == [("/c/after", b"1")]


async def test_a_watch_from_a_compacted_revision_relists(
        etcd: EtcdMember, etcd_config: Callable[..., EtcdConfig]) -> None:
    async with Etcd(etcd_config(etcd.endpoint)) as client:
        first = await client.put("/k", b"1")
        last = await client.put("/k", b"2")
        await client.compact(last)
        async with client.watch("/k", start_revision=first) as w:
            item = await anext(w)
            assert isinstance(item, Resync) and item.reason == "compacted"
            assert [kv.value for kv in item.snapshot.kvs] == [b"2"]
            await client.put("/k", b"3")
            items = await collect(w, last_key_is("/k"))
    assert puts(items) == [("/k", b"3")]


async def test_the_client_carries_on_when_its_cluster_member_is_killed(
        etcd_cluster: EtcdCluster, etcd_config: Callable[..., EtcdConfig]) -> None:
    async with Etcd(etcd_config(*etcd_cluster.endpoints, **SLOW)) as client:
        async with client.watch("/m/", prefix=True) as w:
            assert isinstance(await anext(w), Resync)
            await client.put("/m/0", b"x")
            await collect(w, last_key_is("/m/0"))
            # Kill the member the client prefers (the first of its shuffled order).
            used = next(m for m in etcd_cluster.members if m.endpoint == client.endpoint)
            await asyncio.to_thread(used.kill)
            for i in range(1, 6):
                await client.put(f"/m/{i}", b"x")
            assert (await client.get("/m/5")) is not None
            items = await collect(w, last_key_is("/m/5"))
    assert [k for k, _ in puts(items)] == [f"/m/{i}" for i in range(1, 6)]


async def test_a_watch_handed_another_watchs_events_delivers_none_and_starts_again(
        etcd: EtcdMember, etcd_config: Callable[..., EtcdConfig]) -> None:
    """A client's watches share one stream; should it pair a watch with another's server-side watcher
    (as after a reconnect under faults), the foreign events are not delivered and the watch, on a
    fresh client, goes on from where it stood."""
    async with Etcd(etcd_config(etcd.endpoint)) as client:
        async with client.watch("/a") as a, client.watch("/b") as b:
            assert isinstance(await anext(a), Resync) and isinstance(await anext(b), Resync)
            await client.put("/a", b"1")
            await collect(a, last_key_is("/a"))
            # The crossing, made by hand: /a's watch now reads /b's stream.
            a._iter = b._iter
            await client.put("/b", b"foreign")
            await client.put("/a", b"2")
            items = await collect(a, last_key_is("/a"))
    assert puts(items) == [("/a", b"2")]
