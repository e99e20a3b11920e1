"""Fleet leadership (the leadership service over the etcd election) against a real etcd: leadership
follows the leader key, not only the lease."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from structlog.testing import capture_logs

from norm.adapters.etcd import Etcd, NotLeader, Put
from norm.core.config import EtcdConfig
from norm.core.host import HostRecord, leader_key
from norm.services.context import HostContext
from norm.services.leadership import LeaderElection
from norm.services.metrics import Metrics
from norm.services.registration import Registration
from sandbox.etcd import EtcdMember

PREFIX = "/norm"


@dataclass
class Agent:
    """The registration and leadership services of one agent, on a client of its own."""

    name: str
    etcd: Etcd
    metrics: Metrics = field(default_factory=Metrics)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        machine_id = self.name * 32
        record = HostRecord(machine_id, self.name, "test", "web", "0")
        host = HostContext(self.etcd, PREFIX, machine_id, self.metrics)
        self.registration = Registration(host, record)
        self.leadership = LeaderElection(host, self.registration)

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self.registration.run(self.stopping), name=f"{self.name}-reg"),
                      asyncio.create_task(self.leadership.run(self.stopping), name=f"{self.name}-lead")]

    async def stop(self) -> None:
        self.stopping.set()
        async with asyncio.timeout(15):
            results = await asyncio.gather(*self.tasks, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    @property
    def gauge(self) -> float | None:
        return self.metrics.registry.get_sample_value("norm_leader")


@asynccontextmanager
async def fleet(config: EtcdConfig, names: str) -> AsyncIterator[list[Agent]]:
    clients = [Etcd(config) for _ in names]
    agents: list[Agent] = []
    try:
        for c in clients:
            await c.__aenter__()
        agents = [Agent(n, c) for n, c in zip(names, clients, strict=True)]
        for a in agents:
            a.start()
        yield agents
    finally:
        for a in agents:
            if not a.stopping.is_set():
                await a.stop()
        for c in clients:
            await c.close()


async def elected(agents: list[Agent]) -> Agent:
    """Wait until one of `agents` is elected; that one."""
    waits = {asyncio.create_task(a.leadership.elected.wait(), name=f"{a.name}-elected"): a for a in agents}
    try:
        async with asyncio.timeout(20):
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in waits:
            t.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
    return waits[next(iter(done))]


async def test_a_leader_whose_key_is_deleted_steps_down_and_campaigns_again(
        etcd: EtcdMember, etcd_config: Callable[..., EtcdConfig]) -> None:
    async with fleet(etcd_config(etcd.endpoint, lease_ttl=5), "ab") as agents:
        old = await elected(agents)
        other = next(a for a in agents if a is not old)
        assert old.gauge == 1 and other.gauge == 0
        stepped_down = asyncio.create_task(old.leadership.deposed.wait(), name="old-deposed")
        await asyncio.to_thread(etcd.ctl, "del", leader_key(PREFIX))  # as an operator would
        async with asyncio.timeout(10):
            await stepped_down
        # Exactly one leader results: the one whose lease holds the key, with the gauge at 1.
        leader = await elected(agents)
        holder = await leader.etcd.get(leader_key(PREFIX))
        assert holder is not None
        lease = await leader.registration.current_lease()
        assert holder.lease == lease.id
        assert [a.gauge for a in agents].count(1) == 1 and leader.gauge == 1
        # The one not leading campaigns: when the leader stops, it takes over.
        rest = next(a for a in agents if a is not leader)
        await leader.stop()
        assert (await elected([rest])) is rest
        assert rest.gauge == 1 and leader.gauge == 0


async def test_a_leader_whose_watch_stalls_still_steps_down_when_its_key_goes(
        etcd: EtcdMember, etcd_config: Callable[..., EtcdConfig]) -> None:
    """A watch on a member cut off from its peers can stay silent without an error: the leader reads
    its key as well, and steps down on the read's word within a few of those reads."""
    async with fleet(etcd_config(etcd.endpoint, lease_ttl=10), "ab") as agents:
        old = await elected(agents)

        async def silent(_: object) -> str:
            await asyncio.Event().wait()  # the watch that never says anything
            raise AssertionError("unreachable")

        # The term running now watches with the real watch; the stalled one is for the next term,
        # so the leader is made to step down once (the key deleted) and win again first.
        old.leadership._election.deposed = silent  # type: ignore[method-assign]
        others = [a for a in agents if a is not old]
        for a in others:
            await a.stop()
        stepped_down = asyncio.create_task(old.leadership.deposed.wait(), name="old-deposed")
        await asyncio.to_thread(etcd.ctl, "del", leader_key(PREFIX))
        async with asyncio.timeout(20):
            await stepped_down
        assert (await elected([old])) is old
        with capture_logs() as logs:
            stepped_down = asyncio.create_task(old.leadership.deposed.wait(), name="old-deposed-again")
            deleted = asyncio.get_running_loop().time()
            await asyncio.to_thread(etcd.ctl, "del", leader_key(PREFIX))
            async with asyncio.timeout(20):
                await stepped_down
            took = asyncio.get_running_loop().time() - deleted
        reasons = [e.get("reason") for e in logs if e["event"] == "leader.deposed"]
        assert reasons == ["the leader key is gone"], logs
        # One read a second at this TTL: well within the lease, whatever the machine's load.
        assert took < 10, took


async def test_a_fenced_write_that_finds_the_key_changed_ends_the_term_at_once(
        etcd: EtcdMember, etcd_config: Callable[..., EtcdConfig]) -> None:
    """Neither the watch nor the reads have said anything yet (both silent here): the leader's own
    fenced write, refused because the key is gone, ends its term."""
    async with fleet(etcd_config(etcd.endpoint, lease_ttl=10), "a") as agents:
        old = await elected(agents)

        async def silent(*_: object) -> str:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        election = old.leadership._election
        election.deposed = silent  # type: ignore[method-assign]
        election.confirm = silent  # type: ignore[method-assign]
        stepped_down = asyncio.create_task(old.leadership.deposed.wait(), name="old-deposed")
        await asyncio.to_thread(etcd.ctl, "del", leader_key(PREFIX))  # the first term's watch sees this
        async with asyncio.timeout(20):
            await stepped_down
        assert (await elected([old])) is old  # the second term: its watch and reads silent
        await asyncio.to_thread(etcd.ctl, "del", leader_key(PREFIX))
        with capture_logs() as logs:
            with pytest.raises(NotLeader):
                await old.leadership.fenced([Put(f"{PREFIX}/x", b"1")])
            async with asyncio.timeout(20):
                await old.leadership.deposed.wait()
        reasons = [e.get("reason") for e in logs if e["event"] == "leader.deposed"]
        assert reasons == ["a fenced write found the leader key changed"], logs
