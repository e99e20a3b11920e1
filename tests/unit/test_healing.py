"""The healing policy: which units get healed, when, how often, and what is reported about them.

Scenario tests drive `decide` the way the healer does (history carried over, `heal_finished` after a
Heal); hypothesis drives it through arbitrary sequences of observations, holds, lifts and times
and checks the design's invariants and a model of the documented behaviour. Times in the generated
sequences are sums of dyadic fractions, so that float arithmetic is exact and the properties test
the policy, not rounding (rounding gets its own tests at the end).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from norm.core.backoff import Backoff
from norm.core.errors import InvalidValue
from norm.core.healing import (
    Command,
    Decision,
    Heal,
    HealPolicy,
    Quarantine,
    QuarantineLifted,
    Recovered,
    UnitHealth,
    Unloadable,
    decide,
    from_record,
    heal_finished,
    lasting,
    lift,
    to_record,
)
from norm.core.units import UnitState

U = "app.service"
V = "api.service"  # sorts before U
NOBODY: frozenset[str] = frozenset()

_SUB = {"active": "running", "reloading": "reload", "failed": "failed", "inactive": "dead",
        "activating": "start", "deactivating": "stop-sigterm"}


def unit(active: str = "failed", sub: str | None = None, *, name: str = U, load: str = "loaded",
         reload: bool = False) -> UnitState:
    return UnitState(name, load_state=load, active_state=active, sub_state=sub or _SUB[active],
                     result="exit-code" if active == "failed" else "success", need_daemon_reload=reload)


FAILED = unit("failed")
ACTIVE = unit("active")

# Deterministic: no jitter, delays 1, 2, 4, 8, 8, ... before the second, third, ... attempt.
POLICY = HealPolicy(backoff=Backoff(first=1.0, factor=2.0, cap=8.0, jitter=0.0), budget=5, window=100.0,
                    cooldown=200.0, forget_after=50.0)


class Shell:
    """Carries out decisions as the healer does: keeps the history, and finishes each regimen right
    after its Heal unless told not to."""

    def __init__(self, policy: HealPolicy = POLICY, *, finish: bool = True) -> None:
        self.policy = policy
        self.finish = finish
        self.history: dict[str, UnitHealth] = {}
        self.held: set[str] = set()
        self.log: list[tuple[float, Command]] = []

    def decide(self, now: float, *states: UnitState, rand: float = 0.5) -> Decision:
        d = decide({s.name: s for s in states}, self.history, frozenset(self.held), now, self.policy, rand)
        self.history = dict(d.history)
        for c in d.commands:
            self.log.append((now, c))
            if isinstance(c, Heal) and self.finish:
                self.history = heal_finished(self.history, c.unit)
        return d

    def heals(self, name: str = U) -> list[tuple[float, int]]:
        return [(t, c.attempt) for t, c in self.log if isinstance(c, Heal) and c.unit == name]


def run_failing(policy: HealPolicy, steps: int, *, rand: float = 0.5) -> Shell:
    """A unit that never recovers, decided on whenever a regimen ends or wake_at comes."""
    shell = Shell(policy)
    now = 0.0
    for _ in range(steps):
        d = shell.decide(now, FAILED, rand=rand)
        if any(isinstance(c, Heal) for c in d.commands):
            continue  # the regimen ended: the healer decides again straight away
        assert d.wake_at is not None and d.wake_at > now
        now = d.wake_at
    return shell


# ---------------------------------------------------------------------------------------------------
# The policy's knobs


def test_policy_defaults() -> None:
    p = HealPolicy()
    assert (p.budget, p.window, p.cooldown, p.forget_after) == (5, 600.0, 1800.0, 300.0)
    assert p.backoff == Backoff(first=1.0, factor=2.0, cap=60.0, jitter=0.2)


@pytest.mark.parametrize(("attempt", "rand", "expected"), [
    (0, 0.0, 0.0), (0, 0.99, 0.0),  # the first attempt of an episode is immediate
    (1, 0.5, 1.0), (2, 0.5, 2.0), (3, 0.5, 4.0), (4, 0.5, 8.0), (5, 0.5, 8.0), (50, 0.5, 8.0),
])
def test_delay_before_an_attempt(attempt: int, rand: float, expected: float) -> None:
    assert POLICY.delay_before(attempt, rand) == expected


@pytest.mark.parametrize("attempt", [1, 2, 7, 100])
@pytest.mark.parametrize("rand", [0.0, 0.25, 0.999])
def test_delay_before_follows_the_backoff_and_its_jitter(attempt: int, rand: float) -> None:
    p = HealPolicy()
    assert p.delay_before(attempt, rand) == p.backoff.delay(attempt - 1, rand) <= p.backoff.cap


# ---------------------------------------------------------------------------------------------------
# What one observation leads to, from no history


def _id(v: object) -> str:
    if isinstance(v, UnitState):
        return f"{v.load_state}/{v.active_state}/{v.sub_state}"
    if isinstance(v, bool):
        return "held" if v else "free"
    return "+".join(type(c).__name__ for c in v) or "nothing"  # type: ignore[attr-defined]


@pytest.mark.parametrize(("state", "held", "expected"), [
    (unit("active"), False, ()),
    (unit("active", "exited"), False, ()),
    (unit("reloading"), False, ()),
    (unit("active"), True, ()),
    (unit("failed"), False, (Heal(U, 0, reload=False),)),
    (unit("failed", reload=True), False, (Heal(U, 0, reload=True),)),
    (unit("failed"), True, ()),  # held on purpose
    (unit("failed", "auto-restart"), False, ()),  # systemd restarts it itself
    (unit("activating", "auto-restart"), False, ()),
    (unit("inactive", "auto-restart"), False, ()),
    (unit("activating"), False, ()),
    (unit("activating", "start-pre"), False, ()),
    (unit("deactivating"), False, ()),
    (unit("inactive"), False, ()),  # stopped cleanly
    (unit("failed", load="not-found"), False, (Unloadable(U, "not-found"),)),
    (unit("inactive", load="masked"), False, (Unloadable(U, "masked"),)),
    (unit("failed", load="bad-setting"), True, (Unloadable(U, "bad-setting"),)),
    (unit("active", load="error"), False, (Unloadable(U, "error"),)),
], ids=_id)
def test_first_observation(state: UnitState, held: bool, expected: tuple[Command, ...]) -> None:
    d = decide({U: state}, {}, frozenset({U}) if held else NOBODY, 10.0, POLICY)
    assert d.commands == expected
    assert set(d.history) == {U}
    if expected and isinstance(expected[0], Heal):
        h = d.history[U]
        assert (h.in_flight, h.streak, h.attempts) == (True, 1, (10.0,))
        assert (h.failed_since, h.next_at) == (10.0, 11.0)
        assert d.wake_at is None  # the end of the regimen wakes the healer
    else:
        assert d.wake_at is None


@pytest.mark.parametrize("reload", [False, True])
def test_reload_is_asked_exactly_when_the_unit_file_changed(reload: bool) -> None:
    shell = Shell()
    shell.decide(0.0, unit(reload=reload))
    shell.decide(1.0, unit(reload=not reload))
    assert [c.reload for _, c in shell.log if isinstance(c, Heal)] == [reload, not reload]


# ---------------------------------------------------------------------------------------------------
# Backoff, in flight, budget, quarantine


def test_a_failing_unit_backs_off_exponentially_up_to_the_cap() -> None:
    shell = run_failing(dataclasses.replace(POLICY, budget=100, window=1000.0, cooldown=1000.0), 16)
    assert shell.heals()[:8] == [(0.0, 0), (1.0, 1), (3.0, 2), (7.0, 3), (15.0, 4), (23.0, 5), (31.0, 6),
                                 (39.0, 7)]


@pytest.mark.parametrize("rand", [0.0, 0.3, 0.5, 0.99])
def test_jitter_comes_from_rand_and_stays_under_the_cap(rand: float) -> None:
    policy = HealPolicy(backoff=Backoff(first=1.0, factor=3.0, cap=20.0, jitter=0.5), budget=100,
                        window=1000.0, cooldown=1000.0)
    heals = run_failing(policy, 20, rand=rand).heals()
    assert len(heals) >= 6
    for (t0, _), (t1, n) in itertools.pairwise(heals):
        assert t1 - t0 == pytest.approx(policy.delay_before(n, rand))
        assert t1 - t0 <= policy.backoff.cap


def test_no_heal_before_the_backoff_delay_and_wake_at_says_when() -> None:
    shell = Shell()
    shell.decide(0.0, FAILED)
    d = shell.decide(0.5, FAILED)
    assert d.commands == () and d.wake_at == 1.0
    d = shell.decide(0.999, FAILED)
    assert d.commands == () and d.wake_at == 1.0
    d = shell.decide(1.0, FAILED)
    assert d.commands == (Heal(U, 1, reload=False),)


def test_never_two_heals_while_one_is_in_flight() -> None:
    shell = Shell(finish=False)
    shell.decide(0.0, FAILED)
    for now in (0.0, 1.0, 5.0, 50.0, 99.0):
        d = shell.decide(now, FAILED)
        assert d.commands == ()
        assert shell.history[U].in_flight
    shell.history = heal_finished(shell.history, U)
    assert shell.decide(100.0, FAILED).commands == (Heal(U, 1, reload=False),)


def test_heal_finished_touches_only_the_unit_and_not_its_input() -> None:
    shell = Shell(finish=False)
    d = shell.decide(0.0, FAILED, unit(name=V))
    before = dict(d.history)
    after = heal_finished(d.history, U)
    assert dict(d.history) == before
    assert not after[U].in_flight and after[V].in_flight
    assert after[U] == dataclasses.replace(before[U], in_flight=False)
    assert heal_finished(after, "gone.service") == after


def test_spending_the_budget_quarantines_until_the_cooldown() -> None:
    shell = Shell(dataclasses.replace(POLICY, budget=3))
    for t, attempt, wake in ((0.0, 0, 1.0), (1.0, 1, 3.0)):
        assert shell.decide(t, FAILED).commands == (Heal(U, attempt, reload=False),)
        assert shell.decide(t, FAILED).wake_at == wake  # the regimen ended: back off
    assert shell.decide(3.0, FAILED).commands == (Heal(U, 2, reload=False),)
    assert shell.heals() == [(0.0, 0), (1.0, 1), (3.0, 2)]
    # The third regimen ended; the unit is still failed and the budget is spent.
    d = shell.decide(3.0, FAILED)
    assert d.commands == (Quarantine(U, 203.0, 3),)
    assert d.wake_at == 203.0
    for t in (3.0, 10.0, 150.0, 202.9):
        d = shell.decide(t, FAILED)
        assert d.commands == () and d.wake_at == 203.0
    d = shell.decide(203.0, FAILED)
    assert d.commands == (QuarantineLifted(U, "cooldown"), Heal(U, 0, reload=False))


def test_quarantine_is_issued_once_and_a_held_quarantined_unit_still_wakes_for_the_cooldown() -> None:
    shell = Shell(dataclasses.replace(POLICY, budget=1))
    shell.decide(0.0, FAILED)
    assert shell.decide(0.0, FAILED).commands == (Quarantine(U, 200.0, 1),)
    shell.held.add(U)
    d = shell.decide(5.0, FAILED)
    assert d.commands == () and d.wake_at == 100.0  # the attempt leaves the window
    d = shell.decide(100.0, FAILED)
    assert d.commands == () and d.wake_at == 200.0
    d = shell.decide(200.0, FAILED)
    assert d.commands == (QuarantineLifted(U, "cooldown"),)  # lifted, but held: no Heal
    shell.held.clear()
    assert shell.decide(201.0, FAILED).commands == (Heal(U, 0, reload=False),)


def test_attempts_that_left_the_window_do_not_count() -> None:
    # Backoff longer than the window: the budget is never spent.
    policy = HealPolicy(backoff=Backoff(first=20.0, factor=1.0, cap=20.0, jitter=0.0), budget=2, window=10.0,
                        cooldown=50.0)
    shell = run_failing(policy, 30)
    assert not any(isinstance(c, Quarantine) for _, c in shell.log)
    assert [t for t, _ in shell.heals()][:5] == [0.0, 20.0, 40.0, 60.0, 80.0]


@pytest.mark.parametrize(("now", "quarantined"), [(9.0, True), (9.999, True), (10.0, False), (11.0, False)])
def test_the_window_is_half_open(now: float, quarantined: bool) -> None:
    # One attempt at 0 in a 10 s window with a budget of 1: it counts until 10, exclusive.
    policy = HealPolicy(backoff=Backoff(first=0.0, cap=0.0, jitter=0.0), budget=1, window=10.0, cooldown=50.0)
    shell = Shell(policy)
    shell.decide(0.0, FAILED)
    d = shell.decide(now, FAILED)
    assert d.commands == ((Quarantine(U, now + 50.0, 1),) if quarantined else (Heal(U, 1, reload=False),))


@pytest.mark.parametrize(("quarantine_first", "expected"), [(True, True), (False, False)])
def test_lift_forgets_budget_and_backoff(quarantine_first: bool, expected: bool) -> None:
    shell = Shell(dataclasses.replace(POLICY, budget=2))
    shell.decide(0.0, FAILED)
    shell.decide(1.0, FAILED)
    if quarantine_first:
        assert isinstance(shell.decide(1.0, FAILED).commands[0], Quarantine)
    shell.history, was = lift(shell.history, U)
    assert was is expected
    h = shell.history[U]
    assert (h.quarantined_until, h.attempts, h.streak, h.next_at) == (None, (), 0, 0.0)
    assert shell.decide(1.0, FAILED).commands == (Heal(U, 0, reload=False),)


def test_lift_of_an_unknown_unit_is_harmless() -> None:
    history, was = lift({}, U)
    assert not was
    assert history == {U: UnitHealth()}
    assert decide({}, history, NOBODY, 0.0, POLICY).history == {}


def test_lift_does_not_end_a_regimen_in_flight() -> None:
    shell = Shell(finish=False)
    shell.decide(0.0, FAILED)
    shell.history, _ = lift(shell.history, U)
    assert shell.history[U].in_flight
    assert shell.decide(5.0, FAILED).commands == ()


# ---------------------------------------------------------------------------------------------------
# Holds and systemd's own business


def test_a_held_unit_is_never_healed_and_healing_resumes_when_the_hold_ends() -> None:
    shell = Shell()
    shell.held.add(U)
    for t in (0.0, 10.0, 1000.0):
        d = shell.decide(t, FAILED)
        assert d.commands == () and d.wake_at is None
    assert shell.history[U].failed_since is None  # a failure under a hold is not ours
    shell.held.clear()
    assert shell.decide(1001.0, FAILED).commands == (Heal(U, 0, reload=False),)
    assert shell.history[U].failed_since == 1001.0


def test_a_hold_in_the_middle_of_an_episode_pauses_it() -> None:
    shell = Shell()
    shell.decide(0.0, FAILED)
    shell.held.add(U)
    assert shell.decide(5.0, FAILED).commands == ()
    shell.held.clear()
    assert shell.decide(6.0, FAILED).commands == (Heal(U, 1, reload=False),)


@pytest.mark.parametrize("state", [
    unit("failed", "auto-restart"), unit("activating", "auto-restart"), unit("inactive", "auto-restart"),
    unit("activating"), unit("deactivating"), unit("deactivating", "final-sigterm"), unit("inactive"),
], ids=lambda s: f"{s.active_state}/{s.sub_state}")
def test_systemd_restarts_transitions_and_clean_stops_are_left_alone(state: UnitState) -> None:
    shell = Shell()
    shell.decide(0.0, FAILED)  # an episode is under way
    for t in (1.0, 2.0, 50.0, 500.0):
        assert shell.decide(t, state).commands == ()
    assert len(shell.heals()) == 1


def test_a_unit_only_systemd_restarted_is_not_reported_recovered() -> None:
    shell = Shell()
    shell.decide(0.0, unit("failed", "auto-restart"))
    shell.decide(1.0, unit("activating", "auto-restart"))
    shell.decide(2.0, unit("activating"))
    assert shell.decide(3.0, ACTIVE).commands == ()


# ---------------------------------------------------------------------------------------------------
# Recovery and forgetting


def test_recovered_once_per_episode_with_the_time_from_first_seen_failed() -> None:
    shell = Shell()
    shell.decide(10.0, FAILED)
    shell.decide(11.0, FAILED)
    shell.decide(12.0, unit("activating"))
    d = shell.decide(15.0, ACTIVE)
    assert d.commands == (Recovered(U, 5.0),)
    for t in (16.0, 20.0, 30.0):
        assert shell.decide(t, ACTIVE).commands == ()
    # Failing again before the history is forgotten: a new episode for Recovered, and the attempt
    # count carries on.
    assert shell.decide(40.0, FAILED).commands == (Heal(U, 2, reload=False),)
    assert shell.decide(42.5, unit("reloading")).commands == (Recovered(U, 2.5),)


def test_recovered_counts_from_the_failure_even_across_a_quarantine() -> None:
    shell = Shell(dataclasses.replace(POLICY, budget=1))
    shell.decide(0.0, FAILED)
    shell.decide(0.0, FAILED)  # quarantined
    shell.held.add(U)  # an update stops and starts it
    shell.decide(30.0, unit("inactive"))
    assert shell.decide(31.0, ACTIVE).commands == (Recovered(U, 31.0),)


def test_history_is_forgotten_after_staying_healthy_for_forget_after() -> None:
    shell = Shell()
    for t in (0.0, 1.0, 3.0):
        shell.decide(t, FAILED)
    assert shell.history[U].streak == 3
    d = shell.decide(10.0, ACTIVE)
    assert d.wake_at == 60.0
    d = shell.decide(59.0, ACTIVE)
    assert shell.history[U].streak == 3 and d.wake_at == 60.0
    d = shell.decide(60.0, ACTIVE)
    assert d.commands == () and d.wake_at is None
    h = shell.history[U]
    assert (h.streak, h.attempts, h.next_at) == (0, (), 0.0)
    assert shell.decide(61.0, FAILED).commands == (Heal(U, 0, reload=False),)


def test_a_short_healthy_spell_keeps_the_streak_and_the_backoff() -> None:
    shell = Shell()
    for t in (0.0, 1.0, 3.0):
        shell.decide(t, FAILED)
    shell.decide(3.5, ACTIVE)
    assert shell.decide(5.0, FAILED).commands == ()  # next attempt at 3 + 4
    assert shell.decide(7.0, FAILED).commands == (Heal(U, 3, reload=False),)


def test_an_interrupted_healthy_spell_starts_over() -> None:
    shell = Shell()
    shell.decide(0.0, FAILED)
    shell.decide(10.0, ACTIVE)
    shell.decide(40.0, unit("inactive"))
    assert shell.decide(45.0, ACTIVE).wake_at == 95.0
    assert shell.decide(70.0, ACTIVE).commands == ()
    assert shell.history[U].streak == 1


def test_a_quarantined_unit_healthy_long_enough_is_lifted_once() -> None:
    shell = Shell(dataclasses.replace(POLICY, budget=1, cooldown=1000.0))
    shell.decide(0.0, FAILED)
    shell.decide(0.0, FAILED)
    assert shell.history[U].quarantined
    assert shell.decide(20.0, ACTIVE).commands == (Recovered(U, 20.0),)
    d = shell.decide(69.0, ACTIVE)
    assert d.commands == () and d.wake_at == 70.0
    d = shell.decide(70.0, ACTIVE)
    assert d.commands == (QuarantineLifted(U, "healthy"),) and d.wake_at is None
    assert shell.decide(71.0, ACTIVE).commands == ()
    assert shell.decide(72.0, FAILED).commands == (Heal(U, 0, reload=False),)


# ---------------------------------------------------------------------------------------------------
# Units that cannot be loaded, units that vanish, several units


@pytest.mark.parametrize("load", ["not-found", "masked", "bad-setting", "error"])
@pytest.mark.parametrize("active", ["failed", "inactive", "active"])
def test_an_unloadable_unit_is_reported_once_and_never_healed(load: str, active: str) -> None:
    shell = Shell()
    bad = unit(active, load=load)
    for t in (0.0, 1.0, 2.0, 100.0, 10_000.0):
        d = shell.decide(t, bad)
        assert d.wake_at is None
    assert [c for _, c in shell.log] == [Unloadable(U, load)]
    assert shell.decide(10_001.0, unit("inactive", load="masked" if load != "masked" else "error")).commands \
        == ()  # still not loaded: not reported again
    shell.decide(10_002.0, unit("inactive"))
    assert shell.decide(10_003.0, bad).commands == (Unloadable(U, load),)


def test_an_unloadable_unit_in_an_episode_is_not_healed_until_it_loads() -> None:
    shell = Shell()
    shell.decide(0.0, FAILED)
    assert shell.decide(10.0, unit(load="not-found")).commands == (Unloadable(U, "not-found"),)
    assert shell.decide(20.0, unit(load="not-found")).commands == ()
    assert shell.decide(30.0, FAILED).commands == (Heal(U, 1, reload=False),)


def test_units_absent_from_the_observation_keep_no_history() -> None:
    shell = Shell(finish=False)
    shell.decide(0.0, FAILED, unit(name=V))
    assert set(shell.history) == {U, V}
    shell.held.add("other.service")
    d = shell.decide(1.0, unit(name=V))
    assert set(d.history) == {V}
    assert shell.decide(2.0, ACTIVE, unit(name=V)).history[U] == UnitHealth(healthy_since=2.0)


def test_several_units_are_decided_in_name_order_and_wake_at_is_the_earliest() -> None:
    shell = Shell()
    d = shell.decide(0.0, FAILED, unit(name=V), unit(name="zz.service"))
    assert [c.unit for c in d.commands] == [V, U, "zz.service"]
    shell.decide(1.0, FAILED, unit(name=V), unit("active", name="zz.service"))
    d = shell.decide(1.5, FAILED, unit("active", name=V), unit("active", name="zz.service"))
    # U waits for 3.0; V and zz forget at 51.5 and 51.0.
    assert d.wake_at == 3.0
    assert d.commands == (Recovered(V, 1.5),)


def test_decide_is_pure() -> None:
    history = {U: UnitHealth(attempts=(1.0,), streak=1, next_at=2.0, failed_since=1.0)}
    snapshot = dict(history)
    units = {U: FAILED}
    a = decide(units, history, NOBODY, 5.0, POLICY, 0.3)
    b = decide(units, history, NOBODY, 5.0, POLICY, 0.3)
    assert a == b
    assert history == snapshot and units == {U: FAILED}


# ---------------------------------------------------------------------------------------------------
# Properties


def _policy(first: float, factor: float, cap_mult: int, jitter: float, budget: int, window: float,
            cooldown_extra: float, forget_after: float) -> HealPolicy:
    backoff = Backoff(first=first, factor=factor, cap=max(first, 0.5) * cap_mult, jitter=jitter)
    return HealPolicy(backoff=backoff, budget=budget, window=window, cooldown=window + cooldown_extra,
                      forget_after=forget_after)


# Every value a dyadic fraction, so that sums of times and delays are exact. The cooldown is never
# shorter than the window: see test_a_cooldown_shorter_than_the_window_exceeds_the_budget.
policies = st.builds(
    _policy, first=st.sampled_from([0.0, 0.5, 1.0, 2.0]), factor=st.sampled_from([1.0, 2.0, 4.0]),
    cap_mult=st.sampled_from([1, 2, 8]), jitter=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    budget=st.integers(1, 3), window=st.sampled_from([4.0, 8.0, 32.0]),
    cooldown_extra=st.sampled_from([0.0, 4.0, 24.0]), forget_after=st.sampled_from([0.5, 2.0, 8.0, 24.0]))
rands = st.sampled_from([i / 8 for i in range(8)])
maybe_rands = st.sampled_from([None, *(i / 8 for i in range(8))])
names = st.sampled_from([U, V])
steps = st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 40.0])

_SUBS = {"active": ["running", "exited"], "reloading": ["reload"], "failed": ["failed", "auto-restart"],
         "inactive": ["dead", "auto-restart"], "activating": ["start", "start-pre", "auto-restart"],
         "deactivating": ["stop-sigterm", "final-sigkill"]}


@st.composite
def observations(draw: st.DrawFn, name: str = U) -> UnitState:
    active = draw(st.sampled_from(["failed"] * 4 + ["active"] * 3 + list(_SUBS)))
    return UnitState(
        name, load_state=draw(st.sampled_from(["loaded"] * 12 + ["not-found", "masked", "bad-setting"])),
        active_state=active, sub_state=draw(st.sampled_from(_SUBS[active])),
        need_daemon_reload=draw(st.booleans()))


def _never_healed(s: UnitState, held: bool) -> bool:
    return (held or s.load_state != "loaded" or s.active_state != "failed" or s.sub_state == "auto-restart")


@settings(deadline=None, max_examples=200)
@given(policy=policies, rand_seq=st.lists(rands, min_size=1, max_size=60), reload=st.booleans())
def test_a_unit_that_stays_failed_is_healed_on_schedule_within_its_budget(
        policy: HealPolicy, rand_seq: list[float], reload: bool) -> None:
    state = unit(reload=reload)
    history: Mapping[str, UnitHealth] = {}
    now = 0.0
    heals: list[tuple[float, int, float]] = []  # time, attempt, rand
    quarantined_until: float | None = None
    for rand in rand_seq:
        d = decide({U: state}, history, NOBODY, now, policy, rand)
        history = d.history
        lifted = False
        for c in d.commands:
            match c:
                case QuarantineLifted(reason=reason):
                    assert (reason, now) == ("cooldown", quarantined_until)
                    quarantined_until, lifted = None, True
                case Quarantine(until=until, attempts=attempts):
                    assert quarantined_until is None
                    assert attempts == sum(1 for t, _, _ in heals if t > now - policy.window) == policy.budget
                    assert until == now + policy.cooldown
                    quarantined_until = until
                case Heal(attempt=attempt, reload=r):
                    assert quarantined_until is None and r == reload
                    assert sum(1 for t, _, _ in heals if t > now - policy.window) < policy.budget
                    if not heals or lifted:
                        assert attempt == 0  # the first of an episode: immediate
                    else:
                        t0, n0, rand0 = heals[-1]
                        assert attempt == n0 + 1
                        assert now - t0 == policy.delay_before(attempt, rand0) <= policy.backoff.cap
                    heals.append((now, attempt, rand))
                    history = heal_finished(history, U)
                case _:
                    pytest.fail(f"unexpected {c}")
        if lifted:
            assert any(isinstance(c, Heal) for c in d.commands)
        if any(isinstance(c, Heal) for c in d.commands):
            continue
        assert d.wake_at is not None and d.wake_at > now
        now = d.wake_at
    assert heals[0] == (0.0, 0, rand_seq[0])


unit_health = st.builds(
    UnitHealth, attempts=st.lists(st.floats(-100, 100), max_size=6).map(tuple), streak=st.integers(0, 10),
    next_at=st.floats(-100, 100), in_flight=st.booleans(),
    quarantined_until=st.none() | st.floats(-100, 100), failed_since=st.none() | st.floats(-100, 100),
    healthy_since=st.none() | st.floats(-100, 100), reported_unloadable=st.booleans())


@settings(deadline=None, max_examples=300)
@given(states=st.lists(observations(), min_size=1, max_size=3), history=st.dictionaries(
    st.sampled_from([U, V, "c.service", "gone.service"]), unit_health, max_size=4),
    held=st.frozensets(st.sampled_from([U, V, "c.service"])), now=st.floats(-50, 200), policy=policies,
    rand=rands)
def test_whatever_the_history_only_failed_loaded_unheld_units_are_healed(
        states: list[UnitState], history: dict[str, UnitHealth], held: frozenset[str], now: float,
        policy: HealPolicy, rand: float) -> None:
    units = {n: dataclasses.replace(s, name=n) for n, s in zip([U, V, "c.service"], states, strict=False)}
    d = decide(units, history, held, now, policy, rand)
    assert set(d.history) == set(units)
    for c in d.commands:
        assert c.unit in units
        if isinstance(c, Heal):
            s = units[c.unit]
            assert not _never_healed(s, c.unit in held)
            assert not history.get(c.unit, UnitHealth()).in_flight
            assert c.reload == s.need_daemon_reload
    for h in d.history.values():
        assert all(t > now - policy.window for t in h.attempts)


@dataclass
class Model:
    """What the policy should remember of one unit, kept from the documented behaviour."""

    heals: tuple[float, ...] = ()  # attempts that count against the budget (since the last reset)
    streak: int = 0
    next_at: float = 0.0
    last_heal: tuple[float, float] | None = None  # time, rand
    in_flight: bool = False
    quarantined_until: float | None = None
    failed_since: float | None = None
    healthy_since: float | None = None
    reported_unloadable: bool = False

    def forget(self) -> None:
        self.heals, self.streak, self.next_at, self.last_heal = (), 0, 0.0, None


class HealingMachine(RuleBasedStateMachine):
    """The healer's view of two units, driven through arbitrary observations, holds, lifts,
    regimens ending and time passing."""

    def __init__(self) -> None:
        super().__init__()
        self.policy = HealPolicy()
        self.auto_finish = True
        self.now = 0.0
        self.obs: dict[str, UnitState] = {}
        self.held: set[str] = set()
        self.history: dict[str, UnitHealth] = {}
        self.models: dict[str, Model] = {}
        self.budget_log: dict[str, list[float]] = {}  # Heals since a lift or a forgetting
        self.last: Decision | None = None
        self.last_now = 0.0
        self.changed = True

    @initialize(policy=policies, auto_finish=st.booleans())
    def setup(self, policy: HealPolicy, auto_finish: bool) -> None:
        self.policy, self.auto_finish = policy, auto_finish

    # -- the world changes; the healer decides after each change, or after the next one (rand None)

    def _changed(self, rand: float | None) -> None:
        self.changed = True
        if rand is not None:
            self._decide(self.now, rand)

    @rule(name=names, data=st.data(), rand=maybe_rands)
    def observe(self, name: str, data: st.DataObject, rand: float | None) -> None:
        self.obs[name] = data.draw(observations(name))
        self._changed(rand)

    @rule(name=names, reload=st.booleans(), rand=maybe_rands)
    def fails(self, name: str, reload: bool, rand: float | None) -> None:
        self.obs[name] = unit(name=name, reload=reload)
        self._changed(rand)

    @rule(name=names, rand=maybe_rands)
    def recovers(self, name: str, rand: float | None) -> None:
        self.obs[name] = unit("active", name=name)
        self._changed(rand)

    @rule(name=names, rand=maybe_rands)
    def vanish(self, name: str, rand: float | None) -> None:
        self.obs.pop(name, None)
        self._changed(rand)

    @rule(dt=steps)
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule(name=names, rand=maybe_rands)
    def toggle_hold(self, name: str, rand: float | None) -> None:
        self.held ^= {name}
        self._changed(rand)

    @rule(name=names, rand=maybe_rands)
    def regimen_ends(self, name: str, rand: float | None) -> None:
        self.history = heal_finished(self.history, name)
        if name in self.models:
            self.models[name].in_flight = False
        self._changed(rand)

    @rule(name=names, rand=maybe_rands)
    def operator_lifts(self, name: str, rand: float | None) -> None:
        self.history, was = lift(self.history, name)
        m = self.models.setdefault(name, Model())
        assert was == (m.quarantined_until is not None)
        m.quarantined_until = None
        m.forget()
        self.budget_log[name] = []
        self._changed(rand)

    # -- the policy decides

    @rule(rand=rands)
    def decide_now(self, rand: float) -> None:
        self._decide(self.now, rand)

    @precondition(lambda self: self.last is not None and self.last.wake_at is not None and not self.changed
                  and self.now <= self.last.wake_at)
    @rule(rand=rands)
    def sleep_until_wake_at(self, rand: float) -> None:
        assert self.last is not None and self.last.wake_at is not None
        wake = self.last.wake_at
        self.now = wake
        d = self._decide(wake, rand)
        # No busy loop: waking at wake_at either acts or moves on.
        assert d.commands or d.wake_at is None or d.wake_at > wake

    def _decide(self, now: float, rand: float) -> Decision:
        held = frozenset(self.held)
        d = decide(dict(self.obs), self.history, held, now, self.policy, rand)
        assert set(d.history) == set(self.obs)
        for name in set(self.models) - set(self.obs):
            del self.models[name]
            self.budget_log.pop(name, None)
        expected: list[Command] = []
        for name in sorted(self.obs):
            mine = [c for c in d.commands if c.unit == name]
            self._check_invariants(name, mine, now)
            expected += self._expect(name, now, rand)
        assert d.commands == tuple(expected)
        for name, h in d.history.items():
            m = self.models[name]
            assert (h.attempts, h.streak, h.next_at, h.in_flight, h.quarantined_until) == \
                (m.heals, m.streak, m.next_at, m.in_flight, m.quarantined_until)
            assert (h.failed_since, h.healthy_since, h.reported_unloadable) == \
                (m.failed_since, m.healthy_since, m.reported_unloadable)
        self._check_wake(d, now, rand)

        self.history = dict(d.history)
        for c in d.commands:
            if isinstance(c, Heal):
                self.budget_log.setdefault(c.unit, []).append(now)
                if self.auto_finish:
                    self.history = heal_finished(self.history, c.unit)
                    self.models[c.unit].in_flight = False
        self.last, self.last_now, self.changed = d, now, False
        return d

    def _check_invariants(self, name: str, cmds: list[Command], now: float) -> None:
        """The design's invariants, from the observations and what was done before."""
        s, m, p = self.obs[name], self.models.get(name, Model()), self.policy
        heals = [c for c in cmds if isinstance(c, Heal)]
        assert len(heals) <= 1
        if heals:
            (heal,) = heals
            assert not _never_healed(s, name in self.held), "healthy, held, systemd's or stopped: not ours"
            assert not m.in_flight, "two Heals in flight"
            assert heal.reload == s.need_daemon_reload
            assert sum(1 for t in [*self.budget_log.get(name, []), now] if t > now - p.window) <= p.budget
            if m.quarantined_until is not None:
                assert QuarantineLifted(name, "cooldown") in cmds and now >= m.quarantined_until
            if heal.attempt > 0 and m.last_heal is not None:
                t0, rand0 = m.last_heal
                assert now - t0 >= p.delay_before(heal.attempt, rand0)
        assert sum(isinstance(c, Unloadable) for c in cmds) <= (0 if m.reported_unloadable else 1)
        if any(isinstance(c, Recovered) for c in cmds):
            assert m.failed_since is not None and s.healthy

    def _expect(self, name: str, now: float, rand: float) -> list[Command]:
        """The module docstring, step by step, for one unit; updates the model."""
        s, p = self.obs[name], self.policy
        m = self.models.setdefault(name, Model())
        out: list[Command] = []
        m.heals = tuple(t for t in m.heals if t + p.window > now)
        if m.quarantined_until is not None and now >= m.quarantined_until:
            out.append(QuarantineLifted(name, "cooldown"))
            m.quarantined_until = None
            m.forget()
        if s.load_state != "loaded":
            # Reported once; a unit that cannot be loaded is not healthy, so its healthy spell ends.
            if not m.reported_unloadable:
                out.append(Unloadable(name, s.load_state))
            m.reported_unloadable = True
            m.healthy_since = None
            return out
        m.reported_unloadable = False
        if s.healthy:
            if m.healthy_since is None:
                m.healthy_since = now
            if m.failed_since is not None:
                out.append(Recovered(name, m.healthy_since - m.failed_since))
                m.failed_since = None
            if now >= m.healthy_since + p.forget_after:
                if m.quarantined_until is not None:
                    out.append(QuarantineLifted(name, "healthy"))
                m.quarantined_until = None
                m.forget()
                self.budget_log[name] = []
            return out
        m.healthy_since = None
        if name in self.held or m.in_flight or not s.failed or s.systemd_will_restart:
            return out
        if m.failed_since is None:
            m.failed_since = now
        if m.quarantined_until is not None:
            return out
        if len(m.heals) >= p.budget:
            m.quarantined_until = now + p.cooldown
            out.append(Quarantine(name, m.quarantined_until, len(m.heals)))
        elif now >= m.next_at:
            out.append(Heal(name, m.streak, reload=s.need_daemon_reload))
            m.heals = (*m.heals, now)
            m.streak += 1
            m.in_flight = True
            m.last_heal = (now, rand)
            m.next_at = now + p.delay_before(m.streak, rand)
        return out

    def _check_wake(self, d: Decision, now: float, rand: float) -> None:
        held = frozenset(self.held)
        assert d.wake_at is None or d.wake_at > now, "wake_at in the past"
        # Deciding again at the same time with nothing new changes nothing.
        again = decide(self.obs, d.history, held, now, self.policy, rand)
        assert (again.commands, dict(again.history)) == ((), dict(d.history))
        # (After a Heal, wake_at leaves the unit in flight to the end of its regimen.)
        assert again.wake_at == d.wake_at or any(isinstance(c, Heal) for c in d.commands)
        # Nothing changes before wake_at without a new observation (or ever, when it is None).
        p = self.policy
        probe = (now + d.wake_at) / 2 if d.wake_at is not None else \
            now + p.window + p.cooldown + p.forget_after + p.backoff.cap + 1
        early = decide(self.obs, d.history, held, probe, self.policy, rand)
        # A quarantined unit that is healthy or unloadable is woken for at the end of its cooldown
        # too (test_wake_at_covers_the_end_of_a_quarantine_*), so no exemption is needed here.
        assert early.commands == ()
        if d.wake_at is not None:
            at = decide(self.obs, d.history, held, d.wake_at, self.policy, rand)
            assert at.commands or at.wake_at is None or at.wake_at > d.wake_at, "busy loop at wake_at"


TestHealingMachine = HealingMachine.TestCase
TestHealingMachine.settings = settings(deadline=None, max_examples=250, stateful_step_count=50)


# ---------------------------------------------------------------------------------------------------
# Cases that were once wrong in norm/core/healing.py


def test_wake_at_covers_the_end_of_a_quarantine_while_the_unit_is_healthy() -> None:
    shell = Shell(HealPolicy(budget=1, window=50.0, cooldown=100.0, forget_after=300.0))
    shell.decide(0.0, FAILED)
    assert shell.decide(1.0, FAILED).commands == (Quarantine(U, 101.0, 1),)
    d = shell.decide(90.0, ACTIVE)
    # At 101 the decision changes with no new observation (QuarantineLifted "cooldown")...
    assert decide({U: ACTIVE}, d.history, NOBODY, 101.0, shell.policy).commands \
        == (QuarantineLifted(U, "cooldown"),)
    # ... so wake_at must not be the later forget time (390): the healer wakes for the lift.
    assert d.wake_at is not None and d.wake_at <= 101.0


def test_wake_at_covers_the_end_of_a_quarantine_while_the_unit_is_unloadable() -> None:
    shell = Shell(HealPolicy(budget=1, window=50.0, cooldown=100.0))
    shell.decide(0.0, FAILED)
    assert shell.decide(1.0, FAILED).commands == (Quarantine(U, 101.0, 1),)
    gone = unit(load="not-found")
    d = shell.decide(2.0, gone)
    assert d.commands == (Unloadable(U, "not-found"),)
    assert decide({U: gone}, d.history, NOBODY, 101.0, shell.policy).commands \
        == (QuarantineLifted(U, "cooldown"),)
    assert d.wake_at == 101.0


def test_a_failure_while_unloadable_ends_the_healthy_spell() -> None:
    shell = Shell(HealPolicy(budget=1, window=50.0, cooldown=10_000.0, forget_after=300.0))
    shell.decide(0.0, FAILED)
    assert shell.decide(1.0, FAILED).commands == (Quarantine(U, 10_001.0, 1),)
    assert shell.decide(10.0, ACTIVE).commands == (Recovered(U, 10.0),)
    assert shell.decide(20.0, unit("failed", load="not-found")).commands == (Unloadable(U, "not-found"),)
    # Loaded and active again at 400: healthy since 400, not since 10; nothing is forgotten yet.
    d = shell.decide(400.0, ACTIVE)
    assert d.commands == ()
    assert d.wake_at == 700.0


def test_a_cooldown_shorter_than_the_window_is_refused() -> None:
    # A quarantine lifted by its cooldown starts a fresh budget; a cooldown shorter than the window
    # would let more than `budget` Heals into one window.
    with pytest.raises(ValueError, match="cooldown >= window"):
        dataclasses.replace(POLICY, budget=2, window=100.0, cooldown=10.0)


def test_waking_at_wake_at_moves_on_when_an_attempt_leaves_the_window_in_float_time() -> None:
    policy = HealPolicy()  # window 600
    d = decide({U: FAILED}, {}, NOBODY, 0.3, policy)
    held = frozenset({U})
    d = decide({U: FAILED}, heal_finished(d.history, U), held, 1.0, policy)
    assert d.wake_at == 0.3 + 600.0
    again = decide({U: FAILED}, d.history, held, d.wake_at, policy)
    assert again.wake_at is None or again.wake_at > d.wake_at


def test_waking_at_wake_at_forgets_the_history_in_float_time() -> None:
    policy = HealPolicy()  # forget_after 300
    d = decide({U: FAILED}, {}, NOBODY, 900.0, policy)
    d = decide({U: ACTIVE}, heal_finished(d.history, U), NOBODY, 991.696, policy)
    assert d.wake_at == 991.696 + 300.0
    again = decide({U: ACTIVE}, d.history, NOBODY, d.wake_at, policy)
    assert again.history[U].streak == 0
    assert again.wake_at is None or again.wake_at > d.wake_at


# What outlives the agent: the record of the budget, backoff and quarantine


def _spent(now: float = 10.0) -> Mapping[str, UnitHealth]:
    """U quarantined after spending its budget; V in backoff after two attempts; W healthy, no history."""
    history: Mapping[str, UnitHealth] = {}
    t = 0.0
    while not history.get(U, UnitHealth()).quarantined:
        d = decide({U: FAILED}, history, NOBODY, t, POLICY)
        history = {u: dataclasses.replace(h, in_flight=False) for u, h in d.history.items()}
        t += 8.0
    v = unit("failed", name=V)
    for at in (t, t + 1.0):
        d = decide({V: v}, history, NOBODY, at, POLICY)
        history = {**history, **heal_finished(d.history, V)}
    return {**history, "w.service": UnitHealth(healthy_since=1.0)}


def test_a_record_taken_up_by_the_next_agent_keeps_the_quarantine_budget_and_backoff() -> None:
    history = _spent()
    before = 50.0  # one agent's clocks: monotonic 50 is wall 1_000_050
    record = to_record(history, before, 1_000_000.0 + before)
    assert set(record["units"]) == {U, V}  # type: ignore[call-overload]
    # The next agent, 7 s later on the wall clock, after a reboot (its monotonic clock restarted at 3).
    after, problems = from_record(record, 3.0, 1_000_057.0, POLICY)
    assert problems == []
    shift = 3.0 - 57.0
    for name in (U, V):
        h, was = after[name], history[name]
        assert h.streak == was.streak
        assert h.quarantined_until == pytest.approx(None if was.quarantined_until is None
                                                    else was.quarantined_until + shift)
        assert h.attempts == pytest.approx(tuple(t + shift for t in was.attempts if t + shift + 100.0 > 3.0))
    # The quarantined unit stays quarantined: still failed, no Heal.
    d = decide({U: FAILED, V: unit("failed", name=V)}, after, NOBODY, 3.0, POLICY)
    assert not any(isinstance(c, Heal) and c.unit == U for c in d.commands)
    assert after[U].quarantined


def test_the_lasting_part_ignores_what_only_this_agent_needs() -> None:
    history = _spent()
    moved = {u: dataclasses.replace(h, in_flight=True, healthy_since=None, failed_since=2.0)
             for u, h in history.items()}
    assert lasting(moved) == lasting(history)
    assert lasting(lift(history, U)[0]) != lasting(history)


def test_a_lifted_unit_is_recorded_free() -> None:
    history, _ = lift(_spent(), U)
    after, _ = from_record(to_record(history, 50.0, 1_000_050.0), 50.0, 1_000_050.0, POLICY)
    assert U not in after
    assert decide({U: FAILED}, after, NOBODY, 50.0, POLICY).commands == (Heal(U, 0, reload=False),)


def test_a_clock_set_back_never_holds_a_unit_longer_than_the_policy_would() -> None:
    history = _spent()
    record = to_record(history, 50.0, 1_000_050.0)
    # The wall clock is now a day behind: every recorded time seems to be in the future.
    after, problems = from_record(record, 50.0, 1_000_050.0 - 86400.0, POLICY)
    assert problems == []
    assert after[U].quarantined_until == 50.0 + POLICY.cooldown
    assert all(t <= 50.0 for h in after.values() for t in h.attempts)
    assert all(h.next_at <= 50.0 + POLICY.backoff.cap for h in after.values())


@pytest.mark.parametrize("record", [None, [], "x", {"version": 2, "units": {}}, {"version": 1},
                                    {"version": 1, "units": []}])
def test_what_is_not_a_record_is_refused(record: object) -> None:
    with pytest.raises(InvalidValue, match="healing state"):
        from_record(record, 0.0, 0.0, POLICY)


@pytest.mark.parametrize("entry", [
    None, [], {"attempts": "1", "streak": 1}, {"attempts": [1.0], "streak": -1},
    {"attempts": [True], "streak": 1}, {"attempts": [float("nan")], "streak": 1},
    {"attempts": [], "streak": True}, {"attempts": [], "streak": 0, "quarantined_until": "soon"},
    {"attempts": [], "streak": 0, "next_at": float("inf")}])
def test_a_unit_entry_that_is_not_acceptable_is_left_out_and_named(entry: object) -> None:
    record = {"version": 1, "units": {U: entry, V: {"attempts": [5.0], "streak": 1, "next_at": None,
                                                    "quarantined_until": None}}}
    after, problems = from_record(record, 10.0, 10.0, POLICY)
    assert list(after) == [V] and after[V].attempts == (5.0,)
    assert len(problems) == 1 and U in str(problems[0])


def test_a_unit_name_that_is_not_one_is_refused() -> None:
    record = {"version": 1, "units": {"not a unit": {"attempts": [], "streak": 1}}}
    after, problems = from_record(record, 10.0, 10.0, POLICY)
    assert after == {} and len(problems) == 1
