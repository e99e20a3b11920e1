"""The executor: what one host does in a fleet update, read from the rollout header it watches.

Its duties (norm.core.protocol.host_duties): pull the image by digest and report it; hold and stop
the application units and report it; run a one-off step when this host is the migrator (in a named
container that a restarted agent adopts, so the step runs once: made before the step is claimed,
in a transaction fenced on the header that asks for it, and started only once claimed; a claimed
step whose container is gone, or that its engine killed, is reported with an unknown outcome, never
run again); write the release file atomically and start the units, then report. A host outside the
rollout (joined late, excluded, or down during it) catches up on the fleet's release once the
rollout has ended.

With load-balancer presence on (norm.services.presence), stopping the units begins with taking the
host out of its target groups and waiting for it to drain; after the start, presence puts it back
once the web unit answers its health URL.

etcd costs per host and rollout: one transaction reading the participant list and this host's own
reports, then one transaction per report (written only against the header it answers, and deleting
this host's reports of older rollouts). Only the small header is watched.
"""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from norm.adapters.docker import (
    ContainerGone,
    Docker,
    DockerError,
    DockerRejected,
    RunTimeout,
)
from norm.adapters.etcd import Compare, Delete, EtcdError, Get, KeyValue, Put, Resync
from norm.adapters.files import read_file, write_atomic
from norm.adapters.systemd import Systemd, SystemdError
from norm.core import protocol as proto
from norm.core.backoff import Backoff
from norm.core.config import UpdateConfig, step_name
from norm.core.envfile import secret_values
from norm.core.errors import InvalidValue, Temporary
from norm.core.gate import Migrations, declared_migrations
from norm.core.record import Gate, Phase, Release, Rollout
from norm.core.secret import redact
from norm.services.base import Retry, first_of, pause
from norm.services.context import HostContext
from norm.services.holds import OPERATOR

log = structlog.get_logger("norm.executor")

HOLD_OWNER = "update"


class StopStartHooks(Protocol):
    """What else must happen around the units' stop and start (load-balancer presence)."""

    async def before_stop(self) -> None:
        """Before the units are stopped; returns once it is safe to stop them (bounded)."""

    async def after_start(self) -> None:
        """After the units were started (whether or not they came up)."""

    async def wait_serving(self, within: float) -> bool:
        """Whether the host is back in the load balancer within `within` seconds."""


class Gatekeeper(Protocol):
    """The health gate (norm.services.gate): whether the units started on a release serve."""

    async def passed(self, units: tuple[str, ...], gate: Gate) -> tuple[bool, str | None]:
        """Wait for the units to pass `gate` (bounded by its healthy deadline): (passed, why not)."""


@dataclass(frozen=True)
class Hooks:
    """What else takes part in an update's stop and start: load-balancer presence (none: no load
    balancer), and the health gate a start must pass before it is reported (none: active is
    enough)."""

    presence: StopStartHooks | None = None
    gate: Gatekeeper | None = None


# A step's run as the executor reports it: its outcome, exit code, the reason it did not end well, and
# how long it ran.
_StepRun = tuple[proto.StepOutcome, int | None, str | None, float]


class Executor:
    name = "executor"

    def __init__(self, host: HostContext, systemd: Systemd, docker: Docker, update: UpdateConfig,
                 set_release: Callable[[str | None], Awaitable[None]], *, leading: Callable[[], bool],
                 hooks: Hooks | None = None, secret_files: tuple[str, ...] = ()) -> None:
        """`set_release`: shows the release this host runs (in its host record); `leading`: whether
        this agent leads (the updater then shows the rollout's phase); `hooks`: the load balancer's
        presence and the health gate; `secret_files`: files whose values a failed step's output must
        not show."""
        assert update.image is not None
        self._etcd = host.etcd
        self._prefix = host.prefix
        self._me = host.machine_id
        self._systemd = systemd
        self._docker = docker
        self._holds = host.holds
        self._metrics = host.metrics
        self._update = update
        self._image: str = update.image
        self._patterns = host.units
        self._set_release = set_release
        self._leading = leading
        self._presence = hooks.presence if hooks is not None else None
        self._gate = hooks.gate if hooks is not None else None
        # Files whose values a failed step's output must not show (the host's environment file); the
        # steps' own environment file is one of them.
        self._secret_files = tuple(dict.fromkeys((*secret_files, *filter(None, (update.steps_env_file,)))))
        self._steps = {step_name(c): c for c in update.steps}
        self.header: proto.Header | None = None
        self._header_mod = 0  # the header's mod revision: reports are written only against it
        self.running: Release | None = None
        self._rev: int | None = None  # the rollout whose participants and reports are loaded
        self._participant = False
        self._reported: set[str] = set()  # but "started", which is for one release:
        self._started_for: str | None = None  # the digest this host's start report is for
        self._units: tuple[str, ...] = ()
        self._catching_up = False
        # The units were stopped by an update, and no update has started them since: they stay held
        # (a rollout superseded after its stop leaves them to the next one, never to the healer,
        # which would start the release the steps may have moved past).
        self._stopped = False
        self.behind = False  # outside the rollout, on a release older than the migrated one
        self._gave_up: set[tuple[int, str]] = set()  # (rollout, release digest) a catch-up cannot pull
        self._wake = asyncio.Event()
        self.primed = asyncio.Event()  # prime() done: the healer may start

    # -- start-up ------------------------------------------------------------------------------------
    async def prime(self) -> None:
        """Before healing starts: what runs here, where the fleet's rollout stands, and the holds an
        update in progress has on this host's units (so that a restarted agent does not 'heal' units
        its update stopped)."""
        raw = await read_file(self._update.release_file)
        self.running = None if raw is None else proto.parse_release(raw)
        await self._set_release(proto.release_text(self.running))
        self._metrics.show_release(self.running)
        self._units = tuple(u.name for u in await self._systemd.units(self._patterns))
        kv = await self._etcd.get(proto.header_key(self._prefix))
        self._take_header(kv)
        await self._load_rollout()
        self._apply_holds()
        log.info("executor.primed", running=proto.release_text(self.running),
                 rollout=None if self.header is None else self.header.revision,
                 phase=None if self.header is None else self.header.phase.value)

    # -- the service ---------------------------------------------------------------------------------
    async def run(self, stopping: asyncio.Event) -> None:
        retry = Retry(Backoff(first=0.2, cap=5.0))
        while not self.primed.is_set():
            try:
                await self.prime()
                self.primed.set()
            except (EtcdError, SystemdError, OSError) as e:
                delay = retry.next_delay()
                log.warning("executor.prime_failed", error=str(e), retry_in=round(delay, 2))
                if await pause(delay, stopping):
                    return
        await first_of(stopping=stopping.wait(), header=self._watch_header(), work=self._work(stopping))

    async def _watch_header(self) -> None:
        async with self._etcd.watch(proto.header_key(self._prefix)) as w:
            async for item in w:
                if isinstance(item, Resync):
                    self._take_header(item.snapshot.kvs[0] if item.snapshot.kvs else None, resync=True)
                elif item.kind == "put":
                    self._take_header(item.kv)
                self._wake.set()

    def _take_header(self, kv: KeyValue | None, resync: bool = False) -> None:
        if kv is None:
            self.header, self._header_mod = None, 0
            return
        if kv.mod_revision < self._header_mod and not resync:
            return  # older than one a refused report already read
        self._header_mod = kv.mod_revision
        try:
            header = proto.Header.decode(kv.value, proto.header_key(self._prefix))
        except InvalidValue as e:
            self._metrics.rejected_values.labels(e.where).inc()
            log.error("executor.header_refused", reason=e.reason)
            return
        self.header = header
        if not self._leading():
            self._metrics.show_phase(header.phase)

    async def _work(self, stopping: asyncio.Event) -> None:
        retry = Retry(Backoff(first=0.5, cap=15.0))
        while True:
            self._wake.clear()
            try:
                await self._load_rollout()
                duties = self._duties()
                self._apply_holds()
                await self._out_while_behind()
                if not duties:
                    await self._wake.wait()
                    continue
                for duty in duties:
                    await self._do(duty)
                retry.reset()
            except (EtcdError, SystemdError, DockerError, OSError) as e:
                delay = retry.next_delay()
                log.warning("executor.retry", error=str(e), retry_in=round(delay, 2))
                await pause(delay, self._wake, stopping)

    def _duties(self) -> tuple[proto.Duty, ...]:
        # Against the header as it is now: it may have changed while the rollout was loaded (an agent
        # thawed reads several in a row), and a host excluded meanwhile has no duty in it.
        participant = self._participant and (self.header is None or self._me not in self.header.excluded)
        duties = proto.host_duties(self.header, self._me, participant, self._reported_now(),
                                   self.running, stopped=self._stopped)
        rev = None if self.header is None else self.header.revision

        def pending(d: proto.Duty) -> bool:
            if isinstance(d, proto.CatchUp):
                return (rev, d.release.digest) not in self._gave_up
            if isinstance(d, proto.Migrate):
                return f"migrated:{d.step}" not in self._reported
            return True

        return tuple(d for d in duties if pending(d))

    async def _load_rollout(self) -> None:
        """On a new rollout (once its participant list exists): whether this host takes part, and what
        it reported already (after a restart). One transaction."""
        h = self.header
        if h is None or h.revision == self._rev or h.phase is Phase.RESOLVE or h.terminal:
            if h is not None and h.revision == self._rev:
                self._participant = self._participant and self._me not in h.excluded
            elif h is not None:  # a rollout not (yet) needing them
                self._participant, self._reported, self._started_for = False, set(), None
            return
        p, rev, me = self._prefix, h.revision, self._me
        kinds = ("pulled", "stopped", "started")
        # This host's reports of the rollout, from its own range; and, in the same read, those its
        # agent of the previous version may have written before an upgrade (the previous layout):
        # a step it ran then is not run again.
        result = await self._etcd.txn([], [
            Get(proto.hosts_list_key(p, rev)),
            Get(proto.rollout_reports_prefix(p, rev, me), prefix=True),
            *(Get(proto.legacy_report_key(p, rev, k, me)) for k in kinds),
            Get(f"{proto.rollout_prefix(p, rev)}migrated/", prefix=True)])
        hosts_kv, mine, *legacy = result.gets
        hosts = self._participants_in(hosts_kv[0]) if hosts_kv else []
        self._participant = me in hosts and me not in h.excluded
        reported: set[str] = set()
        self._started_for = None
        for kv in (*mine, *(kv for kvs in legacy for kv in kvs)):
            kind, name = self._own_report(h, kv)
            if kind == "migrated":
                reported.add(f"migrated:{name}")
            elif kind == "started":
                self._started_for = self._started_digest(h, kv.key, kv.value)
            elif kind in kinds:
                reported.add(kind)
        self._reported = reported
        self._rev = rev

    def _reported_now(self) -> frozenset[str]:
        """The report kinds this host wrote for the rollout, `started` only if it was for the header's
        target (a rollback's target is another release: the host starts again)."""
        target = None if self.header is None else self.header.target
        started = target is not None and self._started_for == target.digest
        return frozenset(self._reported | {"started"}) if started else frozenset(self._reported)

    def _own_report(self, h: proto.Header, kv: KeyValue) -> tuple[str, str]:
        """The kind and name (the step, for migrated) of a report this host wrote, read back by key."""
        mine = proto.rollout_reports_prefix(self._prefix, h.revision, self._me)
        if kv.key.startswith(mine):
            kind, _, name = kv.key.removeprefix(mine).partition("/")
            return kind, name
        kind, _, name = kv.key.removeprefix(proto.rollout_prefix(self._prefix, h.revision)).partition("/")
        return kind, name  # the previous layout

    def _participants_in(self, kv: KeyValue) -> list[str]:
        """The rollout's participant list; an unreadable one is refused (counted), and names none."""
        try:
            return list(proto.decode_hosts(kv.value, kv.key))
        except InvalidValue:
            self._metrics.rejected_values.labels("rollout hosts").inc()
            log.error("executor.hosts_refused", key=kv.key, reason="not a list of machine ids")
            return []

    def _started_digest(self, h: proto.Header, key: str, value: bytes) -> str | None:
        """The release digest of this host's start report (read back after a restart, or written)."""
        try:
            report = proto.parse_report(self._prefix, h.revision, key, value)
        except InvalidValue:
            return None
        digest = None if report is None else report.value.get("digest")
        return digest if isinstance(digest, str) else None

    def _apply_holds(self) -> None:
        held = self._catching_up or self._stopped or proto.holds_units(
            self.header, self._participant, self._reported_now(), self._me)
        for unit in self._units:
            if held:
                self._holds.hold(unit, HOLD_OWNER)
        if not held:
            self._holds.unhold_all(HOLD_OWNER)

    async def _out_while_behind(self) -> None:
        """Out of the load balancer while this host, outside the rollout, runs an older release than
        the one whose steps are running or ran (its units keep running: it catches up once the
        rollout has ended, and the catch-up's start puts it back); back in when that is no longer so
        (a rollback, a newer rollout that takes it in)."""
        behind = proto.behind_migration(self.header, self._participant, self.running)
        if behind == self.behind:
            return
        self.behind = behind
        h = self.header
        if behind:
            log.warning("executor.behind_migration", running=proto.release_text(self.running),
                        migrated=None if h is None else proto.release_text(h.release),
                        load_balancer="leaving" if self._presence is not None else "none configured")
            if self._presence is not None:
                await self._presence.before_stop()
        else:
            log.info("executor.no_longer_behind", running=proto.release_text(self.running))
            if self._presence is not None:
                await self._presence.after_start()

    # -- duties --------------------------------------------------------------------------------------
    async def _do(self, duty: proto.Duty) -> None:
        h = self.header
        assert h is not None
        bound = structlog.contextvars.bound_contextvars(rollout=h.revision)
        with bound:
            match duty:
                case proto.Pull(digest=digest):
                    await self._until_moved(h, self._pull(h, digest))
                case proto.Stop():
                    await self._stop_units()
                    await self._report(h, "stopped", proto.stopped())
                case proto.Migrate(step=step, digest=digest):
                    await self._until_moved(h, self._migrate(h, step, digest))
                case proto.Start(release=release, gate=gate):
                    if not self._stopped and self.running != release:
                        # Units this agent did not stop (it restarted since, or never got to its
                        # stop) run another release: a start alone would leave them on it.
                        log.warning("executor.stopping_before_start", release=proto.release_text(release),
                                    running=proto.release_text(self.running))
                        await self._stop_units()
                    ok, reason = await self._start_gated(release, h.revision, gate)
                    await self._report(h, "started", proto.started(release.digest, ok, reason))
                case proto.Move(release=release, gate=gate):
                    await self._until_moved(h, self._move(h, release, gate), move=True)
                case proto.CatchUp(release=release):
                    await self._catch_up(h, release)

    async def _until_moved(self, h: proto.Header, work: Coroutine[Any, Any, None], *,
                           move: bool = False) -> None:
        """Run `work` until done, or until the header leaves `h`'s rollout and phase; with `move`
        (this host's turn in a batch), also once it no longer asks this host to move to the same
        release (a rollback began). The work loop then reads what the header asks now."""
        async def moved() -> None:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._moved_on(h, self.header, move):
                    self._wake.set()  # the work loop must look again
                    return

        await first_of(work=work, moved=moved())

    def _moved_on(self, h: proto.Header, now: proto.Header | None, move: bool) -> bool:
        if now is None or now.revision != h.revision:
            return True
        if move and now.terminal:
            return False  # halted mid-batch: the move finishes, its units not left stopped
        if now.phase is not h.phase:
            return True
        return move and (now.target != h.target or self._me not in now.batch)

    async def _report(self, h: proto.Header, kind: str, value: bytes, name: str | None = None,
                      final: bool = True) -> bool:
        """Write a report while the header is still the one this host acted on (one transaction),
        or, if it changed, still shows the same rollout and phase. Nothing is written once the
        rollout has moved on without this host: False. `final`: the duty is done."""
        p, header_key = self._prefix, proto.header_key(self._prefix)
        key = proto.report_key(p, h.revision, kind, self._me) if name is None else \
            proto.migrated_key(p, h.revision, self._me, name)
        # With it, this host's reports of older rollouts go: each host keeps its own range trimmed.
        start, end = proto.older_reports(p, h.revision, self._me)
        while True:
            result = await self._etcd.txn([Compare(header_key, "mod", "==", self._header_mod)],
                                          [Put(key, value), Delete(start, range_end=end)], [Get(header_key)])
            if result.succeeded:
                break
            self._take_header(result.gets[0][0] if result.gets and result.gets[0] else None)
            self._wake.set()
            now = self.header
            if now is None or now.revision != h.revision or now.phase is not h.phase:
                log.info("executor.report_dropped", kind=kind, name=name, reason="the rollout moved on")
                return False
        if final and kind == "started":
            self._started_for = self._started_digest(h, key, value)
        elif final:
            self._reported.add(kind if name is None else f"{kind}:{name}")
        log.info("executor.reported", kind=kind, name=name)
        return True

    async def _pull(self, h: proto.Header, digest: str) -> None:
        ref = f"{self._image}@{digest}"
        loop = asyncio.get_running_loop()
        started = loop.time()
        retry = Retry(Backoff(first=0.5, cap=10.0))
        told = False
        while True:
            try:
                await self._docker.pull(ref)
                break
            except DockerRejected as e:
                log.error("executor.pull_refused", image=ref, error=str(e))
                await self._report(h, "pulled", proto.pulled_error(str(e), permanent=True))
                return
            except Temporary as e:
                if not told:  # the leader shows the reason; one report is enough
                    await self._report(h, "pulled", proto.pulled_error(str(e), permanent=False), final=False)
                    told = True
                delay = retry.next_delay()
                log.warning("executor.pull_retry", image=ref, error=str(e), retry_in=round(delay, 2))
                await pause(delay)
        self._metrics.pull_seconds.observe(loop.time() - started)
        await self._report(h, "pulled", proto.pulled_ok(digest, await self._migrations_of(ref)))

    async def _migrations_of(self, ref: str) -> Migrations | None:
        """What the image pulled declares of its migrations (its label), for the leader to choose the
        rollout's strategy; None when it does not say, or says something not understood."""
        try:
            labels = (await self._docker.inspect_image(ref)).labels
        except DockerError as e:
            log.warning("executor.labels_unread", image=ref, error=str(e))
            return None
        declared = declared_migrations(labels)
        if declared.problem is not None:
            log.warning("executor.migrations_label_refused", image=ref, reason=declared.problem)
        return declared.kind

    async def _stop_units(self) -> None:
        self._units = tuple(u.name for u in await self._systemd.units(self._patterns))
        self._stopped = True
        for unit in self._units:
            self._holds.hold(unit, HOLD_OWNER)
        if self._presence is not None and not self.behind:
            # Out of the load balancer and drained before anything stops serving (a host behind the
            # migration is out already).
            await self._presence.before_stop()
        await asyncio.gather(*(self._systemd.stop(u) for u in self._units))
        log.info("executor.units_stopped", units=list(self._units))

    async def _move(self, h: proto.Header, release: Release, gate: Gate) -> None:
        """This host's turn in a rolling batch: out of the load balancer and drained, units stopped,
        started on `release`, the gate passed, back in the load balancer; then the report."""
        log.info("executor.moving", release=proto.release_text(release), batch=h.batch_index + 1,
                 batches=h.batches)
        await self._stop_units()
        ok, reason = await self._start_gated(release, h.revision, gate, rejoin=False)
        if ok and self._presence is not None:
            await self._presence.after_start()
            if not await self._presence.wait_serving(gate.healthy_deadline):
                ok, reason = False, "not back in the load balancer within the healthy deadline"
        log.info("executor.moved", release=proto.release_text(release), ok=ok, reason=reason)
        await self._report(h, "started", proto.started(release.digest, ok, reason))

    async def _start_gated(self, release: Release, revision: int, gate: Gate, *,
                           rejoin: bool = True) -> tuple[bool, str | None]:
        """Start the units on `release` (`_switch_to`), then wait for them to pass the gate: whether
        they did, and what the report says (the units an operator holds, or why the gate failed)."""
        ok, notes = await self._switch_to(release, revision, rejoin=rejoin)
        if not ok or self._gate is None:
            return ok, notes
        held = {u for u in self._units if OPERATOR in self._holds.owners(u)}
        passed, why = await self._gate.passed(tuple(u for u in self._units if u not in held), gate)
        return (True, notes) if passed else (False, why)

    async def _switch_to(self, release: Release, revision: int, *,
                         rejoin: bool = True) -> tuple[bool, str | None]:
        """Write the release file, start every unit, and say whether all are active. A unit an
        operator holds (`norm units stop`) is left stopped: the operator's stop wins over the update,
        and the unit runs the new release once the operator starts it again. `rejoin`: presence puts
        the host back in the load balancer once healthy (else the caller does, after its gate)."""
        if not self._holds.operator_known.is_set():
            # A restarted agent: the operator's holds are not read yet, and a unit started now would
            # undo one. The control service reads them as soon as etcd answers.
            log.info("executor.awaiting_operator_holds")
            await self._holds.operator_known.wait()
        await write_atomic(self._update.release_file, proto.render_release(release, self._image, revision))
        self.running = release
        self._metrics.show_release(release)
        await self._set_release(proto.release_text(release))
        self._units = tuple(u.name for u in await self._systemd.units(self._patterns))
        held = [u for u in self._units if OPERATOR in self._holds.owners(u)]
        starting = [u for u in self._units if u not in held]
        if held:
            log.warning("executor.units_held_by_operator", units=held, release=proto.release_text(release))
        results = await asyncio.gather(*(self._systemd.start(u) for u in starting), return_exceptions=True)
        if self._presence is not None and rejoin:
            await self._presence.after_start()  # back in the load balancer once healthy
        failed: list[str] = []
        for unit, result in zip(starting, results, strict=True):
            if isinstance(result, SystemdError):
                failed.append(f"{unit}: {result}")
            elif isinstance(result, BaseException):
                raise result
            else:
                state = await self._systemd.unit(unit)
                if state.active_state != "active":
                    failed.append(f"{unit}: {state.active_state}/{state.sub_state}")
        self._stopped = False
        log.info("executor.units_started", release=proto.release_text(release), failed=failed)
        notes = failed + [f"{unit}: held by the operator, left stopped" for unit in held]
        return not failed, "; ".join(notes) or None

    async def _migrate(self, h: proto.Header, step: str, digest: str) -> None:
        """Run the step once: its container is made (not started) before the step is claimed, and
        started only by the claim's holder, so that once claimed, a container missing is one that
        vanished (its outcome unknown), never one not made yet. A claimed step is only ever adopted."""
        p, rev = self._prefix, h.revision
        claim = proto.claim_key(p, rev, step)
        command, timeout = await self._step_of(rev, step)
        name = proto.migration_container(rev, step)
        image = f"{self._image}@{digest}"
        mounts = [(src, dst) for src, _, dst in (m.partition(":") for m in self._update.steps_mounts)]
        # A claim made by this host's agent of the previous version, before an upgrade, is in the
        # previous layout: it holds the step as well.
        held = await self._etcd.txn([], [Get(claim), Get(proto.legacy_report_key(p, rev, "claim", step))])
        holder = next((kvs[0] for kvs in held.gets if kvs), None)
        if holder is None:
            if command is None:
                await self._report(h, "migrated", proto.migrated(False, None, "the step is not configured on "
                                                               "its migrator", 0.0, self._me), name=step)
                return
            try:
                made = await self._docker.create_named(
                    name, image, shlex.split(command), env_file=self._update.steps_env_file,
                    network=self._update.steps_network, mounts=mounts)
            except DockerRejected as e:  # refused before anything ran
                self._metrics.migrations.labels("failed").inc()
                await self._report(h, "migrated", proto.migrated(False, None, str(e), 0.0, self._me),
                                   name=step)
                return
            if not await self._claim(h, claim, step):
                if made:  # never started: only the claim's holder starts it
                    await self._docker.remove_container(name)
                return
        elif holder.value != proto.claim(self._me):
            log.error("executor.step_claimed_elsewhere", step=step)
            self._reported.add(f"migrated:{step}")
            return
        log.info("executor.step_running", step=step, container=name, claimed_before=holder is not None)
        outcome, code, reason, seconds = await self._run_step(step, name, image, command, mounts, timeout)
        self._metrics.migrations.labels(outcome).inc()
        await self._report(h, "migrated", proto.migrated(outcome == "ok", code, reason, seconds, self._me,
                                                       unknown=outcome == "unknown"), name=step)
        if outcome != "unknown":  # an unknown outcome's container is left for the operator to look at
            await self._docker.remove_container(name)

    async def _step_of(self, revision: int, step: str) -> tuple[str | None, float]:
        """The step's command and timeout, as the rollout's record keeps the fleet's policy from its
        beginning (a record written before rollouts kept it: this host's [update] section)."""
        kv = await self._etcd.get(proto.record_key(self._prefix, revision))
        policy = None
        if kv is not None:
            try:
                policy = Rollout.decode(kv.value, kv.key).policy
            except InvalidValue as e:
                self._metrics.rejected_values.labels("rollout record").inc()
                log.error("executor.record_refused", key=e.where, reason=e.reason)
        if policy is None:
            return self._steps.get(step), self._update.migration_timeout
        return next((s.command for s in policy.steps if s.name == step), None), policy.migration_timeout

    async def _run_step(self, step: str, name: str, image: str, command: str | None,
                        mounts: list[tuple[str, str]], limit: float) -> _StepRun:
        """Start the claimed step's container (adopt it, after a restart) and wait for it: its outcome,
        exit code, the reason it did not end well, and how long it ran."""
        outcome: proto.StepOutcome
        try:
            run = await self._docker.run_named(
                name, image, shlex.split(command or "true"), env_file=self._update.steps_env_file,
                network=self._update.steps_network, mounts=mounts, timeout=limit,
                adopt_only=True)
            code, seconds = run.exit_code, run.seconds
            outcome = proto.step_outcome(run.exit_code, killed_by_norm=False)
            reason = None if outcome == "ok" else f"exit code {run.exit_code}"
            if outcome == "unknown":
                reason = f"exit code {run.exit_code}: killed by a signal Norm did not send"
            if outcome == "ok":
                log.info("executor.step_done", step=step, seconds=round(run.seconds, 3))
            else:
                log.error("executor.step_failed", step=step, exit_code=run.exit_code, outcome=outcome,
                          logs=(await self._redacted(run.logs))[-2000:])
        except ContainerGone as e:
            outcome, code, reason, seconds = "unknown", None, str(e), 0.0
            log.error("executor.step_lost", step=step, error=str(e))
        except RunTimeout:
            outcome, code, seconds = "failed", None, 0.0
            reason = f"killed after {limit:g} s"
        except DockerRejected as e:  # refused while adopting: the step may have run
            outcome, code, reason, seconds = "unknown", None, str(e), 0.0
        return outcome, code, reason, seconds

    async def _claim(self, h: proto.Header, claim: str, step: str) -> bool:
        """Claim the step, in a transaction fenced on the header that asks this host to run it (as a
        report is): a host acting on a stale header claims nothing. True: the step is this host's."""
        header_key = proto.header_key(self._prefix)
        legacy = proto.legacy_report_key(self._prefix, h.revision, "claim", step)
        while True:
            result = await self._etcd.txn([Compare(header_key, "mod", "==", self._header_mod),
                                           Compare(claim, "version", "==", 0),
                                           Compare(legacy, "version", "==", 0)],
                                          [Put(claim, proto.claim(self._me))],
                                          [Get(claim), Get(header_key), Get(legacy)])
            if result.succeeded:
                return True
            claims = (result.gets[0], result.gets[2]) if len(result.gets) > 2 else ()
            holder = next((kvs[0].value for kvs in claims if kvs), None)
            if holder is not None:
                if holder == proto.claim(self._me):
                    return True  # a reply lost: the claim applied
                log.error("executor.step_claimed_elsewhere", step=step)
                self._reported.add(f"migrated:{step}")
                return False
            self._take_header(result.gets[1][0] if len(result.gets) > 1 and result.gets[1] else None)
            self._wake.set()
            now = self.header
            if (now is None or now.revision != h.revision or now.phase is not Phase.MIGRATE
                    or now.migrating != step or now.migrator != self._me):
                log.info("executor.claim_dropped", step=step, reason="the rollout moved on")
                return False

    async def _redacted(self, output: str) -> str:
        """A step's output without any value of the environment files it may have seen (or nothing of
        it, if one of them cannot be read)."""
        found: set[str] = set()
        for path in self._secret_files:
            try:
                raw = await read_file(path)
            except OSError as e:
                log.warning("executor.step_output_withheld", file=path, error=str(e))
                return f"(output withheld: {path} could not be read to redact it)"
            if raw:
                found |= secret_values(raw)
        return redact(output, found)

    async def _catch_up(self, h: proto.Header, release: Release) -> None:
        log.info("executor.catching_up", release=proto.release_text(release))
        try:
            if release != self.running:  # the release in the file has its image here already
                await self._docker.pull(f"{self._image}@{release.digest}")
        except DockerRejected as e:
            log.error("executor.catch_up_refused", error=str(e))
            self._gave_up.add((h.revision, release.digest))
            return
        self._catching_up = True
        try:
            await self._stop_units()
            ok, reason = await self._switch_to(release, h.revision)
        finally:
            self._catching_up = False
            self._apply_holds()
        log.info("executor.caught_up", release=proto.release_text(release), ok=ok, reason=reason)
