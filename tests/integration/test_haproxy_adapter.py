"""The HAProxy adapter against a real HAProxy (Debian's 2.6) and its Runtime API on a unix socket: state
changes as `show servers state` reports them, errors that say what to do, and draining that waits for
a session held open through HAProxy to a small backend server run by the test."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from norm.adapters.haproxy import (
    AdminState,
    Haproxy,
    HaproxyRejected,
    HaproxyUnavailable,
    ServerState,
    admin_state,
)
from norm.core.errors import Permanent, Temporary
from sandbox.haproxy import HaproxyServer
from sandbox.procs import free_port


@dataclass
class SlowBackend:
    """An HTTP server that answers each request only once `release` is set: a session that stays open
    through HAProxy for as long as the test wants."""

    port: int
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    requests: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            self.arrived.set()
            await self.release.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def slow_backend() -> AsyncIterator[SlowBackend]:
    backend = SlowBackend(free_port())
    server = await asyncio.start_server(backend.handle, "127.0.0.1", backend.port)
    try:
        yield backend
    finally:
        backend.release.set()
        server.close()
        await server.wait_closed()


async def get(url_port: int) -> tuple[int, bytes]:
    """GET / through HAProxy: (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", url_port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: sandbox\r\nConnection: close\r\n\r\n")
        await writer.drain()
        reply = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


class Watched(Haproxy):
    """The adapter, telling the test each state it has set."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.states: list[str] = []
        self.changed = asyncio.Event()

    async def set_state(self, backend: str, server: str, state: AdminState) -> None:
        await super().set_state(backend, server, state)
        self.states.append(state)
        self.changed.set()


def test_admin_state_decodes_the_mask_as_haproxy_does() -> None:
    assert [admin_state(m) for m in (0, 4, 1, 5, 8, 12, 9, 0x10, 0x20, 0x02)] == [
        "ready", "ready", "maint", "maint", "drain", "drain", "maint", "drain", "maint", "maint"]


async def test_servers_start_disabled_and_change_state(haproxy: Callable[..., HaproxyServer]) -> None:
    ports = [free_port(), free_port()]
    lb = haproxy([("host1", ports[0]), ("host2", ports[1])])
    async with Haproxy(str(lb.socket_path), call_timeout=5) as h:
        servers = await h.servers("web")
        assert servers == (
            ServerState("web", "host1", "maint", "down", "127.0.0.1", ports[0], 1, admin_flags=5),
            ServerState("web", "host2", "maint", "down", "127.0.0.1", ports[1], 1, admin_flags=5))
        await h.set_state("web", "host1", "ready")
        one = await h.server("web", "host1")
        # `disabled` in the configuration stays in the mask (0x04) but no longer keeps it out.
        assert (one.admin, one.operational, one.ready, one.admin_flags) == ("ready", "up", True, 4)
        assert (await h.server("web", "host2")).admin == "maint"
        await h.set_state("web", "host1", "ready")  # idempotent
        await h.set_state("web", "host1", "drain")
        assert (await h.server("web", "host1")).admin == "drain"
        await h.set_state("web", "host1", "maint")
        assert (await h.server("web", "host1")).admin == "maint"
        assert await h.current_sessions("web", "host1") == 0


async def test_refusals_are_permanent(haproxy: Callable[..., HaproxyServer]) -> None:
    lb = haproxy([("host1", free_port())])
    async with Haproxy(str(lb.socket_path), call_timeout=5) as h:
        cases = [h.set_state("nope", "host1", "ready"), h.set_state("web", "nope", "drain"),
                 h.servers("nope"), h.server("web", "nope"), h.current_sessions("nope", "host1"),
                 h.current_sessions("web", "nope"), h.set_state("web", "host1 state ready;", "ready")]
        messages = []
        for call in cases:
            with pytest.raises(HaproxyRejected) as e:
                await call
            assert isinstance(e.value, Permanent) and not isinstance(e.value, Temporary)
            messages.append(str(e.value))
        assert "No such backend" in messages[0] and "No such server" in messages[1]
        assert "Can't find backend" in messages[2] and "No such server" in messages[3]
        assert "No such proxy" in messages[4] and "No such server" in messages[5]
        with pytest.raises(ValueError):
            await h.set_state("web", "host1", "up")  # type: ignore[arg-type]
        assert (await h.server("web", "host1")).admin == "maint"  # nothing changed


async def test_a_missing_or_dead_socket_is_temporary(haproxy: Callable[..., HaproxyServer],
                                                     tmp_path: Path) -> None:
    async with Haproxy(str(tmp_path / "none.sock"), call_timeout=2) as h:
        with pytest.raises(HaproxyUnavailable) as e:
            await h.set_state("web", "host1", "ready")
        assert isinstance(e.value, Temporary) and "no socket" in str(e.value)
        # Asked again until its bound, then False.
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await h.wait_drained("web", "host1", within=0.3) is False
        assert 0.3 <= loop.time() - started < 3
    lb = haproxy([("host1", free_port())])
    lb.stop()  # the socket file stays, nothing listens on it
    assert lb.socket_path.exists()
    async with Haproxy(str(lb.socket_path), call_timeout=2) as h:
        with pytest.raises(HaproxyUnavailable) as e:
            await h.servers("web")
        assert "ConnectionRefusedError" in str(e.value)


async def test_a_socket_that_never_answers_is_temporary(tmp_path: Path) -> None:
    path = tmp_path / "mute.sock"
    accepted: list[asyncio.StreamWriter] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # reads nothing, answers nothing

    server = await asyncio.start_unix_server(mute, str(path))
    try:
        async with Haproxy(str(path), call_timeout=0.3) as h:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(HaproxyUnavailable) as e:
                await h.servers("web")
            assert "no answer within 0.3s" in str(e.value)
            assert 0.3 <= loop.time() - started < 3
    finally:
        for w in accepted:
            w.close()
        server.close()
        await server.wait_closed()


async def test_draining_waits_for_a_session_held_open_then_puts_the_server_in_maintenance(
        haproxy: Callable[..., HaproxyServer]) -> None:
    async with slow_backend() as backend:
        lb = haproxy([("host1", backend.port)], disabled=False)
        async with Watched(str(lb.socket_path), call_timeout=5, poll_interval=0.2) as h:
            held = asyncio.create_task(get(lb.port), name="held-session")
            async with asyncio.timeout(10):
                await backend.arrived.wait()
            assert await h.current_sessions("web", "host1") == 1

            draining = asyncio.create_task(h.wait_drained("web", "host1", within=30), name="drain")
            async with asyncio.timeout(10):
                await h.changed.wait()
            assert h.states == ["drain"] and (await h.server("web", "host1")).admin == "drain"
            # Draining: no new session goes to the server (the only one: HAProxy answers 503 itself),
            # and the one held open goes on; the wait goes on with it.
            status, _ = await get(lb.port)
            assert status == 503 and backend.requests == 1
            assert await h.current_sessions("web", "host1") == 1
            assert not draining.done()

            backend.release.set()
            assert await held == (200, b"ok\n")
            async with asyncio.timeout(10):
                assert await draining is True
            assert (await h.server("web", "host1")).admin == "maint" and h.states == ["drain", "maint"]
            assert await h.current_sessions("web", "host1") == 0


async def test_draining_is_bounded_while_a_session_stays_open(
        haproxy: Callable[..., HaproxyServer]) -> None:
    async with slow_backend() as backend:
        lb = haproxy([("host1", backend.port)], disabled=False)
        async with Haproxy(str(lb.socket_path), call_timeout=5, poll_interval=0.1) as h:
            held = asyncio.create_task(get(lb.port), name="held-session")
            async with asyncio.timeout(10):
                await backend.arrived.wait()
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await h.wait_drained("web", "host1", within=0.6) is False
            assert 0.6 <= loop.time() - started < 3
            # Left draining, the session still on it.
            one = await h.server("web", "host1")
            assert one.admin == "drain" and await h.current_sessions("web", "host1") == 1
            backend.release.set()
            assert await held == (200, b"ok\n")
            # Nothing held: drained at once.
            assert await h.wait_drained("web", "host1", within=5) is True
            assert (await h.server("web", "host1")).admin == "maint"


async def test_a_server_in_maintenance_is_not_drained_out_of_it(
        haproxy: Callable[..., HaproxyServer]) -> None:
    lb = haproxy([("host1", free_port())])  # disabled: in maintenance
    async with Watched(str(lb.socket_path), call_timeout=5) as h:
        # HAProxy's own `state drain` would take it out of maintenance into drain.
        assert await h.drain("web", "host1") == "maint"
        assert await h.wait_drained("web", "host1", within=5) is True
        assert h.states == ["maint"] and (await h.server("web", "host1")).admin == "maint"
        await h.set_state("web", "host1", "ready")
        assert await h.drain("web", "host1") == "ready"
        assert (await h.server("web", "host1")).admin == "drain"
