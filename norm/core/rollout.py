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
from norm.core.desired import is_tag, parse_version
from norm.core.errors import InvalidValue, NormError
from norm.core.gate import MIGRATIONS_LABEL, Migrations
from norm.core.host import HostRecord
from norm.core.policy import FleetPolicy, batch_size
from norm.core.record import (
    TERMINAL,
    Action,
    ActionKind,
    Asked,
    Deadline,
    Excluded,
    Gate,
    HostProgress,
    HostStatus,
    LedgerEntry,
    Pending,
    Phase,
    Release,
    Rollout,
    Stage,
    Strategy,
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
    strategy: Literal["auto", "rolling", "recreate"] = "recreate"  # auto: as the image declares
    max_unavailable: str = "1"  # hosts moving at once in a rolling update: a count, or "N%" of them
    post_steps: frozenset[str] = frozenset()  # steps that run after every batch (contract)
    gate: Gate = Gate()
    progress_deadline: float = 600.0  # seconds a batch may take
    auto_rollback: bool = True  # a batch failing its gate puts the hosts moved back
    canary: str = ""  # a rolling update's first batch, watched alone first: a count, "N%", or "" for none

    def __post_init__(self) -> None:
        if not (self.pull_timeout > 0 and self.stop_timeout > 0 and self.start_timeout > 0
                and self.migration_timeout > 0 and self.progress_deadline > 0):
            raise ValueError("rollout timeouts must be more than 0")
        if self.on_trouble not in ("exclude", "abort"):
            raise ValueError("on_trouble is 'exclude' or 'abort'")
        if len(set(self.steps)) != len(self.steps) or not all(self.steps):
            raise ValueError("migration steps must be distinct, non-empty names")
        if not self.post_steps <= set(self.steps):
            raise ValueError("post steps must be among the steps")
        batch_size(self.max_unavailable, 1)  # its grammar (ValueError naming max_unavailable)
        if self.canary:
            batch_size(self.canary, 1)


def policy_of(fleet: FleetPolicy) -> RolloutPolicy:
    """What the state machine reads of the fleet's policy (norm.core.policy). With the fleet
    stopped (a recreate), every `pre` step runs before any `post` one."""
    ordered = sorted(fleet.steps, key=lambda s: s.when == "post")  # stable: the file's order within
    return RolloutPolicy(
        pull_timeout=fleet.pull_timeout, stop_timeout=fleet.stop_timeout,
        start_timeout=fleet.start_timeout, migration_timeout=fleet.migration_timeout,
        on_trouble=fleet.on_trouble, steps=tuple(s.name for s in ordered),
        post_steps=frozenset(s.name for s in fleet.steps if s.when == "post"),
        compatible=frozenset(fleet.compatible), strategy=fleet.strategy,
        max_unavailable=fleet.max_unavailable, gate=Gate(fleet.min_healthy, fleet.healthy_deadline),
        progress_deadline=fleet.progress_deadline, auto_rollback=fleet.auto_rollback, canary=fleet.canary)


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
    migrations: Migrations | None = None  # what the image's label declares, as the host read it


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


@dataclass(frozen=True)
class PauseAsked:
    """An operator asks the rollout to hold at its next boundary (`norm pause`). `request`: the
    request key's revision (a request read again is taken once)."""

    by: str
    request: int


@dataclass(frozen=True)
class ResumeAsked:
    """An operator asks a paused rollout to go on (`norm resume`)."""

    by: str
    request: int


@dataclass(frozen=True)
class PromoteAsked:
    """An operator ends the canary's wait early (`norm promote`): the rest of the batches go."""

    by: str
    request: int


@dataclass(frozen=True)
class Blocked:
    """The rollout may not advance now (outside the maintenance windows, alerts firing): it holds at
    its next boundary, as paused, until Unblocked (unless deployed with --now)."""

    reason: str


@dataclass(frozen=True)
class Unblocked:
    """The rollout may advance again: held at a boundary and not paused, it goes on."""


@dataclass(frozen=True)
class AnalysisEnded:
    """The canary's analysis (RunAnalysis) came to its verdict. Inconclusive: it could not tell
    (a query without data): the rollout pauses, for an operator."""

    revision: int
    verdict: Literal["passed", "failed", "inconclusive"]
    reason: str | None = None


Event = (Resolved | ResolveFailed | HostPulled | HostPullFailed | HostLost | BarrierDeadline | HostStopped
         | MigrationSucceeded | MigrationFailed | MigrationUnknown | HostActive | HostFailed | NewerVersion
         | Abort | Resumed | PauseAsked | ResumeAsked | PromoteAsked | AnalysisEnded | Blocked | Unblocked)
EVENT_TYPES: tuple[type[Event], ...] = (
    Resolved, ResolveFailed, HostPulled, HostPullFailed, HostLost, BarrierDeadline, HostStopped,
    MigrationSucceeded, MigrationFailed, MigrationUnknown, HostActive, HostFailed, NewerVersion, Abort,
    Resumed, PauseAsked, ResumeAsked, PromoteAsked, AnalysisEnded, Blocked, Unblocked)


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
class MoveHosts:
    """A rolling batch: each host leaves the load balancer, restarts on `release`, passes its health
    gate and comes back."""

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
class RunAnalysis:
    """Analyse the canary of rollout `revision` (its hosts moved and gated): the fleet policy's
    queries, or a plain wait of its canary_wait; deliver AnalysisEnded. A run under way for the same
    rollout is replaced; the shell drops one whose rollout no longer waits for it."""

    revision: int
    hosts: tuple[str, ...]


@dataclass(frozen=True)
class BeginRollout:
    """Start the rollout of a newer desired version (call start_rollout)."""

    tag: str
    revision: int


Command = (ResolveTag | PullOnHosts | StopOnHosts | RunMigration | StartOnHosts | RestartOldRelease
           | MoveHosts | ArmDeadline | HostsExcluded | RecordOutcome | BeginRollout | RunAnalysis)

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


def _ran_since(ledger: Iterable[LedgerEntry], digest: str, stages: tuple[Stage, ...]) -> LedgerEntry | None:
    """The first successful step, of one of `stages`, of another image after `digest` ran its own."""
    seen = False
    for entry in ledger:
        if entry.digest == digest:
            seen = seen or entry.ok
        elif entry.ok and seen and entry.stage in stages:
            return entry
    return None


def setback_step(ledger: Iterable[LedgerEntry], digest: str) -> LedgerEntry | None:
    """The first step of another image that may break `digest` (run with the fleet stopped, or after
    its batches) since `digest` ran its own steps: going back to it would need a down-migration.
    Steps that ran while the previous release served (`pre`: expand) do not count."""
    return _ran_since(ledger, digest, ("stop", "post"))


def is_setback(ledger: Iterable[LedgerEntry], digest: str) -> bool:
    """Whether going back to `digest` would need a down-migration (`setback_step`)."""
    return setback_step(ledger, digest) is not None


def rollback_floor(ledger: Iterable[LedgerEntry], digest: str) -> LedgerEntry | None:
    """The `post` step (contract) of a newer image that ran after `digest` ran its steps: that image
    is the floor, and going below it is refused."""
    return _ran_since(ledger, digest, ("post",))


def choose_strategy(policy: RolloutPolicy, migrations: Migrations | None,
                    previous: Release | None) -> tuple[Strategy, str]:
    """How a rollout's hosts move, and why: `rolling` only when the previous release may keep serving
    while the new one's steps run, as the image declares (its label) and the policy allows."""
    if policy.strategy == "recreate":
        return "recreate", "the fleet's policy asks for recreate"
    if previous is None:
        return "recreate", "no release runs yet: there is nothing to keep serving"
    fallback = " (the policy asks for rolling: falling back to recreate)" \
        if policy.strategy == "rolling" else ""
    if migrations is None:
        return "recreate", (f"the image does not declare its migrations (label {MIGRATIONS_LABEL}): "
                            f"recreate is the safe default{fallback}")
    if migrations == "breaking":
        return "recreate", ("the image declares breaking migrations: the previous release cannot serve "
                            f"while they run{fallback}")
    return "rolling", (f"the image declares its migrations {migrations!r}: the previous release keeps "
                       "serving while they run")


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
                  previous: Release | None = None, ledger: tuple[LedgerEntry, ...] = (),
                  policy: FleetPolicy | None = None, asked: Asked | None = None) -> Result:
    """A new rollout for the desired `tag` written at `revision`. `ledger`: every step ever run, from
    the ledger's own keys (`ledger_summary` of them will do); `policy`: the fleet's policy now, kept
    in the record so that the whole rollout follows it, whoever leads and whatever changes; `by`: who
    asked for it, when known (and, for `norm undo`, the release it goes back to)."""
    record = Rollout(revision=revision, tag=tag, hosts=tuple(sorted(set(hosts))), phase=Phase.RESOLVE,
                     started_at=now, updated_at=now, previous=previous, ledger=ledger, policy=policy,
                     by=None if asked is None else asked.by, pinned=None if asked is None else asked.digest,
                     undo=None if asked is None else asked.undo, override=asked is not None and asked.now)
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
                ended_at=now, waiting=None)
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
    if held(record):  # a boundary: paused or blocked, it waits here, nothing stopped or moved
        return _r(record, now, waiting="pull", deadline=None), ()
    return _after_pull(record, now, policy)


def held(record: Rollout) -> bool:
    """Whether the rollout holds at its next boundary: paused, or blocked (and not deployed --now)."""
    return record.pause is not None or (record.blocked is not None and not record.override)


def _after_pull(record: Rollout, now: float, policy: RolloutPolicy) -> Result:
    """Every host pulled: the strategy is chosen, and the cut-over or the `pre` steps begin."""
    record = _r(record, now, waiting=None)
    strategy, why = choose_strategy(policy, record.migrations, record.previous)
    record = _r(record, now, strategy=strategy, strategy_reason=why, deadline=None)
    if strategy == "rolling":
        return _next_step(record, now, policy)  # `pre` steps while the previous release serves
    deadline = _deadline(Phase.STOP, policy)
    return (_r(record, now, phase=Phase.STOP, deadline=deadline),
            (StopOnHosts(record.hosts), ArmDeadline(deadline)))


def _check_stopped(record: Rollout, now: float, policy: RolloutPolicy) -> Result:
    if any(p.status is not HostStatus.STOPPED for p in record.progress):
        return record, ()
    return _next_step(_r(record, now, deadline=None), now, policy)


def serving_previous(record: Rollout) -> bool:
    """A rolling update before its first batch: every host still runs the previous release."""
    return record.strategy == "rolling" and not record.batches


def stage(record: Rollout) -> Stage:
    """When the record's steps run now: with the fleet stopped, or before or after the batches."""
    if record.strategy != "rolling":
        return "stop"
    return "post" if record.rolled else "pre"


def _next_step(record: Rollout, now: float, policy: RolloutPolicy) -> Result:
    assert record.digest is not None
    if serving_previous(record):
        # Nothing moved yet: an abort or a newer version ends it here, between two steps.
        if record.abort_by is not None:
            return _finish(record, Phase.FAILED, f"aborted by {record.abort_by} before the first batch",
                           now)
        if record.newer is not None:
            return _finish(record, Phase.SUPERSEDED, _superseded(record, "before the first batch"), now)
    done = steps_done(record.ledger, record.digest)
    now_stage = stage(record)
    todo = [s for s in record.steps if s not in done
            and (now_stage == "stop" or (s in record.post_steps) == (now_stage == "post"))]
    if todo:
        deadline = _deadline(Phase.MIGRATE, policy, todo[0])
        return (_r(record, now, phase=Phase.MIGRATE, migrating=todo[0], migrator=None, deadline=deadline),
                (RunMigration(todo[0], record.digest), ArmDeadline(deadline)))
    if now_stage == "pre":
        return _begin_batches(record, now, policy)
    if now_stage == "post":
        return _finish(_r(record, now, migrating=None), Phase.DONE, None, now)
    deadline = _deadline(Phase.START, policy)
    release = record.release
    assert release is not None
    return (_r(record, now, phase=Phase.START, migrating=None, deadline=deadline),
            (StartOnHosts(record.hosts, release), ArmDeadline(deadline)))


def _rollback(record: Rollout, reason: str, now: float, policy: RolloutPolicy,
              outcome: Phase = Phase.FAILED) -> Result:
    """With the fleet stopped (after the cut-over of a recreate): restart the old release everywhere;
    the rollout ends `outcome`."""
    previous = record.previous
    if previous is None:
        return _finish(record, Phase.FAILED, f"{reason}; no earlier release to restart", now)
    deadline = _deadline(Phase.START, policy, rollback=True)
    progress = tuple(dataclasses.replace(p, status=HostStatus.STOPPED, at=now) for p in record.progress)
    record = _r(record, now, phase=Phase.START, rollback=True, outcome=outcome, reason=reason,
                migrating=None, deadline=deadline, progress=progress)
    return record, (RestartOldRelease(record.hosts, previous), ArmDeadline(deadline))


def _check_started(record: Rollout, now: float, policy: RolloutPolicy) -> Result:
    if any(p.status is HostStatus.STOPPED for p in record.progress):
        return record, ()
    failed = [p for p in record.progress if p.status is HostStatus.FAILED]
    if record.rollback:
        reason = record.reason or "rolled back"
        if failed:
            reason += f"; the old release did not start on: {', '.join(p.host for p in failed)}"
        return _finish(record, record.outcome or Phase.FAILED, reason, now)
    if failed:
        why = f"the release did not pass its health gate on {_failures(failed)}"
        if record.migrations in ("none", "expand") and policy.auto_rollback and record.previous is not None:
            # Its steps were declared safe to run with the old release: that one starts again.
            return _rollback(record, f"{why}; rolled back", now, policy, outcome=Phase.ROLLED_BACK)
        return _finish(record, Phase.HALTED,
                       f"{why}; its steps ran and the image does not declare them safe for the "
                       "previous release: an operator decides", now)
    return _finish(record, Phase.DONE, None, now)


def _failures(failed: Iterable[HostProgress]) -> str:
    return "; ".join(f"{p.host} ({p.reason or 'failed'})" for p in failed)


def _superseded(record: Rollout, when: str = "") -> str:
    assert record.newer is not None
    newer = record.newer.tag or "a refused version"
    return f"superseded by {newer} at revision {record.newer.revision}" + (f" {when}" if when else "")


# A rolling update: batches of hosts move one after the other; each host leaves the load balancer,
# restarts on the target release, passes its gate and comes back, and reports. The first failure
# rolls back: the hosts moved so far go back to the previous release, in batches of the same size.


def plan_batches(hosts: tuple[str, ...], policy: RolloutPolicy) -> tuple[tuple[tuple[str, ...], ...], int]:
    """A rolling update's batches of `hosts` (in their order), and how many hosts the first holds as its
    canary (0: none): the canary alone first, then batches of `max_unavailable`."""
    size = batch_size(policy.max_unavailable, len(hosts))
    canary = batch_size(policy.canary, len(hosts)) if policy.canary else 0
    first = (hosts[:canary],) if canary else ()
    return first + tuple(hosts[i:i + size] for i in range(canary, len(hosts), size)), canary


def _begin_batches(record: Rollout, now: float, policy: RolloutPolicy) -> Result:
    if not record.hosts:
        return _finish(record, Phase.FAILED, "no participating host left", now)
    # `norm undo` goes back to a release the fleet ran: like an automatic rollback, it has no canary.
    batches, canary = plan_batches(record.hosts, policy if record.undo is None
                                   else dataclasses.replace(policy, canary=""))
    record = _r(record, now, phase=Phase.ROLL, migrating=None, batches=batches, batch_index=0, canary=canary)
    if held(record):  # a boundary: paused or blocked, it waits before its first batch
        return _r(record, now, waiting="batch"), ()
    return _move_batch(record, now, policy)


def _move_batch(record: Rollout, now: float, policy: RolloutPolicy) -> Result:
    """Start moving the current batch (its hosts still taking part)."""
    target = record.previous if record.rollback else record.release
    assert target is not None
    batch = frozenset(record.batch)
    moving = tuple(h for h in record.batch if record.host(h) is not None)
    if not moving:
        return _batch_passed(record, now, policy)
    barrier = f"{'rollback' if record.rollback else 'batch'}:{record.batch_index}"
    deadline = Deadline(barrier, policy.progress_deadline)
    progress = tuple(dataclasses.replace(p, status=HostStatus.MOVING, reason=None, at=now)
                     if p.host in batch else p for p in record.progress)
    record = _r(record, now, deadline=deadline, progress=progress)
    return record, (MoveHosts(moving, target), ArmDeadline(deadline))


def _check_batch(record: Rollout, now: float, policy: RolloutPolicy) -> Result:
    if record.waiting is not None:
        return record, ()  # between two batches: none moving
    batch = frozenset(record.batch)
    if any(p.status is HostStatus.MOVING for p in record.progress if p.host in batch):
        return record, ()
    return _batch_passed(record, now, policy)


def _batch_passed(record: Rollout, now: float, policy: RolloutPolicy) -> Result:
    """Every host of the current batch reported (or left): the next batch, or what follows the last."""
    record = _r(record, now, batch_index=record.batch_index + 1, deadline=None)
    more = record.batch_index < len(record.batches)
    if record.rollback:
        if more:
            return _move_batch(record, now, policy)
        failed = [p for p in record.progress if p.status is HostStatus.FAILED
                  and any(p.host in b for b in record.batches)]
        reason = record.reason or "rolled back"
        if failed:
            reason += f"; the previous release did not come back on {_failures(failed)}"
        return _finish(record, Phase.ROLLED_BACK, reason, now)
    if more and record.newer is not None:
        return _finish(record, Phase.SUPERSEDED,
                       _superseded(record, f"after batch {record.batch_index} of {len(record.batches)}"),
                       now)
    if record.canary and record.batch_index == 1:  # the canary moved and passed its gate: watched
        record = _r(record, now, waiting="canary")
        return record, (RunAnalysis(record.revision, canary_hosts(record)),)
    return _continue_batches(record, now, policy)


def _continue_batches(record: Rollout, now: float, policy: RolloutPolicy) -> Result:
    """From a boundary between batches: the next batch (unless paused or blocked: it waits before it),
    or, after the last, the `post` steps."""
    more = record.batch_index < len(record.batches)
    if more and held(record):
        return _r(record, now, waiting="batch"), ()
    record = _r(record, now, waiting=None)
    if more:
        return _move_batch(record, now, policy)
    return _next_step(record, now, policy)  # the `post` steps, then done


def canary_hosts(record: Rollout) -> tuple[str, ...]:
    """The hosts of a rolling update's canary batch still taking part (none without a canary)."""
    if not record.canary or not record.batches:
        return ()
    return tuple(h for h in record.batches[0] if record.host(h) is not None)


def _gate_failed(record: Rollout, host: str, reason: str, now: float, policy: RolloutPolicy) -> Result:
    why = f"{host} failed its health gate on {record.tag}: {reason}"
    if not policy.auto_rollback:
        return _finish(record, Phase.HALTED, f"{why}; automatic rollback is off: an operator decides", now)
    return _roll_back_batches(record, why, now, policy)


def _roll_back_batches(record: Rollout, reason: str, now: float, policy: RolloutPolicy) -> Result:
    """Every host moved so far (the current batch's too) back on the previous release: the latest
    moved first, in batches of the same size; the rollout ends rolled back."""
    assert record.previous is not None  # a rolling update has a release to keep serving
    # Between two batches (waiting), the batch at the index has not moved.
    upto = record.batch_index + (0 if record.waiting is not None else 1)
    moved = [h for b in record.batches[:upto] for h in b if record.host(h) is not None]
    moved.reverse()
    size = batch_size(policy.max_unavailable, len(record.hosts))
    batches = tuple(tuple(moved[i:i + size]) for i in range(0, len(moved), size))
    record = _r(record, now, rollback=True, outcome=Phase.ROLLED_BACK, reason=reason, batches=batches,
                batch_index=0, deadline=None, waiting=None)
    if not batches:
        return _finish(record, Phase.ROLLED_BACK, reason, now)
    return _move_batch(record, now, policy)


# Each rule: (record, event, now, policy) -> (record, commands)


def _late(record: Rollout, event: Event, now: float, policy: RolloutPolicy) -> Result:
    """Legitimately late or duplicate: nothing changes."""
    return record, ()


def _on_resolved(record: Rollout, event: Resolved, now: float, policy: RolloutPolicy) -> Result:
    digest = event.digest
    if not values.DIGEST.fullmatch(digest):
        return _finish(record, Phase.FAILED, "the registry answered with a malformed digest", now)
    record = _r(record, now, digest=digest)
    if record.pinned is not None and digest != record.pinned:
        return _finish(record, Phase.FAILED,
                       f"{record.tag} now names another image than the release gone back to "
                       f"({record.pinned}): the tag was pushed again; nothing was touched", now)
    if record.previous is not None and record.previous.digest == digest:
        return _finish(record, Phase.DONE, f"{record.tag} is the release already running", now)
    steps = policy.steps
    compatible = record.tag in policy.compatible or digest in policy.compatible
    floor = rollback_floor(record.ledger, digest)
    if floor is not None and not compatible:
        return _finish(record, Phase.FAILED,
                       f"{record.tag} is below the rollback floor: step {floor.step} of {floor.tag} ran "
                       "after every host had moved to it (contract), and the release before cannot run "
                       "on what it left; going back is refused (no down-migrations)", now)
    if is_setback(record.ledger, digest):
        if not compatible:
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
    record = _r(record, now, phase=Phase.PULL, steps=steps, deadline=deadline, gate=policy.gate,
                post_steps=tuple(s for s in steps if s in policy.post_steps),
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
    if record.migrations is None and event.migrations is not None:
        record = _r(record, now, migrations=event.migrations)  # one image, one label: the first says it
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
        record, commands = _check_started(record, now, policy)
    elif record.phase is Phase.ROLL:
        record, commands = _check_batch(record, now, policy)
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
        entry = _ledger_entry(record, record.migrating, False, now, unknown=True)
        return _finish(_r(record, now, ledger=(*record.ledger, entry)), Phase.HALTED,
                       f"step {record.migrating} gave no result in time; it may or may not have run: "
                       "an operator checks", now)
    if record.phase is Phase.ROLL:
        return _batch_deadline(record, now, policy)
    # START: whoever has not reported has failed.
    for p in record.progress:
        if p.status is HostStatus.STOPPED:
            record = _set_host(record, p.host, now, status=HostStatus.FAILED,
                               reason="no report in time")
    return _check_started(record, now, policy)


def _batch_deadline(record: Rollout, now: float, policy: RolloutPolicy) -> Result:
    """A batch that made no progress in time: its hosts that have not reported have failed."""
    batch = frozenset(record.batch)
    late = [p.host for p in record.progress if p.host in batch and p.status is HostStatus.MOVING]
    why = f"no report within the progress deadline ({policy.progress_deadline:g} s)"
    for host in late:
        record = _set_host(record, host, now, status=HostStatus.FAILED, reason=why)
    if record.rollback or not late:
        return _check_batch(record, now, policy)
    return _gate_failed(record, late[0], why, now, policy)


def _on_stopped(record: Rollout, event: HostStopped, now: float, policy: RolloutPolicy) -> Result:
    p = _participant(record, event, event.host)
    if p is None or p.status is HostStatus.STOPPED:
        return record, ()
    record = _set_host(record, event.host, now, status=HostStatus.STOPPED)
    return _check_stopped(record, now, policy)


def _ledger_entry(record: Rollout, step: str, ok: bool, now: float, unknown: bool = False) -> LedgerEntry:
    assert record.digest is not None
    return LedgerEntry(record.digest, record.tag, step, ok, record.revision, now, unknown=unknown,
                       stage=stage(record))


def _ledger_has(record: Rollout, step: str, ok: bool) -> bool:
    return any(e.digest == record.digest and e.step == step and e.ok == ok and e.revision == record.revision
               for e in record.ledger)


def _on_migrated(record: Rollout, event: MigrationSucceeded, now: float, policy: RolloutPolicy) -> Result:
    if record.migrating != event.step:
        return _on_late_migration(record, event, now, policy)
    assert record.digest is not None
    entry = _ledger_entry(record, event.step, True, now)
    record = _r(record, now, ledger=(*record.ledger, entry), migrating=None, deadline=None)
    if record.abort_by is not None and not serving_previous(record):
        return _finish(record, Phase.HALTED,
                       f"aborted by {record.abort_by} while step {event.step} ran; it completed, and "
                       "going back needs an operator", now)
    return _next_step(record, now, policy)


def _on_migration_failed(record: Rollout, event: MigrationFailed, now: float,
                         policy: RolloutPolicy) -> Result:
    if record.migrating != event.step:
        return _on_late_migration(record, event, now, policy)
    assert record.digest is not None
    entry = _ledger_entry(record, event.step, False, now)
    record = _r(record, now, ledger=(*record.ledger, entry), migrating=None, deadline=None)
    reason = f"step {event.step} failed: {event.reason}"
    if serving_previous(record):
        return _finish(record, Phase.FAILED, f"{reason}; no host had moved", now)
    if record.rolled:
        return _finish(record, Phase.FAILED, f"{reason}; every host runs the new release, the step's "
                       "work is not done: an operator decides", now)
    return _rollback(record, reason, now, policy)


def _on_migration_unknown(record: Rollout, event: MigrationUnknown, now: float,
                          policy: RolloutPolicy) -> Result:
    if record.migrating != event.step:
        return _on_late_migration(record, event, now, policy)
    assert record.digest is not None
    # In the ledger as such: a later rollout of this image halts before touching anything until an
    # operator has checked the step and recorded how it ended.
    entry = _ledger_entry(record, event.step, False, now, unknown=True)
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
    return _check_started(record, now, policy)


def _on_moved(record: Rollout, event: HostActive | HostFailed, now: float, policy: RolloutPolicy) -> Result:
    p = _participant(record, event, event.host)
    if p is None or p.status is not HostStatus.MOVING or event.host not in record.batch:
        return record, ()  # late: of an earlier batch, or before a rollback
    if isinstance(event, HostActive):
        return _check_batch(_set_host(record, event.host, now, status=HostStatus.ACTIVE), now, policy)
    record = _set_host(record, event.host, now, status=HostStatus.FAILED, reason=event.reason)
    if record.rollback:
        return _check_batch(record, now, policy)
    return _gate_failed(record, event.host, event.reason, now, policy)


def _on_newer(record: Rollout, event: NewerVersion, now: float, policy: RolloutPolicy) -> Result:
    latest = record.revision if record.newer is None else record.newer.revision
    if event.revision <= latest:
        return record, ()  # stale
    if record.terminal:
        return record, (BeginRollout(event.tag, event.revision),)
    # A tag outside the grammar is refused when its rollout begins; it is not stored meanwhile.
    record = _r(record, now, newer=Pending(event.tag if is_tag(event.tag) else "", event.revision))
    if record.phase in BEFORE_CUTOVER:
        return _finish(record, Phase.SUPERSEDED, _superseded(record), now)
    if record.waiting is not None and not record.rollback:  # at a boundary between batches: now
        return _finish(record, Phase.SUPERSEDED,
                       _superseded(record, f"after batch {record.batch_index} of {len(record.batches)}"),
                       now)
    return record, ()  # cut over: finish first, then the newer one starts


def _on_abort(record: Rollout, event: Abort, now: float, policy: RolloutPolicy) -> Result:
    reason = f"aborted by {event.by}"
    if record.phase in BEFORE_CUTOVER:
        return _finish(record, Phase.FAILED, reason, now)
    if record.phase is Phase.STOP:
        return _rollback(record, reason, now, policy)
    if record.phase is Phase.MIGRATE:
        return (record, ()) if record.abort_by is not None else (_r(record, now, abort_by=event.by), ())
    if record.phase is Phase.ROLL and not record.rollback:
        return _roll_back_batches(record, reason, now, policy)
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
    if record.waiting is not None:  # at a boundary: nothing moving; a canary's analysis starts over
        analyse = record.waiting == "canary" and record.pause is None
        return record, ((RunAnalysis(record.revision, canary_hosts(record)),) if analyse else ())
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
    if record.phase is Phase.ROLL:
        target = record.previous if record.rollback else record.release
        assert target is not None
        batch = frozenset(record.batch)
        moving = tuple(p.host for p in record.progress if p.host in batch and p.status is HostStatus.MOVING)
        return record, (MoveHosts(moving, target), *arm)
    left = tuple(p.host for p in record.progress if p.status is HostStatus.STOPPED)
    if record.rollback:
        assert record.previous is not None
        return record, (RestartOldRelease(left, record.previous), *arm)
    assert record.release is not None
    return record, (StartOnHosts(left, record.release), *arm)


def _taken(record: Rollout, request: int) -> bool:
    return any(a.request == request for a in record.actions)


def _act(record: Rollout, kind: ActionKind, by: str, request: int, now: float, **changes: Any) -> Rollout:
    return _r(record, now, actions=(*record.actions, Action(kind, by, now, request)), **changes)


def _on_pause(record: Rollout, event: PauseAsked, now: float, policy: RolloutPolicy) -> Result:
    """Held at the next boundary: once every host pulled, or before the next batch (never in the middle
    of a host's move or of a step). A recreate past its pull has no boundary left: it finishes."""
    if _taken(record, event.request):
        return record, ()
    return _act(record, "pause", event.by, event.request, now,
                pause=record.pause or f"paused by {event.by}"), ()


def _on_resume(record: Rollout, event: ResumeAsked, now: float, policy: RolloutPolicy) -> Result:
    if _taken(record, event.request):
        return record, ()
    paused = record.pause is not None
    record = _act(record, "resume", event.by, event.request, now, pause=None)
    return _go_on(record, now, policy, analyse_again=paused)


def _go_on(record: Rollout, now: float, policy: RolloutPolicy, *, analyse_again: bool = False) -> Result:
    """A pause or a block ended: from the boundary it waits at, on (unless still held)."""
    if record.waiting == "pull":
        return _after_pull(record, now, policy) if not held(record) else (record, ())
    if record.waiting == "batch":
        return _continue_batches(record, now, policy)
    if record.waiting == "canary" and analyse_again:  # its analysis was inconclusive, or paused: again
        return record, (RunAnalysis(record.revision, canary_hosts(record)),)
    return record, ()


def _on_blocked(record: Rollout, event: Blocked, now: float, policy: RolloutPolicy) -> Result:
    return (record, ()) if record.blocked == event.reason else (_r(record, now, blocked=event.reason), ())


def _on_unblocked(record: Rollout, event: Unblocked, now: float, policy: RolloutPolicy) -> Result:
    if record.blocked is None:
        return record, ()
    return _go_on(_r(record, now, blocked=None), now, policy)


def _on_promote(record: Rollout, event: PromoteAsked, now: float, policy: RolloutPolicy) -> Result:
    """The canary's wait ends: the rest of the batches go (a pause asked meanwhile ends with it)."""
    if _taken(record, event.request):
        return record, ()
    if record.waiting != "canary":
        return _act(record, "promote", event.by, event.request, now), ()
    return _continue_batches(_act(record, "promote", event.by, event.request, now, pause=None), now, policy)


def _on_analysis(record: Rollout, event: AnalysisEnded, now: float, policy: RolloutPolicy) -> Result:
    if event.revision != record.revision or record.waiting != "canary" or record.pause is not None:
        return record, ()  # late: promoted, paused or moved on meanwhile
    if event.verdict == "passed":
        return _continue_batches(record, now, policy)
    reason = event.reason or "no reason given"
    if event.verdict == "inconclusive":
        return _r(record, now, pause=f"the canary's analysis was inconclusive: {reason}"), ()
    why = f"the canary ({', '.join(canary_hosts(record)) or 'gone'}) failed its analysis: {reason}"
    if not policy.auto_rollback:
        return _finish(record, Phase.HALTED, f"{why}; automatic rollback is off: an operator decides", now)
    return _roll_back_batches(record, why, now, policy)


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


# Where the pull barrier's end may lead: the cut-over of a recreate, or a rolling update's `pre` steps
# or first batch (which may end at once, its hosts all gone).
_AFTER_PULL = (Phase.PULL, Phase.STOP, Phase.MIGRATE, Phase.ROLL, Phase.DONE, Phase.FAILED)
# Where a step's end may lead: the next step, the start, the batches or the end.
_AFTER_STEP = (Phase.MIGRATE, Phase.START, Phase.ROLL, Phase.DONE, Phase.FAILED, Phase.SUPERSEDED,
               Phase.HALTED, Phase.ROLLED_BACK)
# Where the start's reports may lead (a release failing its gate: a rollback, or a halt).
_AFTER_START = (Phase.START, Phase.DONE, Phase.FAILED, Phase.HALTED, Phase.ROLLED_BACK)
# Where a batch's end may lead: the next batch, the post steps, or the rollout's end.
_AFTER_BATCH = (Phase.ROLL, Phase.MIGRATE, Phase.DONE, Phase.SUPERSEDED, Phase.HALTED, Phase.ROLLED_BACK)

TRANSITIONS: dict[tuple[Phase, type[Event]], Rule] = {
    (Phase.RESOLVE, Resolved): _rule(_on_resolved, Phase.PULL, Phase.DONE, Phase.FAILED, Phase.HALTED),
    (Phase.RESOLVE, ResolveFailed): _rule(_on_resolve_failed, Phase.FAILED),
    (Phase.RESOLVE, HostLost): _rule(_on_lost, Phase.RESOLVE, Phase.FAILED),
    (Phase.RESOLVE, NewerVersion): _rule(_on_newer, Phase.RESOLVE, Phase.SUPERSEDED),
    (Phase.RESOLVE, Abort): _rule(_on_abort, Phase.FAILED),
    (Phase.RESOLVE, Resumed): _rule(_on_resumed, Phase.RESOLVE),

    (Phase.PULL, Resolved): _rule(_on_late_resolved, Phase.PULL),
    (Phase.PULL, HostPulled): _rule(_on_pulled, *_AFTER_PULL),
    (Phase.PULL, HostPullFailed): _rule(_on_pull_failed, *_AFTER_PULL),
    (Phase.PULL, HostLost): _rule(_on_lost, *_AFTER_PULL),
    (Phase.PULL, BarrierDeadline): _rule(_on_deadline, *_AFTER_PULL),
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
    (Phase.MIGRATE, MigrationSucceeded): _rule(_on_migrated, *_AFTER_STEP),
    (Phase.MIGRATE, MigrationFailed): _rule(_on_migration_failed, Phase.START, Phase.FAILED),
    (Phase.MIGRATE, MigrationUnknown): _rule(_on_migration_unknown, Phase.MIGRATE, Phase.HALTED),
    (Phase.MIGRATE, NewerVersion): _rule(_on_newer, Phase.MIGRATE),
    (Phase.MIGRATE, Abort): _rule(_on_abort, Phase.MIGRATE),
    (Phase.MIGRATE, Resumed): _rule(_on_resumed, *_AFTER_STEP),

    (Phase.START, HostPulled): _rule(_on_late_pulled, Phase.START),
    (Phase.START, HostPullFailed): _rule(_on_late_host_report, Phase.START),
    (Phase.START, HostStopped): _rule(_on_late_host_report, Phase.START),
    (Phase.START, MigrationSucceeded): _rule(_on_late_migration, Phase.START),
    (Phase.START, MigrationFailed): _rule(_on_late_migration, Phase.START),
    (Phase.START, MigrationUnknown): _rule(_on_late_migration, Phase.START),
    (Phase.START, HostActive): _rule(_on_started, *_AFTER_START),
    (Phase.START, HostFailed): _rule(_on_started, *_AFTER_START),
    (Phase.START, HostLost): _rule(_on_lost, *_AFTER_START),
    (Phase.START, BarrierDeadline): _rule(_on_deadline, *_AFTER_START),
    (Phase.START, NewerVersion): _rule(_on_newer, Phase.START),
    (Phase.START, Abort): _rule(_on_abort, Phase.START, Phase.HALTED),
    (Phase.START, Resumed): _rule(_on_resumed, Phase.START),

    (Phase.ROLL, HostPulled): _rule(_on_late_pulled, Phase.ROLL),
    (Phase.ROLL, HostPullFailed): _rule(_on_late_host_report, Phase.ROLL),
    (Phase.ROLL, HostStopped): _rule(_on_late_host_report, Phase.ROLL),
    (Phase.ROLL, MigrationSucceeded): _rule(_on_late_migration, Phase.ROLL),
    (Phase.ROLL, MigrationFailed): _rule(_on_late_migration, Phase.ROLL),
    (Phase.ROLL, MigrationUnknown): _rule(_on_late_migration, Phase.ROLL),
    (Phase.ROLL, HostActive): _rule(_on_moved, *_AFTER_BATCH),
    (Phase.ROLL, HostFailed): _rule(_on_moved, *_AFTER_BATCH),
    (Phase.ROLL, HostLost): _rule(_on_lost, *_AFTER_BATCH),
    (Phase.ROLL, BarrierDeadline): _rule(_on_deadline, *_AFTER_BATCH),
    (Phase.ROLL, NewerVersion): _rule(_on_newer, Phase.ROLL, Phase.SUPERSEDED),  # at once between batches
    (Phase.ROLL, Abort): _rule(_on_abort, Phase.ROLL, Phase.ROLLED_BACK),
    (Phase.ROLL, Resumed): _rule(_on_resumed, Phase.ROLL),
    (Phase.ROLL, AnalysisEnded): _rule(_on_analysis, *_AFTER_BATCH),
}
# An operator's pause, resume and promote, in every phase a rollout is under way: a resume at the pull's
# end goes on where the pull barrier would have; between batches, where the batch's end would have.
for _phase in (Phase.RESOLVE, Phase.PULL, Phase.STOP, Phase.MIGRATE, Phase.START, Phase.ROLL):
    _on = {Phase.PULL: _AFTER_PULL, Phase.ROLL: _AFTER_BATCH}.get(_phase, (_phase,))
    TRANSITIONS[_phase, PauseAsked] = _rule(_on_pause, _phase)
    TRANSITIONS[_phase, ResumeAsked] = _rule(_on_resume, *_on)
    TRANSITIONS[_phase, PromoteAsked] = _rule(_on_promote, *_on)
    TRANSITIONS[_phase, Blocked] = _rule(_on_blocked, _phase)
    TRANSITIONS[_phase, Unblocked] = _rule(_on_unblocked, *_on)
    if _phase is not Phase.ROLL:
        TRANSITIONS[_phase, AnalysisEnded] = _rule(_late, _phase)
del _on
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
