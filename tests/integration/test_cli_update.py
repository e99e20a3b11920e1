"""The operator's commands for fleet updates (deploy, status, rollout, history, abort, pause, resume,
promote) against real etcd.

The leader is played by hand: headers, records and reports are written with the core's own encoders,
as the updater writes them, so that what the CLI reads is what an agent leaves in etcd.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pty
import select
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from norm.adapters.etcd import Etcd, Event, Resync
from norm.app import cli
from norm.app.commands import rollout as follow
from norm.core import protocol as proto
from norm.core.config import EtcdConfig
from norm.core.host import HostRecord, hosts_key, leader_key, units_key
from norm.core.record import Excluded, HostProgress, HostStatus, LedgerEntry, Phase, Release, Rollout
from norm.core.tracker import Tracker, header_changed
from sandbox.etcd import EtcdMember
from sandbox.procs import free_port

REPO = Path(__file__).resolve().parents[2]
PYTHON = str(REPO / ".venv" / "bin" / "python")
P = "/norm"
VERSION_KEY = "/djed-version"
A, B, C = "a" * 32, "b" * 32, "c" * 32
D1, D2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
OLD = Release("v1", D1)
T0 = 1_700_000_000.0

Run = Callable[..., tuple[int, str, str]]
T = TypeVar("T")


@pytest.fixture
def etcd_conf(etcd: EtcdMember) -> EtcdConfig:
    return EtcdConfig(endpoints=(etcd.endpoint,), request_timeout=2.0, dial_timeout=3.0)


@pytest.fixture
def conf(etcd: EtcdMember, tmp_path: Path) -> Path:
    path = tmp_path / "norm.toml"
    path.write_text(f'[etcd]\nendpoints = ["{etcd.endpoint}"]\nrequest_timeout = 2.0\ndial_timeout = 3.0\n')
    return path


@pytest.fixture
def run(conf: Path, capsys: pytest.CaptureFixture[str]) -> Run:
    """`norm COMMAND --config conf ARGS` in this process: (exit status, stdout, stderr)."""

    def go(command: str, *args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli.main([command, "--config", str(conf), *args])
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return code, out, err

    return go


def in_etcd(config: EtcdConfig, go: Callable[[Etcd], Awaitable[T]]) -> T:
    async def run() -> T:
        async with Etcd(config) as etcd:
            return await go(etcd)

    return asyncio.run(run())


def write(config: EtcdConfig, values: dict[str, bytes]) -> int:
    async def go(etcd: Etcd) -> int:
        revision = 0
        for key, value in values.items():
            revision = await etcd.put(key, value)
        return revision

    return in_etcd(config, go)


def read(config: EtcdConfig, key: str) -> bytes | None:
    async def go(etcd: Etcd) -> bytes | None:
        kv = await etcd.get(key)
        return None if kv is None else kv.value

    return in_etcd(config, go)


def host(mid: str, name: str, release: Release | None = OLD, role: str = "django") -> HostRecord:
    return HostRecord(machine_id=mid, name=name, environment="prod", role=role, agent_version="0.1",
                      release=proto.release_text(release), started_at=T0)


def record(revision: int, phase: Phase, **kw: object) -> Rollout:
    hosts = kw.pop("hosts", (A, B))
    assert isinstance(hosts, tuple)
    base = Rollout(revision=revision, tag="v2", hosts=hosts, phase=phase, started_at=T0, updated_at=T0 + 5,
                   previous=OLD, digest=D2, steps=("migrate", "collectstatic"),
                   progress=tuple(HostProgress(h) for h in hosts))
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def finished(revision: int, phase: Phase, reason: str | None = None, **kw: object) -> Rollout:
    return record(revision, phase, outcome=phase, reason=reason, ended_at=T0 + 95, progress=(), **kw)


def rollout_keys(r: Rollout) -> dict[str, bytes]:
    """What the leader writes at a phase change: header, record, the participants (and the history
    when it ends)."""
    keys = {proto.header_key(P): proto.Header.of(r).encode(), proto.record_key(P, r.revision): r.encode(),
            proto.hosts_list_key(P, r.revision): json.dumps(list(r.hosts)).encode()}
    if r.terminal:
        keys[proto.history_key(P, r.revision)] = r.encode()
    return keys


def report(revision: int, kind: str, name: str, value: bytes, host: str = A) -> dict[str, bytes]:
    """A host's report (`name` its machine id), or `host`'s result of step `name`, or the claim of it."""
    if kind == "claim":
        return {proto.claim_key(P, revision, name): value}
    if kind == "migrated":
        return {proto.migrated_key(P, revision, host, name): value}
    return {proto.report_key(P, revision, kind, name): value}


def fleet(config: EtcdConfig) -> None:
    """Two registered hosts, A the leader, with healing summaries."""
    ok = {"unit": "djed-web.service", "active_state": "active", "sub_state": "running", "heal": "ok"}
    bad = {**ok, "unit": "djed-api.service", "active_state": "failed", "heal": "quarantined"}
    write(config, {hosts_key(P, A): host(A, "web-1").encode(), hosts_key(P, B): host(B, "web-2").encode(),
                   leader_key(P): A.encode(),
                   units_key(P, A): json.dumps([ok, {**ok, "unit": "djed-api.service"}]).encode(),
                   units_key(P, B): json.dumps([ok, bad]).encode()})


class FakeLeader:
    """Plays the leader in a thread of its own: waits for the desired version to be written, then
    writes the rollout of that revision phase by phase, as `script` says."""

    def __init__(self, config: EtcdConfig, script: Callable[[Etcd, int], Awaitable[None]]) -> None:
        self.config = config
        self.script = script
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="fake-leader", daemon=True)

    def __enter__(self) -> FakeLeader:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the fake leader did not finish"
        if self.error is not None:
            raise self.error

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as e:
            self.error = e

    async def _run(self) -> None:
        async with asyncio.timeout(20), Etcd(self.config) as etcd:
            revision = await desired_revision(etcd)
            await self.script(etcd, revision)


async def desired_revision(etcd: Etcd, tag: bytes = b"v2") -> int:
    """The revision at which `tag` was written as the desired version (it may already be there)."""
    async with etcd.watch(VERSION_KEY) as w:
        async for item in w:
            kvs = item.snapshot.kvs if isinstance(item, Resync) else (
                (item.kv,) if isinstance(item, Event) and item.kind == "put" else ())
            for kv in kvs:
                if kv.value == tag:
                    return kv.mod_revision
    raise AssertionError("the watch ended")


async def put_all(etcd: Etcd, *groups: dict[str, bytes]) -> None:
    for group in groups:
        for key, value in group.items():
            await etcd.put(key, value)


async def a_whole_rollout(etcd: Etcd, rev: int) -> None:
    r = record(rev, Phase.PULL)
    await put_all(etcd, rollout_keys(r), report(rev, "pulled", A, proto.pulled_ok(D2)),
                  report(rev, "pulled", B, proto.pulled_ok(D2)))
    r = dataclasses.replace(r, phase=Phase.STOP)
    await put_all(etcd, rollout_keys(r), report(rev, "stopped", A, proto.stopped()),
                  report(rev, "stopped", B, proto.stopped()))
    r = dataclasses.replace(r, phase=Phase.MIGRATE, migrating="migrate", migrator=A)
    await put_all(etcd, rollout_keys(r), report(rev, "claim", "migrate", proto.claim(A)),
                  report(rev, "migrated", "migrate", proto.migrated(True, 0, None, 12.5, A)))
    r = dataclasses.replace(r, migrating="collectstatic")
    await put_all(etcd, rollout_keys(r),
                  report(rev, "migrated", "collectstatic", proto.migrated(True, 0, None, 3.0, A)))
    r = dataclasses.replace(r, phase=Phase.START, migrating=None, migrator=None)
    await put_all(etcd, rollout_keys(r), report(rev, "started", A, proto.started(D2, True)),
                  report(rev, "started", B, proto.started(D2, True)))
    await put_all(etcd, rollout_keys(finished(rev, Phase.DONE)))


# ---------------------------------------------------------------------------------------------------
# deploy


@pytest.mark.parametrize("version", ["x;reboot", "", "v2\n", "v" * 1_000_000, "v2é", "v\udcff", "-v2",
                                     "v2 ", "$(reboot)"])
def test_deploy_refuses_a_hostile_version_and_writes_nothing(
        run: Run, etcd_conf: EtcdConfig, version: str) -> None:
    code, out, err = run("deploy", "--", version)  # "--": a value like "-v2" is not taken for an option
    assert code == cli.EXIT_USAGE
    assert out == ""
    assert err.startswith("norm: VERSION: ")
    assert len(err) < 300 and (version not in err or version == "")
    assert read(etcd_conf, VERSION_KEY) is None


def test_deploy_writes_the_version_key(run: Run, etcd_conf: EtcdConfig, etcd: EtcdMember) -> None:
    code, out, _ = run("deploy", "v2.1_rc-3")
    assert code == cli.EXIT_OK
    kv = in_etcd(etcd_conf, lambda e: e.get(VERSION_KEY))
    assert kv is not None and kv.value == b"v2.1_rc-3"
    assert out == f"deploying v2.1_rc-3 (rollout {kv.mod_revision})\n"
    # What `etcdctl put /djed-version v2` would have written: the same plain value.
    assert etcd.ctl("get", VERSION_KEY, "--print-value-only").strip() == "v2.1_rc-3"


def test_deploy_says_who_asks_in_the_same_transaction(run: Run, etcd_conf: EtcdConfig,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, _ = run("deploy", "v4", "--by", "alice@ops")
    assert code == cli.EXIT_OK
    version = in_etcd(etcd_conf, lambda e: e.get(VERSION_KEY))
    asked = in_etcd(etcd_conf, lambda e: e.get(proto.deploy_key(P)))
    assert version is not None and asked is not None and asked.mod_revision == version.mod_revision
    assert proto.asked_by(asked.value, asked.key) == "alice@ops"
    monkeypatch.setenv("USER", "bob")
    assert run("deploy", "v5")[0] == cli.EXIT_OK
    asked = in_etcd(etcd_conf, lambda e: e.get(proto.deploy_key(P)))
    assert asked is not None and proto.asked_by(asked.value, asked.key).startswith("bob@")
    code, out, _ = run("deploy", "v7", "--by", "carol", "--json")
    assert code == cli.EXIT_OK
    said = json.loads(out)
    assert said == {"version": "v7", "rollout": said["rollout"], "by": "carol", "now": False}
    code, _, err = run("deploy", "v6", "--by", "eve\x1b[2J")
    assert code == cli.EXIT_USAGE and "--by" in err and "\x1b" not in err


def test_deploy_honours_the_configured_keys(run: Run, etcd_conf: EtcdConfig) -> None:
    code, out, _ = run("deploy", "v3", "--set", "keys.version=/other-version")
    assert code == cli.EXIT_OK, out
    assert read(etcd_conf, "/other-version") == b"v3"
    assert read(etcd_conf, VERSION_KEY) is None


def test_deploy_wait_follows_the_rollout_to_done(run: Run, etcd_conf: EtcdConfig) -> None:
    fleet(etcd_conf)
    with FakeLeader(etcd_conf, a_whole_rollout):
        code, out, err = run("deploy", "v2", "--wait", "--timeout", "30")
    assert code == cli.EXIT_OK, (out, err)
    rev = int(out.splitlines()[0].removeprefix("deploying v2 (rollout ").rstrip(")"))
    assert rev > 0
    assert "\x1b" not in out  # not a terminal: one line per change, no escape codes
    lines = out.splitlines()
    assert f"rollout {rev} v2@sha256:222222222222: done in 1m35s" in lines
    assert any(line.startswith("  web-1") and "[############]  started" in line for line in lines), out
    assert any(line.startswith("  web-2") for line in lines)
    assert any("step migrate: done in 12s on web-1" in line for line in lines)
    assert err == ""


async def _failing(etcd: Etcd, rev: int) -> None:
    r = record(rev, Phase.PULL)
    await put_all(etcd, rollout_keys(r), report(rev, "pulled", A, proto.pulled_ok(D2)),
                  report(rev, "pulled", B, proto.pulled_error("manifest unknown", permanent=True)))
    await put_all(etcd, rollout_keys(finished(rev, Phase.FAILED, f"cannot pull on {B}: manifest unknown")))


def test_deploy_wait_exits_1_with_the_reason_when_the_rollout_fails(run: Run, etcd_conf: EtcdConfig) -> None:
    fleet(etcd_conf)
    with FakeLeader(etcd_conf, _failing):
        code, out, err = run("deploy", "v2", "--wait", "--timeout", "30")
    assert code == cli.EXIT_FAILED, (out, err)
    assert "failed: cannot pull on" in err and "manifest unknown" in err
    # The live view names the host as the operator knows it.
    assert any(line.endswith("failed: cannot pull on web-2: manifest unknown") for line in out.splitlines())


async def _superseded(etcd: Etcd, rev: int) -> None:
    await put_all(etcd, rollout_keys(record(rev, Phase.PULL)))
    newer = await etcd.put(VERSION_KEY, b"v3")
    # The leader moves on to the newer version: the header now names it; the old one left no history.
    await put_all(etcd, rollout_keys(record(newer, Phase.RESOLVE, tag="v3", digest=None, progress=())))


def test_deploy_wait_says_when_a_newer_version_superseded_it(run: Run, etcd_conf: EtcdConfig) -> None:
    with FakeLeader(etcd_conf, _superseded):
        code, out, err = run("deploy", "v2", "--wait", "--timeout", "30")
    assert code == cli.EXIT_FAILED, (out, err)
    kv = in_etcd(etcd_conf, lambda e: e.get(VERSION_KEY))
    assert kv is not None and kv.value == b"v3"
    assert f"superseded by rollout {kv.mod_revision} v3" in err


async def _done_then_next(etcd: Etcd, rev: int) -> None:
    # The rollout ends and another begins before the CLI looks: its history still says how it ended.
    await put_all(etcd, rollout_keys(finished(rev, Phase.DONE)))
    newer = await etcd.put(VERSION_KEY, b"v3")
    await put_all(etcd, rollout_keys(record(newer, Phase.RESOLVE, tag="v3", digest=None, progress=())))


def test_deploy_wait_waits_behind_a_rollout_that_has_cut_over(run: Run, etcd_conf: EtcdConfig) -> None:
    fleet(etcd_conf)
    earlier = write(etcd_conf, {VERSION_KEY: b"v1"})
    write(etcd_conf, rollout_keys(record(earlier, Phase.START, tag="v1")))

    async def after_the_earlier_one(etcd: Etcd, rev: int) -> None:
        # The leader keeps the newer version pending until the earlier rollout ends, then begins it.
        await put_all(etcd, rollout_keys(finished(earlier, Phase.DONE, tag="v1")))
        await a_whole_rollout(etcd, rev)

    with FakeLeader(etcd_conf, after_the_earlier_one):
        code, out, err = run("deploy", "v2", "--wait", "--timeout", "30")
    assert code == cli.EXIT_OK, (out, err)
    rev = int(out.splitlines()[0].removeprefix("deploying v2 (rollout ").rstrip(")"))
    assert rev > earlier
    assert f"rollout {rev} v2@sha256:222222222222: done in 1m35s" in out.splitlines()


def test_deploy_wait_reads_the_outcome_from_history_once_a_later_rollout_began(etcd_conf: EtcdConfig) -> None:
    rev = write(etcd_conf, {VERSION_KEY: b"v2"})
    in_etcd(etcd_conf, lambda e: _done_then_next(e, rev))
    tracker = Tracker(P, rev)

    async def judge(etcd: Etcd) -> Tracker:
        return await follow.read_more(etcd, header_changed(tracker, await etcd.get(proto.header_key(P))))

    tracker = in_etcd(etcd_conf, judge)
    assert tracker.verdict == "done"
    assert tracker.header is not None and tracker.header.revision == rev


def test_deploy_wait_times_out_with_3(run: Run, etcd_conf: EtcdConfig) -> None:
    started = time.monotonic()
    code, out, err = run("deploy", "v2", "--wait", "--timeout", "1")
    assert code == cli.EXIT_TIMEOUT, (out, err)
    assert time.monotonic() - started < 10
    assert "waiting for the leader to begin it" in out
    assert "did not end within 1s" in err
    assert read(etcd_conf, VERSION_KEY) == b"v2"


def test_unreachable_etcd_is_exit_4(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "norm.toml"
    path.write_text(f'[etcd]\nendpoints = ["http://127.0.0.1:{free_port()}"]\n'
                    "request_timeout = 1.0\ndial_timeout = 1.0\n")
    for args in (["deploy", "v2", "--wait"], ["status"], ["rollout", "--once"], ["history"], ["abort"]):
        assert cli.main([*args, "--config", str(path)]) == cli.EXIT_UNREACHABLE, args
        err = capsys.readouterr().err
        assert "etcd" in err and "Traceback" not in err


def test_deploy_help_documents_the_exit_codes() -> None:
    proc = subprocess.run([PYTHON, "-m", "norm", "deploy", "--help"], capture_output=True, text=True,
                          timeout=60, check=False, cwd=REPO)
    assert proc.returncode == 0
    for line in ("0  written", "1  the rollout failed", "2  VERSION", "3  --timeout", "4  etcd"):
        assert line in proc.stdout, proc.stdout


# ---------------------------------------------------------------------------------------------------
# status


def test_status_shows_hosts_releases_healing_leader_and_the_rollout(run: Run, etcd_conf: EtcdConfig) -> None:
    fleet(etcd_conf)
    rev = 41
    r = record(rev, Phase.STOP, hosts=(A, B, C))
    write(etcd_conf, {**rollout_keys(r), **report(rev, "pulled", A, proto.pulled_ok(D2)),
                      **report(rev, "stopped", A, proto.stopped()),
                      **report(rev, "pulled", B, proto.pulled_ok(D2)),
                      hosts_key(P, "d" * 32): b"{not json"})
    code, out, err = run("status")
    assert code == cli.EXIT_OK, err
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:-1]}
    assert out.splitlines()[0].split() == ["HOST", "ENVIRONMENT", "ROLE", "RELEASE", "HEAL", "ROLLOUT",
                                           "LEADER"]
    assert rows["web-1"] == ["web-1", "prod", "django", "v1@sha256:111111111111", "2", "ok", "stopped", "*"]
    assert rows["web-2"] == ["web-2", "prod", "django", "v1@sha256:111111111111", "1", "quarantined,", "1",
                             "ok", "pulled"]
    assert rows[C[:12]][-1] == "pending"  # taking part, but its agent is not registered
    assert out.splitlines()[-1] == f"3 hosts; rollout {rev} v2: stop"
    assert f"skipping {P}/hosts/{'d' * 32}" in err

    code, out, _ = run("status", "--json")
    assert code == cli.EXIT_OK
    data = json.loads(out)
    assert data["rollout"]["revision"] == rev and data["rollout"]["phase"] == "stop"
    by_name = {h["name"]: h for h in data["hosts"]}
    assert by_name["web-1"]["leader"] is True and by_name["web-1"]["rollout"]["state"] == "stopped"
    assert by_name["web-2"]["heal"] == "1 quarantined, 1 ok"


def test_status_after_a_rollout_and_before_any(run: Run, etcd_conf: EtcdConfig) -> None:
    code, out, _ = run("status")
    assert code == cli.EXIT_OK
    assert out.splitlines()[-1] == "0 hosts; no rollout yet"
    fleet(etcd_conf)
    write(etcd_conf, rollout_keys(finished(57, Phase.FAILED, "aborted by alice@ops")))
    code, out, _ = run("status")
    assert "ROLLOUT" not in out.splitlines()[0]
    assert out.splitlines()[-1] == "2 hosts; rollout 57 v2: failed (aborted by alice@ops)"


def test_status_as_a_process(etcd_conf: EtcdConfig, conf: Path) -> None:
    fleet(etcd_conf)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NORM_")}
    proc = subprocess.run([PYTHON, "-m", "norm", "status", "--config", str(conf)], capture_output=True,
                          text=True, timeout=60, check=False, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "web-1" in proc.stdout and "2 ok" in proc.stdout


def test_a_hostile_host_name_does_not_reach_the_terminal(run: Run, etcd_conf: EtcdConfig) -> None:
    # Control characters are outside a host record's grammar: the record is refused, and said so.
    write(etcd_conf, {hosts_key(P, A): host(A, "web\x1b[2J\x07-1").encode(),
                      hosts_key(P, B): host(B, "web-2").encode()})
    code, out, err = run("status")
    assert code == cli.EXIT_OK
    assert "\x1b" not in out + err and "\x07" not in out + err and "[2J" not in out + err
    assert "web-2" in out and f"skipping {hosts_key(P, A)}" in err


# ---------------------------------------------------------------------------------------------------
# history


def test_history_lists_finished_rollouts_newest_first(run: Run, etcd_conf: EtcdConfig) -> None:
    long_reason = "the migration step migrate failed: " + "x" * 200
    write(etcd_conf, {proto.history_key(P, 5): finished(5, Phase.DONE).encode(),
                      proto.history_key(P, 12): finished(12, Phase.SUPERSEDED,
                                                         "a newer version came").encode(),
                      proto.history_key(P, 9): finished(9, Phase.FAILED, long_reason, hosts=(A,),
                                                      excluded=(Excluded(B, "lost", Phase.PULL),)).encode(),
                      proto.history_key(P, 7): b"garbage"})
    code, out, err = run("history")
    assert code == cli.EXIT_OK
    lines = out.splitlines()
    assert lines[0].split() == ["REVISION", "TAG", "STRATEGY", "OUTCOME", "STARTED", "DURATION", "HOSTS",
                                "REASON"]
    assert [line.split()[0] for line in lines[1:]] == ["12", "9", "5"]
    assert lines[3].split() == ["5", "v2", "-", "done", "2023-11-14T22:13:20Z", "1m35s", "2"]
    assert "1 (1 excluded)" in lines[2]
    reason = lines[2][lines[0].index("REASON"):]
    assert len(reason) == 60 and reason.endswith("...")
    assert f"skipping {P}/history/000000000007" in err

    code, out, _ = run("history", "--limit", "1", "--json")
    assert code == cli.EXIT_OK
    assert [Rollout.decode(line.encode(), "out").revision for line in out.splitlines()] == [12]


def test_history_revision_shows_one_rollout_in_full(run: Run, etcd_conf: EtcdConfig) -> None:
    from norm.core.record import Action, LedgerEntry

    r = finished(21, Phase.DONE, by="alice@ops", actions=(Action("pause", "bob", T0 + 10, 40),
                                                          Action("resume", "carol", T0 + 20, 41)))
    entry = LedgerEntry(D2, "v2", "migrate", True, 21, T0 + 5, stage="pre")
    write(etcd_conf, {**rollout_keys(r), proto.ledger_key(P, 21, "migrate"): entry.encode()})
    code, out, _ = run("history", "21")
    assert code == cli.EXIT_OK, out
    assert out.splitlines()[0] == "rollout 21: v2"
    assert "  asked by:  alice@ops" in out and "  outcome:   done" in out
    assert "  step:      migrate (pre) ok at" in out
    assert "  pause:     by bob at" in out and "  resume:    by carol at" in out
    code, out, _ = run("history", "21", "--json")
    data = json.loads(out)
    assert data["record"]["by"] == "alice@ops" and [e["step"] for e in data["steps"]] == ["migrate"]
    code, _, err = run("history", "22")
    assert code == cli.EXIT_FAILED and "no rollout 22 is kept" in err


def test_history_limit_must_be_positive(conf: Path) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["history", "--limit", "0", "--config", str(conf)])
    assert e.value.code == cli.EXIT_USAGE


def test_history_when_nothing_finished(run: Run) -> None:
    assert run("history") == (cli.EXIT_OK, "no finished rollout yet\n", "")


# ---------------------------------------------------------------------------------------------------
# abort


def test_abort_writes_the_request_for_the_running_rollout(run: Run, etcd_conf: EtcdConfig) -> None:
    write(etcd_conf, rollout_keys(record(33, Phase.PULL)))
    code, out, _ = run("abort", "--by", "alice@ops")
    assert code == cli.EXIT_OK
    assert out == "abort requested for rollout 33\n"
    raw = read(etcd_conf, proto.abort_key(P, 33))
    assert raw is not None
    parsed = proto.parse_report(P, 33, proto.abort_key(P, 33), raw)
    assert parsed is not None and parsed.kind == "abort" and parsed.value == {"by": "alice@ops"}


def test_abort_names_the_operator_by_default(run: Run, etcd_conf: EtcdConfig,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USER", "bob")
    write(etcd_conf, rollout_keys(record(33, Phase.MIGRATE, migrating="migrate", migrator=A)))
    assert run("abort")[0] == cli.EXIT_OK
    raw = read(etcd_conf, proto.abort_key(P, 33))
    assert raw is not None and json.loads(raw)["by"].startswith("bob@")


@pytest.mark.parametrize("kind", ["pause", "resume", "promote"])
def test_pause_resume_and_promote_write_their_request_for_the_running_rollout(
        run: Run, etcd_conf: EtcdConfig, kind: str) -> None:
    write(etcd_conf, rollout_keys(record(35, Phase.PULL)))
    code, out, _ = run(kind, "--by", "alice@ops")
    assert code == cli.EXIT_OK and out.startswith(f"{kind} requested for rollout 35"), out
    key = proto.request_key(P, 35, kind)
    raw = read(etcd_conf, key)
    assert raw is not None
    revision = in_etcd(etcd_conf, lambda e: e.get(key))
    assert revision is not None
    parsed = proto.parse_report(P, 35, key, raw, revision.mod_revision)
    assert parsed is not None and parsed.kind == kind and parsed.value == {"by": "alice@ops"}
    code, out, _ = run(kind, "--by", "bob", "--json")
    assert code == cli.EXIT_OK and json.loads(out) == {"request": kind, "rollout": 35, "by": "bob"}
    write(etcd_conf, rollout_keys(finished(36, Phase.DONE)))
    code, _, err = run(kind, "--by", "alice")
    assert code == cli.EXIT_FAILED and "no rollout is running" in err


def test_abort_refuses_when_nothing_runs(run: Run, etcd_conf: EtcdConfig) -> None:
    code, out, err = run("abort", "--by", "alice")
    assert code == cli.EXIT_FAILED and out == ""
    assert "no rollout is running" in err
    write(etcd_conf, rollout_keys(finished(34, Phase.DONE)))
    code, _, err = run("abort", "--by", "alice")
    assert code == cli.EXIT_FAILED
    assert "no rollout is running (the last, rollout 34 v2: done)" in err
    assert read(etcd_conf, proto.abort_key(P, 34)) is None


def test_abort_refuses_a_hostile_name(run: Run, etcd_conf: EtcdConfig) -> None:
    write(etcd_conf, rollout_keys(record(33, Phase.PULL)))
    code, _, err = run("abort", "--by", "x\x1b[2J")
    assert code == cli.EXIT_USAGE and "--by" in err
    assert read(etcd_conf, proto.abort_key(P, 33)) is None


# ---------------------------------------------------------------------------------------------------
# rollout


@pytest.fixture
def running(etcd_conf: EtcdConfig) -> Iterator[int]:
    fleet(etcd_conf)
    rev = 60
    r = record(rev, Phase.MIGRATE, migrating="collectstatic", migrator=A,
               ledger=(LedgerEntry(D2, "v2", "migrate", True, rev, T0 + 3),))
    r = dataclasses.replace(r, progress=tuple(dataclasses.replace(p, status=HostStatus.STOPPED)
                                              for p in r.progress))
    write(etcd_conf, {**rollout_keys(r), **report(rev, "pulled", A, proto.pulled_ok(D2)),
                      **report(rev, "stopped", A, proto.stopped()),
                      **report(rev, "pulled", B, proto.pulled_ok(D2)),
                      **report(rev, "stopped", B, proto.stopped()),
                      **report(rev, "migrated", "migrate", proto.migrated(True, 0, None, 61.0, A)),
                      **report(rev, "claim", "collectstatic", proto.claim(A)),
                      proto.report_key(P, rev, "pulled", "not-a-machine-id"): b"{}"})
    yield rev


def test_rollout_once_exit_codes(run: Run, etcd_conf: EtcdConfig, running: int) -> None:
    code, out, err = run("rollout", "--once")
    assert code == cli.EXIT_RUNNING, (out, err)
    assert out.splitlines() == [
        f"rollout {running} v2@sha256:222222222222: migrate: step collectstatic (2/2)",
        "  web-1  [########----]  stopped",
        "  web-2  [########----]  stopped",
        "  step migrate: done in 1m01s on web-1",
        "  step collectstatic: running on web-1",
    ]
    assert "skipping" in err and "not a machine id" in err
    for phase, reason, expected in ((Phase.DONE, None, cli.EXIT_OK), (Phase.FAILED, "x", cli.EXIT_FAILED),
                                    (Phase.HALTED, "an operator decides", cli.EXIT_FAILED),
                                    (Phase.SUPERSEDED, "a newer version came", cli.EXIT_FAILED)):
        write(etcd_conf, rollout_keys(finished(running, phase, reason)))
        code, out, err = run("rollout", "--once")
        assert code == expected, (phase, out, err)
        if reason:
            assert f"{phase.value}: {reason}" in err


def test_rollout_once_without_any_rollout(run: Run) -> None:
    assert run("rollout", "--once") == (cli.EXIT_OK, "no rollout yet\n", "")
    code, out, _ = run("rollout", "--once", "--json")
    assert code == cli.EXIT_OK and json.loads(out)["verdict"] == "none"


def test_rollout_once_json(run: Run, running: int) -> None:
    code, out, _ = run("rollout", "--once", "--json")
    assert code == cli.EXIT_RUNNING
    data = json.loads(out)
    assert data["revision"] == running and data["verdict"] == "running"
    assert [(h["name"], h["state"], h["done"]) for h in data["hosts"]] == [("web-1", "stopped", 2),
                                                                           ("web-2", "stopped", 2)]
    assert data["steps"]["migrate"]["ok"] is True


def test_rollout_follows_until_the_end(run: Run, etcd_conf: EtcdConfig, running: int) -> None:
    async def finish(etcd: Etcd, _: int) -> None:
        # Whether the CLI lists these or sees them come through its watches, it ends the same way.
        await put_all(etcd,
                      report(running, "migrated", "collectstatic", proto.migrated(True, 0, None, 2.0, A)),
                      report(running, "started", A, proto.started(D2, True)),
                      report(running, "started", B, proto.started(D2, False, "djed-web.service failed")))
        await put_all(etcd, rollout_keys(finished(running, Phase.FAILED, "host web-2 did not start")))

    write(etcd_conf, {VERSION_KEY: b"v2"})
    with FakeLeader(etcd_conf, finish):
        code, out, err = run("rollout")
    assert code == cli.EXIT_FAILED, (out, err)
    assert "did not start" in err
    assert any(line.endswith("failed: host web-2 did not start") for line in out.splitlines())


def test_rollout_json_lines_until_the_end(run: Run, etcd_conf: EtcdConfig, running: int) -> None:
    async def finish(etcd: Etcd, _: int) -> None:
        await put_all(etcd, rollout_keys(finished(running, Phase.DONE)))

    write(etcd_conf, {VERSION_KEY: b"v2"})
    with FakeLeader(etcd_conf, finish):
        code, out, _ = run("rollout", "--json")
    assert code == cli.EXIT_OK
    objects = [json.loads(line) for line in out.splitlines()]
    assert objects[-1]["verdict"] == "done" and objects[-1]["rollout"]["phase"] == "done"


def run_on_a_terminal(*argv: str, seconds: float = 60) -> tuple[int, str]:
    """`python -m norm ARGV` with its output on a pseudo-terminal: (exit status, what it drew)."""
    master, slave = pty.openpty()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("NORM_")}, "TERM": "xterm"}
    proc = subprocess.Popen([PYTHON, "-m", "norm", *argv], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                            stdout=slave, stderr=subprocess.PIPE)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the process is gone and the terminal closed
                break
            if not chunk:
                break
            out += chunk
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    return code, out.decode("utf-8", "replace")


def test_on_a_terminal_the_view_is_redrawn_in_place(etcd_conf: EtcdConfig, conf: Path, running: int) -> None:
    async def finish(etcd: Etcd, _: int) -> None:
        await put_all(etcd, rollout_keys(finished(running, Phase.DONE)))

    write(etcd_conf, {VERSION_KEY: b"v2"})
    with FakeLeader(etcd_conf, finish):
        code, drawn = run_on_a_terminal("rollout", "--config", str(conf))
    assert code == cli.EXIT_OK, drawn
    assert drawn.startswith("\x1b[J")  # the first frame: nothing to move up over
    assert "done in 1m35s" in drawn
    frames = drawn.split("\x1b[J")[1:]
    for frame in frames[:-1]:  # each redraw moves up over exactly the lines drawn before
        body, _, move = frame.rpartition("\x1b[")
        assert move == f"{body.count(chr(10))}F", repr(frame)
    assert "\x1b[" not in frames[-1]
