"""The campaign's driver: one sandbox fleet (3-member etcd, hosts each with its systemd manager, Docker
engine and agent), a registry and an image builder of its own; runs, each from a seed, reusing the
fleet and bringing it back to the same release between runs.

A run: the fleet serves the compatible release `c0`; the recorder starts watching etcd from the next
revision and the monitor starts sampling every engine's containers; the schedule's steps run at their
moments (faults undone after their hold); then everything is brought back (agents running, etcd
members up, registry up, holds ended), the fleet is given time to converge on the last desired
version, and sandbox.chaos.check judges what was recorded.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox import app, images, updates
from sandbox.chaos import check
from sandbox.chaos.observe import ContainerMonitor, Recorder, log_size, read_log_events, running_containers
from sandbox.chaos.schedule import Schedule, Step, make_schedule
from sandbox.clock import skewed_env
from sandbox.docker import DockerEngine
from sandbox.fleet import APP_REPOSITORY, Fleet, HostState, record
from sandbox.procs import REPO, Proc, SandboxError, venv_python, wait_for
from sandbox.registry import Registry
from sandbox.systemd import SystemdManager

LEASE_TTL = 4
AGENT_ENV: dict[str, str] = {
    "NORM_ETCD__LEASE_TTL": str(LEASE_TTL),
    "NORM_ETCD__REQUEST_TIMEOUT": "2",
    "NORM_UPDATE__PULL_TIMEOUT": "30",
    "NORM_UPDATE__STOP_TIMEOUT": "20",
    "NORM_UPDATE__START_TIMEOUT": "30",
    "NORM_UPDATE__MIGRATION_TIMEOUT": "30",
    "NORM_LOG__LEVEL": "info",
}
COMPATIBLE_TAG = "c0"  # listed in update.compatible: the release every run starts from
MIGRATED_TAG = "m0"  # deployed once at set-up, before c0 again: setting it back must not migrate again
PHASE_WAIT = 10.0  # seconds a step waits for its phase at most (then it acts all the same)
CONVERGE_TIMEOUT = 150.0
SERVE_TIMEOUT = 90.0
UNIT = "djed-web.service"

Injector = Callable[["Run", Step], "Callable[[], None] | None"]
_INJECTORS: dict[str, Injector] = {}


def register_injector(kind: str, inject: Injector) -> None:
    """Hook for faults defined elsewhere (member isolation, clock skew): `inject(run, step)` does the
    harm and returns what undoes it (called `step.hold` seconds later, and at the latest when the
    schedule ends), or None. Add the kind to schedules with sandbox.chaos.schedule.register_fault."""
    _INJECTORS[kind] = inject


def replay_command(seed: int) -> str:
    return f"make chaos SEED={seed}"


@dataclass
class Note:
    at: float  # wall clock
    kind: str
    operator: bool
    what: str
    host: str = ""  # the host it hit, if any
    until: float | None = None  # when it was undone


@dataclass
class RunResult:
    seed: int
    schedule: Schedule
    violations: list[str]
    notes: list[Note]
    seconds: float
    errors: list[str] = field(default_factory=list)  # the campaign's own trouble (not Norm's)
    summary: list[str] = field(default_factory=list)  # what the run did (sandbox.chaos.check.describe)
    final: dict[str, Any] = field(default_factory=dict)  # the rollout header as the run ended

    @property
    def ok(self) -> bool:
        return not self.violations and not self.errors

    def report(self) -> str:
        lines = [f"seed {self.seed}: {len(self.violations)} violation(s) in {self.seconds:.0f}s; "
                 f"replay: {replay_command(self.seed)}"]
        lines += [f"  VIOLATION {v}" for v in self.violations]
        lines += [f"  CAMPAIGN ERROR {e}" for e in self.errors]
        return "\n".join(lines + self.story())

    def story(self) -> list[str]:
        lines = ["  what happened:"]
        t0 = self.notes[0].at if self.notes else 0.0
        for n in self.notes:
            lines.append(f"    {n.at - t0:6.1f}s {'op   ' if n.operator else 'fault'} {n.what}"
                         + (f" (undone at {n.until - t0:.1f}s)" if n.until else ""))
        lines += [f"    {line}" for line in self.summary]
        return lines


class Campaign:
    """One fleet for many runs. `setup()` first, `close()` last."""

    def __init__(self, run_dir: Path, registry: Registry, image_engine: DockerEngine,
                 say: Callable[[str], None] = print, size: int = 3) -> None:
        self.run_dir = Path(run_dir)
        self.registry = registry
        self.image_engine = image_engine
        self.say = say
        self.secret = f"chaos-secret-{uuid.uuid4().hex}"
        env = dict(AGENT_ENV, NORM_UPDATE__STEPS_ENV_FILE=str(self.steps_env),
                   NORM_UPDATE__COMPATIBLE=COMPATIBLE_TAG)
        self.fleet = Fleet(self.run_dir / "fleet", size=size, image=f"{registry.address}/djed/app",
                           agent_env=env, isolatable_etcd=True)
        # Each start of an agent under a skewed clock: host -> [(its log's size just before, its pid,
        # by how many seconds)].
        self.skews: dict[str, list[tuple[int, int, float]]] = {}
        self.ports: dict[str, tuple[int, int]] = {}
        self.version_writes: set[int] = set()  # every revision the version key was written at
        self.built: dict[str, str] = {}  # tag -> image id
        self.digests: dict[str, str] = {}  # tag -> the registry's manifest digest
        self.migrated: list[str] = [MIGRATED_TAG]  # tags whose steps ran, oldest first

    @property
    def steps_env(self) -> Path:
        return self.run_dir / "steps.env"

    @property
    def record_log(self) -> Path:
        return self.fleet.data_dir / "record.log"

    @property
    def began_log(self) -> Path:
        """Each step's run as it begins (record.log has the runs that finished)."""
        return self.fleet.data_dir / "began.log"

    def write_steps_env(self, seconds: int) -> None:
        # The steps get a secret: it must never show in logs or etcd.
        text = f"NORM_DEMO_SECRET={self.secret}\n"
        if seconds:
            text += f"NORM_DEMO_TASK_SECONDS={seconds}\n"
        self.steps_env.write_text(text)
        self.steps_env.chmod(0o600)

    # -- set-up -------------------------------------------------------------------------------------
    def setup(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.write_steps_env(0)
        self.fleet.say = self.say
        self.fleet.up()
        self.fleet.say = lambda _: None
        state = self.fleet.load_state()
        assert state is not None
        self.ports = app.install_app(state)
        self.fleet.wait_registered(timeout=90)
        self.build(COMPATIBLE_TAG)
        self.build(MIGRATED_TAG)
        for tag in (COMPATIBLE_TAG, MIGRATED_TAG, COMPATIBLE_TAG):
            self.deploy(tag)
        self.serving(COMPATIBLE_TAG, timeout=SERVE_TIMEOUT)

    def build(self, tag: str) -> str:
        if tag not in self.built:
            ref = images.demo_app_image(self.image_engine, self.registry, tag)
            self.built[tag] = self.image_engine.docker("image", "inspect", "--format", "{{.Id}}", ref).strip()
            self.digests[tag] = self.registry.digest(APP_REPOSITORY, tag)
        return tag

    def deploy(self, tag: str, timeout: float = 120.0) -> dict[str, Any]:
        revision = updates.set_version(self.fleet, tag)
        self.version_writes.add(revision)
        h = updates.wait_phase(self.fleet, revision, timeout=timeout)
        if h["phase"] != "done" or int(h["revision"]) != revision:
            raise SandboxError(f"deploying {tag} ended {h}")
        return h

    def hosts(self) -> list[HostState]:
        state = self.fleet.load_state()
        assert state is not None
        return list(state["hosts"])

    def served(self, name: str) -> tuple[str, str] | None:
        web, api = self.ports[name]
        try:
            return app.fetch(web, timeout=1), app.fetch(api, timeout=1)
        except OSError:
            return None

    def serving(self, tag: str, timeout: float) -> None:
        wait_for(lambda: all(self.served(h["name"]) == (tag, tag) for h in self.hosts()),
                 timeout=timeout, what=f"every host serving {tag}", interval=0.2)

    def baseline(self) -> None:
        """Every agent, engine, member running; the fleet serving c0 with no rollout under way. When
        that cannot be had, a new fleet."""
        try:
            self._bring_back()
            self._one_leader()
            h = updates.header(self.fleet)
            if h is None or h["tag"] != COMPATIBLE_TAG or h["phase"] != "done":
                self.deploy(COMPATIBLE_TAG)
            self.serving(COMPATIBLE_TAG, timeout=SERVE_TIMEOUT)
        except (SandboxError, OSError, subprocess.SubprocessError) as e:
            self.say(f"chaos: the fleet did not come back ({e}); starting a new one")
            self.fleet.down()
            self._keep_logs()
            self.skews.clear()
            self.version_writes.clear()
            self.migrated = [MIGRATED_TAG]
            self.setup()

    def _keep_logs(self) -> None:
        """The agents' logs of a fleet about to be replaced, kept for reading the runs they saw (a new
        fleet starts them afresh): `<run dir>/replaced-<n>/<host>.log`."""
        kept = self.run_dir / f"replaced-{sum(1 for _ in self.run_dir.glob('replaced-*')) + 1}"
        kept.mkdir()
        for log in self.fleet.hosts_dir.glob("*/agent.log"):
            shutil.copyfile(log, kept / f"{log.parent.name}.log")
        self.say(f"chaos: the replaced fleet's agent logs are in {kept}")

    def _bring_back(self) -> None:
        """Start whatever a run left stopped: etcd members (joined to their peers), agents (thawed),
        engines, the registry."""
        state = self.fleet.load_state()
        assert state is not None
        self.fleet.heal_etcd()
        for i, m in enumerate(state["etcd"]):
            pid = m["proc"]["pid"]
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            if not _owned(m["proc"]):
                etcd_start(self.fleet, i)
        if not self.registry.alive:
            self.registry.start()
        for h in state["hosts"]:
            rec = h["agent"]
            if rec is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(rec["pid"], signal.SIGCONT)
            if self.fleet.agent_pid(h["name"]) is None:
                self.fleet.restart_agent(h["name"])
        self.fleet.wait_registered(timeout=60)

    def _one_leader(self) -> None:
        """An agent that still believes it leads without the leader key (a run found it, or not) is
        started again, so that the next run starts clean and is judged on its own."""
        kvs = updates.get_kvs(self.fleet, "/norm/leader")
        holder = kvs[0]["value"].decode() if kvs else None
        for h in self.hosts():
            if h["machine_id"] != holder and _leader_gauge(h) == 1.0:
                self.say(f"chaos: {h['name']} still believes it leads, without the leader key: "
                         f"starting its agent again")
                self.fleet.kill_agent(h["name"], signal.SIGTERM)
                self.fleet.restart_agent(h["name"])
        self.fleet.wait_registered(timeout=60)

    def close(self) -> None:
        self.fleet.down()


    # -- a run --------------------------------------------------------------------------------------
    def run(self, seed: int, duration: float = 18.0) -> RunResult:
        began = time.monotonic()
        schedule = make_schedule(seed, duration)
        self.baseline()
        run = Run(self, schedule)
        try:
            run.execute()
        except Exception as e:
            run.errors.append(f"the run broke off: {type(e).__name__}: {e}")
        finally:
            run.stop_observing()
        violations = [] if run.errors and run.obs is None else check.check(run.obs) if run.obs else []
        result = RunResult(seed, schedule, violations, run.notes, time.monotonic() - began, run.errors,
                           check.describe(run.obs) if run.obs else [], run.header() or {})
        for tag in run.done_tags:
            if tag not in self.migrated:
                self.migrated.append(tag)
        return result


def _done(undo: Callable[[], object]) -> bool:
    """Whether `undo` went through (False: etcd refused it, try again)."""
    try:
        undo()
    except SandboxError:
        return False
    return True


def _leader_gauge(host: HostState) -> float | None:
    """The agent's norm_leader gauge (None if it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://{host['http_listen']}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("norm_leader "):
                    return float(line.split()[-1])
    except (OSError, ValueError):
        return None
    return None


def _lines_from(path: Path, offset: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace").splitlines()
    except OSError:
        return []


def _owned(rec: Any) -> bool:
    from sandbox.fleet import owned

    return owned(rec)


# -- etcd members, systemd managers: what the fleet has no method for -------------------------------


def etcd_kill(fleet: Fleet, i: int) -> None:
    state = fleet.load_state()
    assert state is not None
    rec = state["etcd"][i]["proc"]
    proc = fleet._procs.get(rec["pid"])
    if proc is not None:
        proc.kill()
    elif _owned(rec):
        os.kill(rec["pid"], signal.SIGKILL)
        wait_for(lambda: not _owned(rec), timeout=10, what="etcd member gone")


def etcd_signal(fleet: Fleet, i: int, sig: int) -> None:
    state = fleet.load_state()
    assert state is not None
    rec = state["etcd"][i]["proc"]
    if _owned(rec):
        os.kill(rec["pid"], sig)


def etcd_start(fleet: Fleet, i: int) -> None:
    """Start member i again on its data dir and ports (the argv it was started with)."""
    with fleet._locked():
        state = fleet.load_state()
        assert state is not None
        m = state["etcd"][i]
        if _owned(m["proc"]):
            return
        proc = Proc(m["name"], m["proc"]["argv"], Path(m["proc"]["log"]))
        proc.start()
        m["proc"] = record(proc)
        fleet._own(proc)
        fleet._save(state)


def systemd_restart(fleet: Fleet, name: str) -> None:
    """The host's systemd manager killed and started again on the same bus and cgroup: its units'
    processes die with it; the new manager loads the units from disk and starts again those that
    were active (as a host's systemd starts its enabled units), the others stay inactive."""
    with fleet._locked():
        state = fleet.load_state()
        assert state is not None
        host = next(h for h in state["hosts"] if h["name"] == name)
        mgr = SystemdManager(name, Path(host["systemd_dir"]))
        mgr.cgroup = host["cgroup"]
        rec = host["systemd"]
        if rec is not None:
            mgr.proc = fleet._procs.pop(rec["pid"], None) or Proc(
                rec["name"], rec["argv"], Path(rec["log"]), pid=rec["pid"])
        active = [u for u in app.UNITS if mgr.unit_property(u, "ActiveState") in ("active", "activating")]
        mgr.restart()
        assert mgr.proc is not None
        host["systemd"] = record(mgr.proc)
        fleet._own(mgr.proc)
        fleet._save(state)
    if active:
        mgr.systemctl("start", "--no-block", *active)


# -- one run ----------------------------------------------------------------------------------------


class Run:
    def __init__(self, campaign: Campaign, schedule: Schedule) -> None:
        self.c = campaign
        self.fleet = campaign.fleet
        self.schedule = schedule
        self.rng = random.Random(schedule.seed * 7919 + 1)  # choices made while running
        self.notes: list[Note] = []
        self.errors: list[str] = []
        self.pending: list[tuple[float, int, Callable[[], None], Note]] = []
        self._seq = itertools.count()
        # Every new version the schedule needs, built and pushed before the run (the registry may
        # be away when the operator sets one).
        wanted = sum({"version": 1, "flip": 2}.get(s.kind, 0) for s in schedule.steps)
        self.planned = [f"s{schedule.seed}x{k}" for k in range(1, wanted + 1)]
        self.tags = iter(self.planned)
        self.unknown = (f"nosuch-s{schedule.seed}x{k}" for k in itertools.count(1))
        self.done_tags: list[str] = []
        self.recorder: Recorder | None = None
        self.monitor: ContainerMonitor | None = None
        self.obs: check.Observations | None = None
        self.hosts = {h["name"]: h for h in campaign.hosts()}
        self.by_machine = {h["machine_id"]: h["name"] for h in self.hosts.values()}
        self.frozen: dict[str, list[tuple[float, float]]] = {n: [] for n in self.hosts}
        self.afterwards: list[Callable[[], object]] = []  # undos that need the fleet back first
        self.killed: dict[str, list[float]] = {n: [] for n in self.hosts}

    # -- observing ----------------------------------------------------------------------------------
    def start_observing(self) -> None:
        state = self.fleet.load_state()
        assert state is not None
        self.snapshot = updates.get_kvs(self.fleet, "/", prefix=True)
        out = json.loads(self.fleet.etcdctl("get", "-w", "json", "/chaos-none"))
        self.start_revision = int(out["header"]["revision"]) + 1
        self.log_offsets = {n: log_size(Path(h["dir"]) / "agent.log") for n, h in self.hosts.items()}
        self.record_offset = log_size(self.c.record_log)
        self.began_offset = log_size(self.c.began_log)
        self.recorder = Recorder(state["endpoints"], self.start_revision,
                                 self.c.run_dir / f"recorder-{self.schedule.seed}.log", self.snapshot)
        self.recorder.start()
        self.monitor = ContainerMonitor({n: h["docker_host"] for n, h in self.hosts.items()})
        self.monitor.start()
        self.t0 = time.time()

    def stop_observing(self) -> None:
        if self.recorder is not None:
            self.recorder.stop()
        if self.monitor is not None:
            self.monitor.stop()

    # -- the schedule -------------------------------------------------------------------------------
    def execute(self) -> None:
        for tag in self.planned:
            self.c.build(tag)
        self.c.write_steps_env(self.schedule.step_seconds)
        self.start_observing()
        began = time.monotonic()
        for step in self.schedule.steps:
            self._wait_until(began + step.at)
            if step.phase is not None:
                self._wait_phase(step.phase)
            try:
                self._do(step)
            except (SandboxError, OSError, subprocess.SubprocessError) as e:
                self.note(step.kind, step.operator, f"{step.kind} did not take: {e}"[:300])
        self._undo_all()
        self._converge()

    def note(self, kind: str, operator: bool, what: str, host: str = "") -> Note:
        n = Note(time.time(), kind, operator, what, host)
        self.notes.append(n)
        return n

    def _later(self, seconds: float, undo: Callable[[], None], note: Note) -> None:
        heapq.heappush(self.pending, (time.monotonic() + seconds, next(self._seq), undo, note))

    def _run_due(self, everything: bool = False) -> None:
        while self.pending and (everything or self.pending[0][0] <= time.monotonic()):
            _, _, undo, note = heapq.heappop(self.pending)
            try:
                undo()
            except (SandboxError, OSError, subprocess.SubprocessError) as e:
                self.errors.append(f"undoing '{note.what}' failed: {e}"[:400])
            note.until = time.time()

    def _wait_until(self, deadline: float) -> None:
        while True:
            self._run_due()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.05, left))

    def header(self) -> dict[str, Any] | None:
        assert self.recorder is not None
        raw = self.recorder.value("/norm/rollout")
        if raw is None:
            return None
        with contextlib.suppress(ValueError):
            value = json.loads(raw)
            return value if isinstance(value, dict) else None
        return None

    def _wait_phase(self, phase: str) -> None:
        deadline = time.monotonic() + PHASE_WAIT
        while time.monotonic() < deadline:
            h = self.header()
            if h is not None and h.get("phase") == phase:
                return
            self._wait_until(min(deadline, time.monotonic() + 0.05))

    def leader(self) -> str | None:
        assert self.recorder is not None
        raw = self.recorder.value("/norm/leader")
        return self.by_machine.get(raw.decode(errors="replace")) if raw else None

    def pick_host(self, target: str) -> str:
        names = sorted(self.hosts)
        leader = self.leader()
        if target == "leader" and leader is not None:
            return leader
        if target == "other" and leader is not None:
            return self.rng.choice([n for n in names if n != leader])
        return self.rng.choice(names)

    # -- operator actions ----------------------------------------------------------------------------
    def set_version(self, tag: str, why: str) -> None:
        try:
            revision = updates.set_version(self.fleet, tag)
            self.note("version", True, f"{why}: /djed-version = {tag} (revision {revision})")
        except SandboxError as e:  # etcd without quorum: the write may or may not have applied
            self.note("version", True, f"{why}: /djed-version = {tag} not confirmed: {str(e)[:120]}")

    def cli(self, host: str, *args: str, timeout: float = 40.0) -> tuple[int, str]:
        argv = [venv_python(), "-m", "norm", *args, "--config", self.hosts[host]["config"]]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                               env=dict(os.environ), check=False)
        except subprocess.TimeoutExpired:
            return -1, "timed out"
        said = (r.stdout + r.stderr).strip().splitlines()
        return r.returncode, said[-1] if said else ""

    def _do(self, step: Step) -> None:
        if step.kind in _INJECTORS:
            note = self.note(step.kind, step.operator, step.describe())
            undo = _INJECTORS[step.kind](self, step)
            if undo is not None:
                self._later(step.hold, undo, note)
            return
        getattr(self, f"_do_{step.kind}")(step)

    def _do_version(self, step: Step) -> None:
        self.set_version(next(self.tags), "new version")

    def _do_flip(self, step: Step) -> None:
        first, second = next(self.tags), next(self.tags)
        self.set_version(first, "flip")
        self._wait_until(time.monotonic() + step.arg)
        self.set_version(second, f"flip after {step.arg:.2f}s")

    def _do_back_migrated(self, step: Step) -> None:
        # A version of this run that is done (its steps ran), else m0: what a replay of the seed on
        # its own would pick too.
        assert self.recorder is not None
        h = self.header() or {}
        headers = (e.json() for e in list(self.recorder.events) if e.key == "/norm/rollout")
        done = [str(v.get("tag")) for v in headers
                if isinstance(v, dict) and v.get("phase") == "done" and str(v.get("tag")) in self.planned]
        done = [t for t in done if t != h.get("tag")]
        self.set_version(done[-1] if done else MIGRATED_TAG, "back to a migrated version")

    def _do_back_compatible(self, step: Step) -> None:
        self.set_version(COMPATIBLE_TAG, "back to the compatible version")

    def _do_unknown_tag(self, step: Step) -> None:
        self.set_version(next(self.unknown), "unknown tag")

    def _do_abort(self, step: Step) -> None:
        host = self.rng.choice(sorted(self.hosts))
        code, said = self.cli(host, "abort", "--by", "chaos")
        self.note("abort", True, f"norm abort on {host}: exit {code} ({said[:100]})", host)

    def _do_hold(self, step: Step) -> None:
        host = self.pick_host(step.target)
        code, said = self.cli(host, "units", "stop", UNIT, "--timeout", "10")
        note = self.note("hold", True, f"norm units stop {UNIT} on {host}: exit {code} ({said[:200]})", host)

        def release() -> None:
            code, _ = self.cli(host, "units", "start", UNIT, "--timeout", "10")
            note.what += f"; norm units start: exit {code}"
            if code != 0:  # the agent is away: take the hold back in etcd, it acts on it when it runs
                key = f"/norm/control/{self.hosts[host]['machine_id']}/hold/{UNIT}"
                try:
                    self.fleet.etcdctl("del", key)
                except SandboxError:  # etcd is away too: once the fleet is back
                    self.afterwards.append(lambda: self.fleet.etcdctl("del", key))

        self._later(step.hold, release, note)

    # -- faults --------------------------------------------------------------------------------------
    def _do_agent_kill(self, step: Step) -> None:
        host = self.pick_host(step.target)
        if self.fleet.agent_pid(host) is None:
            self.note("agent_kill", False, f"kill -9 agent of {host}: not running", host)
            return
        was_leader = host == self.leader()
        self.fleet.kill_agent(host, signal.SIGKILL)
        self.killed[host].append(time.time())
        note = self.note("agent_kill", False, f"kill -9 agent of {host}{' (leader)' if was_leader else ''}"
                         f" in {(self.header() or {}).get('phase')}", host)

        def restart() -> None:
            if self.fleet.agent_pid(host) is None:
                self.fleet.restart_agent(host)

        self._later(step.hold, restart, note)

    def _do_agent_freeze(self, step: Step) -> None:
        host = self.pick_host(step.target)
        pid = self.fleet.agent_pid(host)
        if pid is None:
            self.note("agent_freeze", False, f"SIGSTOP agent of {host}: not running", host)
            return
        was_leader = host == self.leader()
        os.kill(pid, signal.SIGSTOP)
        frozen_at = time.time()
        note = self.note("agent_freeze", False, f"SIGSTOP agent of {host}{' (leader)' if was_leader else ''}"
                         f" in {(self.header() or {}).get('phase')} for {step.hold:.1f}s", host)

        def thaw() -> None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            self.frozen[host].append((frozen_at, time.time()))

        self._later(step.hold, thaw, note)

    def _step_running(self, fallback: str) -> tuple[str, str]:
        """(host, step container) once a step's container runs (5 s at most) on the host that runs
        it, the migrator ("" if none showed)."""
        host = self.by_machine.get(str((self.header() or {}).get("migrator"))) or fallback
        docker_host = self.hosts[host]["docker_host"]
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            found = running_containers(docker_host) or []
            names = [str((c.get("Names") or [""])[0]).lstrip("/") for c in found]
            running = [n for n in names if n.startswith("norm-")]
            if running:
                return host, running[0]
            self._wait_until(time.monotonic() + 0.05)
        return host, ""

    def _do_docker_crash(self, step: Step) -> None:
        host = self.pick_host(step.target)
        running = ""
        if step.phase == "migrate":  # during a step: on the host that runs it, once its container runs
            host, running = self._step_running(host)
        phase = (self.header() or {}).get("phase")
        note = self.note("docker_crash", False, f"dockerd of {host} crashed in {phase}"
                         + (f" while {running} ran" if running else ""), host)
        self.fleet.restart_engine(host, crash=True)
        note.until = time.time()

    def _do_step_container_gone(self, step: Step) -> None:
        host, running = self._step_running(self.pick_host(step.target))
        if not running:
            self.note("step_container_gone", False, f"no step container ran on {host} to remove", host)
            return
        killed = step.arg >= 0.5 and self.fleet.agent_pid(host) is not None
        if killed:
            self.fleet.kill_agent(host, signal.SIGKILL)
            self.killed[host].append(time.time())
        self.fleet.engine(host).docker("rm", "-f", running, check=False)
        note = self.note("step_container_gone", False, f"step container {running} removed on {host} while "
                         f"it ran (docker rm -f)" + (", its agent killed first" if killed else ""), host)
        if killed:
            def restart() -> None:
                if self.fleet.agent_pid(host) is None:
                    self.fleet.restart_agent(host)

            self._later(step.hold, restart, note)

    def _do_etcd_kill(self, step: Step) -> None:
        i = int(step.target or 0)
        etcd_kill(self.fleet, i)
        note = self.note("etcd_kill", False, f"etcd{i} killed for {step.hold:.1f}s")
        self._later(step.hold, lambda: etcd_start(self.fleet, i), note)

    def _do_quorum_loss(self, step: Step) -> None:
        i = int(step.target or 0)
        pair = [i, (i + 1) % 3]
        frozen = step.arg >= 0.5
        for m in pair:
            if frozen:
                etcd_signal(self.fleet, m, signal.SIGSTOP)
            else:
                etcd_kill(self.fleet, m)
        note = self.note("quorum_loss", False, f"etcd{pair[0]} and etcd{pair[1]} "
                         f"{'frozen' if frozen else 'killed'} for {step.hold:.1f}s: no quorum")

        def back() -> None:
            for m in pair:
                if frozen:
                    etcd_signal(self.fleet, m, signal.SIGCONT)
                else:
                    etcd_start(self.fleet, m)

        self._later(step.hold, back, note)

    def _do_etcd_isolate(self, step: Step) -> None:
        name = self.fleet.isolate_etcd()
        note = self.note("etcd_isolate", False, f"{name} cut off from its peers for {step.hold:.1f}s "
                         f"in {(self.header() or {}).get('phase')} (its clients still reach it)")
        self._later(step.hold, self.fleet.heal_etcd, note)

    def _do_clock_skew(self, step: Step) -> None:
        host = self.pick_host(step.target)
        if self.fleet.agent_pid(host) is None:
            self.note("clock_skew", False, f"clock skew of {host}'s agent: not running", host)
            return
        skew = int(step.arg)
        was_leader = host == self.leader()
        self.fleet.kill_agent(host, signal.SIGTERM)
        size = log_size(Path(self.hosts[host]["dir"]) / "agent.log")
        self.fleet.restart_agent(host, env=skewed_env(skew))
        pid = self.fleet.agent_pid(host)
        if pid is not None:
            self.c.skews.setdefault(host, []).append((size, pid, float(skew)))
        note = self.note("clock_skew", False, f"agent of {host}{' (leader)' if was_leader else ''} started "
                         f"again with its clock {skew:+d}s off for {step.hold:.1f}s "
                         f"in {(self.header() or {}).get('phase')}", host)

        def unskew() -> None:
            if pid is not None and self.fleet.agent_pid(host) == pid:  # not killed and restarted since
                self.fleet.kill_agent(host, signal.SIGTERM)
                self.fleet.restart_agent(host)

        self._later(step.hold, unskew, note)

    def _do_compact(self, step: Step) -> None:
        assert self.recorder is not None
        # Up to what the recorder has read: its watch (should it have to start again) resumes above it.
        revision = self.recorder.last_revision
        self.fleet.etcdctl("compact", str(revision))
        self.note("compact", False, f"etcd compacted at revision {revision}")

    def _do_registry_away(self, step: Step) -> None:
        self.c.registry.stop()
        note = self.note("registry_away", False, f"registry stopped for {step.hold:.1f}s "
                         f"in {(self.header() or {}).get('phase')}")
        self._later(step.hold, self.c.registry.start, note)

    def _do_systemd_restart(self, step: Step) -> None:
        host = self.pick_host(step.target)
        note = self.note("systemd_restart", False, f"systemd manager of {host} restarted "
                         f"in {(self.header() or {}).get('phase')}", host)
        systemd_restart(self.fleet, host)
        note.until = time.time()

    def _do_leader_key_delete(self, step: Step) -> None:
        leader = self.leader()
        self.fleet.etcdctl("del", "/norm/leader")
        self.note("leader_key_delete", False, f"the leader key deleted (leader was {leader})", leader or "")

    # -- the end --------------------------------------------------------------------------------------
    def _undo_all(self) -> None:
        if self.pending:  # each fault lasts as long as the schedule says, the last ones too
            self._wait_until(max(due for due, *_ in self.pending))
        self._run_due(everything=True)
        try:
            self.c._bring_back()
            for undo in self.afterwards:
                wait_for(lambda undo=undo: _done(undo), timeout=60, what="an undo etcd refused")
        except (SandboxError, OSError, subprocess.SubprocessError) as e:
            self.errors.append(f"bringing the fleet back failed: {e}"[:400])
        self.ended_faults = time.time()

    def _last_version_write(self) -> tuple[int, str] | None:
        """The version key's last write, as etcd has it: after a quorum loss or a compaction the
        recorder's watch may not have caught up with it yet, and waiting on an older one would end
        the run while the last rollout is still under way."""
        assert self.recorder is not None
        try:
            kvs = updates.get_kvs(self.fleet, updates.VERSION_KEY)
        except SandboxError:
            kvs = []
        writes = [(e.revision, e.value.decode(errors="replace")) for e in self.recorder.events
                  if e.key == "/djed-version" and e.kind == "put"]
        writes += [(kv["mod_revision"], kv["value"].decode(errors="replace")) for kv in kvs]
        return max(writes) if writes else None

    def _converge(self) -> None:
        assert self.recorder is not None
        last = self._last_version_write()
        converged = ""
        if last is not None:
            revision = last[0]
            deadline = time.monotonic() + CONVERGE_TIMEOUT
            while time.monotonic() < deadline:
                h = self.header()
                if (h is not None and int(h.get("revision", 0)) >= revision
                        and h.get("phase") in updates.TERMINAL):
                    break
                time.sleep(0.1)
            h = self.header() or {}
            expected = check.expected_release(h, self._stopped_any(int(h.get("revision", 0))))
            if expected is not None:
                try:
                    self.c.serving(expected[0], timeout=SERVE_TIMEOUT)
                except SandboxError:
                    converged = f"not every host serves {expected[0]} after {SERVE_TIMEOUT:.0f}s"
        for e in self.recorder.events:
            v = e.json() if e.key == "/norm/rollout" and e.kind == "put" else None
            if isinstance(v, dict) and v.get("phase") == "done" and v.get("tag") not in self.done_tags:
                self.done_tags.append(str(v.get("tag")))
        # Late writes (a trim, a report) land in the record too: a marker written after them.
        time.sleep(1.0)
        marker = updates.put(self.fleet, "/chaos/marker", str(self.schedule.seed))
        if not self.recorder.wait_revision(marker, timeout=30):
            self.errors.append(f"the recorder did not read up to revision {marker} within 30s "
                               f"(it has {self.recorder.last_revision}): the history is incomplete")
        self.stop_observing()
        self.obs = self._observations(converged)
        self._save_history()

    def _save_history(self) -> None:
        """The run's etcd history, one event a line, next to the logs (for reading a violation)."""
        assert self.recorder is not None
        path = self.c.run_dir / f"history-{self.schedule.seed}.jsonl"
        with open(path, "w") as f:
            for e in self.recorder.events:
                f.write(json.dumps({"revision": e.revision, "kind": e.kind, "key": e.key,
                                    "value": e.value.decode(errors="replace"), "create": e.create_revision,
                                    "at": round(e.at, 3)}) + "\n")

    def _stopped_any(self, revision: int) -> bool:
        assert self.recorder is not None
        return check.any_stopped(self.recorder.events, revision)

    def _observations(self, converged: str) -> check.Observations:
        assert self.recorder is not None and self.monitor is not None
        finals: dict[str, check.HostFinal] = {}
        for name, h in self.hosts.items():
            mgr = SystemdManager(name, Path(h["systemd_dir"]))
            units = {}
            for unit in app.UNITS:
                try:
                    units[unit] = mgr.unit_property(unit, "ActiveState")
                except (SandboxError, OSError, subprocess.SubprocessError) as e:
                    units[unit] = f"unknown ({e})"[:100]
            try:
                release = (Path(h["dir"]) / app.RELEASE_FILE).read_text()
            except OSError:
                release = ""
            containers = running_containers(h["docker_host"], timeout=5) or []
            finals[name] = check.HostFinal(
                name=name, machine_id=h["machine_id"], release=release, served=self.c.served(name),
                units=units, containers=[(str((c.get("Names") or ["?"])[0]).lstrip("/"),
                                          str(c.get("ImageID"))) for c in containers])
        def log(name: str, offset: int) -> list[dict[str, Any]]:
            return read_log_events(Path(self.hosts[name]["dir"]) / "agent.log", offset,
                                   self.c.skews.get(name, ()))

        logs = {n: log(n, self.log_offsets[n]) for n in self.hosts}
        # Leadership began before the run, maybe: what each agent said of it, from its first line.
        leader_logs = {n: [e for e in log(n, 0)
                           if str(e.get("event", "")).startswith(("leader.", "agent.starting"))]
                       for n in self.hosts}
        raw_logs = {}
        for n, h in self.hosts.items():
            with open(Path(h["dir"]) / "agent.log", "rb") as f:
                f.seek(self.log_offsets[n])
                raw_logs[n] = f.read()
        record_lines = _lines_from(self.c.record_log, self.record_offset)
        began_lines = _lines_from(self.c.began_log, self.began_offset)
        for ev in self.recorder.events:
            if ev.key == "/djed-version" and ev.kind == "put":
                self.c.version_writes.add(ev.revision)
        return check.Observations(
            seed=self.schedule.seed, start_revision=self.start_revision, snapshot=self.snapshot,
            events=list(self.recorder.events), gaps=list(self.recorder.gaps),
            version_writes=set(self.c.version_writes), notes=list(self.notes), logs=logs, raw_logs=raw_logs,
            leader_logs=leader_logs, began=self.t0, ended=time.time(),
            record_lines=record_lines, began_lines=began_lines, samples=list(self.monitor.samples),
            finals=finals, by_machine=dict(self.by_machine), secret=self.c.secret,
            compatible={COMPATIBLE_TAG},
            migrated_before=set(self.c.migrated), image_tags={v: k for k, v in self.c.built.items()},
            digests=dict(self.c.digests),
            frozen=self.frozen, killed=self.killed, lease_ttl=LEASE_TTL, converged=converged,
            ended_faults=self.ended_faults, steps=("migrate", "collectstatic"))
