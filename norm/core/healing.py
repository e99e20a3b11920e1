"""The healing policy: from what systemd says of each unit, what Norm has already tried, and what is
held on purpose, decide what to do now. Pure: time comes in as `now` (seconds on a monotonic clock),
randomness as `rand`.

The regimen for a failed unit is: stop it, reset its failed state (and reload systemd's view of unit
files when the file changed on disk), start it. Attempts back off exponentially with jitter and a
cap; at most `budget` attempts fit in any `window`; a unit that spends its budget is quarantined
(left alone) until `cooldown` passes or an operator lifts the quarantine. After a unit has stayed healthy for
`forget_after`, its history is forgotten. Units systemd is about to restart itself (Restart= set,
limit not reached) are left to systemd; units held on purpose (an update, an operator) are never
healed; units that cannot be loaded are reported once, not retried.

What counts against the budget (the attempts in the window, the backoff step, the next attempt's
time, a quarantine) outlives the agent: `lasting` is that part of a history, `to_record` and
`from_record` turn it into a plain record on the wall clock and back.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from norm.core.backoff import Backoff
from norm.core.errors import InvalidValue
from norm.core.units import UnitState, parse_unit_name


@dataclass(frozen=True)
class HealPolicy:
    backoff: Backoff = field(default_factory=lambda: Backoff(first=1.0, factor=2.0, cap=60.0, jitter=0.2))
    budget: int = 5  # attempts in any window
    window: float = 600.0
    cooldown: float = 1800.0  # how long a quarantine lasts unless an operator lifts it
    forget_after: float = 300.0  # healthy this long: history forgotten

    def __post_init__(self) -> None:
        if self.budget < 1 or self.window <= 0 or self.forget_after <= 0:
            raise ValueError("a healing policy needs budget >= 1, window > 0 and forget_after > 0")
        # A quarantine lifted by its cooldown starts a fresh budget: were the cooldown shorter than
        # the window, more than `budget` attempts could fit in one window.
        if self.cooldown < self.window:
            raise ValueError("a healing policy needs cooldown >= window")

    def delay_before(self, attempt: int, rand: float) -> float:
        """Seconds to wait before attempt number `attempt` (0-based) of one episode: 0 for the first."""
        return 0.0 if attempt == 0 else self.backoff.delay(attempt - 1, rand)


@dataclass(frozen=True)
class UnitHealth:
    """What Norm remembers of one unit's healing."""

    attempts: tuple[float, ...] = ()  # times of attempts still inside the window
    streak: int = 0  # attempts since the unit was last healthy long enough
    next_at: float = 0.0  # no attempt before this time
    in_flight: bool = False
    quarantined_until: float | None = None
    failed_since: float | None = None  # when the current failure episode was first seen
    healthy_since: float | None = None
    reported_unloadable: bool = False

    @property
    def quarantined(self) -> bool:
        return self.quarantined_until is not None


# Commands the shell carries out


@dataclass(frozen=True)
class Heal:
    unit: str
    attempt: int  # 0-based within the episode
    reload: bool  # daemon-reload before starting: the unit file changed on disk


@dataclass(frozen=True)
class Quarantine:
    unit: str
    until: float
    attempts: int


@dataclass(frozen=True)
class QuarantineLifted:
    unit: str
    reason: str  # "cooldown", "operator" or "healthy"


@dataclass(frozen=True)
class Recovered:
    """A unit Norm was healing is active again; `seconds` from the failure first seen."""

    unit: str
    seconds: float


@dataclass(frozen=True)
class Unloadable:
    unit: str
    load_state: str


Command = Heal | Quarantine | QuarantineLifted | Recovered | Unloadable


@dataclass(frozen=True)
class Decision:
    history: Mapping[str, UnitHealth]
    commands: tuple[Command, ...]
    wake_at: float | None  # the earliest time a decision may change without any new observation


def decide(units: Mapping[str, UnitState], history: Mapping[str, UnitHealth], held: frozenset[str],
           now: float, policy: HealPolicy, rand: float = 0.5) -> Decision:
    """One pass over every unit. Units absent from `units` keep no history."""
    new: dict[str, UnitHealth] = {}
    commands: list[Command] = []
    wakes: list[float] = []
    for name in sorted(units):
        health, cmds, wake = _decide_one(units[name], history.get(name, UnitHealth()), name in held,
                                         now, policy, rand)
        new[name] = health
        commands.extend(cmds)
        if wake is not None:
            wakes.append(wake)
    return Decision(new, tuple(commands), min(wakes) if wakes else None)


def _decide_one(state: UnitState, h: UnitHealth, held: bool, now: float, policy: HealPolicy,
                rand: float) -> tuple[UnitHealth, list[Command], float | None]:
    commands: list[Command] = []
    # The same expression (t + window) decides expiry and the wake-up time, so that waking at
    # wake_at always finds the attempt expired, whatever the floating-point rounding.
    attempts = tuple(t for t in h.attempts if t + policy.window > now)
    h = dataclasses.replace(h, attempts=attempts)
    wake: float | None = attempts[0] + policy.window if attempts else None

    if h.quarantined_until is not None and now >= h.quarantined_until:
        h = dataclasses.replace(h, quarantined_until=None, attempts=(), streak=0, next_at=0.0)
        commands.append(QuarantineLifted(state.name, "cooldown"))
        wake = None

    if state.load_state != "loaded":
        if not h.reported_unloadable:
            commands.append(Unloadable(state.name, state.load_state))
        return (dataclasses.replace(h, reported_unloadable=True, healthy_since=None), commands,
                h.quarantined_until)
    h = dataclasses.replace(h, reported_unloadable=False)

    if state.healthy:
        return _decide_healthy(state, h, now, policy, wake, commands)
    return _decide_unhealthy(state, h, held, now, policy, rand, wake, commands)


def _decide_healthy(state: UnitState, h: UnitHealth, now: float, policy: HealPolicy, wake: float | None,
                    commands: list[Command]) -> tuple[UnitHealth, list[Command], float | None]:
    """A loaded unit that is healthy: it has recovered, and its history is forgotten once it has
    stayed healthy for `forget_after`."""
    since = now if h.healthy_since is None else h.healthy_since
    h = dataclasses.replace(h, healthy_since=since)
    if h.failed_since is not None:
        commands.append(Recovered(state.name, since - h.failed_since))
        h = dataclasses.replace(h, failed_since=None)
    if not (h.streak or h.quarantined):
        return h, commands, wake
    forget = since + policy.forget_after
    if now >= forget:
        if h.quarantined:
            commands.append(QuarantineLifted(state.name, "healthy"))
        return dataclasses.replace(h, streak=0, attempts=(), next_at=0.0, quarantined_until=None), \
            commands, None
    wakes = [t for t in (wake, forget, h.quarantined_until) if t is not None]
    return h, commands, min(wakes)


def _decide_unhealthy(state: UnitState, h: UnitHealth, held: bool, now: float, policy: HealPolicy,
                      rand: float, wake: float | None,
                      commands: list[Command]) -> tuple[UnitHealth, list[Command], float | None]:
    """A loaded unit that is not healthy: healed, within its backoff and budget, if it failed and is
    not someone else's business; quarantined once its budget is spent."""
    h = dataclasses.replace(h, healthy_since=None)
    if held or h.in_flight or state.systemd_will_restart or state.in_transition or not state.failed:
        # Held on purpose, being healed, systemd's own business, or stopped cleanly: not ours.
        if h.quarantined_until is not None:
            wake = h.quarantined_until if wake is None else min(wake, h.quarantined_until)
        return h, commands, wake

    if h.failed_since is None:
        h = dataclasses.replace(h, failed_since=now)
    if h.quarantined_until is not None:
        return h, commands, h.quarantined_until
    if len(h.attempts) >= policy.budget:
        until = now + policy.cooldown
        commands.append(Quarantine(state.name, until, len(h.attempts)))
        return dataclasses.replace(h, quarantined_until=until), commands, until
    if now < h.next_at:
        return h, commands, h.next_at if wake is None else min(wake, h.next_at)
    commands.append(Heal(state.name, h.streak, reload=state.need_daemon_reload))
    h = dataclasses.replace(
        h, attempts=(*h.attempts, now), streak=h.streak + 1, in_flight=True,
        next_at=now + policy.delay_before(h.streak + 1, rand))
    return h, commands, None


def heal_finished(history: Mapping[str, UnitHealth], unit: str) -> dict[str, UnitHealth]:
    """The regimen for `unit` has run (whatever its outcome): the next observation decides."""
    out = dict(history)
    if unit in out:
        out[unit] = dataclasses.replace(out[unit], in_flight=False)
    return out


def lift(history: Mapping[str, UnitHealth], unit: str) -> tuple[dict[str, UnitHealth], bool]:
    """An operator lifts `unit`'s quarantine: budget and backoff forgotten too. Returns whether
    it was quarantined."""
    out = dict(history)
    h = out.get(unit, UnitHealth())
    out[unit] = dataclasses.replace(h, quarantined_until=None, attempts=(), streak=0, next_at=0.0)
    return out, h.quarantined


# What outlives the agent


RECORD_VERSION = 1

Lasting = tuple[tuple[str, tuple[float, ...], int, float, float | None], ...]


def lasting(history: Mapping[str, UnitHealth]) -> Lasting:
    """The part of `history` that must survive a restart of the agent, comparable between two passes:
    each unit's attempts in the window, its backoff step, its next attempt's time, its quarantine.
    Units with nothing to remember are left out."""
    return tuple((name, h.attempts, h.streak, h.next_at, h.quarantined_until)
                 for name, h in sorted(history.items())
                 if h.attempts or h.streak or h.quarantined_until is not None)


def to_record(history: Mapping[str, UnitHealth], now: float, wall: float) -> dict[str, object]:
    """`lasting(history)` as a JSON-able record, times on the wall clock (seconds since the epoch):
    `now` is the monotonic time and `wall` the wall-clock time of the same instant. A monotonic clock
    means nothing to the next boot; the wall clock does."""

    def at(t: float) -> float:
        return round(wall + (t - now), 3)

    units: dict[str, object] = {}
    for name, attempts, streak, next_at, until in lasting(history):
        units[name] = {"attempts": [at(t) for t in attempts], "streak": streak,
                       "next_at": at(next_at) if next_at > now else None,
                       "quarantined_until": None if until is None else at(until)}
    return {"version": RECORD_VERSION, "units": units}


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidValue(where, "not a number of seconds")
    return float(value)


def from_record(record: object, now: float, wall: float,
                policy: HealPolicy) -> tuple[dict[str, UnitHealth], list[InvalidValue]]:
    """A history from a record `to_record` made, back on the monotonic clock (`now` and `wall` as
    there). A unit whose entry is not acceptable is left out and named in the problems returned; a
    record that is not one at all raises InvalidValue. Times the wall clock puts in the future beyond
    what the policy could have set (a clock set back) are brought within the policy's bounds, so that a
    record never holds a unit longer than a fresh quarantine would."""
    if not isinstance(record, dict) or record.get("version") != RECORD_VERSION \
            or not isinstance(record.get("units"), dict):
        raise InvalidValue("healing state", f"not a record of version {RECORD_VERSION} with units")
    history: dict[str, UnitHealth] = {}
    problems: list[InvalidValue] = []
    for name, entry in record["units"].items():
        where = f"healing state: {name!r}" if isinstance(name, str) and len(name) <= 256 \
            else "healing state: a unit"
        try:
            if not isinstance(name, str):
                raise InvalidValue(where, "not a unit name")
            parse_unit_name(name, where)
            if not isinstance(entry, dict):
                raise InvalidValue(where, "not an object")
            raw = entry.get("attempts")
            if not isinstance(raw, list) or len(raw) > 10_000:
                raise InvalidValue(where, "attempts is not a list of times")
            streak = entry.get("streak")
            if isinstance(streak, bool) or not isinstance(streak, int) or not 0 <= streak <= 10_000:
                raise InvalidValue(where, "streak is not a count")

            def mono(t: float, latest: float) -> float:
                return min(now + (t - wall), latest)

            attempts = tuple(sorted(mono(_number(t, where), now) for t in raw))
            attempts = tuple(t for t in attempts if t + policy.window > now)
            next_raw = entry.get("next_at")
            next_at = 0.0 if next_raw is None else max(
                0.0, mono(_number(next_raw, where), now + policy.backoff.cap))
            until_raw = entry.get("quarantined_until")
            until = None if until_raw is None else mono(_number(until_raw, where), now + policy.cooldown)
        except InvalidValue as e:
            problems.append(e)
            continue
        history[name] = UnitHealth(attempts=attempts, streak=streak, next_at=next_at,
                                   quarantined_until=until)
    return history, problems
