"""What the `norm` command shows, as pure functions of decoded data: tables, a rollout's progress, the
redraws of a live view, and the exit status a rollout's state means. No I/O here.

Everything printed comes from etcd, which anyone with access can write: text is cleaned of control
characters (a hostile tag or host name must not drive the operator's terminal) and cut to size.
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from norm.core.host import HostRecord
from norm.core.protocol import Header, Report, release_text
from norm.core.record import HostStatus, LedgerEntry, Phase, Rollout
from norm.core.tracker import ENDED, Skipped, Tracker, Verdict, verdict

# A rollout's state is the tracker's (norm.core.tracker): named here too, with what it means.
__all__ = ["ENDED", "Verdict", "verdict"]

# Exit statuses of the `norm` command.
EXIT_OK = 0
EXIT_FAILED = 1  # the rollout failed, was halted or superseded; or the request was refused
EXIT_USAGE = 2  # bad arguments or configuration: nothing was done
EXIT_TIMEOUT = 3  # --timeout passed before the rollout ended (it goes on)
EXIT_UNREACHABLE = 4  # etcd could not be reached
EXIT_RUNNING = 5  # `rollout --once`: the rollout is still running

HOST_STEPS = ("pulled", "stopped", "started")  # what each host goes through, in order
BAR_WIDTH = 12
REASON_WIDTH = 60


# ---------------------------------------------------------------------------------------------------
# Text


def clean(text: object, limit: int | None = None) -> str:
    """`text` made safe to print: control and other non-printable characters become '?', and it is
    cut to `limit` characters (ending in '...')."""
    s = "".join(c if c.isprintable() else "?" for c in str(text))
    if limit is not None and len(s) > limit:
        s = s[:max(0, limit - 3)] + "..."
    return s


def skipped(s: Skipped) -> str:
    """What the operator is told of a value read from etcd that is left out."""
    return f"norm: skipping {clean(s.key, 200)}: {s.reason}"


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows as left-aligned columns two spaces apart; the first row is the heading."""
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def progress_bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    """`[######------]`: `done` of `total` steps, in `width` characters between the brackets."""
    if total <= 0 or width <= 0:
        return "[" + "-" * max(0, width) + "]"
    filled = round(width * min(max(done, 0), total) / total)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "-"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def utc(timestamp: float | None) -> str:
    """A Unix time as UTC ISO 8601 to the second; '-' for none."""
    if timestamp is None or timestamp <= 0:
        return "-"
    try:
        moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return "-"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def host_name(machine_id: str, names: Mapping[str, str]) -> str:
    """A host as the operator knows it: its registered name, or the start of its machine id."""
    return clean(names.get(machine_id) or machine_id[:12], 40)


# ---------------------------------------------------------------------------------------------------
# Healing: the unit summary a host's healer publishes


HEAL_ORDER = ("quarantined", "unloadable", "healing", "backoff", "held", "ok")


def heal_summary(units: object) -> str:
    """'3 ok', '1 quarantined, 2 ok', or '-' when there is no summary: the healer's states by count,
    the troubled ones first."""
    if not isinstance(units, list):
        return "-"
    counts: dict[str, int] = {}
    for u in units:
        if isinstance(u, dict):
            state = clean(u.get("heal") if isinstance(u.get("heal"), str) else "unknown", 20)
            counts[state] = counts.get(state, 0) + 1
    if not counts:
        return "-"

    def rank(state: str) -> tuple[int, str]:
        return (HEAL_ORDER.index(state) if state in HEAL_ORDER else len(HEAL_ORDER) - 1, state)

    return ", ".join(f"{counts[s]} {s}" for s in sorted(counts, key=rank))


def units_lines(summary: Sequence[Any], now: float) -> list[str]:
    """`norm units`: the host's units as its healer published them (a table), then the operator
    requests the agent has not carried out yet, and why."""

    def until(t: object) -> str:
        if isinstance(t, bool) or not isinstance(t, int | float) or abs(t) > 1e15 or math.isnan(t):
            return "-"  # not a time (nor one within 30 million years)
        return f"in {max(0, round(float(t) - now))}s"

    def heal(u: dict[str, object]) -> str:
        by = u.get("held_by")
        owners = [str(o) for o in by] if isinstance(by, list) else []
        return str(u.get("heal")) + (f"({'+'.join(owners)})" if u.get("heal") == "held" and owners else "")

    rows = [("UNIT", "STATE", "RESTARTS", "HEAL", "ATTEMPTS", "NEXT ATTEMPT", "QUARANTINE ENDS")]
    # What etcd holds is shown, never obeyed: a value that would drive the terminal is printed cleaned.
    rows += [(clean(u.get("unit"), 80), clean(f"{u.get('active_state')}/{u.get('sub_state')}", 40),
              clean(u.get("n_restarts"), 20), clean(heal(u), 40), clean(u.get("attempts"), 20),
              until(u.get("next_attempt_at")), until(u.get("quarantined_until")))
             for u in summary if isinstance(u, dict)]
    lines = table(rows)
    for u in summary:
        for r in (u.get("requests") or []) if isinstance(u, dict) else []:
            if isinstance(r, dict):
                why = (f"; failed {r.get('failures')} time(s): {r.get('error')}; "
                       f"next try {until(r.get('next_try'))}") if r.get("error") else ""
                lines.append(clean(f"{u.get('unit')}: {r.get('action')} requested, not done yet{why}", 500))
    return lines


def request_errors(summary: object, unit: str) -> list[str]:
    """What a host's unit summary says of the requests for `unit` that keep failing."""
    out: list[str] = []
    for u in summary if isinstance(summary, list) else []:
        if isinstance(u, dict) and u.get("unit") == unit:
            for r in u.get("requests") or []:
                if isinstance(r, dict) and r.get("error"):
                    out.append(clean(f"{r.get('action')} failed {r.get('failures')} time(s), "
                                     f"retried with backoff; last error: {r.get('error')}", 400))
    return out


# ---------------------------------------------------------------------------------------------------
# A rollout's state and what it means for the exit status


def exit_code(v: Verdict) -> int:
    """What `rollout --once` and `deploy --wait` exit with for a rollout in state `v`."""
    if v in (Verdict.NONE, Verdict.DONE):
        return EXIT_OK
    if v in (Verdict.FAILED, Verdict.SUPERSEDED, Verdict.HALTED, Verdict.ROLLED_BACK):
        return EXIT_FAILED
    return EXIT_RUNNING


def outcome_text(header: Header, names: Mapping[str, str] | None = None) -> str:
    """'failed: the image cannot be pulled', 'halted', ...: what ended a rollout, for the operator;
    the machine ids the reason names shown as the hosts' names (`names`)."""
    text = header.phase.value
    return f"{text}: {clean(named(header.reason, names), 300)}" if header.reason else text


def named(text: str, names: Mapping[str, str] | None) -> str:
    """`text` with each machine id in it (as a rollout's reasons name hosts) replaced by its host's name."""
    if not names:
        return text
    return _MACHINE_ID.sub(lambda m: names.get(m.group(0), m.group(0)), text)


_MACHINE_ID = re.compile(r"\b[0-9a-f]{32}\b")


def ended_text(t: Tracker) -> str:
    """'rollout 7 v2@sha256:...: failed: ...': what ended the followed rollout, when it did not succeed."""
    h, note = t.header, verdict_note(t)
    what = title(h) if h is not None else f"rollout {t.want}"
    why = note if note else (outcome_text(h, t.names) if h is not None else t.verdict.value)
    return f"{what}: {why}"


# ---------------------------------------------------------------------------------------------------
# Per-host progress of a rollout, from the hosts' reports


Reports = Mapping[tuple[str, str], Mapping[str, Any]]  # (kind, machine id or step) -> report value


def reports_of(items: Sequence[Report]) -> dict[tuple[str, str], Mapping[str, Any]]:
    return {(r.kind, r.name): r.value for r in items}


@dataclass(frozen=True)
class HostState:
    state: str  # pending, pulling, pulled, pull failed, stopped, started, failed, excluded
    done: int  # how many of HOST_STEPS the host has completed
    note: str | None = None  # why: the reported trouble or the reason for the exclusion


_RECORD_STATE = {HostStatus.PENDING: ("pending", 0), HostStatus.PULLED: ("pulled", 1),
                 HostStatus.STOPPED: ("stopped", 2), HostStatus.ACTIVE: ("started", 3),
                 HostStatus.FAILED: ("failed", 2), HostStatus.MOVING: ("moving", 2)}


def host_state(header: Header, machine_id: str, reports: Reports, record: Rollout | None = None) -> HostState:
    """Where one participating host is in the rollout `header` describes. The hosts' reports are
    current; the leader's record (written at phase changes) stands in when they are gone."""
    excluded = machine_id in header.excluded or (
        record is not None and any(e.host == machine_id for e in record.excluded))
    state = _reported_state(header, machine_id, reports)
    if state is None and record is not None and (p := record.host(machine_id)) is not None:
        name, done = _RECORD_STATE[p.status]
        state = HostState(name, done, clean(p.reason, 120) if p.reason else None)
    if state is None:
        state = HostState("pending", 0)
    if excluded:
        why = next((e.reason for e in (record.excluded if record else ()) if e.host == machine_id), None)
        return HostState("excluded", state.done, clean(why, 120) if why else None)
    return state


def _reported_state(header: Header, machine_id: str, reports: Reports) -> HostState | None:
    target = header.target
    started = reports.get(("started", machine_id))
    if started is not None and target is not None and started.get("digest") == target.digest:
        reason = started.get("reason")
        if started.get("ok") is True:  # with a reason: a unit the operator holds was left stopped
            return HostState("started", 3, clean(reason, 120) if isinstance(reason, str) else None)
        return HostState("failed", 2, clean(reason, 120) if isinstance(reason, str) else None)
    if header.phase is Phase.ROLL and machine_id in header.batch:
        return HostState("moving", 2)
    if ("stopped", machine_id) in reports:
        return HostState("stopped", 2)
    pulled = reports.get(("pulled", machine_id))
    if pulled is None:
        return None
    if "digest" in pulled:
        return HostState("pulled", 1) if pulled["digest"] == header.digest else None
    error = clean(pulled.get("error"), 120)
    return HostState("pull failed" if pulled.get("permanent") is True else "pulling", 0, error)


def participants(header: Header, listed: Sequence[str], record: Rollout | None) -> tuple[str, ...]:
    """The rollout's hosts, excluded ones included, in a stable order."""
    mids = set(listed) | set(header.excluded)
    if record is not None:
        mids |= set(record.hosts) | {e.host for e in record.excluded}
    return tuple(sorted(mids))


# ---------------------------------------------------------------------------------------------------
# The live view of a rollout


@dataclass(frozen=True)
class Progress:
    """Everything the live view shows, as the CLI last read it from etcd."""

    want: int | None  # the revision followed (None: whatever the header shows)
    header: Header | None  # the header of the followed rollout, once it began
    current: Header | None = None  # the header etcd holds (an earlier rollout, while `want` waits)
    listed: tuple[str, ...] = ()  # <prefix>/rollouts/<rev>/hosts
    reports: Reports = field(default_factory=dict)
    names: Mapping[str, str] = field(default_factory=dict)  # machine id -> host name
    record: Rollout | None = None
    verdict_note: str | None = None  # why it ended, when that is not in the header (superseded by...)


Frame = list[tuple[str, str]]  # (key, text): one line per key, so that changes can be told apart


def verdict_note(t: Tracker) -> str | None:
    return f"superseded by {title(t.superseded_by)}" if t.superseded_by is not None else None


def progress_of(t: Tracker) -> Progress:
    """What the live view shows of the rollout the tracker follows."""
    return Progress(want=t.want, header=t.header, current=t.current, listed=t.listed, reports=dict(t.reports),
                    names=dict(t.names), record=t.record, verdict_note=verdict_note(t))


def title(h: Header) -> str:
    name = release_text(h.release) or h.tag or "(refused)"
    return f"rollout {h.revision} {clean(name, 80)}"


def _count(states: Sequence[HostState], step: int) -> int:
    return sum(1 for s in states if s.state != "excluded" and s.done >= step)


def _phase_text(h: Header, states: Sequence[HostState], record: Rollout | None,
                names: Mapping[str, str]) -> str:
    # Until the participant list is read, the header's count stands in.
    active = sum(1 for s in states if s.state != "excluded") if states else h.hosts_count
    match h.phase:
        case Phase.RESOLVE:
            return "resolve: finding the image's digest"
        case Phase.PULL:
            return f"pull: {_count(states, 1)}/{active} pulled"
        case Phase.STOP:
            return f"stop: {_count(states, 2)}/{active} stopped"
        case Phase.MIGRATE:
            steps = record.steps if record is not None else ()
            at = f" ({steps.index(h.migrating) + 1}/{len(steps)})" if h.migrating in steps else ""
            return f"migrate: step {clean(h.migrating, 64)}{at}"
        case Phase.START if h.rollback:
            return _rolling_back(h, f"{_count(states, 3)}/{active} started", names)
        case Phase.START:
            return f"start: {_count(states, 3)}/{active} started"
        case Phase.ROLL if h.rollback:
            return _rolling_back(h, f"batch {h.batch_index + 1}/{h.batches}", names)
        case Phase.ROLL:
            return f"roll: batch {h.batch_index + 1}/{h.batches}, {_count(states, 3)}/{active} on the release"
        case Phase.DONE:
            ended = h.ended_at if h.ended_at is not None else h.updated_at
            return f"done in {duration(ended - h.started_at)}" if h.started_at else "done"
    return outcome_text(h, names)


def _rolling_back(h: Header, progress: str, names: Mapping[str, str]) -> str:
    back = release_text(h.previous) or "the previous release"
    return (f"{h.phase.value}: rolling back to {clean(back, 80)}, {progress}"
            + (f" ({clean(named(h.reason, names), REASON_WIDTH)})" if h.reason else ""))


def _step_lines(h: Header, p: Progress) -> Frame:
    steps = p.record.steps if p.record is not None else ()
    if h.migrating is not None and h.migrating not in steps:
        steps = (*steps, h.migrating)
    if not steps or h.phase in (Phase.RESOLVE, Phase.PULL):
        return []
    lines: Frame = []
    for step in steps:
        result = p.reports.get(("migrated", step))
        claim = p.reports.get(("claim", step))
        where = (result or {}).get("host") or (
            h.migrator if h.migrating == step else (claim or {}).get("host"))
        on = f" on {host_name(where, p.names)}" if isinstance(where, str) else ""
        if result is not None:
            secs = result.get("seconds")
            took = duration(float(secs)) if isinstance(secs, int | float) else "-"
            if result.get("ok") is True:
                text = f"done in {took}{on}"
            else:
                reason = result.get("reason") or f"exit code {result.get('exit_code')}"
                text = f"failed{on}: {clean(reason, REASON_WIDTH)}"
        elif h.migrating == step and h.phase is Phase.MIGRATE:
            text = f"running{on}"
        elif p.record is not None and any(e.step == step and e.ok and e.digest == h.digest
                                          for e in p.record.ledger):
            text = "done before (skipped)"
        else:
            text = "waiting" if h.phase in (Phase.STOP, Phase.MIGRATE) and not h.terminal else "not run"
        lines.append((f"step:{step}", f"  step {clean(step, 64)}: {text}"))
    return lines


def rollout_frame(p: Progress) -> Frame:
    """The live view: a title line, then one line per host with a bar over pulled -> stopped ->
    started, then the migration steps."""
    h = p.header
    if h is None:
        if p.want is None:
            return [("title", "no rollout yet")]
        behind = ""
        if p.current is not None and p.current.revision < p.want and not p.current.terminal:
            behind = f" (after {title(p.current)}, now {p.current.phase.value})"
        return [("title", f"rollout {p.want}: waiting for the leader to begin it{behind}")]
    mids = participants(h, p.listed, p.record)
    states = [host_state(h, mid, p.reports, p.record) for mid in mids]
    text = f"{title(h)}: {_phase_text(h, states, p.record, p.names)}"
    if p.verdict_note:
        text += f" ({p.verdict_note})"
    frame: Frame = [("title", text)]
    if h.strategy_reason and not h.terminal and h.phase not in (Phase.RESOLVE, Phase.PULL):
        frame.append(("strategy", f"  {h.strategy}: {clean(h.strategy_reason, REASON_WIDTH)}"))
    if p.record is not None and p.record.revision == h.revision and not h.terminal:
        frame += _held_lines(p.record, p.names)
    width = max((len(host_name(m, p.names)) for m in mids), default=0)
    for mid, s in zip(mids, states, strict=True):
        line = f"  {host_name(mid, p.names).ljust(width)}  {progress_bar(s.done, len(HOST_STEPS))}  {s.state}"
        frame.append((f"host:{mid}", line + (f": {s.note}" if s.note else "")))
    if h.phase is Phase.RESOLVE and not mids:
        frame.append(("hosts", f"  {h.hosts_count} host{'s' if h.hosts_count != 1 else ''} taking part"))
    return frame + _step_lines(h, p)


_WAITS = {"pull": "every host pulled, nothing stopped", "batch": "before its next batch",
          "canary": "with its canary on the new release"}


def _held_lines(r: Rollout, names: Mapping[str, str]) -> Frame:
    """Whether the rollout is paused, or waits for its canary's analysis, and what goes on from there."""
    lines: Frame = []
    canary = ", ".join(host_name(m, names) for m in (r.batches[0] if r.canary and r.batches else ()))
    if r.waiting == "canary" and r.pause is None:
        lines.append(("held", f"  canary {clean(canary, 200)}: being analysed "
                              "(`norm promote` ends it early)"))
    if r.pause is not None:
        where = f"waits {_WAITS[r.waiting]}" if r.waiting is not None else "holds at its next boundary"
        lines.append(("held", f"  paused ({clean(named(r.pause, names), REASON_WIDTH)}): {where}; "
                              "`norm resume` goes on"))
    if r.blocked is not None and not r.override:
        where = f"waits {_WAITS[r.waiting]}" if r.waiting is not None else "holds at its next boundary"
        lines.append(("blocked", f"  held ({clean(r.blocked, REASON_WIDTH)}): {where}; it goes on by itself "
                                 "when it may"))
    return lines


def progress_json(p: Progress, v: Verdict) -> dict[str, Any]:
    """The live view as one JSON object."""
    h = p.header
    if h is None:
        return {"revision": p.want, "verdict": v.value, "rollout": None, "hosts": []}
    hosts = []
    for mid in participants(h, p.listed, p.record):
        s = host_state(h, mid, p.reports, p.record)
        hosts.append({"machine_id": mid, "name": p.names.get(mid), "state": s.state, "done": s.done,
                      "note": s.note})
    steps = {name: dict(value) for (kind, name), value in p.reports.items() if kind == "migrated"}
    r = p.record if p.record is not None and p.record.revision == h.revision else None
    held = None if r is None else {
        "pause": r.pause, "waiting": r.waiting,
        "canary": list(r.batches[0]) if r.canary and r.batches else [],
        "actions": [asdict(a) for a in r.actions]}
    return {"revision": h.revision, "verdict": v.value, "note": p.verdict_note, "rollout": asdict(h),
            "hosts": hosts, "steps": steps, "control": held}


def changed_lines(old: Frame, new: Frame) -> list[str]:
    """For output that is not a terminal: the lines of `new` that are new or differ from `old`, one
    per change, in order."""
    before = dict(old)
    return [text for key, text in new if before.get(key) != text]


def redraw(previous: int, lines: Sequence[str], width: int) -> str:
    """For a terminal: move up over the `previous` lines drawn, clear to the end of the screen, and
    draw `lines`, each cut to `width` so that none wraps (which would spoil the next move up)."""
    up = f"\x1b[{previous}F" if previous else ""
    body = "".join(line[:max(1, width - 1)] + "\n" for line in lines)
    return f"{up}\x1b[J{body}"


# ---------------------------------------------------------------------------------------------------
# Status: the fleet and its current rollout


@dataclass(frozen=True)
class HostRow:
    machine_id: str
    name: str
    environment: str
    role: str
    release: str | None
    heal: str
    leader: bool
    rollout: HostState | None  # None: no rollout running, or the host takes no part
    env_etag: str | None = None  # the ETag of the object the host's environment file was made from


def fleet_rows(records: Sequence[HostRecord], units: Mapping[str, object], leader: str | None,
               running: tuple[Header, Tracker] | None) -> list[HostRow]:
    """`norm status`: each registered host, and each host taking part in the `running` rollout (its
    header, and what the tracker read of its keys), registered or not; in order of environment, role
    and name."""
    mids = participants(running[0], running[1].listed, running[1].record) if running is not None else ()

    def state(mid: str) -> HostState | None:
        if running is None or mid not in mids:
            return None
        h, t = running
        return host_state(h, mid, t.reports, t.record)

    rows = [HostRow(r.machine_id, r.name, r.environment, r.role, r.release,
                    heal_summary(units.get(r.machine_id)), r.machine_id == leader, state(r.machine_id),
                    r.env_etag)
            for r in records]
    known = {r.machine_id for r in records}
    rows += [HostRow(m, m[:12], "-", "-", None, heal_summary(units.get(m)), m == leader, state(m))
             for m in mids if m not in known]  # taking part, not registered
    rows.sort(key=lambda r: (r.environment, r.role, r.name))
    return rows


def hosts_lines(records: Sequence[HostRecord], leader: str | None) -> list[str]:
    """`norm hosts`: the registered hosts as a table, and how many."""
    env = any(r.env_etag for r in records)  # the column shows only where environment files are used
    rows = [("HOST", "MACHINE ID", "ENVIRONMENT", "ROLE", "AGENT", "RELEASE", *(("ENV FILE",) if env else ()),
             "LEADER")]
    rows += [(r.name, r.machine_id[:12], r.environment, r.role, r.agent_version, r.release or "-",
              *((short_etag(r.env_etag),) if env else ()), "*" if r.machine_id == leader else "")
             for r in records]
    return [*table(rows), f"{len(records)} host{'s' if len(records) != 1 else ''} registered"]


def short_etag(etag: str | None) -> str:
    """An ETag as a column shows it: without its quotes, cut to 12 characters; '-' for none."""
    return clean(etag.strip('"')[:12]) if etag else "-"


def rollout_line(h: Header | None, names: Mapping[str, str] | None = None) -> str:
    """'rollout 57 v2: pull' or 'rollout 56 v1: failed (the image cannot be pulled)' or 'no rollout yet'."""
    if h is None:
        return "no rollout yet"
    phase = f"{h.phase.value}, rolling back" if h.rollback and not h.terminal else h.phase.value
    if h.phase is Phase.ROLL:
        phase += f" batch {h.batch_index + 1}/{h.batches}"
    strategy = f" [{h.strategy}]" if h.strategy else ""
    reason = f" ({clean(named(h.reason, names), 200)})" if h.reason else ""
    return f"rollout {h.revision} {clean(h.tag, 80) or '(refused)'}{strategy}: {phase}{reason}"


def status_rows(rows: Sequence[HostRow], running: bool) -> list[tuple[str, ...]]:
    env = any(r.env_etag for r in rows)  # the column shows only where environment files are used
    head = ("HOST", "ENVIRONMENT", "ROLE", "RELEASE", *(("ENV FILE",) if env else ()), "HEAL",
            *(("ROLLOUT",) if running else ()), "LEADER")
    out: list[tuple[str, ...]] = [head]
    for r in rows:
        state = "-" if r.rollout is None else r.rollout.state
        out.append((clean(r.name, 40), clean(r.environment, 40), clean(r.role, 40),
                    clean(r.release, 100) if r.release else "-", *((short_etag(r.env_etag),) if env else ()),
                    r.heal, *((state,) if running else ()), "*" if r.leader else ""))
    return out


def status_lines(rows: Sequence[HostRow], header: Header | None) -> list[str]:
    running = header is not None and not header.terminal
    lines = table(status_rows(rows, running))
    names = {r.machine_id: r.name for r in rows}
    lines.append(f"{len(rows)} host{'s' if len(rows) != 1 else ''}; {rollout_line(header, names)}")
    return lines


def status_json(rows: Sequence[HostRow], header: Header | None) -> dict[str, Any]:
    return {
        "hosts": [{"machine_id": r.machine_id, "name": r.name, "environment": r.environment, "role": r.role,
                   "release": r.release, "env_etag": r.env_etag, "heal": r.heal, "leader": r.leader,
                   "rollout": None if r.rollout is None else asdict(r.rollout)} for r in rows],
        "rollout": None if header is None else asdict(header),
    }


# ---------------------------------------------------------------------------------------------------
# History


def rollout_details(r: Rollout, steps: Sequence[LedgerEntry], names: Mapping[str, str]) -> list[str]:
    """One rollout in full, as `norm history REVISION` prints it."""
    outcome = (r.outcome or r.phase).value if r.terminal else f"{r.phase.value} (under way)"
    took = None if r.ended_at is None else r.ended_at - r.started_at
    by = clean(r.by, 200) if r.by else "(not known: the version key was written without norm deploy)"
    lines = [f"rollout {r.revision}: {clean(r.tag, 80) or '(refused)'}",
             f"  asked by:  {by}",
             f"  image:     {r.digest or '-'}",
             f"  previous:  {clean(release_text(r.previous), 120) if r.previous else '-'}",
             f"  started:   {utc(r.started_at)}" + (f", took {duration(took)}" if took is not None else ""),
             f"  outcome:   {outcome}" + (f": {clean(named(r.reason, names), 400)}" if r.reason else "")]
    if r.strategy:
        why = f" ({clean(r.strategy_reason, 400)})" if r.strategy_reason else ""
        lines.append(f"  strategy:  {r.strategy}{why}")
    hosts = ", ".join(host_name(h, names) for h in r.hosts)
    lines.append(f"  hosts:     {len(r.hosts)}" + (f" ({clean(hosts, 600)})" if hosts else ""))
    for x in r.excluded:
        lines.append(f"  excluded:  {host_name(x.host, names)} in {x.phase.value}: {clean(x.reason, 200)}")
    if r.batches:
        lines.append("  batches:   " + "; ".join(
            ("canary " if r.canary and i == 0 and not r.rollback else "")
            + ", ".join(host_name(h, names) for h in b) for i, b in enumerate(r.batches)))
    for e in steps:
        result = "ok" if e.ok else ("outcome unknown" if e.unknown else "failed")
        lines.append(f"  step:      {clean(e.step, 64)} ({e.stage}) {result} at {utc(e.at)}")
    for a in r.actions:
        lines.append(f"  {a.kind + ':':10} by {clean(a.by, 200)} at {utc(a.at)}")
    if r.pause is not None:
        lines.append(f"  paused:    {clean(named(r.pause, names), 400)}")
    if r.override:
        lines.append("  --now:     asked to go on outside the maintenance windows and while alerts fire")
    if r.blocked is not None:
        lines.append(f"  held:      {clean(r.blocked, 400)}")
    return lines


def history_rows(records: Sequence[Rollout]) -> list[tuple[str, ...]]:
    """Finished rollouts, newest first."""
    out: list[tuple[str, ...]] = [("REVISION", "TAG", "STRATEGY", "OUTCOME", "STARTED", "DURATION", "HOSTS",
                                   "REASON")]
    for r in sorted(records, key=lambda r: r.revision, reverse=True):
        outcome = (r.outcome or r.phase).value
        took = None if r.ended_at is None else r.ended_at - r.started_at
        hosts = str(len(r.hosts)) + (f" ({len(r.excluded)} excluded)" if r.excluded else "")
        out.append((str(r.revision), clean(r.tag, 40) or "(refused)", r.strategy or "-", outcome,
                    utc(r.started_at),
                    duration(took), hosts, clean(r.reason, REASON_WIDTH) if r.reason else ""))
    return out
