"""Starting, waiting for and stopping the processes the sandbox owns, by pid."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp import web

REPO = Path(__file__).resolve().parent.parent


class SandboxError(RuntimeError):
    """A sandbox component did not start or stop as it should."""


def venv_python() -> str:
    """The project's interpreter (.venv, made by scripts/bootstrap.sh), else the one running us."""
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _ephemeral_low() -> int:
    """The first port of the kernel's range for the local ends of outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ports handed out by free_port(), claimed across processes: a port a sandbox picked is often bound only
# later (an app unit's port, reserved when its fleet starts, is listened on when the unit first runs),
# and meanwhile another process's free_port() must not hand it out again. A claim is a file named
# after the port holding the claimer's pid; it lapses when that process is gone, or after an hour.
PORT_CLAIMS = Path(os.environ.get("NORM_SANDBOX_PORT_CLAIMS", "/tmp/norm-sandbox-ports"))
CLAIM_LIFETIME = 3600.0


def _claim(port: int) -> bool:
    """Claim `port` for this process; False if another live process holds a fresh claim on it."""
    PORT_CLAIMS.mkdir(parents=True, exist_ok=True)
    path = PORT_CLAIMS / str(port)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        try:
            pid = int(path.read_text() or "0")
            fresh = time.time() - path.stat().st_mtime < CLAIM_LIFETIME
        except (OSError, ValueError):
            pid, fresh = 0, False
        if fresh and pid > 0 and (pid == os.getpid() or pid_alive(pid)):
            return False
        tmp = PORT_CLAIMS / f".{port}.{os.getpid()}"
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, path)  # a lapsed claim: taken over
        return True
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now, and that no other sandbox process (nor
    this one) has been handed lately (see PORT_CLAIMS). It is taken from below the kernel's ephemeral
    range, where no outgoing connection of any process lands meanwhile: a sandbox keeps its ports
    across restarts of what listens on them (an agent started again, a member restarted)."""
    high = _ephemeral_low()
    low = max(1024, high - 12000)
    rng = random.SystemRandom()
    for _ in range(500):
        port = rng.randrange(low, high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        if _claim(port):
            return port
    raise SandboxError(f"no free TCP port on loopback in {low}-{high - 1}")


def wait_for(condition: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.05) -> None:
    """Wait until `condition()` is true, or raise SandboxError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except SandboxError:
            raise  # the condition knows it will never hold (the daemon died, say)
        except Exception:  # a condition probing a daemon that is still coming up may raise
            pass
        if time.monotonic() > deadline:
            raise SandboxError(f"{what}: not ready after {timeout:.0f}s")
        time.sleep(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


@dataclass
class Proc:
    """One daemon the sandbox started: its argv, log file and pid."""

    name: str
    argv: Sequence[str]
    log: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    pid: int | None = None
    _popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, preexec: Callable[[], None] | None = None) -> int:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ if self.env is None else self.env)
        with open(self.log, "ab") as out:
            self._popen = subprocess.Popen(
                list(self.argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=preexec,
            )
        self.pid = self._popen.pid
        return self.pid

    @property
    def alive(self) -> bool:
        if self.pid is None:
            return False
        if self._popen is not None:
            return self._popen.poll() is None and pid_alive(self.pid)
        return pid_alive(self.pid)

    def signal(self, sig: int) -> None:
        if self.pid is not None and self.alive:
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (after SIGCONT, in case it was frozen), then SIGKILL after `timeout`."""
        if self.pid is None:
            return
        pid = self.pid
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGTERM)
            try:
                wait_for(lambda: not self.alive, timeout=timeout, what=f"{self.name} exit")
            except SandboxError:
                self.kill()
        self._reap()
        self.pid = None

    def kill(self) -> None:
        """SIGKILL, and wait until it is gone."""
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        wait_for(lambda: not self.alive, timeout=10, what=f"{self.name} killed")
        self._reap()

    def _reap(self) -> None:
        if self._popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout=1)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class LocalServer:
    """An HTTP server the sandbox runs on a free loopback port (the instance-metadata and moto servers,
    the image registry), with its log in `workdir`. A subclass says what it runs (`name`, `argv`,
    `env`, what `prepare` puts in place first) and how it is seen to answer (`answers`)."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: Proc | None = None

    name = "server"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive

    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ, PYTHONUNBUFFERED="1")

    def answers(self) -> bool:
        raise NotImplementedError

    def prepare(self) -> None:
        """What must be in place before the process starts."""

    def start(self, timeout: float = 30.0) -> None:
        if self.alive:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.prepare()
        self.proc = Proc(self.name, self.argv(), self.log, env=self.env(), cwd=REPO)
        self.proc.start()
        try:  # the condition is also true when the server died, so that a crash fails fast
            wait_for(lambda: not self.alive or self.answers(), timeout=timeout,
                     what=f"{self.name} on {self.endpoint}")
            if not self.alive:
                raise SandboxError(f"{self.name} exited")
        except SandboxError as e:
            tail = self.proc.tail()
            self.stop()
            raise SandboxError(f"{e}:\n{tail}") from None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


def serve_app(app: web.Application, host: str, port: int, banner: str,
              on_exit: Callable[[], None] | None = None) -> None:
    """Run an aiohttp application on host:port in this process until SIGTERM (a sandbox server's
    child process), saying `banner` once it listens; `on_exit` runs as it ends."""
    import asyncio

    from aiohttp import web

    def exit_on(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, exit_on)

    async def main() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        print(banner, flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()
            if on_exit is not None:
                on_exit()

    asyncio.run(main())
