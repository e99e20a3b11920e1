"""Real HAProxy processes (Debian's haproxy), one per test that asks, each with its own configuration."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from sandbox.haproxy import HaproxyServer


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Callable[..., HaproxyServer]]:
    """`haproxy([("host1", port), ...], disabled=True)` starts HAProxy with one frontend and one backend
    `web` of those servers (127.0.0.1:port each), its Runtime API at `.socket_path`; stopped after the
    test."""
    started: list[HaproxyServer] = []

    def start(servers: Sequence[tuple[str, int]], **kw: object) -> HaproxyServer:
        server = HaproxyServer(tmp_path / f"haproxy{len(started)}", servers=list(servers), **kw)  # type: ignore[arg-type]
        started.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in reversed(started):
            server.stop()
