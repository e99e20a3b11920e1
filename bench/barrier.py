"""make bench-barrier: the pull barrier of a fleet update, with hundreds of agents on one real etcd.

N agents (N = 100, 300, 1000; a fresh single-member etcd for each N) are wired exactly as
`norm agent` wires them (norm.app.agent.Agent.services: registration, leadership, desired-state
watcher, executor, updater; no HTTP endpoint, no healing), each with its own machine id, lease,
metrics and release file, against the real etcd adapter. Only systemd and Docker are fakes that take
time: a pull sleeps a random --pull-ms, a one-off step sleeps --step-ms, units stop and start at once,
and resolving a tag gives a digest of its own. The agents live in a few processes: one process runs
the first agent alone and waits until it leads; the others (--workers) run the rest, all agents of a
process sharing that process's one etcd client (one gRPC channel; every agent has its own lease and
watches on it).

This process plays the operator: it puts the desired version key (/djed-version) through the etcd
adapter and waits, on the rollout header, for the rollout to end DONE; a warm-up rollout, then
--rollouts (or --rollouts-large at the largest N) measured ones, each a fresh tag.

Per rollout:
- barrier_ms: from the last `pulled/<machine-id>` report written to the leader's header write that
  takes the rollout out of the PULL barrier (phase STOP, the phase that follows the barrier in
  norm.core.rollout), as this process's one watch on the header key as a prefix receives both
  writes (time.time() on receipt; this process is otherwise idle while a rollout runs, and etcd
  delivers in revision order, so the difference is the time between the two writes). Also shown on
  stderr by the agents' own clocks: the last pulled report's write returning in its agent's process
  to the leader's STOP transaction returning, taken by a thin subclass of the etcd adapter that only looks
  at what goes by (a busy agent process stamps its write late, which shortens that figure).
- stop barrier (stderr only): the same from the last `stopped/` report to phase MIGRATE.
- etcd ops: the requests etcd itself received while the rollout ran, from the desired put to 0.3 s
  after the DONE header arrived (etcd's /metrics grpc_server_msg_received_total over every method:
  unary calls, lease keep-alives, watch create/cancel messages), less this process's own put, divided
  by N; etcd_ops_per_host is the median rollout's. The leader's own work is in it. Lease keep-alives
  of every agent run all the time and are counted too (the default 10 s lease: one each 3.3 s per
  agent), so a slower rollout costs more of them.

Only the leader may watch a rollout's prefix (the hosts' reports); every other agent watches the
small header. This is checked from the client side: every watch each process opens on the server is
recorded with its key and whether it is a prefix watch, and the bench fails if a process without the
leader opened any prefix watch.

Progress and the figures for every N go to stderr; the last line printed is one JSON object for the
largest N: agents, barrier_p50_ms, barrier_p99_ms, etcd_ops_per_host.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import multiprocessing as mp
import random
import re
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import structlog

from bench.common import percentile
from norm.adapters.docker import RunResult
from norm.adapters.etcd import Etcd, EtcdError, Op, Put, Resync, TxnResult, Watch
from norm.app.agent import Agent
from norm.app.settings import Identity
from norm.core import protocol as proto
from norm.core.config import (
    Config,
    EtcdConfig,
    HealingConfig,
    HostConfig,
    KeysConfig,
    UnitsConfig,
    UpdateConfig,
)
from norm.core.errors import InvalidValue
from norm.core.host import hosts_key, leader_key
from norm.core.record import Phase, Rollout
from norm.core.units import UnitState
from norm.services.base import Service
from sandbox.etcd import EtcdMember

PREFIX = "/norm"
VERSION_KEY = "/djed-version"
IMAGE = "registry.example.com/djed/app"
UNITS = ("djed-api.service", "djed-web.service")
SETTLE = 0.3  # seconds after DONE before the rollout's etcd figures are read
ROLLOUT_TIMEOUT = 180.0
READY_TIMEOUT = 300.0
_REPORT = re.compile(re.escape(PREFIX) + r"/reports/[0-9a-f]{32}/(\d{12})/(pulled|stopped|started)")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# The fakes: just the calls the executor and the updater make, taking time and nothing else


class FakeSystemd:
    """Units stop and start at once, and are active once started."""

    def __init__(self) -> None:
        self._active = dict.fromkeys(UNITS, True)

    def _state(self, name: str) -> UnitState:
        up = self._active[name]
        return UnitState(name, active_state="active" if up else "inactive",
                         sub_state="running" if up else "dead")

    async def units(self, patterns: Sequence[str]) -> list[UnitState]:
        return [self._state(u) for u in UNITS]

    async def unit(self, name: str) -> UnitState:
        return self._state(name)

    async def stop(self, name: str) -> str:
        self._active[name] = False
        return "done"

    async def start(self, name: str) -> str:
        self._active[name] = True
        return "done"

    async def close(self) -> None:
        pass


class FakeDocker:
    """A pull sleeps a random time in `pull` (seconds); a one-off step sleeps `step`; a tag resolves to
    a digest made from it (a fresh tag, a fresh digest)."""

    def __init__(self, rng: random.Random, pull: tuple[float, float], step: float) -> None:
        self._rng = rng
        self._pull = pull
        self._step = step

    async def resolve(self, ref: str) -> str:
        name, _, tag = ref.rpartition(":")
        return f"{name}@sha256:{hashlib.sha256(tag.encode()).hexdigest()}"

    async def pull(self, ref: str, progress: Callable[[object], None] | None = None) -> str:
        await asyncio.sleep(self._rng.uniform(*self._pull))
        return "sha256:" + hashlib.sha256(ref.encode()).hexdigest()

    async def create_named(self, name: str, image: str, command: Sequence[str], **kwargs: Any) -> bool:
        return True

    async def run_named(self, name: str, image: str, command: Sequence[str], **kwargs: Any) -> RunResult:
        await asyncio.sleep(self._step)
        return RunResult(exit_code=0, logs="", seconds=self._step)

    async def remove_container(self, name: str) -> bool:
        return True

    async def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------------
# The real etcd adapter, watched as it is used


class CountingWatch(Watch):
    async def _open(self) -> None:
        etcd = self._etcd
        assert isinstance(etcd, CountingEtcd)
        etcd.by_kind["watch"] += 1
        await super()._open()
        etcd.watches[(self.key, self.prefix)] += 1  # created on the server
        async with etcd.opened:
            etcd.opened.notify_all()


class CountingEtcd(Etcd):
    """The adapter unchanged, noting what goes by: requests by kind, the watches opened on the server,
    when each host's report write returned, and when a header of each phase was written."""

    def __init__(self, config: EtcdConfig) -> None:
        super().__init__(config)
        self.by_kind: Counter[str] = Counter()
        self.watches: Counter[tuple[str, bool]] = Counter()  # (key, prefix) -> watches opened
        self.opened = asyncio.Condition()
        self.reports: dict[tuple[int, str], list[float]] = {}  # (rollout, kind) -> [count, last, first]
        self.phases: dict[tuple[int, str], float] = {}  # (rollout, phase) -> first header write returned

    async def _call(self, what: str, fn: Any, *, retry: bool) -> Any:
        self.by_kind[what.split(" ", 1)[0]] += 1
        return await super()._call(what, fn, retry=retry)

    def watch(self, key: str, *, prefix: bool = False, range_end: str | None = None,
              start_revision: int | None = None) -> Watch:
        return CountingWatch(self, key, prefix=prefix, range_end=range_end, start_revision=start_revision)

    def _note_report(self, key: str, t: float) -> None:
        m = _REPORT.fullmatch(key)
        if m is not None:
            seen = self.reports.setdefault((int(m[1]), m[2]), [0, 0.0, t])
            seen[0] += 1
            seen[1] = max(seen[1], t)

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        revision = await super().put(key, value, lease=lease)
        self._note_report(key, time.time())
        return revision

    async def txn(self, compare: Sequence[Any], success: Sequence[Op],
                  failure: Sequence[Op] = ()) -> TxnResult:
        result = await super().txn(compare, success, failure)
        t = time.time()
        if result.succeeded:
            for op in success:
                if not isinstance(op, Put):
                    continue
                if op.key == proto.header_key(PREFIX):
                    with contextlib.suppress(InvalidValue):
                        h = proto.Header.decode(op.value, op.key)
                        self.phases.setdefault((h.revision, h.phase.value), t)
                else:
                    self._note_report(op.key, t)
        return result


# ---------------------------------------------------------------------------------------------------
# A process of agents


@dataclass(frozen=True)
class HostSpec:
    machine_id: str
    name: str


@dataclass(frozen=True)
class ChildSpec:
    label: str
    endpoint: str
    hosts: tuple[HostSpec, ...]
    rundir: str
    log_file: str
    pull: tuple[float, float]
    step: float
    lead: bool  # this process's first agent must win leadership before it says ready
    seed: int


@dataclass
class ChildReport:
    by_kind: dict[str, int]
    watches: dict[tuple[str, bool], int]
    reports: dict[tuple[int, str], list[float]]
    phases: dict[tuple[int, str], float]
    leaders: int
    registered: int
    lag_ms: float  # the process's event loop: the longest it was late waking a 50 ms timer since asked


def config_for(spec: ChildSpec, host: HostSpec) -> Config:
    return Config(
        etcd=EtcdConfig(endpoints=(spec.endpoint,)),
        keys=KeysConfig(version=VERSION_KEY, prefix=PREFIX),
        host=HostConfig(machine_id=host.machine_id, name=host.name, environment="prod", role="web"),
        units=UnitsConfig(patterns=("djed-*.service",)),
        healing=HealingConfig(enabled=False),
        update=UpdateConfig(image=IMAGE, release_file=f"{spec.rundir}/{host.machine_id}/release.env"),
    )


def child_main(conn: Connection, spec: ChildSpec) -> None:
    handler = logging.FileHandler(spec.log_file)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(name)s: %(message)s")
    log_out = open(spec.log_file, "a", buffering=1)  # noqa: SIM115 - the process's lifetime
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.format_exc_info, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO if spec.lead else logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(log_out),
        cache_logger_on_first_use=True)
    try:
        asyncio.run(_child(conn, spec))
    finally:
        conn.close()


async def _child(conn: Connection, spec: ChildSpec) -> None:
    etcd = CountingEtcd(EtcdConfig(endpoints=(spec.endpoint,)))
    await etcd.check(PREFIX + "/")
    rng = random.Random(spec.seed)
    stopping = asyncio.Event()
    agents: list[Agent] = []
    for host in spec.hosts:
        agent = Agent(config_for(spec, host), Identity(host.machine_id, host.name))
        agent._systemd = FakeSystemd()  # type: ignore[assignment]
        agent._docker = FakeDocker(rng, spec.pull, spec.step)  # type: ignore[assignment]
        agents.append(agent)

    async def run_agent(agent: Agent) -> None:
        structlog.contextvars.bind_contextvars(host=agent.identity.name)
        services = [s for s in agent.services(etcd) if s.name != "http"]  # no port for each agent
        async with asyncio.TaskGroup() as tg:
            for svc in services:
                tg.create_task(run_service(svc), name=f"{agent.identity.name}-{svc.name}")

    async def run_service(svc: Service) -> None:
        await svc.run(stopping)
        if not stopping.is_set():
            raise RuntimeError(f"service {svc.name} returned while the agents ran")

    lag = [0.0]

    async def lag_meter() -> None:
        loop = asyncio.get_running_loop()
        while not stopping.is_set():
            t = loop.time()
            await asyncio.sleep(0.05)
            lag[0] = max(lag[0], loop.time() - t - 0.05)

    def report() -> ChildReport:
        worst, lag[0] = lag[0], 0.0
        return ChildReport(lag_ms=worst * 1000,
            by_kind=dict(etcd.by_kind), watches=dict(etcd.watches), reports=dict(etcd.reports),
            phases=dict(etcd.phases), leaders=sum(a.leadership.is_leader() for a in agents),
            registered=sum(a.registration.registered.is_set() for a in agents))

    async def control() -> None:
        first = agents[0]
        if spec.lead:
            await first.registration.registered.wait()
            await first.leadership.elected.wait()
        for a in agents:
            await a.registration.registered.wait()
            assert a.executor is not None
            await a.executor.primed.wait()
        # And every agent's watches open: the operator's keys and the header, plus the leader key for
        # those campaigning, or the hosts' prefix for the leader.
        keys = agents[0].config.keys
        want = {(keys.version, False), (keys.environment, False), (proto.header_key(PREFIX), False),
                (hosts_key(PREFIX), True) if spec.lead else (leader_key(PREFIX), False)}
        async with etcd.opened:
            await etcd.opened.wait_for(lambda: all(etcd.watches[w] >= len(agents) for w in want))
        conn.send(("ready", report()))
        while True:
            msg = await asyncio.to_thread(conn.recv)
            if msg == "report":
                conn.send(("report", report()))
            elif msg == "stop":
                stopping.set()
                return

    try:
        async with asyncio.TaskGroup() as tg:
            for agent in agents:
                tg.create_task(run_agent(agent), name=f"agent-{agent.identity.name}")
            tg.create_task(control(), name="control")
            tg.create_task(lag_meter(), name="lag-meter")
    finally:
        await etcd.close()
    conn.send(("stopped", report()))


# ---------------------------------------------------------------------------------------------------
# The operator's side


class Child:
    def __init__(self, ctx: Any, spec: ChildSpec) -> None:
        self.spec = spec
        self.conn, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=child_main, args=(theirs, spec), name=spec.label, daemon=True)
        self.proc.start()
        theirs.close()

    def recv(self, kind: str, timeout: float) -> ChildReport:
        if not self.conn.poll(timeout):
            raise RuntimeError(f"{self.spec.label}: no {kind} within {timeout:g} s\n{self.tail()}")
        try:
            got, payload = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"{self.spec.label} exited (code {self.proc.exitcode})\n"
                               f"{self.tail()}") from None
        if got != kind:
            raise RuntimeError(f"{self.spec.label}: {got} instead of {kind}")
        assert isinstance(payload, ChildReport)
        return payload

    def ask(self) -> ChildReport:
        self.conn.send("report")
        return self.recv("report", 30)

    def stop(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            self.conn.send("stop")
            self.recv("stopped", 15)
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(Path(self.spec.log_file).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


SENT_BYTES = "(bytes sent)"


def etcd_messages(member: EtcdMember) -> Counter[str]:
    """Requests etcd received, by gRPC method: one per unary call, one per streamed message (a lease
    keep-alive, a watch create or cancel); and under SENT_BYTES, the bytes it sent to clients."""
    with urllib.request.urlopen(f"{member.endpoint}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: Counter[str] = Counter()
    for line in text.splitlines():
        if line.startswith("grpc_server_msg_received_total{"):
            method = re.search(r'grpc_method="([^"]+)"', line)
            if method:
                out[method[1]] += int(float(line.rsplit(" ", 1)[1]))
        elif line.startswith("etcd_network_client_grpc_sent_bytes_total"):
            out[SENT_BYTES] += int(float(line.rsplit(" ", 1)[1]))
    return out


@dataclass
class Measured:
    """One rollout's figures."""

    revision: int
    barrier_ms: float  # last pulled report to the STOP header, as the operator's watch received them
    stop_barrier_ms: float  # last stopped report to the MIGRATE header, the same way
    client_barrier_ms: float  # last pulled report returned to the STOP header's transaction returned
    seconds: float  # desired put to the DONE header received
    etcd_ops: int  # what etcd received in the window, less the operator's own requests
    by_method: Counter[str]
    sent_bytes: int  # what etcd sent its clients in the window


@dataclass
class Figures:
    agents: int
    rollouts: list[Measured]
    worker_ops_per_host: float  # client side, non-leader agents, per rollout
    leader_process_ops: float  # client side, the leader's process, per rollout
    worker_by_kind: dict[str, float]

    @property
    def barrier(self) -> list[float]:
        return [r.barrier_ms for r in self.rollouts]

    @property
    def ops_per_host(self) -> float:
        return statistics.median(r.etcd_ops for r in self.rollouts) / self.agents


@dataclass
class Seen:
    """One rollout as the operator's watch saw it, each item stamped with time.time() on receipt."""

    phases: dict[str, float] = field(default_factory=dict)  # phase -> its first header
    pulled: int = 0
    pulled_first: float = 0.0
    pulled_last: float = 0.0
    stopped: int = 0
    stopped_last: float = 0.0


class Observer:
    """The operator's one watch, on the range of the hosts' reports, the header and the rollouts' keys
    (`<prefix>/reports/...`, `<prefix>/rollout`, `<prefix>/rollouts/...`). This process does nothing else
    while a rollout runs, so the moments it receives two writes differ by the time etcd took between
    them (delivery comes in revision order, at the same small delay for both)."""

    def __init__(self) -> None:
        self.header: proto.Header | None = None
        self.changed = asyncio.Event()
        self.seen: dict[int, Seen] = {}

    async def follow(self, etcd: Etcd) -> None:
        key = proto.header_key(PREFIX)
        start, end = proto.progress_range(PREFIX)
        async with etcd.watch(start, range_end=end) as w:
            async for item in w:
                t = time.time()
                if isinstance(item, Resync):
                    for kv in item.snapshot.kvs:
                        if kv.key == key:
                            self._header(kv.value, t)
                elif item.kind == "put":
                    if item.kv.key == key:
                        self._header(item.kv.value, t)
                    elif (m := _REPORT.fullmatch(item.kv.key)) is not None:
                        self._report(int(m[1]), m[2], t)

    def _header(self, raw: bytes, t: float) -> None:
        h = proto.Header.decode(raw, proto.header_key(PREFIX))
        self.seen.setdefault(h.revision, Seen()).phases.setdefault(h.phase.value, t)
        self.header = h
        self.changed.set()

    def _report(self, revision: int, kind: str, t: float) -> None:
        seen = self.seen.setdefault(revision, Seen())
        if kind == "pulled":
            seen.pulled_first = seen.pulled_first or t
            seen.pulled += 1
            seen.pulled_last = t
        elif kind == "stopped":
            seen.stopped += 1
            seen.stopped_last = t

    async def ended(self, revision: int) -> proto.Header:
        while True:
            h = self.header
            if h is not None and h.revision == revision and h.terminal:
                return h
            self.changed.clear()
            await self.changed.wait()


def merged(reports: Sequence[ChildReport]) -> tuple[dict[tuple[int, str], list[float]],
                                                     dict[tuple[int, str], float]]:
    out: dict[tuple[int, str], list[float]] = {}
    phases: dict[tuple[int, str], float] = {}
    for r in reports:
        for k, (count, last, first) in r.reports.items():
            mine = out.setdefault(k, [0, 0.0, first])
            mine[0] += count
            mine[1] = max(mine[1], last)
            mine[2] = min(mine[2], first)
        phases.update(r.phases)
    return out, phases


def kind_delta(after: Sequence[ChildReport], before: Sequence[ChildReport]) -> Counter[str]:
    total: Counter[str] = Counter()
    for a in after:
        total.update(a.by_kind)
    for b in before:
        total.subtract(b.by_kind)
    return total


async def drive(member: EtcdMember, children: list[Child], n: int, warmup: int,
                measured: int) -> list[Measured]:
    out: list[Measured] = []
    async with Etcd(EtcdConfig(endpoints=(member.endpoint,))) as etcd:
        observer = Observer()
        follower = asyncio.create_task(observer.follow(etcd), name="operator-watch")
        try:
            for i in range(warmup + measured):
                tag = f"n{n}-r{i:02d}-{secrets.token_hex(3)}"
                for c in children:
                    await asyncio.to_thread(c.ask)  # the loops' lag is measured from here
                before = await asyncio.to_thread(etcd_messages, member)
                mine = etcd.requests
                t0 = time.time()
                revision = await etcd.put(VERSION_KEY, tag.encode())
                try:
                    async with asyncio.timeout(ROLLOUT_TIMEOUT):
                        h = await observer.ended(revision)
                except TimeoutError:
                    raise RuntimeError(f"rollout {revision} of {tag} did not end in {ROLLOUT_TIMEOUT:g} s; "
                                       f"header: {observer.header}") from None
                if h.phase is not Phase.DONE or h.hosts_count != n:
                    why: Counter[str] = Counter()
                    with contextlib.suppress(EtcdError, InvalidValue):
                        kv = await etcd.get(proto.record_key(PREFIX, revision))
                        if kv is not None:
                            why.update(e.reason for e in Rollout.decode(kv.value, kv.key).excluded)
                    raise RuntimeError(f"rollout {revision} ended {h.phase.value} with {h.hosts_count} "
                                       f"hosts (of {n}): {h.reason}; hosts excluded: {dict(why)} (an "
                                       "overloaded machine can starve the agents' lease renewals)")
                await asyncio.sleep(SETTLE)
                after = await asyncio.to_thread(etcd_messages, member)
                ops = after.copy()
                ops.subtract(before)
                sent = ops.pop(SENT_BYTES, 0)
                own = etcd.requests - mine
                seen = observer.seen[revision]
                answers = [await asyncio.to_thread(c.ask) for c in children]
                reports, phases = merged(answers)
                pulled = reports.get((revision, "pulled"), [0, 0.0, 0.0])
                stopped = reports.get((revision, "stopped"), [0, 0.0, 0.0])
                if not (pulled[0] == stopped[0] == seen.pulled == seen.stopped == n):
                    raise RuntimeError(f"rollout {revision}: {pulled[0]} pulled and {stopped[0]} stopped "
                                       f"reports written, {seen.pulled} and {seen.stopped} seen (of {n})")
                r = Measured(
                    revision=revision,
                    barrier_ms=(seen.phases["stop"] - seen.pulled_last) * 1000,
                    stop_barrier_ms=(seen.phases["migrate"] - seen.stopped_last) * 1000,
                    client_barrier_ms=(phases[revision, "stop"] - pulled[1]) * 1000,
                    seconds=seen.phases["done"] - t0,
                    etcd_ops=sum(ops.values()) - own,
                    by_method=+ops, sent_bytes=sent)
                label = "warm-up" if i < warmup else f"{i - warmup + 1}/{measured}"
                say(f"  N={n} rollout {label} (rev {revision}): barrier {r.barrier_ms:.1f} ms (client clocks "
                    f"{r.client_barrier_ms:.1f} ms), stop barrier {r.stop_barrier_ms:.1f} ms, pulls spread "
                    f"{(seen.pulled_last - seen.pulled_first) * 1000:.0f} ms, put->DONE {r.seconds:.2f} s, "
                    f"etcd ops {r.etcd_ops} ({r.etcd_ops / n:.2f}/host), etcd sent {sent / n / 1024:.1f} "
                    f"KiB/host; loop lag max: leader {answers[0].lag_ms:.0f} ms, agents "
                    f"{max(a.lag_ms for a in answers[1:]):.0f} ms")
                if i >= warmup:
                    out.append(r)
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
    return out


def run_n(n: int, args: argparse.Namespace, workdir: Path, measured: int) -> Figures:
    ctx = mp.get_context("spawn")
    member = EtcdMember(f"etcd{n}", workdir / f"etcd{n}")
    member.start()
    children: list[Child] = []
    rundir = Path(tempfile.mkdtemp(prefix=f"norm-bench-barrier-{n}-", dir="/dev/shm"))
    try:
        hosts = [HostSpec(secrets.token_hex(16), f"host-{i:04d}") for i in range(n)]
        pull = (args.pull_ms[0] / 1000, args.pull_ms[1] / 1000)

        def spec(label: str, part: Sequence[HostSpec], lead: bool, seed: int) -> ChildSpec:
            return ChildSpec(label, member.endpoint, tuple(part), str(rundir), str(workdir / f"{label}.log"),
                             pull, args.step_ms / 1000, lead, seed)

        t0 = time.monotonic()
        leader = Child(ctx, spec(f"n{n}-leader", hosts[:1], True, 0))
        children.append(leader)
        leader.recv("ready", READY_TIMEOUT)
        rest = hosts[1:]
        k = max(1, min(args.workers, len(rest)))
        workers = [Child(ctx, spec(f"n{n}-worker{j}", rest[j::k], False, j + 1)) for j in range(k)]
        children += workers
        ready = [w.recv("ready", READY_TIMEOUT) for w in workers]
        say(f"N={n}: {n} agents ready in {time.monotonic() - t0:.1f} s (leader + {k} processes of "
            f"~{len(rest) // k} agents)")
        if sum(r.leaders for r in ready) != 0:
            raise RuntimeError("an agent outside the leader's process leads")

        before = [c.ask() for c in children]
        rollouts = asyncio.run(drive(member, children, n, args.warmup, measured))
        after = [c.ask() for c in children]
        total = args.warmup + measured
        # Every rollout counted (warm-up too) for the client-side averages.
        w_kinds = kind_delta(after[1:], before[1:])
        l_kinds = kind_delta(after[:1], before[:1])
        figures = Figures(
            agents=n, rollouts=rollouts,
            worker_ops_per_host=sum(w_kinds.values()) / total / (n - 1) if n > 1 else 0.0,
            leader_process_ops=sum(l_kinds.values()) / total,
            worker_by_kind={k: v / total / max(1, n - 1) for k, v in sorted(w_kinds.items()) if v})

        # Only the leader watches prefixes (the hosts and the rollout's reports).
        stray = {key: count for r in after[1:] for (key, prefix), count in r.watches.items() if prefix}
        if after[0].leaders != 1:
            raise RuntimeError("the leader's process lost leadership during the run")
        if stray:
            raise RuntimeError(f"agents other than the leader opened prefix watches: {stray}")
        worker_keys = sorted({key for r in after[1:] for (key, _) in r.watches})
        leader_prefixes = sorted({key for (key, prefix) in after[0].watches if prefix})
        say(f"N={n}: prefix watches: none outside the leader's process (the other {n - 1} agents watch "
            f"only {', '.join(worker_keys)}); the leader's process watched {len(leader_prefixes)} prefixes "
            f"({', '.join(leader_prefixes[:3])}{', ...' if len(leader_prefixes) > 3 else ''})")
        return figures
    except BaseException:
        for c in children:
            if c.spec.lead or not c.proc.is_alive() or c.proc.exitcode:
                say(f"--- {c.spec.label} log tail ---\n{c.tail()}")
        raise
    finally:
        for c in children:
            c.stop()
        member.stop()
        shutil.rmtree(rundir, ignore_errors=True)


def show(f: Figures) -> None:
    b = f.barrier
    stop = [r.stop_barrier_ms for r in f.rollouts]
    methods: Counter[str] = Counter()
    for r in f.rollouts:
        methods.update(r.by_method)
    per_method = ", ".join(f"{m} {v / len(f.rollouts) / f.agents:.2f}" for m, v in methods.most_common())
    client = [r.client_barrier_ms for r in f.rollouts]
    say(f"N={f.agents}: barrier p50 {statistics.median(b):.1f} ms, p99 {percentile(b, 99):.1f} ms, max "
        f"{max(b):.1f} ms over {len(b)} rollouts (by the agents' own clocks: p50 "
        f"{statistics.median(client):.1f} ms, p99 {percentile(client, 99):.1f} ms); stop barrier p50 "
        f"{statistics.median(stop):.1f} ms, p99 {percentile(stop, 99):.1f} ms; rollout put->DONE p50 "
        f"{statistics.median(r.seconds for r in f.rollouts):.2f} s")
    say(f"N={f.agents}: etcd ops per host and rollout {f.ops_per_host:.2f} (etcd's own count, median "
        f"rollout, leader included); by method per host: {per_method}")
    say(f"N={f.agents}: client side per rollout: {f.worker_ops_per_host:.2f} requests per non-leader agent "
        f"({', '.join(f'{k} {v:.2f}' for k, v in f.worker_by_kind.items())}); the leader's process "
        f"{f.leader_process_ops:.0f}")
    say(json.dumps({"agents": f.agents, "barrier_p50_ms": round(statistics.median(b), 1),
                    "barrier_p99_ms": round(percentile(b, 99), 1),
                    "etcd_ops_per_host": round(f.ops_per_host, 2)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, nargs="+", default=[100, 300, 1000])
    ap.add_argument("--rollouts", type=int, default=5, help="measured rollouts for each N but the largest")
    ap.add_argument("--rollouts-large", type=int, default=20, help="measured rollouts at the largest N")
    ap.add_argument("--warmup", type=int, default=1, help="rollouts first, not measured")
    ap.add_argument("--workers", type=int, default=4, help="processes for the agents other than the leader")
    ap.add_argument("--pull-ms", type=float, nargs=2, default=[100.0, 600.0], metavar=("MIN", "MAX"),
                    help="a fake pull sleeps a uniformly random time in this range")
    ap.add_argument("--step-ms", type=float, default=50.0, help="a fake one-off step sleeps this long")
    ap.add_argument("--logs", type=Path, metavar="DIR",
                    help="keep the agent processes' and etcd's logs here (default: a temporary directory)")
    args = ap.parse_args()
    sizes = sorted(args.agents)
    if sizes[0] < 2:
        ap.error("--agents: at least 2")

    t0 = time.monotonic()
    results: list[Figures] = []
    with contextlib.ExitStack() as stack:
        if args.logs is not None:
            args.logs.mkdir(parents=True, exist_ok=True)
            workdir = args.logs
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="norm-bench-barrier-")))
        for n in sizes:
            measured = args.rollouts_large if n == sizes[-1] else args.rollouts
            say(f"N={n}: starting {n} agents, then {args.warmup} warm-up and {measured} measured rollouts")
            results.append(run_n(n, args, workdir, measured))
            show(results[-1])
    say(f"total {time.monotonic() - t0:.0f} s")
    f = results[-1]
    b = f.barrier
    print(json.dumps({"agents": f.agents, "barrier_p50_ms": round(statistics.median(b), 1),
                      "barrier_p99_ms": round(percentile(b, 99), 1),
                      "etcd_ops_per_host": round(f.ops_per_host, 2)}))


if __name__ == "__main__":
    main()
