"""A whole sandbox fleet on one machine: a 3-member etcd cluster and N simulated hosts, each with its
own machine id, systemd manager, Docker engine and `norm agent` process; with `registry=True`, also a
local image registry and a Docker engine that builds the images pushed there, and the agents in update
mode on `<registry>/djed/app`; with `haproxy=True`, also a real HAProxy in front of the hosts' web
units (sandbox.haproxy), its servers put in and taken out by the agents' load-balancer presence.

Everything the fleet starts is recorded in `<run dir>/state.json` as soon as it is started (pid, argv,
start time, log), so that `down` in another process stops it by pid. Before signalling a recorded
pid, `down` checks that /proc/<pid> still shows the same command line and start time: a pid that
has been reused by someone else's process is left alone.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import functools
import json
import os
import shutil
import socket
import subprocess
import time
import typing
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NotRequired, TypedDict

from sandbox.etcd import ETCDCTL, EtcdMember
from sandbox.netns import NetNs, exec_argv
from sandbox.procs import Proc, SandboxError, free_port, venv_python, wait_for
from sandbox.systemd import CGROUP_PREFIX, SystemdManager

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RUN_DIR = REPO / ".run" / "sandbox"
STATE_VERSION = 1
HOSTS_PREFIX = "/norm/hosts/"
HAPROXY_DRAIN_TIMEOUT = 10  # seconds an agent waits for its server's sessions to end before a stop
APP_REPOSITORY = "djed/app"  # the demo application's repository in the fleet's registry


# -- what state.json holds ----------------------------------------------------------------------


class ProcState(TypedDict):
    name: str
    pid: int
    argv: list[str]
    starttime: int  # field 22 of /proc/<pid>/stat: with the argv, tells our process from a reused pid
    log: str


class EtcdState(TypedDict):
    name: str
    endpoint: str
    client_port: int
    peer_port: int
    proc: ProcState


class HostState(TypedDict):
    name: str
    machine_id: str
    dir: str
    config: str
    http_listen: str
    bus_address: str
    systemd_dir: str
    cgroup: str
    systemd: ProcState | None
    docker_host: str
    docker_dir: str
    docker: ProcState | None
    agent: ProcState | None


class RegistryState(TypedDict):
    address: str  # 127.0.0.1:PORT, what image references start with
    dir: str  # config, storage (kept across restarts of the fleet) and log
    proc: ProcState


class HaproxyState(TypedDict):
    url: str  # the frontend: http://127.0.0.1:PORT
    port: int
    socket: str  # its Runtime API (level admin)
    backend: str  # one server per host, named after the host, on the host's web unit port
    dir: str  # its config, socket and log
    proc: ProcState


class PrometheusState(TypedDict):
    url: str  # http://127.0.0.1:PORT
    port: int
    dir: str  # its config, targets file, TSDB and log
    proc: ProcState


class ImageEngineState(TypedDict):
    name: str
    dir: str  # its data root is kept across restarts of the fleet: builds hit the layer cache
    docker_host: str
    proc: ProcState | None


class State(TypedDict):
    version: int
    run_dir: str
    owner_pid: int
    started_at: float
    complete: bool
    size: int
    docker: bool
    agents: bool
    endpoints: list[str]
    etcd: list[EtcdState]
    hosts: list[HostState]
    # Fleets with a registry only (and states written before there were any: read with .get()).
    registry: NotRequired[RegistryState | None]
    image_engine: NotRequired[ImageEngineState | None]
    # With `isolatable_etcd`: the network namespace etcd0 runs in (NetNs.saved()).
    netns: NotRequired[dict[str, str] | None]
    # With `haproxy`: the load balancer in front of the hosts' web units.
    haproxy: NotRequired[HaproxyState | None]
    # With `prometheus`: the server scraping the hosts' web units, which the leader asks (canaries).
    prometheus: NotRequired[PrometheusState | None]


# -- processes by pid ---------------------------------------------------------------------------


def fingerprint(pid: int) -> tuple[list[str], int] | None:
    """(argv, start time) of a live process, or None if there is none (or only a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    if not raw:  # zombies and kernel threads have no command line
        return None
    argv = [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]
    fields = stat.rpartition(")")[2].split()
    return argv, int(fields[19])


def record(proc: Proc) -> ProcState:
    if proc.pid is None:
        raise SandboxError(f"{proc.name} has no pid to record")
    pid = proc.pid
    runs = exec_argv(list(proc.argv))

    def execed() -> bool:
        fp = fingerprint(pid)
        return not proc.alive or (fp is not None and (fp[0] == runs or runs == list(proc.argv)))

    # Popen returns while the kernel is still inside exec(): /proc/<pid>/cmdline is briefly empty
    # (and a wrapper such as `ip netns exec` has its own until it execs the program).
    wait_for(execed, timeout=10, what=f"{proc.name} command line", interval=0.005)
    fp = fingerprint(pid)
    if fp is None:
        raise SandboxError(f"{proc.name} (pid {proc.pid}) exited at once:\n{proc.tail()}")
    if fp[0] != runs:
        raise SandboxError(f"{proc.name} (pid {pid}) runs {fp[0]}, not {list(proc.argv)}")
    return ProcState(name=proc.name, pid=pid, argv=list(proc.argv), starttime=fp[1], log=str(proc.log))


def _record(proc: Proc, stop: Callable[[], None]) -> ProcState:
    """record(proc), or stop what was just started if it cannot be recorded (nothing unrecorded runs)."""
    try:
        return record(proc)
    except BaseException:
        stop()
        raise


def owned(rec: ProcState) -> bool:
    """Whether the recorded pid is still the very process we started."""
    fp = fingerprint(rec["pid"])
    return fp is not None and fp[0] == exec_argv(rec["argv"]) and fp[1] == rec["starttime"]


def _distinct_free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _dead_members(members: list[EtcdMember]) -> list[EtcdMember]:
    return [m for m in members if m.proc is None or not m.proc.alive]


def _etcd_settled(members: list[EtcdMember]) -> bool:
    return bool(_dead_members(members)) or all(_etcd_healthy(m) for m in members)


def _etcd_healthy(member: EtcdMember) -> bool:
    try:
        return member.healthy()
    except (OSError, ValueError):
        return False


def _http_ok(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(url, timeout=1) as r:
        return int(r.status) == 200


def _docker_ping(host: str) -> bool:
    """GET /_ping on a Docker engine's unix socket."""
    path = host.removeprefix("unix://")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(path)
        s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        return s.recv(64).split(b" ", 2)[1:2] == [b"200"]


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string for what we write


def agent_config(*, endpoints: list[str], machine_id: str, name: str, http_listen: str, bus_address: str,
                 docker_host: str, environment: str = "sandbox", role: str = "web",
                 image: str | None = None, release_file: str | None = None,
                 data_dir: str | None = None, state_dir: str | None = None,
                 haproxy_socket: str | None = None, haproxy_backend: str = "web",
                 web_port: int | None = None, prometheus_url: str | None = None) -> str:
    """The `norm agent` config file of one simulated host. With `image` (a repository), update mode is
    on: the release file is `release_file`, the one-off steps get `data_dir` mounted on /data (one
    directory for the whole fleet: what they record there shows every run on any host). The agent
    keeps its state (healing) in `state_dir`, the host's own. With `haproxy_socket`, load-balancer
    presence keeps the host's server (named after the host) in `haproxy_backend` while its web unit
    (on `web_port`) answers /healthz. With `prometheus_url`, a canary's analysis queries go there."""
    eps = ", ".join(_toml_str(e) for e in endpoints)
    text = (
        f"[etcd]\nendpoints = [{eps}]\n\n"
        f"[host]\nmachine_id = {_toml_str(machine_id)}\nenvironment = {_toml_str(environment)}\n"
        f"role = {_toml_str(role)}\nname = {_toml_str(name)}\n\n"
        f"[http]\nlisten = {_toml_str(http_listen)}\n\n"
        f"[systemd]\nbus_address = {_toml_str(bus_address)}\n\n"
        f"[docker]\nhost = {_toml_str(docker_host)}\n"
    )
    if state_dir is not None:
        text += f"\n[agent]\nstate_dir = {_toml_str(state_dir)}\n"
    if image is not None:
        text += (f"\n[units]\npatterns = [\"djed-*.service\"]\n\n"
                 f"[update]\nimage = {_toml_str(image)}\nrelease_file = {_toml_str(release_file or '')}\n")
        if data_dir is not None:
            text += f"steps_mounts = [{_toml_str(data_dir + ':/data')}]\n"
        if prometheus_url is not None:
            text += f"prometheus_url = {_toml_str(prometheus_url)}\n"
    if haproxy_socket is not None:
        text += (f"\n[lb]\nbackend = \"haproxy\"\nhaproxy_backends = [{_toml_str(haproxy_backend)}]\n"
                 f"haproxy_server = {_toml_str(name)}\nhaproxy_socket = {_toml_str(haproxy_socket)}\n"
                 f"drain_timeout = {HAPROXY_DRAIN_TIMEOUT}\nhealth_timeout = 1\n")
        if web_port is not None:
            text += f"health_url = {_toml_str(f'http://127.0.0.1:{web_port}/healthz')}\n"
    return text


# -- the fleet ----------------------------------------------------------------------------------


def _quiet(_: str) -> None:
    pass


@dataclass
class Fleet:
    """A sandbox fleet under `run_dir`. `up()` starts (or reuses) it; `down()` stops it by pid."""

    run_dir: Path = DEFAULT_RUN_DIR
    size: int = 3
    docker: bool = True
    agents: bool = True
    etcd_size: int = 3
    isolatable_etcd: bool = False  # etcd0 in a network namespace of its own (isolate_etcd)
    image: str | None = None  # an image repository: the agents run in update mode
    # A registry and an image-building engine of the fleet's own (with docker only); the agents run in
    # update mode on <registry>/djed/app unless `image` names another repository.
    registry: bool = False
    # A real HAProxy in front of the hosts' web units; the agents keep their servers in its backend.
    haproxy: bool = False
    # A real Prometheus scraping the hosts' web units (each series labelled with its host's name); the
    # agents ask it a canary's analysis queries.
    prometheus: bool = False
    agent_env: dict[str, str] = field(default_factory=dict)  # NORM_* settings for every agent
    say: Callable[[str], None] = _quiet
    # Objects for what this process started itself: used to stop (and reap) its own children.
    _procs: dict[int, Proc] = field(default_factory=dict, init=False, repr=False)
    _engines: dict[int, Any] = field(default_factory=dict, init=False, repr=False)
    _lock_depth: int = field(default=0, init=False, repr=False)
    _lock_fd: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir).resolve()

    # -- files ----------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.run_dir / "state.json"

    @property
    def etcd_dir(self) -> Path:
        return self.run_dir / "etcd"

    @property
    def hosts_dir(self) -> Path:
        return self.run_dir / "hosts"

    @property
    def registry_dir(self) -> Path:
        return self.run_dir / "registry"

    @property
    def image_engine_dir(self) -> Path:
        return self.run_dir / "images"

    @property
    def haproxy_dir(self) -> Path:
        return self.run_dir / "haproxy"

    @property
    def prometheus_dir(self) -> Path:
        return self.run_dir / "prometheus"

    @property
    def data_dir(self) -> Path:
        """Mounted on /data in the one-off steps' containers on every host."""
        return self.run_dir / "data"

    def load_state(self) -> State | None:
        try:
            data = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise SandboxError(f"{self.state_path} is unreadable ({e}); remove it after checking "
                               f"that nothing it lists still runs") from None
        version = data.get("version") if isinstance(data, dict) else None
        if version != STATE_VERSION:
            raise SandboxError(f"{self.state_path}: unknown state version {version!r}")
        return typing.cast(State, data)

    def _save(self, state: State) -> None:
        tmp = self.state_path.with_name(".state.json.tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_path)

    @contextlib.contextmanager
    def _locked(self, timeout: float = 300.0) -> Iterator[None]:
        """One `up`/`down` at a time per run dir, across processes (re-entrant within this one)."""
        if self._lock_depth == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.run_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)

            def take() -> bool:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False
                return True

            try:
                wait_for(take, timeout=timeout, what=f"lock on {self.run_dir}", interval=0.1)
            except BaseException:
                os.close(fd)
                raise
            self._lock_fd = fd
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0 and self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    # -- health ---------------------------------------------------------------------------------
    def problems(self, state: State | None = None) -> list[str]:
        """What is wrong with the recorded fleet; empty when it is complete and healthy."""
        state = state if state is not None else self.load_state()
        if state is None:
            return ["no fleet recorded"]
        out: list[str] = []
        if not state["complete"]:
            out.append("start-up did not complete")
        for m in state["etcd"]:
            if not owned(m["proc"]):
                out.append(f"etcd {m['name']} (pid {m['proc']['pid']}) is not running")
            else:
                try:
                    if not _http_ok(f"{m['endpoint']}/health"):
                        out.append(f"etcd {m['name']} is unhealthy")
                except OSError as e:
                    out.append(f"etcd {m['name']} does not answer: {e}")
        out += self._registry_problems(state)
        out += self._haproxy_problems(state)
        out += self._prometheus_problems(state)
        for h in state["hosts"]:
            parts = [("systemd", h["systemd"], True), ("docker", h["docker"], state["docker"]),
                     ("agent", h["agent"], state["agents"])]
            for kind, rec, wanted in parts:
                if rec is None:
                    if wanted and state["complete"]:
                        out.append(f"{h['name']}: no {kind} recorded")
                elif not owned(rec):
                    out.append(f"{h['name']}: {kind} (pid {rec['pid']}) is not running; see {rec['log']}")
            if h["systemd"] is not None and owned(h["systemd"]):
                mgr = SystemdManager(h["name"], Path(h["systemd_dir"]))
                try:
                    if not mgr.bus_has_owner():
                        out.append(f"{h['name']}: systemd does not own org.freedesktop.systemd1")
                except (OSError, subprocess.SubprocessError) as e:
                    out.append(f"{h['name']}: systemd bus does not answer: {e}")
            if h["docker"] is not None and owned(h["docker"]):
                try:
                    if not _docker_ping(h["docker_host"]):
                        out.append(f"{h['name']}: Docker engine does not answer /_ping")
                except OSError as e:
                    out.append(f"{h['name']}: Docker engine does not answer: {e}")
        return out

    @staticmethod
    def _registry_problems(state: State) -> list[str]:
        out: list[str] = []
        reg = state.get("registry")
        if reg is not None:
            if not owned(reg["proc"]):
                out.append(f"registry (pid {reg['proc']['pid']}) is not running; see {reg['proc']['log']}")
            else:
                try:
                    if not _http_ok(f"http://{reg['address']}/v2/"):
                        out.append(f"registry on {reg['address']} is unhealthy")
                except OSError as e:
                    out.append(f"registry on {reg['address']} does not answer: {e}")
        images = state.get("image_engine")
        if images is not None:
            rec = images["proc"]
            if rec is None:
                if state["complete"]:
                    out.append("no image engine recorded")
            elif not owned(rec):
                out.append(f"image engine (pid {rec['pid']}) is not running; see {rec['log']}")
            else:
                try:
                    if not _docker_ping(images["docker_host"]):
                        out.append("image engine does not answer /_ping")
                except OSError as e:
                    out.append(f"image engine does not answer: {e}")
        return out

    @staticmethod
    def _haproxy_problems(state: State) -> list[str]:
        lb = state.get("haproxy")
        if lb is None:
            return []
        if not owned(lb["proc"]):
            return [f"haproxy (pid {lb['proc']['pid']}) is not running; see {lb['proc']['log']}"]
        from sandbox.haproxy import HaproxyServer

        server = HaproxyServer(Path(lb["dir"]), port=lb["port"])
        try:
            if not server.command("show info").startswith("Name: HAProxy"):
                return [f"haproxy's Runtime API on {lb['socket']} does not answer as HAProxy"]
        except OSError as e:
            return [f"haproxy's Runtime API on {lb['socket']} does not answer: {e}"]
        return []

    @staticmethod
    def _prometheus_problems(state: State) -> list[str]:
        prom = state.get("prometheus")
        if prom is None:
            return []
        rec = prom["proc"]
        if not owned(rec):
            return [f"prometheus (pid {rec['pid']}) is not running; see {rec['log']}"]
        try:
            return [] if _http_ok(f"{prom['url']}/-/ready") else ["prometheus is not ready"]
        except OSError as e:
            return [f"prometheus does not answer: {e}"]

    def _mismatch(self, state: State) -> str | None:
        """Why a healthy recorded fleet is not the one asked for (None: it is), for what reuse cannot
        fix in place: a registry the agents' config would have to name."""
        if self.registry and self.docker and state.get("registry") is None \
                and self._engine_class(quiet=True) is not None:
            return "it has no image registry (its agents are not in update mode)"
        if self.haproxy != (state.get("haproxy") is not None):
            return ("it has no HAProxy (its agents keep no load-balancer presence)" if self.haproxy
                    else "it has an HAProxy (its agents keep their servers in it)")
        if self.prometheus != (state.get("prometheus") is not None):
            return ("it has no Prometheus (its agents have none to ask)" if self.prometheus
                    else "it has a Prometheus (its agents ask it)")
        return None

    def healthy(self) -> bool:
        return not self.problems()

    # -- up -------------------------------------------------------------------------------------
    def up(self, ready_timeout: float = 60.0) -> Literal["started", "reused"]:
        """Start the fleet, or reuse the one already running under `run_dir` if it is healthy."""
        with self._locked():
            state = self.load_state()
            if state is not None:
                problems = self.problems(state)
                mismatch = None if problems else self._mismatch(state)
                if mismatch is not None:
                    self.say(f"the sandbox fleet in {self.run_dir} is not the one asked for: {mismatch}; "
                             f"starting it again")
                    self._down(state)
                elif not problems:
                    self.say(f"sandbox fleet already running in {self.run_dir} "
                             f"({len(state['hosts'])} hosts): reusing it")
                    if len(state["hosts"]) != self.size:
                        self.say(f"  (not the {self.size} hosts asked for: run `make sandbox-down` first "
                                 f"to change the size)")
                    return "reused"
                else:
                    self.say("a previous sandbox fleet is incomplete or unhealthy: "
                             "stopping what is left of it")
                    for p in problems:
                        self.say(f"  - {p}")
                    self._down(state)
            try:
                self._start(ready_timeout)
            except BaseException:
                state = self.load_state()
                if state is not None:
                    self.say("start-up failed: stopping what was started")
                    self._down(state)
                raise
            return "started"

    def _start(self, ready_timeout: float) -> None:
        if self.size < 1:
            raise SandboxError("a fleet needs at least one host")
        # A fresh fleet: old etcd data would clash with the new members' ports and cluster token; the
        # steps' data dir goes with it (a new etcd has no record of the migrations run on it). The
        # registry's storage and the image engine's data stay: the images in them are still good.
        for d in (self.etcd_dir, self.hosts_dir, self.data_dir, self.haproxy_dir):
            shutil.rmtree(d, ignore_errors=True)
        state = State(version=STATE_VERSION, run_dir=str(self.run_dir), owner_pid=os.getpid(),
                      started_at=time.time(), complete=False, size=self.size, docker=self.docker,
                      agents=self.agents, endpoints=[], etcd=[], hosts=[])
        self._save(state)

        members = self._start_etcd(state, ready_timeout)
        state["endpoints"] = [m.endpoint for m in members]
        self._save(state)
        self.say(f"etcd: ready at {', '.join(state['endpoints'])}")

        engine_cls = self._engine_class()
        state["docker"] = engine_cls is not None
        # (what the engine's start records, how the engine is named in what is said)
        engines: list[tuple[Callable[[ProcState], None], Any, str]] = []
        image = self.image
        if self.registry and engine_cls is not None:
            image = self._start_registry(state, ready_timeout) if image is None else image
            images = engine_cls("images", self.image_engine_dir)
            state["image_engine"] = ImageEngineState(name="images", dir=str(self.image_engine_dir),
                                                     docker_host=images.host, proc=None)
            self._save(state)
            engines.append((functools.partial(self._set_image_engine, state), images, "image builder"))
        for i in range(1, self.size + 1):
            name = f"host{i}"
            hdir = self.hosts_dir / name
            hdir.mkdir(parents=True)
            machine_id = uuid.uuid4().hex
            (hdir / "machine-id").write_text(machine_id + "\n")
            mgr = SystemdManager(name, hdir / "systemd")
            docker_dir = hdir / "docker"
            engine = engine_cls(name, docker_dir) if engine_cls is not None else None
            host = HostState(name=name, machine_id=machine_id, dir=str(hdir), config=str(hdir / "norm.toml"),
                             http_listen=f"127.0.0.1:{free_port()}", bus_address=mgr.bus_address,
                             systemd_dir=str(mgr.workdir), cgroup="", systemd=None,
                             docker_host=engine.host if engine is not None else f"unix://{docker_dir}/docker.sock",
                             docker_dir=str(docker_dir), docker=None, agent=None)
            state["hosts"].append(host)
            mgr.start(ready_timeout)
            assert mgr.proc is not None
            self._own(mgr.proc)
            host["cgroup"] = mgr.cgroup
            host["systemd"] = _record(mgr.proc, mgr.stop)
            self._save(state)
            self.say(f"{name}: systemd --user on {mgr.bus_address}")
            if engine is not None:
                engines.append((functools.partial(self._set_host_engine, host), engine, name))
        haproxy: HaproxyState | None = None
        haproxy_ports: dict[str, int] = {}
        if self.haproxy:
            haproxy, haproxy_ports = self._start_haproxy(state, ready_timeout)
        prometheus = self._start_prometheus(state, ready_timeout) if self.prometheus else None
        for host in state["hosts"]:
            hdir = Path(host["dir"])
            Path(host["config"]).write_text(agent_config(
                endpoints=state["endpoints"], machine_id=host["machine_id"], name=host["name"],
                http_listen=host["http_listen"], bus_address=host["bus_address"],
                docker_host=host["docker_host"], image=image,
                release_file=str(hdir / "release.env"), data_dir=str(self.data_dir),
                state_dir=str(hdir / "state"),
                haproxy_socket=None if haproxy is None else haproxy["socket"],
                web_port=haproxy_ports.get(host["name"]),
                prometheus_url=None if prometheus is None else prometheus["url"]))

        # Docker engines take seconds each: start them side by side. (After the systemd managers, whose
        # start forks with a pre-exec hook, which must not happen while other threads run.)
        if engines:
            self.say(f"docker: starting {len(engines)} engines")
            failures: list[BaseException] = []
            with concurrent.futures.ThreadPoolExecutor(len(engines), thread_name_prefix="dockerd") as pool:
                started = {pool.submit(engine.start): (put, engine, who) for put, engine, who in engines}
                for fut in concurrent.futures.as_completed(started):
                    put, engine, who = started[fut]
                    error = fut.exception()
                    if error is None:
                        try:
                            put(_record(engine.proc, engine.stop))
                        except SandboxError as e:
                            error = e
                    if error is not None:
                        failures.append(error)
                        continue
                    self._own(engine.proc, engine)
                    self._save(state)
                    self.say(f"{who}: Docker engine on {engine.host}")
            if failures:
                raise failures[0]

        if self.agents:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            for host in state["hosts"]:
                self._start_agent(state, host)

        state["complete"] = True
        self._save(state)

    @staticmethod
    def _set_host_engine(host: HostState, rec: ProcState) -> None:
        host["docker"] = rec

    @staticmethod
    def _set_image_engine(state: State, rec: ProcState) -> None:
        images = state.get("image_engine")
        assert images is not None
        images["proc"] = rec

    def _start_haproxy(self, state: State, ready_timeout: float) -> tuple[HaproxyState, dict[str, int]]:
        """Start HAProxy in front of the hosts' web units (their ports reserved now, kept in each host's
        app-ports.json for sandbox.app.install_app), every server in maintenance, and record it.
        Returns its state and {host: web port}."""
        from sandbox.app import reserve_ports
        from sandbox.haproxy import BACKEND, HaproxyServer

        web = {name: pair[0] for name, pair in reserve_ports(state["hosts"]).items()}
        lb = HaproxyServer(self.haproxy_dir, servers=[(h["name"], web[h["name"]]) for h in state["hosts"]])
        lb.start(timeout=ready_timeout)
        assert lb.proc is not None
        self._own(lb.proc)
        rec = HaproxyState(url=lb.url, port=lb.port, socket=str(lb.socket_path), backend=BACKEND,
                           dir=str(self.haproxy_dir), proc=_record(lb.proc, lb.stop))
        state["haproxy"] = rec
        self._save(state)
        self.say(f"haproxy: {lb.url} in front of the web units, Runtime API on {lb.socket_path}")
        return rec, web

    def _start_prometheus(self, state: State, ready_timeout: float) -> PrometheusState:
        """Start Prometheus scraping every host's web unit (ports reserved now, as for HAProxy) and
        every agent's /metrics (job "norm"), each series labelled `host` with the host's name, with
        Norm's rules (deploy/prometheus/norm-rules.yml) loaded, and record it."""
        from sandbox.app import reserve_ports
        from sandbox.prometheus import AGENTS_JOB, PrometheusServer

        web = {name: pair[0] for name, pair in reserve_ports(state["hosts"]).items()}
        targets = {f"127.0.0.1:{port}": {"host": name} for name, port in web.items()}
        agents = {h["http_listen"]: {"host": h["name"]} for h in state["hosts"]}
        server = PrometheusServer(self.prometheus_dir, targets=list(targets), labels=targets,
                                  rule_files=[str(REPO / "deploy" / "prometheus" / "norm-rules.yml")])
        server.set_targets(list(agents), agents, job=AGENTS_JOB)
        server.start(timeout=ready_timeout)
        assert server.proc is not None
        self._own(server.proc)
        rec = PrometheusState(url=server.url, port=server.port, dir=str(self.prometheus_dir),
                              proc=_record(server.proc, server.stop))
        state["prometheus"] = rec
        self._save(state)
        self.say(f"prometheus: {server.url}, scraping the hosts' web units and agents every "
                 f"{server.scrape_interval:g}s")
        return rec

    def _start_registry(self, state: State, ready_timeout: float) -> str:
        """Start the fleet's registry (its storage kept from an earlier fleet) and record it; the
        repository the agents update from."""
        from sandbox.registry import Registry

        reg = Registry(self.registry_dir)
        reg.start(timeout=ready_timeout)
        assert reg.proc is not None
        self._own(reg.proc)
        state["registry"] = RegistryState(address=reg.address, dir=str(self.registry_dir),
                                          proc=_record(reg.proc, reg.stop))
        self._save(state)
        self.say(f"registry: {reg.address} (storage {reg.storage})")
        return f"{reg.address}/{APP_REPOSITORY}"

    def _start_agent(self, state: State, host: HostState, extra: dict[str, str] | None = None) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   # what the host's own environment would point at
                   DBUS_SYSTEM_BUS_ADDRESS=host["bus_address"], DOCKER_HOST=host["docker_host"],
                   **{**self.agent_env, **(extra or {})})
        agent = Proc(f"agent-{host['name']}",
                     [venv_python(), "-m", "norm", "agent", "--config", host["config"]],
                     Path(host["dir"]) / "agent.log", env=env, cwd=REPO)
        agent.start()
        host["agent"] = _record(agent, agent.stop)
        self._own(agent)
        self._save(state)
        self.say(f"{host['name']}: norm agent pid {agent.pid}, log {agent.log}")

    def host(self, name: str, state: State | None = None) -> HostState:
        state = state if state is not None else self.load_state()
        if state is None:
            raise SandboxError("no sandbox fleet is running")
        for h in state["hosts"]:
            if h["name"] == name:
                return h
        raise SandboxError(f"no host {name} in the sandbox fleet")

    def haproxy_url(self) -> str:
        """The URL of the fleet's HAProxy frontend (fleets with `haproxy` only)."""
        state = self.load_state()
        lb = state.get("haproxy") if state is not None else None
        if lb is None:
            raise SandboxError("this fleet has no HAProxy (start it with haproxy=True)")
        return lb["url"]

    def agent_pid(self, name: str) -> int | None:
        rec = self.host(name)["agent"]
        return rec["pid"] if rec is not None and owned(rec) else None

    def kill_agent(self, name: str, sig: int = 9) -> int:
        """Signal a host's agent (kill -9 by default) and, for a deadly signal, wait until it is gone."""
        import signal as signals

        pid = self.agent_pid(name)
        if pid is None:
            raise SandboxError(f"{name}: no agent running")
        os.kill(pid, sig)
        if sig in (signals.SIGKILL, signals.SIGTERM, signals.SIGINT):
            proc = self._procs.get(pid)
            wait_for(lambda: (proc.alive is False) if proc is not None else fingerprint(pid) is None,
                     timeout=30, what=f"{name}'s agent gone", interval=0.01)
        return pid

    def restart_agent(self, name: str, env: dict[str, str] | None = None) -> None:
        """Start a host's agent again (as systemd's Restart= would), with the same config; `env` adds to
        or overrides the fleet's agent environment for this start only (other settings, a skewed clock)."""
        with self._locked():
            state = self.load_state()
            if state is None:
                raise SandboxError("no sandbox fleet is running")
            host = self.host(name, state)
            if host["agent"] is not None and owned(host["agent"]):
                raise SandboxError(f"{name}: its agent still runs")
            self._start_agent(state, host, env)

    def engine(self, name: str) -> Any:
        """The DockerEngine of a host whose engine this process started (tests, benchmarks)."""
        rec = self.host(name)["docker"]
        engine = self._engines.get(rec["pid"]) if rec is not None else None
        if engine is None:
            raise SandboxError(f"{name}: its Docker engine was not started by this process")
        return engine

    def restart_engine(self, name: str, crash: bool = False) -> None:
        """Restart a host's Docker engine as `systemctl restart docker` would (images stay, containers
        stop), or with `crash` as after a crash (SIGKILL, even of a stopped daemon, then a new one that
        cleans up what the dead one left), and record the new daemon."""
        with self._locked():
            state = self.load_state()
            if state is None:
                raise SandboxError("no sandbox fleet is running")
            host = self.host(name, state)
            engine = self.engine(name)
            assert host["docker"] is not None
            self._procs.pop(host["docker"]["pid"], None)
            self._engines.pop(host["docker"]["pid"], None)
            if crash:
                engine.kill()
                engine.proc = None
                engine.start()
            else:
                engine.restart()
            host["docker"] = _record(engine.proc, engine.stop)
            self._own(engine.proc, engine)
            self._save(state)

    def _etcd_members(self, state: State) -> list[EtcdMember]:
        """The members to start, on free ports. With `isolatable_etcd`, etcd0 runs in a network
        namespace of its own and the others listen on this side of its veth pair, so that etcd0
        can be cut off from its peers (isolate_etcd) while its clients still reach it."""
        ports = _distinct_free_ports(2 * self.etcd_size)
        hosts: list[tuple[str, NetNs | None]] = [("127.0.0.1", None)] * self.etcd_size
        if self.isolatable_etcd:
            ns = NetNs(name=f"norm-fleet-{uuid.uuid4().hex[:8]}")
            state["netns"] = ns.saved()  # saved first: `down` removes it whatever fails next
            self._save(state)
            ns.create()
            state["netns"] = ns.saved()
            self._save(state)
            hosts = [(ns.inner, ns)] + [(ns.outer, None)] * (self.etcd_size - 1)
        return [EtcdMember(f"etcd{i}", self.etcd_dir, client_port=ports[2 * i], peer_port=ports[2 * i + 1],
                           host=host, netns=ns) for i, (host, ns) in enumerate(hosts)]

    def isolate_etcd(self) -> str:
        """Cut etcd0 off from its peers (its clients still reach it); returns its name."""
        state = self.load_state()
        saved = state.get("netns") if state is not None else None
        if state is None or not saved:
            raise SandboxError("this fleet's etcd cannot be isolated (start it with isolatable_etcd)")
        NetNs.of(saved).isolate(except_ports=(state["etcd"][0]["client_port"],))
        return state["etcd"][0]["name"]

    def heal_etcd(self) -> None:
        """Join etcd0 to its peers again (undo isolate_etcd)."""
        state = self.load_state()
        saved = state.get("netns") if state is not None else None
        if saved:
            NetNs.of(saved).heal()

    def _start_etcd(self, state: State, ready_timeout: float, attempts: int = 3) -> list[EtcdMember]:
        """Start the etcd members, record each, and wait until all are healthy. Ports are picked free
        but could be taken by someone else before etcd binds them: then start again on other ones."""
        for attempt in range(1, attempts + 1):
            members = self._etcd_members(state)
            initial = ",".join(f"{m.name}={m.peer_url}" for m in members)
            token = f"norm-sandbox-{uuid.uuid4().hex[:12]}"
            for m in members:
                m.initial_cluster = initial
                m.cluster_token = token
            self.say(f"etcd: starting {len(members)} members")
            for m in members:
                m.start(wait=False)
                assert m.proc is not None
                self._own(m.proc)
                state["etcd"].append(EtcdState(name=m.name, endpoint=m.endpoint, client_port=m.client_port,
                                               peer_port=m.peer_port, proc=_record(m.proc, m.stop)))
                self._save(state)

            try:  # until all are healthy, or one died (no use waiting for it then)
                wait_for(functools.partial(_etcd_settled, members), timeout=ready_timeout,
                         what="etcd cluster", interval=0.1)
            except SandboxError as e:
                tails = "\n".join(f"{m.name}: {m.proc.tail(5) if m.proc else ''}" for m in members)
                raise SandboxError(f"{e}\n{tails}") from None
            failed = _dead_members(members)
            if not failed:
                return members
            tails = "\n".join(f"{m.name}: {m.proc.tail(5) if m.proc else ''}" for m in failed)
            self._down(state)  # what this attempt started, and only that, is in the state
            state["etcd"] = []
            self._save(state)
            shutil.rmtree(self.etcd_dir, ignore_errors=True)
            if attempt == attempts or "address already in use" not in tails:
                raise SandboxError(f"etcd did not start:\n{tails}")
            self.say("etcd: a port was taken before etcd could bind it; trying other ports")
        raise AssertionError("unreachable")

    def _engine_class(self, quiet: bool = False) -> Any:
        """sandbox.docker.DockerEngine if the fleet wants engines and the module is there."""
        if not self.docker and not quiet:
            return None
        try:
            from sandbox import docker as docker_mod  # type: ignore[attr-defined, unused-ignore]
        except ModuleNotFoundError as e:
            if e.name != "sandbox.docker":
                raise
            if not quiet:
                self.say("sandbox.docker is not available: the hosts run without Docker engines")
            return None
        return docker_mod.DockerEngine

    def _own(self, proc: Proc, engine: Any = None) -> None:
        if proc.pid is not None:
            self._procs[proc.pid] = proc
            if engine is not None:
                self._engines[proc.pid] = engine

    # -- down -----------------------------------------------------------------------------------
    def down(self) -> list[str]:
        """Stop everything state.json records, by pid, and forget it. Harmless when nothing runs."""
        with self._locked():
            state = self.load_state()
            try:
                if state is None:
                    return [f"no sandbox fleet recorded in {self.run_dir}"]
                return self._down(state)
            finally:
                self._forget_exited()

    def _forget_exited(self) -> None:
        """Drop (and reap) this process's children that are gone, e.g. stopped by a `down` elsewhere."""
        for pid, proc in list(self._procs.items()):
            if not proc.alive:  # polls the child: collects its exit status
                del self._procs[pid]
                self._engines.pop(pid, None)

    def _down(self, state: State) -> list[str]:
        said: list[str] = []

        def note(msg: str) -> None:
            said.append(msg)
            self.say(msg)

        errors: list[str] = []
        for h in reversed(state["hosts"]):
            if h["agent"] is not None:
                self._stop(h["agent"], note, timeout=20)
        for h in reversed(state["hosts"]):
            if h["docker"] is not None or state["docker"]:
                try:
                    self._stop_engine(h["name"], h["docker_dir"], h["docker"], note)
                except SandboxError as e:
                    errors.append(str(e))
        images = state.get("image_engine")
        if images is not None:
            try:
                self._stop_engine(images["name"], images["dir"], images["proc"], note)
            except SandboxError as e:
                errors.append(str(e))
        for h in reversed(state["hosts"]):
            rec = h["systemd"]
            mgr = SystemdManager(h["name"], Path(h["systemd_dir"]))
            if h["cgroup"].startswith(CGROUP_PREFIX):
                mgr.cgroup = h["cgroup"]  # removed whether or not the manager still runs
            if rec is not None:
                if owned(rec):
                    mgr.proc = self._procs.pop(rec["pid"], None) or Proc(
                        rec["name"], rec["argv"], Path(rec["log"]), pid=rec["pid"])
                else:
                    self._explain(rec, note)
            try:
                mgr.stop()
            except SandboxError as e:
                errors.append(str(e))
                continue
            if rec is not None and mgr.proc is not None:
                note(f"stopped {rec['name']} (pid {rec['pid']}) and its cgroup {h['cgroup']}")
        for m in reversed(state["etcd"]):
            self._stop(m["proc"], note, timeout=15)
        netns = state.get("netns")
        if netns:
            NetNs.of(netns).remove()
            state["netns"] = None
            note(f"removed the network namespace {netns['name']}")
        reg = state.get("registry")
        if reg is not None:
            self._stop(reg["proc"], note, timeout=15)
        lb = state.get("haproxy")
        if lb is not None:
            self._stop(lb["proc"], note, timeout=15)
        prom = state.get("prometheus")
        if prom is not None:
            self._stop(prom["proc"], note, timeout=15)
        if errors:
            self._save(state)
            raise SandboxError("could not stop everything:\n" + "\n".join(errors))
        self.state_path.unlink(missing_ok=True)
        return said

    def _stop_engine(self, name: str, workdir: str, rec: ProcState | None,
                     note: Callable[[str], None]) -> None:
        """Stop a Docker engine with DockerEngine.stop(), which also sweeps what its daemons leave
        (containerd, shims, mounts); from the pid alone if sandbox.docker is not importable."""
        engine = self._engines.pop(rec["pid"], None) if rec is not None else None
        if engine is None:
            engine_cls = self._engine_class(quiet=True)
            if engine_cls is None:
                if rec is not None:
                    self._stop(rec, note, timeout=30)
                return
            engine = engine_cls(name, Path(workdir))
            if rec is not None and owned(rec):
                engine.proc = Proc(rec["name"], rec["argv"], Path(rec["log"]), pid=rec["pid"])
            elif rec is not None:
                self._explain(rec, note)
        was_running = engine.proc is not None
        engine.stop()
        if rec is not None:
            self._procs.pop(rec["pid"], None)
            if was_running:
                note(f"stopped {rec['name']} (pid {rec['pid']}) and its containers")

    def _stop(self, rec: ProcState, note: Callable[[str], None], timeout: float) -> None:
        """Stop a recorded process if it is still the one we started; otherwise say why not."""
        pid = rec["pid"]
        if not owned(rec):
            self._explain(rec, note)
            return
        proc = self._procs.pop(pid, None) or Proc(rec["name"], rec["argv"], Path(rec["log"]), pid=pid)
        proc.stop(timeout=timeout)
        note(f"stopped {rec['name']} (pid {pid})")

    @staticmethod
    def _explain(rec: ProcState, note: Callable[[str], None]) -> None:
        """Say why a recorded process that is not ours any more is left alone."""
        if fingerprint(rec["pid"]) is not None:
            note(f"pid {rec['pid']} is no longer {rec['name']}: left alone")
        else:
            note(f"{rec['name']} (pid {rec['pid']}) already gone")

    # -- looking at it --------------------------------------------------------------------------
    def etcdctl(self, *args: str, state: State | None = None, input: str | None = None) -> str:
        """Run etcdctl against the fleet's cluster; its stdout. `input` goes to its standard input."""
        state = state if state is not None else self.load_state()
        if state is None or not state["endpoints"]:
            raise SandboxError("no sandbox etcd is recorded")
        argv = [ETCDCTL, "--endpoints", ",".join(state["endpoints"]), "--dial-timeout", "3s",
                "--command-timeout", "5s", *args]
        r = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, ETCDCTL_API="3"),
                           timeout=30, check=False, input=input)
        if r.returncode != 0:
            raise SandboxError(f"etcdctl {' '.join(a[:80] for a in args)}: {r.stderr.strip()[:500]}")
        return r.stdout

    def registered_hosts(self, state: State | None = None) -> dict[str, dict[str, Any]]:
        """The values under /norm/hosts/, by machine id (values that are not JSON objects skipped)."""
        import base64

        out = json.loads(self.etcdctl("get", "--prefix", HOSTS_PREFIX, "-w", "json", state=state))
        hosts: dict[str, dict[str, Any]] = {}
        for kv in out.get("kvs", []):
            key = base64.b64decode(kv["key"]).decode(errors="replace")
            with contextlib.suppress(ValueError):
                value = json.loads(base64.b64decode(kv.get("value", "")))
                if isinstance(value, dict):
                    hosts[key.removeprefix(HOSTS_PREFIX)] = value
        return hosts

    def wait_registered(self, timeout: float = 60.0) -> dict[str, dict[str, Any]]:
        """Wait until every host's agent has registered itself in etcd; fail early if one dies."""
        state = self.load_state()
        if state is None:
            raise SandboxError("no sandbox fleet is running")
        wanted = {h["machine_id"] for h in state["hosts"]}
        seen: dict[str, dict[str, Any]] = {}

        def dead_agents() -> list[HostState]:
            return [h for h in state["hosts"] if h["agent"] is None or not owned(h["agent"])]

        def all_registered() -> bool:
            if dead_agents():
                return True  # no use waiting: reported below
            seen.clear()
            seen.update(self.registered_hosts(state))
            return wanted <= seen.keys()

        try:
            wait_for(all_registered, timeout=timeout, what="every host registered in etcd", interval=0.25)
        except SandboxError:
            missing = sorted(h["name"] for h in state["hosts"] if h["machine_id"] not in seen)
            raise SandboxError(f"not registered in etcd after {timeout:.0f}s: {', '.join(missing)}; "
                               f"see the agent logs under {self.hosts_dir}") from None
        dead = dead_agents()
        if dead:
            h = dead[0]
            log = Path(h["dir"]) / "agent.log"
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:]) if log.exists() else ""
            raise SandboxError(f"the norm agent of {', '.join(d['name'] for d in dead)} is not running; "
                               f"{log} ends with:\n{tail}")
        return {mid: seen[mid] for mid in sorted(wanted)}
