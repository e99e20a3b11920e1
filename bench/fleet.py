"""What the fleet benchmarks share: a whole sandbox fleet in update mode with its own image registry and
image builder, fresh versions of the demo app padded with random bytes, and the way to see what the
hosts serve.

`BenchFleet` stands up, under one temporary directory: a docker-registry, a builder Docker engine (the
images are built there, never on a host, so that every host really pulls), and a sandbox.fleet.Fleet of
3 hosts (3-member etcd; per host a systemd manager, a Docker engine and a real `norm agent` process in
update mode), with the demo app's units (djed-web, djed-api) installed on every host. Everything is
stopped on exit, by pid.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from sandbox import app, images, updates
from sandbox.docker import DockerEngine
from sandbox.fleet import Fleet, HostState, State
from sandbox.procs import SandboxError
from sandbox.registry import Registry
from sandbox.systemd import SystemdManager


def say(msg: str) -> None:
    """Progress, on stderr: stdout is for the figures."""
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def bench_dir(keep: Path | None, prefix: str) -> Iterator[Path]:
    """A fresh temporary directory removed afterwards, or `keep` (created, kept: the agents' logs)."""
    if keep is None:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            yield Path(tmp)
    else:
        keep.mkdir(parents=True, exist_ok=False)
        yield keep.resolve()


def median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


class ServingWatch:
    """A thread polling every host's app ports (GET /version) from `start()` on, until every port
    serves `tag`; `done_at` (time.monotonic()) is the first poll that saw all of them serve it. A port
    that serves the tag once is not asked again (a unit does not go back to the old release)."""

    def __init__(self, ports: Mapping[str, tuple[int, int]], tag: str, interval: float = 0.02) -> None:
        self._ports = [p for pair in ports.values() for p in pair]
        self._tag = tag
        self._interval = interval
        self._stop = threading.Event()
        self.first_seen: dict[int, float] = {}
        self.done_at: float | None = None
        self.error: BaseException | None = None  # what ended the polling thread, if anything did
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"serving-{tag}", daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self._poll()
        except BaseException as e:
            self.error = e
            self.done.set()
            raise

    def _poll(self) -> None:
        while not self._stop.is_set():
            for port in self._ports:
                if port in self.first_seen:
                    continue
                try:
                    served = app.fetch(port, timeout=1.0)
                except (OSError, ValueError, http.client.HTTPException):
                    continue  # not serving, or cut off mid-answer by a stop: not the new tag yet
                if served == self._tag:
                    self.first_seen[port] = time.monotonic()
            if len(self.first_seen) == len(self._ports):
                self.done_at = time.monotonic()
                self.done.set()
                return
            self._stop.wait(self._interval)

    def wait(self, timeout: float) -> float:
        if not self.done.wait(timeout):
            self.stop()
            missing = sorted(set(self._ports) - set(self.first_seen))
            raise SandboxError(f"{self._tag} not served on ports {missing} after {timeout:.0f}s")
        if self.error is not None:
            raise SandboxError(f"polling what the ports serve failed: {self.error!r}") from self.error
        assert self.done_at is not None
        return self.done_at

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def engine_get_json(engine: DockerEngine, path: str, timeout: float = 30.0) -> Any:
    """GET `path` of a Docker engine's API over its unix socket (HTTP/1.0, one request)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(engine.sock))
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: docker\r\n\r\n".encode())
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1]
    if status != b"200":
        raise SandboxError(f"GET {path} on {engine.name}: {head.splitlines()[0]!r} {body[:200]!r}")
    return json.loads(body)


class BenchFleet:
    """A fleet of `size` hosts in update mode, a registry and a builder engine, under `workdir`."""

    def __init__(self, workdir: Path, *, size: int = 3, agent_env: Mapping[str, str] | None = None,
                 haproxy: bool = False, prometheus: bool = False) -> None:
        """`haproxy`: a real HAProxy in front of the hosts' web units, the agents' presence in it;
        `prometheus`: a real Prometheus scraping the web units, which the agents ask (canaries)."""
        self.workdir = workdir
        self.registry = Registry(workdir / "registry")
        self.builder = DockerEngine("images", workdir / "images")
        self.fleet = Fleet(workdir / "fleet", size=size, image=f"{self.registry.address}/djed/app",
                           agent_env=dict(agent_env or {}), say=say, haproxy=haproxy,
                           prometheus=prometheus)
        self.ports: dict[str, tuple[int, int]] = {}
        self._versions = 0
        self._stack = contextlib.ExitStack()

    # -- life cycle ----------------------------------------------------------------------------------
    def __enter__(self) -> Self:
        try:
            say(f"registry and builder engine under {self.workdir}")
            self._stack.callback(self.registry.stop)
            self.registry.start()
            self._stack.callback(self.builder.stop)
            self.builder.start()
            # The Fleet takes the registry's address from its image: it was fixed before the fleet.
            self._stack.callback(self.fleet.down)
            self.fleet.up()
            self.ports = app.install_app(self.state)
            self.fleet.wait_registered(timeout=60)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        say("stopping the fleet, the builder engine and the registry")
        self._stack.close()

    # -- what runs -----------------------------------------------------------------------------------
    @property
    def state(self) -> State:
        state = self.fleet.load_state()
        if state is None:
            raise SandboxError("the benchmark's fleet is not running")
        return state

    @property
    def hosts(self) -> list[HostState]:
        return list(self.state["hosts"])

    @property
    def repository(self) -> str:
        return f"{self.registry.address}/{images.DEMO_REPOSITORY}"

    def engine(self, host: HostState) -> DockerEngine:
        """A handle on a host's engine for its CLI and API (the fleet started and stops the daemon)."""
        return DockerEngine(host["name"], Path(host["docker_dir"]))

    def manager(self, host: HostState) -> SystemdManager:
        """A handle on a host's systemd manager for systemctl (the fleet started and stops it)."""
        return SystemdManager(host["name"], Path(host["systemd_dir"]))

    def by_machine_id(self, machine_id: str) -> HostState:
        for h in self.hosts:
            if h["machine_id"] == machine_id:
                return h
        raise SandboxError(f"no host has machine id {machine_id}")

    def leader(self) -> HostState:
        kvs = updates.get_kvs(self.fleet, f"{updates.PREFIX}/leader")
        if not kvs:
            raise SandboxError("no leader key in etcd")
        return self.by_machine_id(kvs[0]["value"].decode())

    # -- versions ------------------------------------------------------------------------------------
    def new_version(self, size_mb: int, prefix: str = "b", options: images.DemoOptions | None = None) -> str:
        """A version never built before, `size_mb` MB of its own random bytes on top of the app,
        built on the builder engine and pushed (`options`: its label, ...); its tag."""
        self._versions += 1
        tag = f"{prefix}{self._versions}"
        t0 = time.monotonic()
        images.demo_app_image(self.builder, self.registry, tag, size_mb=size_mb,
                              options=options or images.DemoOptions())
        say(f"built and pushed {self.repository}:{tag} ({size_mb} MB of padding) "
            f"in {time.monotonic() - t0:.1f}s")
        return tag

    def serving(self, tag: str) -> ServingWatch:
        return ServingWatch(self.ports, tag)

    def deploy(self, tag: str, timeout: float = 300.0) -> dict[str, Any]:
        """Through Norm, as an operator would, and wait until every host serves it."""
        watch = self.serving(tag).start()
        try:
            header = updates.deploy(self.fleet, tag, timeout=timeout)
            if header["phase"] != "done":
                raise SandboxError(f"the rollout of {tag} ended {header}")
            watch.wait(timeout)
        finally:
            watch.stop()
        return header

    def registry_digest(self, tag: str) -> str:
        """`<registry>/djed/app@sha256:...` the registry serves for `tag` now (not timed)."""
        data = engine_get_json(self.builder, f"/distribution/{self.repository}:{tag}/json")
        return f"{self.repository}@{data['Descriptor']['digest']}"
