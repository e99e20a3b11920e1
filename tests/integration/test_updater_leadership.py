"""The updater against a real etcd when its leadership turns out to be gone at its first write (as for
a leader frozen past its lease): the write is refused, the updater stands down and waits to be elected
again; the agent's service does not die."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from structlog.testing import capture_logs
from structlog.typing import EventDict

from norm.adapters.etcd import Compare, Delete, Etcd, NotLeader, Op, TxnResult
from norm.core.config import EtcdConfig, UpdateConfig
from norm.services.context import HostContext
from norm.services.metrics import Metrics
from norm.services.updater import Updater
from norm.services.watcher import DesiredStateWatcher
from sandbox.etcd import EtcdMember

UPDATE = UpdateConfig(image="127.0.0.1:5000/djed/app")


class LeaseGoneAtFirstWrite:
    """The leadership as the updater sees it: elected, but every fenced write finds the lease can no
    longer be proven alive (what the real election's `fenced` raises after a freeze)."""

    def __init__(self) -> None:
        self.elected = asyncio.Event()
        self.elected.set()
        self.deposed = asyncio.Event()
        self.refused = 0

    async def fenced(self, success: Sequence[Op], compare: Sequence[Compare] = (),
                     failure: Sequence[Op] = ()) -> TxnResult:
        self.refused += 1
        raise NotLeader("the leader's lease cannot be proven alive")

    def lose(self) -> None:
        self.elected.clear()
        self.deposed.set()


def signal_on(event: str, flag: asyncio.Event) -> Callable[[object, str, EventDict], EventDict]:
    """A log processor that sets `flag` when `event` is logged."""
    def processor(logger: object, method: str, event_dict: EventDict) -> EventDict:
        if event_dict.get("event") == event:
            flag.set()
        return event_dict

    return processor


async def test_a_refused_leader_write_stands_the_updater_down_without_killing_it(etcd: EtcdMember) -> None:
    config = EtcdConfig(endpoints=(etcd.endpoint,), request_timeout=5.0, lease_ttl=5)
    metrics, leadership, stopping = Metrics(), LeaseGoneAtFirstWrite(), asyncio.Event()

    async def resolve(tag: str) -> str:
        return "sha256:" + "2" * 64

    stood_down = asyncio.Event()
    with capture_logs(processors=[signal_on("updater.not_leader", stood_down)]) as logs:
        async with Etcd(config) as client:
            watcher = DesiredStateWatcher(client, "/djed-version", "/djed-environment", metrics, 300.0)
            updater = Updater(HostContext(client, "/norm", "a" * 32, metrics), UPDATE, "test",
                              leadership, watcher, resolve)  # type: ignore[arg-type]
            watching = asyncio.create_task(watcher.run(stopping), name="watcher-under-test")
            updating = asyncio.create_task(updater.run(stopping), name="updater-under-test")
            try:
                await client.put("/djed-version", b"v2")
                async with asyncio.timeout(10):
                    await stood_down.wait()  # the write refused, the updater standing down
                assert leadership.refused >= 1
                assert not updating.done()  # it waits to be deposed, then to be elected again
                leadership.lose()
                stopping.set()
                async with asyncio.timeout(10):
                    await updating  # returns; raises nothing
            finally:
                stopping.set()
                async with asyncio.timeout(10):
                    await asyncio.gather(watching, updating, return_exceptions=True)
    assert "the leader's lease cannot be proven alive" in next(
        e["error"] for e in logs if e["event"] == "updater.not_leader")


class LostBeforeTrim:
    """A leadership whose writes apply until the updater trims old rollouts; by then another agent
    leads, and the trim's fenced write is refused."""

    def __init__(self, client: Etcd) -> None:
        self._client = client
        self.elected = asyncio.Event()
        self.elected.set()
        self.deposed = asyncio.Event()

    async def fenced(self, success: Sequence[Op], compare: Sequence[Compare] = (),
                     failure: Sequence[Op] = ()) -> TxnResult:
        if all(isinstance(op, Delete) for op in success):
            raise NotLeader("leadership 7 was lost")
        return await self._client.txn(list(compare), list(success), list(failure))

    def lose(self) -> None:
        self.elected.clear()
        self.deposed.set()


async def test_a_refused_trim_stands_the_updater_down(etcd: EtcdMember) -> None:
    config = EtcdConfig(endpoints=(etcd.endpoint,), request_timeout=5.0, lease_ttl=5)
    metrics, stopping = Metrics(), asyncio.Event()

    async def resolve(tag: str) -> str:
        return "sha256:" + "2" * 64

    stood_down = asyncio.Event()
    with capture_logs(processors=[signal_on("updater.not_leader", stood_down)]) as logs:
        async with Etcd(config) as client:
            leadership = LostBeforeTrim(client)
            await client.put("/norm/rollouts/1/record", b"{}")  # an earlier rollout's keys: trimmed
            watcher = DesiredStateWatcher(client, "/djed-version", "/djed-environment", metrics, 300.0)
            updater = Updater(HostContext(client, "/norm", "a" * 32, metrics), UPDATE, "test",
                              leadership, watcher, resolve)  # type: ignore[arg-type]
            watching = asyncio.create_task(watcher.run(stopping), name="watcher-under-test")
            updating = asyncio.create_task(updater.run(stopping), name="updater-under-test")
            try:
                await client.put("/djed-version", b"v2")  # no host registered: fails at once, then trims
                async with asyncio.timeout(10):
                    await stood_down.wait()
                leadership.lose()
            finally:
                stopping.set()
                async with asyncio.timeout(10):
                    await asyncio.gather(watching, updating, return_exceptions=True)
    assert not any(e["event"] == "updater.trim_failed" for e in logs)
