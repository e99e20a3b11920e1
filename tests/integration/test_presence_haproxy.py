"""Load-balancer presence with the HAProxy backend, against a real HAProxy and a real systemd manager:
the host's server is put in service once its web unit is active and answers its health URL, drained
when the unit fails, and before an update's stop drained (waiting for the sessions it serves, within
lb.drain_timeout) and put in maintenance. HAProxy's own log says what it did, in order."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from norm.adapters.haproxy import Haproxy
from norm.adapters.systemd import Systemd
from norm.core.config import LbConfig
from norm.services.balancers import HaproxyBackends
from norm.services.executor import HOLD_OWNER
from norm.services.holds import Holds
from norm.services.metrics import Metrics
from norm.services.presence import Presence
from sandbox.haproxy import HaproxyServer
from sandbox.procs import free_port
from sandbox.systemd import SystemdManager
from tests.integration.elb import web_unit

WEB = "djed-web.service"


@dataclass
class Rig:
    lb: HaproxyServer
    haproxy: Haproxy
    systemd: Systemd
    presence: Presence
    metrics: Metrics
    root: Path
    logs: list[dict[str, Any]] = field(default_factory=list)

    async def until(self, what: str, predicate: Callable[[], bool], timeout: float = 20) -> None:
        """Wait, woken by each pass of presence's work loop, until `predicate()` holds."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    self.presence.progress.clear()
                    await self.presence.progress.wait()
        except TimeoutError:
            raise AssertionError(f"{what}: not within {timeout}s; registered {self.presence.registered}, "
                                 f"events {self.events()}") from None

    def registered(self, value: bool) -> Callable[[], bool]:
        return lambda: self.presence.registered == {"web": value}

    async def admin(self) -> str:
        return (await self.haproxy.server("web", "host1")).admin

    def events(self, *names: str) -> list[str]:
        return [e["event"] for e in self.logs if not names or e["event"] in names]

    def transitions(self) -> list[str]:
        """What HAProxy logged of host1's state changes, in order."""
        said = {"is UP/READY (leaving forced maintenance)": "ready", "is UP (leaving forced drain)": "ready",
                "enters drain state": "drain", "going DOWN for maintenance": "maint"}
        out = []
        for line in self.lb.log.read_text().splitlines():
            if "Server web/host1 " in line:
                out += [word for text, word in said.items() if text in line]
        return out


@asynccontextmanager
async def rig_for(haproxy: Callable[..., HaproxyServer], manager: SystemdManager, tmp_path: Path, *,
                  drain_timeout: float = 5.0, recheck_interval: float = 0.0, start: bool = True
                  ) -> AsyncIterator[Rig]:
    port = free_port()
    root = tmp_path / "www"
    root.mkdir(exist_ok=True)
    manager.write_unit(WEB, web_unit(port, root))
    lb = haproxy([("host1", port)])
    config = LbConfig(backend="haproxy", haproxy_backends=("web",), haproxy_server="host1",
                      haproxy_socket=str(lb.socket_path), unit=WEB, health_url=f"http://127.0.0.1:{port}/",
                      drain_timeout=drain_timeout, recheck_interval=recheck_interval, health_timeout=1.0,
                      health_give_up=20.0)
    metrics, holds = Metrics(), Holds()
    client = Haproxy(str(lb.socket_path), call_timeout=5, poll_interval=0.1)
    with capture_logs() as logs:
        async with Systemd(manager.bus_address, call_timeout=10) as systemd:
            if start:
                await systemd.start(WEB)
            presence = Presence(systemd, HaproxyBackends(client, "host1"), config, metrics, holds=holds,
                                hold_owner=HOLD_OWNER)
            stopping = asyncio.Event()
            task = asyncio.create_task(presence.run(stopping), name="presence-under-test")
            try:
                yield Rig(lb, client, systemd, presence, metrics, root, logs)
            finally:
                stopping.set()
                async with asyncio.timeout(15):
                    await task


async def get(port: int, path: str = "/") -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: sandbox\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n")
        await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    return int(head.split(b" ", 2)[1])


async def test_the_server_is_put_in_service_once_the_unit_is_healthy_and_drained_when_it_fails(
        haproxy: Callable[..., HaproxyServer], systemd_manager: SystemdManager, tmp_path: Path) -> None:
    async with rig_for(haproxy, systemd_manager, tmp_path) as rig:
        await rig.until("registered", rig.registered(True))
        assert await rig.admin() == "ready"
        assert rig.metrics.lb_registered.labels("web")._value.get() == 1
        assert await get(rig.lb.port) == 200  # served through HAProxy
        assert rig.events("lb.unit_active", "lb.healthy", "lb.registered") == [
            "lb.unit_active", "lb.healthy", "lb.registered"]
        started = next(e for e in rig.logs if e["event"] == "lb.presence_started")
        assert (started["load_balancer"], started["member"]) == ("haproxy", "host1")

        pid = (await rig.systemd.unit(WEB)).main_pid
        os.kill(pid, signal.SIGKILL)
        await rig.until("deregistered", rig.registered(False))
        assert await rig.admin() == "drain"
        assert await get(rig.lb.port) == 503  # no server in service

        await rig.systemd.start(WEB)
        await rig.until("registered again", rig.registered(True))
        assert await rig.admin() == "ready"
        assert rig.transitions() == ["ready", "drain", "ready"]


async def test_before_a_stop_the_server_is_drained_then_put_in_maintenance(
        haproxy: Callable[..., HaproxyServer], systemd_manager: SystemdManager, tmp_path: Path) -> None:
    async with rig_for(haproxy, systemd_manager, tmp_path) as rig:
        await rig.until("registered", rig.registered(True))
        await rig.presence.before_stop()
        assert rig.presence.registered == {"web": False}
        assert await rig.admin() == "maint"
        assert rig.transitions() == ["ready", "drain", "maint"]
        assert rig.events("lb.suspended", "lb.deregistered", "lb.drained") == [
            "lb.suspended", "lb.deregistered", "lb.drained"]
        assert "lb.drain_timeout" not in rig.events()

        # The update starts the unit again: a new run, back in service once healthy.
        await rig.systemd.restart(WEB)
        await rig.presence.after_start()
        await rig.until("registered again", rig.registered(True))
        assert rig.transitions() == ["ready", "drain", "maint", "ready"]


async def test_draining_before_a_stop_waits_for_a_session_within_the_drain_timeout(
        haproxy: Callable[..., HaproxyServer], systemd_manager: SystemdManager, tmp_path: Path) -> None:
    async with rig_for(haproxy, systemd_manager, tmp_path, drain_timeout=1.0) as rig:
        (rig.root / "big").write_bytes(b"x" * (64 << 20))
        await rig.until("registered", rig.registered(True))
        # A download through HAProxy that the client does not read: the session stays open.
        reader, writer = await asyncio.open_connection("127.0.0.1", rig.lb.port)
        writer.write(b"GET /big HTTP/1.1\r\nHost: sandbox\r\nConnection: close\r\n\r\n")
        await writer.drain()
        assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.0 200")
        assert await rig.haproxy.current_sessions("web", "host1") == 1

        loop = asyncio.get_running_loop()
        started = loop.time()
        await rig.presence.before_stop()
        assert 1.0 <= loop.time() - started < 5
        assert "lb.drain_timeout" in rig.events()
        # Out of service for new sessions; the one it serves goes on.
        assert rig.presence.registered == {"web": False} and await rig.admin() == "drain"
        assert rig.transitions() == ["ready", "drain"]

        received = len(await reader.read())  # the client reads it all: the session ends
        writer.close()
        await writer.wait_closed()
        assert received > 0
        assert await rig.haproxy.current_sessions("web", "host1") == 0


async def test_a_unit_that_is_down_leaves_the_server_in_maintenance_until_it_serves(
        haproxy: Callable[..., HaproxyServer], systemd_manager: SystemdManager, tmp_path: Path) -> None:
    async with rig_for(haproxy, systemd_manager, tmp_path, start=False) as rig:
        # The registration is unknown at the start and made sure of: out, and left in maintenance
        # (not drained out of it).
        await rig.until("known to be out", rig.registered(False))
        assert await rig.admin() == "maint" and rig.transitions() == []
        await rig.systemd.start(WEB)
        await rig.until("registered", rig.registered(True))
        assert rig.transitions() == ["ready"]
