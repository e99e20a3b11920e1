"""The rollout's protocol in etcd, as pure data: the keys, the rollout header every host watches, the
reports hosts write, the duty each host has, and the release file it hands its units.

The leader keeps the whole rollout record (record.Rollout) under the rollout's own prefix. Every
host watches only the header: a few hundred bytes (the participant list is fetched once per rollout),
so a phase change costs the fleet one small event per host however big the fleet is. Per-host
progress lives in the hosts' own report keys, which only the leader watches. Each kind of writer has
a key range of its own (what etcd's roles grant: see norm.core.access); `<rev12>` is the rollout's
revision, 12 digits, zero-padded, so that a host's older reports are one range before its current
ones:

    <prefix>/rollout                                the header of the current (or last) rollout
    <prefix>/rollouts/<rev>/record                  the leader's full record
    <prefix>/rollouts/<rev>/hosts                   the participating machine ids (JSON list)
    <prefix>/reports/<mid>/<rev12>/pulled           {"digest": ...} or {"error": ..., "permanent": ...}
    <prefix>/reports/<mid>/<rev12>/stopped          {}
    <prefix>/reports/<mid>/<rev12>/started          {"digest": ..., "ok": true|false, "reason": ...}
    <prefix>/reports/<mid>/<rev12>/migrated/<step>  {"ok": ..., "exit_code": ..., "reason": ...,
                                                    "seconds": ..., "host": mid, "unknown": true when
                                                    the outcome cannot be known}: the migrator's result
    <prefix>/claims/<rev12>/<step>                  {"host": mid}: the migrator's claim, one shared key
                                                    per step, made once, fenced on the header that
                                                    asks it to run the step
    <prefix>/aborts/<rev12>                         {"by": ...}: an operator's request
    <prefix>/deploy                                 {"by": ...}: who asked for the version written in the
                                                    same transaction (its mod revision is the rollout's)
    <prefix>/requests/<rev12>/<kind>                {"by": ...}: an operator's pause, resume or promote
                                                    (the latest of each kind; taken in the order of
                                                    their revisions, each once)
    <prefix>/ledger/<rev12>-<step>                  a ledger entry (record.LedgerEntry), once per step
                                                    run; never trimmed: the ledger's source of truth
    <prefix>/history/<rev12>                        the record of a finished rollout (the last N kept)

A host deletes its reports of older rollouts when it writes one of a newer rollout (in the same
transaction); the leader deletes older rollouts' keys, claims and aborts when a rollout ends.

The previous layout put every report under the rollout's prefix: `rollouts/<rev>/<kind>/<mid>`,
`rollouts/<rev>/claim/<step>`, `rollouts/<rev>/migrated/<step>`, `rollouts/<rev>/abort`. Agents of the
previous version write them there while a fleet is being upgraded: `parse_report` still reads them
(`legacy_*` below), so that a rollout under way goes on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from norm.core import values, wire
from norm.core.desired import is_tag
from norm.core.errors import InvalidValue
from norm.core.gate import Migrations
from norm.core.record import TERMINAL, Asked, Gate, HostStatus, Phase, Release, Rollout, Strategy
from norm.core.rollout import (
    Abort,
    Event,
    HostActive,
    HostFailed,
    HostPulled,
    HostPullFailed,
    HostStopped,
    MigrationFailed,
    MigrationSucceeded,
    MigrationUnknown,
    PauseAsked,
    PromoteAsked,
    ResumeAsked,
)
from norm.core.wire import Digest, MachineId, Reason, StepName, Text

_DIGEST = values.DIGEST
_MID = values.MACHINE_ID
_STEP = values.STEP
_REV12 = re.compile(r"[0-9]{12}")
REPORT_KINDS = ("pulled", "stopped", "started", "migrated", "claim", "abort")
REQUEST_KINDS = ("pause", "resume", "promote")  # an operator's requests on a rollout under way
MAX_REASON = values.MAX_REASON  # a report's reason is cut to this many characters


# ---------------------------------------------------------------------------------------------------
# Keys


def header_key(prefix: str) -> str:
    return f"{prefix}/rollout"


def rollout_prefix(prefix: str, revision: int) -> str:
    return f"{prefix}/rollouts/{revision}/"


def record_key(prefix: str, revision: int) -> str:
    return f"{prefix}/rollouts/{revision}/record"


def hosts_list_key(prefix: str, revision: int) -> str:
    return f"{prefix}/rollouts/{revision}/hosts"


def hosts_list(hosts: tuple[str, ...]) -> bytes:
    """What the hosts list key holds: the participating machine ids, as a JSON list."""
    return wire.encode(list(hosts), compact=False)


def decode_hosts(raw: bytes, where: str) -> tuple[str, ...]:
    """The machine ids a hosts list key holds; InvalidValue for anything but a list of them."""
    data = wire.parse(raw, where)
    try:
        return wire.decode(tuple[MachineId, ...], data)
    except ValueError:
        raise InvalidValue(where, "not a list of machine ids") from None


def rev12(revision: int) -> str:
    """A rollout's revision as the keys carry it: 12 digits, zero-padded (they sort as numbers)."""
    return f"{revision:012d}"


def reports_prefix(prefix: str) -> str:
    """Every host's reports (the leader watches this range)."""
    return f"{prefix}/reports/"


def host_reports_prefix(prefix: str, machine_id: str) -> str:
    """One host's reports: the range its role writes."""
    return f"{prefix}/reports/{machine_id}/"


def rollout_reports_prefix(prefix: str, revision: int, machine_id: str) -> str:
    """One host's reports of one rollout."""
    return f"{prefix}/reports/{machine_id}/{rev12(revision)}/"


def report_key(prefix: str, revision: int, kind: str, machine_id: str) -> str:
    """A host's pulled, stopped or started report."""
    return f"{rollout_reports_prefix(prefix, revision, machine_id)}{kind}"


def migrated_key(prefix: str, revision: int, machine_id: str, step: str) -> str:
    """The outcome of a step, written by the host that ran it (the migrator)."""
    return f"{rollout_reports_prefix(prefix, revision, machine_id)}migrated/{step}"


def older_reports(prefix: str, revision: int, machine_id: str) -> tuple[str, str]:
    """The range [start, end) of a host's reports of rollouts older than `revision`: what it deletes
    when it reports for `revision`."""
    return host_reports_prefix(prefix, machine_id), rollout_reports_prefix(prefix, revision, machine_id)


def progress_range(prefix: str) -> tuple[str, str]:
    """The range [start, end) that holds, in this order, every host's reports, the header, and every
    rollout's keys (records, participants, reports of the previous layout): what one watch of an
    operator's follows, in etcd's order (no other key of Norm's lies between them)."""
    return reports_prefix(prefix), f"{prefix}/rollouu"  # the end of every key starting "<prefix>/rollout"


def claims_prefix(prefix: str) -> str:
    return f"{prefix}/claims/"


def claim_key(prefix: str, revision: int, step: str) -> str:
    """The one key per step that the migrator creates once to run it."""
    return f"{prefix}/claims/{rev12(revision)}/{step}"


def aborts_prefix(prefix: str) -> str:
    return f"{prefix}/aborts/"


def abort_key(prefix: str, revision: int) -> str:
    return f"{prefix}/aborts/{rev12(revision)}"


def deploy_key(prefix: str) -> str:
    """Who asked for the desired version: written by `norm deploy` with the version, in one transaction."""
    return f"{prefix}/deploy"


def deploy_request(by: str, digest: str | None = None, undo: int | None = None, now: bool = False) -> bytes:
    return wire.encode(Asked(values.clean(by), digest, undo, now))


def asked(raw: bytes, key: str) -> Asked:
    """What a deploy key holds (InvalidValue naming the key, never quoting the value)."""
    return wire.read(Asked, raw, key, "deploy request")


def asked_by(raw: bytes, key: str) -> str:
    return asked(raw, key).by


def requests_prefix(prefix: str) -> str:
    return f"{prefix}/requests/"


def request_key(prefix: str, revision: int, kind: str) -> str:
    """An operator's request of `kind` (REQUEST_KINDS) on rollout `revision`."""
    return f"{prefix}/requests/{rev12(revision)}/{kind}"


def rollout_requests_prefix(prefix: str, revision: int) -> str:
    return f"{prefix}/requests/{rev12(revision)}/"


def _under(prefix: str) -> tuple[str, str]:
    """The range of every key under `prefix`, which ends with "/" (the next byte is "0")."""
    assert prefix.endswith("/")
    return prefix, prefix[:-1] + "0"


def stale_ranges(prefix: str, current: int) -> tuple[tuple[str, str], ...]:
    """The ranges [start, end) holding the claims, aborts and requests of every rollout but `current`:
    what the leader deletes when a rollout ends."""
    claims, claims_end = _under(claims_prefix(prefix))
    mine, mine_end = _under(f"{claims}{rev12(current)}/")
    aborts, aborts_end = _under(aborts_prefix(prefix))
    abort = abort_key(prefix, current)
    requests, requests_end = _under(requests_prefix(prefix))
    asked, asked_end = _under(rollout_requests_prefix(prefix, current))
    return ((claims, mine), (mine_end, claims_end), (aborts, abort), (abort + "\0", aborts_end),
            (requests, asked), (asked_end, requests_end))


# The previous layout: every report under the rollout's prefix. Read (never written) while agents of
# the previous version may still write there, during an upgrade of the fleet.


def legacy_report_key(prefix: str, revision: int, kind: str, name: str) -> str:
    """A report key of the previous layout: `name` is the machine id, or the step for claim and
    migrated."""
    return f"{prefix}/rollouts/{revision}/{kind}/{name}"


def legacy_abort_key(prefix: str, revision: int) -> str:
    return f"{prefix}/rollouts/{revision}/abort"


def ledger_key(prefix: str, revision: int, step: str) -> str:
    return f"{prefix}/ledger/{revision:012d}-{step}"


def history_key(prefix: str, revision: int) -> str:
    return f"{prefix}/history/{revision:012d}"


def migration_container(revision: int, step: str) -> str:
    """The one-off container's name: the same for whoever runs or adopts the step."""
    return f"norm-{step}-{revision}"


# ---------------------------------------------------------------------------------------------------
# The header


@dataclass(frozen=True)
class Header:
    revision: int
    tag: str  # "" for a refused desired value (see _check_header)
    phase: Phase
    digest: Digest | None = None
    previous: Release | None = None
    rollback: bool = False
    migrating: StepName | None = None
    migrator: MachineId | None = None
    excluded: tuple[MachineId, ...] = ()
    hosts_count: int = 0
    outcome: Phase | None = None
    reason: Text | None = None
    started_at: float = 0.0
    updated_at: float = 0.0
    ended_at: float | None = None
    # The new release started on some hosts (a rollout failed in START, not rolled back): it is the
    # fleet's release from then on, its steps having run; the hosts where it failed are the healer's.
    released: bool = False
    strategy: Strategy | None = None
    strategy_reason: Text | None = None
    gate: Gate = Gate()
    batch: tuple[MachineId, ...] = ()  # the hosts moving now (a rolling update's current batch)
    batch_index: int = 0
    batches: int = 0
    post: bool = False  # the step migrating runs after the batches (contract)

    @classmethod
    def of(cls, r: Rollout) -> Header:
        return cls(revision=r.revision, tag=r.tag, phase=r.phase, digest=r.digest, previous=r.previous,
                   rollback=r.rollback, migrating=r.migrating, migrator=r.migrator,
                   excluded=tuple(e.host for e in r.excluded), hosts_count=len(r.hosts),
                   outcome=r.outcome, reason=r.reason, started_at=r.started_at, updated_at=r.updated_at,
                   ended_at=r.ended_at,
                   released=not r.rollback and any(p.status is HostStatus.ACTIVE for p in r.progress),
                   strategy=r.strategy, strategy_reason=r.strategy_reason, gate=r.gate, batch=r.batch,
                   batch_index=r.batch_index, batches=len(r.batches),
                   post=r.migrating is not None and r.migrating in r.post_steps and r.strategy == "rolling")

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL

    @property
    def release(self) -> Release | None:
        return None if self.digest is None else Release(self.tag, self.digest)

    @property
    def target(self) -> Release | None:
        """What START starts: the new release, or the previous one in a rollback."""
        return self.previous if self.rollback else self.release

    def fleet_release(self) -> Release | None:
        """What the fleet should run once this rollout has ended (None: nobody should be moved: a
        halted rollout waits for an operator, a running one for its end)."""
        if not self.terminal or self.phase is Phase.HALTED:
            return None
        if self.phase is Phase.SUPERSEDED and self.released:
            return None  # a rolling update cut short between two batches: the newer rollout moves everyone
        if self.phase is Phase.DONE or (self.phase is Phase.FAILED and self.released):
            return self.release
        return self.previous

    def encode(self) -> bytes:
        return wire.encode(self)

    @classmethod
    def decode(cls, raw: bytes, where: str) -> Header:
        """The header `raw` holds, strictly; InvalidValue naming the field at fault, never its value."""
        return wire.read(cls, raw, where, "rollout header", check=_check_header)


def _check_header(h: Header) -> None:
    # A refused desired value is recorded as "": it never reaches a release file.
    if h.tag != "" or h.phase not in TERMINAL or h.digest is not None:
        values.tag(h.tag, "tag")
    if h.revision < 1 or h.hosts_count < 0 or (h.rollback and h.previous is None):
        raise ValueError("inconsistent header")


# ---------------------------------------------------------------------------------------------------
# Reports: what hosts write, and the events the leader makes of them


def pulled_ok(digest: str, migrations: Migrations | None = None) -> bytes:
    """`migrations`: what the image's label declares (None: undeclared, or a label not understood)."""
    return wire.encode({"digest": digest} if migrations is None else
                       {"digest": digest, "migrations": migrations})


def pulled_error(reason: str, permanent: bool) -> bytes:
    return wire.encode({"error": values.clean(reason), "permanent": permanent})


def stopped() -> bytes:
    return b"{}"


def started(digest: str, ok: bool, reason: str | None = None) -> bytes:
    return wire.encode({"digest": digest, "ok": ok,
                        "reason": None if reason is None else values.clean(reason)})


def migrated(ok: bool, exit_code: int | None, reason: str | None, seconds: float, host: str,
             unknown: bool = False) -> bytes:
    value = {"ok": ok, "exit_code": exit_code, "reason": None if reason is None else values.clean(reason),
             "seconds": round(seconds, 3), "host": host}
    if unknown:
        value["unknown"] = True
    return wire.encode(value)


StepOutcome = Literal["ok", "failed", "unknown"]


def step_outcome(exit_code: int, killed_by_norm: bool) -> StepOutcome:
    """How a step ended, from its container's exit code. A step killed by a signal Norm did not send
    (exit code 128 + the signal: the engine going away kills it, so does a crash of the engine
    found on its restart) or given up by the engine (255: it lost the process) may have done part of
    its work: its outcome is unknown, neither a success nor a failure to roll back from."""
    if exit_code == 0:
        return "ok"
    if not killed_by_norm and (exit_code > 128 or exit_code < 0):
        return "unknown"
    return "failed"


def claim(host: str) -> bytes:
    return wire.encode({"host": host})


def abort_request(by: str) -> bytes:
    return wire.encode({"by": values.clean(by)})


def operator_request(by: str) -> bytes:
    """The value of an operator's pause, resume or promote request."""
    return wire.encode({"by": values.clean(by)})


@dataclass(frozen=True)
class Report:
    kind: Literal["pulled", "stopped", "started", "migrated", "claim", "abort", "pause", "resume", "promote"]
    name: str  # machine id, or the step for migrated/claim, or "" for abort and the operator's requests
    value: dict[str, Any]
    revision: int = 0  # the key's mod revision: an operator's request is taken once by it


def parse_report(prefix: str, revision: int, key: str, raw: bytes, mod_revision: int = 0) -> Report | None:
    """A report of rollout `revision`, validated: a host's (`reports/<mid>/<rev12>/...`), the
    migrator's claim (`claims/<rev12>/<step>`), an operator's abort (`aborts/<rev12>`), or one of the
    previous layout (`rollouts/<rev>/...`). None for a key of another rollout, and for the leader's
    own keys (record, hosts). Raises InvalidValue (naming the key, never quoting the value) for a key
    in these ranges that is none of them, and for a value that is not its kind's."""
    found = report_of_key(prefix, revision, key)
    if found is None:
        return None
    kind, name = found
    value = wire.parse(raw, key)
    try:
        _check_report(kind, value)
    except (ValueError, TypeError) as e:
        raise InvalidValue(key, f"not a valid {kind} report ({e})") from None
    assert isinstance(value, dict)
    return Report(kind, name, value, mod_revision)  # type: ignore[arg-type]


def report_of_key(prefix: str, revision: int, key: str) -> tuple[str, str] | None:
    """The kind and name (as in Report) a report key of rollout `revision` stands for; None for a key
    of another rollout and for the leader's own keys; InvalidValue for a key in the reports' ranges
    (or the rollouts') that is none of them."""
    if key.startswith(reports_prefix(prefix)):
        return _host_report(prefix, revision, key)
    if key.startswith(claims_prefix(prefix)):
        rev, _, name = key.removeprefix(claims_prefix(prefix)).partition("/")
        if not _REV12.fullmatch(rev) or not _STEP.fullmatch(name):
            raise InvalidValue(key, "not a claim key")
        return ("claim", name) if int(rev) == revision else None
    if key.startswith(aborts_prefix(prefix)):
        rev = key.removeprefix(aborts_prefix(prefix))
        if not _REV12.fullmatch(rev):
            raise InvalidValue(key, "not an abort key")
        return ("abort", "") if int(rev) == revision else None
    if key.startswith(requests_prefix(prefix)):
        rev, _, kind = key.removeprefix(requests_prefix(prefix)).partition("/")
        if not _REV12.fullmatch(rev) or kind not in REQUEST_KINDS:
            raise InvalidValue(key, "not a request key")
        return (kind, "") if int(rev) == revision else None
    if key.startswith(f"{prefix}/rollouts/"):
        return _legacy_report(prefix, revision, key)
    raise InvalidValue(key, "not a rollout report key")


def _host_report(prefix: str, revision: int, key: str) -> tuple[str, str] | None:
    """A key in the hosts' reports' range: `<mid>/<rev12>/<kind>`, or `<mid>/<rev12>/migrated/<step>`."""
    mid, _, rest = key.removeprefix(reports_prefix(prefix)).partition("/")
    rev, _, rest = rest.partition("/")
    kind, _, name = rest.partition("/")
    if not _MID.fullmatch(mid):
        raise InvalidValue(key, "not a machine id")
    if not _REV12.fullmatch(rev):
        raise InvalidValue(key, "not a report key")
    if int(rev) != revision:
        return None
    if kind == "migrated":
        if not _STEP.fullmatch(name):
            raise InvalidValue(key, "not a step name")
        return kind, name
    if kind not in ("pulled", "stopped", "started") or name:
        raise InvalidValue(key, "not a report key")
    return kind, mid


def _legacy_report(prefix: str, revision: int, key: str) -> tuple[str, str] | None:
    """The kind and name of a report key of the previous layout (`rollouts/<rev>/<kind>/<name>`,
    `rollouts/<rev>/abort`), as agents of the previous version write them while the fleet is being
    upgraded; None for the leader's own keys and for another rollout's keys."""
    mine = rollout_prefix(prefix, revision)
    if not key.startswith(mine):
        return None
    rest = key.removeprefix(mine)
    if rest in ("record", "hosts"):
        return None
    kind, _, name = rest.partition("/")
    if rest == "abort":
        return "abort", ""
    if kind not in REPORT_KINDS or not name:
        raise InvalidValue(key, "not a rollout report key")
    if kind in ("migrated", "claim"):
        if not _STEP.fullmatch(name):
            raise InvalidValue(key, "not a step name")
    elif not _MID.fullmatch(name):
        raise InvalidValue(key, "not a machine id")
    return kind, name


# What each kind of report holds, as the wire reads it back (a Report keeps the plain value).


@dataclass(frozen=True)
class _Pulled:
    digest: Digest
    migrations: Migrations | None = None


@dataclass(frozen=True)
class _PullFailed:
    error: Reason
    permanent: bool


@dataclass(frozen=True)
class _Stopped:
    pass


@dataclass(frozen=True)
class _Started:
    digest: Digest
    ok: bool
    reason: Reason | None = None


@dataclass(frozen=True)
class _Migrated:
    ok: bool
    host: MachineId
    exit_code: int | None = None
    reason: Reason | None = None
    seconds: float = 0.0
    unknown: bool = False


@dataclass(frozen=True)
class _Claim:
    host: MachineId


@dataclass(frozen=True)
class _Abort:
    by: Reason


_REPORTS: dict[str, type[Any]] = {"pulled": _PullFailed, "stopped": _Stopped, "started": _Started,
                                  "migrated": _Migrated, "claim": _Claim, "abort": _Abort,
                                  "pause": _Abort, "resume": _Abort, "promote": _Abort}


def _check_report(kind: str, v: object) -> None:
    if kind == "pulled" and isinstance(v, dict) and "digest" in v:
        # The pulled form: what it may hold of the failed form besides is not read.
        if set(v) - {"digest", "migrations", "error", "permanent"}:
            raise wire.DecodeError("a field pulled reports do not have")
        wire.decode(_Pulled, {k: v[k] for k in ("digest", "migrations") if k in v})
        return
    report = wire.decode(_REPORTS[kind], v)
    if isinstance(report, _Migrated) and report.unknown and report.ok:
        raise ValueError("a step cannot both succeed and have an unknown outcome")


def report_event(record: Rollout, report: Report) -> Event | None:
    """The event a report means for `record` (None: nothing, e.g. a start report of another release or
    the migrator's claim)."""
    v = report.value
    match report.kind:
        case "pulled":
            if "digest" in v:
                return HostPulled(report.name, v["digest"], v.get("migrations"))
            return HostPullFailed(report.name, v["error"], v["permanent"])
        case "stopped":
            return HostStopped(report.name)
        case "started":
            return _started_event(record, report.name, v)
        case "migrated":
            return _migrated_event(report.name, v)
        case "abort":
            return Abort(v["by"])
        case "pause":
            return PauseAsked(v["by"], report.revision)
        case "resume":
            return ResumeAsked(v["by"], report.revision)
        case "promote":
            return PromoteAsked(v["by"], report.revision)
    return None


def _started_event(record: Rollout, host: str, v: dict[str, Any]) -> Event | None:
    target = record.previous if record.rollback else record.release
    if record.phase not in (Phase.START, Phase.ROLL) or target is None or v["digest"] != target.digest:
        return None  # a start of another release: an older rollout's, or before a rollback
    if v["ok"]:
        return HostActive(host)
    return HostFailed(host, v.get("reason") or "failed")


def _migrated_event(step: str, v: dict[str, Any]) -> Event:
    if v.get("unknown", False):
        return MigrationUnknown(step, v.get("reason") or "its container was lost")
    if v["ok"]:
        return MigrationSucceeded(step)
    return MigrationFailed(step, v.get("reason") or f"exit code {v.get('exit_code')}")


# ---------------------------------------------------------------------------------------------------
# A host's duty


@dataclass(frozen=True)
class Pull:
    digest: str


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Migrate:
    step: str
    digest: str


@dataclass(frozen=True)
class Start:
    release: Release
    gate: Gate = Gate()


@dataclass(frozen=True)
class Move:
    """This host's turn in a rolling batch: out of the load balancer, drained, units stopped, started
    on `release`, the gate passed, back in the load balancer; then the start report."""

    release: Release
    gate: Gate = Gate()


@dataclass(frozen=True)
class CatchUp:
    """Not part of the rollout (joined late, excluded, or down): move to the fleet's release now."""

    release: Release


Duty = Pull | Stop | Migrate | Start | Move | CatchUp


def host_duties(h: Header | None, me: str, participant: bool, reported: frozenset[str],
                running: Release | None, *, stopped: bool = False) -> tuple[Duty, ...]:
    """What this host must do now. `participant`: listed in the rollout's hosts and not excluded;
    `reported`: the report kinds this host has written for this rollout (`started` only if it was
    for the header's current target); `running`: the release in the host's release file; `stopped`:
    an update stopped the units and none has started them since (a rollout superseded after its
    stop): once the rollouts have ended, the fleet's release is started even if it is the one in the
    release file."""
    if h is None:
        return ()
    if h.terminal:
        want = h.fleet_release()
        return (CatchUp(want),) if want is not None and (running != want or stopped) else ()
    duties: list[Duty] = []
    if h.digest is None:
        return ()
    # The migrator runs its step even if it was excluded meanwhile (its agent restarted late): only
    # it can adopt the step's container, so only it can say how the step ended.
    migrate = h.phase is Phase.MIGRATE and h.migrating is not None and h.migrator == me
    if not participant:
        return (Migrate(h.migrating, h.digest),) if migrate and h.migrating is not None else ()
    if h.phase is Phase.PULL and "pulled" not in reported:
        duties.append(Pull(h.digest))
    if h.strategy != "rolling" and h.phase in (Phase.STOP, Phase.MIGRATE) and "stopped" not in reported:
        duties.append(Stop())
    if migrate and h.migrating is not None:
        duties.append(Migrate(h.migrating, h.digest))
    if h.phase is Phase.START and "started" not in reported and h.target is not None:
        duties.append(Start(h.target, h.gate))
    if h.phase is Phase.ROLL and me in h.batch and "started" not in reported and h.target is not None:
        duties.append(Move(h.target, h.gate))
    return tuple(duties)


def behind_migration(h: Header | None, participant: bool, running: Release | None) -> bool:
    """Whether this host, outside the rollout (excluded, joined late, or not of its roles), runs an
    older release than the one whose steps are running or have run: from the migrate phase on, unless
    the rollout is rolling back, and after it while the new release is the fleet's. Such a host must
    not serve (it leaves the load balancer) until it has caught up."""
    if h is None or participant or h.release is None or running == h.release:
        return False
    if h.terminal:
        return h.fleet_release() == h.release
    if h.strategy == "rolling":  # its `pre` steps are declared safe for older releases; `post` ones not
        return h.phase is Phase.MIGRATE and h.post
    return h.phase in (Phase.MIGRATE, Phase.START) and not h.rollback


def holds_units(h: Header | None, participant: bool, reported: frozenset[str], me: str = "") -> bool:
    """Whether the update holds this host's units (the healer leaves them alone): from its stop
    until its start report; in a rolling update, while its batch moves and it has not reported."""
    if h is None or h.terminal or not participant:
        return False
    if h.phase is Phase.ROLL:
        return me in h.batch and "started" not in reported
    if h.phase in (Phase.STOP, Phase.MIGRATE):
        return h.strategy != "rolling" and "stopped" in reported
    return h.phase is Phase.START and "started" not in reported


# ---------------------------------------------------------------------------------------------------
# The release file: what the units run, as KEY=VALUE lines for EnvironmentFile=


RELEASE_KEYS = ("NORM_RELEASE", "NORM_IMAGE", "NORM_DIGEST", "NORM_ROLLOUT")
_IMAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,254}")  # config checks the repository's grammar


def render_release(release: Release, image: str, revision: int) -> bytes:
    """The release file: exactly the RELEASE_KEYS, one line each. Refuses (InvalidValue) anything
    that would not read back as itself: a tag, digest or image outside their grammar could add
    lines, and so variables, to every application unit."""
    try:
        values.tag(release.tag, "tag")
        values.digest(release.digest, "digest")
        values.matching(image, "image", _IMAGE)
        wire.decode(int, revision, "revision")
    except (ValueError, TypeError) as e:
        raise InvalidValue("release file", f"not written: {e}") from None
    if revision < 1:
        raise InvalidValue("release file", "not written: the rollout revision must be positive")
    text = (f"NORM_RELEASE={release.tag}\nNORM_IMAGE={image}@{release.digest}\n"
            f"NORM_DIGEST={release.digest}\nNORM_ROLLOUT={revision}\n")
    keys = [line.partition("=")[0] for line in text.splitlines()]
    if keys != list(RELEASE_KEYS) or parse_release(text.encode()) != release:
        raise InvalidValue("release file", "not written: it would not read back as the release")
    return text.encode()


def parse_release(raw: bytes) -> Release | None:
    """The release a release file names; None when it names none or is not one of ours."""
    found: dict[str, str] = {}
    for line in raw.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            found[key.strip()] = value.strip()
    tag, digest = found.get("NORM_RELEASE"), found.get("NORM_DIGEST")
    if not tag or not digest or not is_tag(tag) or not _DIGEST.fullmatch(digest):
        return None
    return Release(tag, digest)


def release_text(release: Release | None) -> str | None:
    """How a release shows in the host record and the CLI: tag@sha256:<first 12>."""
    return None if release is None else f"{release.tag}@{release.digest[:19]}"
