"""Zero-downtime rolling updates on real components: four hosts behind a real HAProxy, each with its own
systemd manager, Docker engine and agent, on a 3-member etcd cluster, with steady HTTP load through
HAProxy during every rollout, and a real Prometheus scraping the hosts' web units for canary analyses.
The fleet's policy (one etcd key) asks for `auto`: a release whose image declares its migrations
`expand` rolls one host at a time, `migrate` running before the first batch and `collectstatic` after
the last; a release that does not serve is rolled back.

What is asserted comes from the load generator (every request's outcome), HAProxy's Runtime API (who
serves, sampled every 50 ms), etcd (header, record, ledger) and the agents' logs."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from norm.core.analysis import AnalysisQuery
from norm.core.notify import Webhook
from norm.core.policy import FleetPolicy, StepPolicy
from sandbox import app, load, updates
from sandbox.fleet import Fleet
from sandbox.haproxy import HaproxyServer
from sandbox.images import DemoOptions
from sandbox.procs import SandboxError, wait_for
from sandbox.prometheus import AGENTS_JOB, PrometheusServer
from sandbox.registry import Registry
from sandbox.webhooks import WebhookReceiver
from tests.fleet.conftest import running_fleet

pytestmark = pytest.mark.slow

HOSTS = 4
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "norm-rules.yml"
RATE = 40.0  # requests per second through HAProxy, during every rollout
POLICY = FleetPolicy(
    strategy="auto", max_unavailable="1", min_healthy=1.0, healthy_deadline=15.0, progress_deadline=60.0,
    steps=(StepPolicy("migrate", "migrate", "pre"), StepPolicy("collectstatic", "collectstatic", "post")),
    pull_timeout=60.0, stop_timeout=30.0, start_timeout=60.0, migration_timeout=60.0)
EXPAND = DemoOptions(migrations="expand")


class Rolling:
    def __init__(self, fleet: Fleet, demo_app: Callable[..., str], prometheus: PrometheusServer) -> None:
        self.fleet = fleet
        self.demo_app = demo_app
        self.prometheus = prometheus
        self.versions = 0

    @property
    def state(self) -> Any:
        state = self.fleet.load_state()
        assert state is not None
        return state

    @property
    def lb(self) -> Any:
        return self.state["haproxy"]

    def names(self) -> list[str]:
        return [h["name"] for h in self.state["hosts"]]

    def prometheus_targets(self) -> dict[str, dict[str, str]]:
        """What Prometheus scrapes: each host's web unit, and its labels."""
        ports = app.reserve_ports(self.state["hosts"])
        return {f"127.0.0.1:{ports[n][0]}": {"host": n} for n in self.names()}

    def new_version(self, options: DemoOptions = EXPAND) -> str:
        self.versions += 1
        tag = f"r{self.versions}"
        self.demo_app(tag, 0, options)
        return tag

    def set_policy(self, policy: FleetPolicy) -> None:
        """`norm policy apply`, as etcd gets it: the fleet's policy key."""
        updates.put(self.fleet, "/norm/policy", policy.encode().decode())

    def admin(self) -> dict[str, str]:
        return HaproxyServer(Path(self.lb["dir"]), port=self.lb["port"]).admin_states(self.lb["backend"])

    def serving_count(self) -> int:
        return sum(1 for admin in self.admin().values() if admin == "ready")

    @contextlib.contextmanager
    def load(self, path: str = "/version") -> Iterator[tuple[load.LoadResult, load.Serving]]:
        with load.running(self.lb["url"] + path, RATE, self.serving_count) as (result, serving):
            yield result, serving

    def events(self, name: str, skip: int = 0) -> list[dict[str, Any]]:
        out = []
        for line in (Path(self.fleet.host(name)["dir"]) / "agent.log").read_text().splitlines()[skip:]:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def log_marks(self) -> dict[str, int]:
        return {n: len((Path(self.fleet.host(n)["dir"]) / "agent.log").read_text().splitlines())
                for n in self.names()}

    def all_serve(self, tag: str, timeout: float = 90.0) -> None:
        ports = app.reserve_ports(self.state["hosts"])

        def serve() -> bool:
            try:
                return all(app.fetch(ports[n][0]) == tag and app.fetch(ports[n][1]) == tag
                           for n in self.names())
            except OSError:
                return False

        wait_for(serve, timeout=timeout, what=f"every host serving {tag}", interval=0.1)
        wait_for(lambda: set(self.admin().values()) == {"ready"}, timeout=timeout,
                 what="every server in service in HAProxy", interval=0.1)

    def moved_to(self, tag: str, marks: dict[str, int]) -> dict[str, int]:
        """How many times each host's agent began moving to `tag` since `marks`."""
        return {n: sum(1 for e in self.events(n, marks[n]) if e.get("event") == "executor.moving"
                       and str(e.get("release", "")).startswith(f"{tag}@")) for n in self.names()}

    def deploy_cli(self, tag: str) -> subprocess.CompletedProcess[str]:
        """`norm deploy TAG --wait`, as an operator runs it (with a host's configuration)."""
        config = self.fleet.host(self.names()[0])["config"]
        return subprocess.run([sys.executable, "-m", "norm", "deploy", tag, "--wait", "--timeout", "240",
                               "--config", config], capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def rolling(tmp_path_factory: pytest.TempPathFactory, registry: Registry,
            demo_app: Callable[..., str]) -> Iterator[Rolling]:
    # A real Prometheus scraping every host's web unit (its series labelled with the host's name): the
    # leader asks it a canary's analysis queries.
    prometheus = PrometheusServer(tmp_path_factory.mktemp("rolling-prometheus"), scrape_interval=1.0,
                                  rule_files=[str(RULES)])
    prometheus.start()
    env = {"NORM_UPDATE__PROMETHEUS_URL": prometheus.url}
    try:
        with running_fleet(tmp_path_factory, registry, "rolling-fleet", HOSTS, haproxy=True,
                           agent_env=env) as (fleet, ports):
            targets = {f"127.0.0.1:{web}": {"host": name} for name, (web, _) in ports.items()}
            prometheus.set_targets(list(targets), targets)
            # And every agent's /metrics, as deploy/prometheus/scrape.yml has it (the dashboard's test).
            agents = {h["http_listen"]: {"host": h["name"]} for h in fleet.load_state()["hosts"]}
            prometheus.set_targets(list(agents), agents, job=AGENTS_JOB)
            r = Rolling(fleet, demo_app, prometheus)
            r.set_policy(POLICY)
            first = r.new_version()
            h = updates.deploy(fleet, first, timeout=240)
            assert h["phase"] == "done" and h["strategy"] == "recreate", h  # nothing served before it
            r.all_serve(first)
            yield r
    finally:
        prometheus.stop()




def test_a_rolling_update_under_load_fails_no_request(rolling: Rolling) -> None:
    tag = rolling.new_version()
    marks = rolling.log_marks()
    with rolling.load() as (result, serving):
        h = updates.deploy(rolling.fleet, tag, timeout=240)
        rolling.all_serve(tag)
    assert h["phase"] == "done", h
    assert h["strategy"] == "rolling" and "expand" in h["strategy_reason"]
    assert result.requests >= 100 and result.failed == 0, result.failures[:5]
    assert serving.min_serving is not None and serving.min_serving >= HOSTS - 1, serving.history
    # Each host moved once, and in its turn: out of HAProxy and drained before its units stopped, back
    # in only once its new run passed the gate.
    assert rolling.moved_to(tag, marks) == dict.fromkeys(rolling.names(), 1)
    for name in rolling.names():
        seen = [e["event"] for e in rolling.events(name, marks[name]) if e.get("event") in (
            "lb.drained", "executor.units_stopped", "executor.units_started", "gate.passed", "lb.registered",
            "executor.moved")]
        first = seen.index("lb.drained")
        assert seen[first:first + 6] == ["lb.drained", "executor.units_stopped", "executor.units_started",
                                         "gate.passed", "lb.registered", "executor.moved"], (name, seen)
    # The expand step ran before the first batch, the contract step once every host had moved.
    ledger = sorted((e for e in updates.ledger(rolling.fleet) if e["revision"] == h["revision"]),
                    key=lambda e: e["at"])
    assert [(e["step"], e["stage"], e["ok"]) for e in ledger] == [("migrate", "pre", True),
                                                                   ("collectstatic", "post", True)]


@pytest.mark.parametrize("broken", [DemoOptions(migrations="expand", healthz_status=500),
                                    DemoOptions(migrations="expand", exit_after=5)],
                         ids=["healthz-500", "exits-after-5s"])
def test_a_release_that_does_not_serve_is_rolled_back(rolling: Rolling, broken: DemoOptions) -> None:
    h = updates.header(rolling.fleet)
    assert h is not None
    old = h["tag"] if h["phase"] == "done" else h["previous"]["tag"]  # what the fleet runs
    tag = rolling.new_version(broken)
    marks = rolling.log_marks()
    if broken.exit_after is not None:  # the gate must outlast the release's few seconds of life
        rolling.set_policy(dataclasses.replace(POLICY, min_healthy=broken.exit_after + 2))
    try:
        with rolling.load() as (result, serving):
            deployed = rolling.deploy_cli(tag)
            rolling.all_serve(old)
    finally:
        rolling.set_policy(POLICY)
    assert deployed.returncode == 1, (deployed.stdout, deployed.stderr)
    assert "rolled_back" in deployed.stderr + deployed.stdout
    h = updates.header(rolling.fleet)
    assert h is not None and h["tag"] == tag and h["phase"] == "rolled_back", h
    assert "failed its health gate" in h["reason"]
    assert ("500" in h["reason"]) if broken.healthz_status == 500 else ("djed-" in h["reason"]), h["reason"]
    moved = rolling.moved_to(tag, marks)
    assert sum(moved.values()) == 1, moved  # max_unavailable = 1: one host ever ran it
    assert result.failed == 0, result.failures[:5]
    assert serving.min_serving is not None and serving.min_serving >= HOSTS - 1, serving.history
    # The contract step never ran: the release before stays the floor.
    assert not [e for e in updates.ledger(rolling.fleet) if e["revision"] == h["revision"]
                and e["stage"] == "post"]


def leader(rolling: Rolling) -> str:
    kvs = updates.get_kvs(rolling.fleet, "/norm/leader")
    assert kvs, "no leader"
    mid = kvs[0]["value"].decode()
    return next(h["name"] for h in rolling.state["hosts"] if h["machine_id"] == mid)


def wait_header(rolling: Rolling, revision: int, what: str, ok: Callable[[dict[str, Any]], bool],
                timeout: float = 120.0) -> dict[str, Any]:
    """The rollout header of `revision` once `ok` says so of it."""
    def read() -> dict[str, Any] | None:
        h = updates.header(rolling.fleet)
        return h if h is not None and int(h["revision"]) == revision else None

    return wait_on(read, what, ok, timeout)


def wait_on(read: Callable[[], dict[str, Any] | None], what: str, ok: Callable[[dict[str, Any]], bool],
            timeout: float) -> dict[str, Any]:
    """What `read` gives once `ok` says so of it (None: not there yet)."""
    seen: list[dict[str, Any]] = []

    def reached() -> bool:
        value = read()
        if value is None:
            return False
        seen.append(value)
        return ok(value)

    wait_for(reached, timeout=timeout, what=what, interval=0.05)
    return seen[-1]


def test_the_leader_killed_in_a_pre_step_a_batch_and_a_post_step(rolling: Rolling) -> None:
    """Each time the rollout goes on under the next leader: no host moves twice, each step runs once."""
    tag = rolling.new_version()
    marks = rolling.log_marks()
    steps_env = rolling.fleet.run_dir / "steps.env"
    steps_env.write_text("NORM_DEMO_TASK_SECONDS=3\n")  # steps long enough to kill a leader in
    mid = {h["machine_id"]: h["name"] for h in rolling.state["hosts"]}
    killed: list[str] = []

    def kill_leader() -> None:
        name = leader(rolling)
        rolling.fleet.kill_agent(name)
        killed.append(name)
        rolling.fleet.restart_agent(name)

    try:
        with rolling.load() as (result, _serving):
            revision = updates.set_version(rolling.fleet, tag)
            wait_header(rolling, revision, "the pre step running",
                        lambda h: h["phase"] == "migrate" and h["migrating"] == "migrate")
            kill_leader()
            # In a batch, the leader's own host not in it (a host killed while it moves moves again).
            wait_header(rolling, revision, "a batch moving without the leader's host",
                        lambda h: h["phase"] == "roll" and h["batch_index"] >= 1
                        and all(mid[m] != leader(rolling) for m in h["batch"]))
            kill_leader()
            wait_header(rolling, revision, "the post step running",
                        lambda h: h["phase"] == "migrate" and h["migrating"] == "collectstatic")
            kill_leader()
            h = updates.wait_phase(rolling.fleet, revision, timeout=240)
            rolling.fleet.wait_registered(timeout=60)
            rolling.all_serve(tag)
    finally:
        steps_env.write_text("")
    assert h["phase"] == "done", h
    assert len(killed) == 3
    assert rolling.moved_to(tag, marks) == dict.fromkeys(rolling.names(), 1)
    ledger = [e for e in updates.ledger(rolling.fleet) if e["revision"] == revision]
    assert sorted((e["step"], e["ok"]) for e in ledger) == [("collectstatic", True), ("migrate", True)]
    ran = [ln for ln in (rolling.fleet.data_dir / "record.log").read_text().splitlines()
           if ln.split()[0] == tag]
    assert sorted(ln.split()[1] for ln in ran) == ["collectstatic", "migrate"], ran  # each exactly once
    assert result.failed == 0, result.failures[:5]


def test_a_newer_version_supersedes_a_rolling_update_at_a_batch_boundary(rolling: Rolling) -> None:
    first, second = rolling.new_version(), rolling.new_version()
    marks = rolling.log_marks()
    with rolling.load() as (result, serving):
        revision = updates.set_version(rolling.fleet, first)
        wait_header(rolling, revision, "the first batch moving", lambda h: h["phase"] == "roll")
        newer = updates.set_version(rolling.fleet, second)
        h = updates.wait_phase(rolling.fleet, newer, timeout=240)
        rolling.all_serve(second)
    assert h["phase"] == "done", h
    old = updates.record(rolling.fleet, revision)
    assert old is not None and old["phase"] == "superseded", old
    assert "after batch" in old["reason"] and old["batch_index"] < len(old["batches"])
    assert not [p for p in old["progress"] if p["status"] == "moving"]  # none cut off mid-move
    moved_first = rolling.moved_to(first, marks)
    assert 1 <= sum(moved_first.values()) < HOSTS and max(moved_first.values()) == 1, moved_first
    assert rolling.moved_to(second, marks) == dict.fromkeys(rolling.names(), 1)
    assert result.failed == 0, result.failures[:5]
    assert serving.min_serving is not None and serving.min_serving >= HOSTS - 1, serving.history


def test_a_breaking_release_recreates_and_says_so(rolling: Rolling) -> None:
    tag = rolling.new_version(DemoOptions(migrations="breaking"))
    h = updates.deploy(rolling.fleet, tag, timeout=240)
    assert h["phase"] == "done" and h["strategy"] == "recreate", h
    assert "breaking" in h["strategy_reason"]
    rolling.all_serve(tag)


def test_a_set_back_below_the_rollback_floor_is_refused_and_above_it_rolls_without_a_step(
        rolling: Rolling) -> None:
    quick = dataclasses.replace(POLICY, max_unavailable="100%", min_healthy=0.0)
    pre_only = dataclasses.replace(quick, steps=(StepPolicy("migrate", "migrate", "pre"),))
    try:
        # Below: `collectstatic` of the newer release ran after every host had moved (contract).
        rolling.set_policy(quick)
        older, newer = rolling.new_version(), rolling.new_version()
        assert updates.deploy(rolling.fleet, older, timeout=240)["phase"] == "done"
        assert updates.deploy(rolling.fleet, newer, timeout=240)["phase"] == "done"
        h = updates.deploy(rolling.fleet, older, timeout=60)
        assert h["phase"] == "failed" and "rollback floor" in h["reason"] and newer in h["reason"], h
        rolling.all_serve(newer)
        # Above: only `pre` steps (expand) ran since; the set-back rolls, and runs no step.
        rolling.set_policy(pre_only)
        third = rolling.new_version()
        assert updates.deploy(rolling.fleet, third, timeout=240)["phase"] == "done"
        h = updates.deploy(rolling.fleet, newer, timeout=240)
        assert h["phase"] == "done" and h["strategy"] == "rolling", h
        assert not [e for e in updates.ledger(rolling.fleet) if e["revision"] == h["revision"]]
        rolling.all_serve(newer)
    finally:
        rolling.set_policy(POLICY)


def norm_cli(rolling: Rolling, *args: str) -> subprocess.CompletedProcess[str]:
    """A `norm` verb as an operator runs it, with a host's configuration."""
    config = rolling.fleet.host(rolling.names()[0])["config"]
    return subprocess.run([sys.executable, "-m", "norm", *args, "--config", config], capture_output=True,
                          text=True, timeout=60, check=False)


def wait_record(rolling: Rolling, revision: int, what: str, ok: Callable[[dict[str, Any]], bool],
                timeout: float = 120.0) -> dict[str, Any]:
    """The record of rollout `revision` once `ok` says so of it."""
    return wait_on(lambda: updates.record(rolling.fleet, revision), what, ok, timeout)


def new_leader_took_over(rolling: Rolling) -> str:
    """Kill the leader's agent (and start it again, as systemd would); the name of the agent leading
    once another has picked the rollout up."""
    old = leader(rolling)
    mark = rolling.log_marks()
    rolling.fleet.kill_agent(old)
    rolling.fleet.restart_agent(old)

    def resumed() -> str | None:
        for name in rolling.names():
            if any(e.get("event") == "updater.leading" for e in rolling.events(name, mark[name])):
                return name
        return None

    wait_for(lambda: resumed() is not None, timeout=60, what="a leader leading again", interval=0.1)
    name = resumed()
    assert name is not None
    return name


def test_a_paused_rollout_waits_through_a_leader_change_until_resumed(rolling: Rolling) -> None:
    """Paused in the pull, and again in a batch, with the leader killed while it waits: nothing moves
    until `norm resume`; then it finishes, each host moved once."""
    tag = rolling.new_version()
    marks = rolling.log_marks()
    steps_env = rolling.fleet.run_dir / "steps.env"
    steps_env.write_text("NORM_DEMO_TASK_SECONDS=2\n")  # the pre step: time to ask for the pause
    try:
        with rolling.load() as (result, serving):
            revision = updates.set_version(rolling.fleet, tag)
            wait_header(rolling, revision, "the pull", lambda h: h["phase"] in ("pull", "migrate"))
            r = norm_cli(rolling, "pause", "--by", "alice")
            assert r.returncode == 0 and f"pause requested for rollout {revision}" in r.stdout, r.stderr
            first = wait_record(rolling, revision, "paused", lambda rec: rec["pause"] == "paused by alice"
                                and rec["waiting"] in ("pull", "batch"))
            new_leader_took_over(rolling)
            again = wait_record(rolling, revision, "still paused under the new leader",
                                lambda rec: rec["waiting"] == first["waiting"])
            assert again["batch_index"] == first["batch_index"]
            assert sum(rolling.moved_to(tag, marks).values()) == first["batch_index"]  # none since
            assert norm_cli(rolling, "resume", "--by", "bob").returncode == 0
            # Paused again in a batch: the batch finishes, the next waits.
            wait_header(rolling, revision, "a batch moving", lambda h: h["phase"] == "roll")
            assert norm_cli(rolling, "pause", "--by", "carol").returncode == 0
            held = wait_record(rolling, revision, "paused before a batch",
                               lambda rec: rec["waiting"] == "batch" and rec["pause"] == "paused by carol")
            new_leader_took_over(rolling)
            wait_record(rolling, revision, "still paused under the new leader",
                        lambda rec: rec["waiting"] == "batch" and rec["batch_index"] == held["batch_index"])
            assert sum(rolling.moved_to(tag, marks).values()) == held["batch_index"]
            status = norm_cli(rolling, "rollout", "--once")
            assert "paused (paused by carol): waits before its next batch" in status.stdout, status.stdout
            assert norm_cli(rolling, "resume").returncode == 0
            h = updates.wait_phase(rolling.fleet, revision, timeout=240)
            rolling.fleet.wait_registered(timeout=60)
            rolling.all_serve(tag)
    finally:
        steps_env.write_text("")
    assert h["phase"] == "done", h
    assert rolling.moved_to(tag, marks) == dict.fromkeys(rolling.names(), 1)
    record = updates.record(rolling.fleet, revision)
    assert record is not None
    assert [(a["kind"], a["by"]) for a in record["actions"]][:3] == [
        ("pause", "alice"), ("resume", "bob"), ("pause", "carol")]
    assert result.failed == 0, result.failures[:5]
    assert serving.min_serving is not None and serving.min_serving >= HOSTS - 1, serving.history


def test_a_canary_moves_alone_and_the_rest_follow_once_it_is_promoted(rolling: Rolling) -> None:
    canary = dataclasses.replace(POLICY, canary="1", canary_wait=3600.0)
    tag = rolling.new_version()
    marks = rolling.log_marks()
    rolling.set_policy(canary)
    try:
        with rolling.load() as (result, _serving):
            revision = updates.set_version(rolling.fleet, tag)
            waiting = wait_record(rolling, revision, "the canary being analysed",
                                  lambda rec: rec["waiting"] == "canary")
            assert waiting["canary"] == 1 and len(waiting["batches"][0]) == 1
            moved = rolling.moved_to(tag, marks)
            assert sum(moved.values()) == 1, moved  # the canary alone
            r = norm_cli(rolling, "promote", "--by", "alice")
            assert r.returncode == 0, r.stderr
            h = updates.wait_phase(rolling.fleet, revision, timeout=240)
            rolling.all_serve(tag)
    finally:
        rolling.set_policy(POLICY)
    assert h["phase"] == "done", h
    assert rolling.moved_to(tag, marks) == dict.fromkeys(rolling.names(), 1)
    record = updates.record(rolling.fleet, revision)
    assert record is not None and [(a["kind"], a["by"]) for a in record["actions"]] == [("promote", "alice")]
    assert result.failed == 0, result.failures[:5]


def test_norm_undo_goes_back_without_a_step_and_is_refused_across_a_rollback_floor(rolling: Rolling) -> None:
    quick = dataclasses.replace(POLICY, max_unavailable="100%", min_healthy=0.0)
    pre_only = dataclasses.replace(quick, steps=(StepPolicy("migrate", "migrate", "pre"),))
    try:
        rolling.set_policy(pre_only)
        before, after = rolling.new_version(), rolling.new_version()
        first = updates.deploy(rolling.fleet, before, timeout=240)
        assert first["phase"] == "done"
        assert updates.deploy(rolling.fleet, after, timeout=240)["phase"] == "done"
        # Only an expand step ran since: back to `before`, by its digest, running no step.
        r = norm_cli(rolling, "undo", "--by", "alice", "--wait", "--timeout", "240")
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert f"undoing to {before}@" in r.stdout and f"rollout {first['revision']} deployed" in r.stdout
        h = updates.header(rolling.fleet)
        assert h is not None and h["tag"] == before and h["phase"] == "done", h
        assert h["digest"] == first["digest"]
        record = updates.record(rolling.fleet, int(h["revision"]))
        assert record is not None and record["undo"] == first["revision"] and record["by"] == "alice"
        assert record["pinned"] == first["digest"]
        assert not [e for e in updates.ledger(rolling.fleet) if e["revision"] == h["revision"]]
        rolling.all_serve(before)
        # A contract step (`post`) runs with the next release: going back below it is refused, and
        # nothing is written.
        rolling.set_policy(quick)
        floor = rolling.new_version()
        assert updates.deploy(rolling.fleet, floor, timeout=240)["phase"] == "done"
        version = updates.get_kvs(rolling.fleet, "/djed-version")[0]["mod_revision"]
        r = norm_cli(rolling, "undo")
        assert r.returncode == 1 and "rollback floor" in r.stderr and floor in r.stderr, r.stderr
        assert updates.get_kvs(rolling.fleet, "/djed-version")[0]["mod_revision"] == version
        rolling.all_serve(floor)
    finally:
        rolling.set_policy(POLICY)


ERROR_RATE = AnalysisQuery(
    name="error-rate", interval=2.0, count=8, success="result < 0.01", failure_limit=1, inconclusive_limit=4,
    query='sum(rate(djed_http_requests_total{code="500",host=~"$CANARY"}[10s]))'
          ' / sum(rate(djed_http_requests_total{host=~"$CANARY"}[10s]))')


def test_a_canary_serving_errors_fails_its_analysis_and_is_put_back(rolling: Rolling) -> None:
    """The canary's release answers 500 to one request in twenty: its error-rate query fails twice, one
    more than tolerated, and the canary goes back; no other host ever runs the release."""
    policy = dataclasses.replace(POLICY, canary="1", analysis=(ERROR_RATE,))
    h = updates.header(rolling.fleet)
    assert h is not None
    old = h["tag"] if h["phase"] == "done" else h["previous"]["tag"]
    tag = rolling.new_version(DemoOptions(migrations="expand", error_rate=0.05))
    marks = rolling.log_marks()
    rolling.set_policy(policy)
    try:
        with rolling.load("/"):
            revision = updates.set_version(rolling.fleet, tag)
            waiting = wait_record(rolling, revision, "the canary being analysed",
                                  lambda rec: rec["waiting"] == "canary")
            analysed: dict[str, dict[str, Any]] = {}
            ended = updates.wait_phase(rolling.fleet, revision, timeout=240)
            for name in rolling.names():
                for e in rolling.events(name, marks[name]):
                    if e.get("event") in ("rollout.analysing", "rollout.analysed"):
                        analysed[e["event"]] = e
            rolling.all_serve(old)
    finally:
        rolling.set_policy(POLICY)
    assert ended["phase"] == "rolled_back", ended
    assert "failed its analysis" in ended["reason"] and "error-rate" in ended["reason"], ended["reason"]
    canary = waiting["batches"][0]
    assert len(canary) == 1
    moved = rolling.moved_to(tag, marks)
    assert sum(moved.values()) == 1, moved  # the canary alone ever ran the release
    started, decided = (log_time(analysed[k]) for k in ("rollout.analysing", "rollout.analysed"))
    # Two failures at most 2 s apart decide it; the first data may take a few intervals to come (the
    # canary's counters start at its start, and a 10 s rate needs two scrapes): well within a minute.
    assert decided - started < 60, decided - started


def log_time(entry: dict[str, Any]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(str(entry["timestamp"]).replace("Z", "+00:00")).timestamp()


def test_an_analysis_without_data_pauses_and_goes_on_once_resumed_with_data(rolling: Rolling) -> None:
    ready = AnalysisQuery(name="ready", query='count(up{host=~"$CANARY",ready="yes"})', interval=1.0, count=2,
                          success="result == 1")
    policy = dataclasses.replace(POLICY, canary="1", analysis=(ready,))
    tag = rolling.new_version()
    marks = rolling.log_marks()
    plain = {t: {"host": labels["host"]} for t, labels in rolling.prometheus_targets().items()}
    rolling.set_policy(policy)
    try:
        revision = updates.set_version(rolling.fleet, tag)
        paused = wait_record(rolling, revision, "paused: no data", lambda rec: rec["pause"] is not None)
        assert paused["waiting"] == "canary" and "inconclusive" in paused["pause"], paused["pause"]
        assert sum(rolling.moved_to(tag, marks).values()) == 1
        # The data appears; the operator resumes: the analysis runs again, passes, the rest follow.
        rolling.prometheus.set_targets(list(plain),
                                       {t: {**labels, "ready": "yes"} for t, labels in plain.items()})
        wait_for(lambda: bool(rolling.prometheus.query('up{ready="yes"}')), timeout=60,
                 what="the ready series in Prometheus", interval=0.2)
        assert norm_cli(rolling, "resume", "--by", "alice").returncode == 0
        h = updates.wait_phase(rolling.fleet, revision, timeout=240)
        rolling.all_serve(tag)
    finally:
        rolling.set_policy(POLICY)
        rolling.prometheus.set_targets(list(plain), plain)
    assert h["phase"] == "done", h
    assert rolling.moved_to(tag, marks) == dict.fromkeys(rolling.names(), 1)


def test_a_rollouts_events_reach_the_webhook_once_each_even_from_a_receiver_that_was_down(
        rolling: Rolling, webhook_receiver: WebhookReceiver) -> None:
    """The leader posts each event of a real rollout to the fleet's webhook, from the outbox; a leader
    killed on the way and a receiver down meanwhile lose none, and none comes twice."""
    url_file = rolling.fleet.run_dir / "webhook.url"
    url_file.write_text(webhook_receiver.url)
    policy = dataclasses.replace(POLICY, webhooks=(Webhook("ops", str(url_file)),))
    tag = rolling.new_version()
    rolling.set_policy(policy)
    try:
        webhook_receiver.stop()
        revision = updates.set_version(rolling.fleet, tag)
        wait_header(rolling, revision, "a batch moving", lambda h: h["phase"] == "roll")
        new_leader_took_over(rolling)
        webhook_receiver.start()
        h = updates.wait_phase(rolling.fleet, revision, timeout=240)
        assert h["phase"] == "done", h

        def events() -> list[tuple[str, str | None]]:
            return [(r["body"]["event"], r["body"].get("phase")) for r in webhook_receiver.received()
                    if r["body"].get("rollout") == revision]

        wait_for(lambda: ("done", "done") in events(), timeout=60, what="the done event delivered",
                 interval=0.1)
        rolling.all_serve(tag)
    finally:
        rolling.set_policy(POLICY)
    keys = [r["idempotency_key"] for r in webhook_receiver.received()]
    assert len(keys) == len(set(keys)), "an event came twice"
    got = events()
    assert got[0] == ("rollout_started", "resolve"), got
    assert ("phase_changed", "pull") in got and ("phase_changed", "roll") in got, got
    assert got[-1] == ("done", "done"), got


FAILOVERS = 50
KILL_EVERY = 10  # of the forced failovers, every tenth kills the leader's agent; the rest delete its key


class Failovers:
    """A thread forcing leader failovers, one after another, until `count` are done: the leader key
    deleted (as an operator would), or the leading agent killed (-9) and started again; each waits for
    another leadership (a new leader key) and gives the new leader `spell` seconds before the next."""

    def __init__(self, rolling: Rolling, count: int, spell: float = 0.7) -> None:
        import threading

        self.rolling, self.count, self.spell = rolling, count, spell
        self.done = 0
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="failovers", daemon=True)

    def __enter__(self) -> Failovers:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def _key(self) -> int | None:
        kvs = updates.get_kvs(self.rolling.fleet, "/norm/leader")
        return kvs[0]["create_revision"] if kvs else None

    def _run(self) -> None:
        try:
            while self.done < self.count and not self._stop.is_set():
                wait_for(lambda: self._key() is not None, timeout=60, what="a leader", interval=0.05)
                before = self._key()
                if (self.done + 1) % KILL_EVERY == 0:
                    name = leader(self.rolling)
                    self.rolling.fleet.kill_agent(name)
                    self.rolling.fleet.restart_agent(name)
                else:
                    self.rolling.fleet.etcdctl("del", "/norm/leader")
                wait_for(lambda before=before: self._key() not in (None, before), timeout=60,
                         what="another leadership", interval=0.05)
                self.done += 1
                self._stop.wait(self.spell)  # the pace of the faults, not a wait on anything
        except BaseException as e:
            self.error = e
        finally:
            self.finished.set()


def test_fifty_forced_leader_failovers_lose_no_webhook_event_and_make_none_twice(
        rolling: Rolling, webhook_receiver: WebhookReceiver) -> None:
    """Rollouts one after another while the leadership is forced to move 50 times: every notice the
    leaders made reaches the receiver, each with one Idempotency-Key however often it was sent, and no
    event is made twice (a new leader finds the notices in the outbox, it does not make them again)."""
    from sandbox.chaos.observe import Recorder

    url_file = rolling.fleet.run_dir / "webhook.url"
    url_file.write_text(webhook_receiver.url)
    start = updates.put(rolling.fleet, "/norm/policy", dataclasses.replace(
        POLICY, webhooks=(Webhook("ops", str(url_file)),)).encode().decode())
    recorder = Recorder(rolling.state["endpoints"], start + 1, rolling.fleet.run_dir / "failovers.log")
    recorder.start()
    revisions: list[int] = []
    try:
        with Failovers(rolling, FAILOVERS) as failovers:
            while not failovers.finished.is_set():
                revisions.append(updates.set_version(rolling.fleet, tag := rolling.new_version()))
                h = updates.wait_phase(rolling.fleet, revisions[-1], timeout=300)
                assert h["phase"] == "done", h
            assert failovers.error is None, failovers.error
            assert failovers.done == FAILOVERS
        rolling.all_serve(tag)
        wait_for(lambda: not updates.get_kvs(rolling.fleet, "/norm/outbox/", prefix=True), timeout=120,
                 what="every outbox entry delivered and gone", interval=0.2)
        made: dict[str, dict[str, Any]] = {}
        for e in list(recorder.events):
            if e.key.startswith("/norm/outbox/") and e.kind == "put" and e.create_revision == e.revision:
                notice = json.loads(e.value)["notice"]
                made[notice["id"]] = notice
    finally:
        recorder.stop()
        rolling.set_policy(POLICY)
    received = [r for r in webhook_receiver.received() if r["body"].get("rollout") in revisions]
    taken = [r for r in received if not r["repeat"]]
    mine = {k: n for k, n in made.items() if n.get("rollout") in revisions}
    # Every notice made was taken, once; nothing was taken that was not made.
    assert sorted(r["idempotency_key"] for r in taken) == sorted(mine), (len(taken), len(mine))
    # No event made twice, none missing: each rollout's events are those of a rolling update, in order.
    rolling_update = [("rollout_started", "resolve"), ("phase_changed", "pull"), ("phase_changed", "migrate"),
                      ("phase_changed", "roll"), ("phase_changed", "migrate"), ("phase_changed", "done"),
                      ("done", "done")]
    for revision in revisions:
        got = [(r["body"]["event"], r["body"].get("phase")) for r in taken
               if r["body"]["rollout"] == revision]
        assert got == rolling_update, (revision, got)
    repeats = len(received) - len(taken)
    print(f"{FAILOVERS} failovers over {len(revisions)} rollouts: {len(taken)} events taken, "
          f"{repeats} repeated POSTs (same Idempotency-Key)")


def test_a_window_closing_mid_rollout_holds_it_at_a_boundary_until_the_next_opens(rolling: Rolling) -> None:
    import time
    from datetime import UTC, datetime

    def clock(t: float) -> str:
        return datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S")

    def day_seconds() -> int:
        now = datetime.now(UTC)
        return now.hour * 3600 + now.minute * 60 + now.second

    # Windows are times of day: not across midnight.
    wait_for(lambda: day_seconds() < 86400 - 900, timeout=1000, what="a time of day not near midnight")
    start = time.time()
    first = (start - 5, start + 12)  # open now, closing a few seconds into the batches
    second = (start + 40, start + 700)  # the next, opening half a minute later
    windows = tuple(f"* {clock(a)}-{clock(b)}" for a, b in (first, second))
    # Each host healthy for 5 s before the next moves: the four batches outlast the first window.
    policy = dataclasses.replace(POLICY, windows=windows, min_healthy=5.0)
    tag = rolling.new_version()
    marks = rolling.log_marks()
    rolling.set_policy(policy)
    try:
        with rolling.load() as (result, serving):
            revision = updates.set_version(rolling.fleet, tag)
            held = wait_record(rolling, revision, "held outside the windows",
                               lambda rec: rec["blocked"] is not None and rec["waiting"] is not None)
            assert held["blocked"].startswith("outside the maintenance windows; the next opens at "), held
            assert time.time() < second[0], "held only once the first window had closed, before the next"
            moved = sum(rolling.moved_to(tag, marks).values())
            h = updates.wait_phase(rolling.fleet, revision, timeout=300)
            assert time.time() >= second[0]
            rolling.all_serve(tag)
    finally:
        rolling.set_policy(POLICY)
    assert h["phase"] == "done", h
    assert moved < HOSTS, "it held before every host had moved"
    assert rolling.moved_to(tag, marks) == dict.fromkeys(rolling.names(), 1)  # none twice
    assert result.failed == 0, result.failures[:5]
    assert serving.min_serving is not None and serving.min_serving >= HOSTS - 1, serving.history


def test_norm_plan_says_what_a_rollout_would_do_and_changes_nothing(rolling: Rolling) -> None:
    tag = rolling.new_version()
    version = updates.get_kvs(rolling.fleet, "/djed-version")[0]["mod_revision"]
    r = norm_cli(rolling, "plan", tag)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert r.stdout.splitlines()[0] == f"plan for {tag} (nothing changed)"
    assert "  image:     sha256:" in r.stdout
    assert "  step:      migrate (pre): would run once" in r.stdout
    assert f"  hosts:     {HOSTS} (" in r.stdout
    same = norm_cli(rolling, "deploy", tag, "--dry-run", "--json")
    assert same.returncode == 0 and json.loads(same.stdout)["tag"] == tag
    assert json.loads(same.stdout)["steps"][0] == {"name": "migrate", "when": "pre", "command": "migrate",
                                                   "state": "would run once"}
    assert updates.get_kvs(rolling.fleet, "/djed-version")[0]["mod_revision"] == version  # nothing written
    # What the fleet runs already: the rollout would end at once.
    h = updates.header(rolling.fleet)
    assert h is not None and h["phase"] == "done"
    r = norm_cli(rolling, "plan", h["tag"])
    assert r.returncode == 1 and "the release already running" in r.stdout, r.stdout
    assert "in the ledger already: not run again" in r.stdout


def test_every_dashboard_query_returns_data_from_a_prometheus_scraping_the_fleet(rolling: Rolling) -> None:
    """Last in this module: after its rollouts, canaries, rollbacks and leader changes, each query of the
    shipped Grafana dashboard, asked of the real Prometheus that scraped the fleet's agents (job
    "norm"), returns data; Grafana's own variables stand for the test's time range. And Prometheus
    loaded the shipped rules, each evaluated without error on the fleet's series."""
    dashboard = json.loads((DEPLOY / "grafana" / "norm-dashboard.json").read_text())
    exprs = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    for h in rolling.state["hosts"]:
        rolling.prometheus.wait_scraped(h["http_listen"], timeout=60)
    def empty() -> list[str]:  # (a counter's increase needs two scrapes of it: a second or two)
        return [f"{title}: {expr}" for title, expr in exprs if not rolling.prometheus.query(
            expr.replace("$__rate_interval", "10m").replace("$__range", "30m"))]

    missing: list[list[str]] = [[]]

    def answered() -> bool:
        missing[0] = empty()
        return not missing[0]

    try:
        wait_for(answered, timeout=60, what="every panel's query answered with data", interval=1.0)
    except SandboxError:
        raise AssertionError("panels without data:\n" + "\n".join(missing[0])) from None
    groups = rolling.prometheus.rules()
    assert {g["name"] for g in groups} == {"norm.records", "norm.alerts"}
    assert all(r["health"] == "ok" for g in groups for r in g["rules"]), groups
