"""etcd members and clusters on loopback, each on free ports under its own data dir."""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.netns import NetNs
from sandbox.procs import Proc, SandboxError, free_port, wait_for

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
ETCDCTL = shutil.which("etcdctl") or "/usr/bin/etcdctl"


@dataclass(frozen=True)
class ServerTls:
    """Certificates a member serves clients with; `client_cert_auth` demands client certificates."""

    ca: Path
    cert: Path
    key: Path
    client_cert_auth: bool = True


@dataclass
class EtcdMember:
    name: str
    workdir: Path
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    tls: ServerTls | None = None
    extra_args: tuple[str, ...] = ()
    initial_cluster: str = ""
    cluster_token: str = "norm-sandbox"
    host: str = "127.0.0.1"  # the address it listens on, for clients and peers
    netns: NetNs | None = None  # run inside this network namespace (host: its inner address)
    proc: Proc | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def data_dir(self) -> Path:
        return self.workdir / f"{self.name}.data"

    def argv(self) -> list[str]:
        argv = [
            ETCD,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.endpoint,
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster or f"{self.name}={self.peer_url}",
            "--initial-cluster-token", self.cluster_token,
            "--initial-cluster-state", "new",
            "--logger", "zap",
            "--log-outputs", "stderr",
        ]
        if self.tls:
            argv += ["--cert-file", str(self.tls.cert), "--key-file", str(self.tls.key),
                     "--trusted-ca-file", str(self.tls.ca)]
            if self.tls.client_cert_auth:
                argv += ["--client-cert-auth"]
        argv += list(self.extra_args)
        return self.netns.wrap(argv) if self.netns else argv

    def start(self, wait: bool = True) -> None:
        if self.proc is not None and self.proc.alive:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = Proc(self.name, self.argv(), self.workdir / f"{self.name}.log")
        self.proc.start()
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30) -> None:
        def ok() -> bool:
            if self.proc is None or not self.proc.alive:
                raise SandboxError(f"etcd {self.name} exited:\n{self.proc.tail() if self.proc else ''}")
            return self.healthy()

        try:
            wait_for(ok, timeout=timeout, what=f"etcd {self.name}")
        except SandboxError as e:
            raise SandboxError(f"{e}\n{self.proc.tail() if self.proc else ''}") from None

    def healthy(self) -> bool:
        ctx = None
        if self.tls:
            ctx = ssl.create_default_context(cafile=str(self.tls.ca))
            if self.tls.client_cert_auth:
                ctx.load_cert_chain(str(self.tls.cert), str(self.tls.key))
        with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1, context=ctx) as r:
            return bool(json.loads(r.read()).get("health") == "true")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def kill(self) -> None:
        """SIGKILL: the member dies without a word."""
        if self.proc is not None:
            self.proc.kill()

    def freeze(self) -> None:
        if self.proc is not None:
            self.proc.signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.proc is not None:
            self.proc.signal(signal.SIGCONT)

    def restart(self, wait: bool = True) -> None:
        """Stop and start again on the same ports and data (a member that rejoins)."""
        self.stop()
        self.proc = None
        # A restarted member must not try to bootstrap a new cluster over its existing data.
        self.start(wait=wait)

    def ctl(self, *args: str, check: bool = True, user: str | None = None) -> str:
        """Run etcdctl against this member, as an operator would."""
        argv = [ETCDCTL, "--endpoints", self.endpoint, "--dial-timeout", "3s", "--command-timeout", "5s"]
        if self.tls:
            argv += ["--cacert", str(self.tls.ca), "--cert", str(self.tls.cert), "--key", str(self.tls.key)]
        if user:
            argv += ["--user", user]
        env = dict(os.environ, ETCDCTL_API="3")
        r = subprocess.run(argv + list(args), capture_output=True, text=True, env=env, timeout=30,
                           check=False)
        if check and r.returncode != 0:
            raise SandboxError(f"etcdctl {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout


@dataclass
class EtcdCluster:
    """Several members on loopback forming one cluster."""

    members: list[EtcdMember]

    @classmethod
    def create(cls, workdir: Path, size: int = 3, prefix: str = "etcd") -> EtcdCluster:
        return cls.of([EtcdMember(f"{prefix}{i}", workdir) for i in range(size)])

    @classmethod
    def of(cls, members: list[EtcdMember]) -> EtcdCluster:
        """A cluster of members made by the caller (addresses, namespaces, flags of their own)."""
        initial = ",".join(f"{m.name}={m.peer_url}" for m in members)
        token = f"norm-{os.getpid()}-{members[0].peer_port}"
        for m in members:
            m.initial_cluster = initial
            m.cluster_token = token
        return cls(members)

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start(self) -> None:
        for m in self.members:
            m.start(wait=False)
        for m in self.members:
            m.wait_ready()

    def stop(self) -> None:
        for m in self.members:
            m.stop()

    def alive(self) -> list[EtcdMember]:
        return [m for m in self.members if m.proc is not None and m.proc.alive]


def start_etcd(workdir: Path, name: str = "etcd", **kwargs: object) -> EtcdMember:
    """One single-member etcd, ready for clients."""
    member = EtcdMember(name, workdir, **kwargs)  # type: ignore[arg-type]
    member.start()
    return member
