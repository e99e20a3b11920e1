"""Hostile values in etcd against a real agent: every key Norm reads, thousands of values.

A real `norm agent` (leader, update mode, healing on, with a rollout in its pull barrier that it
leads and whose header its executor follows) runs on a real etcd, a real systemd manager whose units
run, and a real Docker engine. Hypothesis writes values nobody should trust into every key Norm reads
(the operator's keys, the rollout header, record, participants and reports, host records, the leader
key, unit summaries, operator requests, the ledger and the history): random bytes, truncated,
nested and oversized JSON, and records valid but for one field (tags with newlines, '=' or NUL, wrong
types, huge numbers, NaN, unknown fields, deep nesting). Each value carries a unique marker.

Then: the agent is alive and never logged a traceback or a service death; every refusal of a key it
watches was counted exactly once; no log line holds a marker; the release file and the units are
as they were; a last valid write (a new desired version) is acted on; the CLI's readers, run over
the hostile store, answer without a traceback and print no control character; and the agent,
started again over that store, refuses what it reads at start and runs on.

`make test` writes a fixed slice (NORM_FUZZ_EXAMPLES, 400 by default); `make fuzz` writes 10,000
and prints the figures as one JSON line (NORM_FUZZ_REPORT names the file it is written to)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from norm.adapters.etcd import Etcd, KeyValue
from norm.app import cli
from norm.core import protocol as proto
from norm.core.config import EtcdConfig, UpdateConfig
from norm.core.desired import parse_environment_name, parse_version
from norm.core.errors import InvalidValue
from norm.core.host import HostRecord, control_prefix, hosts_key, leader_key, units_key
from norm.core.policy import policy_from_update_config
from norm.core.record import Phase, Release, Rollout
from norm.core.rollout import Resolved, policy_of, start_rollout, step
from norm.core.units import matches, parse_unit_name
from norm.core.values import MACHINE_ID
from sandbox.docker import DockerEngine
from sandbox.etcd import EtcdMember
from sandbox.procs import SandboxError, wait_for
from sandbox.systemd import SystemdManager
from tests.plugins.agent import AgentProc

T = TypeVar("T")

P = "/norm"
VERSION_KEY, ENV_KEY = "/djed-version", "/djed-environment"
UNITS = ("djed-web.service", "djed-api.service")
PATTERNS = ("djed-*.service",)
SLEEPER = ("[Unit]\nStartLimitIntervalSec=0\n[Service]\nEnvironmentFile=-{env}\n"
           "ExecStart=/bin/sleep infinity\n")
D1, D2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
OLD = Release("v1", D1)
IMAGE = "127.0.0.1:5000/djed/app"
EXAMPLES = int(os.environ.get("NORM_FUZZ_EXAMPLES", "400"))
CLI_EXAMPLES = max(15, EXAMPLES // 50)
REPORT = os.environ.get("NORM_FUZZ_REPORT")
MARK = "@MARK@"  # where a value's unique marker goes
HUGE, DEEP = "@HUGE@", "@DEEP@"  # raw JSON put in place of these strings once serialised
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


# ---------------------------------------------------------------------------------------------------
# A synchronous writer: the project's etcd adapter on an event loop of its own thread


class Writer:
    def __init__(self, endpoint: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-writer", daemon=True)
        self.thread.start()
        self.etcd = self.call(Etcd(EtcdConfig(endpoints=(endpoint,), request_timeout=30.0)).__aenter__())

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def put(self, key: str, value: bytes) -> int:
        return self.call(self.etcd.put(key, value))

    def get(self, key: str) -> KeyValue | None:
        return self.call(self.etcd.get(key))

    def delete(self, key: str) -> None:
        self.call(self.etcd.delete(key))

    def close(self) -> None:
        try:
            self.call(self.etcd.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


# ---------------------------------------------------------------------------------------------------
# The hostile values


def _json(value: object) -> str:
    return json.dumps(value, allow_nan=True)


HOSTILE_TEXT = st.one_of(
    st.sampled_from([
        f"v3\n{MARK}=1", f"{MARK}\nNORM_IMAGE=evil.example/app", f"{MARK}=x", f"{MARK}\x00", f"\x1b[2J{MARK}",
        f"{MARK} spaced", f"{MARK}\u2028", f"\u00fcn\u00efc\u00f6de{MARK}", "." + MARK, "-" + MARK,
        MARK + "\n",
        MARK + "x" * 200, f"{MARK}\r\n", f"{MARK}\t", f"../{MARK}", f"{MARK}@sha256:zz",
        f"sha256:{MARK}",
    ]),
    st.builds(lambda a, b: a + MARK + b, st.text(max_size=12), st.text(max_size=12)),
)
WRONG_TYPE = st.sampled_from([[MARK], {"x": MARK}, True, False, None, 1.5, 0, -1, MARK, [], {}])
NUMBER = st.sampled_from([float("nan"), float("inf"), float("-inf"), HUGE, -(10**30), 10**30, 1e300, -1,
                          0.5, "1", MARK])


@st.composite
def almost_valid(draw: st.DrawFn, template: object) -> str:
    """`template` (a valid value, as JSON data) with one thing made hostile."""
    data = json.loads(json.dumps(template))
    if isinstance(data, dict) and data:
        how = draw(st.sampled_from(["text", "type", "number", "huge", "unknown", "deep", "missing"]))
        numeric = sorted(k for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool))
        fields = numeric if how in ("number", "huge") and numeric else sorted(data)
        field = draw(st.sampled_from(fields))
        if how == "text":
            data[field] = draw(HOSTILE_TEXT)
        elif how == "type":
            data[field] = draw(WRONG_TYPE)
        elif how == "number":
            data[field] = draw(NUMBER)
        elif how == "huge":
            data[field] = HUGE
        elif how == "unknown":
            data[draw(st.sampled_from([MARK, "x" + MARK, "__class__"]))] = MARK
        elif how == "deep":
            data[field] = DEEP
        else:
            del data[field]
    elif isinstance(data, list) and data and isinstance(data[0], dict) and draw(st.booleans()):
        return "[" + draw(almost_valid(data[0])) + "]"  # a list of records: one of them made hostile
    elif isinstance(data, list):
        i = draw(st.integers(0, max(0, len(data) - 1)))
        data[i:i + 1] = [draw(st.one_of(HOSTILE_TEXT, WRONG_TYPE, NUMBER, st.just(DEEP)))]
    else:
        data = draw(st.one_of(HOSTILE_TEXT, WRONG_TYPE))
    text = _json(data)
    depth = draw(st.sampled_from([3, 50, 999, 1001, 5000, 100_000]))
    huge = draw(st.sampled_from(["9" * 20, "9" * 400, "-" + "9" * 400, "9" * 4301, "9" * 20_000, "1e400",
                                 "-1e999", "1" + "0" * 308 + ".5"]))
    return (text.replace(_json(HUGE), huge)
            .replace(_json(DEEP), "[" * depth + _json(MARK) + "]" * depth))


def truncated(template: object) -> st.SearchStrategy[str]:
    text = _json(template)
    return st.integers(0, max(0, len(text) - 1)).map(lambda n: text[:n])


def random_bytes() -> st.SearchStrategy[bytes]:
    return st.builds(lambda a, b: a + MARK.encode() + b, st.binary(max_size=120), st.binary(max_size=120))


def nested() -> st.SearchStrategy[str]:
    def build(depth: int, kind: str) -> str:
        return ("[" * depth + _json(MARK) + "]" * depth if kind == "list"
                else '{"a":' * depth + _json(MARK) + "}" * depth)

    return st.builds(build, st.sampled_from([1, 900, 1100, 20_000, 200_000]),
                     st.sampled_from(["list", "dict"]))


def oversized(template: object) -> st.SearchStrategy[str]:
    """One string field of the template made long: mostly a few kB, sometimes past every bound."""
    if not isinstance(template, dict):
        return st.builds(lambda n: _json([MARK + "x" * n]), st.integers(300, 5000))
    fields = (sorted(k for k, v in template.items() if isinstance(v, str) or v is None) or sorted(template)
              or [MARK])
    size = st.one_of(st.integers(256, 5000), st.integers(256, 5000), st.integers(256, 5000),
                     st.integers(262_145, 400_000))
    return st.builds(lambda f, n: _json({**template, f: MARK + "x" * n}), st.sampled_from(fields), size)


def json_values(template: object) -> st.SearchStrategy[bytes]:
    text = st.one_of(almost_valid(template), almost_valid(template), almost_valid(template),
                     truncated(template), nested(), oversized(template))
    return st.one_of(text.map(str.encode), random_bytes())


def plain_values() -> st.SearchStrategy[bytes]:
    """For keys holding a word (the desired version, the environment name, the leader's id)."""
    return st.one_of(HOSTILE_TEXT.map(lambda s: s.encode("utf-8", "surrogatepass")), random_bytes(),
                     nested().map(str.encode),
                     st.integers(129, 2000).map(lambda n: (MARK + "v" * n).encode()))


# ---------------------------------------------------------------------------------------------------
# Every key Norm reads, what it must make of a hostile value, and the counter that says so


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    keys: st.SearchStrategy[str]
    values: st.SearchStrategy[bytes]
    refused: Callable[[str, bytes], bool]  # the grammar's verdict (the value is written only if refused)
    label: str | None = None  # the counter the agent moves for each refusal it reads as it happens


def _refuses(check: Callable[[str, bytes], object]) -> Callable[[str, bytes], bool]:
    def refused(key: str, raw: bytes) -> bool:
        try:
            check(key, raw)
        except InvalidValue:
            return True
        except Exception:  # the grammar failed on it: hostile all the same, and the agent must live
            return True
        return False

    return refused


def _machine_ids(key: str, raw: bytes) -> None:
    """The executor's reading of a rollout's participant list."""
    try:
        loaded = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidValue(key, "not JSON") from None
    if not isinstance(loaded, list) or not all(isinstance(m, str) and MACHINE_ID.fullmatch(m)
                                                for m in loaded):
        raise InvalidValue(key, "not a list of machine ids")


def _anything(key: str, raw: bytes) -> bool:
    return True


@dataclasses.dataclass
class Scene:
    me: str
    ghost: str
    revision: int
    record: Rollout
    header: proto.Header

    def targets(self) -> list[Target]:
        p, r, me, ghost = P, self.revision, self.me, self.ghost
        mids = st.one_of(st.just(ghost), st.just(me), st.text("0123456789abcdef", min_size=32, max_size=32))
        host = HostRecord(ghost, MARK, "test", "web", "0.1.0", release="v1@sha256:111111111111",
                          http="127.0.0.1:1", started_at=1.0)
        report_templates: dict[str, dict[str, Any]] = {
            "pulled": {"error": MARK, "permanent": False}, "stopped": {},
            "started": {"digest": D2, "ok": True, "reason": MARK},
            "migrated": {"ok": True, "exit_code": 0, "reason": MARK, "seconds": 1.0, "host": ghost},
            "claim": {"host": ghost}, "abort": {"by": MARK}}
        bad_names = st.sampled_from(["", "NOTAMID", "a" * 31, "x/y", "..", "\n", "migrate\x00"])

        def report_key(kind: str) -> st.SearchStrategy[str]:
            if kind == "abort":
                return st.just(proto.abort_key(p, r))
            good = st.sampled_from(["migrate", "collectstatic"]) if kind in ("migrated", "claim") else mids
            names = st.one_of(good, good, good, bad_names)
            if kind == "claim":
                return names.map(lambda n: proto.claim_key(p, r, n))
            if kind == "migrated":
                return st.tuples(mids, names).map(lambda m: proto.migrated_key(p, r, *m))
            return names.map(lambda n: proto.report_key(p, r, kind, n))

        # The leader follows the hosts' reports and the abort request; a claim is read by the migrator
        # alone, when it claims (as a whole value, never parsed), so no refusal of one is counted.
        reports = [Target(f"report:{kind}", report_key(kind), json_values(template),
                          _refuses(lambda k, v: proto.parse_report(p, r, k, v)),
                          None if kind == "claim" else "rollout report")
                   for kind, template in report_templates.items()]
        record = json.loads(self.record.encode())
        ledger = {"digest": D1, "tag": "v1", "step": "migrate", "ok": True, "revision": 7, "at": 1.0}
        summary = [{"unit": UNITS[0], "active_state": "active", "sub_state": "running", "n_restarts": 0,
                    "heal": "ok", "attempts": 0, "next_attempt_at": None, "quarantined_until": None,
                    "requests": [{"action": "stop", "failures": 1, "error": MARK, "next_try": 1.0}]}]
        control = st.one_of(
            st.tuples(st.sampled_from(["hold", "start", "release", "HOLD", "stop", "", MARK]),
                      st.sampled_from(["other.service", "djed-web", "djed web.service", "djed-\n.service",
                                       "djed-\x1b.service", "../djed-web.service", "djed-web.service/x",
                                       ""])),
            st.tuples(st.just("hold"), st.text(max_size=30)),
        ).map(lambda t: control_prefix(p, me) + "/".join(t))

        def control_refused(key: str, raw: bytes) -> bool:
            """The control service's reading of a request's key (its value is not read)."""
            kind, _, unit = key[len(control_prefix(p, me)):].partition("/")
            try:
                parse_unit_name(unit, key)
            except InvalidValue:
                return True
            return kind not in ("hold", "start", "release") or not matches(unit, PATTERNS)

        return [
            Target("version", st.just(VERSION_KEY), plain_values(),
                   _refuses(lambda k, v: parse_version(v, k)), VERSION_KEY),
            Target("environment", st.just(ENV_KEY), plain_values(),
                   _refuses(lambda k, v: parse_environment_name(v, k)), ENV_KEY),
            Target("header", st.just(proto.header_key(p)), json_values(json.loads(self.header.encode())),
                   _refuses(lambda k, v: proto.Header.decode(v, k)), proto.header_key(p)),
            Target("record", st.just(proto.record_key(p, r)), json_values(record),
                   _refuses(lambda k, v: Rollout.decode(v, k))),
            Target("participants", st.just(proto.hosts_list_key(p, r)), json_values([ghost]),
                   _refuses(_machine_ids)),
            *reports,
            Target("host", mids.filter(lambda m: m != me).map(lambda m: hosts_key(p, m)),
                   json_values(json.loads(host.encode())), _refuses(lambda k, v: HostRecord.decode(v, k))),
            Target("leader", st.just(leader_key(p)), plain_values(), _anything),
            Target("units", mids.map(lambda m: units_key(p, m)), json_values(summary), _anything),
            Target("control", control, plain_values(), control_refused,
                   control_prefix(p, me)),
            Target("ledger", st.integers(1, 10**6).map(lambda n: proto.ledger_key(p, n, "migrate")),
                   json_values(ledger), _anything),
            Target("history", st.integers(1, 10**6).map(lambda n: proto.history_key(p, n)),
                   json_values(json.loads(dataclasses.replace(self.record, progress=()).encode())),
                   _refuses(lambda k, v: Rollout.decode(v, k))),
        ]


# ---------------------------------------------------------------------------------------------------
# Reading the agent


def metrics(agent: AgentProc) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"{agent.url}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def rejected(agent: AgentProc) -> dict[str, float]:
    """The agent's refusals by key; raises (ending any wait at once) if the agent has exited."""
    if agent.proc is None or not agent.proc.alive:
        raise SandboxError(f"the agent exited:\n{agent.proc.tail() if agent.proc else ''}")
    return {dict(labels)["key"]: value for (name, labels), value in metrics(agent).items()
            if name == "norm_rejected_values_total"}


def crash_lines(agent: AgentProc) -> list[str]:
    signs = ("Traceback", "service.failed", "agent.service_died", '"level": "critical"', "Task exception")
    return [line for line in agent.logs().splitlines() if any(s in line for s in signs)]


def unit_runs(manager: SystemdManager) -> dict[str, tuple[str, str, str]]:
    return {u: (manager.unit_property(u, "InvocationID"), manager.unit_property(u, "ActiveState"),
                manager.unit_property(u, "NRestarts")) for u in UNITS}


def run_cli(config: Path, *args: str) -> tuple[int, str]:
    """One of the CLI's readers, in this process: its exit status and all it printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([*args, "--config", str(config)])
    return code, out.getvalue() + err.getvalue()


CLI_READERS = (("status",), ("hosts",), ("units",), ("history",), ("rollout", "--once"))


# ---------------------------------------------------------------------------------------------------
# The campaign


@pytest.mark.timeout(300 + EXAMPLES // 5)
def test_hostile_values_in_every_key_norm_reads_change_nothing_and_are_counted(
        etcd: EtcdMember, systemd_manager: SystemdManager, docker_engine: DockerEngine,
        agents: Callable[..., AgentProc], tmp_path: Path) -> None:
    began = time.monotonic()
    release_file = tmp_path / "run" / "release.env"
    release_file.parent.mkdir()
    release_text = proto.render_release(OLD, IMAGE, 1)
    release_file.write_bytes(release_text)
    for unit in UNITS:
        systemd_manager.write_unit(unit, SLEEPER.format(env=release_file))
    systemd_manager.systemctl("start", *UNITS)
    runs = unit_runs(systemd_manager)

    me, ghost = secrets.token_hex(16), secrets.token_hex(16)
    update = UpdateConfig(image=IMAGE, release_file=str(release_file), pull_timeout=86400.0)
    writer = Writer(etcd.endpoint)
    try:
        # The rollout the agent will lead: v2, in its pull barrier, waiting on a host that never
        # pulls (alive: its record is there). The agent itself runs v1 and takes no part.
        revision = writer.put(VERSION_KEY, b"v2")
        now = time.time()
        record, _ = start_rollout(revision, "v2", [ghost], now, OLD)
        record, _ = step(record, Resolved(D2), now, policy_of(policy_from_update_config(update)))
        assert record.phase is Phase.PULL
        header = proto.Header.of(record)
        writer.put(hosts_key(P, ghost), HostRecord(ghost, "ghost", "test", "web", "0.1.0").encode())
        writer.put(proto.hosts_list_key(P, revision), json.dumps([ghost]).encode())
        writer.put(proto.record_key(P, revision), record.encode())
        writer.put(proto.header_key(P), header.encode())
        scene = Scene(me, ghost, revision, record, header)

        # Its role is web and updates are for workers: the last valid version written (the sentinel)
        # begins a rollout without participants, which fails at once, touching nothing.
        agent = agents(
            [etcd.endpoint], machine_id=me, systemd_bus=systemd_manager.bus_address, lease_ttl=30,
            extra_toml=(f'[units]\npatterns = ["{PATTERNS[0]}"]\n'
                        f'[docker]\nhost = "{docker_engine.host}"\n'
                        f'[update]\nimage = "{IMAGE}"\nrelease_file = "{release_file}"\n'
                        'pull_timeout = 86400\nroles = ["worker"]\n'))
        agent.wait_notify("READY=1", timeout=60)
        wait_for(lambda: metrics(agent).get(("norm_leader", ())) == 1
                 and metrics(agent).get(("norm_rollout_phase", (("phase", "pull"),))) == 1, timeout=60,
                 what="the agent leading the rollout in its pull barrier")

        # The leader key is written last (see below): a value written over it takes the leadership
        # away, by design, and the rest of the campaign needs a leader.
        targets = [t for t in scene.targets() if t.name != "leader"]
        leader_target = next(t for t in scene.targets() if t.name == "leader")
        token = "fz" + secrets.token_hex(5)
        expected: Counter[str] = Counter()
        written: Counter[str] = Counter()
        host_keys: set[str] = set()
        skipped = [0]

        def write(target: Target, key: str, value: bytes) -> None:
            raw = value.replace(MARK.encode(), f"{token}{sum(written.values()):08d}".encode())
            if not target.refused(key, raw):
                skipped[0] += 1
                assume(False)  # valid after all: not a hostile value
            writer.put(key, raw)
            written[target.name] += 1
            if target.label is not None:
                expected[target.label] += 1
            if target.name == "host":
                host_keys.add(key)

        # Each watch proven live before the campaign: a first refusal of each counted (by the watch:
        # the agent is ready, its start-up reads are done).
        probes = {VERSION_KEY: b"probe\n", ENV_KEY: b"probe\n", proto.header_key(P): b"{",
                  proto.report_key(P, revision, "pulled", "probe"): b"{}",
                  control_prefix(P, me) + "probe/djed-web.service": b""}
        for key, value in probes.items():
            writer.put(key, value)
        probe_labels = (VERSION_KEY, ENV_KEY, proto.header_key(P), "rollout report", control_prefix(P, me))
        wait_for(lambda: all(rejected(agent).get(label) == 1 for label in probe_labels), timeout=60,
                 what="the probes refused")
        expected.update(probe_labels)

        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  derandomize=EXAMPLES <= 1000, print_blob=True,
                  suppress_health_check=list(HealthCheck))
        @given(st.data())
        def campaign(data: st.DataObject) -> None:
            target = data.draw(st.sampled_from(targets), label="target")
            key = data.draw(target.keys, label="key")
            value = data.draw(target.values, label="value")
            write(target, key, value)

        campaign()

        # Every watched refusal counted, exactly once; a last valid write acted on.
        def counted() -> bool:
            seen = rejected(agent)
            return all(seen.get(label, 0) >= n for label, n in expected.items())

        wait_for(counted, timeout=300, what=f"the refusals counted: {dict(expected)}")
        sentinel = writer.put(VERSION_KEY, b"fuzz-done")

        def sentinel_done() -> bool:
            rejected(agent)  # alive
            kv = writer.get(proto.header_key(P))
            if kv is None:
                return False
            try:
                h = proto.Header.decode(kv.value, kv.key)
            except InvalidValue:
                return False
            return h.revision == sentinel and h.terminal

        wait_for(sentinel_done, timeout=120, what="the last valid version acted on")
        seen = rejected(agent)
        expected["host record"] = len(host_keys)
        for label, n in expected.items():
            assert seen.get(label, 0) == n, (label, seen.get(label), n)
        final = proto.Header.decode(writer.get(proto.header_key(P)).value, "header")  # type: ignore[union-attr]
        assert final.phase is Phase.FAILED and final.reason == "no participating host"
        assert final.previous == OLD

        # The CLI's readers over the hostile store (no traceback, no control character printed), and
        # the executor over participant lists: each goes with a new rollout's header, which it reads
        # the list of.
        cli_runs, lists = [0], [0]

        def read_all() -> None:
            """Every reader of the CLI over the store as it is: no traceback, no control character."""
            for args in CLI_READERS:
                code, printed = run_cli(agent.config_path, *args)
                cli_runs[0] += 1
                assert isinstance(code, int), (args, code)
                assert not CONTROL.search(printed), (args, printed[:2000])

        @settings(max_examples=CLI_EXAMPLES, deadline=None, database=None, derandomize=EXAMPLES <= 1000,
                  suppress_health_check=list(HealthCheck))
        @given(st.data())
        def readers(data: st.DataObject) -> None:
            target = data.draw(st.sampled_from([t for t in targets if t.name not in ("version", "environment",
                                                                                   "control")]))
            if target.name == "participants":
                rollout = dataclasses.replace(header, revision=revision + 1_000_000 + lists[0])
                write(target, proto.hosts_list_key(P, rollout.revision), data.draw(target.values))
                writer.put(proto.header_key(P), rollout.encode())
                lists[0] += 1
                wait_for(lambda: rejected(agent).get("rollout hosts") == lists[0], timeout=60,
                         what="the participant list refused")
            else:
                if target.name != "header":
                    # The header back on the rollout, so that the readers go through its record,
                    # participants and reports.
                    writer.put(proto.header_key(P), header.encode())
                write(target, data.draw(target.keys), data.draw(target.values))
            read_all()

        readers()
        for args in CLI_READERS:
            r = subprocess.run([sys.executable, "-m", "norm", *args, "--config", str(agent.config_path)],
                               capture_output=True, text=True, timeout=120, check=False)
            assert "Traceback" not in r.stderr, (args, r.stderr)
            assert not CONTROL.search(r.stdout + r.stderr), args

        # The agent: alive, led throughout, nothing touched; then stopped as systemd stops it.
        assert agent.proc is not None and agent.proc.alive, agent.proc.tail() if agent.proc else ""
        assert agent.logs().count('"event": "leader.elected"') == 1
        assert release_file.read_bytes() == release_text
        assert unit_runs(systemd_manager) == runs
        counted_first = sum(rejected(agent).values())
        agent.proc.signal(15)
        assert agent.wait_exit(30) == 0
        agent.stop()

        # Started again over the hostile store: what it reads once at start (the header, the rollout's
        # participants, its record) is refused and counted, and it runs on. No desired version: the
        # leader has nothing to begin, and the header stays the rollout's.
        nasty = {proto.hosts_list_key(P, revision): ("[" * 5000 + _json(token) + "]" * 5000).encode(),
                 proto.record_key(P, revision): record.encode().replace(b'"tag":"v2"',
                                                                      f'"tag":"v2\\n{token}=1"'.encode())}
        assert _refuses(_machine_ids)(proto.hosts_list_key(P, revision),
                                      nasty[proto.hosts_list_key(P, revision)])
        assert _refuses(lambda k, v: Rollout.decode(v, k))(proto.record_key(P, revision),
                                                           nasty[proto.record_key(P, revision)])
        writer.delete(VERSION_KEY)
        for key, value in nasty.items():
            writer.put(key, value)
        writer.put(proto.header_key(P), header.encode())
        agent.start()
        agent.wait_notify("READY=1", timeout=60)
        wait_for(lambda: rejected(agent).get("rollout hosts") == 1
                 and rejected(agent).get(proto.record_key(P, revision)) == 1,
                 timeout=60, what="the participants and the record refused at start")

        # Last, the leader key: a value written over it is no longer on the leader's lease, so the
        # agent steps down (it cannot prove its leadership by it); the key, on no lease, is no
        # agent's, so its next campaign removes it and it leads again. The readers show the values;
        # the agent runs on and touches nothing.
        @settings(max_examples=max(20, CLI_EXAMPLES // 10), deadline=None, database=None,
                  derandomize=EXAMPLES <= 1000, suppress_health_check=list(HealthCheck))
        @given(st.data())
        def leader_values(data: st.DataObject) -> None:
            write(leader_target, leader_key(P), data.draw(leader_target.values))
            read_all()

        leader_values()
        wait_for(lambda: "leader.deposed" in agent.logs() and "leader.foreign_key_removed" in agent.logs()
                 and metrics(agent).get(("norm_leader", ())) == 1, timeout=60,
                 what="the agent stepping down from an overwritten leader key, removing it and leading again")
        values_written = sum(written.values()) + len(nasty)

        # Never a traceback, never a value in its log, nothing touched.
        crashes = crash_lines(agent) + ([] if agent.proc is not None and agent.proc.alive else ["exited"])
        leaks = [line for line in agent.logs().splitlines() if token in line]
        refused = int(counted_first + sum(rejected(agent).values()))
        figures = {"values": values_written, "refused": refused, "crashes": len(crashes), "leaks": len(leaks),
                   "seconds": round(time.monotonic() - began, 1)}
        if REPORT:
            Path(REPORT).parent.mkdir(parents=True, exist_ok=True)
            Path(REPORT).write_text(json.dumps(figures) + "\n")
        print(json.dumps({**figures, "by_target": dict(written), "skipped_valid": skipped[0],
                          "cli_runs": cli_runs[0]}))
        assert not crashes, crashes[:5]
        assert not leaks, leaks[:3]
        assert all(written[t.name] for t in (*targets, leader_target)), written
        assert release_file.read_bytes() == release_text
        assert unit_runs(systemd_manager) == runs
        assert agent.proc is not None
        agent.proc.signal(15)
        assert agent.wait_exit(30) == 0
    finally:
        writer.close()

