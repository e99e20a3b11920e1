"""The fleet update as a state machine: pure, table-driven, over a rollout record that lives in etcd
(norm.core.record; how it is laid out there, with the header and the hosts' reports: norm.core.protocol).

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from norm.core import values
from norm.core.config import UpdateConfig, step_name
from norm.core.desired import is_tag, parse_version
from norm.core.errors import InvalidValue, NormError
from norm.core.host import HostRecord
from norm.core.record import (
    TERMINAL,
    Deadline,
    Excluded,
    HostProgress,
    HostStatus,
    LedgerEntry,
    Pending,
    Phase,
    Release,
    Rollout,
)

BEFORE_CUTOVER = frozenset({Phase.RESOLVE, Phase.PULL})  # nothing stopped yet: may be superseded


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


def policy_of(update: UpdateConfig) -> RolloutPolicy:
    """The rollout policy the [update] section of the config describes."""
    return RolloutPolicy(
        pull_timeout=update.pull_timeout, stop_timeout=update.stop_timeout,
        start_timeout=update.start_timeout, migration_timeout=update.migration_timeout,
        on_trouble=update.on_trouble, steps=tuple(step_name(c) for c in update.steps),
        compatible=frozenset(update.compatible))


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


TRANSITIONS: dict[tuple[Phase, type[Event]], Rule] = {
    (Phase.RESOLVE, Resolved): _rule(_on_resolved, Phase.PULL, Phase.DONE, Phase.FAILED, Phase.HALTED),
    (Phase.RESOLVE, ResolveFailed): _rule(_on_resolve_failed, Phase.FAILED),
    (Phase.RESOLVE, HostLost): _rule(_on_lost, Phase.RESOLVE, Phase.FAILED),
    (Phase.RESOLVE, NewerVersion): _rule(_on_newer, Phase.RESOLVE, Phase.SUPERSEDED),
    (Phase.RESOLVE, Abort): _rule(_on_abort, Phase.FAILED),
    (Phase.RESOLVE, Resumed): _rule(_on_resumed, Phase.RESOLVE),

    (Phase.PULL, Resolved): _rule(_on_late_resolved, Phase.PULL),
    (Phase.PULL, HostPulled): _rule(_on_pulled, Phase.PULL, Phase.STOP, Phase.FAILED),
    (Phase.PULL, HostPullFailed): _rule(_on_pull_failed, Phase.PULL, Phase.STOP, Phase.FAILED),
    (Phase.PULL, HostLost): _rule(_on_lost, Phase.PULL, Phase.STOP, Phase.FAILED),
    (Phase.PULL, BarrierDeadline): _rule(_on_deadline, Phase.PULL, Phase.STOP, Phase.FAILED),
    (Phase.PULL, NewerVersion): _rule(_on_newer, Phase.PULL, Phase.SUPERSEDED),
    (Phase.PULL, Abort): _rule(_on_abort, Phase.FAILED),
    (Phase.PULL, Resumed): _rule(_on_resumed, Phase.PULL),

    (Phase.STOP, HostPulled): _rule(_on_late_pulled, Phase.STOP),
    (Phase.STOP, HostPullFailed): _rule(_on_late_host_report, Phase.STOP),
    (Phase.STOP, HostStopped): _rule(_on_stopped, Phase.STOP, Phase.MIGRATE, Phase.START),
    (Phase.STOP, HostLost): _rule(_on_lost, Phase.STOP, Phase.MIGRATE, Phase.START),
    (Phase.STOP, BarrierDeadline): _rule(_on_deadline, Phase.STOP, Phase.START, Phase.FAILED),
    (Phase.STOP, NewerVersion): _rule(_on_newer, Phase.STOP),
    (Phase.STOP, Abort): _rule(_on_abort, Phase.START, Phase.FAILED),
    (Phase.STOP, Resumed): _rule(_on_resumed, Phase.STOP),

    (Phase.MIGRATE, HostPulled): _rule(_on_late_pulled, Phase.MIGRATE),
    (Phase.MIGRATE, HostPullFailed): _rule(_on_late_host_report, Phase.MIGRATE),
    (Phase.MIGRATE, HostStopped): _rule(_on_late_host_report, Phase.MIGRATE),
    (Phase.MIGRATE, HostLost): _rule(_on_lost, Phase.MIGRATE),
    (Phase.MIGRATE, BarrierDeadline): _rule(_on_deadline, Phase.MIGRATE, Phase.HALTED),
    (Phase.MIGRATE, MigrationSucceeded): _rule(_on_migrated, Phase.MIGRATE, Phase.START, Phase.HALTED),
    (Phase.MIGRATE, MigrationFailed): _rule(_on_migration_failed, Phase.START, Phase.FAILED),
    (Phase.MIGRATE, MigrationUnknown): _rule(_on_migration_unknown, Phase.MIGRATE, Phase.HALTED),
    (Phase.MIGRATE, NewerVersion): _rule(_on_newer, Phase.MIGRATE),
    (Phase.MIGRATE, Abort): _rule(_on_abort, Phase.MIGRATE),
    (Phase.MIGRATE, Resumed): _rule(_on_resumed, Phase.MIGRATE, Phase.START),

    (Phase.START, HostPulled): _rule(_on_late_pulled, Phase.START),
    (Phase.START, HostPullFailed): _rule(_on_late_host_report, Phase.START),
    (Phase.START, HostStopped): _rule(_on_late_host_report, Phase.START),
    (Phase.START, MigrationSucceeded): _rule(_on_late_migration, Phase.START),
    (Phase.START, MigrationFailed): _rule(_on_late_migration, Phase.START),
    (Phase.START, MigrationUnknown): _rule(_on_late_migration, Phase.START),
    (Phase.START, HostActive): _rule(_on_started, Phase.START, Phase.DONE, Phase.FAILED),
    (Phase.START, HostFailed): _rule(_on_started, Phase.START, Phase.DONE, Phase.FAILED),
    (Phase.START, HostLost): _rule(_on_lost, Phase.START, Phase.DONE, Phase.FAILED),
    (Phase.START, BarrierDeadline): _rule(_on_deadline, Phase.START, Phase.DONE, Phase.FAILED),
    (Phase.START, NewerVersion): _rule(_on_newer, Phase.START),
    (Phase.START, Abort): _rule(_on_abort, Phase.START, Phase.HALTED),
    (Phase.START, Resumed): _rule(_on_resumed, Phase.START),
}
# Terminal phases never change: every event is late there. NewerVersion still starts the next rollout.
for _phase in TERMINAL:
    for _event in EVENT_TYPES:
        TRANSITIONS[_phase, _event] = _rule(_on_newer if _event is NewerVersion else _late, _phase)
del _phase, _event


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
