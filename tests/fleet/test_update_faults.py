"""Fleet updates under the failures a real fleet sees: the leader killed or frozen, a newer version
mid-rollout, hostile values, the registry or a host's Docker engine going away, an agent dying, etcd
compacted while an agent is down. A host's Docker engine frozen (SIGSTOP) holds the rollout in PULL
for as long as a test needs: its pull cannot finish until the engine is thawed."""

from __future__ import annotations

import signal
import time

import pytest

from sandbox import updates
from sandbox.procs import wait_for
from tests.fleet.conftest import UpdateFleet, log_time
from tests.fleet.invariants import check_invariants


def _other(fleet: UpdateFleet, *not_these: str | None) -> str:
    return next(n for n in fleet.names() if n not in not_these)


def test_leader_killed_during_pull_a_new_leader_resumes(fleet: UpdateFleet) -> None:
    tag = fleet.new_version()
    leader = fleet.wait_leader()
    slow = _other(fleet, leader)
    with fleet.frozen_engine(slow):
        revision = updates.set_version(fleet.fleet, tag)
        updates.wait_phase(fleet.fleet, revision, ("pull",), timeout=30)
        killed_at = log_time()
        fleet.fleet.kill_agent(leader, signal.SIGKILL)
        successor = fleet.wait_leader(other_than=leader)
        # The successor resumes from the record: the dead leader's host leaves the barrier (its lease
        # expired) while the frozen host holds it.
        wait_for(lambda: leader_name_excluded(fleet, revision, leader), timeout=30,
                 what="the dead leader's host excluded", interval=0.05)
        assert updates.header(fleet.fleet)["phase"] == "pull"  # type: ignore[index]
    h = updates.wait_phase(fleet.fleet, revision, timeout=120)
    assert h["phase"] == "done", h
    fleet.wait_event(successor, "updater.leading", where=lambda e: e["timestamp"] > killed_at)
    fleet.fleet.restart_agent(leader)
    record = check_invariants(fleet, revision, tag)
    assert [(e["host"], e["reason"], e["phase"]) for e in record["excluded"]] == [
        (fleet.state_machine_id(leader), "lost", "pull")]


def leader_name_excluded(fleet: UpdateFleet, revision: int, name: str) -> bool:
    h = updates.header(fleet.fleet)
    return h is not None and fleet.state_machine_id(name) in h.get("excluded", [])


def test_leader_killed_right_after_migrate_started_the_step_runs_once(fleet: UpdateFleet) -> None:
    tag = fleet.new_version()
    fleet.steps_env.write_text("NORM_DEMO_TASK_SECONDS=3\n")  # the step is running when the kill lands
    revision = updates.set_version(fleet.fleet, tag)
    h = updates.wait_phase(fleet.fleet, revision, ("migrate",), timeout=60)
    wait_for(lambda: (updates.header(fleet.fleet) or {}).get("migrating") == "migrate", timeout=30,
             what="the first step started", interval=0.02)
    migrator = fleet.name_of(updates.header(fleet.fleet)["migrator"])  # type: ignore[index]
    assert migrator == fleet.leader()
    fleet.fleet.kill_agent(migrator, signal.SIGKILL)
    # Another agent leads; it cannot know whether the step ran, so it waits for the step's outcome,
    # which only the migrator can read from its engine: its agent comes back, as systemd restarts it.
    fleet.wait_leader(other_than=migrator)
    fleet.fleet.restart_agent(migrator)
    h = updates.wait_phase(fleet.fleet, revision, timeout=120)
    assert h["phase"] == "done", h
    assert fleet.steps_of(tag) == ["migrate", "collectstatic"]
    check_invariants(fleet, revision, tag)


def _rollout_keys(fleet: UpdateFleet) -> dict[str, int]:
    """{key: mod revision} of every rollout key: header, records, participant lists, the hosts'
    reports, ledger and history (not registrations or unit summaries)."""
    return {kv["key"]: kv["mod_revision"] for kv in updates.get_kvs(fleet.fleet, "/norm/", prefix=True)
            if kv["key"].startswith(("/norm/rollout", "/norm/ledger/", "/norm/history/"))}


def test_frozen_leader_beyond_its_lease_writes_nothing_when_it_wakes(fleet: UpdateFleet) -> None:
    tag = fleet.new_version()
    leader = fleet.wait_leader()
    slow = _other(fleet, leader)
    pid = fleet.fleet.agent_pid(leader)
    assert pid is not None
    with fleet.frozen_engine(slow):
        revision = updates.set_version(fleet.fleet, tag)
        updates.wait_phase(fleet.fleet, revision, ("pull",), timeout=30)
        fleet.fleet.kill_agent(leader, signal.SIGSTOP)
        try:
            fleet.wait_leader(other_than=leader)
        except BaseException:
            fleet.fleet.kill_agent(leader, signal.SIGCONT)
            raise
    try:
        h = updates.wait_phase(fleet.fleet, revision, timeout=120)
        assert h["phase"] == "done", h
        # The new leader trims the earlier rollouts' keys just after it wrote the outcome.
        wait_for(lambda: all(k.startswith(f"/norm/rollouts/{revision}/") for k in _rollout_keys(fleet)
                             if k.startswith("/norm/rollouts/")),
                 timeout=30, what="the earlier rollouts trimmed", interval=0.05)
        written = _rollout_keys(fleet)
    finally:
        woke_at = log_time()
        fleet.fleet.kill_agent(leader, signal.SIGCONT)
    # Awake, it finds its leadership gone (its lease expired while it slept) and stands down; the
    # pull its host finished meanwhile is not reported either: that rollout moved on without it.
    fleet.wait_event(leader, ("leader.lost", "updater.not_leader"), timeout=30,
                     where=lambda e: e["timestamp"] > woke_at)
    fleet.fleet.wait_registered(timeout=30)
    assert _rollout_keys(fleet) == written
    check_invariants(fleet, revision, tag)


def test_a_newer_version_during_pull_supersedes_the_rollout(fleet: UpdateFleet) -> None:
    older, newer = fleet.new_version(), fleet.new_version()
    slow = _other(fleet, fleet.wait_leader())
    with fleet.frozen_engine(slow):
        first = updates.set_version(fleet.fleet, older)
        updates.wait_phase(fleet.fleet, first, ("pull",), timeout=30)
        second = updates.set_version(fleet.fleet, newer)
        wait_for(lambda: (updates.record(fleet.fleet, first) or {}).get("phase") == "superseded",
                 timeout=30, what="the older rollout superseded", interval=0.05)
    h = updates.wait_phase(fleet.fleet, second, timeout=120)
    assert h["phase"] == "done", h
    check_invariants(fleet, second, newer)
    older_reports = updates.reports(fleet.fleet, first)
    assert "stopped" not in older_reports and "started" not in older_reports
    assert fleet.steps_of(older) == []


@pytest.mark.parametrize("value", ["x;reboot", "", "v" * (1 << 20), "t1\n", "vé", "no-such-tag"],
                         ids=["shell", "empty", "1MB", "newline", "non-ascii", "unknown-tag"])
def test_a_bad_version_fails_fast_is_counted_and_stops_nothing(fleet: UpdateFleet, value: str) -> None:
    leader = fleet.wait_leader()
    before = fleet.invocations()
    running = updates.header(fleet.fleet)["tag"]  # type: ignore[index]
    sample = 'norm_rollouts_total{outcome="failed"}'
    failed_before = fleet.metric(leader, sample)
    refused = 'norm_rejected_values_total{key="/djed-version"}'
    refused_before = fleet.metric(leader, refused)
    began = time.monotonic()
    revision = updates.set_version(fleet.fleet, value)
    h = updates.wait_phase(fleet.fleet, revision, timeout=30)
    took = time.monotonic() - began
    assert h["phase"] == "failed" and h["reason"], h
    assert took < 10, took
    if value == "no-such-tag":
        assert "no-such-tag" in h["reason"]
    else:
        assert value not in h["reason"] or value == ""  # refused, not quoted back
        fleet.wait_metric(leader, refused, lambda v: v > refused_before)
    assert fleet.wait_metric(leader, sample, lambda v: v >= failed_before + 1) == failed_before + 1
    assert fleet.invocations() == before
    fleet.serving(running)
    assert "pulled" not in updates.reports(fleet.fleet, revision)
    # The fleet still runs its release; setting it again is a no-op.
    again = updates.set_version(fleet.fleet, running)
    assert updates.wait_phase(fleet.fleet, again, timeout=30)["phase"] == "done"
    assert fleet.invocations() == before


def test_the_registry_going_away_during_pull_is_retried(fleet: UpdateFleet) -> None:
    tag = fleet.new_version()
    slow = _other(fleet, fleet.wait_leader())
    machine = fleet.state_machine_id(slow)
    with fleet.frozen_engine(slow):
        revision = updates.set_version(fleet.fleet, tag)
        updates.wait_phase(fleet.fleet, revision, ("pull",), timeout=30)
        fleet.registry.stop()
    try:
        # Thawed with the registry gone: its pull fails, is reported as temporary, and retried.
        wait_for(lambda: any(r["name"] == machine and r["value"].get("error")
                             for r in updates.reports(fleet.fleet, revision).get("pulled", [])),
                 timeout=60, what="the failed pull reported", interval=0.1)
        assert updates.header(fleet.fleet)["phase"] == "pull"  # type: ignore[index]
    finally:
        fleet.registry.start()
    h = updates.wait_phase(fleet.fleet, revision, timeout=120)
    assert h["phase"] == "done", h
    check_invariants(fleet, revision, tag)


def test_a_docker_engine_restart_during_pull(fleet: UpdateFleet) -> None:
    tag = fleet.new_version()
    slow = _other(fleet, fleet.wait_leader())
    with fleet.frozen_engine(slow):
        revision = updates.set_version(fleet.fleet, tag)
        updates.wait_phase(fleet.fleet, revision, ("pull",), timeout=30)
        # Dies with the pull asked of it unanswered, and a new daemon starts on the same state (its
        # containers, the application's among them, are cleaned up: the healer brings them back).
        fleet.fleet.restart_engine(slow, crash=True)
    h = updates.wait_phase(fleet.fleet, revision, timeout=120)
    assert h["phase"] == "done", h
    record = check_invariants(fleet, revision, tag)
    assert record["excluded"] == []


def test_an_agent_dying_during_pull_is_excluded_within_its_lease(fleet: UpdateFleet) -> None:
    tag = fleet.new_version()
    victim = _other(fleet, fleet.wait_leader())
    ttl = 4.0  # NORM_ETCD__LEASE_TTL of the fleet's agents
    with fleet.frozen_engine(victim):
        revision = updates.set_version(fleet.fleet, tag)
        updates.wait_phase(fleet.fleet, revision, ("pull",), timeout=30)
        killed = time.monotonic()
        fleet.fleet.kill_agent(victim, signal.SIGKILL)
        wait_for(lambda: leader_name_excluded(fleet, revision, victim), timeout=ttl + 10,
                 what="the dead host excluded", interval=0.05)
        excluded_after = time.monotonic() - killed
    assert excluded_after <= ttl + 2, excluded_after
    h = updates.wait_phase(fleet.fleet, revision, timeout=120)
    assert h["phase"] == "done", h
    fleet.fleet.restart_agent(victim)  # it catches up on the release it missed
    check_invariants(fleet, revision, tag)


def test_etcd_compacted_while_an_agent_is_down_it_converges(fleet: UpdateFleet) -> None:
    tag = fleet.new_version()
    sleeper = _other(fleet, fleet.wait_leader())
    fleet.fleet.kill_agent(sleeper, signal.SIGSTOP)
    try:
        wait_for(lambda: fleet.state_machine_id(sleeper) not in
                 {kv["key"].rsplit("/", 1)[1] for kv in updates.get_kvs(fleet.fleet, "/norm/hosts/", True)},
                 timeout=30, what="the sleeping agent's registration gone", interval=0.1)
        revision = updates.set_version(fleet.fleet, tag)
        h = updates.wait_phase(fleet.fleet, revision, timeout=120)
        assert h["phase"] == "done", h
        current = updates.put(fleet.fleet, "/norm-test/compact-marker", "x")
        fleet.fleet.etcdctl("compact", str(current))
    finally:
        fleet.fleet.kill_agent(sleeper, signal.SIGCONT)
    fleet.serving(tag, timeout=120)
    fleet.wait_event(sleeper, "executor.caught_up", where=lambda e: e["release"].startswith(f"{tag}@"))
    check_invariants(fleet, revision, tag)


def test_a_failed_migration_halts_and_restarts_the_old_release(fleet: UpdateFleet) -> None:
    running = updates.header(fleet.fleet)["tag"]  # type: ignore[index]
    tag = fleet.new_version()
    fleet.steps_env.write_text("NORM_DEMO_TASK_FAIL=1\n")
    revision = updates.set_version(fleet.fleet, tag)
    h = updates.wait_phase(fleet.fleet, revision, timeout=120)
    assert h["phase"] == "failed" and "step migrate failed" in h["reason"], h
    fleet.serving(running)  # every host back on the release it ran
    assert fleet.steps_of(tag) == []  # the failing step records nothing; the next one never ran
    entries = [(e["step"], e["ok"]) for e in updates.ledger(fleet.fleet) if e["revision"] == revision]
    assert entries == [("migrate", False)]
    started = updates.reports(fleet.fleet, revision).get("started", [])
    assert len(started) == 3 and all(r["value"]["ok"] for r in started)
    assert {r["value"]["digest"] for r in started} == {h["previous"]["digest"]}


def test_setting_back_a_migrated_version_halts_without_touching_the_fleet(fleet: UpdateFleet) -> None:
    older, newer = fleet.new_version(), fleet.new_version()
    for tag in (older, newer):
        assert updates.deploy(fleet.fleet, tag)["phase"] == "done"
    before = fleet.invocations()
    revision = updates.set_version(fleet.fleet, older)
    h = updates.wait_phase(fleet.fleet, revision, timeout=30)
    assert h["phase"] == "halted" and "no down-migrations" in h["reason"], h
    assert fleet.invocations() == before
    fleet.serving(newer)
    assert fleet.steps_of(older) == ["migrate", "collectstatic"]  # from its own rollout, not again


def test_a_host_joining_mid_rollout_gets_the_release_after_it(fleet: UpdateFleet) -> None:
    tag = fleet.new_version()
    leader = fleet.wait_leader()
    late = _other(fleet, leader)
    slow = _other(fleet, leader, late)
    fleet.fleet.kill_agent(late, signal.SIGTERM)  # deregisters: not a participant of the next rollout
    with fleet.frozen_engine(slow):
        revision = updates.set_version(fleet.fleet, tag)
        updates.wait_phase(fleet.fleet, revision, ("pull",), timeout=30)
        late_id = fleet.state_machine_id(late)
        assert late_id not in updates.record(fleet.fleet, revision)["hosts"]  # type: ignore[index]
        fleet.fleet.restart_agent(late)
        fleet.fleet.wait_registered(timeout=30)
        before = {k: v for k, v in fleet.invocations().items() if k.startswith(late + "/")}
        assert updates.header(fleet.fleet)["phase"] == "pull"  # type: ignore[index]
    h = updates.wait_phase(fleet.fleet, revision, timeout=120)
    assert h["phase"] == "done", h
    check_invariants(fleet, revision, tag)  # the late host serves it too, after the rollout
    after = {k: v for k, v in fleet.invocations().items() if k.startswith(late + "/")}
    assert after != before
    caught = fleet.wait_event(late, "executor.caught_up", where=lambda e: e["release"].startswith(f"{tag}@"))
    started = fleet.wait_event(leader, "rollout.phase",
                               where=lambda e: e.get("rollout") == revision and e.get("phase") == "done")
    assert caught and started and caught[-1]["timestamp"] >= started[-1]["timestamp"]


def test_no_rollout_starts_without_an_operator_write(fleet: UpdateFleet) -> None:
    """A failed rollout stays failed through agent restarts and a change of leader: every new watcher
    lists the version key again, and must know it by the revision the operator wrote it at."""
    revision = updates.set_version(fleet.fleet, "never-pushed")
    h = updates.wait_phase(fleet.fleet, revision, timeout=60)
    assert h["phase"] == "failed", h
    steps = fleet.record_lines()
    for name in fleet.names():  # one by one, as systemd would restart them
        fleet.fleet.kill_agent(name, signal.SIGKILL)
        fleet.fleet.restart_agent(name)
        fleet.fleet.wait_registered(timeout=60)
    leader = fleet.wait_leader()
    killed_at = log_time()
    fleet.fleet.kill_agent(leader, signal.SIGKILL)
    successor = fleet.wait_leader(other_than=leader)
    # The successor weighs the desired version it listed: known, or (wrongly) new.
    seen = fleet.wait_event(successor, ("updater.desired_known", "rollout.begin"), timeout=30,
                            where=lambda e: e["timestamp"] > killed_at)
    assert [e["event"] for e in seen] == ["updater.desired_known"], seen
    assert seen[0]["revision"] == revision
    fleet.fleet.restart_agent(leader)
    fleet.fleet.wait_registered(timeout=60)
    assert updates.header(fleet.fleet)["revision"] == revision  # type: ignore[index]
    assert max(r["revision"] for r in updates.history(fleet.fleet)) == revision  # no rollout since
    assert fleet.record_lines() == steps  # no step ran
