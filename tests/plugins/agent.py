"""Real `norm agent` processes for the tests, each with its own config, HTTP port and sd_notify
socket (so a test waits on READY=1 and friends instead of polling)."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sandbox.procs import Proc, free_port

REPO = Path(__file__).resolve().parents[2]


@dataclass
class AgentProc:
    name: str
    workdir: Path
    endpoints: list[str]
    extra_toml: str = ""
    env: dict[str, str] = field(default_factory=dict)
    machine_id: str = field(default_factory=lambda: secrets.token_hex(16))
    systemd_bus: str | None = None  # a manager's bus: healing on; None: healing off
    host_labels: bool = True  # write host.environment and host.role ("test", "web") into the config
    # Update mode on (needs systemd_bus), with an engine that is not there: only such a host campaigns
    # for leadership. Nothing is pulled unless a test sets a version.
    updates: bool = False
    lease_ttl: int = 3  # seconds: short, so that a killed agent's keys go quickly
    http_port: int = field(default_factory=free_port)
    wrapper: list[str] = field(default_factory=list)  # argv the agent runs under (setpriv ..., say)
    proc: Proc | None = None
    notify: socket.socket | None = None

    @property
    def config_path(self) -> Path:
        return self.workdir / "norm.toml"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        endpoints = ", ".join(f'"{e}"' for e in self.endpoints)
        self.config_path.write_text(
            f"[etcd]\nendpoints = [{endpoints}]\nlease_ttl = {self.lease_ttl}\nrequest_timeout = 1.0\n"
            f"keepalive_time = 5\nkeepalive_timeout = 2\n"
            f'[host]\nmachine_id = "{self.machine_id}"\nname = "{self.name}"\n'
            + ('environment = "test"\nrole = "web"\n' if self.host_labels else "")
            + f'[http]\nlisten = "127.0.0.1:{self.http_port}"\n'
            f'[agent]\nshutdown_timeout = 5\nstate_dir = "{self.workdir / "state"}"\n'
            '[log]\nformat = "json"\nlevel = "debug"\n'
            + (f'[systemd]\nbus_address = "{self.systemd_bus}"\n' if self.systemd_bus
               else "[healing]\nenabled = false\n")
            + (f'[docker]\nhost = "unix://{self.workdir / "no-engine.sock"}"\n'
               f'[update]\nimage = "127.0.0.1:5000/norm-test/app"\n'
               f'release_file = "{self.workdir / "release.env"}"\n' if self.updates else "")
            + self.extra_toml)

    def start(self) -> None:
        self.write_config()
        sock_path = self.workdir / "notify.sock"
        sock_path.unlink(missing_ok=True)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(sock_path))
        env = dict(os.environ, NOTIFY_SOCKET=str(sock_path), **self.env)
        self.proc = Proc(self.name, [*self.wrapper, sys.executable, "-m", "norm", "agent", "--config",
                                     str(self.config_path)], self.workdir / "agent.log", env=env, cwd=REPO)
        self.proc.start()

    def wait_notify(self, message: str, timeout: float = 20) -> list[str]:
        """Block until the agent sends `message` (e.g. READY=1) over sd_notify; all seen so far."""
        assert self.notify is not None
        self.notify.settimeout(timeout)
        seen: list[str] = []
        try:
            while True:
                data = self.notify.recv(4096).decode()
                seen.append(data)
                if message in data.split("\n"):
                    return seen
        except TimeoutError:
            raise AssertionError(f"{self.name}: no {message} in {timeout}s; got {seen}\n"
                                 f"{self.proc.tail() if self.proc else ''}") from None

    def drain_notify(self) -> list[str]:
        """Every sd_notify message waiting on the socket, without blocking."""
        assert self.notify is not None
        self.notify.setblocking(False)
        out: list[str] = []
        try:
            while True:
                out.extend(self.notify.recv(4096).decode().split("\n"))
        except BlockingIOError:
            return out
        finally:
            self.notify.setblocking(True)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None and self.proc._popen is not None
        try:
            return self.proc._popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit in {timeout}s\n{self.proc.tail()}") from None

    def logs(self) -> str:
        return self.proc.log.read_text() if self.proc else ""

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
        if self.notify is not None:
            self.notify.close()
            self.notify = None


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Callable[..., AgentProc]]:
    started: list[AgentProc] = []

    def make(endpoints: list[str], name: str | None = None, start: bool = True, **kw: object) -> AgentProc:
        name = name or f"host{len(started) + 1}"
        agent = AgentProc(name, tmp_path / name, endpoints, **kw)  # type: ignore[arg-type]
        started.append(agent)
        if start:
            agent.start()
        return agent

    yield make
    for agent in started:
        agent.stop()
