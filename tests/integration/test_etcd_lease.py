"""Leases, election and fencing against real etcd."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

import pytest
from structlog.testing import capture_logs
from structlog.typing import EventDict

from norm.adapters.etcd import Etcd, Event, Leadership, LeaseLost, NotLeader, Put, Resync
from norm.core.config import EtcdConfig
from sandbox.etcd import EtcdMember


async def test_a_lease_is_kept_alive_beyond_its_ttl(
        etcd: EtcdMember, etcd_config: Callable[..., EtcdConfig]) -> None:
    async with Etcd(etcd_config(etcd.endpoint, lease_ttl=3)) as client:
        async with client.lease() as lease:
            await client.put("/alive", b"1", lease=lease.id)
            # Wait for renewals, not for time: three renewals take the lease well past its TTL.
            async with asyncio.timeout(10):
                await lease.wait_renewals(3)
            assert lease.valid()
            assert (await client.get("/alive")) is not None
        # Leaving the block revokes the lease, and the key goes with it at once.
        assert (await client.get("/alive")) is None


@pytest.mark.parametrize("fault", ["freeze", "kill"])
async def test_a_holder_knows_its_lease_is_lost_before_the_server_can_expire_it(
        etcd: EtcdMember, etcd_config: Callable[..., EtcdConfig], fault: str) -> None:
    loop = asyncio.get_running_loop()
    async with Etcd(etcd_config(etcd.endpoint, lease_ttl=4)) as client:
        lease = client.lease()
        async with lease:
            await client.put("/held", b"1", lease=lease.id)
            async with asyncio.timeout(10):
                await lease.wait_renewals(1)
            # The server can expire the lease no earlier than the last renewal it confirmed was
            # *received* plus the TTL; `deadline` is that renewal's *send* time plus the TTL.
            await asyncio.to_thread(etcd.freeze if fault == "freeze" else etcd.kill)
            faulted_at = loop.time()
            server_expiry_floor = lease.deadline
            async with asyncio.timeout(lease.ttl + 2):
                await lease.lost.wait()
            lost_at = loop.time()
            assert lease.lost_reason == "not renewed in time"
            assert lost_at <= server_expiry_floor, (lost_at - faulted_at, server_expiry_floor - faulted_at)
            assert not lease.valid()
            if fault == "freeze":
                etcd.thaw()
            else:
                await asyncio.to_thread(etcd.start)
    # When etcd can act again the key does not outlive the lease.
    async with Etcd(etcd_config(etcd.endpoint)) as client, client.watch("/held") as w:
        async with asyncio.timeout(15):
            async for item in w:
                if isinstance(item, Resync) and not item.snapshot.kvs:
                    break
                if isinstance(item, Event) and item.kind == "delete":
                    break


async def test_a_lease_the_server_forgot_is_reported_lost_at_once(
        etcd: EtcdMember, etcd_config: Callable[..., EtcdConfig]) -> None:
    async with Etcd(etcd_config(etcd.endpoint, lease_ttl=3)) as client:
        async with client.lease() as lease:
            await client._revoke(lease.id)  # as an operator's `etcdctl lease revoke` would
            async with asyncio.timeout(5):
                await lease.lost.wait()
            assert lease.lost_reason == "expired on the server"


async def test_one_leader_at_a_time_and_fenced_writes(
        etcd: EtcdMember, etcd_config: Callable[..., EtcdConfig]) -> None:
    async with Etcd(etcd_config(etcd.endpoint, lease_ttl=3)) as a, \
            Etcd(etcd_config(etcd.endpoint, lease_ttl=3)) as b:
        ea, eb = a.election("/norm/leader", b"a"), b.election("/norm/leader", b"b")
        async with a.lease() as la, b.lease() as lb:
            leader_a = await ea.campaign(la)
            contender = asyncio.create_task(eb.campaign(lb), name="campaign-b")
            await ea.fenced(leader_a, [Put("/norm/fenced", b"a")])
            assert not contender.done()
            await ea.resign(leader_a)
            async with asyncio.timeout(5):
                leader_b = await contender
            assert leader_b.token > leader_a.token
            # The old leader's token no longer opens the fence, even with a live lease.
            with pytest.raises(NotLeader):
                await ea.fenced(Leadership("/norm/leader", leader_a.token, la), [Put("/norm/fenced", b"a")])
            await eb.fenced(leader_b, [Put("/norm/fenced", b"b")])
        assert (await a.get("/norm/fenced")).value == b"b"  # type: ignore[union-attr]


async def test_a_leader_key_written_by_hand_without_a_lease_does_not_block_elections(
        etcd: EtcdMember, etcd_config: Callable[..., EtcdConfig]) -> None:
    # Every agent puts the key on its own lease; one without a lease was written by hand and proves
    # no leadership. Left alone it would stand for ever, and nobody would lead again.
    async with Etcd(etcd_config(etcd.endpoint, lease_ttl=3)) as client:
        await client.put("/norm/leader", b"by-hand")
        election = client.election("/norm/leader", b"a")
        with capture_logs() as logs:
            async with client.lease() as lease:
                async with asyncio.timeout(10):
                    leadership = await election.campaign(lease)
                holder = await client.get("/norm/leader")
                assert holder is not None and holder.value == b"a" and holder.lease == lease.id
                assert leadership.token == holder.create_revision
        removed = [e for e in logs if e["event"] == "leader.foreign_key_removed"]
        assert removed and "by-hand" not in str(removed)


async def test_a_leader_whose_lease_ran_out_does_not_even_send(
        etcd: EtcdMember, etcd_config: Callable[..., EtcdConfig]) -> None:
    async with Etcd(etcd_config(etcd.endpoint, lease_ttl=3)) as client:
        election = client.election("/norm/leader", b"me")
        async with client.lease() as lease:
            leadership = await election.campaign(lease)
            await asyncio.to_thread(etcd.freeze)
            try:
                async with asyncio.timeout(6):
                    await lease.lost.wait()
                sent_before = client.requests
                with pytest.raises(NotLeader):
                    await election.fenced(leadership, [Put("/norm/fenced", b"late")])
                assert client.requests == sent_before
            finally:
                etcd.thaw()
        assert (await client.get("/norm/fenced")) is None


async def test_a_campaign_that_keeps_failing_backs_off(
        etcd: EtcdMember, etcd_config: Callable[..., EtcdConfig]) -> None:
    async with Etcd(etcd_config(etcd.endpoint, lease_ttl=6)) as client:
        election = client.election("/norm/leader", b"me")
        async with client.lease() as lease:
            # The server forgets the lease (an operator's `etcdctl lease revoke`): every campaign
            # transaction fails until the next renewal (TTL/3 away) finds the lease gone.
            await client._revoke(lease.id)
            sent_before = client.requests
            with pytest.raises(LeaseLost):
                async with asyncio.timeout(10):
                    await election.campaign(lease)
            # Backing off, a few tries over those seconds; not hundreds.
            assert client.requests - sent_before < 30, client.requests - sent_before


async def test_lease_renewals_retry_with_jitter_and_in_time_while_etcd_is_down(
        etcd: EtcdMember, etcd_config: Callable[..., EtcdConfig]) -> None:
    loop = asyncio.get_running_loop()
    failed: dict[str, list[float]] = {}
    enough = asyncio.Event()

    def record(logger: object, method: str, event_dict: EventDict) -> EventDict:
        if event_dict.get("event") == "etcd.lease.renew_failed":
            failed.setdefault(event_dict["lease"], []).append(loop.time())
            if len(failed) == 4 and all(len(t) >= 4 for t in failed.values()):
                enough.set()
        return event_dict

    with capture_logs(processors=[record]):
        async with Etcd(etcd_config(etcd.endpoint, lease_ttl=15)) as client, \
                client.lease() as l1, client.lease() as l2, client.lease() as l3, client.lease() as l4:
            leases = (l1, l2, l3, l4)
            await asyncio.to_thread(etcd.kill)
            try:
                async with asyncio.timeout(20):
                    await enough.wait()
            finally:
                await asyncio.to_thread(etcd.start)
            # Back in time: every lease is renewed on the restarted member before it could expire.
            counts = [lease.renewals for lease in leases]
            async with asyncio.timeout(15):
                for lease, count in zip(leases, counts, strict=True):
                    await lease.wait_renewals(count + 1)
            assert not any(lease.lost.is_set() for lease in leases)
    gaps = [b - a for times in failed.values() for a, b in itertools.pairwise(times)]
    # Retries come at most a second apart (a sixth of the TTL, at most 1 s)...
    assert max(gaps) < 1.5, gaps
    # ...and are spread at random rather than in step (a fixed period gives one gap, over and over).
    late = [b - a for times in failed.values() for a, b in itertools.pairwise(times[2:])]
    assert max(late) - min(late) > 0.2, late



def _on_send(client: Etcd) -> asyncio.Event:
    """An event set each time `client` hands out its connection for a call (the call then goes)."""
    sent = asyncio.Event()
    get_client = client._get_client

    async def handing_out() -> object:
        connection = await get_client()
        sent.set()
        return connection

    client._get_client = handing_out  # type: ignore[method-assign,assignment]
    return sent


async def test_a_call_in_flight_when_another_task_drops_the_connection_is_retried_not_cancelled(
        etcd: EtcdMember, etcd_config: Callable[..., EtcdConfig]) -> None:
    # Moving to another member closes the client's channel, and gRPC then cancels every call in
    # flight on it. Those calls belong to other tasks: each must fail and be retried, never end
    # its task as though the task itself had been cancelled.
    async with Etcd(etcd_config(etcd.endpoint, request_timeout=30)) as client:
        await client.put("/inflight", b"1")
        sent = _on_send(client)
        etcd.freeze()
        try:
            sent.clear()
            reader = asyncio.create_task(client.get("/inflight"), name="reader")
            async with asyncio.timeout(30):
                await sent.wait()  # the read is on its way to the frozen member
            await client._drop_client()  # what a failover does, from another task
        finally:
            etcd.thaw()
        async with asyncio.timeout(30):
            kv = await reader
        assert kv is not None and kv.value == b"1"


async def test_a_renewal_in_flight_when_another_task_drops_the_connection_keeps_the_lease(
        etcd: EtcdMember, etcd_config: Callable[..., EtcdConfig]) -> None:
    async with Etcd(etcd_config(etcd.endpoint, lease_ttl=10)) as client, client.lease() as lease:
        sent = _on_send(client)
        with capture_logs() as logs:
            etcd.freeze()
            try:
                sent.clear()
                async with asyncio.timeout(30):
                    await sent.wait()  # a renewal is on its way to the frozen member
                await client._drop_client()
            finally:
                etcd.thaw()
            renewed = lease.renewals
            async with asyncio.timeout(30):
                await lease.wait_renewals(renewed + 1)
        assert lease.valid() and not lease.lost.is_set()
        assert any(e["event"] == "etcd.lease.renew_failed" for e in logs)
