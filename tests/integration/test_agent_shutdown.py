"""The agent's bounded graceful stop, in-process against real etcd, with one service that will not
stop when asked (a stand-in for work that overruns its bound)."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal

from structlog.testing import capture_logs

from norm.adapters.etcd import Etcd
from norm.app.agent import EXIT_OK, Agent
from norm.app.sdnotify import Notifier
from norm.app.settings import Identity
from norm.core import config as cfg
from norm.services.base import Service
from sandbox.etcd import EtcdMember
from sandbox.procs import free_port


class Stubborn:
    name = "stubborn"

    def __init__(self) -> None:
        self.cancelled = False

    async def run(self, stopping: asyncio.Event) -> None:
        try:
            await asyncio.Event().wait()  # ignores `stopping`
        except asyncio.CancelledError:
            self.cancelled = True
            raise


class RecordingNotifier(Notifier):
    def __init__(self) -> None:
        super().__init__({})
        self.ready = asyncio.Event()

    def notify(self, message: str) -> None:
        super().notify(message)
        if message == "READY=1":
            self.ready.set()


class AgentWithStubbornService(Agent):
    def services(self, etcd: Etcd) -> list[Service]:
        self.stubborn = Stubborn()
        return [*super().services(etcd), self.stubborn]


async def test_work_that_overruns_the_bound_is_cancelled_and_the_host_still_leaves(etcd: EtcdMember) -> None:
    config = cfg.build(cfg.raw_from_flags([
        f"etcd.endpoints={etcd.endpoint}", "etcd.lease_ttl=3", "etcd.request_timeout=1",
        f"http.listen=127.0.0.1:{free_port()}", "agent.shutdown_timeout=1", "healing.enabled=false",
    ]))
    notifier = RecordingNotifier()
    agent = AgentWithStubbornService(config, Identity(secrets.token_hex(16), "h1"), notifier)
    loop = asyncio.get_running_loop()
    run = asyncio.create_task(agent.run(), name="agent-under-test")
    async with asyncio.timeout(15):
        await notifier.ready.wait()
    asked = loop.time()
    agent.stopping.set()
    async with asyncio.timeout(5):
        code = await run
    took = loop.time() - asked
    assert code == EXIT_OK
    assert agent.stubborn.cancelled
    assert 1.0 <= took < 2.0, took
    assert agent.notifier.sent[-1] == "STOPPING=1"
    # The registration service finished its part before the bound: the host left at once.
    async with Etcd(config.etcd) as client:
        assert (await client.get_prefix("/norm/hosts/")).kvs == ()


class StopRecordingNotifier(RecordingNotifier):
    def __init__(self) -> None:
        super().__init__()
        self.stopping = asyncio.Event()

    def notify(self, message: str) -> None:
        super().notify(message)
        if message == "STOPPING=1":
            self.stopping.set()


async def test_a_second_signal_cancels_what_is_left_without_waiting_for_the_bound(etcd: EtcdMember) -> None:
    config = cfg.build(cfg.raw_from_flags([
        f"etcd.endpoints={etcd.endpoint}", "etcd.lease_ttl=3", "etcd.request_timeout=1",
        f"http.listen=127.0.0.1:{free_port()}", "agent.shutdown_timeout=60", "healing.enabled=false",
    ]))
    notifier = StopRecordingNotifier()
    agent = AgentWithStubbornService(config, Identity(secrets.token_hex(16), "h1"), notifier)
    loop = asyncio.get_running_loop()
    run = asyncio.create_task(agent.run(), name="agent-under-test")
    async with asyncio.timeout(15):
        await notifier.ready.wait()
    with capture_logs() as logs:
        os.kill(os.getpid(), signal.SIGTERM)  # the first: a graceful stop, bounded by 60 s
        async with asyncio.timeout(15):
            await notifier.stopping.wait()
        assert not run.done()  # the stubborn service holds the graceful stop up
        asked = loop.time()
        os.kill(os.getpid(), signal.SIGINT)  # the second: stop now
        async with asyncio.timeout(15):
            code = await run
    assert code == EXIT_OK
    assert agent.stubborn.cancelled
    assert loop.time() - asked < 15 < config.agent.shutdown_timeout
    events = [e["event"] for e in logs]
    assert events.index("agent.stop_forced") < events.index("agent.shutdown_forced")
    assert next(e for e in logs if e["event"] == "agent.shutdown_forced")["second_signal"] is True
