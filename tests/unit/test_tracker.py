"""The model of a rollout the CLI follows (norm.core.tracker): what it makes of the values read from
etcd, what it asks to read next, and the outcome it comes to. Pure: no etcd here."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from norm.app import views
from norm.core import protocol as proto
from norm.core import tracker as trk
from norm.core.host import HostRecord, hosts_key
from norm.core.record import HostProgress, Phase, Release, Rollout
from norm.core.tracker import Skipped, Tracker, Verdict

P = "/norm"
A, B, C = "a" * 32, "b" * 32, "c" * 32
D1, D2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
T0 = 1_700_000_000.0
WANT = 7


@dataclass(frozen=True)
class KV:
    key: str
    value: bytes


def record(revision: int = WANT, phase: Phase = Phase.PULL, **kw: object) -> Rollout:
    base = Rollout(revision=revision, tag="v2", hosts=(A, B), phase=phase, started_at=T0, updated_at=T0 + 10,
                   previous=Release("v1", D1), digest=D2, steps=("migrate",),
                   progress=(HostProgress(A), HostProgress(B)))
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def finished(revision: int = WANT, phase: Phase = Phase.DONE, reason: str | None = None) -> Rollout:
    return record(revision, phase, outcome=phase, reason=reason, ended_at=T0 + 95, progress=())


def header_kv(r: Rollout) -> KV:
    return KV(proto.header_key(P), proto.Header.of(r).encode())


def report_kv(kind: str, name: str, raw: bytes, revision: int = WANT) -> KV:
    return KV(proto.report_key(P, revision, kind, name), raw)


def host_kv(mid: str, name: str) -> KV:
    r = HostRecord(machine_id=mid, name=name, environment="prod", role="django", agent_version="0.1",
                   release=None, started_at=T0)
    return KV(f"{hosts_key(P)}{mid}", r.encode())


def fresh() -> Tracker:
    return Tracker(P, WANT)


# ---------------------------------------------------------------------------------------------------
# The header


def test_waits_while_an_earlier_rollout_holds_the_header() -> None:
    t = trk.header_changed(fresh(), header_kv(record(5, Phase.START)))
    assert t.verdict is Verdict.WAITING
    assert t.header is None and t.current is not None and t.current.revision == 5


def test_the_followed_header_gives_the_verdict() -> None:
    t = trk.header_changed(fresh(), header_kv(record()))
    assert t.verdict is Verdict.RUNNING and t.header == t.current
    for phase, verdict in ((Phase.DONE, Verdict.DONE), (Phase.FAILED, Verdict.FAILED),
                           (Phase.HALTED, Verdict.HALTED), (Phase.SUPERSEDED, Verdict.SUPERSEDED)):
        assert trk.header_changed(t, header_kv(finished(phase=phase))).verdict is verdict


def test_a_later_header_keeps_the_followed_one() -> None:
    t = trk.header_changed(fresh(), header_kv(record()))
    t = trk.header_changed(t, header_kv(record(9, tag="v3")))
    assert t.header is not None and t.header.revision == WANT
    assert t.current is not None and t.current.revision == 9


def test_a_header_that_does_not_decode_is_skipped_and_changes_nothing() -> None:
    t = trk.header_changed(fresh(), header_kv(record(5)))
    bad = trk.header_changed(t, KV(proto.header_key(P), b"{not json"))
    assert bad.current == t.current and bad.header is None
    assert [s.key for s in bad.skipped] == [proto.header_key(P)]
    assert bad.said().skipped == () and bad.said().current == t.current


def test_a_deleted_header_leaves_no_current() -> None:
    t = trk.header_changed(fresh(), header_kv(record()))
    gone = trk.changed(t, KV(proto.header_key(P), b""), deleted=True)
    assert gone.current is None and gone.header == t.header


def test_functions_return_a_new_model_and_leave_the_old_one() -> None:
    t = fresh()
    t2 = trk.changed(t, report_kv("pulled", A, proto.pulled_ok(D2)))
    assert t.reports == {} and t2.reports == {("pulled", A): {"digest": D2}}


# ---------------------------------------------------------------------------------------------------
# The rollout's own keys


def test_record_participants_and_reports() -> None:
    t = trk.changed(fresh(), KV(proto.record_key(P, WANT), record().encode()))
    t = trk.changed(t, KV(proto.hosts_list_key(P, WANT), json.dumps([A, B]).encode()))
    t = trk.changed(t, report_kv("pulled", A, proto.pulled_ok(D2)))
    t = trk.changed(t, report_kv("stopped", B, proto.stopped()))
    assert t.record == record() and t.listed == (A, B)
    assert set(t.reports) == {("pulled", A), ("stopped", B)}
    t = trk.changed(t, report_kv("stopped", B, b""), deleted=True)
    t = trk.changed(t, KV(proto.hosts_list_key(P, WANT), b""), deleted=True)
    t = trk.changed(t, KV(proto.record_key(P, WANT), b""), deleted=True)
    assert set(t.reports) == {("pulled", A)} and t.listed == () and t.record is None
    assert t.skipped == ()


def test_another_rollouts_keys_are_ignored() -> None:
    t = fresh()
    assert trk.changed(t, report_kv("pulled", A, proto.pulled_ok(D2), revision=8)) == t
    assert trk.changed(t, report_kv("pulled", A, proto.pulled_ok(D2), revision=70)) == t
    # a record under this rollout's prefix that names another revision is not this rollout's
    assert trk.changed(t, KV(proto.record_key(P, WANT), record(8).encode())).record is None


def test_reports_in_the_hosts_ranges_and_in_the_previous_layout() -> None:
    """A fleet being upgraded: some hosts report in their own ranges, others (of the previous version)
    under the rollout's prefix; the model shows both, and a host's trim of its older reports (deletes
    of another rollout's keys) changes nothing."""
    t = trk.changed(fresh(), report_kv("pulled", A, proto.pulled_ok(D2)))
    t = trk.changed(t, KV(proto.legacy_report_key(P, WANT, "pulled", B), proto.pulled_ok(D2)))
    t = trk.changed(t, KV(proto.migrated_key(P, WANT, A, "migrate"), proto.migrated(True, 0, None, 1.0, A)))
    t = trk.changed(t, KV(proto.claim_key(P, WANT, "migrate"), proto.claim(A)))
    assert set(t.reports) == {("pulled", A), ("pulled", B), ("migrated", "migrate"), ("claim", "migrate")}
    assert trk.changed(t, report_kv("pulled", A, b"", revision=WANT - 1), deleted=True) == t
    gone = trk.changed(t, KV(proto.migrated_key(P, WANT, A, "migrate"), b""), deleted=True)
    assert ("migrated", "migrate") not in gone.reports
    listed = trk.resynced(fresh(), [report_kv("stopped", A, proto.stopped()), header_kv(record()),
                                    KV(proto.legacy_report_key(P, WANT, "stopped", B), proto.stopped()),
                                    report_kv("stopped", B, proto.stopped(), revision=WANT - 1)])
    assert set(listed.reports) == {("stopped", A), ("stopped", B)} and listed.skipped == ()


def test_values_that_do_not_decode_are_skipped() -> None:
    t = trk.changed(fresh(), KV(proto.hosts_list_key(P, WANT), b"[1, 2]"))
    t = trk.changed(t, KV(proto.hosts_list_key(P, WANT), b"{"))
    t = trk.changed(t, report_kv("pulled", "not-a-machine-id", b"{}"))
    t = trk.changed(t, KV(proto.record_key(P, WANT), b"[]"))
    assert t.listed == () and t.reports == {} and t.record is None
    assert [s.reason for s in t.skipped][:2] == ["not a list of machine ids", "not JSON"]
    assert len(t.skipped) == 4
    assert views.skipped(t.skipped[0]) == (f"norm: skipping {proto.hosts_list_key(P, WANT)}: "
                                           "not a list of machine ids")


def test_a_resync_replaces_what_was_known() -> None:
    t = trk.changed(fresh(), report_kv("stopped", B, proto.stopped()))
    t = trk.changed(t, header_kv(record(5)))
    t = trk.resynced(t, [header_kv(record()), report_kv("pulled", A, proto.pulled_ok(D2)),
                         report_kv("pulled", B, proto.pulled_ok(D2), revision=8)])
    assert t.current is not None and t.current.revision == WANT and t.verdict is Verdict.RUNNING
    assert set(t.reports) == {("pulled", A)}
    assert trk.resynced(t, []).current is None  # the header is gone


KEYS = st.sampled_from([proto.header_key(P), proto.record_key(P, WANT), proto.hosts_list_key(P, WANT),
                        proto.report_key(P, WANT, "pulled", A), proto.report_key(P, WANT, "started", B),
                        proto.migrated_key(P, WANT, A, "migrate"), proto.abort_key(P, WANT),
                        proto.report_key(P, 8, "pulled", A), f"{P}/rollouts/{WANT}/x/y",
                        proto.legacy_report_key(P, WANT, "pulled", A), proto.claim_key(P, WANT, "migrate"),
                        f"{P}/reports/{A}/x/y"])
VALUES = st.one_of(st.binary(max_size=40), st.sampled_from([
    proto.Header.of(record()).encode(), record().encode(), finished().encode(), json.dumps([A, B]).encode(),
    proto.pulled_ok(D2), proto.started(D2, True), proto.stopped(), b"null", b"[[[[]]]]"]))
CHANGES = st.lists(st.tuples(KEYS, VALUES, st.booleans()), max_size=20)


@given(CHANGES, CHANGES)
def test_any_changes_never_raise_and_a_resync_depends_only_on_what_it_lists(
        before: list[tuple[str, bytes, bool]], listing: list[tuple[str, bytes, bool]]) -> None:
    t = fresh()
    for key, value, deleted in before:
        t = trk.changed(t, KV(key, value), deleted=deleted)
        assert isinstance(t.verdict, Verdict)
    entries = list({key: KV(key, value) for key, value, _ in listing}.values())
    a, b = trk.resynced(t, entries), trk.resynced(fresh(), entries)
    assert (a.current, a.listed, a.reports, a.record) == (b.current, b.listed, b.reports, b.record)


# ---------------------------------------------------------------------------------------------------
# The hosts' names


def test_names_are_read_once_then_again_only_for_new_participants() -> None:
    t = fresh()
    assert trk.wants_names(t)
    t = trk.names_read(t, [host_kv(A, "web-1"), KV(f"{hosts_key(P)}{B}", b"{")])
    assert t.names == {A: "web-1"} and [s.key for s in t.skipped] == [f"{hosts_key(P)}{B}"]
    assert not trk.wants_names(t)
    t = trk.changed(t, KV(proto.hosts_list_key(P, WANT), json.dumps([A, B]).encode()))
    assert trk.wants_names(t)  # B has no name: looked for once
    t = trk.names_read(t, [host_kv(A, "web-1")])
    assert not trk.wants_names(t) and t.tried == {B}
    three = record(hosts=(A, B, C), progress=tuple(HostProgress(h) for h in (A, B, C)))
    t = trk.changed(t, KV(proto.record_key(P, WANT), three.encode()))
    assert trk.wants_names(t)  # C takes part too
    t = trk.names_read(t, [host_kv(C, "web-3")])
    assert t.names == {A: "web-1", C: "web-3"} and not trk.wants_names(t)


# ---------------------------------------------------------------------------------------------------
# The outcome


def test_nothing_more_to_read_while_the_followed_rollout_holds_the_header() -> None:
    assert trk.outcome_keys(fresh()) == ()
    t = trk.header_changed(fresh(), header_kv(record()))
    assert trk.outcome_keys(t) == ()
    assert trk.outcome_read(t, [(proto.history_key(P, WANT), finished().encode())]) == t
    ended = trk.header_changed(t, header_kv(finished()))
    assert trk.outcome_keys(trk.header_changed(ended, header_kv(record(9)))) == ()  # already known


def test_a_later_rollout_sends_it_to_the_history_then_the_record() -> None:
    t = trk.header_changed(trk.header_changed(fresh(), header_kv(record())), header_kv(record(9, tag="v3")))
    keys = trk.outcome_keys(t)
    assert keys == (proto.history_key(P, WANT), proto.record_key(P, WANT))
    failed = finished(phase=Phase.FAILED, reason="x").encode()
    done = trk.outcome_read(t, [(keys[0], failed), (keys[1], None)])
    assert done.verdict is Verdict.FAILED and done.header is not None and done.header.reason == "x"
    assert views.ended_text(done) == "rollout 7 v2@sha256:222222222222: failed: x"
    # the history does not decode: said, and the record tells instead
    later = trk.outcome_read(t, [(keys[0], b"{"), (keys[1], finished().encode())])
    assert later.verdict is Verdict.DONE and [s.key for s in later.skipped] == [keys[0]]


def test_without_an_outcome_recorded_it_was_superseded() -> None:
    t = trk.header_changed(fresh(), header_kv(record(9, tag="v3")))  # it never began
    keys = trk.outcome_keys(t)
    for values in ([(keys[0], None), (keys[1], None)],
                   [(keys[0], finished(revision=6).encode()), (keys[1], record().encode())]):
        out = trk.outcome_read(t, values)
        assert out.verdict is Verdict.SUPERSEDED and out.superseded_by == t.current
        assert views.exit_code(out.verdict) == views.EXIT_FAILED
        assert views.progress_of(out).verdict_note == "superseded by rollout 9 v3@sha256:222222222222"
        assert views.ended_text(out) == "rollout 7: superseded by rollout 9 v3@sha256:222222222222"
        assert trk.outcome_keys(out) == ()


def test_what_the_live_view_shows_is_the_model() -> None:
    t = trk.resynced(fresh(), [header_kv(record()),
                               KV(proto.hosts_list_key(P, WANT), json.dumps([A]).encode()),
                               report_kv("pulled", A, proto.pulled_ok(D2))])
    t = trk.names_read(t, [host_kv(A, "web-1")])
    p = views.progress_of(t)
    assert (p.want, p.header, p.listed, p.names, p.verdict_note) == (WANT, t.header, (A,), {A: "web-1"}, None)
    assert [text for _, text in views.rollout_frame(p)] == [
        "rollout 7 v2@sha256:222222222222: pull: 1/1 pulled", "  web-1  [####--------]  pulled"]


def test_skipped_is_said_once() -> None:
    t = trk.changed(fresh(), KV(proto.hosts_list_key(P, WANT), b"{"))
    assert t.skipped == (Skipped(proto.hosts_list_key(P, WANT), "not JSON"),)
    assert t.said().skipped == () and t.said().said() == t.said()
