"""The rollout record: what the leader keeps in etcd of a fleet update, as frozen data.

norm.core.rollout is the state machine that steps it; norm.core.protocol lays it out in etcd with the
header and the hosts' reports. A record is read back by every leader to come, and the tags and
digests it holds end up in the hosts' release files: it is decoded strictly (norm.core.wire), every
value held to the grammar it was written with (norm.core.values), and to what the state machine
relies on across its fields.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Annotated, Literal

from norm.core import values, wire
from norm.core.gate import Migrations  # what an image declares its migrations to be (its label)
from norm.core.policy import FleetPolicy
from norm.core.wire import Digest, MachineId, StepName, Text


class Phase(enum.StrEnum):
    RESOLVE = "resolve"
    PULL = "pull"
    STOP = "stop"
    MIGRATE = "migrate"
    START = "start"
    ROLL = "roll"  # a rolling update: batch after batch of hosts moves to the target release
    DONE = "done"
    FAILED = "failed"
    SUPERSEDED = "superseded"
    HALTED = "halted"
    ROLLED_BACK = "rolled_back"  # a rolling update put every host it had moved back on the previous release


TERMINAL = frozenset({Phase.DONE, Phase.FAILED, Phase.SUPERSEDED, Phase.HALTED, Phase.ROLLED_BACK})

Strategy = Literal["recreate", "rolling"]
# Where a rollout waits, paused (an operator's pause, or an inconclusive analysis) or for its canary's
# analysis: with every host pulled, before its next batch, or with its canary batch moved.
Wait = Literal["pull", "batch", "canary"]
ActionKind = Literal["pause", "resume", "promote"]
Stage = Literal["stop", "pre", "post"]  # when a step ran: with the fleet stopped, before or after the batches


class HostStatus(enum.StrEnum):
    PENDING = "pending"  # asked to pull
    PULLED = "pulled"  # has the image by `digest`
    STOPPED = "stopped"  # units stopped; awaiting the start report
    ACTIVE = "active"
    FAILED = "failed"  # units did not start, or did not pass the health gate
    MOVING = "moving"  # in a rolling batch: leaving the load balancer, restarting, gated; awaiting its report


def _positive(v: float, name: str) -> float:
    if not v > 0:
        raise ValueError(f"{name}: must be a positive number")
    return v


def _not_negative(v: float, name: str) -> float:
    if not v >= 0:
        raise ValueError(f"{name}: must not be negative")
    return v


def _tag_or_refused(v: str, name: str) -> str:
    """A tag, or "": a desired value that was refused (never stored: it may be hostile)."""
    return v if v == "" else values.tag(v, name)


def _absolute_deadline(v: object) -> object:
    """A number is the absolute time an earlier version kept as the deadline: meaningless on another
    clock. It reads as no deadline: the leader that resumes the record gives the barrier its timeout
    afresh."""
    return None if isinstance(v, int | float) and not isinstance(v, bool) else v


@dataclass(frozen=True)
class Release:
    tag: wire.Tag
    digest: Digest


@dataclass(frozen=True)
class HostProgress:
    host: MachineId
    status: HostStatus = HostStatus.PENDING
    digest: Digest | None = None  # what the host reported pulling; kept once set
    reason: Text | None = None  # last trouble reported
    at: float = 0.0  # when the status last changed


@dataclass(frozen=True)
class Excluded:
    host: MachineId
    reason: Text
    phase: Phase


@dataclass(frozen=True)
class LedgerEntry:
    """One run of one step for one image. Carried from record to record: the ledger is what makes a
    step run once per digest, and what tells a setback from a new version."""

    digest: Digest
    tag: wire.Tag
    step: StepName
    ok: bool
    revision: int
    at: float
    unknown: bool = False  # not ok, and whether it ran (wholly, in part, at all) cannot be known
    # When it ran: "stop" with the fleet stopped (a recreate: it may break the release before), "pre"
    # while the previous release served (expand: it does not), "post" once every host ran this image
    # (contract: the previous release may not run on it again; the rollback floor).
    stage: Stage = "stop"

    def encode(self) -> bytes:
        """As its own ledger key holds it."""
        return wire.encode(self, compact=False)


def decode_ledger_entry(raw: bytes, where: str) -> LedgerEntry:
    """A ledger entry as its own key holds it (JSON of the entry's fields), strictly."""
    return wire.read(LedgerEntry, raw, where, "ledger entry")


@dataclass(frozen=True)
class Deadline:
    """How long the current barrier may last, and which barrier it is. A duration, never a time of
    day: the leader arms it on its monotonic clock when the barrier begins, and a leader that resumes
    the record arms it again, in full."""

    # "pull", "stop", "migrate:<step>", "start", "rollback", "batch:<i>" or "rollback:<i>": unique
    # within a rollout
    barrier: str
    seconds: Annotated[float, wire.Check(_positive)]


@dataclass(frozen=True)
class Gate:
    """When a host counts as started on a release: every unit it restarted active, and its health
    check passing, continuously for `min_healthy` seconds, within `healthy_deadline` of the start."""

    min_healthy: Annotated[float, wire.Check(_not_negative)] = 0.0
    healthy_deadline: Annotated[float, wire.Check(_positive)] = 300.0


@dataclass(frozen=True)
class Pending:
    """A newer desired version waiting for this rollout to finish (it had cut over)."""

    tag: Annotated[str, wire.Check(_tag_or_refused)]
    revision: int


@dataclass(frozen=True)
class Action:
    """An operator's request on a rollout, as the leader took it: what, by whom, and when (the
    leader's wall clock, for display). `request` is the request key's revision: the same request read
    again (a new leader re-reads them all) is taken once."""

    kind: ActionKind
    by: Text
    at: float
    request: int


@dataclass(frozen=True)
class Asked:
    """Who asked for a desired version (`norm deploy`, in the transaction that writes it); for `norm
    undo`, the release it goes back to: the digest the tag must still resolve to, and the rollout that
    deployed it."""

    by: Text
    digest: Digest | None = None
    undo: int | None = None
    now: bool = False  # `norm deploy --now`: the maintenance windows and blocking alerts do not hold it


@dataclass(frozen=True)
class Rollout:
    revision: int  # mod revision of the desired version key: the rollout's identity
    tag: str  # "" for a refused desired value (see _check)
    hosts: tuple[MachineId, ...]  # participating machine ids, sorted
    phase: Phase
    started_at: float
    updated_at: float
    previous: Release | None = None  # what ran before: the rollback target
    digest: Digest | None = None  # resolved once, in RESOLVE
    progress: tuple[HostProgress, ...] = ()  # one per participating host, same order as `hosts`
    excluded: tuple[Excluded, ...] = ()
    deadline: Annotated[Deadline | None, wire.Before(_absolute_deadline)] = None  # the current barrier's
    steps: tuple[StepName, ...] = ()  # steps this rollout must run, fixed when resolved
    migrating: StepName | None = None  # step issued and not yet reported
    migrator: MachineId | None = None  # the host running it: the leader that issued it (set by the shell)
    ledger: tuple[LedgerEntry, ...] = ()
    rollback: bool = False  # START is restarting `previous`
    outcome: Phase | None = None  # decided outcome (terminal phase), also during a rollback
    reason: Text | None = None
    newer: Pending | None = None
    abort_by: Text | None = None  # abort asked while a step ran
    ended_at: float | None = None
    # Chosen once every host pulled: how the hosts move, and why (norm.core.rollout.choose_strategy).
    strategy: Strategy | None = None
    strategy_reason: Text | None = None
    migrations: Migrations | None = None  # what the image declares (its label), as its hosts read it
    post_steps: tuple[StepName, ...] = ()  # of `steps`, those that run after the batches (contract)
    gate: Gate = Gate()
    # A rolling update's batches (of a rollback, once it rolls back) and the one moving now; past the
    # last one (index == len) once every batch passed.
    batches: tuple[tuple[MachineId, ...], ...] = ()
    batch_index: int = 0
    policy: FleetPolicy | None = None  # the fleet's policy when it began (None: written before policies)
    # Why it holds at its next boundary (who paused it, or what paused it), until resumed; and the
    # boundary where it waits now (paused there, or for its canary's analysis).
    pause: Text | None = None
    waiting: Wait | None = None
    canary: int = 0  # hosts in the first batch of a rolling update that is its canary (0: none)
    actions: tuple[Action, ...] = ()  # operators' requests taken on it, in order
    by: Text | None = None  # who asked for it (`norm deploy --by`); None: the version key written otherwise
    # `norm undo`: the digest the tag must resolve to (the release gone back to), and the rollout that
    # deployed that release
    pinned: Digest | None = None
    undo: int | None = None
    # Why it may not advance now (outside the maintenance windows, alerts firing), and whether it was
    # asked to go on regardless (`norm deploy --now`). Held at a boundary like a pause, it goes on by
    # itself once no longer blocked.
    blocked: Text | None = None
    override: bool = False

    @property
    def release(self) -> Release | None:
        return None if self.digest is None else Release(self.tag, self.digest)

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL

    @property
    def batch(self) -> tuple[str, ...]:
        """The hosts of the batch moving now (none outside the roll phase, nor between two batches)."""
        if self.phase is not Phase.ROLL or self.waiting is not None or self.batch_index >= len(self.batches):
            return ()
        return self.batches[self.batch_index]

    @property
    def rolled(self) -> bool:
        """Whether a rolling update moved every batch: its post steps may run."""
        return self.strategy == "rolling" and bool(self.batches) and not self.rollback \
            and self.batch_index >= len(self.batches)

    def host(self, machine_id: str) -> HostProgress | None:
        for p in self.progress:
            if p.host == machine_id:
                return p
        return None

    def encode(self) -> bytes:
        return wire.encode(self)

    @classmethod
    def decode(cls, raw: bytes, where: str) -> Rollout:
        """The record `raw` holds, strictly; InvalidValue naming the field at fault, never its value."""
        return wire.read(cls, raw, where, "rollout record", check=_check)


def _check(r: Rollout) -> None:
    _check_consistent(r)
    _check_values(r)


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
    if r.rollback and (r.previous is None or r.outcome not in (Phase.FAILED, Phase.ROLLED_BACK)):
        raise ValueError("rollback: needs the previous release and a failed outcome")
    if r.phase is Phase.ROLL and (r.strategy != "rolling" or r.batch_index >= len(r.batches)):
        raise ValueError("batches: a rolling update's current batch")
    if r.batch_index < 0 or r.batch_index > len(r.batches):
        raise ValueError("batch_index: out of the batches")
    if not set(r.post_steps) <= set(r.steps):
        raise ValueError("post_steps: must be among the steps")
    _check_waiting(r)


def _check_waiting(r: Rollout) -> None:
    if r.waiting == "pull" and r.phase is not Phase.PULL:
        raise ValueError("waiting: at the pull's end only in the pull phase")
    if r.waiting in ("batch", "canary") and r.phase is not Phase.ROLL:
        raise ValueError("waiting: before a batch only in the roll phase")
    if r.canary < 0:
        raise ValueError("canary: must not be negative")


def _check_values(r: Rollout) -> None:
    """The grammar of what the fields' annotations cannot say alone."""
    if r.tag or not r.terminal or r.digest is not None:  # a refused desired value is recorded as ""
        values.tag(r.tag, "tag")

