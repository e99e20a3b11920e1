"""What the `norm` command knows of the one rollout it follows (`deploy --wait`, `rollout`, `status`).

A frozen model, built from the values read from etcd: the header (the one etcd holds now, and the
followed rollout's once it began), the rollout's own keys (record, participants), its reports (the
hosts' own ranges, or the previous layout's keys under the rollout's), the hosts' names, and the
outcome once the rollout has ended. The caller does the reading: each function here takes what was
read and returns the new model; `outcome_keys()` and `wants_names()` say what else to read. Values
that do not decode are skipped and listed in `skipped`, for the caller to say. No I/O here.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from norm.core import protocol as proto
from norm.core import wire
from norm.core.errors import InvalidValue
from norm.core.host import HostRecord, parse_machine_id
from norm.core.protocol import Header
from norm.core.record import TERMINAL, Rollout


class Verdict(enum.StrEnum):
    NONE = "none"  # there is no rollout
    WAITING = "waiting"  # the rollout followed has not begun (the leader has not taken it up yet)
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SUPERSEDED = "superseded"
    HALTED = "halted"
    ROLLED_BACK = "rolled_back"


ENDED = frozenset({Verdict.DONE, Verdict.FAILED, Verdict.SUPERSEDED, Verdict.HALTED, Verdict.ROLLED_BACK})


def verdict(header: Header | None) -> Verdict:
    if header is None:
        return Verdict.NONE
    if header.phase in TERMINAL:
        return Verdict(header.phase.value)
    return Verdict.RUNNING


class Entry(Protocol):
    """A key and its value as read from etcd."""

    @property
    def key(self) -> str: ...

    @property
    def value(self) -> bytes: ...


@dataclass(frozen=True)
class Skipped:
    """A value read that does not decode: it is left out, and the operator is told."""

    key: str
    reason: str


Reports = Mapping[tuple[str, str], Mapping[str, Any]]  # (kind, machine id or step) -> report value


@dataclass(frozen=True)
class Tracker:
    """One rollout (revision `want`) as the CLI last read it."""

    prefix: str
    want: int
    header: Header | None = None  # the header of `want`, once seen
    current: Header | None = None  # the header etcd holds now
    listed: tuple[str, ...] = ()  # <prefix>/rollouts/<want>/hosts
    reports: Reports = field(default_factory=dict)
    record: Rollout | None = None
    names: Mapping[str, str] = field(default_factory=dict)  # machine id -> host name
    superseded_by: Header | None = None  # a later rollout took over before `want` had an outcome
    skipped: tuple[Skipped, ...] = ()  # what did not decode, not yet said
    named: bool = False  # the host names were read at least once
    tried: frozenset[str] = frozenset()  # participants looked for by name once already

    @property
    def verdict(self) -> Verdict:
        if self.superseded_by is not None:
            return Verdict.SUPERSEDED
        return Verdict.WAITING if self.header is None else verdict(self.header)

    def said(self) -> Tracker:
        """The model once its `skipped` values have been told."""
        return dataclasses.replace(self, skipped=()) if self.skipped else self


def decode_header(entry: Entry) -> Header | Skipped:
    try:
        return Header.decode(entry.value, entry.key)
    except InvalidValue as e:
        return Skipped(entry.key, e.reason)


def decode_hosts(entries: Iterable[Entry]) -> tuple[list[HostRecord], list[Skipped]]:
    """The host records among `entries` (<prefix>/hosts/...), and those that do not decode."""
    records, skipped = [], []
    for e in entries:
        try:
            records.append(HostRecord.decode(e.value, e.key))
        except InvalidValue as err:
            skipped.append(Skipped(e.key, err.reason))
    return records, skipped


# ---------------------------------------------------------------------------------------------------
# The header


def header_changed(t: Tracker, entry: Entry | None) -> Tracker:
    """The header as read (None: there is none)."""
    h, skipped = None, t.skipped
    if entry is not None:
        decoded = decode_header(entry)
        if isinstance(decoded, Skipped):
            skipped = (*skipped, decoded)
        else:
            h = decoded
    current = h if entry is None or h is not None else t.current
    header = h if h is not None and h.revision == t.want else t.header
    return dataclasses.replace(t, current=current, header=header, skipped=skipped)


def headers_listed(t: Tracker, entries: Sequence[Entry]) -> Tracker:
    """The header as a listing found it: `entries` holds it, or nothing."""
    t = dataclasses.replace(t, current=None)
    for e in entries:
        t = header_changed(t, e)
    return t


# ---------------------------------------------------------------------------------------------------
# The rollout's own keys: record, participants, reports


def rollout_listed(t: Tracker, entries: Sequence[Entry]) -> Tracker:
    """The followed rollout's keys as a listing found them (all of them: what is missing is gone)."""
    t = dataclasses.replace(t, listed=(), reports={}, record=None)
    for e in entries:
        t = rollout_changed(t, e)
    return t


def rollout_changed(t: Tracker, entry: Entry, deleted: bool = False) -> Tracker:
    """One of the followed rollout's keys (its record, its participants, a report of it), written (or
    deleted); a key of another rollout changes nothing."""
    mine = proto.rollout_prefix(t.prefix, t.want)
    rest = entry.key.removeprefix(mine) if entry.key.startswith(mine) else None
    if deleted:
        return _rollout_deleted(t, rest, entry.key)
    try:
        if rest == "record":
            record = Rollout.decode(entry.value, entry.key)
            return dataclasses.replace(t, record=record) if record.revision == t.want else t
        if rest == "hosts":
            try:
                listed = wire.decode(tuple[str, ...], wire.parse(entry.value, entry.key))
            except ValueError:
                raise InvalidValue(entry.key, "not a list of machine ids") from None
            return dataclasses.replace(t, listed=tuple(parse_machine_id(m, entry.key) for m in listed))
        if (report := proto.parse_report(t.prefix, t.want, entry.key, entry.value)) is not None:
            return dataclasses.replace(t, reports={**t.reports, (report.kind, report.name): report.value})
    except InvalidValue as e:
        return dataclasses.replace(t, skipped=(*t.skipped, Skipped(entry.key, e.reason)))
    except (ValueError, RecursionError):
        return dataclasses.replace(t, skipped=(*t.skipped, Skipped(entry.key, "not JSON")))
    return t


def _rollout_deleted(t: Tracker, rest: str | None, key: str) -> Tracker:
    if rest == "record":
        return dataclasses.replace(t, record=None)
    if rest == "hosts":
        return dataclasses.replace(t, listed=())
    try:
        gone = proto.report_of_key(t.prefix, t.want, key)
    except InvalidValue:
        return t  # nothing it could have stood for is shown
    if gone is None:
        return t
    return dataclasses.replace(t, reports={k: v for k, v in t.reports.items() if k != gone})


# ---------------------------------------------------------------------------------------------------
# What one watch on the range of proto.progress_range brings: the hosts' reports, the header, and every
# rollout's keys (of which only those of `want` matter). One watch keeps them in etcd's order: a header
# never gets ahead of the reports written before it.


def resynced(t: Tracker, entries: Sequence[Entry]) -> Tracker:
    """Everything in proto.progress_range, as a listing (or a watch's re-listing) found it."""
    header = proto.header_key(t.prefix)
    t = headers_listed(t, [e for e in entries if e.key == header])
    return rollout_listed(t, [e for e in entries if e.key != header and _of_rollouts(t, e.key)])


def changed(t: Tracker, entry: Entry, deleted: bool = False) -> Tracker:
    """One key in proto.progress_range, written (or deleted)."""
    if entry.key == proto.header_key(t.prefix):
        return header_changed(t, None if deleted else entry)
    if _of_rollouts(t, entry.key):
        return rollout_changed(t, entry, deleted=deleted)
    return t


def _of_rollouts(t: Tracker, key: str) -> bool:
    """Whether `key` lies where rollouts keep their keys and reports (of whichever rollout)."""
    p = t.prefix
    return key.startswith((f"{p}/rollouts/", proto.reports_prefix(p), proto.claims_prefix(p),
                           proto.aborts_prefix(p)))


# ---------------------------------------------------------------------------------------------------
# The hosts' names


def _participants(t: Tracker) -> frozenset[str]:
    mids = frozenset(t.listed) | (frozenset(t.header.excluded) if t.header else frozenset())
    return mids | frozenset(t.record.hosts) if t.record is not None else mids


def wants_names(t: Tracker) -> bool:
    """Whether to read the host records: once at first, then again when participants appear that have
    no name yet (once for each)."""
    return not t.named or not _participants(t) - frozenset(t.names) <= t.tried


def names_read(t: Tracker, entries: Iterable[Entry]) -> Tracker:
    """The host records (<prefix>/hosts/...) as read after `wants_names()`."""
    unnamed = _participants(t) - frozenset(t.names)
    records, skipped = decode_hosts(entries)
    return dataclasses.replace(t, named=True, tried=t.tried | unnamed, skipped=(*t.skipped, *skipped),
                               names={**t.names, **{r.machine_id: r.name for r in records}})


# ---------------------------------------------------------------------------------------------------
# The outcome


def outcome_keys(t: Tracker) -> tuple[str, ...]:
    """What to read to know how the followed rollout ended, when a later rollout holds the header and
    it has no outcome yet: its record in the history, then its own record. Nothing otherwise."""
    cur = t.current
    if t.verdict in ENDED or cur is None or cur.revision <= t.want:
        return ()
    return proto.history_key(t.prefix, t.want), proto.record_key(t.prefix, t.want)


def outcome_read(t: Tracker, values: Sequence[tuple[str, bytes | None]]) -> Tracker:
    """The values of `outcome_keys()` (None: no such key), in that order. The first that records the
    followed rollout's end says how it ended; without one it was superseded before it got a record
    of its own."""
    if not outcome_keys(t):
        return t
    skipped = t.skipped
    for key, raw in values:
        if raw is None:
            continue
        try:
            record = Rollout.decode(raw, key)
        except InvalidValue as e:
            skipped = (*skipped, Skipped(key, e.reason))
            continue
        if record.revision == t.want and record.terminal:
            return dataclasses.replace(t, header=Header.of(record), skipped=skipped)
    return dataclasses.replace(t, superseded_by=t.current, skipped=skipped)
