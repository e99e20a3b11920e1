"""The invariants every run must satisfy, judged from what was recorded: every etcd event of the run
(from the revision after the baseline, none lost to compaction), the steps' record (record.log: which
step ran for which version, when), each agent's log, samples of every engine's running containers,
and at the end each host's release file, units, containers and what it serves.

Each check returns one line per violation, naming what was seen (revisions, hosts, times)."""

from __future__ import annotations

import contextlib
import itertools
import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sandbox.chaos.observe import Event, Sample, entry_time

LEADER_KEY = "/norm/leader"
HEADER_KEY = "/norm/rollout"
VERSION_KEY = "/djed-version"
# A leader's side effects: written only in a transaction fenced on the leader key.
LEADER_PREFIXES = ("/norm/ledger/", "/norm/history/")
GRACE = 3.0  # seconds an agent may take to notice it no longer leads (beyond the time it was frozen)


@dataclass(frozen=True)
class HostFinal:
    name: str
    machine_id: str
    release: str  # the release file's text
    served: tuple[str, str] | None  # what web and api answer at /version
    units: dict[str, str]  # unit -> ActiveState
    containers: list[tuple[str, str]]  # (name, image id) running


@dataclass
class Observations:
    seed: int
    start_revision: int
    snapshot: list[dict[str, Any]]  # the keys as they were just before start_revision
    events: list[Event]
    gaps: list[str]
    version_writes: set[int]  # every revision the version key was ever written at (this run's too)
    notes: list[Any]
    logs: dict[str, list[dict[str, Any]]]  # host -> the agent's log entries of the run
    raw_logs: dict[str, bytes]
    record_lines: list[str]
    samples: list[Sample]
    finals: dict[str, HostFinal]
    by_machine: dict[str, str]
    secret: str
    compatible: set[str]
    migrated_before: set[str]  # tags whose steps ran before this run
    image_tags: dict[str, str]  # image id -> tag
    digests: dict[str, str]  # tag -> the registry's digest of it (tags the registry has)
    frozen: dict[str, list[tuple[float, float]]]
    killed: dict[str, list[float]]
    lease_ttl: float
    converged: str  # why the fleet did not serve the expected release, or ""
    ended_faults: float
    steps: tuple[str, ...] = ("migrate", "collectstatic")
    # What each agent logged of its leadership (leader.*, agent.starting) since it first started: a
    # leadership may have begun before the run.
    leader_logs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    began: float = 0.0  # wall clock when the run's recording began
    began_lines: list[str] = field(default_factory=list)  # began.log: each step's run as it began
    ended: float = 0.0  # wall clock when the run's recording ended
    extra: dict[str, Any] = field(default_factory=dict)


_ts = entry_time


def _headers(obs: Observations) -> list[tuple[Event, dict[str, Any]]]:
    out = []
    for e in obs.events:
        if e.key == HEADER_KEY and e.kind == "put":
            v = e.json()
            if isinstance(v, dict):
                out.append((e, v))
    return out


def expected_release(h: dict[str, Any], stopped_any: bool) -> tuple[str, str] | None:
    """(tag, digest) the fleet must serve once rollout `h` has ended; None when nothing is owed (a
    rollout halted after hosts stopped: an operator decides)."""
    phase = h.get("phase")
    release = (h.get("tag"), h.get("digest")) if h.get("digest") else None
    previous = h.get("previous") or {}
    prev = (previous.get("tag"), previous.get("digest")) if previous.get("digest") else None
    if phase == "done":
        return release  # type: ignore[return-value]
    if phase == "failed":
        return release if h.get("released") else prev  # type: ignore[return-value]
    if phase == "halted" and not stopped_any:
        return prev  # type: ignore[return-value]
    return None


# -- the checks ---------------------------------------------------------------------------------------

def check_history_complete(obs: Observations) -> list[str]:
    out = [f"history incomplete: {g}" for g in obs.gaps]
    revs = [e.revision for e in obs.events]
    if revs and revs[0] < obs.start_revision:
        out.append(f"history starts at {revs[0]}, before the run's first revision {obs.start_revision}")
    return out


def check_migrations(obs: Observations) -> list[str]:
    """1. Each version's steps ran exactly once (none for a rollout that never cut over, none again
    for a version set back); no two steps ran at the same time."""
    out: list[str] = []
    runs: list[tuple[str, str, float, float]] = []
    counts: Counter[tuple[str, str]] = Counter()
    for line in obs.record_lines:
        parts = line.split()
        if len(parts) < 2:
            continue
        counts[(parts[0], parts[1])] += 1
        if len(parts) >= 5:
            with contextlib.suppress(ValueError):
                runs.append((parts[0], parts[1], float(parts[3]), float(parts[4])))
    begun: Counter[tuple[str, str]] = Counter(
        (p[0], p[1]) for p in (line.split() for line in obs.began_lines) if len(p) >= 2)
    for (tag, step), n in sorted(begun.items()):
        if n > 1:
            out.append(f"step {step} of {tag} began {n} times (began.log; record.log has it "
                       f"{counts[(tag, step)]} times)")
    for (tag, step), n in sorted(counts.items()):
        if n > 1:
            out.append(f"migration ran {n} times: step {step} of {tag} (record.log)")
        if tag in obs.migrated_before:
            out.append(f"migration ran again for a version migrated before: step {step} of {tag}")
        if tag in obs.compatible:
            out.append(f"migration ran for the compatible version {tag}: step {step}")
    done = {v.get("tag") for _, v in _headers(obs) if v.get("phase") == "done"}
    for tag in sorted(t for t in done if t and t not in obs.compatible and t not in obs.migrated_before):
        for step in obs.steps:
            if counts[(tag, step)] == 0:
                out.append(f"rollout of {tag} is done but step {step} never ran for it (record.log)")
    runs.sort(key=lambda r: r[2])
    for a, b in itertools.pairwise(runs):
        if b[2] < a[3]:
            out.append(f"steps overlapped: {a[1]} of {a[0]} ran {a[2]:.2f}-{a[3]:.2f}, "
                       f"{b[1]} of {b[0]} began {b[2]:.2f}")
    ok_entries: dict[tuple[str, str], list[str]] = defaultdict(list)
    for e in obs.events:
        if e.key.startswith("/norm/ledger/") and e.kind == "put":
            v = e.json()
            if isinstance(v, dict) and v.get("ok"):
                keys = ok_entries[(str(v.get("digest")), str(v.get("step")))]
                if e.key not in keys:
                    keys.append(e.key)
    for (digest, step), keys in ok_entries.items():
        if len(keys) > 1:
            out.append(f"ledger records step {step} of {digest[:19]} as run by {len(keys)} rollouts: {keys}")
    return out


def check_resolved(obs: Observations) -> list[str]:
    """7. A rollout runs the digest the registry has for its tag; a tag the registry lacks fails."""
    out: list[str] = []
    by_digest = {d: t for t, d in obs.digests.items()}
    seen: set[int] = set()
    for e, v in _headers(obs):
        rev, tag, digest = int(v.get("revision", 0)), str(v.get("tag")), v.get("digest")
        if not digest or rev in seen:
            continue
        seen.add(rev)
        if digest != obs.digests.get(tag):
            known = obs.digests.get(tag, "no such tag")
            out.append(f"rollout {rev} of {tag} resolved to {digest[:19]}, the digest of "
                       f"{by_digest.get(digest, 'no known tag')} (the registry's for {tag}: {known[:19]}; "
                       f"header at revision {e.revision})")
    return out


def report_of(key: str) -> tuple[int, str, str] | None:
    """(rollout, kind, name) of a report key: `name` the machine id for pulled, stopped and started,
    the step for migrated and claim, "" for abort. The hosts' ranges (`reports/<mid>/<rev12>/<kind>`,
    `.../migrated/<step>`), the claims and the aborts; and the previous layout, every report under the
    rollout's prefix (`rollouts/<rev>/<kind>/<name>`, `rollouts/<rev>/abort`). None for other keys."""
    parts = key.split("/")
    try:
        match parts[1:]:
            case ["norm", "reports", mid, rev, "migrated", step]:
                return int(rev), "migrated", step
            case ["norm", "reports", mid, rev, ("pulled" | "stopped" | "started") as kind]:
                return int(rev), kind, mid
            case ["norm", "claims", rev, step]:
                return int(rev), "claim", step
            case ["norm", "aborts", rev] | ["norm", "rollouts", rev, "abort"]:
                return int(rev), "abort", ""
            case ["norm", "rollouts", rev, kind, name] if kind not in ("record", "hosts"):
                return int(rev), kind, name
    except ValueError:
        return None
    return None


def any_stopped(events: Iterable[Event], revision: int) -> bool:
    """Whether a host reported its units stopped for rollout `revision` (the cut-over began)."""
    return any((found := report_of(e.key)) is not None and found[:2] == (revision, "stopped") for e in events)


def check_pulled_before_run(obs: Observations) -> list[str]:
    """2. No host starts version V before every participating host has pulled V with the same digest."""
    out: list[str] = []
    by_rollout: dict[int, list[tuple[Event, str, str]]] = defaultdict(list)  # (event, kind, name)
    participants_of: dict[int, Event] = {}
    for e in obs.events:
        if e.kind != "put":
            continue
        parts = e.key.split("/")
        if len(parts) == 5 and e.key.startswith("/norm/rollouts/") and parts[4] == "hosts":
            with contextlib.suppress(ValueError):
                participants_of.setdefault(int(parts[3]), e)
        elif (found := report_of(e.key)) is not None:
            by_rollout[found[0]].append((e, found[1], found[2]))
    headers = _headers(obs)
    for rev, evs in sorted(by_rollout.items()):
        hs = [(e, v) for e, v in headers if v.get("revision") == rev]
        digest = next((v.get("digest") for _, v in hs if v.get("digest")), None)
        hosts_ev = participants_of.get(rev)
        if digest is None or hosts_ev is None:
            continue
        participants = hosts_ev.json() or []
        pulled: dict[str, Event] = {}
        for e, kind, mid in evs:
            if kind == "pulled":
                v = e.json() or {}
                if v.get("digest"):
                    if v["digest"] != digest:
                        out.append(f"rollout {rev}: {obs.by_machine.get(mid, mid)} pulled "
                                   f"{v['digest'][:19]}, not the rollout's {digest[:19]}")
                    pulled.setdefault(mid, e)
        first_start = next(((e, mid) for e, kind, mid in evs if kind == "started"
                            and (e.json() or {}).get("digest") == digest), None)
        if first_start is None:
            continue
        start, starter = first_start
        excluded: set[str] = set()
        for e, v in hs:
            if e.revision < start.revision:
                excluded |= set(v.get("excluded") or [])
        for mid in participants:
            if mid in excluded:
                continue
            p = pulled.get(mid)
            if p is None or p.revision > start.revision:
                out.append(f"rollout {rev}: {obs.by_machine.get(starter, '?')} started "
                           f"{digest[:19]} at revision {start.revision} before "
                           f"{obs.by_machine.get(mid, mid)} had pulled it"
                           + (f" (pulled at {p.revision})" if p else ""))
    return out


def check_fenced(obs: Observations) -> list[str]:
    """3. Every leader write happens while a leader key stands (a fenced transaction cannot apply
    otherwise), and a step's migrator is the leader that issued it, or, when that leader had not
    pulled the rollout's image, a host that had (its engine has the image the step runs in)."""
    out: list[str] = []
    leader: tuple[str, int] | None = None  # (machine id, create revision)
    for kv in obs.snapshot:
        if kv["key"] == LEADER_KEY:
            leader = (kv["value"].decode(errors="replace"), kv["create_revision"])
    last_migrating: dict[int, str | None] = {}
    pulled: dict[int, set[str]] = defaultdict(set)  # rollout -> hosts that reported its image pulled
    for kv in obs.snapshot:
        if (found := report_of(kv["key"])) is not None and found[1] == "pulled":
            pulled[found[0]].add(found[2])
    for e in obs.events:
        if e.key == LEADER_KEY:
            leader = (e.value.decode(errors="replace"), e.create_revision) if e.kind == "put" else None
            continue
        found = report_of(e.key)
        if found is not None and found[1] == "pulled" and e.kind == "put" and (e.json() or {}).get("digest"):
            pulled[found[0]].add(found[2])
        # The leader's: the header, ledger, history, the rollouts' records and participant lists, and
        # the deletes of its trim (the rollouts' keys, the claims; not the hosts' own trims of their
        # reports, nor an abort request going).
        leader_write = (e.key == HEADER_KEY or e.key.startswith(LEADER_PREFIXES)
                        or (e.key.startswith("/norm/rollouts/") and (
                            e.key.endswith(("/record", "/hosts")) or e.kind == "delete"))
                        or (e.key.startswith("/norm/claims/") and e.kind == "delete"))
        if not leader_write or (e.kind == "delete" and found is not None and found[1] == "abort"):
            continue
        if leader is None:
            out.append(f"leader write without a leader: {e.kind} {e.key} at revision {e.revision}")
        if e.key == HEADER_KEY and e.kind == "put":
            v = e.json() or {}
            rev = int(v.get("revision", 0))
            issued = v.get("migrating") and v.get("migrating") != last_migrating.get(rev)
            migrator = str(v.get("migrator"))
            stand_in = leader is not None and leader[0] not in pulled[rev] and migrator in pulled[rev]
            if issued and (leader is None or (migrator != leader[0] and not stand_in)):
                out.append(f"step {v.get('migrating')} of rollout {rev} issued for migrator "
                           f"{obs.by_machine.get(str(v.get('migrator')), v.get('migrator'))} while "
                           f"{obs.by_machine.get(leader[0], leader[0]) if leader else 'nobody'} led "
                           f"(revision {e.revision})")
            last_migrating[rev] = v.get("migrating")
    return out


def _leadership_spans(obs: Observations) -> dict[str, list[tuple[float, float, int]]]:
    """What each agent's log says of its leadership: [(from, to, token)], a span ended by lost or
    resigned, or deposed (its key deleted or taken), by the agent starting again or being killed, else
    by the end of the run."""
    end = obs.ended or max([n.at for n in obs.notes] + [obs.ended_faults])
    spans: dict[str, list[tuple[float, float, int]]] = {}
    for host, entries in (obs.leader_logs or obs.logs).items():
        kills = sorted(obs.killed.get(host, []))
        found: list[tuple[float, float, int]] = []
        current: tuple[float, int] | None = None
        for entry in entries:
            ev, t = entry.get("event"), _ts(entry)
            if ev == "leader.elected":
                if current is None:
                    current = (t, int(entry.get("token", 0)))
            elif ev in ("leader.lost", "leader.deposed", "leader.resigned", "agent.starting") \
                    and current is not None:
                found.append((current[0], t, current[1]))
                current = None
            if current is not None and ev == "agent.starting":
                current = None
        if current is not None:
            stop = next((k for k in kills if k > current[0]), end)
            found.append((current[0], stop, current[1]))
        # A kill ends a span the log could not close.
        closed = []
        for a, b, tok in found:
            k = next((k for k in kills if a < k < b), None)
            closed.append((a, k if k is not None else b, tok))
        spans[host] = closed
    return spans


def _minus_frozen(a: float, b: float, frozen: list[tuple[float, float]]) -> float:
    """Seconds of [a, b] the agent was not frozen."""
    total = b - a
    for fa, fb in frozen:
        lo, hi = max(a, fa), min(b, fb)
        if hi > lo:
            total -= hi - lo
    return total


def check_one_leader(obs: Observations) -> list[str]:
    """3. At most one leader acting: two agents never both believe they lead for longer than it takes
    to notice (their frozen time not counted); a leader whose key is gone steps down."""
    out: list[str] = []
    spans = _leadership_spans(obs)
    hosts = sorted(spans)
    for i, h1 in enumerate(hosts):
        for h2 in hosts[i + 1:]:
            for a1, b1, t1 in spans[h1]:
                for a2, b2, t2 in spans[h2]:
                    lo, hi = max(a1, a2, obs.began), min(b1, b2)
                    if hi <= lo:
                        continue
                    awake = min(_minus_frozen(lo, hi, obs.frozen.get(h1, [])),
                                _minus_frozen(lo, hi, obs.frozen.get(h2, [])))
                    if awake > GRACE:
                        out.append(f"two leaders: {h1} (leader key created at {t1}) and {h2} (created at "
                                   f"{t2}) both led for {awake:.1f}s (awake)")
    # Each leadership an agent claims is a leader key with its machine id; when that key goes, the
    # agent stops leading within the lease.
    created: dict[int, tuple[str, float | None]] = {}
    for kv in obs.snapshot:
        if kv["key"] == LEADER_KEY:
            created[kv["create_revision"]] = (kv["value"].decode(errors="replace"), None)
    deleted_at: dict[int, float] = {}
    current: int | None = next((kv["create_revision"] for kv in obs.snapshot if kv["key"] == LEADER_KEY),
                               None)
    for e in obs.events:
        if e.key != LEADER_KEY:
            continue
        if e.kind == "put":
            created.setdefault(e.create_revision, (e.value.decode(errors="replace"), e.at))
            current = e.create_revision
        elif current is not None:
            deleted_at[current] = e.at
            current = None
    names = {v: k for k, v in obs.by_machine.items()}
    for host, ss in spans.items():
        for _, b, tok in ss:
            if tok >= obs.start_revision and (tok not in created or created[tok][0] != names.get(host)):
                out.append(f"{host} claims leadership {tok}, but no leader key with its id was created then")
            gone = deleted_at.get(tok)
            if gone is not None and b > gone >= obs.began:
                awake = _minus_frozen(gone, b, obs.frozen.get(host, []))
                if awake > obs.lease_ttl + GRACE:
                    out.append(f"{host} kept leading {awake:.1f}s after its leader key ({tok}) was deleted")
    return out


def check_desired_state(obs: Observations) -> list[str]:
    """4. No desired state missed; no rollout without an operator's write of the version key at its
    revision."""
    out: list[str] = []
    writes = [e for e in obs.events if e.key == VERSION_KEY and e.kind == "put"]
    allowed = obs.version_writes | {e.revision for e in writes}
    allowed |= {kv["mod_revision"] for kv in obs.snapshot if kv["key"] == VERSION_KEY}
    started: dict[int, Event] = {}
    for e, v in _headers(obs):
        rev = int(v.get("revision", 0))
        started.setdefault(rev, e)
    for rev, e in sorted(started.items()):
        if rev not in allowed:
            out.append(f"rollout {rev} ({(e.json() or {}).get('tag')}) started at revision {e.revision} "
                       f"without an operator's write of {VERSION_KEY} at revision {rev}")
    for w, nxt in zip(writes, [*writes[1:], None], strict=False):
        quiet = (nxt.at if nxt is not None else float("inf")) - w.at
        if quiet > 15.0 and w.revision not in started:
            out.append(f"desired state missed: {VERSION_KEY} = {w.value.decode(errors='replace')[:40]!r} "
                       f"(revision {w.revision}) never got a rollout")
    return out


def check_convergence(obs: Observations) -> list[str]:
    """The fleet converges on the last valid desired version, or halts with its reason in the header."""
    out: list[str] = []
    writes = [e for e in obs.events if e.key == VERSION_KEY and e.kind == "put"]
    headers = _headers(obs)
    if not headers:
        return out if not writes else [f"no rollout header written during the run ({len(writes)} writes)"]
    h = headers[-1][1]
    if writes and int(h.get("revision", 0)) != writes[-1].revision:
        out.append(f"the last desired version ({writes[-1].value.decode(errors='replace')[:40]!r}, revision "
                   f"{writes[-1].revision}) has no rollout; the header shows rollout {h.get('revision')} "
                   f"{h.get('phase')}")
        return out
    if h.get("phase") not in ("done", "failed", "halted"):
        out.append(f"rollout {h.get('revision')} of {h.get('tag')} did not end: {h.get('phase')}")
        return out
    if h.get("phase") in ("failed", "halted") and not h.get("reason"):
        out.append(f"rollout {h.get('revision')} {h.get('phase')} without a reason in the header")
    stopped = any_stopped(obs.events, int(h.get("revision", 0)))
    expected = expected_release(h, stopped)
    if expected is None:
        return out
    tag, digest = expected
    if obs.converged:
        out.append(f"rollout {h.get('revision')} {h.get('phase')}: {obs.converged}")
    for f in obs.finals.values():
        if f"NORM_DIGEST={digest}\n" not in f.release or f"NORM_RELEASE={tag}\n" not in f.release:
            out.append(f"{f.name}: release file does not pin {tag}@{digest[:19]}: {f.release.strip()!r}")
        if f.served != (tag, tag):
            out.append(f"{f.name}: serves {f.served}, not {tag}")
        for unit, state in f.units.items():
            if state != "active":
                out.append(f"{f.name}: {unit} is {state}")
        steps = [n for n, _ in f.containers if n.startswith("norm-")]
        if steps:
            out.append(f"{f.name}: step containers still running after the run: {steps}")
    return out


def check_one_release_per_host(obs: Observations) -> list[str]:
    """No host ever ran two releases at once (its application containers, sampled)."""
    out: list[str] = []
    seen: set[str] = set()
    for s in obs.samples:
        ids = {img for name, img in s.containers if name.startswith("djed-")}
        if len(ids) > 1 and s.host not in seen:
            seen.add(s.host)
            tags = sorted(obs.image_tags.get(i, i[:19]) for i in ids)
            out.append(f"{s.host} ran two releases at once: {tags} ({s.containers})")
    return out


def check_healing(obs: Observations) -> list[str]:
    """5. Healing never restarts a healthy unit, a unit an operator holds, or a unit an update stopped."""
    out: list[str] = []
    holds: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    opened: dict[tuple[str, str], float] = {}
    for kv in obs.snapshot:
        parts = kv["key"].split("/")
        if kv["key"].startswith("/norm/control/") and len(parts) == 6 and parts[4] == "hold":
            opened[(parts[3], parts[5])] = 0.0
    for e in obs.events:
        parts = e.key.split("/")
        if e.key.startswith("/norm/control/") and len(parts) == 6 and parts[4] == "hold":
            k = (parts[3], parts[5])
            if e.kind == "put":
                opened.setdefault(k, e.at)
            elif k in opened:
                holds[k].append((opened.pop(k), e.at))
    for k, a in opened.items():
        holds[k].append((a, float("inf")))
    names = {v: k for k, v in obs.by_machine.items()}
    for host, entries in obs.logs.items():
        stopped_since: float | None = None
        for entry in entries:
            ev, t = entry.get("event"), _ts(entry)
            if ev == "executor.units_stopped":
                stopped_since = t
            elif ev in ("executor.units_started", "executor.caught_up", "agent.starting"):
                stopped_since = None
            elif ev == "heal.start":
                unit = str(entry.get("unit"))
                if entry.get("state") == "active":
                    out.append(f"{host}: healing restarted {unit} while it was active "
                               f"({entry.get('timestamp')})")
                if stopped_since is not None:
                    out.append(f"{host}: healing started {unit}, stopped by an update since "
                               f"{datetime.fromtimestamp(stopped_since).strftime('%H:%M:%S.%f')[:-3]}")
                for a, b in holds.get((names.get(host, ""), unit), []):
                    if a + 1.0 < t < b:
                        out.append(f"{host}: healing started {unit} while an operator held it "
                                   f"({entry.get('timestamp')})")
    return out


def check_secrets(obs: Observations) -> list[str]:
    """6. The steps' secret never reaches a log or etcd."""
    out: list[str] = []
    needle = obs.secret.encode()
    for host, raw in obs.raw_logs.items():
        if needle in raw:
            out.append(f"{host}: the secret from the steps' environment file is in its agent log")
    for e in obs.events:
        if needle in e.value or needle in e.key.encode():
            out.append(f"the secret is in etcd: {e.key} at revision {e.revision}")
    return out


CHECKS = (check_history_complete, check_migrations, check_resolved, check_pulled_before_run, check_fenced,
          check_one_leader, check_desired_state, check_convergence, check_one_release_per_host, check_healing,
          check_secrets)


def check(obs: Observations) -> list[str]:
    out: list[str] = []
    for c in CHECKS:
        try:
            out += c(obs)
        except Exception as e:
            out.append(f"checker {c.__name__} failed: {type(e).__name__}: {e}")
    return out


def summary_line(runs: int, violations: int, faults: int, actions: int, seconds: float) -> str:
    return json.dumps({"runs": runs, "violations": violations, "faults": faults,
                       "operator_actions": actions, "seconds": round(seconds, 1)})


def describe(obs: Observations) -> list[str]:
    """What the run did, in a few lines: each rollout's outcome, the steps run, what was recorded."""
    ends: dict[int, dict[str, Any]] = {}
    for _, v in _headers(obs):
        ends[int(v.get("revision", 0))] = v
    lines = [f"recorded {len(obs.events)} etcd events from revision {obs.start_revision}, "
             f"{len(obs.samples)} container samples, {sum(len(v) for v in obs.logs.values())} log entries"]
    for rev, v in sorted(ends.items()):
        reason = f": {v.get('reason')}" if v.get("reason") else ""
        lines.append(f"rollout {rev} {v.get('tag')}: {v.get('phase')}{reason}"[:200])
    lines += [f"step {' '.join(line.split()[:2])}" for line in obs.record_lines]
    return lines
