"""The rollout state machine: every rule of the table, the pairs it leaves out (illegal), scenarios,
the record's round trip, and a hypothesis state machine that throws random, duplicate, reordered and
illegal events at it and checks the design's invariants after every step."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from norm.core import protocol as proto
from norm.core.errors import InvalidValue, NormError
from norm.core.host import HostRecord
from norm.core.record import TERMINAL, Deadline, HostStatus, LedgerEntry, Phase, Release, Rollout
from norm.core.rollout import (
    EVENT_TYPES,
    TRANSITIONS,
    Abort,
    AnalysisEnded,
    ArmDeadline,
    BarrierDeadline,
    BeginRollout,
    Blocked,
    Command,
    Event,
    HostActive,
    HostFailed,
    HostLost,
    HostPulled,
    HostPullFailed,
    HostsExcluded,
    HostStopped,
    IllegalTransition,
    MigrationFailed,
    MigrationSucceeded,
    MigrationUnknown,
    MoveHosts,
    NewerVersion,
    PauseAsked,
    PromoteAsked,
    PullOnHosts,
    RecordOutcome,
    Resolved,
    ResolveFailed,
    ResolveTag,
    RestartOldRelease,
    ResumeAsked,
    Resumed,
    RolloutPolicy,
    RunAnalysis,
    RunMigration,
    StartOnHosts,
    StopOnHosts,
    Unblocked,
    barrier_state,
    batch_size,
    duty,
    is_setback,
    ledger_order,
    ledger_summary,
    migrator_for,
    participants,
    start_rollout,
    step,
    steps_done,
    steps_unknown,
)

A, B, C = "a" * 32, "b" * 32, "c" * 32
STRANGER = "f" * 32
HOSTS = (A, B, C)
D1, D2, D3 = ("sha256:" + x * 64 for x in "123")
OLD = Release("v1", D1)
POLICY = RolloutPolicy(pull_timeout=100.0, stop_timeout=50.0, start_timeout=80.0)
ABORT = dataclasses.replace(POLICY, on_trouble="abort")
NO_STEPS = dataclasses.replace(POLICY, steps=())
# Rolling when the image declares expand migrations: `migrate` before the batches, `collectstatic` after.
ROLLING = dataclasses.replace(POLICY, strategy="auto", post_steps=frozenset({"collectstatic"}),
                              progress_deadline=90.0)
CANARY = dataclasses.replace(ROLLING, canary="1")
REV = 10


def run(record: Rollout, *events: Event, now: float = 1.0, policy: RolloutPolicy = POLICY
        ) -> tuple[Rollout, list[Command]]:
    commands: list[Command] = []
    for e in events:
        record, cmds = step(record, e, now, policy)
        commands.extend(cmds)
    return record, commands


def new(tag: str = "v2", hosts: tuple[str, ...] = HOSTS, previous: Release | None = OLD,
        ledger: tuple[LedgerEntry, ...] = ()) -> Rollout:
    record, _ = start_rollout(REV, tag, hosts, 0.0, previous=previous, ledger=ledger)
    return record


def fired(record: Rollout) -> BarrierDeadline:
    """The timer of the record's current barrier going off."""
    assert record.deadline is not None
    return BarrierDeadline(record.revision, record.deadline.barrier)


def pulled(record: Rollout, digest: str = D2) -> tuple[HostPulled, ...]:
    return tuple(HostPulled(h, digest) for h in record.hosts)


def rolling_at(phase: str) -> Rollout:
    """A rolling update's record (one host per batch) in the named phase: "pre" (its first step),
    "roll" (the first batch moving), "post" (its last step), "roll-back" (the first host failed)."""
    r, _ = run(new(), Resolved(D2), policy=ROLLING)
    r, _ = run(r, *(HostPulled(h, D2, "expand") for h in r.hosts), policy=ROLLING)
    if phase == "pre":
        return r
    r, _ = run(r, MigrationSucceeded("migrate"), policy=ROLLING)
    if phase == "roll":
        return r
    if phase == "roll-back":
        return run(r, HostFailed(A, "web: /healthz answered 500"), policy=ROLLING)[0]
    r, _ = run(r, *(HostActive(h) for h in HOSTS), policy=ROLLING)
    if phase == "post":
        return r
    raise AssertionError(phase)


def paused_at(where: str) -> Rollout:
    """A record paused at a boundary: "pull" (every host pulled), "batch" (before the second batch of a
    rolling update), or waiting for its canary's analysis ("canary")."""
    if where == "pull":
        r, _ = run(new(), Resolved(D2), PauseAsked("ops", 900))
        return run(r, *pulled(r))[0]
    if where == "canary":
        r, _ = run(new(), Resolved(D2), policy=CANARY)
        r, _ = run(r, *(HostPulled(h, D2, "expand") for h in r.hosts), MigrationSucceeded("migrate"),
                   policy=CANARY)
        return run(r, HostActive(A), policy=CANARY)[0]
    r = run(rolling_at("roll"), PauseAsked("ops", 900), policy=ROLLING)[0]
    return run(r, HostActive(A), policy=ROLLING)[0]


def at(phase: str) -> Rollout:
    """A record in the named phase, reached the way the leader reaches it."""
    if phase in ("roll", "roll-back", "post"):
        return rolling_at(phase)
    if phase.startswith("paused-"):
        return paused_at(phase.removeprefix("paused-"))
    if phase == "canary":
        return paused_at("canary")
    r = new()
    if phase == "resolve":
        return r
    r, _ = run(r, Resolved(D2))
    if phase == "pull":
        return r
    r, _ = run(r, *pulled(r))
    if phase == "stop":
        return r
    if phase == "rollback":
        return run(r, fired(r), now=1000.0)[0]
    r, _ = run(r, *(HostStopped(h) for h in r.hosts))
    if phase == "migrate":
        return r
    r, _ = run(r, MigrationSucceeded("migrate"), MigrationSucceeded("collectstatic"))
    if phase == "start":
        return r
    if phase == "done":
        return run(r, *(HostActive(h) for h in r.hosts))[0]
    raise AssertionError(phase)


def terminal(phase: Phase) -> Rollout:
    if phase is Phase.DONE:
        return at("done")
    if phase is Phase.FAILED:
        return run(at("pull"), Abort("ops"))[0]
    if phase is Phase.SUPERSEDED:
        return run(at("pull"), NewerVersion("v3", REV + 1))[0]
    if phase is Phase.ROLLED_BACK:
        return run(at("roll-back"), HostActive(A), policy=ROLLING)[0]
    return run(at("start"), Abort("ops"))[0]  # HALTED


RECORDS: dict[str, Rollout] = {
    **{name: at(name) for name in ("resolve", "pull", "stop", "migrate", "start", "rollback", "roll",
                                   "roll-back", "post", "paused-pull", "paused-batch", "canary")},
    **{p.value: terminal(p) for p in sorted(TERMINAL)},
}


def sample(record: Rollout, etype: type[Event]) -> Event | None:
    """A plausible event of the type for the record (right host, digest, step), or None when no
    event of that type can be plausible there."""
    host = record.hosts[0] if record.hosts else A
    ran = {e.ok: e.step for e in record.ledger if e.revision == record.revision}
    if etype in (MigrationSucceeded, MigrationFailed, MigrationUnknown):
        name = record.migrating or ran.get(etype is MigrationSucceeded)
        if name is None:
            return None
        if etype is MigrationUnknown:
            return MigrationUnknown(name, "its container vanished")
        return MigrationSucceeded(name) if etype is MigrationSucceeded else MigrationFailed(name, "boom")
    events: dict[type[Any], Event] = {
        Resolved: Resolved(record.digest or D2),
        ResolveFailed: ResolveFailed("manifest unknown"),
        HostPulled: HostPulled(host, record.digest or D2),
        HostPullFailed: HostPullFailed(host, "registry down", permanent=False),
        HostLost: HostLost(host),
        BarrierDeadline: BarrierDeadline(record.revision, record.deadline.barrier if record.deadline
                                         else "pull"),
        HostStopped: HostStopped(host),
        HostActive: HostActive(host),
        HostFailed: HostFailed(host, "exit 1"),
        NewerVersion: NewerVersion("v3", REV + 1),
        Abort: Abort("ops"),
        Resumed: Resumed(),
        PauseAsked: PauseAsked("ops", 1900),
        ResumeAsked: ResumeAsked("ops", 1901),
        PromoteAsked: PromoteAsked("ops", 1902),
        AnalysisEnded: AnalysisEnded(record.revision, "passed"),
        Blocked: Blocked("outside the maintenance windows"),
        Unblocked: Unblocked(),
    }
    return events[etype]


# ---------------------------------------------------------------------------------------------------
# The table, rule by rule


def test_the_records_are_in_their_phases() -> None:
    assert {name: r.phase.value for name, r in RECORDS.items()} == {
        "resolve": "resolve", "pull": "pull", "stop": "stop", "migrate": "migrate", "start": "start",
        "rollback": "start", "done": "done", "failed": "failed", "superseded": "superseded",
        "halted": "halted", "roll": "roll", "roll-back": "roll", "post": "migrate",
        "rolled_back": "rolled_back", "paused-pull": "pull", "paused-batch": "roll", "canary": "roll"}
    assert {name: r.waiting for name, r in RECORDS.items() if r.waiting} == {
        "paused-pull": "pull", "paused-batch": "batch", "canary": "canary"}
    assert RECORDS["rollback"].rollback and RECORDS["rollback"].outcome is Phase.FAILED
    assert RECORDS["roll-back"].rollback and RECORDS["roll-back"].outcome is Phase.ROLLED_BACK


CASES = [(name, etype) for name in RECORDS for etype in EVENT_TYPES
         if (RECORDS[name].phase, etype) in TRANSITIONS]


@pytest.mark.parametrize(("name", "etype"), CASES, ids=[f"{n}-{t.__name__}" for n, t in CASES])
def test_every_rule_leads_where_the_table_says(name: str, etype: type[Event]) -> None:
    record = RECORDS[name]
    event = sample(record, etype)
    rule = TRANSITIONS[record.phase, etype]
    if event is None:
        event = MigrationFailed("migrate", "x") if etype is MigrationFailed else \
            MigrationUnknown("migrate", "x") if etype is MigrationUnknown else MigrationSucceeded("migrate")
        if record.phase not in TERMINAL:  # a guarded rule: no event of the type fits this record
            with pytest.raises(IllegalTransition):
                step(record, event, 1000.0, POLICY)
            return
    new_record, commands = step(record, event, 1000.0, POLICY)
    assert new_record.phase in rule.to
    assert Rollout.decode(new_record.encode(), "test") == new_record
    if rule.late:
        assert new_record == record and commands == ()
    if record.phase in TERMINAL:
        assert new_record == record


ILLEGAL = {
    Phase.RESOLVE: {HostPulled, HostPullFailed, BarrierDeadline, HostStopped, MigrationSucceeded,
                    MigrationFailed, MigrationUnknown, HostActive, HostFailed},
    Phase.PULL: {ResolveFailed, HostStopped, MigrationSucceeded, MigrationFailed, MigrationUnknown,
                 HostActive, HostFailed},
    Phase.STOP: {Resolved, ResolveFailed, MigrationSucceeded, MigrationFailed, MigrationUnknown,
                 HostActive, HostFailed},
    Phase.MIGRATE: {Resolved, ResolveFailed, HostActive, HostFailed},
    Phase.START: {Resolved, ResolveFailed},
    Phase.ROLL: {Resolved, ResolveFailed},
    **{p: set() for p in TERMINAL},
}


def test_the_table_is_exactly_the_legal_pairs() -> None:
    for phase in Phase:
        legal = {etype for (p, etype) in TRANSITIONS if p is phase}
        assert legal == set(EVENT_TYPES) - ILLEGAL[phase], phase
        assert legal | ILLEGAL[phase] == set(EVENT_TYPES)
    for (phase, _), r in TRANSITIONS.items():
        if phase in TERMINAL:
            assert r.to == {phase}


ILLEGAL_CASES = [(name, etype) for name in RECORDS for etype in ILLEGAL[RECORDS[name].phase]]


@pytest.mark.parametrize(("name", "etype"), ILLEGAL_CASES,
                         ids=[f"{n}-{t.__name__}" for n, t in ILLEGAL_CASES])
def test_illegal_pairs_raise_naming_phase_and_event(name: str, etype: type[Event]) -> None:
    record = RECORDS[name]
    before = record.encode()
    event = sample(record, etype) or (MigrationFailed("migrate", "x") if etype is MigrationFailed
                                      else MigrationUnknown("migrate", "x") if etype is MigrationUnknown
                                      else MigrationSucceeded("migrate"))
    with pytest.raises(IllegalTransition) as info:
        step(record, event, 1000.0, POLICY)
    assert record.phase.value in str(info.value) and etype.__name__ in str(info.value)
    assert isinstance(info.value, NormError)
    assert info.value.phase is record.phase and info.value.event == event
    assert record.encode() == before


@pytest.mark.parametrize(("name", "event"), [
    ("pull", HostPulled(STRANGER, D2)),  # not a participant
    ("stop", HostPulled(A, D3)),  # counted with another digest
    ("stop", HostStopped(STRANGER)),
    ("pull", Resolved(D3)),  # a second, different resolution
    ("migrate", MigrationSucceeded("collectstatic")),  # not the running step
    ("migrate", MigrationFailed("other", "x")),
    ("start", MigrationFailed("migrate", "x")),  # the ledger says it succeeded
    ("start", HostActive(STRANGER)),
])
def test_guarded_rules_refuse_inconsistent_events(name: str, event: Event) -> None:
    with pytest.raises(IllegalTransition):
        step(RECORDS[name], event, 1000.0, POLICY)


# ---------------------------------------------------------------------------------------------------
# Scenarios


def test_a_whole_rollout() -> None:
    r, cmds = start_rollout(REV, "v2", [B, A, C, A], 0.0, previous=OLD)
    assert r.hosts == HOSTS and r.phase is Phase.RESOLVE and cmds == (ResolveTag("v2"),)
    r, cmds = step(r, Resolved(D2), 1.0, POLICY)
    assert cmds == (PullOnHosts(HOSTS, D2), ArmDeadline(Deadline("pull", 100.0)))
    r, cmds = run(r, *pulled(r)[:2])
    assert r.phase is Phase.PULL and cmds == [] and barrier_state(r) == ((A, B), (C,), ())
    r, cmds = step(r, HostPulled(C, D2), 2.0, POLICY)
    assert r.phase is Phase.STOP and cmds == (StopOnHosts(HOSTS), ArmDeadline(Deadline("stop", 50.0)))
    r, cmds = run(r, *(HostStopped(h) for h in HOSTS))
    # The step's result is awaited for its timeout and the stop timeout more (1800 + 50).
    assert r.phase is Phase.MIGRATE
    assert cmds == [RunMigration("migrate", D2), ArmDeadline(Deadline("migrate:migrate", 1850.0))]
    r, cmds = run(r, MigrationSucceeded("migrate"))
    assert cmds == [RunMigration("collectstatic", D2), ArmDeadline(Deadline("migrate:collectstatic", 1850.0))]
    r, cmds = step(r, MigrationSucceeded("collectstatic"), 3.0, POLICY)
    assert cmds == (StartOnHosts(HOSTS, Release("v2", D2)), ArmDeadline(Deadline("start", 80.0)))
    assert [(e.step, e.ok) for e in r.ledger] == [("migrate", True), ("collectstatic", True)]
    r, cmds = run(r, HostActive(A), HostActive(B), HostActive(C), now=4.0)
    assert r.phase is Phase.DONE and r.outcome is Phase.DONE and r.ended_at == 4.0
    assert cmds == [RecordOutcome(REV, Phase.DONE, None)]


@pytest.mark.parametrize("tag", ["", "-v2", "v2\n", "x" * 129, "v2 beta"])
def test_an_invalid_tag_fails_and_touches_nothing(tag: str) -> None:
    r, cmds = start_rollout(REV, tag, HOSTS, 0.0)
    assert r.phase is Phase.FAILED and r.reason
    assert cmds == (RecordOutcome(REV, Phase.FAILED, r.reason),)


def test_no_participating_host_fails() -> None:
    r, _ = start_rollout(REV, "v2", [], 0.0)
    assert r.phase is Phase.FAILED and r.reason == "no participating host"


def test_an_unknown_tag_or_a_malformed_digest_fails_in_resolve() -> None:
    r, cmds = run(new(), ResolveFailed("manifest unknown"))
    assert r.phase is Phase.FAILED and "manifest unknown" in (r.reason or "")
    assert [type(c) for c in cmds] == [RecordOutcome]
    r, _ = run(new(), Resolved("sha256:xyz"))
    assert r.phase is Phase.FAILED and "malformed digest" in (r.reason or "")


@pytest.mark.parametrize("event", [HostLost(B), HostPullFailed(B, "no space", permanent=True),
                                   HostPulled(B, D3)])
def test_trouble_before_the_cutover_excludes_the_host(event: Event) -> None:
    r, cmds = run(at("pull"), HostPulled(A, D2), HostPulled(C, D2), event)
    assert r.phase is Phase.STOP and r.hosts == (A, C)
    assert barrier_state(r) == ((A, C), (), (B,))
    assert isinstance(cmds[0], HostsExcluded) and cmds[0].hosts == (B,)
    assert StopOnHosts((A, C)) in cmds


@pytest.mark.parametrize("event", [HostLost(B), HostPullFailed(B, "no space", permanent=True),
                                   HostPulled(B, D3), BarrierDeadline(REV, "pull")])
def test_trouble_before_the_cutover_aborts_under_that_policy(event: Event) -> None:
    r, cmds = run(at("pull"), HostPulled(A, D2), event, policy=ABORT, now=500.0)
    assert r.phase is Phase.FAILED and B in (r.reason or "")
    assert not any(isinstance(c, StopOnHosts) for c in cmds)


def test_a_host_lost_while_resolving_is_excluded_and_the_last_one_fails() -> None:
    r, _ = run(new(), HostLost(A), HostLost(STRANGER))
    assert r.phase is Phase.RESOLVE and r.hosts == (B, C)
    r, _ = run(r, HostLost(B), HostLost(C))
    assert r.phase is Phase.FAILED and r.reason == "no participating host left"


def test_transient_pull_failures_wait_for_the_deadline() -> None:
    r, cmds = run(at("pull"), HostPullFailed(A, "timeout", permanent=False))
    assert r.phase is Phase.PULL and cmds == [] and r.host(A) is not None and r.host(A).reason == "timeout"  # type: ignore[union-attr]
    r, _ = run(r, HostPulled(B, D2), HostPulled(C, D2))
    r, cmds = step(r, fired(r), 101.0, POLICY)
    assert r.phase is Phase.STOP and r.hosts == (B, C) and r.excluded[0].reason == "did not pull in time"


def test_every_host_slow_fails_without_stopping_anything() -> None:
    r, cmds = step(at("pull"), BarrierDeadline(REV, "pull"), 101.0, POLICY)
    assert r.phase is Phase.FAILED and r.reason == "no participating host left"
    assert not any(isinstance(c, StopOnHosts) for c in cmds)


def test_late_and_duplicate_reports_change_nothing() -> None:
    r = at("stop")
    for e in (HostPulled(A, D2), HostPullFailed(A, "x", permanent=True)):
        assert step(r, e, 9.0, POLICY) == (r, ())
    r, _ = run(r, HostStopped(A))
    assert step(r, HostStopped(A), 9.0, POLICY) == (r, ())
    r = run(at("pull"), HostLost(A))[0]
    assert step(r, HostPulled(A, D2), 9.0, POLICY) == (r, ())  # excluded: late


def test_a_stop_that_does_not_complete_rolls_back() -> None:
    r, _ = run(at("stop"), HostStopped(A))
    r, cmds = step(r, BarrierDeadline(REV, "stop"), 1000.0, POLICY)
    assert r.phase is Phase.START and r.rollback and r.outcome is Phase.FAILED
    assert cmds == (RestartOldRelease(HOSTS, OLD), ArmDeadline(Deadline("rollback", 80.0)))
    assert duty(r, B) == RestartOldRelease((B,), OLD)
    r, cmds = run(r, *(HostActive(h) for h in HOSTS))
    assert r.phase is Phase.FAILED and "did not stop in time: b" in (r.reason or "")


def test_a_failed_migration_restarts_the_old_release() -> None:
    r, cmds = run(at("migrate"), MigrationFailed("migrate", "column exists"))
    assert r.phase is Phase.START and r.rollback
    assert cmds == [RestartOldRelease(HOSTS, OLD), ArmDeadline(Deadline("rollback", 80.0))]
    assert not any(isinstance(c, StartOnHosts) for c in cmds)
    assert [(e.step, e.ok) for e in r.ledger] == [("migrate", False)]
    r, _ = run(r, HostActive(A), HostFailed(B, "exit 1"), HostActive(C))
    assert r.phase is Phase.FAILED and "column exists" in (r.reason or "") and "b" * 32 in (r.reason or "")


def test_a_failed_migration_without_an_old_release_fails() -> None:
    r = new(previous=None)
    r, _ = run(r, Resolved(D2), *pulled(r), *(HostStopped(h) for h in HOSTS), MigrationFailed("migrate", "x"))
    assert r.phase is Phase.FAILED and "no earlier release" in (r.reason or "")


def test_hosts_that_do_not_pass_their_gate_halt_the_rollout() -> None:
    r, _ = run(at("start"), HostActive(A), HostFailed(B, "web: /healthz answered 500"))
    r, cmds = step(r, BarrierDeadline(REV, "start"), 1000.0, POLICY)
    assert r.phase is Phase.HALTED and r.host(C).reason == "no report in time"  # type: ignore[union-attr]
    assert B in (r.reason or "") and C in (r.reason or "") and "answered 500" in (r.reason or "")
    assert "operator" in (r.reason or "") and not any(isinstance(c, RestartOldRelease) for c in cmds)
    assert proto.Header.of(r).fleet_release() is None  # nobody is moved until an operator decides


def test_a_recreate_whose_steps_are_declared_safe_rolls_back_when_the_gate_fails() -> None:
    r, _ = run(new(), Resolved(D2))
    r, _ = run(r, *(HostPulled(h, D2, "expand") for h in HOSTS))  # the policy asks for recreate
    assert r.phase is Phase.STOP and r.strategy == "recreate"
    r, _ = run(r, *(HostStopped(h) for h in HOSTS), MigrationSucceeded("migrate"),
               MigrationSucceeded("collectstatic"), HostActive(A))
    r, cmds = run(r, HostFailed(B, "web: connection refused"), HostActive(C))
    assert r.phase is Phase.START and r.rollback and r.outcome is Phase.ROLLED_BACK
    assert RestartOldRelease(HOSTS, OLD) in cmds
    r, _ = run(r, *(HostActive(h) for h in HOSTS))
    assert r.phase is Phase.ROLLED_BACK and "connection refused" in (r.reason or "")


def test_hosts_lost_after_the_cutover_are_dropped() -> None:
    r, _ = run(at("stop"), HostStopped(A), HostStopped(B), HostLost(C))
    assert r.phase is Phase.MIGRATE and r.hosts == (A, B)
    r, _ = run(r, HostLost(B), MigrationSucceeded("migrate"), MigrationSucceeded("collectstatic"))
    r, _ = run(r, HostActive(A))
    assert r.phase is Phase.DONE and [e.host for e in r.excluded] == [C, B]


def test_no_steps_go_straight_to_start() -> None:
    r = new()
    r, cmds = run(r, Resolved(D2), *pulled(r), *(HostStopped(h) for h in HOSTS), policy=NO_STEPS)
    assert r.phase is Phase.START and not any(isinstance(c, RunMigration) for c in cmds)


def ledger_of(*runs: tuple[str, str, bool]) -> tuple[LedgerEntry, ...]:
    return tuple(LedgerEntry(d, t, s, ok, i + 1, float(i)) for i, (d, t, s, ok) in
                 enumerate((d, t, s, ok) for d, t, ok in runs for s in ("migrate", "collectstatic")))


def test_setting_back_a_migrated_version_halts_and_touches_nothing() -> None:
    ledger = ledger_of((D1, "v1", True), (D2, "v2", True))
    assert is_setback(ledger, D1) and not is_setback(ledger, D2) and not is_setback(ledger, D3)
    r, cmds = run(new("v1", previous=Release("v2", D2), ledger=ledger), Resolved(D1))
    assert r.phase is Phase.HALTED and "operator" in (r.reason or "")
    assert [type(c) for c in cmds] == [RecordOutcome]


@pytest.mark.parametrize("compatible", ["v1", D1])
def test_setting_back_a_compatible_version_restarts_without_migrating(compatible: str) -> None:
    policy = dataclasses.replace(POLICY, compatible=frozenset({compatible}))
    r = new("v1", previous=Release("v2", D2), ledger=ledger_of((D1, "v1", True), (D2, "v2", True)))
    r, cmds = run(r, Resolved(D1), *pulled(r, D1), *(HostStopped(h) for h in HOSTS), policy=policy)
    assert r.phase is Phase.START and r.steps == ()
    assert not any(isinstance(c, RunMigration) for c in cmds)
    assert StartOnHosts(HOSTS, Release("v1", D1)) in cmds


def test_a_version_already_migrated_does_not_migrate_again() -> None:
    ledger = (LedgerEntry(D2, "v2", "migrate", True, 3, 0.0),
              LedgerEntry(D2, "v2", "collectstatic", False, 3, 0.0))
    r = new(ledger=ledger)
    r, cmds = run(r, Resolved(D2), *pulled(r), *(HostStopped(h) for h in HOSTS))
    assert cmds[-2] == RunMigration("collectstatic", D2)
    assert not any(c == RunMigration("migrate", D2) for c in cmds)


def test_a_setback_is_known_however_many_rollouts_ago_its_steps_ran() -> None:
    # v1 migrated, then v2, then 300 other versions: the record of a new rollout carries a summary of
    # the ledger's keys (not the last N entries), and the set-back to v1 still halts.
    digests = [D1, D2] + [f"sha256:{i:064x}" for i in range(100, 400)]
    runs = [(d, f"t{i}", True) for i, d in enumerate(digests)]
    ledger = ledger_order(reversed(ledger_of(*runs)))  # keys come in any order
    assert len(ledger) == 2 * len(digests) and ledger == ledger_of(*runs)
    carried = ledger_summary(ledger)
    assert is_setback(carried, D1) and is_setback(carried, D2) and not is_setback(carried, digests[-1])
    r, cmds = run(new("t0", previous=Release("t301", digests[-1]), ledger=carried), Resolved(D1))
    assert r.phase is Phase.HALTED and "no down-migrations" in (r.reason or "")
    assert [type(c) for c in cmds] == [RecordOutcome]


LEDGER_ENTRIES = st.lists(st.builds(
    LedgerEntry, st.sampled_from([D1, D2, D3]), st.just("t"), st.sampled_from(["migrate", "collectstatic"]),
    st.booleans(), st.integers(1, 30), st.floats(0, 100), st.booleans()), max_size=40)


@given(entries=LEDGER_ENTRIES)
def test_the_ledger_summary_decides_as_the_whole_ledger(entries: list[LedgerEntry]) -> None:
    entries = [dataclasses.replace(e, unknown=e.unknown and not e.ok) for e in entries]
    whole = ledger_order(entries)
    carried = ledger_summary(whole)
    assert set(carried) <= set(whole) and ledger_order(carried) == carried
    for d in (D1, D2, D3):
        assert is_setback(carried, d) == is_setback(whole, d)
        assert steps_done(carried, d) == steps_done(whole, d)
        assert sorted(steps_unknown(carried, d)) == sorted(steps_unknown(whole, d))


def test_ledger_entries_round_trip_through_their_keys() -> None:
    from norm.core.record import decode_ledger_entry
    for e in (LedgerEntry(D1, "v1", "migrate", True, 3, 1.5),
              LedgerEntry(D1, "v1", "migrate", False, 3, 1.5, unknown=True)):
        assert decode_ledger_entry(json.dumps(dataclasses.asdict(e)).encode(), "k") == e
    assert decode_ledger_entry(b'{"digest": "%s", "tag": "v1", "step": "migrate", "ok": true, '
                               b'"revision": 3, "at": 1}' % D1.encode(), "k").unknown is False
    for raw in (b"nope", b"{}", b'{"digest": "sha256:x"}', b"[]"):
        with pytest.raises(InvalidValue):
            decode_ledger_entry(raw, "k")
    # A ledger key's tag and step keep their grammar, as in a record: a hostile one is refused when
    # read, never carried into the next record (which every reader would then refuse).
    for field, hostile in (("tag", "x\nNORM_IMAGE=evil"), ("step", "rm -rf /")):
        entry = dict(digest=D1, tag="v1", step="migrate", ok=True, revision=3, at=1.0)
        entry[field] = hostile
        with pytest.raises(InvalidValue) as refused:
            decode_ledger_entry(json.dumps(entry).encode(), "k")
        assert hostile not in str(refused.value) and field in str(refused.value)


def test_an_unknown_step_outcome_halts_naming_the_step_and_restarts_nothing() -> None:
    r, cmds = run(at("migrate"), MigrationUnknown("migrate", "its container vanished"))
    assert r.phase is Phase.HALTED and r.outcome is Phase.HALTED and not r.rollback
    assert "step migrate" in (r.reason or "") and "unknown" in (r.reason or "")
    assert not any(isinstance(c, RestartOldRelease | RunMigration | StartOnHosts) for c in cmds)
    assert [(e.step, e.ok, e.unknown) for e in r.ledger] == [("migrate", False, True)]
    # A late or replayed report of it changes nothing; nor does one of the step it named.
    assert run(r, MigrationUnknown("migrate", "again"), MigrationSucceeded("migrate"))[0] == r
    # After the first step succeeded, the second's unknown outcome halts as well.
    r, cmds = run(at("migrate"), MigrationSucceeded("migrate"), MigrationUnknown("collectstatic", "x"))
    assert r.phase is Phase.HALTED and "step collectstatic" in (r.reason or "")
    assert not any(isinstance(c, RestartOldRelease) for c in cmds)


def test_a_step_of_unknown_outcome_is_never_run_again_by_a_later_rollout() -> None:
    halted, _ = run(at("migrate"), MigrationUnknown("migrate", "killed by the engine going away"))
    r, cmds = run(new("v2", ledger=ledger_summary(halted.ledger)), Resolved(D2))
    assert r.phase is Phase.HALTED and "step migrate" in (r.reason or "") and "unknown" in (r.reason or "")
    assert [type(c) for c in cmds] == [RecordOutcome]  # nothing pulled, stopped or run
    # Once an operator recorded how it ended (the run's key written again, ok or not), it goes on;
    # the key's copy comes first, before the halted record's.
    for ok in (True, False):
        checked = (LedgerEntry(D2, "v2", "migrate", ok, REV, 9.0), *halted.ledger)
        r, cmds = run(new("v2", ledger=ledger_summary(ledger_order(checked))), Resolved(D2))
        assert r.phase is Phase.PULL
    # So does a step that timed out waiting for its report: it may or may not have run.
    timed_out, _ = run(dataclasses.replace(at("migrate"), deadline=Deadline("migrate:migrate", 10.0)),
                       BarrierDeadline(REV, "migrate:migrate"), now=10.0)
    assert timed_out.phase is Phase.HALTED and timed_out.ledger[-1].unknown
    assert run(new("v2", ledger=timed_out.ledger), Resolved(D2))[0].phase is Phase.HALTED


def test_a_newer_version_supersedes_before_the_cutover() -> None:
    for name in ("resolve", "pull"):
        r, cmds = run(RECORDS[name], NewerVersion("v3", REV + 5))
        assert r.phase is Phase.SUPERSEDED
        assert cmds[-1] == BeginRollout("v3", REV + 5)
        assert not any(isinstance(c, StopOnHosts) for c in cmds)


def test_a_newer_version_waits_for_a_rollout_that_cut_over() -> None:
    r, cmds = run(at("stop"), NewerVersion("v3", REV + 1), NewerVersion("v4", REV + 2),
                  NewerVersion("v3", REV + 1))
    assert r.phase is Phase.STOP and cmds == [] and r.newer is not None and r.newer.tag == "v4"
    r, cmds = run(r, *(HostStopped(h) for h in HOSTS), MigrationSucceeded("migrate"),
                  MigrationSucceeded("collectstatic"), *(HostActive(h) for h in HOSTS))
    assert r.phase is Phase.DONE and cmds[-1] == BeginRollout("v4", REV + 2)


def test_stale_versions_are_ignored_and_terminal_records_start_the_next() -> None:
    assert step(at("pull"), NewerVersion("v0", REV), 1.0, POLICY) == (at("pull"), ())
    done = at("done")
    assert step(done, NewerVersion("v3", REV + 1), 1.0, POLICY) == (done, (BeginRollout("v3", REV + 1),))


def test_abort() -> None:
    r, cmds = run(at("stop"), Abort("ops"))
    assert r.phase is Phase.START and r.rollback and r.reason == "aborted by ops"
    r, cmds = run(at("migrate"), Abort("ops"), Abort("bob"))
    assert r.phase is Phase.MIGRATE and r.abort_by == "ops" and cmds == []
    r, cmds = run(r, MigrationSucceeded("migrate"))
    assert r.phase is Phase.HALTED and not any(isinstance(c, RunMigration) for c in cmds)
    r, _ = run(at("migrate"), Abort("ops"), MigrationFailed("migrate", "x"))
    assert r.phase is Phase.START and r.rollback
    assert step(at("rollback"), Abort("ops"), 1.0, POLICY) == (at("rollback"), ())


def test_a_new_leader_resumes_from_the_record() -> None:
    assert step(at("resolve"), Resumed(), 1.0, POLICY)[1] == (ResolveTag("v2"),)
    r, _ = run(at("pull"), HostPulled(A, D2))
    r = Rollout.decode(r.encode(), "etcd")
    assert step(r, Resumed(), 5.0, POLICY)[1] == (PullOnHosts((B, C), D2),
                                                  ArmDeadline(Deadline("pull", 100.0)))
    r, _ = run(at("stop"), HostStopped(B))
    assert step(r, Resumed(), 5.0, POLICY)[1] == (StopOnHosts((A, C)), ArmDeadline(Deadline("stop", 50.0)))
    # A step issued by the old leader runs on on its migrator's engine: a resumed MIGRATE does not
    # halt, and does not issue the step again: its report is awaited (the migrator's agent adopts the
    # container), and with no report by the deadline the rollout halts for an operator.
    migrating = dataclasses.replace(at("migrate"), deadline=Deadline("migrate:migrate", 900.0))
    r, cmds = step(migrating, Resumed(), 5.0, POLICY)
    assert r == migrating and cmds == (ArmDeadline(Deadline("migrate:migrate", 900.0)),)
    r, cmds = step(r, BarrierDeadline(REV, "migrate:migrate"), 6.0, POLICY)
    assert r.phase is Phase.HALTED and "migrate" in (r.reason or "") and "may or may not" in (r.reason or "")
    assert not any(isinstance(c, RunMigration) for c in cmds)
    r, _ = run(at("start"), HostActive(C))
    assert step(r, Resumed(), 5.0, POLICY)[1][0] == StartOnHosts((A, B), Release("v2", D2))
    assert step(at("rollback"), Resumed(), 5.0, POLICY)[1][0] == RestartOldRelease(HOSTS, OLD)


# Deadlines are durations: the record holds how long the current barrier may last and which barrier
# it is, never a time of day. The leader times it on its own monotonic clock, from when the barrier
# begins and, in full, from when a (new) leader resumes the record; wall clocks (`now`) differ between
# leaders by any amount and step, and decide nothing.

SKEWS = [-600.0, 0.0, 600.0, 1e9]


@pytest.mark.parametrize("skew", SKEWS)
def test_a_barrier_deadline_is_a_duration_whatever_the_clock(skew: float) -> None:
    r, cmds = step(new(), Resolved(D2), 1.0 + skew, POLICY)
    assert r.deadline == Deadline("pull", 100.0) and cmds[-1] == ArmDeadline(Deadline("pull", 100.0))
    assert json.loads(r.encode())["deadline"] == {"barrier": "pull", "seconds": 100.0}
    r, cmds = step(r, HostPulled(A, D2), 2.0 + skew, POLICY)
    assert cmds == ()


@pytest.mark.parametrize("skew", SKEWS)
@pytest.mark.parametrize("name", ["pull", "stop", "migrate", "start", "rollback"])
def test_a_resuming_leader_arms_the_whole_duration_whatever_its_clock(name: str, skew: float) -> None:
    """A successor whose clock is ahead (or behind) by any amount gets the barrier's whole duration
    again, not what an absolute time would leave on its clock; the record does not change."""
    record = Rollout.decode(RECORDS[name].encode(), "etcd")
    assert record.deadline is not None
    r, cmds = step(record, Resumed(), record.updated_at + skew, POLICY)
    assert r == record
    assert [c for c in cmds if isinstance(c, ArmDeadline)] == [ArmDeadline(record.deadline)]
    # Nothing fires on the successor's clock alone: only its own timer ends the barrier.
    for event in (HostLost(STRANGER), Resumed()):
        after, _ = step(r, event, record.updated_at + skew + 10 * record.deadline.seconds, POLICY)
        assert after.phase is record.phase


def test_the_deadline_names_its_barrier_and_stale_timers_change_nothing() -> None:
    assert {n: RECORDS[n].deadline for n in ("pull", "stop", "migrate", "start", "rollback")} == {
        "pull": Deadline("pull", 100.0), "stop": Deadline("stop", 50.0),
        "migrate": Deadline("migrate:migrate", 1850.0), "start": Deadline("start", 80.0),
        "rollback": Deadline("rollback", 80.0)}
    r = RECORDS["stop"]
    for stale in (BarrierDeadline(REV, "pull"), BarrierDeadline(REV - 1, "stop"),
                  BarrierDeadline(REV + 1, "stop")):
        assert step(r, stale, 1e9, POLICY) == (r, ())
    # The right timer ends the barrier, whatever the wall clock says (here: before the rollout began).
    r, _ = step(r, BarrierDeadline(REV, "stop"), -1e9, POLICY)
    assert r.phase is Phase.START and r.rollback


@pytest.mark.parametrize("name", ["pull", "stop", "migrate", "start", "rollback"])
def test_a_record_with_an_absolute_deadline_loads_and_gets_the_whole_timeout(name: str) -> None:
    """An earlier version kept the deadline as a time of its leader's wall clock: such a record
    loads, and the leader that resumes it gives the barrier the policy's timeout from then on."""
    data = json.loads(RECORDS[name].encode())
    data["deadline"] = 1796283550.5  # what time.time() said on some other host
    record = Rollout.decode(json.dumps(data).encode(), "etcd")
    assert record.deadline is None and record.phase is RECORDS[name].phase
    r, cmds = step(record, Resumed(), 42.0, POLICY)
    assert r.deadline == RECORDS[name].deadline and r.updated_at == 42.0  # written before acting
    assert [c for c in cmds if isinstance(c, ArmDeadline)] == [ArmDeadline(RECORDS[name].deadline)]
    after, _ = step(r, fired(r), 43.0, POLICY)
    assert after != r  # the re-armed barrier's timer ends it


def test_duty_tells_each_host_what_to_do() -> None:
    assert duty(at("resolve"), A) is None
    assert duty(at("pull"), A) == PullOnHosts((A,), D2)
    assert duty(run(at("pull"), HostPulled(A, D2))[0], A) is None
    assert duty(at("stop"), A) == StopOnHosts((A,))
    assert duty(at("migrate"), A) is None
    assert duty(at("start"), A) == StartOnHosts((A,), Release("v2", D2))
    assert duty(at("start"), STRANGER) is None
    assert duty(at("done"), A) is None


def test_participants_by_environment_and_role() -> None:
    def h(mid: str, env: str, role: str) -> HostRecord:
        return HostRecord(mid, mid[:4], env, role, "1")
    fleet = [h(C, "prod", "django"), h(A, "prod", "celery"), h(B, "stage", "django")]
    assert participants(fleet, "prod") == (A, C)
    assert participants(fleet, "prod", frozenset({"django"})) == (C,)


def test_policy_is_validated() -> None:
    with pytest.raises(ValueError):
        RolloutPolicy(pull_timeout=0)
    with pytest.raises(ValueError):
        RolloutPolicy(steps=("migrate", "migrate"))
    with pytest.raises(ValueError):
        RolloutPolicy(on_trouble="ignore")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# The record in etcd


@pytest.mark.parametrize("name", list(RECORDS))
def test_records_round_trip(name: str) -> None:
    r = RECORDS[name]
    assert Rollout.decode(r.encode(), "etcd") == r


GOOD = json.loads(RECORDS["rollback"].encode())


@pytest.mark.parametrize("mutate", [
    lambda d: [],
    lambda d: {**d, "phase": "dancing"},
    lambda d: {**d, "revision": True},
    lambda d: {**d, "revision": 0},
    lambda d: {**d, "hosts": [B, A]},
    lambda d: {**d, "hosts": "abc"},
    lambda d: {**d, "digest": "sha256:nope"},
    lambda d: {**d, "digest": None},
    lambda d: {**d, "progress": d["progress"][:1]},
    lambda d: {**d, "progress": [{**d["progress"][0], "status": "sleeping"}, *d["progress"][1:]]},
    lambda d: {**d, "ledger": [{"digest": D1}]},
    lambda d: {**d, "previous": None},
    lambda d: {**d, "deadline": "soon"},
    lambda d: {**d, "deadline": True},
    lambda d: {**d, "deadline": {"barrier": "start"}},
    lambda d: {**d, "deadline": {"barrier": "start", "seconds": 0}},
    lambda d: {**d, "deadline": {"barrier": "start", "seconds": -80}},
    lambda d: {**d, "deadline": {"barrier": "start", "seconds": 1e999}},
    lambda d: {**d, "deadline": {"barrier": "start", "seconds": "80"}},
    lambda d: {**d, "deadline": {"barrier": 1, "seconds": 80}},
    lambda d: {**d, "deadline": {"barrier": "start", "seconds": 80, "at": 1.0}},
    lambda d: {**d, "rollback": 1},
    lambda d: {**d, "extra": 1},
    lambda d: {k: v for k, v in d.items() if k != "tag"},
])
def test_garbage_records_are_refused(mutate: Any) -> None:
    with pytest.raises(InvalidValue) as info:
        Rollout.decode(json.dumps(mutate(dict(GOOD))).encode(), "/norm/rollout")
    assert info.value.where == "/norm/rollout"


@given(st.binary(max_size=200))
@settings(max_examples=200)
def test_arbitrary_bytes_are_refused_or_decoded(raw: bytes) -> None:
    with contextlib.suppress(InvalidValue):
        Rollout.decode(raw, "x")


def test_deep_nesting_is_refused() -> None:
    with pytest.raises(InvalidValue):
        Rollout.decode(b"[" * 100000 + b"]" * 100000, "x")


HOSTILE_TAG = "v2\nNORM_IMAGE=evil/app@" + D1


@pytest.mark.parametrize("mutate", [
    lambda d: {**d, "tag": HOSTILE_TAG},
    lambda d: {**d, "previous": {**d["previous"], "tag": HOSTILE_TAG}},
    lambda d: {**d, "newer": {"tag": HOSTILE_TAG, "revision": 99}},
    lambda d: {**d, "ledger": [{"digest": D1, "tag": HOSTILE_TAG, "step": "migrate", "ok": True,
                                "revision": 1, "at": 0.0}]},
    lambda d: {**d, "ledger": [{"digest": D1, "tag": "v1", "step": "migrate\nX=evil", "ok": True,
                                "revision": 1, "at": 0.0}]},
    lambda d: {**d, "hosts": sorted([*d["hosts"], "evil"]),
               "progress": sorted([*d["progress"], {"host": "evil"}], key=lambda p: p["host"])},
    lambda d: {**d, "excluded": [{"host": "evil\n", "reason": "lost", "phase": "pull"}]},
    lambda d: {**d, "excluded": [{"host": C, "reason": "\x1b[2Jevil", "phase": "pull"}]},
    lambda d: {**d, "steps": ["migrate; evil"]},
    lambda d: {**d, "migrator": "evil"},
    lambda d: {**d, "reason": "e" * 300_000},
    lambda d: {**d, "abort_by": "\x07evil"},
    lambda d: {**d, "phase": "evil"},
    lambda d: {**d, "progress": [{**d["progress"][0], "status": "evil"}, *d["progress"][1:]]},
])
def test_hostile_values_in_a_record_are_refused_without_quoting(mutate: Any) -> None:
    with pytest.raises(InvalidValue) as info:
        Rollout.decode(json.dumps(mutate(dict(GOOD))).encode(), "/norm/rollouts/1/record")
    assert info.value.where == "/norm/rollouts/1/record" and "evil" not in str(info.value)


# ---------------------------------------------------------------------------------------------------
# Invariants under random event sequences


TAG_DIGEST = {"v1": D1, "v2": D2, "v3": D3}
MACHINE_HOSTS = (A, B, C, STRANGER)


class RolloutMachine(RuleBasedStateMachine):
    """The leaders' view over a chain of rollouts, with the shell's ways of losing things: a new leader
    (the record read back, `Resumed`), a leader write whose reply was lost (applied or not: the leader
    stands down and the next one reads what etcd has), a compaction re-list (every report of the
    rollout replayed, in etcd's order), late and duplicate reports, and the header lost (the next
    rollout begins knowing only the ledger's keys). The ledger a rollout begins with is always the
    keys' (`ledger_summary` of every entry ever written), as the updater reads it. The events are
    arbitrary, the checks are not: no step runs twice for a digest, and steps never overlap."""

    @initialize(policy=st.sampled_from([POLICY, ABORT, dataclasses.replace(POLICY, steps=("migrate",)),
                                        ROLLING, dataclasses.replace(ROLLING, max_unavailable="2"),
                                        dataclasses.replace(ROLLING, auto_rollback=False)]),
                hosts=st.sets(st.sampled_from(HOSTS), min_size=1))
    def begin(self, policy: RolloutPolicy, hosts: set[str]) -> None:
        self.policy = policy
        self.now = 0.0
        self.revision = REV
        self.hosts = tuple(sorted(hosts))
        self.succeeded: set[tuple[str, str]] = set()  # (digest, step) migrated successfully
        self.outstanding: set[tuple[str, str]] = set()  # the step issued and possibly running
        self.keys: dict[tuple[int, str], LedgerEntry] = {}  # the ledger's keys: (revision, step)
        self.claims = {}  # (revision, step): the host that claimed it
        self.begin_rollout(OLD, "v2", (), ())

    def begin_rollout(self, previous: Release | None, tag: str, ledger: tuple[LedgerEntry, ...],
                      hosts: tuple[str, ...]) -> None:
        self.record, cmds = start_rollout(self.revision, tag, hosts or self.hosts, self.now,
                                          previous=previous, ledger=ledger)
        self.commands: list[Command] = list(cmds)
        self.reports: list[Event] = []  # the reports of this rollout, as etcd holds them, in order
        self.phases = [self.record.phase]
        self.pulled_ok: set[str] = set()  # hosts whose pull of the rollout's digest the machine accepted
        self.running_new = False

    def apply(self, event: Event) -> None:
        before, encoded = self.record, self.record.encode()
        try:
            record, cmds = step(self.record, event, self.now, self.policy)
        except IllegalTransition:
            assert self.record is before and self.record.encode() == encoded
            return
        if before.terminal:
            assert record == before, "terminal phases never change"
        if (isinstance(event, HostPulled) and before.digest == event.digest
                and event.host in before.hosts and record.host(event.host) is not None):
            self.pulled_ok.add(event.host)
        for c in cmds:
            self.check_command(before, record, c)
        self.commands.extend(cmds)
        if before.phase is Phase.MIGRATE and record.phase is Phase.HALTED:
            # Halted with the step's outcome unknown (gone, killed, or no report by the deadline, by
            # which its migrator killed it at migration_timeout): it runs no more, and whether it ran
            # is for the operator to find out; the ledger says so to later rollouts.
            self.outstanding.clear()
        for e in record.ledger:  # written with the record, in the same transaction
            if e.revision == record.revision:
                self.keys.setdefault((e.revision, e.step), e)
        if isinstance(event, REPORTS):
            self.reports.append(event)
        if any(isinstance(c, RunMigration) for c in cmds):
            record = dataclasses.replace(record, migrator=self.leader)  # as the updater does
        self.record = record
        if record.phase is not self.phases[-1]:
            self.phases.append(record.phase)
        if record.phase in TERMINAL and before.phase in (Phase.RESOLVE, Phase.PULL):
            assert not any(isinstance(c, StopOnHosts) for c in self.commands), "stopped before cut-over"
        if record.phase is Phase.SUPERSEDED:
            assert Phase.START not in self.phases and Phase.STOP not in self.phases
            assert not any(isinstance(c, StartOnHosts | RestartOldRelease | StopOnHosts)
                           for c in self.commands)
            assert record.strategy == "rolling" or not any(isinstance(c, RunMigration) for c in self.commands)
            assert not any(p.status is HostStatus.MOVING for p in record.progress), "superseded mid-batch"
        for c in cmds:
            if isinstance(c, BeginRollout):
                self.revision = c.revision
                previous = None if self.header_lost else \
                    record.release if self.running_new else record.previous
                self.begin_rollout(previous, c.tag, self.ledger_keys(), ())
                self.header_lost = False

    header_lost = False

    def ledger_keys(self) -> tuple[LedgerEntry, ...]:
        return ledger_summary(ledger_order(self.keys.values()))

    def check_command(self, before: Rollout, after: Rollout, c: Command) -> None:
        if isinstance(c, RunMigration):
            key = (c.image_digest, c.step)
            assert key not in self.succeeded, f"{key} migrated twice"
            assert not self.outstanding, f"{key} issued while {self.outstanding} may run"
            assert c.image_digest == after.digest
            self.outstanding = {key}
        if isinstance(c, StartOnHosts):
            assert c.release == after.release and not after.rollback
            assert set(c.hosts) <= self.pulled_ok and set(after.hosts) <= self.pulled_ok, \
                "started before every participating host pulled the digest"
            assert all(p.digest == after.digest for p in after.progress)
            self.running_new = True
        if isinstance(c, StopOnHosts):
            assert set(after.hosts) <= self.pulled_ok
        if isinstance(c, ArmDeadline):
            assert c.deadline == after.deadline, "a timer armed for another barrier than the record's"
        if isinstance(c, RunMigration) and c.step in after.post_steps and after.strategy == "rolling":
            assert all(p.status is HostStatus.ACTIVE for p in after.progress) and not after.rollback, \
                "a post step before every host passed its gate on the new release"
        if isinstance(c, MoveHosts):
            assert set(c.hosts) <= self.pulled_ok, "moved before it pulled the digest"
            assert c.release == (after.previous if after.rollback else after.release)
            if not after.rollback:
                self.running_new = True

    def settle_migration(self, event: MigrationSucceeded | MigrationFailed | MigrationUnknown) -> None:
        key = (self.record.digest or "", event.step)
        if self.record.migrating == event.step and self.record.phase is Phase.MIGRATE:
            self.outstanding.discard(key)
            if isinstance(event, MigrationSucceeded):
                self.succeeded.add(key)

    @rule(data=st.data())
    def helpful_event(self, data: st.DataObject) -> None:
        """An event that moves the rollout on: random sequences alone rarely cross every barrier."""
        r = self.record
        waiting = [p.host for p in r.progress if
                   (r.phase is Phase.PULL and p.status is HostStatus.PENDING)
                   or (r.phase is Phase.STOP and p.status is HostStatus.PULLED)
                   or (r.phase is Phase.START and p.status is HostStatus.STOPPED)
                   or (r.phase is Phase.ROLL and p.status is HostStatus.MOVING)]
        options: list[Event] = []
        if r.phase is Phase.RESOLVE:
            options.append(Resolved(TAG_DIGEST.get(r.tag, D3)))
        label = data.draw(st.sampled_from(["expand", "none", "breaking", None]))
        for h in waiting:
            options.append({Phase.PULL: HostPulled(h, r.digest or D2, label), Phase.STOP: HostStopped(h),
                            Phase.START: HostActive(h), Phase.ROLL: HostActive(h)}[r.phase])
        if r.migrating:
            options.append(MigrationSucceeded(r.migrating))
        if r.deadline is not None and data.draw(st.integers(0, 9)) == 0:  # the barrier's timer fires
            options = [BarrierDeadline(r.revision, r.deadline.barrier)]
        if options:
            event = data.draw(st.sampled_from(options))
            if isinstance(event, MigrationSucceeded):
                self.settle_migration(event)
            self.apply(event)

    @rule(event=st.one_of(
        st.builds(Resolved, st.sampled_from([D1, D2, D3, "sha256:bad"])),
        st.builds(ResolveFailed, st.just("unknown")),
        st.builds(HostPulled, st.sampled_from(MACHINE_HOSTS), st.sampled_from([D1, D2, D3])),
        st.builds(HostPullFailed, st.sampled_from(MACHINE_HOSTS), st.just("x"), st.booleans()),
        st.builds(HostLost, st.sampled_from(MACHINE_HOSTS)),
        st.builds(BarrierDeadline, st.sampled_from([REV - 1, REV, REV + 1]),
                  st.sampled_from(["pull", "stop", "migrate:migrate", "migrate:collectstatic", "start",
                                   "rollback", "batch:0", "batch:1", "rollback:0"])),
        st.builds(HostStopped, st.sampled_from(MACHINE_HOSTS)),
        st.builds(MigrationSucceeded, st.sampled_from(["migrate", "collectstatic", "other"])),
        st.builds(MigrationFailed, st.sampled_from(["migrate", "collectstatic"]), st.just("boom")),
        st.builds(MigrationUnknown, st.sampled_from(["migrate", "collectstatic"]), st.just("gone")),
        st.builds(HostActive, st.sampled_from(MACHINE_HOSTS)),
        st.builds(HostFailed, st.sampled_from(MACHINE_HOSTS), st.just("exit 1")),
        st.builds(NewerVersion, st.sampled_from(["v1", "v2", "v3", "bad tag"]),
                  st.integers(REV - 1, REV + 30)),
        st.builds(Abort, st.just("ops")),
        st.just(Resumed()),
    ))
    def any_event(self, event: Event) -> None:
        if isinstance(event, MigrationSucceeded | MigrationFailed | MigrationUnknown):
            self.settle_migration(event)
        self.apply(event)

    @rule(seconds=st.sampled_from([1.0, 30.0, 200.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds

    leader = A

    @rule(leader=st.sampled_from(HOSTS))
    def leader_changes(self, leader: str = A) -> None:
        self.leader = leader
        self.record = Rollout.decode(self.record.encode(), "etcd")
        self.apply(Resumed())

    @invariant()
    def executors_claim_each_step_once(self) -> None:
        """What every host reads from the header (`host_duties`) asks one host, the migrator, to run
        the step being migrated; a step's claim, once made by a host, is never asked of another; and
        no host is asked to run a step its image already ran."""
        r = self.record
        h = proto.Header.of(r)
        for host in MACHINE_HOSTS:
            for d in proto.host_duties(h, host, host in r.hosts, frozenset(), None):
                if not isinstance(d, proto.Migrate):
                    continue
                assert host == r.migrator and d.step == r.migrating and d.digest == r.digest
                claimant = self.claims.setdefault((r.revision, d.step), host)
                assert claimant == host, f"step {d.step} claimed by {claimant}, asked of {host}"
                assert (d.digest, d.step) not in self.succeeded, f"{d.step} asked again of {host}"

    claims: dict[tuple[int, str], str]

    @rule(data=st.data(), applied=st.booleans())
    def a_leader_write_loses_its_reply(self, data: st.DataObject, applied: bool) -> None:
        """The write of the record after some event may or may not have applied: the leader stands
        down without acting; the next one reads whichever record etcd holds, and resumes."""
        if applied:
            self.helpful_event(data)
        self.leader_changes(data.draw(st.sampled_from(HOSTS)))

    @rule()
    def compaction_relists_the_reports(self) -> None:
        """A new leader's (or a compacted watch's) list of the rollout's reports: all of them again,
        in the order etcd took them, against the record as it stands."""
        replay, self.reports = list(self.reports), []
        for event in replay:
            self.apply(event)
        self.reports = replay  # etcd holds each report once, whatever the replays

    @rule()
    def the_header_is_lost(self) -> None:
        """The header deleted or unreadable: the next rollout begins from the ledger's keys alone,
        with no previous release known."""
        self.header_lost = True

    @invariant()
    def round_trips(self) -> None:
        assert Rollout.decode(self.record.encode(), "etcd") == self.record

    @invariant()
    def a_barrier_has_a_duration_of_its_own(self) -> None:
        r = self.record
        if r.phase in (Phase.PULL, Phase.STOP, Phase.MIGRATE, Phase.START, Phase.ROLL):
            barrier = {Phase.PULL: "pull", Phase.STOP: "stop", Phase.MIGRATE: f"migrate:{r.migrating}",
                       Phase.START: "rollback" if r.rollback else "start",
                       Phase.ROLL: f"{'rollback' if r.rollback else 'batch'}:{r.batch_index}"}[r.phase]
            assert r.deadline is not None and r.deadline.barrier == barrier and r.deadline.seconds > 0

    @invariant()
    def terminal_means_an_outcome(self) -> None:
        r = self.record
        if r.terminal:
            assert r.outcome is r.phase and r.ended_at is not None and r.deadline is None
        if r.rollback:
            assert r.outcome in (Phase.FAILED, Phase.ROLLED_BACK)
            assert r.phase in (Phase.START, Phase.ROLL, Phase.FAILED, Phase.ROLLED_BACK)

    @invariant()
    def at_most_a_batch_is_out(self) -> None:
        """A rolling update never has more than max_unavailable hosts moving at once, and moves only
        the hosts of its current batch."""
        r = self.record
        moving = [p.host for p in r.progress if p.status is HostStatus.MOVING]
        if r.phase is Phase.ROLL:
            assert set(moving) <= set(r.batch)
            assert len(moving) <= batch_size(self.policy.max_unavailable, len(self.hosts))
        for host in MACHINE_HOSTS:
            duties = proto.host_duties(proto.Header.of(r), host, host in r.hosts, frozenset(), None)
            if any(isinstance(d, proto.Move) for d in duties):
                assert host in r.batch  # asked of no other host (one that reported has its report)


REPORTS = (HostPulled, HostPullFailed, HostStopped, MigrationSucceeded, MigrationFailed, MigrationUnknown,
           HostActive, HostFailed, Abort)

TestRolloutMachine = RolloutMachine.TestCase
# A few hundred examples in every run; NORM_MODEL_EXAMPLES=10000 (or more) for a long search.
TestRolloutMachine.settings = settings(max_examples=int(os.environ.get("NORM_MODEL_EXAMPLES", "150")),
                                       stateful_step_count=40, deadline=None)


def test_a_resumed_migrate_waits_for_the_report_of_the_step_it_issued() -> None:
    """The module's word on it: a new leader finding a step issued neither halts nor issues it again;
    the report that comes (adopted by the migrator) moves the rollout on."""
    r = Rollout.decode(at("migrate").encode(), "etcd")
    resumed, cmds = step(r, Resumed(), 5.0, POLICY)
    assert resumed == r and resumed.phase is Phase.MIGRATE and resumed.migrating == "migrate"
    assert not any(isinstance(c, RunMigration) for c in cmds)
    r, cmds = step(resumed, MigrationSucceeded("migrate"), 6.0, POLICY)
    assert r.migrating == "collectstatic" and RunMigration("collectstatic", D2) in cmds


def test_the_steps_run_where_the_image_was_pulled() -> None:
    r, _ = run(new(), Resolved(D2), HostPulled(B, D2), HostPulled(C, D2))
    assert migrator_for(r, B) == B  # the leader pulled it: the leader
    assert migrator_for(r, A) == B  # the leader did not: the first host that did
    r, _ = run(r, fired(r))  # the barrier leaves A out
    assert r.phase is Phase.STOP and [e.host for e in r.excluded] == [A]
    assert migrator_for(r, A) == B
    assert migrator_for(at("migrate"), C) == C


@pytest.mark.parametrize("number", ["9" * 400, "-" + "9" * 400, "1e400", "-1e999", "Infinity", "NaN"])
@pytest.mark.parametrize("field", ["started_at", "updated_at"])
def test_a_time_in_a_record_that_is_no_finite_float_is_refused(field: str, number: str) -> None:
    record, _ = start_rollout(REV, "v2", HOSTS, 1.0, previous=OLD)
    data = json.loads(record.encode())
    data[field] = "@N@"
    raw = json.dumps(data).replace('"@N@"', number).encode()
    with pytest.raises(InvalidValue):
        Rollout.decode(raw, "/norm/rollouts/7/record")


# ---------------------------------------------------------------------------------------------------
# Rolling updates


def moved(commands: list[Command]) -> list[tuple[tuple[str, ...], str]]:
    return [(c.hosts, c.release.tag) for c in commands if isinstance(c, MoveHosts)]


def test_a_whole_rolling_update() -> None:
    r, cmds = run(new(), Resolved(D2), policy=ROLLING)
    r, cmds = run(r, *(HostPulled(h, D2, "expand") for h in HOSTS), policy=ROLLING)
    assert r.strategy == "rolling" and "expand" in (r.strategy_reason or "")
    assert r.phase is Phase.MIGRATE and r.migrating == "migrate" and r.post_steps == ("collectstatic",)
    assert not any(isinstance(c, StopOnHosts) for c in cmds)  # the previous release keeps serving
    r, cmds = run(r, MigrationSucceeded("migrate"), policy=ROLLING)
    assert r.phase is Phase.ROLL and r.batches == ((A,), (B,), (C,)) and r.batch == (A,)
    assert moved(cmds) == [((A,), "v2")] and ArmDeadline(Deadline("batch:0", 90.0)) in cmds
    r, cmds = run(r, HostActive(A), policy=ROLLING)
    assert r.batch == (B,) and moved(cmds) == [((B,), "v2")]
    r, cmds = run(r, HostActive(B), HostActive(C), policy=ROLLING)
    assert r.phase is Phase.MIGRATE and r.migrating == "collectstatic" and r.rolled
    assert [c for c in cmds if isinstance(c, RunMigration)] == [RunMigration("collectstatic", D2)]
    r, cmds = run(r, MigrationSucceeded("collectstatic"), policy=ROLLING)
    assert r.phase is Phase.DONE
    assert [(e.step, e.stage) for e in r.ledger] == [("migrate", "pre"), ("collectstatic", "post")]


@pytest.mark.parametrize(("max_unavailable", "batches"), [
    ("2", ((A, B), (C,))), ("50%", ((A,), (B,), (C,))), ("67%", ((A, B), (C,))), ("100%", ((A, B, C),)),
    ("9", ((A, B, C),))])
def test_batches_are_max_unavailable_hosts(max_unavailable: str, batches: tuple[tuple[str, ...]]) -> None:
    policy = dataclasses.replace(ROLLING, max_unavailable=max_unavailable, steps=(), post_steps=frozenset())
    r, _ = run(new(), Resolved(D2), policy=policy)
    r, _ = run(r, *(HostPulled(h, D2, "none") for h in HOSTS), policy=policy)
    assert r.phase is Phase.ROLL and r.batches == batches


@pytest.mark.parametrize("bad", ["0", "0%", "101%", "-1", "one", "", "1.5"])
def test_max_unavailable_has_a_grammar(bad: str) -> None:
    with pytest.raises(ValueError, match="max_unavailable"):
        dataclasses.replace(ROLLING, max_unavailable=bad)


def test_a_host_failing_its_gate_rolls_back_every_host_moved() -> None:
    r = rolling_at("roll")
    r, _ = run(r, HostActive(A), policy=ROLLING)
    r, cmds = run(r, HostFailed(B, "djed-web.service: GET /healthz answered 500"), policy=ROLLING)
    assert r.phase is Phase.ROLL and r.rollback and r.outcome is Phase.ROLLED_BACK
    assert r.batches == ((B,), (A,)) and moved(cmds) == [((B,), "v1")]  # the latest moved first
    assert "answered 500" in (r.reason or "") and B in (r.reason or "")
    r, cmds = run(r, HostActive(B), policy=ROLLING)
    assert moved(cmds) == [((A,), "v1")]
    r, cmds = run(r, HostActive(A), policy=ROLLING)
    assert r.phase is Phase.ROLLED_BACK and not any(isinstance(c, RunMigration) for c in cmds)
    assert proto.Header.of(r).fleet_release() == OLD
    assert [e.step for e in r.ledger] == ["migrate"]  # no post step: the previous release may run


def test_a_late_report_of_the_new_release_during_a_rollback_changes_nothing() -> None:
    r = rolling_at("roll-back")
    assert r.batch == (A,)
    again, cmds = step(r, HostActive(C), 2.0, ROLLING)  # C never moved
    assert again == r and cmds == ()


def test_without_automatic_rollback_a_failing_batch_halts() -> None:
    policy = dataclasses.replace(ROLLING, auto_rollback=False)
    r, _ = run(rolling_at("roll"), HostFailed(A, "exit 1"), policy=policy)
    assert r.phase is Phase.HALTED and "automatic rollback is off" in (r.reason or "")


def test_a_batch_without_progress_in_time_rolls_back() -> None:
    r = rolling_at("roll")
    r, cmds = run(r, fired(r), policy=ROLLING)
    assert r.rollback and r.host(A).status is HostStatus.MOVING  # type: ignore[union-attr]
    assert "progress deadline" in (r.reason or "") and moved(cmds) == [((A,), "v1")]


def test_a_newer_version_supersedes_a_rolling_update_at_a_batch_boundary() -> None:
    r = rolling_at("roll")
    r, cmds = run(r, NewerVersion("v3", REV + 1), policy=ROLLING)
    assert r.phase is Phase.ROLL and cmds == []  # A is moving: it finishes first
    r, cmds = run(r, HostActive(A), policy=ROLLING)
    assert r.phase is Phase.SUPERSEDED and "after batch 1 of 3" in (r.reason or "")
    assert BeginRollout("v3", REV + 1) in cmds and not moved(cmds)
    assert proto.Header.of(r).fleet_release() is None  # the newer rollout moves every host


def test_a_newer_version_during_a_pre_step_supersedes_once_it_ends() -> None:
    r, _ = run(rolling_at("pre"), NewerVersion("v3", REV + 1), policy=ROLLING)
    assert r.phase is Phase.MIGRATE
    r, cmds = run(r, MigrationSucceeded("migrate"), policy=ROLLING)
    assert r.phase is Phase.SUPERSEDED and not moved(cmds) and BeginRollout("v3", REV + 1) in cmds


def test_a_failed_pre_step_fails_with_no_host_moved() -> None:
    r, cmds = run(rolling_at("pre"), MigrationFailed("migrate", "exit 1"), policy=ROLLING)
    assert r.phase is Phase.FAILED and "no host had moved" in (r.reason or "")
    assert not any(isinstance(c, RestartOldRelease | MoveHosts) for c in cmds)


def test_an_abort_during_the_batches_rolls_back() -> None:
    r, _ = run(rolling_at("roll"), HostActive(A), policy=ROLLING)
    r, cmds = run(r, Abort("ops"), policy=ROLLING)
    assert r.rollback and "aborted by ops" in (r.reason or "")
    assert moved(cmds) == [((B, A), "v1")] or moved(cmds) == [((B,), "v1")]


def test_an_abort_during_a_pre_step_fails_once_it_ends() -> None:
    r, _ = run(rolling_at("pre"), Abort("ops"), policy=ROLLING)
    r, cmds = run(r, MigrationSucceeded("migrate"), policy=ROLLING)
    assert r.phase is Phase.FAILED and "aborted by ops" in (r.reason or "") and not moved(cmds)


def test_a_host_lost_in_its_batch_lets_the_next_batch_move() -> None:
    r, cmds = run(rolling_at("roll"), HostLost(A), policy=ROLLING)
    assert r.batch == (B,) and moved(cmds) == [((B,), "v2")] and A not in r.hosts


def test_a_new_leader_moves_the_batch_on() -> None:
    r = Rollout.decode(rolling_at("roll").encode(), "etcd")
    r, cmds = run(r, Resumed(), policy=ROLLING)
    assert moved(cmds) == [((A,), "v2")] and ArmDeadline(Deadline("batch:0", 90.0)) in cmds


@pytest.mark.parametrize(("policy", "migrations", "strategy", "says"), [
    (ROLLING, "expand", "rolling", "expand"),
    (ROLLING, "none", "rolling", "'none'"),
    (ROLLING, None, "recreate", "does not declare"),
    (ROLLING, "breaking", "recreate", "breaking"),
    (dataclasses.replace(ROLLING, strategy="rolling"), "breaking", "recreate", "falling back to recreate"),
    (POLICY, "expand", "recreate", "asks for recreate"),
])
def test_the_strategy_and_its_reason(policy: RolloutPolicy, migrations: Any, strategy: str,
                                     says: str) -> None:
    r, _ = run(new(), Resolved(D2), policy=policy)
    r, _ = run(r, *(HostPulled(h, D2, migrations) for h in HOSTS), policy=policy)
    assert r.strategy == strategy and says in (r.strategy_reason or "")
    assert proto.Header.of(r).strategy_reason == r.strategy_reason


def test_a_first_deploy_recreates() -> None:
    r, _ = run(new(previous=None), Resolved(D2), policy=ROLLING)
    r, _ = run(r, *(HostPulled(h, D2, "expand") for h in HOSTS), policy=ROLLING)
    assert r.strategy == "recreate" and "nothing to keep serving" in (r.strategy_reason or "")


def entry(digest: str, tag: str, step: str, rev: int, stage: Any) -> LedgerEntry:
    return LedgerEntry(digest, tag, step, True, rev, float(rev), stage=stage)


def test_setting_back_below_the_rollback_floor_is_refused() -> None:
    ledger = (entry(D1, "v1", "migrate", 1, "pre"), entry(D2, "v2", "migrate", 2, "pre"),
              entry(D2, "v2", "collectstatic", 2, "post"))
    r, cmds = run(new(tag="v1", previous=Release("v2", D2), ledger=ledger), Resolved(D1), policy=ROLLING)
    assert r.phase is Phase.FAILED and "rollback floor" in (r.reason or "") and "v2" in (r.reason or "")
    assert not any(isinstance(c, PullOnHosts) for c in cmds)


def test_setting_back_above_the_floor_rolls_without_any_step() -> None:
    ledger = (entry(D1, "v1", "migrate", 1, "pre"), entry(D1, "v1", "collectstatic", 1, "post"),
              entry(D2, "v2", "migrate", 2, "pre"))
    r, _ = run(new(tag="v1", previous=Release("v2", D2), ledger=ledger), Resolved(D1), policy=ROLLING)
    assert r.phase is Phase.PULL
    r, cmds = run(r, *(HostPulled(h, D1, "expand") for h in HOSTS), policy=ROLLING)
    assert r.phase is Phase.ROLL and not any(isinstance(c, RunMigration) for c in cmds)


# ---------------------------------------------------------------------------------------------------
# Pause, resume, promote; a canary and its analysis


def test_a_pause_during_the_pull_holds_once_every_host_pulled_and_a_resume_goes_on() -> None:
    r, _ = run(new(), Resolved(D2), PauseAsked("alice", 900))
    assert r.phase is Phase.PULL and r.pause == "paused by alice" and r.waiting is None
    r, commands = run(r, *pulled(r))
    assert r.phase is Phase.PULL and r.waiting == "pull" and r.deadline is None and commands == []
    assert run(r, Resumed())[1] == []  # a new leader: nothing to re-issue while it waits
    r, commands = run(r, ResumeAsked("bob", 901))
    assert r.phase is Phase.STOP and r.pause is None and r.waiting is None
    assert StopOnHosts(HOSTS) in commands
    assert [(a.kind, a.by, a.request) for a in r.actions] == [("pause", "alice", 900), ("resume", "bob", 901)]
    # The same requests read again (a new leader re-reads them) change nothing.
    assert run(r, PauseAsked("alice", 900), ResumeAsked("bob", 901))[0] == r


def test_a_pause_during_a_batch_lets_the_batch_finish_and_holds_before_the_next() -> None:
    r = run(rolling_at("roll"), PauseAsked("alice", 900), policy=ROLLING)[0]
    assert r.batch == (A,)
    r, commands = run(r, HostActive(A), policy=ROLLING)
    assert r.phase is Phase.ROLL and r.waiting == "batch" and r.batch_index == 1 and commands == []
    assert run(r, HostLost(C), policy=ROLLING)[0].waiting == "batch"  # nothing moves meanwhile
    r, commands = run(r, ResumeAsked("alice", 901), policy=ROLLING)
    assert r.waiting is None and MoveHosts((B,), Release("v2", D2)) in commands


def test_a_newer_version_or_an_abort_while_waiting_between_batches() -> None:
    r = run(rolling_at("roll"), PauseAsked("alice", 900), HostActive(A), policy=ROLLING)[0]
    superseded = run(r, NewerVersion("v3", REV + 5), policy=ROLLING)[0]
    assert superseded.phase is Phase.SUPERSEDED and superseded.waiting is None
    aborted, commands = run(r, Abort("ops"), policy=ROLLING)
    assert aborted.rollback and aborted.batches == ((A,),)  # only the host that moved goes back
    assert MoveHosts((A,), OLD) in commands


def test_a_canary_moves_alone_and_waits_for_its_analysis() -> None:
    r, _ = run(new(), Resolved(D2), policy=CANARY)
    r, _ = run(r, *(HostPulled(h, D2, "expand") for h in r.hosts), MigrationSucceeded("migrate"),
               policy=CANARY)
    assert r.batches == ((A,), (B,), (C,)) and r.canary == 1 and r.batch == (A,)
    r, commands = run(r, HostActive(A), policy=CANARY)
    assert r.waiting == "canary" and commands == [RunAnalysis(REV, (A,))]
    assert run(r, Resumed(), policy=CANARY)[1] == [RunAnalysis(REV, (A,))]  # a new leader analyses again
    passed, commands = run(r, AnalysisEnded(REV, "passed"), policy=CANARY)
    assert passed.waiting is None and MoveHosts((B,), Release("v2", D2)) in commands
    promoted, commands = run(r, PromoteAsked("alice", 900), policy=CANARY)
    assert promoted.waiting is None and MoveHosts((B,), Release("v2", D2)) in commands
    assert run(promoted, AnalysisEnded(REV, "failed", "late"), policy=CANARY)[0] == promoted  # late


def test_an_undo_goes_back_without_a_canary() -> None:
    """`norm undo` returns to a release the fleet ran: no canary, no analysis, as a rollback."""
    r = dataclasses.replace(new(), undo=7)
    r, _ = run(r, Resolved(D2), policy=CANARY)
    r, _ = run(r, *(HostPulled(h, D2, "expand") for h in r.hosts), MigrationSucceeded("migrate"),
               policy=CANARY)
    assert r.batches == ((A,), (B,), (C,)) and r.canary == 0
    r, commands = run(r, HostActive(A), policy=CANARY)
    assert r.waiting is None and not [c for c in commands if isinstance(c, RunAnalysis)]
    assert MoveHosts((B,), Release("v2", D2)) in commands


def test_a_failed_analysis_puts_the_canary_back_and_no_other_host_moves() -> None:
    r = at("canary")
    r, commands = run(r, AnalysisEnded(REV, "failed", "error rate 0.05 >= 0.01"), policy=CANARY)
    assert r.rollback and r.outcome is Phase.ROLLED_BACK and r.batches == ((A,),)
    assert [c for c in commands if isinstance(c, MoveHosts)] == [MoveHosts((A,), OLD)]
    assert "failed its analysis: error rate 0.05 >= 0.01" in (r.reason or "")
    r, _ = run(r, HostActive(A), policy=CANARY)
    assert r.phase is Phase.ROLLED_BACK
    halted = run(at("canary"), AnalysisEnded(REV, "failed", "x"),
                 policy=dataclasses.replace(CANARY, auto_rollback=False))[0]
    assert halted.phase is Phase.HALTED


def test_an_inconclusive_analysis_pauses_and_a_resume_analyses_again() -> None:
    r, commands = run(at("canary"), AnalysisEnded(REV, "inconclusive", "no data"), policy=CANARY)
    assert r.waiting == "canary" and r.pause == "the canary's analysis was inconclusive: no data"
    assert commands == [] and run(r, Resumed(), policy=CANARY)[1] == []
    r, commands = run(r, ResumeAsked("alice", 900), policy=CANARY)
    assert r.pause is None and r.waiting == "canary" and commands == [RunAnalysis(REV, (A,))]
    assert run(r, AnalysisEnded(REV, "passed"), policy=CANARY)[0].batch == (B,)


def test_every_record_with_a_pause_or_a_canary_reads_back_as_itself() -> None:
    for name in ("paused-pull", "paused-batch", "canary"):
        r = RECORDS[name]
        assert Rollout.decode(r.encode(), "test") == r


def test_a_pause_during_a_pre_step_holds_before_the_first_batch() -> None:
    r = run(rolling_at("pre"), PauseAsked("alice", 900), policy=ROLLING)[0]
    r, commands = run(r, MigrationSucceeded("migrate"), policy=ROLLING)
    assert r.phase is Phase.ROLL and r.waiting == "batch" and r.batch_index == 0
    assert not [c for c in commands if isinstance(c, MoveHosts)]
    assert r.batch == () and proto.Header.of(r).batch == ()  # no host moves while it waits
    r, commands = run(r, ResumeAsked("alice", 901), policy=ROLLING)
    assert MoveHosts((A,), Release("v2", D2)) in commands



def test_a_block_holds_at_the_next_boundary_and_its_end_goes_on_by_itself() -> None:
    closed = Blocked("outside the maintenance windows")
    r, _ = run(new(), Resolved(D2), closed)
    r, commands = run(r, *pulled(r))
    assert r.waiting == "pull" and commands == [] and r.blocked == "outside the maintenance windows"
    r, commands = run(r, Unblocked())
    assert r.phase is Phase.STOP and r.blocked is None and StopOnHosts(HOSTS) in commands
    # Between batches: the batch moving finishes, the next waits for the window.
    r = run(rolling_at("roll"), closed, HostActive(A), policy=ROLLING)[0]
    assert r.waiting == "batch" and r.batch == ()
    # A pause and a block: both must end.
    r = run(r, PauseAsked("alice", 900), policy=ROLLING)[0]
    assert run(r, Unblocked(), policy=ROLLING)[0].waiting == "batch"
    r, commands = run(r, ResumeAsked("alice", 901), Unblocked(), policy=ROLLING)
    assert r.waiting is None and MoveHosts((B,), Release("v2", D2)) in commands


def test_a_rollout_deployed_now_is_not_held_by_a_block() -> None:
    from norm.core.record import Asked

    record, _ = start_rollout(REV, "v2", HOSTS, 0.0, previous=OLD, asked=Asked("alice", now=True))
    assert record.override
    r, _ = run(record, Resolved(D2), Blocked("alerts firing: DiskFull"))
    r, commands = run(r, *pulled(r))
    assert r.phase is Phase.STOP and r.blocked == "alerts firing: DiskFull"
    assert StopOnHosts(HOSTS) in commands
