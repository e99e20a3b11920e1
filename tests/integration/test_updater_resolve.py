"""The updater's resolving of a tag times its retries on the loop's monotonic clock: a wall clock
stepped forward (NTP, a skewed host) must not fail a resolve whose registry is briefly away."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable, Sequence

from norm.adapters.docker import DockerUnavailable
from norm.adapters.etcd import Compare, Etcd, Op, Put, Resync, TxnResult
from norm.core import protocol as proto
from norm.core.config import EtcdConfig, UpdateConfig
from norm.core.host import HostRecord, hosts_key
from norm.core.record import Phase
from norm.core.rollout import Resolved
from norm.services.context import HostContext
from norm.services.metrics import Metrics
from norm.services.updater import Updater
from norm.services.watcher import DesiredStateWatcher
from sandbox.etcd import EtcdMember


async def test_a_wall_clock_stepped_forward_does_not_fail_a_resolve() -> None:
    answers = iter([DockerUnavailable("the registry is restarting", ref="r", action="resolving"),
                    "127.0.0.1:5000/djed/app@sha256:" + "3" * 64])

    async def resolve(ref: str) -> str:
        answer = next(answers)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    stepped = itertools.count(1_000_000.0, 3600.0)  # every read of the wall clock is an hour later
    host = HostContext(None, "/norm", "a" * 32, Metrics(), clock=lambda: next(stepped))  # type: ignore[arg-type]
    updater = Updater(host, UpdateConfig(image="127.0.0.1:5000/djed/app", pull_timeout=60.0), "test",
                      None, None, resolve)  # type: ignore[arg-type]
    async with asyncio.timeout(30):
        await updater._resolving(7, "v2")
    queued = updater._queue.get_nowait()
    assert getattr(queued, "event", None) == Resolved("sha256:" + "3" * 64)


class SlowHeaderWrite:
    """A leadership whose writes apply to a real etcd; the write of the header of one tag's rollout
    waits until `release` is set (as a slow etcd would make it), with `writing` set meanwhile."""

    def __init__(self, client: Etcd, slow_tag: str) -> None:
        self._client = client
        self._slow = slow_tag
        self.writing, self.release = asyncio.Event(), asyncio.Event()
        self.elected, self.deposed = asyncio.Event(), asyncio.Event()
        self.elected.set()

    async def fenced(self, success: Sequence[Op], compare: Sequence[Compare] = (),
                     failure: Sequence[Op] = ()) -> TxnResult:
        for op in success:
            if isinstance(op, Put) and op.key == proto.header_key("/norm") \
                    and json.loads(op.value)["tag"] == self._slow:
                self.writing.set()
                await self.release.wait()
        return await self._client.txn(list(compare), list(success), list(failure))


async def header_where(client: Etcd, ok: Callable[[proto.Header], bool]) -> proto.Header:
    """The rollout header, once the leader has written one for which `ok` holds (watched)."""
    async with asyncio.timeout(30), client.watch(proto.header_key("/norm")) as w:
        async for item in w:
            kvs = item.snapshot.kvs if isinstance(item, Resync) else (item.kv,) if item.kind == "put" else ()
            for kv in kvs:
                h = proto.Header.decode(kv.value, kv.key)
                if ok(h):
                    return h
    raise AssertionError("the header watch ended")


async def test_a_superseded_rollouts_resolve_result_is_not_taken_for_the_next_ones(etcd: EtcdMember) -> None:
    """Version A is being resolved when version B supersedes it; A's answer comes while B's record is
    being written. B must run B's digest, not A's."""
    dA, dB = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    async with Etcd(EtcdConfig(endpoints=(etcd.endpoint,), request_timeout=5.0)) as client:
        host = HostRecord("c" * 32, "host1", "test", "web", "test")
        await client.put(hosts_key("/norm", host.machine_id), host.encode())
        leadership = SlowHeaderWrite(client, slow_tag="vb")
        a = await client.put("/djed-version", b"va")

        async def resolve(ref: str) -> str:
            if ref.endswith(":va"):
                await leadership.writing.wait()  # A answers while B's header is being written
                leadership.release.set()
                return f"{ref}@{dA}"
            return f"{ref}@{dB}"

        metrics, stopping = Metrics(), asyncio.Event()
        watcher = DesiredStateWatcher(client, "/djed-version", "/djed-environment", metrics, 300.0)
        updater = Updater(HostContext(client, "/norm", "a" * 32, metrics),
                          UpdateConfig(image="127.0.0.1:5000/djed/app"), "test", leadership,  # type: ignore[arg-type]
                          watcher, resolve)
        tasks = [asyncio.create_task(watcher.run(stopping), name="watcher-under-test"),
                 asyncio.create_task(updater.run(stopping), name="updater-under-test")]
        try:
            await header_where(client, lambda h: h.revision == a)  # A is being resolved
            b = await client.put("/djed-version", b"vb")
            h = await header_where(client, lambda h: h.revision == b and h.phase is not Phase.RESOLVE)
            assert h.tag == "vb" and h.digest == dB, h
        finally:
            stopping.set()
            async with asyncio.timeout(15):
                await asyncio.gather(*tasks, return_exceptions=True)
