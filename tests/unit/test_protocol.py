"""The pure side of what hosts read and write in an update: header, reports, duties, release file."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from norm.core import protocol as proto
from norm.core.errors import InvalidValue
from norm.core.record import Gate, HostProgress, HostStatus, Phase, Release, Rollout
from norm.core.rollout import (
    HostActive,
    HostFailed,
    HostPulled,
    HostPullFailed,
    HostStopped,
    MigrationFailed,
    MigrationSucceeded,
    MigrationUnknown,
)

A, B = "a" * 32, "b" * 32
D1, D2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
OLD, NEW = Release("v1", D1), Release("v2", D2)
P = "/norm"


def header(phase: Phase, **kw: object) -> proto.Header:
    base = proto.Header(revision=7, tag="v2", phase=phase, digest=D2, previous=OLD, hosts_count=2)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def record(phase: Phase, **kw: object) -> Rollout:
    base = Rollout(revision=7, tag="v2", hosts=(A, B), phase=phase, started_at=0.0, updated_at=0.0,
                   previous=OLD, digest=D2)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_header_round_trip_and_small() -> None:
    r = record(Phase.MIGRATE, migrating="migrate", migrator=A, hosts=tuple(f"{i:032x}" for i in range(1000)))
    h = proto.Header.of(r)
    assert proto.Header.decode(h.encode(), "k") == h
    assert h.hosts_count == 1000 and len(h.encode()) < 600  # the participant list is not in it


@pytest.mark.parametrize("raw", [b"", b"[]", b"{}", b'{"revision": 0, "tag": "v", "phase": "pull"}',
                                 b'{"revision": 1, "tag": "v", "phase": "nope"}',
                                 b'{"revision": 1, "tag": "v", "phase": "pull", "digest": "md5:x"}',
                                 b'{"revision": 1, "tag": "v", "phase": "pull", "extra": 1}',
                                 b'{"revision": 1, "tag": "v", "phase": "start", "rollback": true}'])
def test_bad_headers_are_refused_without_quoting(raw: bytes) -> None:
    with pytest.raises(InvalidValue) as e:
        proto.Header.decode(raw, "/norm/rollout")
    assert "md5" not in str(e.value)


def test_fleet_release_after_each_outcome() -> None:
    assert header(Phase.PULL).fleet_release() is None
    assert header(Phase.DONE).fleet_release() == NEW
    assert header(Phase.FAILED).fleet_release() == OLD
    # Failed in START, on some hosts only: the new release stays (its steps ran).
    assert header(Phase.FAILED, released=True).fleet_release() == NEW
    started = (HostProgress(A, HostStatus.ACTIVE), HostProgress(B, HostStatus.FAILED))
    assert proto.Header.of(record(Phase.FAILED, progress=started)).released
    assert not proto.Header.of(record(Phase.FAILED, progress=started, rollback=True)).released
    assert not proto.Header.of(record(Phase.FAILED)).released
    assert header(Phase.SUPERSEDED).fleet_release() == OLD
    assert header(Phase.HALTED).fleet_release() is None
    assert header(Phase.START, rollback=True).target == OLD
    assert header(Phase.START).target == NEW


def test_reports_become_events() -> None:
    def ev(key: str, raw: bytes, r: Rollout | None = None) -> object:
        report = proto.parse_report(P, 7, f"{P}/rollouts/7/{key}", raw)
        assert report is not None
        return proto.report_event(r or record(Phase.START, progress=()), report)

    assert ev(f"pulled/{A}", proto.pulled_ok(D2)) == HostPulled(A, D2)
    assert ev(f"pulled/{A}", proto.pulled_error("registry down", False)) == \
        HostPullFailed(A, "registry down", False)
    assert ev(f"stopped/{B}", proto.stopped()) == HostStopped(B)
    assert ev(f"started/{A}", proto.started(D2, True)) == HostActive(A)
    assert ev(f"started/{A}", proto.started(D2, False, "web: failed")) == HostFailed(A, "web: failed")
    assert ev(f"started/{A}", proto.started(D1, True)) is None  # another release's start
    assert ev(f"started/{A}", proto.started(D1, True), record(Phase.START, rollback=True,
                                                             outcome=Phase.FAILED)) == HostActive(A)
    assert ev("migrated/migrate", proto.migrated(True, 0, None, 1.0, A)) == MigrationSucceeded("migrate")
    assert ev("migrated/migrate", proto.migrated(False, 3, "exit code 3", 1.0, A)) == \
        MigrationFailed("migrate", "exit code 3")
    assert ev("claim/migrate", proto.claim(A)) is None
    assert proto.parse_report(P, 7, f"{P}/rollouts/7/record", b"{}") is None


@pytest.mark.parametrize("key,raw", [
    (f"pulled/{A}", b'{"digest": "sha256:short"}'),
    (f"pulled/{A}", b"not json"),
    ("pulled/x;reboot", proto.pulled_ok(D2)),
    (f"started/{A}", b'{"digest": "' + D2.encode() + b'", "ok": "yes"}'),
    ("migrated/../x", proto.migrated(True, 0, None, 1.0, A)),
    (f"unknown/{A}", b"{}"),
    (f"stopped/{A}", b"[]"),
])
def test_malformed_reports_are_refused(key: str, raw: bytes) -> None:
    with pytest.raises(InvalidValue) as e:
        proto.parse_report(P, 7, f"{P}/rollouts/7/{key}", raw)
    assert "reboot" not in e.value.reason and "yes" not in e.value.reason


def test_duties_through_a_rollout() -> None:
    none: frozenset[str] = frozenset()
    assert proto.host_duties(None, A, True, none, OLD) == ()
    assert proto.host_duties(header(Phase.RESOLVE, digest=None), A, True, none, OLD) == ()
    assert proto.host_duties(header(Phase.PULL), A, True, none, OLD) == (proto.Pull(D2),)
    assert proto.host_duties(header(Phase.PULL), A, False, none, OLD) == ()  # not taking part
    assert proto.host_duties(header(Phase.PULL), A, True, frozenset({"pulled"}), OLD) == ()
    assert proto.host_duties(header(Phase.STOP), A, True, frozenset({"pulled"}), OLD) == (proto.Stop(),)
    mig = header(Phase.MIGRATE, migrating="migrate", migrator=A)
    assert proto.host_duties(mig, A, True, frozenset({"pulled", "stopped"}), OLD) == \
        (proto.Migrate("migrate", D2),)
    assert proto.host_duties(mig, B, True, frozenset({"pulled", "stopped"}), OLD) == ()
    # The migrator excluded meanwhile (its agent came back late) still finishes its step.
    assert proto.host_duties(mig, A, False, none, OLD) == (proto.Migrate("migrate", D2),)
    assert proto.host_duties(header(Phase.START), A, True, frozenset({"stopped"}), OLD) == (proto.Start(NEW),)
    assert proto.host_duties(header(Phase.START, rollback=True), A, True, none, OLD) == (proto.Start(OLD),)
    assert proto.host_duties(header(Phase.START), A, True, frozenset({"started"}), NEW) == ()
    # After the end: whoever does not run the fleet's release catches up; a halted rollout moves nobody.
    assert proto.host_duties(header(Phase.DONE), A, False, none, OLD) == (proto.CatchUp(NEW),)
    assert proto.host_duties(header(Phase.DONE), A, True, none, NEW) == ()
    # Units an update stopped, and none started since (its rollout superseded after the stop): once
    # the rollouts end, the fleet's release is started, even the one already in the release file.
    assert proto.host_duties(header(Phase.DONE), A, True, none, NEW, stopped=True) == (proto.CatchUp(NEW),)
    assert proto.host_duties(header(Phase.PULL), A, True, none, NEW, stopped=True) == (proto.Pull(D2),)
    assert proto.host_duties(header(Phase.FAILED), A, False, none, None) == (proto.CatchUp(OLD),)
    assert proto.host_duties(header(Phase.HALTED), A, False, none, None) == ()


def test_holds_from_stop_until_started() -> None:
    assert not proto.holds_units(header(Phase.PULL), True, frozenset())
    assert not proto.holds_units(header(Phase.STOP), True, frozenset({"pulled"}))
    assert proto.holds_units(header(Phase.STOP), True, frozenset({"pulled", "stopped"}))
    assert proto.holds_units(header(Phase.MIGRATE), True, frozenset({"stopped"}))
    assert proto.holds_units(header(Phase.START), True, frozenset({"stopped"}))
    assert not proto.holds_units(header(Phase.START), True, frozenset({"stopped", "started"}))
    assert not proto.holds_units(header(Phase.START), False, frozenset())
    assert not proto.holds_units(header(Phase.DONE), True, frozenset({"stopped"}))


TAGS = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", fullmatch=True)


@given(TAGS)
def test_release_file_round_trip(tag: str) -> None:
    text = proto.render_release(Release(tag, D2), "127.0.0.1:5000/djed/app", 7)
    assert proto.parse_release(text) == Release(tag, D2)
    assert b"NORM_IMAGE=127.0.0.1:5000/djed/app@" + D2.encode() + b"\n" in text


def assert_exactly_the_release_lines(text: bytes, release: Release) -> None:
    lines = text.decode().split("\n")
    assert lines[-1] == "" and [line.partition("=")[0] for line in lines[:-1]] == list(proto.RELEASE_KEYS)
    assert proto.parse_release(text) == release


HOSTILE = st.one_of(
    st.text(max_size=40),
    st.builds(lambda t, inj: t + inj, TAGS, st.sampled_from(
        ["\nNORM_IMAGE=evil/app@" + D1, "\rNORM_DIGEST=" + D1, "\x00", " ", "\u2028X=1", "=x", "#",
         "\n", "$(reboot)", "\u0085"])),
)


@given(tag=st.one_of(TAGS, HOSTILE), digest=st.one_of(st.just(D2), st.text(max_size=80)),
       image=st.one_of(st.just("127.0.0.1:5000/djed/app"), st.text(max_size=40)),
       revision=st.integers(min_value=-2, max_value=10**12))
def test_a_release_file_is_exactly_its_four_lines_or_not_written(tag: str, digest: str, image: str,
                                                                  revision: int) -> None:
    release = Release(tag, digest)
    try:
        text = proto.render_release(release, image, revision)
    except InvalidValue as e:
        assert "evil" not in str(e) and "reboot" not in str(e)
        return
    assert_exactly_the_release_lines(text, release)


def header_dict(**kw: object) -> dict[str, object]:
    d: dict[str, object] = {"revision": 7, "tag": "v2", "phase": "start", "digest": D2,
                            "previous": {"tag": "v1", "digest": D1}, "hosts_count": 2}
    d.update(kw)
    return d


@given(tag=st.one_of(TAGS, HOSTILE), previous_tag=st.one_of(TAGS, HOSTILE), rollback=st.booleans(),
       phase=st.sampled_from([p.value for p in Phase]))
def test_any_header_accepted_renders_exactly_the_release_lines(tag: str, previous_tag: str, rollback: bool,
                                                               phase: str) -> None:
    import json

    raw = json.dumps(header_dict(tag=tag, previous={"tag": previous_tag, "digest": D1}, rollback=rollback,
                                 phase=phase)).encode()
    try:
        h = proto.Header.decode(raw, "/norm/rollout")
    except InvalidValue as e:
        assert "evil" not in str(e) and "reboot" not in str(e)
        return
    for release in (h.release, h.previous, h.target, h.fleet_release()):
        if release is not None:
            text = proto.render_release(release, "127.0.0.1:5000/djed/app", h.revision)
            assert_exactly_the_release_lines(text, release)


@pytest.mark.parametrize("field,value", [
    ("tag", "v2\nNORM_IMAGE=evil/app@" + D1),
    ("tag", "v2 "),
    ("tag", ""),
    ("tag", "x" * 129),
    ("previous", {"tag": "v1\nX=1", "digest": D1}),
    ("previous", {"tag": "v1", "digest": D1, "extra": 1}),
    ("migrating", "migrate\nX=1"),
    ("migrating", "../migrate"),
    ("migrator", "not-a-machine-id"),
    ("excluded", ["a" * 31]),
    ("excluded", [A + "\n"]),
    ("reason", "x" * 300_000),
    ("reason", "\x1b[2Jcleared"),
    ("hosts_count", -1),
    ("phase", "evil"),
    ("outcome", "evil"),
])
def test_hostile_values_in_a_header_are_refused_without_quoting(field: str, value: object) -> None:
    import json

    with pytest.raises(InvalidValue) as e:
        proto.Header.decode(json.dumps(header_dict(**{field: value})).encode(), "/norm/rollout")
    assert e.value.where == "/norm/rollout"
    assert "evil" not in str(e.value) and "X=1" not in str(e.value) and "cleared" not in str(e.value)


@pytest.mark.parametrize("key,raw", [
    ("migrated/migrate", b'{"ok": true, "host": "x;reboot", "seconds": 1.0, "exit_code": 0}'),
    ("claim/migrate", b'{"host": "../reboot"}'),
    (f"started/{A}", b'{"digest": "' + D2.encode() + b'", "ok": false, "reason": "' + b"r" * 301 + b'"}'),
    (f"started/{A}", b'{"digest": "' + D2.encode() + b'", "ok": false, "reason": "\\u001b[2Jreboot"}'),
    (f"pulled/{A}", b'{"error": "' + b"r" * 301 + b'", "permanent": true}'),
    (f"stopped/{A}", b'{"reboot": 1}'),
    ("abort", b'{"by": "\\u001breboot"}'),
    ("migrated/migrate", b'{"ok": true, "host": "' + A.encode() + b'", "exit_code": "0"}'),
])
def test_hostile_values_in_reports_are_refused(key: str, raw: bytes) -> None:
    with pytest.raises(InvalidValue) as e:
        proto.parse_report(P, 7, f"{P}/rollouts/7/{key}", raw)
    assert "reboot" not in str(e.value)


def test_what_hosts_write_reads_back_whatever_the_reason() -> None:
    nasty = "\x1b[2J" + "line\nnext\ttab\x00" * 40
    for key, raw in ((f"pulled/{A}", proto.pulled_error(nasty, False)),
                     (f"started/{A}", proto.started(D2, False, nasty)),
                     ("migrated/migrate", proto.migrated(False, 3, nasty, 1.0, A)),
                     ("abort", proto.abort_request(nasty))):
        report = proto.parse_report(P, 7, f"{P}/rollouts/7/{key}", raw)
        assert report is not None and "\x1b" not in str(report.value) and "\x00" not in str(report.value)


def test_release_file_that_is_not_ours() -> None:
    assert proto.parse_release(b"") is None
    assert proto.parse_release(b"NORM_RELEASE=v1\nNORM_DIGEST=latest\n") is None


def test_a_host_outside_the_rollout_is_behind_from_the_migration_until_it_catches_up() -> None:
    def behind(h: proto.Header, participant: bool = False, running: Release | None = OLD) -> bool:
        return proto.behind_migration(h, participant, running)

    # Before the cut-over nothing has changed; the participants are stopped or starting anyway.
    assert not any(behind(header(p)) for p in (Phase.RESOLVE, Phase.PULL, Phase.STOP))
    assert behind(header(Phase.MIGRATE, migrating="migrate", migrator=B)) and behind(header(Phase.START))
    assert not behind(header(Phase.START), participant=True)
    assert not behind(header(Phase.START), running=NEW)
    assert not behind(header(Phase.START, rollback=True, outcome=Phase.FAILED))  # the old one is back
    # After the end: behind while the new release is the fleet's and this host runs another.
    assert behind(header(Phase.DONE)) and behind(header(Phase.DONE), running=None)
    assert not behind(header(Phase.DONE), running=NEW)
    assert behind(header(Phase.FAILED, released=True))
    assert not behind(header(Phase.FAILED)) and not behind(header(Phase.SUPERSEDED))
    assert not behind(header(Phase.HALTED))  # an operator decides
    assert not behind(None)


def test_an_unknown_step_outcome_is_its_own_event() -> None:
    report = proto.parse_report(P, 7, f"{P}/rollouts/7/migrated/migrate",
                              proto.migrated(False, None, "the container vanished", 0.0, A, unknown=True))
    assert report is not None
    assert proto.report_event(record(Phase.MIGRATE, migrating="migrate"), report) == \
        MigrationUnknown("migrate", "the container vanished")
    with pytest.raises(InvalidValue):  # succeeded and unknown at once
        proto.parse_report(P, 7, f"{P}/rollouts/7/migrated/migrate",
                         b'{"ok": true, "unknown": true, "host": "' + A.encode() + b'"}')


@pytest.mark.parametrize("code,killed_by_norm,outcome", [
    (0, False, "ok"), (1, False, "failed"), (3, False, "failed"), (128, False, "failed"),
    (137, False, "unknown"),  # SIGKILL that Norm did not send: the engine went away, or killed it on restart
    (143, False, "unknown"),  # SIGTERM: the engine stopping it on its way down
    (255, False, "unknown"),  # the engine lost the process
    (137, True, "failed"),  # Norm's own kill at migration_timeout
])
def test_how_a_step_ended(code: int, killed_by_norm: bool, outcome: str) -> None:
    assert proto.step_outcome(code, killed_by_norm) == outcome


NUMBERS_OUT_OF_RANGE = ["9" * 400, "-" + "9" * 400, "1e400", "-1e999", "Infinity", "-Infinity", "NaN"]


@pytest.mark.parametrize("number", NUMBERS_OUT_OF_RANGE)
@pytest.mark.parametrize("field", ["started_at", "updated_at", "ended_at"])
def test_a_time_in_a_header_that_is_no_finite_float_is_refused(field: str, number: str) -> None:
    import json

    raw = json.dumps(header_dict(**{field: "@N@"})).replace('"@N@"', number).encode()
    with pytest.raises(InvalidValue):
        proto.Header.decode(raw, "/norm/rollout")


@pytest.mark.parametrize("number", NUMBERS_OUT_OF_RANGE)
def test_a_step_duration_in_a_report_that_is_no_finite_float_is_refused(number: str) -> None:
    raw = b'{"ok": true, "host": "' + A.encode() + b'", "exit_code": 0, "seconds": ' + number.encode() + b"}"
    with pytest.raises(InvalidValue):
        proto.parse_report(P, 7, f"{P}/rollouts/7/migrated/migrate", raw)


# ---------------------------------------------------------------------------------------------------
# The key layout: each writer's range


def test_the_keys_of_each_writer() -> None:
    assert proto.report_key(P, 7, "pulled", A) == f"{P}/reports/{A}/000000000007/pulled"
    assert proto.migrated_key(P, 7, A, "migrate") == f"{P}/reports/{A}/000000000007/migrated/migrate"
    assert proto.claim_key(P, 7, "migrate") == f"{P}/claims/000000000007/migrate"
    assert proto.abort_key(P, 7) == f"{P}/aborts/000000000007"
    assert proto.rollout_reports_prefix(P, 7, A) == f"{P}/reports/{A}/000000000007/"
    # A host's reports of older rollouts are one range before those of the current one.
    start, end = proto.older_reports(P, 1000, A)
    for rev in (1, 7, 999):
        assert start <= proto.report_key(P, rev, "started", A) < end
        assert start <= proto.migrated_key(P, rev, A, "migrate") < end
    for rev in (1000, 1001, 10**11):
        assert not start <= proto.report_key(P, rev, "pulled", A) < end
    assert not start <= proto.report_key(P, 7, "pulled", B) < end


def test_reports_of_the_new_layout_become_events() -> None:
    def ev(key: str, raw: bytes) -> object:
        report = proto.parse_report(P, 7, key, raw)
        assert report is not None
        return proto.report_event(record(Phase.START, progress=()), report)

    assert ev(proto.report_key(P, 7, "pulled", A), proto.pulled_ok(D2)) == HostPulled(A, D2)
    assert ev(proto.report_key(P, 7, "stopped", B), proto.stopped()) == HostStopped(B)
    assert ev(proto.report_key(P, 7, "started", A), proto.started(D2, True)) == HostActive(A)
    assert ev(proto.migrated_key(P, 7, A, "migrate"), proto.migrated(True, 0, None, 1.0, A)) == \
        MigrationSucceeded("migrate")
    claim = proto.parse_report(P, 7, proto.claim_key(P, 7, "migrate"), proto.claim(A))
    assert claim == proto.Report("claim", "migrate", {"host": A})
    abort = proto.parse_report(P, 7, proto.abort_key(P, 7), proto.abort_request("alice"))
    assert abort == proto.Report("abort", "", {"by": "alice"})
    # Another rollout's keys are passed over, whatever their value.
    for key in (proto.report_key(P, 8, "pulled", A), proto.migrated_key(P, 6, A, "migrate"),
                proto.claim_key(P, 8, "migrate"), proto.abort_key(P, 70), proto.record_key(P, 8),
                proto.legacy_report_key(P, 8, "pulled", A)):
        assert proto.parse_report(P, 7, key, b"not json") is None, key
    assert proto.report_of_key(P, 7, proto.report_key(P, 7, "pulled", A)) == ("pulled", A)
    assert proto.report_of_key(P, 7, proto.migrated_key(P, 7, A, "migrate")) == ("migrated", "migrate")


@pytest.mark.parametrize("key", [
    f"{P}/reports/{A}/000000000007/unknown",
    f"{P}/reports/{A}/000000000007/pulled/x",
    f"{P}/reports/{A}/000000000007/migrated/../x",
    f"{P}/reports/{A}/000000000007/migrated/",
    f"{P}/reports/{A}/7/pulled",
    f"{P}/reports/x;reboot/000000000007/pulled",
    f"{P}/reports/{A}",
    f"{P}/claims/000000000007/x;reboot",
    f"{P}/claims/7/migrate",
    f"{P}/aborts/7",
    f"{P}/aborts/000000000007/x",
    f"{P}/elsewhere/{A}",
])
def test_keys_outside_the_layout_are_refused(key: str) -> None:
    with pytest.raises(InvalidValue) as e:
        proto.parse_report(P, 7, key, proto.stopped())
    assert e.value.where == key and "reboot" not in e.value.reason


def test_reports_of_the_previous_layout_are_still_read() -> None:
    """Agents of the previous version, while a fleet is being upgraded, write every report under the
    rollout's prefix: the same reports, the same events."""
    for kind, name, raw in (("pulled", A, proto.pulled_ok(D2)), ("stopped", B, proto.stopped()),
                            ("started", A, proto.started(D2, True)),
                            ("migrated", "migrate", proto.migrated(True, 0, None, 1.0, A)),
                            ("claim", "migrate", proto.claim(A))):
        old = proto.parse_report(P, 7, proto.legacy_report_key(P, 7, kind, name), raw)
        assert old is not None and (old.kind, old.name) == (kind, name)
        new_key = proto.claim_key(P, 7, name) if kind == "claim" else proto.migrated_key(P, 7, A, name) \
            if kind == "migrated" else proto.report_key(P, 7, kind, name)
        assert proto.parse_report(P, 7, new_key, raw) == old
    pause = proto.parse_report(P, 7, proto.request_key(P, 7, "pause"), proto.operator_request("alice"), 77)
    assert pause == proto.Report("pause", "", {"by": "alice"}, 77)
    assert proto.parse_report(P, 8, proto.request_key(P, 7, "resume"), proto.operator_request("bob")) is None
    with pytest.raises(InvalidValue):
        proto.parse_report(P, 7, f"{P}/requests/{proto.rev12(7)}/reboot", proto.operator_request("alice"))
    abort = proto.parse_report(P, 7, proto.legacy_abort_key(P, 7), proto.abort_request("alice"))
    assert abort == proto.parse_report(P, 7, proto.abort_key(P, 7), proto.abort_request("alice"))
    assert proto.parse_report(P, 7, proto.hosts_list_key(P, 7), b"[]") is None
    with pytest.raises(InvalidValue):
        proto.parse_report(P, 7, proto.legacy_report_key(P, 7, "pulled", "x;reboot"), proto.pulled_ok(D2))


def test_the_leaders_trim_spares_the_current_rollouts_claims_and_abort() -> None:
    ranges = proto.stale_ranges(P, 7)

    def trimmed(key: str) -> bool:
        return any(start <= key < end for start, end in ranges)

    for rev in (1, 6, 8, 10**11):
        assert trimmed(proto.claim_key(P, rev, "migrate")) and trimmed(proto.abort_key(P, rev))
        assert all(trimmed(proto.request_key(P, rev, kind)) for kind in proto.REQUEST_KINDS)
    assert not trimmed(proto.claim_key(P, 7, "migrate")) and not trimmed(proto.abort_key(P, 7))
    assert not any(trimmed(proto.request_key(P, 7, kind)) for kind in proto.REQUEST_KINDS)
    assert not trimmed(proto.claim_key(P, 7, "collectstatic"))
    for key in (proto.report_key(P, 6, "pulled", A), proto.record_key(P, 6), proto.header_key(P),
                proto.ledger_key(P, 6, "migrate"), proto.history_key(P, 6)):
        assert not trimmed(key), key


def test_the_progress_range_holds_the_reports_the_header_and_the_rollouts_and_nothing_else() -> None:
    start, end = proto.progress_range(P)
    for key in (proto.report_key(P, 7, "pulled", A), proto.header_key(P), proto.record_key(P, 7),
                proto.legacy_report_key(P, 7, "stopped", B), proto.migrated_key(P, 7, B, "migrate")):
        assert start <= key < end, key
    for key in (proto.claim_key(P, 7, "migrate"), proto.abort_key(P, 7), proto.ledger_key(P, 7, "m"),
                proto.history_key(P, 7), f"{P}/hosts/{A}", f"{P}/units/{A}", f"{P}/leader",
                f"{P}/control/{A}/x"):
        assert not start <= key < end, key


def test_a_rolling_update_moves_only_its_batch_and_stops_nobody_for_its_steps() -> None:
    gate = Gate(min_healthy=10.0, healthy_deadline=300.0)
    pre = header(Phase.MIGRATE, strategy="rolling", migrating="migrate", migrator=A)
    assert proto.host_duties(pre, B, True, frozenset(), OLD) == ()  # B keeps serving
    assert proto.host_duties(pre, A, True, frozenset(), OLD) == (proto.Migrate("migrate", D2),)
    assert not proto.holds_units(pre, True, frozenset(), B)
    roll = header(Phase.ROLL, strategy="rolling", batch=(A,), batches=2, gate=gate)
    assert proto.host_duties(roll, A, True, frozenset(), OLD) == (proto.Move(NEW, gate),)
    assert proto.host_duties(roll, B, True, frozenset(), OLD) == ()
    assert proto.host_duties(roll, A, True, frozenset({"pulled", "started"}), NEW) == ()
    assert proto.holds_units(roll, True, frozenset({"pulled"}), A)
    assert not proto.holds_units(roll, True, frozenset({"pulled", "started"}), A)
    assert not proto.holds_units(roll, True, frozenset({"pulled"}), B)
    back = dataclasses.replace(roll, rollback=True, outcome=Phase.ROLLED_BACK)
    assert proto.host_duties(back, A, True, frozenset(), NEW) == (proto.Move(OLD, gate),)


def test_a_host_outside_a_rolling_update_is_behind_only_from_its_post_steps() -> None:
    rolling = {"strategy": "rolling"}
    assert not proto.behind_migration(header(Phase.MIGRATE, migrating="migrate", **rolling), False, OLD)
    assert not proto.behind_migration(header(Phase.ROLL, batch=(A,), **rolling), False, OLD)
    assert proto.behind_migration(header(Phase.MIGRATE, migrating="collectstatic", post=True, **rolling),
                                  False, OLD)
    assert proto.behind_migration(header(Phase.DONE, **rolling), False, OLD)
    assert not proto.behind_migration(header(Phase.ROLLED_BACK, rollback=True, **rolling), False, OLD)


def test_a_rolling_update_cut_short_by_a_newer_one_moves_nobody_back() -> None:
    assert header(Phase.SUPERSEDED, released=True).fleet_release() is None
    assert header(Phase.SUPERSEDED).fleet_release() == OLD
    assert header(Phase.ROLLED_BACK, rollback=True).fleet_release() == OLD


def test_the_image_label_a_host_pulled_comes_with_its_report() -> None:
    r = record(Phase.PULL)
    report = proto.parse_report(P, 7, proto.report_key(P, 7, "pulled", A), proto.pulled_ok(D2, "expand"))
    assert report is not None and proto.report_event(r, report) == HostPulled(A, D2, "expand")
    with pytest.raises(InvalidValue):
        proto.parse_report(P, 7, proto.report_key(P, 7, "pulled", A),
                           b'{"digest": "%s", "migrations": "sometimes"}' % D2.encode())


def test_a_start_report_in_a_batch_is_an_event_of_its_target_only() -> None:
    r = record(Phase.ROLL, strategy="rolling", batches=((A,), (B,)),
               progress=(HostProgress(A, HostStatus.MOVING), HostProgress(B, HostStatus.PULLED)))
    ok = proto.parse_report(P, 7, proto.report_key(P, 7, "started", A), proto.started(D2, True))
    old = proto.parse_report(P, 7, proto.report_key(P, 7, "started", A), proto.started(D1, True))
    assert ok is not None and old is not None
    assert proto.report_event(r, ok) == HostActive(A) and proto.report_event(r, old) is None
    back = dataclasses.replace(r, rollback=True, outcome=Phase.ROLLED_BACK)
    assert proto.report_event(back, old) == HostActive(A) and proto.report_event(back, ok) is None
