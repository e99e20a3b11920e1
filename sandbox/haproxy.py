"""A real load balancer for the sandbox: Debian's HAProxy (2.6) in the foreground, on a free loopback
port, with a generated configuration and its Runtime API on a unix socket in its work dir.

The configuration: one HTTP frontend on 127.0.0.1:<port>, one backend (`web` by default) with one
server per sandbox host, named after the host and pointing at that host's web unit port. Every server
starts in maintenance (`disabled`): the host's Norm agent puts it in service once its web unit is
healthy (load-balancer presence, lb.backend = "haproxy"), drains it before an update stops the unit,
and takes it out. Norm decides readiness; HAProxy runs no health checks of its own here. With
`option redispatch` and `retries`, a request whose connection to a server fails goes to another one.

The stats socket has `level admin`: state changes need it.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.procs import LocalServer, port_open

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
BACKEND = "web"


def config_text(*, port: int, socket_path: str, servers: Sequence[tuple[str, int]], backend: str = BACKEND,
                disabled: bool = True, mode: str = "http") -> str:
    """HAProxy's configuration: a frontend on 127.0.0.1:`port` whose default backend has one server per
    (name, port) on 127.0.0.1, each starting in maintenance when `disabled`."""
    lines = [
        "global",
        f"    stats socket {socket_path} mode 600 level admin",
        "    stats timeout 30s",
        "",
        "defaults",
        f"    mode {mode}",
        "    timeout connect 2s",
        "    timeout client 60s",
        "    timeout server 60s",
        "    timeout queue 5s",
        "    option redispatch",
        "    retries 2",
        "",
        "frontend fe_web",
        f"    bind 127.0.0.1:{port}",
        f"    default_backend {backend}",
        "",
        f"backend {backend}",
        "    balance roundrobin",
    ]
    for name, server_port in servers:
        lines.append(f"    server {name} 127.0.0.1:{server_port}" + (" disabled" if disabled else ""))
    return "\n".join(lines) + "\n"


@dataclass
class HaproxyServer(LocalServer):
    """`HaproxyServer(workdir, servers=[("host1", 8081)]).start()`; `url` is the frontend's."""

    servers: Sequence[tuple[str, int]] = field(default_factory=list)
    backend: str = BACKEND
    disabled: bool = True
    mode: str = "http"

    name = "haproxy"

    @property
    def url(self) -> str:
        return self.endpoint

    @property
    def config(self) -> Path:
        return self.workdir / "haproxy.cfg"

    @property
    def socket_path(self) -> Path:
        return self.workdir / "admin.sock"

    def prepare(self) -> None:
        self.socket_path.unlink(missing_ok=True)  # a socket a killed HAProxy left behind
        self.config.write_text(config_text(port=self.port, socket_path=str(self.socket_path),
                                           servers=self.servers, backend=self.backend,
                                           disabled=self.disabled, mode=self.mode))

    def argv(self) -> list[str]:
        # -db: in the foreground, so that the process started is HAProxy itself (owned by pid).
        return [HAPROXY, "-db", "-f", str(self.config)]

    def answers(self) -> bool:
        return port_open(self.port) and self.command("show info").startswith("Name: HAProxy")

    def admin_states(self, backend: str = BACKEND) -> dict[str, str]:
        """Each server of `backend` and its administrative state: ready, drain or maint."""
        from norm.adapters.haproxy import parse_servers_state

        servers = parse_servers_state(self.command(f"show servers state {backend}"), backend)
        return {s.name: s.admin for s in servers}

    def command(self, command: str, timeout: float = 5.0) -> str:
        """One Runtime API command, answered synchronously (for the sandbox's own checks)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.socket_path))
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")
