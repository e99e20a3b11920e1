"""A fixed slice of the seeded fault campaign (`make chaos`): two seeds whose schedules mix operator
actions (new versions, flips, set-backs, aborts, unknown tags, holds) with faults (agents killed or
frozen, the leader among them; a Docker engine crashing during a pull or a step; etcd members lost,
quorum lost, compaction; the registry away; a systemd manager restarted; the leader key deleted), on
a fleet of its own: 3-member etcd, 3 hosts each with its systemd manager, Docker engine and agent.
After each run every invariant is checked from the run's whole etcd history, the steps' record, the
agents' logs and every engine's containers (sandbox.chaos.check). A failure prints the seed, what
happened, and the command that replays it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.chaos import check
from sandbox.chaos.campaign import Campaign
from sandbox.chaos.observe import Event, log_size, read_log_events
from sandbox.chaos.schedule import make_schedule
from sandbox.docker import DockerEngine
from sandbox.registry import Registry
from tests.fleet.conftest import UpdateFleet
from tests.fleet.invariants import check_invariants

SEEDS = (230, 781)  # between them: member isolation, clock skew, freeze, kills, a dockerd crash, the leader
# key deleted, a step's container gone, compaction, flips, a flip-back, an unknown tag


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory, registry: Registry,
             image_engine: DockerEngine) -> Iterator[Campaign]:
    c = Campaign(tmp_path_factory.mktemp("chaos"), registry, image_engine, say=lambda _: None)
    try:
        c.setup()
        yield c
    finally:
        c.close()


def test_a_seed_gives_one_schedule() -> None:
    assert make_schedule(1234) == make_schedule(1234)
    assert make_schedule(1234) != make_schedule(1235)
    s = make_schedule(SEEDS[0])
    assert s.steps[0].kind == "version" and s.faults >= 3 and s.operator_actions >= 2


@pytest.mark.parametrize("seed", SEEDS)
def test_a_seeded_run_keeps_every_invariant(campaign: Campaign, seed: int) -> None:
    result = campaign.run(seed)
    assert result.ok, result.report()
    assert result.summary and any(n.operator is False for n in result.notes), result.report()
    # The last rollout, when it brought a new version, also passes the fleet tests' own checks.
    h = result.final
    if h.get("phase") == "done" and str(h.get("tag")).startswith(f"s{seed}x"):
        uf = UpdateFleet(campaign.fleet, campaign.registry, lambda *_: "", campaign.ports)
        check_invariants(uf, int(h["revision"]), str(h["tag"]))


def _put(rev: int, key: str, value: str, create: int | None = None, at: float = 0.0) -> Event:
    return Event(rev, "put", key, value.encode(), create or rev, 0, None, at)


def _obs(events: list[Event], **kw: object) -> check.Observations:
    base: dict[str, object] = dict(
        seed=1, start_revision=10, snapshot=[], events=events, gaps=[], version_writes=set(), notes=[],
        logs={}, raw_logs={}, record_lines=[], samples=[], finals={},
        by_machine={"m1": "host1", "m2": "host2"},
        secret="s3cret", compatible={"c0"}, migrated_before=set(), image_tags={}, digests={}, frozen={},
        killed={},        lease_ttl=4.0, converged="", ended_faults=0.0)
    base.update(kw)
    return check.Observations(**base)  # type: ignore[arg-type]


def test_the_checker_sees_a_rollout_no_operator_asked_for() -> None:
    events = [_put(10, "/djed-version", "v1"),
              _put(11, "/norm/leader", "m1"),
              _put(12, "/norm/rollout", '{"revision": 10, "tag": "v1", "phase": "resolve"}'),
              _put(13, "/norm/rollout", '{"revision": 12, "tag": "v1", "phase": "resolve"}')]
    found = check.check_desired_state(_obs(events))
    assert len(found) == 1 and "rollout 12" in found[0], found


def test_the_checker_sees_a_step_run_twice_and_steps_overlapping() -> None:
    lines = ["v1 migrate 2026-01-01T00:00:00Z 10.00 12.00",
             "v1 collectstatic 2026-01-01T00:00:01Z 11.50 13.0",
             "v1 migrate 2026-01-01T00:00:02Z 14.00 15.00"]
    found = check.check_migrations(_obs([], record_lines=lines))
    assert any("ran 2 times" in f for f in found) and any("overlapped" in f for f in found), found
    # A run killed before its end shows in began.log only.
    found = check.check_migrations(_obs([], record_lines=lines[1:], began_lines=["v1 migrate 10.00",
                                                                                 "v1 migrate 14.00"]))
    assert any("began 2 times" in f for f in found), found


def test_the_checker_takes_a_migrator_other_than_the_leader_only_when_the_leader_had_not_pulled() -> None:
    header = '{"revision": 20, "tag": "v1", "phase": "migrate", "migrating": "migrate", "migrator": "m2"}'
    pulls = [_put(21, "/norm/rollouts/20/pulled/m2", '{"digest": "sha256:aa"}')]
    leader_pulled = [_put(22, "/norm/rollouts/20/pulled/m1", '{"digest": "sha256:aa"}')]
    events = [_put(10, "/norm/leader", "m1"), *pulls, _put(30, "/norm/rollout", header)]
    assert check.check_fenced(_obs(events)) == []
    events = [_put(10, "/norm/leader", "m1"), *pulls, *leader_pulled, _put(30, "/norm/rollout", header)]
    found = check.check_fenced(_obs(events))
    assert len(found) == 1 and "issued for migrator host2 while host1 led" in found[0], found


def test_the_checker_reads_reports_in_the_hosts_ranges_and_in_the_previous_layout() -> None:
    m1, m2 = "1" * 32, "2" * 32
    header = json.dumps({"revision": 20, "tag": "v1", "phase": "migrate", "migrating": "migrate",
                         "migrator": m2, "digest": "sha256:aa"})
    pulls = [_put(21, f"/norm/reports/{m2}/000000000020/pulled", '{"digest": "sha256:aa"}')]
    leader_pulled = [_put(22, f"/norm/reports/{m1}/000000000020/pulled", '{"digest": "sha256:aa"}')]
    names = {m1: "host1", m2: "host2"}
    events = [_put(10, "/norm/leader", m1), *pulls, _put(30, "/norm/rollout", header)]
    assert check.check_fenced(_obs(events, by_machine=names)) == []
    events = [_put(10, "/norm/leader", m1), *pulls, *leader_pulled, _put(30, "/norm/rollout", header)]
    found = check.check_fenced(_obs(events, by_machine=names))
    assert len(found) == 1 and "issued for migrator host2 while host1 led" in found[0], found
    # A start before every participant pulled: m1 in its own range, m2 in the previous layout.
    start = [_put(12, "/norm/rollout", header), _put(13, "/norm/rollouts/20/hosts", f'["{m1}", "{m2}"]'),
             _put(14, f"/norm/reports/{m1}/000000000020/pulled", '{"digest": "sha256:aa"}'),
             _put(15, f"/norm/reports/{m1}/000000000020/started", '{"digest": "sha256:aa", "ok": true}')]
    found = check.check_pulled_before_run(_obs(start, by_machine=names))
    assert len(found) == 1 and "host2 had pulled it" in found[0], found
    legacy = [_put(14, f"/norm/rollouts/20/pulled/{m2}", '{"digest": "sha256:aa"}')]
    assert check.check_pulled_before_run(_obs(start[:2] + legacy + start[2:], by_machine=names)) == []
    assert check.any_stopped([_put(16, f"/norm/reports/{m1}/000000000020/stopped", "{}")], 20)
    assert check.any_stopped([_put(16, f"/norm/rollouts/20/stopped/{m1}", "{}")], 20)
    assert not check.any_stopped([_put(16, f"/norm/reports/{m1}/000000000019/stopped", "{}")], 20)


def test_the_log_of_an_agent_started_with_a_skewed_clock_is_put_back_on_the_machine_s_clock(
        tmp_path: Path) -> None:
    log = tmp_path / "agent.log"

    def entry(event: str, at: str, pid: int | None = None) -> str:
        return json.dumps({"event": event, "timestamp": f"2026-01-01T{at}Z",
                           **({"pid": pid} if pid is not None else {})}) + "\n"

    log.write_text(entry("agent.starting", "10:00:00", 100) + entry("leader.elected", "10:00:01"))
    size = log_size(log)  # then started again, 600 s behind; then again on the machine's clock,
    # at a time that looks like the skewed start's once 600 s are added: only the size tells them apart
    log.write_text(log.read_text()
                   + entry("agent.starting", "09:50:05", 101) + entry("leader.elected", "09:50:06")
                   + entry("agent.starting", "10:00:10", 102) + entry("leader.elected", "10:00:11"))
    events = read_log_events(log, 0, [(size, 101, -600.0)])
    assert [e["timestamp"] for e in events] == [
        "2026-01-01T10:00:00Z", "2026-01-01T10:00:01Z", "2026-01-01T10:00:05Z", "2026-01-01T10:00:06Z",
        "2026-01-01T10:00:10Z", "2026-01-01T10:00:11Z"]
    later = read_log_events(log, size, [(size, 101, -600.0)])  # from the skewed start on, as a run reads it
    assert [e["timestamp"] for e in later][:1] == ["2026-01-01T10:00:05Z"]
    # A skewed start that never logged (killed at once): the next incarnation's clock is not skewed.
    assert [e["timestamp"] for e in read_log_events(log, size, [(size, 99, -600.0)])] == [
        "2026-01-01T09:50:05Z", "2026-01-01T09:50:06Z", "2026-01-01T10:00:10Z", "2026-01-01T10:00:11Z"]


def test_the_checker_sees_an_unfenced_leader_write_and_two_leaders() -> None:
    events = [_put(10, "/norm/leader", "m1"), Event(11, "delete", "/norm/leader", b"", 0, 0, b"m1", 100.0),
              _put(12, "/norm/ledger/000000000010-migrate", '{"ok": true}')]
    assert check.check_fenced(_obs(events))
    logs = {"host1": [{"event": "leader.elected", "token": 10, "timestamp": "2026-01-01T00:00:00Z"}],
            "host2": [{"event": "leader.elected", "token": 13, "timestamp": "2026-01-01T00:00:01Z"}]}
    t0 = check._ts(logs["host1"][0])
    events = [_put(10, "/norm/leader", "m1", at=t0),
              Event(11, "delete", "/norm/leader", b"", 0, 0, b"m1", t0 + 0.5),
              _put(13, "/norm/leader", "m2", at=t0 + 1)]
    found = check.check_one_leader(_obs(events, logs=logs, ended_faults=t0 + 20))
    assert any("two leaders" in f for f in found) and any("after its leader key" in f for f in found), found


def test_the_checker_sees_a_secret_in_a_log() -> None:
    assert check.check_secrets(_obs([], raw_logs={"host1": b'{"event": "x", "env": "s3cret"}'}))
