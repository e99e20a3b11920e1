"""The pure side of what hosts read and write in an update: header, reports, duties, release file."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from norm.core import release as rel
from norm.core.errors import InvalidValue
from norm.core.rollout import (
    HostActive,
    HostFailed,
    HostProgress,
    HostPulled,
    HostPullFailed,
    HostStatus,
    HostStopped,
    MigrationFailed,
    MigrationSucceeded,
    MigrationUnknown,
    Phase,
    Release,
    Rollout,
)

A, B = "a" * 32, "b" * 32
D1, D2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
OLD, NEW = Release("v1", D1), Release("v2", D2)
P = "/norm"


def header(phase: Phase, **kw: object) -> rel.Header:
    base = rel.Header(revision=7, tag="v2", phase=phase, digest=D2, previous=OLD, hosts_count=2)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def record(phase: Phase, **kw: object) -> Rollout:
    base = Rollout(revision=7, tag="v2", hosts=(A, B), phase=phase, started_at=0.0, updated_at=0.0,
                   previous=OLD, digest=D2)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_header_round_trip_and_small() -> None:
    r = record(Phase.MIGRATE, migrating="migrate", migrator=A, hosts=tuple(f"{i:032x}" for i in range(1000)))
    h = rel.Header.of(r)
    assert rel.Header.decode(h.encode(), "k") == h
    assert h.hosts_count == 1000 and len(h.encode()) < 600  # the participant list is not in it


@pytest.mark.parametrize("raw", [b"", b"[]", b"{}", b'{"revision": 0, "tag": "v", "phase": "pull"}',
                                 b'{"revision": 1, "tag": "v", "phase": "nope"}',
                                 b'{"revision": 1, "tag": "v", "phase": "pull", "digest": "md5:x"}',
                                 b'{"revision": 1, "tag": "v", "phase": "pull", "extra": 1}',
                                 b'{"revision": 1, "tag": "v", "phase": "start", "rollback": true}'])
def test_bad_headers_are_refused_without_quoting(raw: bytes) -> None:
    with pytest.raises(InvalidValue) as e:
        rel.Header.decode(raw, "/norm/rollout")
    assert "md5" not in str(e.value)


def test_fleet_release_after_each_outcome() -> None:
    assert header(Phase.PULL).fleet_release() is None
    assert header(Phase.DONE).fleet_release() == NEW
    assert header(Phase.FAILED).fleet_release() == OLD
    # Failed in START, on some hosts only: the new release stays (its steps ran).
    assert header(Phase.FAILED, released=True).fleet_release() == NEW
    started = (HostProgress(A, HostStatus.ACTIVE), HostProgress(B, HostStatus.FAILED))
    assert rel.Header.of(record(Phase.FAILED, progress=started)).released
    assert not rel.Header.of(record(Phase.FAILED, progress=started, rollback=True)).released
    assert not rel.Header.of(record(Phase.FAILED)).released
    assert header(Phase.SUPERSEDED).fleet_release() == OLD
    assert header(Phase.HALTED).fleet_release() is None
    assert header(Phase.START, rollback=True).target == OLD
    assert header(Phase.START).target == NEW


def test_reports_become_events() -> None:
    def ev(key: str, raw: bytes, r: Rollout | None = None) -> object:
        report = rel.parse_report(P, 7, f"{P}/rollouts/7/{key}", raw)
        assert report is not None
        return rel.report_event(r or record(Phase.START, progress=()), report)

    assert ev(f"pulled/{A}", rel.pulled_ok(D2)) == HostPulled(A, D2)
    assert ev(f"pulled/{A}", rel.pulled_error("registry down", False)) == \
        HostPullFailed(A, "registry down", False)
    assert ev(f"stopped/{B}", rel.stopped()) == HostStopped(B)
    assert ev(f"started/{A}", rel.started(D2, True)) == HostActive(A)
    assert ev(f"started/{A}", rel.started(D2, False, "web: failed")) == HostFailed(A, "web: failed")
    assert ev(f"started/{A}", rel.started(D1, True)) is None  # another release's start
    assert ev(f"started/{A}", rel.started(D1, True), record(Phase.START, rollback=True,
                                                             outcome=Phase.FAILED)) == HostActive(A)
    assert ev("migrated/migrate", rel.migrated(True, 0, None, 1.0, A)) == MigrationSucceeded("migrate")
    assert ev("migrated/migrate", rel.migrated(False, 3, "exit code 3", 1.0, A)) == \
        MigrationFailed("migrate", "exit code 3")
    assert ev("claim/migrate", rel.claim(A)) is None
    assert rel.parse_report(P, 7, f"{P}/rollouts/7/record", b"{}") is None


@pytest.mark.parametrize("key,raw", [
    (f"pulled/{A}", b'{"digest": "sha256:short"}'),
    (f"pulled/{A}", b"not json"),
    ("pulled/x;reboot", rel.pulled_ok(D2)),
    (f"started/{A}", b'{"digest": "' + D2.encode() + b'", "ok": "yes"}'),
    ("migrated/../x", rel.migrated(True, 0, None, 1.0, A)),
    (f"unknown/{A}", b"{}"),
    (f"stopped/{A}", b"[]"),
])
def test_malformed_reports_are_refused(key: str, raw: bytes) -> None:
    with pytest.raises(InvalidValue) as e:
        rel.parse_report(P, 7, f"{P}/rollouts/7/{key}", raw)
    assert "reboot" not in e.value.reason and "yes" not in e.value.reason


def test_duties_through_a_rollout() -> None:
    none: frozenset[str] = frozenset()
    assert rel.host_duties(None, A, True, none, OLD) == ()
    assert rel.host_duties(header(Phase.RESOLVE, digest=None), A, True, none, OLD) == ()
    assert rel.host_duties(header(Phase.PULL), A, True, none, OLD) == (rel.Pull(D2),)
    assert rel.host_duties(header(Phase.PULL), A, False, none, OLD) == ()  # not taking part
    assert rel.host_duties(header(Phase.PULL), A, True, frozenset({"pulled"}), OLD) == ()
    assert rel.host_duties(header(Phase.STOP), A, True, frozenset({"pulled"}), OLD) == (rel.Stop(),)
    mig = header(Phase.MIGRATE, migrating="migrate", migrator=A)
    assert rel.host_duties(mig, A, True, frozenset({"pulled", "stopped"}), OLD) == \
        (rel.Migrate("migrate", D2),)
    assert rel.host_duties(mig, B, True, frozenset({"pulled", "stopped"}), OLD) == ()
    # The migrator excluded meanwhile (its agent came back late) still finishes its step.
    assert rel.host_duties(mig, A, False, none, OLD) == (rel.Migrate("migrate", D2),)
    assert rel.host_duties(header(Phase.START), A, True, frozenset({"stopped"}), OLD) == (rel.Start(NEW),)
    assert rel.host_duties(header(Phase.START, rollback=True), A, True, none, OLD) == (rel.Start(OLD),)
    assert rel.host_duties(header(Phase.START), A, True, frozenset({"started"}), NEW) == ()
    # After the end: whoever does not run the fleet's release catches up; a halted rollout moves nobody.
    assert rel.host_duties(header(Phase.DONE), A, False, none, OLD) == (rel.CatchUp(NEW),)
    assert rel.host_duties(header(Phase.DONE), A, True, none, NEW) == ()
    assert rel.host_duties(header(Phase.FAILED), A, False, none, None) == (rel.CatchUp(OLD),)
    assert rel.host_duties(header(Phase.HALTED), A, False, none, None) == ()


def test_holds_from_stop_until_started() -> None:
    assert not rel.holds_units(header(Phase.PULL), True, frozenset())
    assert not rel.holds_units(header(Phase.STOP), True, frozenset({"pulled"}))
    assert rel.holds_units(header(Phase.STOP), True, frozenset({"pulled", "stopped"}))
    assert rel.holds_units(header(Phase.MIGRATE), True, frozenset({"stopped"}))
    assert rel.holds_units(header(Phase.START), True, frozenset({"stopped"}))
    assert not rel.holds_units(header(Phase.START), True, frozenset({"stopped", "started"}))
    assert not rel.holds_units(header(Phase.START), False, frozenset())
    assert not rel.holds_units(header(Phase.DONE), True, frozenset({"stopped"}))


@given(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=20))
def test_release_file_round_trip(tag: str) -> None:
    text = rel.render_release(Release(tag.replace("=", "_"), D2), "127.0.0.1:5000/djed/app", 7)
    assert rel.parse_release(text) == Release(tag.replace("=", "_"), D2)
    assert b"NORM_IMAGE=127.0.0.1:5000/djed/app@" + D2.encode() + b"\n" in text


def test_release_file_that_is_not_ours() -> None:
    assert rel.parse_release(b"") is None
    assert rel.parse_release(b"NORM_RELEASE=v1\nNORM_DIGEST=latest\n") is None


def test_an_unknown_step_outcome_is_its_own_event() -> None:
    report = rel.parse_report(P, 7, f"{P}/rollouts/7/migrated/migrate",
                              rel.migrated(False, None, "the container vanished", 0.0, A, unknown=True))
    assert report is not None
    assert rel.report_event(record(Phase.MIGRATE, migrating="migrate"), report) == \
        MigrationUnknown("migrate", "the container vanished")
    with pytest.raises(InvalidValue):  # succeeded and unknown at once
        rel.parse_report(P, 7, f"{P}/rollouts/7/migrated/migrate",
                         b'{"ok": true, "unknown": true, "host": "' + A.encode() + b'"}')


@pytest.mark.parametrize("code,killed_by_norm,outcome", [
    (0, False, "ok"), (1, False, "failed"), (3, False, "failed"), (128, False, "failed"),
    (137, False, "unknown"),  # SIGKILL that Norm did not send: the engine went away, or killed it on restart
    (143, False, "unknown"),  # SIGTERM: the engine stopping it on its way down
    (255, False, "unknown"),  # the engine lost the process
    (137, True, "failed"),  # Norm's own kill at migration_timeout
])
def test_how_a_step_ended(code: int, killed_by_norm: bool, outcome: str) -> None:
    assert rel.step_outcome(code, killed_by_norm) == outcome
