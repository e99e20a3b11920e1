"""A member that is alive but cut off from its peers: its clients move to another member.

The member runs in a network namespace of the test's own (sandbox/netns.py), joined to this machine
by a veth pair; the cut is a set of firewall rules inside that namespace that drop everything but
its client port. It stays reachable by clients and keeps answering them, but it has no leader."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs
from structlog.typing import EventDict

from norm.adapters.etcd import Etcd, Event, Lease, Resync, Watch, endpoint_order
from norm.core.config import EtcdConfig
from sandbox.etcd import EtcdCluster, EtcdMember
from sandbox.netns import NetNs
from sandbox.procs import wait_for

# Short raft timings, so that the cut member knows within a second or so that it has no leader.
RAFT = ("--heartbeat-interval", "50", "--election-timeout", "300")


@pytest.fixture
def cut_cluster(tmp_path: Path) -> Iterator[tuple[EtcdCluster, NetNs, EtcdMember]]:
    """Three members: `cut` inside its own namespace, the other two on this side of the veth pair."""
    with NetNs() as ns:
        workdir = tmp_path / "cluster"
        cut = EtcdMember("cut", workdir, host=ns.inner, netns=ns, extra_args=RAFT)
        others = [EtcdMember(f"etcd{i}", workdir, host=ns.outer, extra_args=RAFT) for i in (1, 2)]
        cluster = EtcdCluster.of([cut, *others])
        try:
            cluster.start()
            yield cluster, ns, cut
        finally:
            ns.heal()  # a member cut off from its peers takes long to stop
            cluster.stop()


async def _after(w: Watch, key: str) -> float:
    """Consume `w` until the put of `key`; the loop time it arrived."""
    async for item in w:
        if isinstance(item, Event) and item.kind == "put" and item.kv.key == key:
            return asyncio.get_running_loop().time()
    raise AssertionError("a watch ended")


def _status(member: EtcdMember) -> dict[str, Any]:
    return dict(json.loads(member.ctl("endpoint", "status", "-w", "json"))[0]["Status"])


def _lead(cluster: EtcdCluster, target: EtcdMember) -> None:
    """Make `target` the raft leader (as `etcdctl move-leader` does; only the leader takes it)."""
    target_id = _status(target)["header"]["member_id"]

    def leads() -> bool:
        return bool(_status(target)["leader"] == target_id)

    if not leads():
        for m in cluster.members:
            m.ctl("move-leader", format(target_id, "x"), check=False)
    wait_for(leads, timeout=15, what=f"{target.name} to lead")


@pytest.mark.parametrize("role", ["follower", "leader"])
async def test_clients_of_a_member_cut_off_from_its_peers_keep_their_leases_and_watches(
        cut_cluster: tuple[EtcdCluster, NetNs, EtcdMember], etcd_config: Callable[..., EtcdConfig],
        role: str) -> None:
    cluster, ns, cut = cut_cluster
    loop = asyncio.get_running_loop()
    healthy = [m for m in cluster.members if m is not cut]
    await asyncio.to_thread(_lead, cluster, cut if role == "leader" else healthy[0])
    config = etcd_config(*cluster.endpoints, lease_ttl=5, request_timeout=1.0)
    left: list[float] = []  # when a client left the cut member

    def record(logger: object, method: str, event_dict: EventDict) -> EventDict:
        if event_dict.get("event") == "etcd.failover" and event_dict.get("left") == cut.endpoint:
            left.append(loop.time())
        return event_dict

    async with AsyncExitStack() as stack:
        stack.enter_context(capture_logs(processors=[record]))
        # The writer is patient: when the cut member was the raft leader, a write waits for the
        # healthy pair to elect another.
        writer = await stack.enter_async_context(Etcd(etcd_config(healthy[0].endpoint,
                                                                   request_timeout=15.0)))
        # Three hosts whose order puts the cut member first (as every agent did before orders were
        # shuffled per host).
        seeds = [seed for seed in (f"host-{i}" for i in range(200))
                 if endpoint_order(config.endpoints, seed)[0] == cut.endpoint][:3]
        clients = [await stack.enter_async_context(Etcd(config, seed=seed)) for seed in seeds]
        assert [c.endpoint for c in clients] == [cut.endpoint] * 3
        leases: list[Lease] = [await stack.enter_async_context(c.lease()) for c in clients]
        watches = [await stack.enter_async_context(c.watch("/p/", prefix=True)) for c in clients]
        for i, (c, lease) in enumerate(zip(clients, leases, strict=True)):
            await c.put(f"/held/{i}", b"x", lease=lease.id)
        for w in watches:
            assert isinstance(await anext(w), Resync)
        await writer.put("/p/before", b"x")
        async with asyncio.timeout(10):
            await asyncio.gather(*(_after(w, "/p/before") for w in watches))

        # The watches are being read while the member is cut off, as a service reads them.
        after = [asyncio.create_task(_after(w, "/p/after"), name=f"watch-{i}") for i, w in enumerate(watches)]
        try:
            await asyncio.to_thread(ns.isolate, except_ports=(cut.client_port,))
            cut_at = loop.time()
            await writer.put("/p/after", b"x")  # on the healthy side
            async with asyncio.timeout(20):
                await asyncio.gather(*after)
        finally:
            for t in after:
                t.cancel()
            await asyncio.gather(*after, return_exceptions=True)
        # Every client noticed within 3 s (the member ends require-leader watches with "no leader")
        # and moved on; every watch resumed on another member and missed nothing.
        assert len(left) == len(clients), left
        assert max(left) - cut_at <= 3.0, [round(t - cut_at, 2) for t in left]
        assert all(w.reconnects >= 1 for w in watches)
        assert all(c.failovers >= 1 and c.endpoint != cut.endpoint for c in clients)
        # Every lease lives on, renewed by a healthy member.
        counts = [lease.renewals for lease in leases]
        async with asyncio.timeout(10):
            for lease, count in zip(leases, counts, strict=True):
                await lease.wait_renewals(count + 1)
        assert not any(lease.lost.is_set() for lease in leases), [x.lost_reason for x in leases]
        for i in range(len(clients)):
            assert (await writer.get(f"/held/{i}")) is not None


@pytest.mark.parametrize("role", ["follower", "leader"])
async def test_clients_of_a_member_cut_off_from_its_peers_keep_their_leases_without_any_watch(
        cut_cluster: tuple[EtcdCluster, NetNs, EtcdMember], etcd_config: Callable[..., EtcdConfig],
        role: str) -> None:
    """Only lease renewals to notice the member is no good: they time out there (it waits for a
    leader), and the client must move on before the leases run out."""
    cluster, ns, cut = cut_cluster
    healthy = [m for m in cluster.members if m is not cut]
    await asyncio.to_thread(_lead, cluster, cut if role == "leader" else healthy[0])
    config = etcd_config(*cluster.endpoints, lease_ttl=6, request_timeout=3.0)
    async with AsyncExitStack() as stack:
        writer = await stack.enter_async_context(Etcd(etcd_config(healthy[0].endpoint)))
        seeds = [seed for seed in (f"host-{i}" for i in range(200))
                 if endpoint_order(config.endpoints, seed)[0] == cut.endpoint][:3]
        clients = [await stack.enter_async_context(Etcd(config, seed=seed)) for seed in seeds]
        leases: list[Lease] = [await stack.enter_async_context(c.lease()) for c in clients]
        for i, (c, lease) in enumerate(zip(clients, leases, strict=True)):
            await c.put(f"/held/{i}", b"x", lease=lease.id)
        await asyncio.to_thread(ns.isolate, except_ports=(cut.client_port,))
        # Each lease is renewed by a healthy member (two renewals on: at least one after the cut
        # member has stepped down, had it been the raft leader) and is never lost.
        counts = [lease.renewals for lease in leases]
        async with asyncio.timeout(20):
            for lease, count in zip(leases, counts, strict=True):
                await lease.wait_renewals(count + 2)
        assert not any(lease.lost.is_set() for lease in leases), [x.lost_reason for x in leases]
        assert all(c.failovers >= 1 and c.endpoint != cut.endpoint for c in clients)
        for i in range(len(clients)):
            assert (await writer.get(f"/held/{i}")) is not None
