"""Docker engines, one per simulated host: a dockerd with its own data, exec root, socket and containerd.

Each engine runs `dockerd` with `--bridge=none` (containers go on `--network host`, as the fleet's units
do), or, with `bridge=True`, on a bridge of its own: an interface this module creates on a /24 of a
10.x.0.0/16 that no interface or route on the machine touches, so that several bridge engines (and
other people's docker0) never share or tear down each other's bridge. Port publishing then works
through docker-proxy (no iptables), which is what testcontainers needs.

dockerd starts its own managed containerd under the exec root when no system containerd listens on
/run/containerd/containerd.sock; should one appear, every engine still uses its own containerd
namespace, so engines never see (or clean up) each other's containers.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import random
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.procs import Proc, SandboxError, pid_alive, wait_for

DOCKERD = shutil.which("dockerd") or "/usr/sbin/dockerd"
# The client that ships with the engine speaks its API version; prefer it over any other on PATH.
DOCKER = "/usr/bin/docker" if os.access("/usr/bin/docker", os.X_OK) else (shutil.which("docker") or "docker")

# Unix socket paths must fit in 108 bytes; the longest one dockerd makes under its exec root is
# `containerd/containerd.sock.ttrpc`. Long work dirs get a short runtime dir here instead.
SHORT_RUNTIME_ROOT = Path("/run/norm-docker")
_LONGEST_SOCKET_SUFFIX = len("/exec/containerd/containerd.sock.ttrpc")
_SOCKET_PATH_MAX = 100


def _run(argv: list[str], *, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        argv, check=False, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if check and r.returncode != 0:
        raise SandboxError(f"{' '.join(argv)}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _parents() -> dict[int, int]:
    """pid -> ppid for every process now."""
    out: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                out[int(entry)] = int(f.read().rsplit(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return out


def _descendants(root: int, parents: dict[int, int]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_pids(pids: list[int], what: str) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not any(pid_alive(p) for p in pids), timeout=10, what=what)


def _used_ipv4_networks() -> list[ipaddress.IPv4Network]:
    nets: list[ipaddress.IPv4Network] = []
    for argv in (["ip", "-4", "-o", "addr", "show"], ["ip", "-4", "route", "show", "table", "all"]):
        r = _run(argv, check=False)
        for word in r.stdout.split():
            with contextlib.suppress(ValueError):
                if "/" in word or word.count(".") == 3:
                    nets.append(ipaddress.IPv4Network(word, strict=False))
    return nets


@dataclass
class DockerEngine:
    """One dockerd for one simulated host. `start()`, `docker(...)`, `stop()`; `kill()` for faults."""

    name: str
    workdir: Path
    bridge: bool = False
    start_timeout: float = 60.0
    proc: Proc | None = field(default=None, init=False)
    _bridge_if: str | None = field(default=None, init=False, repr=False)
    _bridge_net: ipaddress.IPv4Network | None = field(default=None, init=False, repr=False)

    # -- paths ------------------------------------------------------------------------------------

    @property
    def token(self) -> str:
        """Stable per work dir: names this engine's runtime dir, containerd namespace and bridge."""
        return hashlib.sha256(str(self.workdir.resolve()).encode()).hexdigest()[:10]

    @property
    def runtime_dir(self) -> Path:
        """Where the sockets live: the work dir when its path is short enough, else under /run."""
        if len(str(self.workdir.resolve())) + _LONGEST_SOCKET_SUFFIX <= _SOCKET_PATH_MAX:
            return self.workdir.resolve()
        return SHORT_RUNTIME_ROOT / self.token

    @property
    def data_root(self) -> Path:
        return self.workdir.resolve() / "data"

    @property
    def exec_root(self) -> Path:
        return self.runtime_dir / "exec"

    @property
    def sock(self) -> Path:
        return self.runtime_dir / "docker.sock"

    @property
    def host(self) -> str:
        """The engine's address for DOCKER_HOST, `docker -H` and API clients."""
        return f"unix://{self.sock}"

    @property
    def pidfile(self) -> Path:
        return self.runtime_dir / "docker.pid"

    @property
    def log(self) -> Path:
        return self.workdir / "dockerd.log"

    @property
    def containerd_namespace(self) -> str:
        return f"norm-{self.token}"

    @property
    def containerd_address(self) -> Path:
        return self.exec_root / "containerd" / "containerd.sock"

    @property
    def bridge_interface(self) -> str | None:
        """The bridge this engine's default network uses (bridge=True only)."""
        return self._bridge_if

    @property
    def bridge_network(self) -> ipaddress.IPv4Network | None:
        return self._bridge_net

    # -- life cycle -------------------------------------------------------------------------------

    def argv(self) -> list[str]:
        argv = [
            DOCKERD,
            "--data-root", str(self.data_root),
            "--exec-root", str(self.exec_root),
            "-H", self.host,
            "--pidfile", str(self.pidfile),
            "--iptables=false",
            "--ip6tables=false",
            "--containerd-namespace", self.containerd_namespace,
            "--containerd-plugins-namespace", f"{self.containerd_namespace}-plugins",
            "--userland-proxy=true",
        ]
        if self.bridge:
            assert self._bridge_if is not None and self._bridge_net is not None
            # User-defined networks (`docker network create`) get /24s from this engine's own /16.
            pool = ipaddress.IPv4Network((int(self._bridge_net.network_address), 16), strict=False)
            argv += ["--bridge", self._bridge_if, "--default-address-pool", f"base={pool},size=24"]
        else:
            argv += ["--bridge=none"]
        return argv

    def start(self) -> None:
        """Start dockerd and wait (bounded) until `docker version` gets an answer from the server."""
        if self.proc is not None and self.proc.alive:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.data_root.mkdir(parents=True, exist_ok=True, mode=0o710)
        (self.workdir / "client").mkdir(exist_ok=True)
        self._wait_containerd_gone()
        if self.bridge:
            self._ensure_bridge()
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()  # a stale socket from a SIGKILLed daemon would answer nothing
        self.proc = Proc(f"dockerd-{self.name}", self.argv(), self.log)
        self.proc.start()

        def ready() -> bool:
            if self.proc is None or not self.proc.alive:
                raise SandboxError(f"dockerd {self.name} exited:\n{self.proc.tail() if self.proc else ''}")
            r = self._cli("version", "--format", "{{.Server.Version}}", timeout=5)
            return r.returncode == 0 and bool(r.stdout.strip())

        try:
            wait_for(ready, timeout=self.start_timeout, what=f"dockerd {self.name}", interval=0.1)
        except SandboxError as e:
            tail = self.proc.tail() if self.proc else ""
            if self.proc is not None:
                self.proc.stop()
            self.proc = None
            self._sweep()
            raise SandboxError(f"{e}\n{tail}") from None
        if self.bridge:
            self._check_bridge()

    def stop(self, timeout: float = 30.0) -> None:
        """Remove every container and user network, stop dockerd and its containerd, and sweep what a
        crashed daemon may have left behind (shims, container processes, mounts, the bridge)."""
        if self.proc is None:
            self._sweep()
            return
        if not self.proc.alive:
            # Killed earlier: its containers may still run. Kill them, then let a daemon started on the
            # same state clean up what it finds (best effort: the sweep below covers the rest).
            self._kill_leftovers()
            with contextlib.suppress(SandboxError):
                self.proc = None
                self.start()
        if self.proc is not None and self.proc.alive:
            with contextlib.suppress(SandboxError, subprocess.TimeoutExpired):
                ids = self.docker("ps", "-aq", timeout=30).split()
                if ids:
                    self.docker("rm", "-f", "-v", *ids, check=False, timeout=60)
                self.docker("network", "prune", "-f", check=False, timeout=30)
            self.proc.stop(timeout=timeout)
        self.proc = None
        self._sweep()

    def kill(self) -> None:
        """SIGKILL dockerd, as a crash would. Its containerd follows it (parent-death signal); the
        containers keep running until a daemon starts again (then they are cleaned up) or `stop()`."""
        if self.proc is None:
            return
        self.proc.kill()
        self._wait_containerd_gone()

    def restart(self, timeout: float = 30.0) -> None:
        """dockerd stops (its containers with it, as `systemctl restart docker` would) and starts again
        on the same state: images stay, containers are left exited."""
        if self.proc is not None:
            self.proc.stop(timeout=timeout)
            self.proc = None
        self._wait_containerd_gone()
        self.start()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive

    # -- the CLI ----------------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env["DOCKER_CONFIG"] = str(self.workdir / "client")  # nobody's credential helpers
        env["DOCKER_BUILDKIT"] = "0"  # the classic builder: there is no buildx here
        env["DOCKER_CLI_HINTS"] = "false"
        return env

    def _cli(
        self, *args: str, input: bytes | None = None, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [DOCKER, "-H", self.host, *args],
            check=False,
            input=input,
            capture_output=True,
            env=self._env(),
            timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        return subprocess.CompletedProcess(
            r.args, r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
        )

    def docker(self, *args: str, input: bytes | None = None, check: bool = True, timeout: float = 600) -> str:
        """Run the docker CLI against this engine; stdout, or SandboxError (with stderr) on failure."""
        r = self._cli(*args, input=input, timeout=timeout)
        if check and r.returncode != 0:
            detail = r.stderr.strip() or r.stdout.strip()
            raise SandboxError(f"docker {' '.join(args)} on {self.name}: {detail}")
        return r.stdout

    def leftovers(self) -> list[str]:
        """What of this engine still exists: daemons, shims, container processes, mounts, its socket,
        its bridge. Empty after `stop()`."""
        found = [f"pid {p} {' '.join(_cmdline(p))[:80]}" for p in self._owned_pids() if pid_alive(p)]
        found += [f"mount {m}" for m in self._mounts()]
        if self.proc is not None and self.proc.alive:
            found.append(f"dockerd pid {self.proc.pid}")
        if self.sock.exists():
            found.append(f"socket {self.sock}")
        if self.bridge and Path(f"/sys/class/net/nrm{self.token[:8]}").exists():
            found.append(f"bridge nrm{self.token[:8]}")
        return found

    # -- internals --------------------------------------------------------------------------------

    def containerd_pid(self) -> int | None:
        """The pid of this engine's managed containerd, if it runs."""
        try:
            pid = int((self.exec_root / "containerd" / "containerd.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) and str(self.exec_root) in " ".join(_cmdline(pid)) else None

    def _wait_containerd_gone(self) -> None:
        """Wait until the containerd of a daemon that died is gone too, and drop its pidfile: this
        machine's PID 1 does not reap orphans, and dockerd takes a zombie named in the pidfile for a
        running containerd, then times out waiting for its socket."""
        pid = self.containerd_pid()
        if pid is not None:
            wait_for(lambda: not pid_alive(pid), timeout=10, what=f"containerd of {self.name} exit")
        with contextlib.suppress(FileNotFoundError):
            (self.exec_root / "containerd" / "containerd.pid").unlink()

    def _owned_pids(self) -> list[int]:
        """Processes this engine's daemons left: its containerd, shims (with their containers),
        docker-proxies for its bridge."""
        if self.bridge:
            self._load_subnet()
        address = str(self.containerd_address)
        config = str(self.exec_root / "containerd" / "containerd.toml")
        parents = _parents()
        owned: list[int] = []
        for pid in parents:
            argv = _cmdline(pid)
            if not argv:
                continue
            exe = os.path.basename(argv[0])
            if exe.startswith("containerd-shim") and address in argv:
                owned += [*_descendants(pid, parents), pid]
            elif exe == "containerd" and config in argv:
                owned.append(pid)
            elif exe == "docker-proxy" and self._bridge_net is not None and "-container-ip" in argv:
                ip = argv[argv.index("-container-ip") + 1] if argv[-1] != "-container-ip" else ""
                with contextlib.suppress(ValueError):
                    if ipaddress.IPv4Address(ip) in self._bridge_net:
                        owned.append(pid)
        return owned

    def _mounts(self) -> list[str]:
        roots = (f"{self.data_root}/", f"{self.exec_root}/")
        found: list[str] = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                point = line.split()[4].replace("\\040", " ")
                if point + "/" in roots or point.startswith(roots):
                    found.append(point)
        return sorted(set(found), key=len, reverse=True)

    def _kill_leftovers(self) -> None:
        pids = [p for p in self._owned_pids() if pid_alive(p)]
        if pids:
            _kill_pids(pids, f"leftovers of dockerd {self.name}")

    def _sweep(self) -> None:
        self._kill_leftovers()
        for point in self._mounts():
            _run(["umount", "-l", point], check=False)
        if self.bridge or self._bridge_if is not None:
            name = self._bridge_if or f"nrm{self.token[:8]}"
            if _run(["ip", "link", "show", name], check=False).returncode == 0:
                _run(["ip", "link", "del", name], check=False)
            self._bridge_if = None
        if self.runtime_dir.is_relative_to(SHORT_RUNTIME_ROOT):
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def _ensure_bridge(self) -> None:
        """Create this engine's bridge (again after a restart if it vanished) on a /24 whose /16 nothing
        else on the machine uses. The subnet is kept in the work dir, so a restarted daemon keeps it."""
        name = f"nrm{self.token[:8]}"
        saved = self.workdir / "bridge.subnet"
        self._load_subnet()
        exists = _run(["ip", "link", "show", name], check=False).returncode == 0
        if exists and self._bridge_net is not None:
            _run(["ip", "link", "set", name, "up"])
            self._bridge_if = name
            return
        if exists:  # left by an earlier run of this work dir whose subnet we do not know
            _run(["ip", "link", "del", name], check=False)
        if self._bridge_net is None:
            self._bridge_net = self._free_subnet()
            saved.write_text(f"{self._bridge_net}\n")
        _run(["ip", "link", "add", name, "type", "bridge"])
        _run(["ip", "addr", "add", f"{self._bridge_net.network_address + 1}/24", "dev", name])
        _run(["ip", "link", "set", name, "up"])
        self._bridge_if = name

    def _load_subnet(self) -> None:
        saved = self.workdir / "bridge.subnet"
        if self._bridge_net is None and saved.exists():
            with contextlib.suppress(ValueError):
                self._bridge_net = ipaddress.IPv4Network(saved.read_text().strip())

    @staticmethod
    def _free_subnet() -> ipaddress.IPv4Network:
        """A 10.a.b.0/24 whose 10.a.0.0/16 no interface or route on this machine touches."""
        used = [n for n in _used_ipv4_networks() if n.prefixlen > 0]
        rng = random.Random()
        for _ in range(200):
            candidate = ipaddress.IPv4Network(f"10.{rng.randint(160, 250)}.{rng.randint(0, 255)}.0/24")
            pool = ipaddress.IPv4Network((int(candidate.network_address), 16), strict=False)
            if not any(pool.overlaps(n) for n in used):
                return candidate
        raise SandboxError("no free 10.x.0.0/16 for an engine bridge")

    def _check_bridge(self) -> None:
        """The default bridge network must be on our interface and subnet; say so loudly if not."""
        out = self.docker(
            "network", "inspect", "bridge", "--format",
            '{{index .Options "com.docker.network.bridge.name"}} {{range .IPAM.Config}}{{.Subnet}}{{end}}',
        ).split()
        if self._bridge_if is None or not out or out[0] != self._bridge_if:
            raise SandboxError(f"dockerd {self.name}: default bridge is {out}, expected {self._bridge_if}")
        if _run(["ip", "link", "show", self._bridge_if], check=False).returncode != 0:
            raise SandboxError(f"dockerd {self.name}: bridge {self._bridge_if} vanished")
