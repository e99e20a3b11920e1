"""Load-balancer presence decisions: when the host belongs in its target groups, and the calls that
put it there or take it out."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from norm.core.errors import InvalidValue
from norm.core.presence import (
    CheckHealth,
    Deregister,
    Observed,
    Register,
    arn_region,
    decide,
    is_drained,
    is_registered,
    wanted,
)

A = "arn:aws:elasticloadbalancing:eu-west-1:123456789012:targetgroup/web-a/0123456789abcdef"
B = "arn:aws:elasticloadbalancing:eu-west-1:123456789012:targetgroup/web-b/fedcba9876543210"


def groups(a: bool | None, b: bool | None = None) -> dict[str, bool | None]:
    return {A: a, B: b}


def test_an_active_unit_is_checked_before_it_is_registered() -> None:
    assert decide(Observed("inv1", groups(False, False))) == (CheckHealth("inv1"),)


def test_a_healthy_run_is_registered_in_every_group() -> None:
    assert decide(Observed("inv1", groups(False, False), healthy="inv1")) == (Register(A), Register(B))


def test_only_the_groups_it_is_missing_from() -> None:
    assert decide(Observed("inv1", groups(True, False), healthy="inv1")) == (Register(B),)
    assert decide(Observed("inv1", groups(True, True), healthy="inv1")) == ()


def test_without_a_health_url_active_is_enough() -> None:
    assert decide(Observed("inv1", groups(False, None), needs_health=False)) == (Register(A), Register(B))


def test_a_health_check_passed_by_an_earlier_run_does_not_count() -> None:
    # The unit was restarted (a new invocation): its health is checked again, and it is taken out
    # meanwhile.
    assert decide(Observed("inv2", groups(True, True), healthy="inv1")) == (
        CheckHealth("inv2"), Deregister(A), Deregister(B))


def test_a_unit_that_is_not_active_is_taken_out() -> None:
    assert decide(Observed(None, groups(True, True), healthy="inv1")) == (Deregister(A), Deregister(B))
    assert decide(Observed(None, groups(False, False))) == ()


def test_unknown_registration_gets_the_call_either_way() -> None:
    assert decide(Observed(None, groups(None, False))) == (Deregister(A),)
    assert decide(Observed("i", groups(None, True), healthy="i")) == (Register(A),)
    assert decide(Observed("i", groups(None, True), gave_up="i")) == (Deregister(A), Deregister(B))


def test_unknown_registration_waits_for_the_health_check() -> None:
    # An agent restarted under a serving unit does not take the host out while it checks the unit.
    assert decide(Observed("i", groups(None, True))) == (CheckHealth("i"), Deregister(B))
    assert decide(Observed("i", groups(None, None), suspended=True)) == (Deregister(A), Deregister(B))


def test_a_gave_up_health_check_is_not_started_again_for_that_run() -> None:
    assert decide(Observed("inv1", {A: False}, gave_up="inv1")) == ()
    assert decide(Observed("inv2", {A: False}, gave_up="inv1")) == (CheckHealth("inv2"),)


def test_suspended_by_an_update_it_is_taken_out_and_nothing_is_checked() -> None:
    o = Observed("inv1", groups(True, True), healthy="inv1", suspended=True)
    assert decide(o) == (Deregister(A), Deregister(B))
    assert decide(Observed("inv2", groups(False, False), suspended=True)) == ()


def test_the_run_an_update_stopped_is_never_registered_again() -> None:
    # After the start, the watch may still show the run the update stopped: it stays out.
    o = Observed("inv1", groups(False, False), healthy="inv1", stale="inv1")
    assert decide(o) == ()
    assert decide(Observed("inv2", groups(False, False), stale="inv1")) == (CheckHealth("inv2"),)


@given(invocation=st.sampled_from([None, "a", "b"]), healthy=st.sampled_from([None, "a", "b"]),
       gave_up=st.sampled_from([None, "a", "b"]), stale=st.sampled_from([None, "a", "b"]),
       needs_health=st.booleans(), suspended=st.booleans(),
       reg=st.tuples(st.sampled_from([None, True, False]), st.sampled_from([None, True, False])))
def test_properties(invocation: str | None, healthy: str | None, gave_up: str | None, stale: str | None,
                    needs_health: bool, suspended: bool, reg: tuple[bool | None, bool | None]) -> None:
    o = Observed(invocation, groups(*reg), healthy=healthy, gave_up=gave_up, needs_health=needs_health,
                 suspended=suspended, stale=stale)
    commands = decide(o)
    want = wanted(o)
    # Never registered while suspended, stopped, stale, or not yet healthy.
    if any(isinstance(c, Register) for c in commands):
        assert not suspended and invocation is not None and invocation != stale
        assert not needs_health or healthy == invocation
    # Register and deregister never both; each group at most once; only what differs.
    calls = [c for c in commands if not isinstance(c, CheckHealth)]
    assert len({type(c) for c in calls}) <= 1
    assert len({c.target_group for c in calls}) == len(calls)
    for c in calls:
        assert o.registered[c.target_group] is not (isinstance(c, Register))
    # Applying the commands reaches a fixed point (an unknown registration may wait for the check).
    checking = any(isinstance(c, CheckHealth) for c in commands)
    after = dict(o.registered)
    for c in calls:
        after[c.target_group] = isinstance(c, Register)
    assert all(v is want or (v is None and checking and not want) for v in after.values())
    assert not [c for c in decide(Observed(invocation, after, healthy=healthy, gave_up=gave_up,
                                           needs_health=needs_health, suspended=suspended, stale=stale))
                if not isinstance(c, CheckHealth)]
    # A health check only for the current, eligible run, and only while it is not healthy.
    for c in commands:
        if isinstance(c, CheckHealth):
            assert c.invocation == invocation and invocation not in (healthy, gave_up)
            assert needs_health and not suspended and invocation != stale


@pytest.mark.parametrize(("state", "reason", "registered", "drained"), [
    ("initial", "Elb.RegistrationInProgress", True, False),
    ("healthy", None, True, False),
    ("unhealthy", "Target.FailedHealthChecks", True, False),
    ("unavailable", "Target.HealthCheckDisabled", True, False),
    ("unused", "Target.NotInUse", True, False),
    ("unused", "Target.InvalidState", True, False),
    ("draining", "Target.DeregistrationInProgress", False, False),
    ("unhealthy.draining", "Target.FailedHealthChecks", False, False),
    ("unused", "Target.NotRegistered", False, True),
])
def test_target_states(state: str, reason: str | None, registered: bool, drained: bool) -> None:
    assert is_registered(state, reason) is registered
    assert is_drained(state, reason) is drained


def test_arns() -> None:
    assert arn_region(A) == "eu-west-1"
    assert arn_region(B.replace("eu-west-1", "us-gov-west-1")) == "us-gov-west-1"
    with pytest.raises(InvalidValue, match=r"lb\.target_groups"):
        arn_region("arn:aws:s3:::bucket")
