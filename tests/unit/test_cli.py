"""The `norm` command as operators run it: a real process, its exit status and what it prints; and the
pure views it prints for fleet updates (norm.app.views)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import norm
from norm.app import cli, views
from norm.core import config as cfg
from norm.core import protocol as proto
from norm.core.record import Excluded, HostProgress, HostStatus, LedgerEntry, Phase, Release, Rollout

REPO = Path(__file__).resolve().parents[2]
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
PASSWORD = "pw-Zq8#unguessable"


def norm_cmd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("NORM_")}
    return subprocess.run([PYTHON, "-m", "norm", *args], cwd=REPO, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=60, check=False)


def assert_usage_error(proc: subprocess.CompletedProcess[str], *parts: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    for part in parts:
        assert part in proc.stderr, proc.stderr


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "norm.toml"
    path.write_text('[etcd]\nendpoints = ["http://10.0.0.1:2379"]\nlease_ttl = 15\n[host]\nrole = "web"\n')
    return path


def test_version() -> None:
    proc = norm_cmd("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"norm {norm.__version__}"


def test_no_command_is_a_usage_error() -> None:
    proc = norm_cmd()
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


def test_check_good_file(good: Path) -> None:
    proc = norm_cmd("config", "check", str(good))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{good}: OK"
    assert proc.stderr == ""


def test_check_bad_value(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[etcd]\nlease_ttl = "soon"\n')
    assert_usage_error(norm_cmd("config", "check", str(path)), "etcd.lease_ttl", str(path), "whole number")


def test_check_failed_rule(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[etcd]\nusername = "root"\n')
    assert_usage_error(norm_cmd("config", "check", str(path)), "etcd.password", "needs password")


def test_check_unknown_key(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text("[etcd]\nleese_ttl = 3\n")
    assert_usage_error(norm_cmd("config", "check", str(path)), "etcd.leese_ttl", str(path), "unknown key")


def test_check_unknown_section(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text("[etc]\nx = 3\n")
    assert_usage_error(norm_cmd("config", "check", str(path)), "etc", str(path), "unknown section")


def test_check_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    assert_usage_error(norm_cmd("config", "check", str(path)), str(path), "no such file")


def test_check_bad_toml(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[etcd\n")
    assert_usage_error(norm_cmd("config", "check", str(path)), str(path), "not valid TOML")


def test_check_ignores_the_environment(good: Path) -> None:
    proc = norm_cmd("config", "check", str(good), env={"NORM_ETCD__LEASE_TTL": "not-a-number"})
    assert proc.returncode == 0, proc.stderr


def test_check_with_a_bad_set_flag(good: Path) -> None:
    assert_usage_error(norm_cmd("config", "check", str(good), "--set", "etcd.lease_ttl=x"),
                       "--set etcd.lease_ttl", "etcd.lease_ttl")
    assert_usage_error(norm_cmd("config", "check", str(good), "--set", "nonsense"),
                       "--set", "section.key=value")


def test_check_reads_the_password_file(tmp_path: Path) -> None:
    path = tmp_path / "norm.toml"
    path.write_text(f'[etcd]\nusername = "root"\npassword_file = "{tmp_path / "absent"}"\n')
    assert_usage_error(norm_cmd("config", "check", str(path)), "etcd.password_file", "cannot read")
    (tmp_path / "absent").write_text(PASSWORD + "\n")
    proc = norm_cmd("config", "check", str(path))
    assert proc.returncode == 0, proc.stderr
    assert PASSWORD not in proc.stdout + proc.stderr


def test_check_path_through_a_file(good: Path) -> None:
    path = f"{good}/norm.toml"
    assert_usage_error(norm_cmd("config", "check", path), path)


def test_reference_matches_the_docs() -> None:
    proc = norm_cmd("config", "reference", "--check", "docs/configuration.md")
    assert proc.returncode == 0, proc.stderr


def test_reference_prints_the_markdown() -> None:
    proc = norm_cmd("config", "reference")
    assert proc.returncode == 0
    assert proc.stdout.rstrip("\n") == cfg.reference_markdown().rstrip("\n")


def test_reference_check_of_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text("# Configuration reference\n")
    proc = norm_cmd("config", "reference", "--check", str(stale))
    assert proc.returncode == 1
    assert str(stale) in proc.stderr and "out of date" in proc.stderr
    proc = norm_cmd("config", "reference", "--check", str(tmp_path / "absent.md"))
    assert proc.returncode == 1


def test_show_masks_the_password(good: Path) -> None:
    proc = norm_cmd("config", "show", "--config", str(good),
                    env={"NORM_ETCD__USERNAME": "root", "NORM_ETCD__PASSWORD": PASSWORD})
    assert proc.returncode == 0, proc.stderr
    assert PASSWORD not in proc.stdout + proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["etcd"]["password"] == "********"
    assert shown["etcd"]["username"] == "root"
    assert shown["etcd"]["lease_ttl"] == 15
    assert shown["etcd"]["endpoints"] == ["http://10.0.0.1:2379"]
    assert shown["host"]["role"] == "web"
    assert set(shown) == {f.name for f in dataclasses.fields(cfg.Config)}


def test_show_with_set_and_norm_config(good: Path) -> None:
    proc = norm_cmd("config", "show", "--set", "log.level=debug", env={"NORM_CONFIG": str(good)})
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["log"]["level"] == "debug"
    assert shown["etcd"]["lease_ttl"] == 15


def test_show_bad_environment_is_a_usage_error(good: Path) -> None:
    proc = norm_cmd("config", "show", "--config", str(good), env={"NORM_ETCD__LEASE_TTL": "x"})
    assert_usage_error(proc, "environment variable NORM_ETCD__LEASE_TTL", "etcd.lease_ttl")


def test_show_password_in_a_failing_config_is_not_printed(good: Path) -> None:
    proc = norm_cmd("config", "show", "--config", str(good), env={"NORM_ETCD__PASSWORD": PASSWORD})
    assert_usage_error(proc, "etcd.username")
    assert PASSWORD not in proc.stderr


# ---------------------------------------------------------------------------------------------------
# Views of fleet updates: pure formatting (norm.app.views)

A, B, C = "a" * 32, "b" * 32, "c" * 32
D1, D2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
OLD = Release("v1", D1)
T0 = 1_700_000_000.0
NAMES = {A: "web-1", B: "web-2"}


def header(phase: Phase, **kw: object) -> proto.Header:
    base = proto.Header(revision=7, tag="v2", phase=phase, digest=D2, previous=OLD, hosts_count=2,
                      started_at=T0, updated_at=T0 + 10)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def rollout(phase: Phase, **kw: object) -> Rollout:
    base = Rollout(revision=7, tag="v2", hosts=(A, B), phase=phase, started_at=T0, updated_at=T0 + 10,
                   previous=OLD, digest=D2, steps=("migrate", "collectstatic"),
                   progress=(HostProgress(A), HostProgress(B)))
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def reports(*items: tuple[str, str, bytes]) -> dict[tuple[str, str], dict[str, object]]:
    return {(kind, name): json.loads(raw) for kind, name, raw in items}


@pytest.mark.parametrize(("done", "total", "bar"), [
    (0, 3, "[------------]"), (1, 3, "[####--------]"), (2, 3, "[########----]"), (3, 3, "[############]"),
    (5, 3, "[############]"), (-1, 3, "[------------]"), (1, 0, "[------------]")])
def test_progress_bar(done: int, total: int, bar: str) -> None:
    assert views.progress_bar(done, total) == bar


@given(st.integers(-5, 10), st.integers(0, 10), st.integers(0, 40))
def test_progress_bar_has_its_width_whatever_the_numbers(done: int, total: int, width: int) -> None:
    bar = views.progress_bar(done, total, width)
    assert len(bar) == width + 2 and set(bar[1:-1]) <= {"#", "-"}


@given(st.text())
def test_cleaned_text_cannot_drive_a_terminal(text: str) -> None:
    out = views.clean(text, 60)
    assert out.isprintable() and len(out) <= 60


def test_clean_replaces_escapes_and_cuts() -> None:
    assert views.clean("web\x1b[2J\x07-1") == "web?[2J?-1"
    assert views.clean("x" * 100, 60) == "x" * 57 + "..."


@pytest.mark.parametrize(("seconds", "text"), [(None, "-"), (-1, "-"), (0, "0s"), (59.4, "59s"),
                                               (95, "1m35s"), (3600 + 61, "1h01m")])
def test_duration(seconds: float | None, text: str) -> None:
    assert views.duration(seconds) == text


def test_utc() -> None:
    assert views.utc(T0) == "2023-11-14T22:13:20Z"
    assert views.utc(0) == "-" and views.utc(None) == "-" and views.utc(1e300) == "-"


@pytest.mark.parametrize(("units", "text"), [
    (None, "-"), ([], "-"), ("not a list", "-"), ([1, "x"], "-"),
    ([{"heal": "ok"}] * 3, "3 ok"),
    ([{"heal": "ok"}, {"heal": "quarantined"}, {"heal": "ok"}], "1 quarantined, 2 ok"),
    ([{"heal": "held"}, {"heal": "backoff"}, {"heal": "healing"}], "1 healing, 1 backoff, 1 held"),
    ([{"heal": 3}, {"heal": "ok"}], "1 ok, 1 unknown"),
    ([{"heal": "\x1b[31mred"}], "1 ?[31mred")])
def test_heal_summary(units: object, text: str) -> None:
    assert views.heal_summary(units) == text


def test_host_state_follows_the_reports() -> None:
    h = header(Phase.START)
    assert views.host_state(h, A, {}) == views.HostState("pending", 0)
    r = reports(("pulled", A, proto.pulled_ok(D2)))
    assert views.host_state(h, A, r) == views.HostState("pulled", 1)
    other_image = reports(("pulled", A, proto.pulled_ok(D1)))
    assert views.host_state(h, A, other_image).state == "pending"
    r |= reports(("stopped", A, proto.stopped()))
    assert views.host_state(h, A, r) == views.HostState("stopped", 2)
    assert views.host_state(h, A, r | reports(("started", A, proto.started(D2, True)))) == views.HostState(
        "started", 3)
    failed = views.host_state(h, A, r | reports(("started", A, proto.started(D2, False, "web\x1b failed"))))
    assert failed == views.HostState("failed", 2, "web? failed")
    assert views.host_state(h, A, reports(("pulled", A, proto.pulled_error("no space", False)))) == \
        views.HostState("pulling", 0, "no space")
    assert views.host_state(h, A, reports(("pulled", A, proto.pulled_error("manifest unknown", True)))) == \
        views.HostState("pull failed", 0, "manifest unknown")


def test_host_state_in_a_rollback_waits_for_the_old_release() -> None:
    h = header(Phase.START, rollback=True, outcome=Phase.FAILED, reason="step failed")
    r = reports(("pulled", A, proto.pulled_ok(D2)), ("stopped", A, proto.stopped()),
                ("started", A, proto.started(D2, True)))
    assert views.host_state(h, A, r).state == "stopped"  # started the new release: not what counts now
    r |= reports(("started", A, proto.started(D1, True)))
    assert views.host_state(h, A, r).state == "started"


def test_host_state_of_excluded_hosts_and_from_the_record() -> None:
    record = rollout(Phase.STOP, hosts=(A,), progress=(HostProgress(A, HostStatus.STOPPED),),
                     excluded=(Excluded(B, "lost its lease", Phase.PULL),))
    h = proto.Header.of(record)
    assert views.host_state(h, B, reports(("pulled", B, proto.pulled_ok(D2))), record) == views.HostState(
        "excluded", 1, "lost its lease")
    assert views.host_state(h, A, {}, record) == views.HostState("stopped", 2)  # reports gone: the record
    assert views.participants(h, (), record) == (A, B)


def test_rollout_frame_while_waiting_and_without_rollout() -> None:
    assert views.rollout_frame(views.Progress(want=None, header=None)) == [("title", "no rollout yet")]
    p = views.Progress(want=12, header=None, current=header(Phase.START, revision=9))
    assert views.rollout_frame(p) == [
        ("title", "rollout 12: waiting for the leader to begin it (after rollout 9 v2@sha256:222222222222, "
                  "now start)")]


def test_rollout_frame_during_the_migration() -> None:
    record = rollout(Phase.MIGRATE, migrating="collectstatic", migrator=A,
                     ledger=(LedgerEntry(D2, "v2", "migrate", True, 7, T0),))
    r = reports(("pulled", A, proto.pulled_ok(D2)), ("pulled", B, proto.pulled_ok(D2)),
                ("stopped", A, proto.stopped()), ("stopped", B, proto.stopped()),
                ("migrated", "migrate", proto.migrated(True, 0, None, 61.2, A)))
    p = views.Progress(want=7, header=proto.Header.of(record), listed=(A, B), reports=r, names=NAMES,
                       record=record)
    assert [text for _, text in views.rollout_frame(p)] == [
        "rollout 7 v2@sha256:222222222222: migrate: step collectstatic (2/2)",
        "  web-1  [########----]  stopped",
        "  web-2  [########----]  stopped",
        "  step migrate: done in 1m01s on web-1",
        "  step collectstatic: running on web-1",
    ]


def test_rollout_frame_of_pull_and_failure() -> None:
    h = header(Phase.PULL)
    r = reports(("pulled", A, proto.pulled_ok(D2)),
                ("pulled", C, proto.pulled_error("manifest unknown", True)))
    p = views.Progress(want=7, header=h, listed=(A, B, C), reports=r, names=NAMES)
    assert [text for _, text in views.rollout_frame(p)] == [
        "rollout 7 v2@sha256:222222222222: pull: 1/3 pulled",
        "  web-1         [####--------]  pulled",
        "  web-2         [------------]  pending",
        "  cccccccccccc  [------------]  pull failed: manifest unknown",
    ]
    failed = dataclasses.replace(h, phase=Phase.FAILED, outcome=Phase.FAILED, reason="cannot pull on " + C)
    assert views.rollout_frame(dataclasses.replace(p, header=failed))[0][1] == (
        f"rollout 7 v2@sha256:222222222222: failed: cannot pull on {C}")
    done = dataclasses.replace(h, phase=Phase.DONE, outcome=Phase.DONE, ended_at=T0 + 95)
    assert views.rollout_frame(dataclasses.replace(p, header=done))[0][1].endswith(": done in 1m35s")
    note = dataclasses.replace(p, verdict_note="superseded by rollout 9 v3")
    assert views.rollout_frame(note)[0][1].endswith("pull: 1/3 pulled (superseded by rollout 9 v3)")


def test_rollout_frame_counts_from_the_header_until_the_hosts_are_read() -> None:
    p = views.Progress(want=7, header=header(Phase.PULL, hosts_count=5))
    assert views.rollout_frame(p)[0][1].endswith("pull: 0/5 pulled")


def test_progress_json() -> None:
    p = views.Progress(want=7, header=header(Phase.STOP), listed=(A,), names=NAMES,
                       reports=reports(("stopped", A, proto.stopped())))
    data = views.progress_json(p, views.Verdict.RUNNING)
    assert json.loads(json.dumps(data))["hosts"] == [
        {"machine_id": A, "name": "web-1", "state": "stopped", "done": 2, "note": None}]
    assert data["rollout"]["phase"] == "stop" and data["verdict"] == "running"


def test_changed_lines_print_only_what_changed() -> None:
    old = [("title", "t1"), ("host:a", "a pending"), ("host:b", "b pending")]
    new = [("title", "t2"), ("host:a", "a pending"), ("host:b", "b pulled"), ("step:x", "x waiting")]
    assert views.changed_lines([], old) == ["t1", "a pending", "b pending"]
    assert views.changed_lines(old, new) == ["t2", "b pulled", "x waiting"]
    assert views.changed_lines(new, new) == []


def test_redraw_moves_up_clears_and_cuts_lines_to_the_width() -> None:
    assert views.redraw(0, ["one", "two"], 80) == "\x1b[Jone\ntwo\n"
    assert views.redraw(2, ["x" * 100], 10) == "\x1b[2F\x1b[J" + "x" * 9 + "\n"


@pytest.mark.parametrize(("phase", "verdict", "code"), [
    (None, views.Verdict.NONE, 0), (Phase.DONE, views.Verdict.DONE, 0),
    (Phase.FAILED, views.Verdict.FAILED, 1), (Phase.SUPERSEDED, views.Verdict.SUPERSEDED, 1),
    (Phase.HALTED, views.Verdict.HALTED, 1), (Phase.PULL, views.Verdict.RUNNING, 5),
    (Phase.RESOLVE, views.Verdict.RUNNING, 5), (Phase.START, views.Verdict.RUNNING, 5)])
def test_exit_code_mapping(phase: Phase | None, verdict: views.Verdict, code: int) -> None:
    h = None if phase is None else header(phase)
    assert views.verdict(h) is verdict
    assert views.exit_code(verdict) == code
    assert views.exit_code(views.Verdict.WAITING) == cli.EXIT_RUNNING


def test_exit_codes_are_distinct() -> None:
    codes = [cli.EXIT_OK, cli.EXIT_FAILED, cli.EXIT_USAGE, cli.EXIT_TIMEOUT, cli.EXIT_UNREACHABLE,
             cli.EXIT_RUNNING]
    assert codes == [0, 1, 2, 3, 4, 5]


def _rows(rollout_state: bool) -> list[views.HostRow]:
    state = views.HostState("stopped", 2) if rollout_state else None
    return [views.HostRow(A, "web-1", "prod", "django", "v1@sha256:111111111111", "3 ok", True, state),
            views.HostRow(B, "web-2", "prod", "celery", None, "-", False, None)]


def test_status_lines_between_rollouts() -> None:
    lines = views.status_lines(_rows(False), header(Phase.DONE))
    assert lines == [
        "HOST   ENVIRONMENT  ROLE    RELEASE                 HEAL  LEADER",
        "web-1  prod         django  v1@sha256:111111111111  3 ok  *",
        "web-2  prod         celery  -                       -",
        "2 hosts; rollout 7 v2: done",
    ]
    assert views.status_lines([], None) == ["HOST  ENVIRONMENT  ROLE  RELEASE  HEAL  LEADER",
                                            "0 hosts; no rollout yet"]


def test_status_lines_during_a_rollout() -> None:
    lines = views.status_lines(_rows(True), header(Phase.STOP))
    assert lines[0].split() == ["HOST", "ENVIRONMENT", "ROLE", "RELEASE", "HEAL", "ROLLOUT", "LEADER"]
    assert lines[1].split() == ["web-1", "prod", "django", "v1@sha256:111111111111", "3", "ok", "stopped",
                                "*"]
    assert lines[2].split() == ["web-2", "prod", "celery", "-", "-", "-"]
    assert lines[-1] == "2 hosts; rollout 7 v2: stop"
    assert views.rollout_line(header(Phase.FAILED, reason="aborted by alice")) == \
        "rollout 7 v2: failed (aborted by alice)"
    assert views.rollout_line(header(Phase.START, rollback=True, reason="step failed")) == \
        "rollout 7 v2: start, rolling back (step failed)"


def test_status_json() -> None:
    data = views.status_json(_rows(True), header(Phase.STOP))
    assert data["rollout"]["revision"] == 7
    assert data["hosts"][0]["rollout"] == {"state": "stopped", "done": 2, "note": None}
    assert data["hosts"][1]["rollout"] is None
    assert views.status_json([], None) == {"hosts": [], "rollout": None}


def test_history_rows_newest_first_with_reasons_cut() -> None:
    def ended(rev: int, phase: Phase, reason: str | None, **kw: object) -> Rollout:
        return rollout(phase, revision=rev, outcome=phase, reason=reason, ended_at=T0 + 95, progress=(), **kw)

    rows = views.history_rows([ended(5, Phase.DONE, None), ended(12, Phase.FAILED, "y" * 100),
                               ended(9, Phase.HALTED, "an operator decides", hosts=(A,),
                                     excluded=(Excluded(B, "lost", Phase.PULL),))])
    assert rows[0] == ("REVISION", "TAG", "STRATEGY", "OUTCOME", "STARTED", "DURATION", "HOSTS", "REASON")
    assert [r[0] for r in rows[1:]] == ["12", "9", "5"]
    assert rows[1][3] == "failed" and len(rows[1][7]) == 60 and rows[1][7].endswith("...")
    assert rows[2][6] == "1 (1 excluded)"
    assert rows[3] == ("5", "v2", "-", "done", "2023-11-14T22:13:20Z", "1m35s", "2", "")


def test_a_rolling_update_in_the_status_line_and_the_history() -> None:
    h = header(Phase.ROLL, strategy="rolling", batch=(A,), batch_index=1, batches=3)
    assert views.rollout_line(h) == "rollout 7 v2 [rolling]: roll batch 2/3"
    back = header(Phase.ROLLED_BACK, strategy="rolling", rollback=True, reason="b failed its health gate")
    assert views.rollout_line(back) == "rollout 7 v2 [rolling]: rolled_back (b failed its health gate)"
    assert views.exit_code(views.verdict(back)) == views.EXIT_FAILED
    reason = f"{B} failed its health gate on v2: djed-web.service: HTTP 500"
    assert views.rollout_line(dataclasses.replace(back, reason=reason), {B: "web-2"}) == \
        "rollout 7 v2 [rolling]: rolled_back (web-2 failed its health gate on v2: djed-web.service: HTTP 500)"
    rows = views.history_rows([rollout(Phase.ROLLED_BACK, outcome=Phase.ROLLED_BACK, strategy="rolling",
                                       ended_at=T0 + 5, progress=())])
    assert rows[1][2:4] == ("rolling", "rolled_back")


def test_deploy_refuses_a_bad_version_before_reading_any_config(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["deploy", "--config", "/nonexistent/norm.toml", "x;reboot"])
    out, err = capsys.readouterr()
    assert code == cli.EXIT_USAGE and out == ""
    assert err.startswith("norm: VERSION: not an image tag") and "x;reboot" not in err


def test_the_help_of_deploy_and_rollout_documents_the_exit_codes() -> None:
    deploy = norm_cmd("deploy", "--help")
    assert deploy.returncode == 0
    assert "exit status:" in deploy.stdout and "3  --timeout passed" in deploy.stdout
    assert "4  etcd could not be reached" in deploy.stdout
    roll = norm_cmd("rollout", "--help")
    assert "5  with --once: the rollout is still running" in roll.stdout


@pytest.mark.parametrize("args", [["deploy", "v2", "--timeout", "0"], ["deploy", "v2", "--timeout", "soon"],
                                  ["history", "--limit", "-1"], ["abort", "--by"]])
def test_bad_arguments_are_usage_errors(args: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.parser().parse_args(args)
    assert e.value.code == cli.EXIT_USAGE


@pytest.mark.parametrize("verb", ["lift", "release"])
def test_lifting_a_quarantine_is_heal_lift_and_still_heal_release(verb: str) -> None:
    from norm.app.commands.hosts import lift_quarantine

    args = cli.parser().parse_args(["heal", verb, "djed-web.service", "--timeout", "5"])
    assert args.run is lift_quarantine and args.unit == "djed-web.service"


def test_status_shows_the_environment_file_only_where_one_is_used() -> None:
    rows = _rows(False)
    rows[0] = views.HostRow(A, "web-1", "prod", "django", "v1", "3 ok", True, None,
                            '"0123456789abcdef0123456789abcdef"')
    lines = views.status_lines(rows, None)
    assert lines[0].split() == ["HOST", "ENVIRONMENT", "ROLE", "RELEASE", "ENV", "FILE", "HEAL", "LEADER"]
    assert lines[1].split() == ["web-1", "prod", "django", "v1", "0123456789ab", "3", "ok", "*"]
    assert lines[2].split() == ["web-2", "prod", "celery", "-", "-", "-"]
    data = views.status_json(rows, None)
    assert data["hosts"][0]["env_etag"] == '"0123456789abcdef0123456789abcdef"'
    assert data["hosts"][1]["env_etag"] is None


def test_a_start_that_left_an_operator_held_unit_stopped_says_so() -> None:
    r = reports(("started", A,
                 proto.started(D2, True, "djed-web.service: held by the operator, left stopped")))
    assert views.host_state(header(Phase.START), A, r) == views.HostState(
        "started", 3, "djed-web.service: held by the operator, left stopped")
