"""The fleet update as a state machine: pure, table-driven, over a rollout record that lives in etcd.

A rollout starts when the desired version key changes and is named by that key's mod revision. The
leader drives it; every participating host acts on it. Phases, in order:

    RESOLVE  the leader resolves the tag to a digest, once; a bad tag fails the rollout, nothing touched
    PULL     every participating host pulls by digest and reports it; a barrier with a deadline
    STOP     every host holds and stops the application units (the cut-over)
    MIGRATE  the leader alone runs the one-off steps (migrations, static files), each once per digest
    START    every host writes its release and starts the units
    DONE     every host reported active

and the other terminal phases FAILED (with a reason), SUPERSEDED (a newer version came before the
cut-over) and HALTED (an operator must decide). A failed step, or a STOP that does not complete,
rolls back: phase START with the old release and `outcome` FAILED already decided.

`TRANSITIONS` is the whole machine, h11 style: (phase, event type) -> rule. A pair that is not in the
table raises `IllegalTransition`; events that legitimately arrive late (a duplicate report, a stale
timer, a host report after the barrier counted it) have explicit rules that change nothing.

The shell's loop is: `record, commands = step(record, event, now, policy)`; write the record (a
transaction fenced on leadership); then carry out the commands. Writing first is what makes a
migration run at most once across leaders: a record in MIGRATE with `migrating` set, found by a new
leader (event `Resumed`), means the step was issued and may be running on its migrator's engine. It
is never issued again: the new leader waits for its report (the migrator's agent adopts the step's
container and reports how it ended) until the deadline written when it was issued, and past that
deadline the rollout halts.

A step whose outcome cannot be known (its container vanished before its result was recorded, it was
killed by its engine going away, or a restarted agent found nothing to adopt) is reported as such
(event `MigrationUnknown`): the rollout halts naming the step. It is neither run again nor taken for
a failure, which would start the old release over a migration that may have partly applied.

The ledger of every step ever run lives in keys of its own (one per run, never trimmed), which the
shell reads whenever it begins a rollout: `ledger_summary` makes of it what a record carries.

`now` is the leader's wall clock, kept for display only (started_at, updated_at, ended_at, a host's or
a ledger entry's `at`): nothing is decided on it, since leaders' wall clocks disagree, and step. A
barrier's deadline is a duration (`Deadline`), which the leader times on its own monotonic clock from
when the barrier begins, and again in full when a leader resumes the record.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from norm.core import values
from norm.core.config import UpdateConfig, step_name
from norm.core.desired import is_tag, parse_version
from norm.core.errors import InvalidValue, NormError
from norm.core.host import HostRecord


class Phase(enum.StrEnum):
    RESOLVE = "resolve"
    PULL = "pull"
    STOP = "stop"
    MIGRATE = "migrate"
    START = "start"
    DONE = "done"
    FAILED = "failed"
    SUPERSEDED = "superseded"
    HALTED = "halted"


TERMINAL = frozenset({Phase.DONE, Phase.FAILED, Phase.SUPERSEDED, Phase.HALTED})
BEFORE_CUTOVER = frozenset({Phase.RESOLVE, Phase.PULL})  # nothing stopped yet: may be superseded


class HostStatus(enum.StrEnum):
    PENDING = "pending"  # asked to pull
    PULLED = "pulled"  # has the image by `digest`
    STOPPED = "stopped"  # units stopped; awaiting the start report
    ACTIVE = "active"
    FAILED = "failed"  # units did not start


class IllegalTransition(NormError):
    """An event that the rollout's phase does not allow: a bug or a confused peer. Nothing changed."""

    def __init__(self, phase: Phase, event: Event, reason: str = "") -> None:
        super().__init__(f"rollout in phase {phase.value}: {type(event).__name__} not allowed"
                         + (f" ({reason})" if reason else ""))
        self.phase = phase
        self.event = event


# ---------------------------------------------------------------------------------------------------
# Policy (from config; not part of the record)


@dataclass(frozen=True)
class RolloutPolicy:
    pull_timeout: float = 600.0  # seconds for the PULL barrier
    stop_timeout: float = 120.0
    start_timeout: float = 300.0
    on_trouble: Literal["exclude", "abort"] = "exclude"  # hosts lost, failing or slow before cut-over
    steps: tuple[str, ...] = ("migrate", "collectstatic")  # one-off commands, in order
    compatible: frozenset[str] = frozenset()  # tags or digests safe to set back to without migrating
    migration_timeout: float = 1800.0  # seconds one step may run; its result is awaited this long
    # and `stop_timeout` more (the migrator's agent may be restarting and adopting the container)

    def __post_init__(self) -> None:
        if not (self.pull_timeout > 0 and self.stop_timeout > 0 and self.start_timeout > 0
                and self.migration_timeout > 0):
            raise ValueError("rollout timeouts must be more than 0")
        if self.on_trouble not in ("exclude", "abort"):
            raise ValueError("on_trouble is 'exclude' or 'abort'")
        if len(set(self.steps)) != len(self.steps) or not all(self.steps):
            raise ValueError("migration steps must be distinct, non-empty names")


# ---------------------------------------------------------------------------------------------------
# The record


@dataclass(frozen=True)
class Release:
    tag: str
    digest: str


@dataclass(frozen=True)
class HostProgress:
    host: str
    status: HostStatus = HostStatus.PENDING
    digest: str | None = None  # what the host reported pulling; kept once set
    reason: str | None = None  # last trouble reported
    at: float = 0.0  # when the status last changed


@dataclass(frozen=True)
class Excluded:
    host: str
    reason: str
    phase: Phase


@dataclass(frozen=True)
class LedgerEntry:
    """One run of one step for one image. Carried from record to record: the ledger is what makes a
    step run once per digest, and what tells a setback from a new version."""

    digest: str
    tag: str
    step: str
    ok: bool
    revision: int
    at: float
    unknown: bool = False  # not ok, and whether it ran (wholly, in part, at all) cannot be known


@dataclass(frozen=True)
class Deadline:
    """How long the current barrier may last, and which barrier it is. A duration, never a time of
    day: the leader arms it on its monotonic clock when the barrier begins, and a leader that resumes
    the record arms it again, in full."""

    barrier: str  # "pull", "stop", "migrate:<step>", "start" or "rollback": unique within a rollout
    seconds: float


@dataclass(frozen=True)
class Pending:
    """A newer desired version waiting for this rollout to finish (it had cut over)."""

    tag: str
    revision: int


@dataclass(frozen=True)
class Rollout:
    revision: int  # mod revision of the desired version key: the rollout's identity
    tag: str
    hosts: tuple[str, ...]  # participating machine ids, sorted
    phase: Phase
    started_at: float
    updated_at: float
    previous: Release | None = None  # what ran before: the rollback target
    digest: str | None = None  # resolved once, in RESOLVE
    progress: tuple[HostProgress, ...] = ()  # one per participating host, same order as `hosts`
    excluded: tuple[Excluded, ...] = ()
    deadline: Deadline | None = None  # the current barrier's
    steps: tuple[str, ...] = ()  # steps this rollout must run, fixed when resolved
    migrating: str | None = None  # step issued and not yet reported
    migrator: str | None = None  # the host running it: the leader that issued it (set by the shell)
    ledger: tuple[LedgerEntry, ...] = ()
    rollback: bool = False  # START is restarting `previous`
    outcome: Phase | None = None  # decided outcome (terminal phase), also during a rollback
    reason: str | None = None
    newer: Pending | None = None
    abort_by: str | None = None  # abort asked while a step ran
    ended_at: float | None = None

    @property
    def release(self) -> Release | None:
        return None if self.digest is None else Release(self.tag, self.digest)

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL

    def host(self, machine_id: str) -> HostProgress | None:
        for p in self.progress:
            if p.host == machine_id:
                return p
        return None

    def encode(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes, where: str) -> Rollout:
        try:
            data = json.loads(raw)
            record = _decode_rollout(_obj(data))
            _check_consistent(record)
            _check_values(record)
            return record
        except (ValueError, TypeError, KeyError, RecursionError) as e:
            raise InvalidValue(where, f"not a rollout record ({type(e).__name__}: {_safe(e)})") from None


# ---------------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True)
class Resolved:
    digest: str


@dataclass(frozen=True)
class ResolveFailed:
    reason: str


@dataclass(frozen=True)
class HostPulled:
    host: str
    digest: str


@dataclass(frozen=True)
class HostPullFailed:
    host: str
    reason: str
    permanent: bool  # False: the host keeps trying until the deadline


@dataclass(frozen=True)
class HostLost:
    host: str  # its lease is gone


@dataclass(frozen=True)
class BarrierDeadline:
    """The timer armed by ArmDeadline fired, for `barrier` of rollout `revision`. A stale one (of an
    earlier barrier or rollout) changes nothing."""

    revision: int
    barrier: str


@dataclass(frozen=True)
class HostStopped:
    host: str


@dataclass(frozen=True)
class MigrationSucceeded:
    step: str


@dataclass(frozen=True)
class MigrationFailed:
    step: str
    reason: str


@dataclass(frozen=True)
class MigrationUnknown:
    """The step's outcome cannot be known: its container vanished before its result was recorded, or
    was killed by its engine going away, or a restarted migrator found nothing to adopt."""

    step: str
    reason: str


@dataclass(frozen=True)
class HostActive:
    host: str


@dataclass(frozen=True)
class HostFailed:
    host: str
    reason: str


@dataclass(frozen=True)
class NewerVersion:
    tag: str
    revision: int


@dataclass(frozen=True)
class Abort:
    by: str


@dataclass(frozen=True)
class Resumed:
    """A (new) leader picked the record up from etcd: re-issue what is outstanding."""


Event = (Resolved | ResolveFailed | HostPulled | HostPullFailed | HostLost | BarrierDeadline | HostStopped
         | MigrationSucceeded | MigrationFailed | MigrationUnknown | HostActive | HostFailed | NewerVersion
         | Abort | Resumed)
EVENT_TYPES: tuple[type[Event], ...] = (
    Resolved, ResolveFailed, HostPulled, HostPullFailed, HostLost, BarrierDeadline, HostStopped,
    MigrationSucceeded, MigrationFailed, MigrationUnknown, HostActive, HostFailed, NewerVersion, Abort,
    Resumed)


# ---------------------------------------------------------------------------------------------------
# Commands: the leader's shell carries them out after writing the record


@dataclass(frozen=True)
class ResolveTag:
    tag: str


@dataclass(frozen=True)
class PullOnHosts:
    hosts: tuple[str, ...]
    digest: str


@dataclass(frozen=True)
class StopOnHosts:
    hosts: tuple[str, ...]


@dataclass(frozen=True)
class RunMigration:
    step: str
    image_digest: str


@dataclass(frozen=True)
class StartOnHosts:
    hosts: tuple[str, ...]
    release: Release


@dataclass(frozen=True)
class RestartOldRelease:
    hosts: tuple[str, ...]
    release: Release


@dataclass(frozen=True)
class ArmDeadline:
    """Deliver BarrierDeadline for `deadline.barrier` `deadline.seconds` from now, timed on the leader's
    monotonic clock (replaces any earlier timer)."""

    deadline: Deadline


@dataclass(frozen=True)
class HostsExcluded:
    hosts: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class RecordOutcome:
    revision: int
    phase: Phase
    reason: str | None


@dataclass(frozen=True)
class BeginRollout:
    """Start the rollout of a newer desired version (call start_rollout)."""

    tag: str
    revision: int


Command = (ResolveTag | PullOnHosts | StopOnHosts | RunMigration | StartOnHosts | RestartOldRelease
           | ArmDeadline | HostsExcluded | RecordOutcome | BeginRollout)

Result = tuple[Rollout, tuple[Command, ...]]


# ---------------------------------------------------------------------------------------------------
# Helpers




def participants(hosts: Iterable[HostRecord], environment: str,
                 roles: frozenset[str] | None = None) -> tuple[str, ...]:
    """Machine ids of the hosts that take part: same environment, and a listed role (any if None)."""
    return tuple(sorted({h.machine_id for h in hosts
                         if h.environment == environment and (roles is None or h.role in roles)}))


def barrier_state(record: Rollout) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(pulled, pending, lost) of the PULL barrier: participants with the rollout's digest, the other
    participants, and hosts excluded along the way."""
    pulled = tuple(p.host for p in record.progress
                   if p.digest is not None and p.digest == record.digest)
    done = frozenset(pulled)  # a set: this runs on every report, with a thousand hosts
    pending = tuple(h for h in record.hosts if h not in done)
    return pulled, pending, tuple(e.host for e in record.excluded)


def migrator_for(record: Rollout, leader: str) -> str:
    """The host to run the record's steps: the leader when its engine has the rollout's image (it
    pulled it), else the first participant that did. A leader whose own host was left out of the pull
    (its engine slow or away) would run the steps in an image its engine does not have."""
    pulled, _, _ = barrier_state(record)
    if leader in pulled or not pulled:
        return leader
    excluded = frozenset(e.host for e in record.excluded)
    return next((h for h in pulled if h not in excluded), pulled[0])


def is_setback(ledger: Iterable[LedgerEntry], digest: str) -> bool:
    """Whether `digest` ran its steps before some other image successfully ran its own: going back to
    it would need a down-migration."""
    seen = False
    for entry in ledger:
        if entry.digest == digest:
            seen = seen or entry.ok
        elif entry.ok and seen:
            return True
    return False


def steps_done(ledger: Iterable[LedgerEntry], digest: str) -> frozenset[str]:
    return frozenset(e.step for e in ledger if e.digest == digest and e.ok)


def steps_unknown(ledger: Iterable[LedgerEntry], digest: str) -> tuple[str, ...]:
    """Steps of `digest` whose last run has an unknown outcome (and none succeeded since): running
    them again could run them twice; an operator checks and records how they ended."""
    last: dict[str, LedgerEntry] = {}
    for e in ledger:
        if e.digest == digest and (e.ok or e.unknown):
            last[e.step] = e
    return tuple(step for step, e in last.items() if e.unknown)


def ledger_order(entries: Iterable[LedgerEntry]) -> tuple[LedgerEntry, ...]:
    """Ledger entries in the order they were run (by rollout, then time), each run once: the same
    run found twice (in its key and in a record) counts once, its key's copy first."""
    seen: set[tuple[int, str]] = set()
    out: list[LedgerEntry] = []
    for e in entries:
        if (e.revision, e.step) not in seen:
            seen.add((e.revision, e.step))
            out.append(e)
    return tuple(sorted(out, key=lambda e: (e.revision, e.at, e.step)))


def ledger_summary(ledger: Iterable[LedgerEntry]) -> tuple[LedgerEntry, ...]:
    """What a rollout record carries of the whole ledger (`ledger_order`ed): for every digest and
    step, its first and last successful runs, and every run of unknown outcome, in order.
    `is_setback`, `steps_done` and `steps_unknown` say the same of it as of the whole ledger, for
    every digest; it grows with the steps of the digests deployed, not with the runs."""
    entries = tuple(ledger)
    keep: set[int] = set()
    first: set[tuple[str, str]] = set()
    last: dict[tuple[str, str], int] = {}
    for i, e in enumerate(entries):
        if e.unknown:
            keep.add(i)
        if not e.ok:
            continue
        if (e.digest, e.step) not in first:
            first.add((e.digest, e.step))
            keep.add(i)
        last[e.digest, e.step] = i
    keep.update(last.values())
    return tuple(e for i, e in enumerate(entries) if i in keep)


def duty(record: Rollout, machine_id: str) -> PullOnHosts | StopOnHosts | StartOnHosts | \
        RestartOldRelease | None:
    """What one participating host must do now, read from the record it watches (None: nothing)."""
    p = record.host(machine_id)
    if p is None or record.terminal:
        return None
    if record.phase is Phase.PULL and record.digest is not None and p.status is HostStatus.PENDING:
        return PullOnHosts((machine_id,), record.digest)
    if record.phase is Phase.STOP and p.status is HostStatus.PULLED:
        return StopOnHosts((machine_id,))
    if record.phase is Phase.START and p.status is HostStatus.STOPPED:
        if record.rollback and record.previous is not None:
            return RestartOldRelease((machine_id,), record.previous)
        if not record.rollback and record.release is not None:
            return StartOnHosts((machine_id,), record.release)
    return None


def start_rollout(revision: int, tag: str, hosts: Iterable[str], now: float,
                  previous: Release | None = None, ledger: tuple[LedgerEntry, ...] = ()) -> Result:
    """A new rollout for the desired `tag` written at `revision`. `ledger`: every step ever run, from
    the ledger's own keys (`ledger_summary` of them will do)."""
    record = Rollout(revision=revision, tag=tag, hosts=tuple(sorted(set(hosts))), phase=Phase.RESOLVE,
                     started_at=now, updated_at=now, previous=previous, ledger=ledger)
    try:
        parse_version(tag.encode("utf-8", "replace"), "desired version")
    except InvalidValue as e:  # the refused value is not stored (see refused_rollout)
        return _finish(dataclasses.replace(record, tag=""), Phase.FAILED, e.reason, now)
    if not record.hosts:
        return _finish(record, Phase.FAILED, "no participating host", now)
    return record, (ResolveTag(tag),)


def refused_rollout(revision: int, reason: str, now: float, previous: Release | None = None,
                    ledger: tuple[LedgerEntry, ...] = ()) -> Result:
    """The record of a desired value that was refused (never stored: it may be hostile): failed at
    once, nothing touched."""
    record = Rollout(revision=revision, tag="", hosts=(), phase=Phase.RESOLVE, started_at=now,
                     updated_at=now, previous=previous, ledger=ledger)
    return _finish(record, Phase.FAILED, f"the desired version was refused: {reason}", now)


# ---------------------------------------------------------------------------------------------------
# Transition rules


def _r(record: Rollout, now: float, **changes: Any) -> Rollout:
    return dataclasses.replace(record, updated_at=now, **changes)


def _deadline(phase: Phase, policy: RolloutPolicy, step: str | None = None,
              rollback: bool = False) -> Deadline:
    """The deadline of the barrier a phase (a step, a rollback) begins."""
    if phase is Phase.PULL:
        return Deadline("pull", policy.pull_timeout)
    if phase is Phase.STOP:
        return Deadline("stop", policy.stop_timeout)
    if phase is Phase.MIGRATE:
        # The step's result is awaited for its timeout and the stop timeout more (see RolloutPolicy).
        return Deadline(f"migrate:{step}", policy.migration_timeout + policy.stop_timeout)
    return Deadline("rollback" if rollback else "start", policy.start_timeout)


def _set_host(record: Rollout, host: str, now: float, **changes: Any) -> Rollout:
    progress = tuple(dataclasses.replace(p, at=now, **changes) if p.host == host else p
                     for p in record.progress)
    return _r(record, now, progress=progress)


def _finish(record: Rollout, phase: Phase, reason: str | None, now: float) -> Result:
    record = _r(record, now, phase=phase, outcome=phase, reason=reason, deadline=None, migrating=None,
                ended_at=now)
    commands: tuple[Command, ...] = (RecordOutcome(record.revision, phase, reason),)
    if record.newer is not None:
        commands += (BeginRollout(record.newer.tag, record.newer.revision),)
    return record, commands


def _participant(record: Rollout, event: Event, host: str) -> HostProgress | None:
    """The host's progress; None for an excluded host (whose reports are late); raises for a stranger."""
    p = record.host(host)
    if p is None and not any(e.host == host for e in record.excluded):
        raise IllegalTransition(record.phase, event, "not a participating host")
    return p


def _exclude(record: Rollout, hosts: tuple[str, ...], reason: str, now: float) -> Rollout:
    return _r(record, now, hosts=tuple(h for h in record.hosts if h not in hosts),
              progress=tuple(p for p in record.progress if p.host not in hosts),
              excluded=record.excluded + tuple(Excluded(h, reason, record.phase) for h in hosts))


def _trouble(record: Rollout, hosts: tuple[str, ...], reason: str, now: float,
             policy: RolloutPolicy) -> Result:
    """Hosts lost, failing or slow before the cut-over: drop them or fail, per policy."""
    if policy.on_trouble == "abort":
        return _finish(record, Phase.FAILED, f"{reason}: {', '.join(hosts)}", now)
    record = _exclude(record, hosts, reason, now)
    excluded: tuple[Command, ...] = (HostsExcluded(hosts, reason),)
    if not record.hosts:
        record, commands = _finish(record, Phase.FAILED, "no participating host left", now)
        return record, excluded + commands
    if record.phase is Phase.PULL:
        record, commands = _check_pulled(record, now, policy)
        return record, excluded + commands
    return record, excluded


def _check_pulled(record: Rollout, now: float, policy: RolloutPolicy) -> Result:
    _, pending, _ = barrier_state(record)
    if pending:
        return record, ()
    deadline = _deadline(Phase.STOP, policy)
    return (_r(record, now, phase=Phase.STOP, deadline=deadline),
            (StopOnHosts(record.hosts), ArmDeadline(deadline)))


def _check_stopped(record: Rollout, now: float, policy: RolloutPolicy) -> Result:
    if any(p.status is not HostStatus.STOPPED for p in record.progress):
        return record, ()
    return _next_step(_r(record, now, deadline=None), now, policy)


def _next_step(record: Rollout, now: float, policy: RolloutPolicy) -> Result:
    assert record.digest is not None
    done = steps_done(record.ledger, record.digest)
    todo = [s for s in record.steps if s not in done]
    if todo:
        deadline = _deadline(Phase.MIGRATE, policy, todo[0])
        return (_r(record, now, phase=Phase.MIGRATE, migrating=todo[0], migrator=None, deadline=deadline),
                (RunMigration(todo[0], record.digest), ArmDeadline(deadline)))
    deadline = _deadline(Phase.START, policy)
    release = record.release
    assert release is not None
    return (_r(record, now, phase=Phase.START, migrating=None, deadline=deadline),
            (StartOnHosts(record.hosts, release), ArmDeadline(deadline)))


def _rollback(record: Rollout, reason: str, now: float, policy: RolloutPolicy) -> Result:
    """After the cut-over and before the new release starts: restart the old release, outcome FAILED."""
    previous = record.previous
    if previous is None:
        return _finish(record, Phase.FAILED, f"{reason}; no earlier release to restart", now)
    deadline = _deadline(Phase.START, policy, rollback=True)
    progress = tuple(dataclasses.replace(p, status=HostStatus.STOPPED, at=now) for p in record.progress)
    record = _r(record, now, phase=Phase.START, rollback=True, outcome=Phase.FAILED, reason=reason,
                migrating=None, deadline=deadline, progress=progress)
    return record, (RestartOldRelease(record.hosts, previous), ArmDeadline(deadline))


def _check_started(record: Rollout, now: float) -> Result:
    if any(p.status is HostStatus.STOPPED for p in record.progress):
        return record, ()
    failed = [p.host for p in record.progress if p.status is HostStatus.FAILED]
    if record.rollback:
        reason = record.reason or "rolled back"
        if failed:
            reason += f"; the old release did not start on: {', '.join(failed)}"
        return _finish(record, Phase.FAILED, reason, now)
    if failed:
        return _finish(record, Phase.FAILED, f"the release did not start on: {', '.join(failed)}", now)
    return _finish(record, Phase.DONE, None, now)


# Each rule: (record, event, now, policy) -> (record, commands)


def _late(record: Rollout, event: Event, now: float, policy: RolloutPolicy) -> Result:
    """Legitimately late or duplicate: nothing changes."""
    return record, ()


def _on_resolved(record: Rollout, event: Resolved, now: float, policy: RolloutPolicy) -> Result:
    digest = event.digest
    if not values.DIGEST.fullmatch(digest):
        return _finish(record, Phase.FAILED, "the registry answered with a malformed digest", now)
    record = _r(record, now, digest=digest)
    if record.previous is not None and record.previous.digest == digest:
        return _finish(record, Phase.DONE, f"{record.tag} is the release already running", now)
    steps = policy.steps
    if is_setback(record.ledger, digest):
        if record.tag not in policy.compatible and digest not in policy.compatible:
            return _finish(record, Phase.HALTED,
                           f"{record.tag} ran its migrations before a newer version did; going back "
                           "needs an operator (no down-migrations), or the tag configured compatible",
                           now)
        steps = ()
    unknown = [s for s in steps_unknown(record.ledger, digest) if s in steps]
    if unknown:
        return _finish(record, Phase.HALTED,
                       f"step {unknown[0]} of {record.tag} ended with an unknown outcome in an earlier "
                       "rollout; an operator checks it and records how it ended in the ledger", now)
    deadline = _deadline(Phase.PULL, policy)
    record = _r(record, now, phase=Phase.PULL, steps=steps, deadline=deadline,
                progress=tuple(HostProgress(h, at=now) for h in record.hosts))
    return record, (PullOnHosts(record.hosts, digest), ArmDeadline(deadline))


def _on_late_resolved(record: Rollout, event: Resolved, now: float, policy: RolloutPolicy) -> Result:
    if event.digest != record.digest:
        raise IllegalTransition(record.phase, event, "a different digest after the tag was resolved")
    return record, ()


def _on_resolve_failed(record: Rollout, event: ResolveFailed, now: float, policy: RolloutPolicy) -> Result:
    return _finish(record, Phase.FAILED, f"cannot resolve {record.tag}: {event.reason}", now)


def _on_pulled(record: Rollout, event: HostPulled, now: float, policy: RolloutPolicy) -> Result:
    p = _participant(record, event, event.host)
    if p is None or p.status is not HostStatus.PENDING:
        if p is not None and p.digest != event.digest:
            raise IllegalTransition(record.phase, event, "a second, different digest from the host")
        return record, ()
    if event.digest != record.digest:
        return _trouble(record, (event.host,), "pulled a different digest", now, policy)
    record = _set_host(record, event.host, now, status=HostStatus.PULLED, digest=event.digest)
    return _check_pulled(record, now, policy)


def _on_late_pulled(record: Rollout, event: HostPulled, now: float, policy: RolloutPolicy) -> Result:
    p = _participant(record, event, event.host)
    if p is not None and p.digest != event.digest:
        raise IllegalTransition(record.phase, event, "the host was counted with another digest")
    return record, ()


def _on_pull_failed(record: Rollout, event: HostPullFailed, now: float, policy: RolloutPolicy) -> Result:
    p = _participant(record, event, event.host)
    if p is None or p.status is not HostStatus.PENDING:
        return record, ()  # excluded already, or pulled since: late
    if event.permanent:
        return _trouble(record, (event.host,), f"cannot pull: {event.reason}", now, policy)
    return _set_host(record, event.host, now, reason=event.reason), ()


def _on_late_host_report(record: Rollout, event: HostPullFailed | HostStopped, now: float,
                         policy: RolloutPolicy) -> Result:
    _participant(record, event, event.host)
    return record, ()


def _on_lost(record: Rollout, event: HostLost, now: float, policy: RolloutPolicy) -> Result:
    if event.host not in record.hosts:
        return record, ()  # not taking part, or excluded already
    if record.phase in BEFORE_CUTOVER:
        return _trouble(record, (event.host,), "lost", now, policy)
    # After the cut-over nothing is undone for a lost host: it gets the release when it comes back.
    record = _exclude(record, (event.host,), "lost", now)
    excluded = HostsExcluded((event.host,), "lost")
    if record.phase is Phase.STOP:
        record, commands = _check_stopped(record, now, policy)
    elif record.phase is Phase.START:
        record, commands = _check_started(record, now)
    else:
        commands = ()
    return record, (excluded, *commands)


def _on_deadline(record: Rollout, event: BarrierDeadline, now: float, policy: RolloutPolicy) -> Result:
    if (record.deadline is None or event.barrier != record.deadline.barrier
            or event.revision != record.revision):
        return record, ()  # a stale timer: an earlier barrier's or rollout's
    if record.phase is Phase.PULL:
        _, pending, _ = barrier_state(record)
        return _trouble(record, pending, "did not pull in time", now, policy)
    if record.phase is Phase.STOP:
        slow = [p.host for p in record.progress if p.status is not HostStatus.STOPPED]
        return _rollback(record, f"did not stop in time: {', '.join(slow)}", now, policy)
    if record.phase is Phase.MIGRATE:
        assert record.digest is not None and record.migrating is not None
        entry = LedgerEntry(record.digest, record.tag, record.migrating, False, record.revision, now,
                            unknown=True)
        return _finish(_r(record, now, ledger=(*record.ledger, entry)), Phase.HALTED,
                       f"step {record.migrating} gave no result in time; it may or may not have run: "
                       "an operator checks", now)
    # START: whoever has not reported has failed.
    for p in record.progress:
        if p.status is HostStatus.STOPPED:
            record = _set_host(record, p.host, now, status=HostStatus.FAILED,
                               reason="no report in time")
    return _check_started(record, now)


def _on_stopped(record: Rollout, event: HostStopped, now: float, policy: RolloutPolicy) -> Result:
    p = _participant(record, event, event.host)
    if p is None or p.status is HostStatus.STOPPED:
        return record, ()
    record = _set_host(record, event.host, now, status=HostStatus.STOPPED)
    return _check_stopped(record, now, policy)


def _ledger_has(record: Rollout, step: str, ok: bool) -> bool:
    return any(e.digest == record.digest and e.step == step and e.ok == ok and e.revision == record.revision
               for e in record.ledger)


def _on_migrated(record: Rollout, event: MigrationSucceeded, now: float, policy: RolloutPolicy) -> Result:
    if record.migrating != event.step:
        return _on_late_migration(record, event, now, policy)
    assert record.digest is not None
    entry = LedgerEntry(record.digest, record.tag, event.step, True, record.revision, now)
    record = _r(record, now, ledger=(*record.ledger, entry), migrating=None, deadline=None)
    if record.abort_by is not None:
        return _finish(record, Phase.HALTED,
                       f"aborted by {record.abort_by} while step {event.step} ran; it completed, and "
                       "going back needs an operator", now)
    return _next_step(record, now, policy)


def _on_migration_failed(record: Rollout, event: MigrationFailed, now: float,
                         policy: RolloutPolicy) -> Result:
    if record.migrating != event.step:
        return _on_late_migration(record, event, now, policy)
    assert record.digest is not None
    entry = LedgerEntry(record.digest, record.tag, event.step, False, record.revision, now)
    record = _r(record, now, ledger=(*record.ledger, entry), migrating=None, deadline=None)
    return _rollback(record, f"step {event.step} failed: {event.reason}", now, policy)


def _on_migration_unknown(record: Rollout, event: MigrationUnknown, now: float,
                          policy: RolloutPolicy) -> Result:
    if record.migrating != event.step:
        return _on_late_migration(record, event, now, policy)
    assert record.digest is not None
    # In the ledger as such: a later rollout of this image halts before touching anything until an
    # operator has checked the step and recorded how it ended.
    entry = LedgerEntry(record.digest, record.tag, event.step, False, record.revision, now, unknown=True)
    record = _r(record, now, ledger=(*record.ledger, entry), migrating=None, deadline=None)
    return _finish(record, Phase.HALTED,
                   f"step {event.step}: outcome unknown ({event.reason}); it may have run, wholly or in "
                   "part: an operator checks", now)


def _on_late_migration(record: Rollout, event: MigrationSucceeded | MigrationFailed | MigrationUnknown,
                       now: float, policy: RolloutPolicy) -> Result:
    if not _ledger_has(record, event.step, isinstance(event, MigrationSucceeded)):
        raise IllegalTransition(record.phase, event, f"step {event.step} is not running")
    return record, ()


def _on_started(record: Rollout, event: HostActive | HostFailed, now: float, policy: RolloutPolicy) -> Result:
    p = _participant(record, event, event.host)
    if p is None or p.status is not HostStatus.STOPPED:
        return record, ()  # first report wins; units failing later are the healer's
    if isinstance(event, HostActive):
        record = _set_host(record, event.host, now, status=HostStatus.ACTIVE)
    else:
        record = _set_host(record, event.host, now, status=HostStatus.FAILED, reason=event.reason)
    return _check_started(record, now)


def _on_newer(record: Rollout, event: NewerVersion, now: float, policy: RolloutPolicy) -> Result:
    latest = record.revision if record.newer is None else record.newer.revision
    if event.revision <= latest:
        return record, ()  # stale
    if record.terminal:
        return record, (BeginRollout(event.tag, event.revision),)
    # A tag outside the grammar is refused when its rollout begins; it is not stored meanwhile.
    record = _r(record, now, newer=Pending(event.tag if is_tag(event.tag) else "", event.revision))
    if record.phase in BEFORE_CUTOVER:
        newer = record.newer.tag if record.newer and record.newer.tag else "a refused version"
        return _finish(record, Phase.SUPERSEDED, f"superseded by {newer} at revision {event.revision}", now)
    return record, ()  # cut over: finish first, then the newer one starts


def _on_abort(record: Rollout, event: Abort, now: float, policy: RolloutPolicy) -> Result:
    reason = f"aborted by {event.by}"
    if record.phase in BEFORE_CUTOVER:
        return _finish(record, Phase.FAILED, reason, now)
    if record.phase is Phase.STOP:
        return _rollback(record, reason, now, policy)
    if record.phase is Phase.MIGRATE:
        return (record, ()) if record.abort_by is not None else (_r(record, now, abort_by=event.by), ())
    if record.rollback:
        return record, ()  # already going back
    return _finish(record, Phase.HALTED, f"{reason} while the new release started; an operator decides",
                   now)


def _on_resumed(record: Rollout, event: Resumed, now: float, policy: RolloutPolicy) -> Result:
    if record.phase is Phase.RESOLVE:
        return record, (ResolveTag(record.tag),)
    if record.deadline is None and not (record.phase is Phase.MIGRATE and record.migrating is None):
        # A barrier without a duration: the record was written by an earlier version, which kept an
        # absolute time that this leader's clock cannot be trusted to compare. The barrier gets the
        # policy's whole timeout from now.
        record = _r(record, now, deadline=_deadline(record.phase, policy, record.migrating, record.rollback))
    # The barrier's whole duration again, timed by this leader: how much of it an earlier leader's
    # clock saw pass is not known here.
    arm: tuple[Command, ...] = () if record.deadline is None else (ArmDeadline(record.deadline),)
    if record.phase is Phase.PULL:
        assert record.digest is not None
        _, pending, _ = barrier_state(record)
        return record, (PullOnHosts(pending, record.digest), *arm)
    if record.phase is Phase.STOP:
        left = tuple(p.host for p in record.progress if p.status is not HostStatus.STOPPED)
        return record, (StopOnHosts(left), *arm)
    if record.phase is Phase.MIGRATE:
        if record.migrating is not None:
            # The step runs on its migrator's engine whoever leads: wait for its report, within the
            # deadline written when it was issued.
            return record, arm
        return _next_step(record, now, policy)
    left = tuple(p.host for p in record.progress if p.status is HostStatus.STOPPED)
    if record.rollback:
        assert record.previous is not None
        return record, (RestartOldRelease(left, record.previous), *arm)
    assert record.release is not None
    return record, (StartOnHosts(left, record.release), *arm)


@dataclass(frozen=True)
class Rule:
    """What an event does in a phase, and the phases it may lead to (checked on every step)."""

    apply: Callable[[Rollout, Any, float, RolloutPolicy], Result]
    to: frozenset[Phase]

    @property
    def late(self) -> bool:
        return self.apply is _late


def _rule(apply: Callable[[Rollout, Any, float, RolloutPolicy], Result], *to: Phase) -> Rule:
    return Rule(apply, frozenset(to))


R, P, S, M, T = Phase.RESOLVE, Phase.PULL, Phase.STOP, Phase.MIGRATE, Phase.START
DONE, FAILED, SUPERSEDED, HALTED = Phase.DONE, Phase.FAILED, Phase.SUPERSEDED, Phase.HALTED

TRANSITIONS: dict[tuple[Phase, type[Event]], Rule] = {
    (R, Resolved): _rule(_on_resolved, P, DONE, FAILED, HALTED),
    (R, ResolveFailed): _rule(_on_resolve_failed, FAILED),
    (R, HostLost): _rule(_on_lost, R, FAILED),
    (R, NewerVersion): _rule(_on_newer, R, SUPERSEDED),
    (R, Abort): _rule(_on_abort, FAILED),
    (R, Resumed): _rule(_on_resumed, R),

    (P, Resolved): _rule(_on_late_resolved, P),
    (P, HostPulled): _rule(_on_pulled, P, S, FAILED),
    (P, HostPullFailed): _rule(_on_pull_failed, P, S, FAILED),
    (P, HostLost): _rule(_on_lost, P, S, FAILED),
    (P, BarrierDeadline): _rule(_on_deadline, P, S, FAILED),
    (P, NewerVersion): _rule(_on_newer, P, SUPERSEDED),
    (P, Abort): _rule(_on_abort, FAILED),
    (P, Resumed): _rule(_on_resumed, P),

    (S, HostPulled): _rule(_on_late_pulled, S),
    (S, HostPullFailed): _rule(_on_late_host_report, S),
    (S, HostStopped): _rule(_on_stopped, S, M, T),
    (S, HostLost): _rule(_on_lost, S, M, T),
    (S, BarrierDeadline): _rule(_on_deadline, S, T, FAILED),
    (S, NewerVersion): _rule(_on_newer, S),
    (S, Abort): _rule(_on_abort, T, FAILED),
    (S, Resumed): _rule(_on_resumed, S),

    (M, HostPulled): _rule(_on_late_pulled, M),
    (M, HostPullFailed): _rule(_on_late_host_report, M),
    (M, HostStopped): _rule(_on_late_host_report, M),
    (M, HostLost): _rule(_on_lost, M),
    (M, BarrierDeadline): _rule(_on_deadline, M, HALTED),
    (M, MigrationSucceeded): _rule(_on_migrated, M, T, HALTED),
    (M, MigrationFailed): _rule(_on_migration_failed, T, FAILED),
    (M, MigrationUnknown): _rule(_on_migration_unknown, M, HALTED),
    (M, NewerVersion): _rule(_on_newer, M),
    (M, Abort): _rule(_on_abort, M),
    (M, Resumed): _rule(_on_resumed, M, T),

    (T, HostPulled): _rule(_on_late_pulled, T),
    (T, HostPullFailed): _rule(_on_late_host_report, T),
    (T, HostStopped): _rule(_on_late_host_report, T),
    (T, MigrationSucceeded): _rule(_on_late_migration, T),
    (T, MigrationFailed): _rule(_on_late_migration, T),
    (T, MigrationUnknown): _rule(_on_late_migration, T),
    (T, HostActive): _rule(_on_started, T, DONE, FAILED),
    (T, HostFailed): _rule(_on_started, T, DONE, FAILED),
    (T, HostLost): _rule(_on_lost, T, DONE, FAILED),
    (T, BarrierDeadline): _rule(_on_deadline, T, DONE, FAILED),
    (T, NewerVersion): _rule(_on_newer, T),
    (T, Abort): _rule(_on_abort, T, HALTED),
    (T, Resumed): _rule(_on_resumed, T),
}
# Terminal phases never change: every event is late there. NewerVersion still starts the next rollout.
for _phase in TERMINAL:
    for _event in EVENT_TYPES:
        TRANSITIONS[_phase, _event] = _rule(_on_newer if _event is NewerVersion else _late, _phase)
del R, P, S, M, T, DONE, FAILED, SUPERSEDED, HALTED, _phase, _event


def step(record: Rollout, event: Event, now: float, policy: RolloutPolicy) -> Result:
    """Apply one event. Raises IllegalTransition, and changes nothing, for an event the phase does not
    allow."""
    rule = TRANSITIONS.get((record.phase, type(event)))
    if rule is None:
        raise IllegalTransition(record.phase, event)
    new, commands = rule.apply(record, event, now, policy)
    if new.phase not in rule.to:  # a bug in a rule, not in the input
        raise AssertionError(f"{record.phase} + {type(event).__name__} led to {new.phase}")
    return new, commands


# ---------------------------------------------------------------------------------------------------
# Decoding, strictly: a record comes from etcd, which anyone with access can write


def _safe(e: Exception) -> str:
    # Messages below are ours (field names, never values); json's own messages quote positions only.
    return values.describe(e)


def _obj(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError("expected an object")
    return value


def _fields(cls: type[Any], data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise KeyError(f"unknown field in {cls.__name__}")
    return data


def _str(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a string")
    return value


def _opt_str(value: object, name: str) -> str | None:
    return None if value is None else _str(value, name)


def _int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an integer")
    return value


def _float(value: object, name: str) -> float:
    """A time or a duration: a finite float (JSON's NaN and Infinity, and integers past a float's
    range, are not one)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name}: expected a number")
    try:
        f = float(value)
    except OverflowError:
        raise ValueError(f"{name}: a number out of range") from None
    if not math.isfinite(f):
        raise ValueError(f"{name}: expected a finite number")
    return f


def _opt_float(value: object, name: str) -> float | None:
    return None if value is None else _float(value, name)


def _bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected true or false")
    return value


def _list(value: object, name: str) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"{name}: expected a list")
    return value


_digest = values.digest


def _opt_digest(value: object, name: str) -> str | None:
    return None if value is None else _digest(value, name)


def _deadline_of(value: object) -> Deadline | None:
    if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
        # A number is the absolute time an earlier version kept: meaningless on another clock. The
        # leader that resumes the record gives the barrier its timeout afresh.
        return None
    d = _fields(Deadline, _obj(value))
    seconds = _float(d["seconds"], "deadline.seconds")
    if not 0 < seconds < math.inf:
        raise ValueError("deadline.seconds: must be a positive number")
    return Deadline(_str(d["barrier"], "deadline.barrier"), seconds)


def _release(value: object, name: str) -> Release | None:
    if value is None:
        return None
    d = _fields(Release, _obj(value))
    return Release(_str(d["tag"], f"{name}.tag"), _digest(d["digest"], f"{name}.digest"))


def _ledger_entry(item: object) -> LedgerEntry:
    e = _fields(LedgerEntry, _obj(item))
    return LedgerEntry(_digest(e["digest"], "ledger.digest"), _str(e["tag"], "ledger.tag"),
                       _str(e["step"], "ledger.step"), _bool(e["ok"], "ledger.ok"),
                       _int(e["revision"], "ledger.revision"), _float(e["at"], "ledger.at"),
                       _bool(e.get("unknown", False), "ledger.unknown"))


def decode_ledger_entry(raw: bytes, where: str) -> LedgerEntry:
    """A ledger entry as its own key holds it (JSON of the entry's fields), strictly."""
    try:
        return _ledger_entry(json.loads(raw))
    except (ValueError, TypeError, KeyError, RecursionError) as e:
        raise InvalidValue(where, f"not a ledger entry ({type(e).__name__}: {_safe(e)})") from None


def _decode_rollout(d: dict[str, Any]) -> Rollout:
    _fields(Rollout, d)
    progress = []
    for item in _list(d.get("progress", []), "progress"):
        p = _fields(HostProgress, _obj(item))
        progress.append(HostProgress(
            _str(p["host"], "progress.host"), HostStatus(p.get("status", "pending")),
            _opt_digest(p.get("digest"), "progress.digest"), _opt_str(p.get("reason"), "progress.reason"),
            _float(p.get("at", 0.0), "progress.at")))
    excluded = []
    for item in _list(d.get("excluded", []), "excluded"):
        x = _fields(Excluded, _obj(item))
        excluded.append(Excluded(_str(x["host"], "excluded.host"), _str(x["reason"], "excluded.reason"),
                                 Phase(x["phase"])))
    ledger = [_ledger_entry(item) for item in _list(d.get("ledger", []), "ledger")]
    newer = None
    if d.get("newer") is not None:
        n = _fields(Pending, _obj(d["newer"]))
        newer = Pending(_str(n["tag"], "newer.tag"), _int(n["revision"], "newer.revision"))
    outcome = d.get("outcome")
    return Rollout(
        revision=_int(d["revision"], "revision"),
        tag=_str(d["tag"], "tag"),
        hosts=tuple(_str(h, "hosts") for h in _list(d["hosts"], "hosts")),
        phase=Phase(d["phase"]),
        started_at=_float(d["started_at"], "started_at"),
        updated_at=_float(d["updated_at"], "updated_at"),
        previous=_release(d.get("previous"), "previous"),
        digest=_opt_digest(d.get("digest"), "digest"),
        progress=tuple(progress),
        excluded=tuple(excluded),
        deadline=_deadline_of(d.get("deadline")),
        steps=tuple(_str(s, "steps") for s in _list(d.get("steps", []), "steps")),
        migrating=_opt_str(d.get("migrating"), "migrating"),
        migrator=_opt_str(d.get("migrator"), "migrator"),
        ledger=tuple(ledger),
        rollback=_bool(d.get("rollback", False), "rollback"),
        outcome=None if outcome is None else Phase(outcome),
        reason=_opt_str(d.get("reason"), "reason"),
        newer=newer,
        abort_by=_opt_str(d.get("abort_by"), "abort_by"),
        ended_at=_opt_float(d.get("ended_at"), "ended_at"),
    )


def _check_consistent(r: Rollout) -> None:
    """What step() relies on; a record breaking it would crash a leader instead of being refused."""
    if r.revision < 1:
        raise ValueError("revision: must be positive")
    if list(r.hosts) != sorted(set(r.hosts)):
        raise ValueError("hosts: must be sorted and distinct")
    if r.phase is not Phase.RESOLVE and not r.terminal and r.digest is None:
        raise ValueError("digest: needed past resolve")
    if r.phase not in (Phase.RESOLVE, *TERMINAL) and tuple(p.host for p in r.progress) != r.hosts:
        raise ValueError("progress: one entry per participating host")
    if r.phase is Phase.MIGRATE and r.migrating is None:
        raise ValueError("migrating: a step runs in the migrate phase")
    if r.rollback and (r.previous is None or r.outcome is not Phase.FAILED):
        raise ValueError("rollback: needs the previous release and a failed outcome")


def _check_values(r: Rollout) -> None:
    """Every value in the grammar it was written with (norm.core.values): a record is read by every
    leader to come, and its tags and digests end up in the hosts' release files."""
    if r.tag or not r.terminal or r.digest is not None:  # a refused desired value is recorded as ""
        values.tag(r.tag, "tag")
    for h in r.hosts:
        values.machine_id(h, "hosts")
    if r.previous is not None:
        values.tag(r.previous.tag, "previous.tag")
    for p in r.progress:
        values.machine_id(p.host, "progress.host")
        if p.reason is not None:
            values.text(p.reason, "progress.reason")
    for x in r.excluded:
        values.machine_id(x.host, "excluded.host")
        values.text(x.reason, "excluded.reason")
    for s in r.steps:
        values.step(s, "steps")
    if r.migrating is not None:
        values.step(r.migrating, "migrating")
    if r.migrator is not None:
        values.machine_id(r.migrator, "migrator")
    for e in r.ledger:
        values.tag(e.tag, "ledger.tag")
        values.step(e.step, "ledger.step")
    if r.newer is not None and r.newer.tag:
        values.tag(r.newer.tag, "newer.tag")
    for name, text in (("reason", r.reason), ("abort_by", r.abort_by)):
        if text is not None:
            values.text(text, name)


def policy_of(update: UpdateConfig) -> RolloutPolicy:
    """The rollout policy the [update] section of the config describes."""
    return RolloutPolicy(
        pull_timeout=update.pull_timeout, stop_timeout=update.stop_timeout,
        start_timeout=update.start_timeout, migration_timeout=update.migration_timeout,
        on_trouble=update.on_trouble, steps=tuple(step_name(c) for c in update.steps),
        compatible=frozenset(update.compatible))
