"""Load-balancer presence as pure decisions: whether this host belongs in its ELBv2 target groups, and
what to do about each group.

The host belongs in its target groups while the web unit is active, its health URL has answered 2xx
for the unit's current run (its invocation), and no update is between taking the host out before
STOP and starting the units again. Every other state takes it out.

The shell (norm.services.presence) feeds `decide` what it observed and carries out the commands:
register or deregister one group, or check the health URL for one invocation of the unit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from norm.core.errors import InvalidValue

# The states describe_target_health reports. A target leaving the group is "draining" (or
# "unhealthy.draining") until the group's deregistration delay has passed, then "unused" with the
# reason Target.NotRegistered.
TARGET_STATES = frozenset({"initial", "healthy", "unhealthy", "unhealthy.draining", "unused", "draining",
                           "unavailable"})
DRAINING_STATES = frozenset({"draining", "unhealthy.draining"})
NOT_REGISTERED = "Target.NotRegistered"

_ARN = re.compile(
    r"arn:aws[a-z-]*:elasticloadbalancing:(?P<region>[a-z0-9-]+):[0-9]{12}:targetgroup/"
    r"[A-Za-z0-9-]{1,32}/[0-9a-f]{16}")


def is_registered(state: str, reason: str | None) -> bool:
    """Whether a target in `state` (with `reason`) is in the group: it is unless it is leaving it or
    was never in it. "unused" also means registered in a group no load balancer uses (Target.NotInUse)
    or on a stopped instance (Target.InvalidState): those are registered."""
    if state in DRAINING_STATES:
        return False
    return not (state == "unused" and reason == NOT_REGISTERED)


def is_drained(state: str, reason: str | None) -> bool:
    """Whether a target is out of the group for good: no longer draining, and not registered."""
    return state not in DRAINING_STATES and not is_registered(state, reason)


def arn_region(arn: str) -> str:
    """The region of a target group ARN: the region every call about that group goes to."""
    m = _ARN.fullmatch(arn)
    if m is None:
        raise InvalidValue("lb.target_groups", "not a target group ARN")
    return m["region"]


# ---------------------------------------------------------------------------------------------------
# What the shell observed, and the commands


@dataclass(frozen=True)
class Observed:
    """Everything presence decides from.

    `invocation`: the unit's current invocation id while it is active (or reloading), None otherwise.
    `healthy`: the invocation whose health check passed (None: none yet). `gave_up`: the invocation
    whose health check ran out of time. `needs_health`: a health URL is configured. `suspended`: an
    update took the host out before stopping the units and has not started them again. `stale`: the
    invocation that ran when the update took the host out: it is never registered again (the watch may
    still show it after the units were started again). `registered`: per target group, whether the
    host is in it as far as presence knows (None: unknown, as after a start of the agent)."""

    invocation: str | None
    registered: Mapping[str, bool | None] = field(default_factory=dict)
    healthy: str | None = None
    gave_up: str | None = None
    needs_health: bool = True
    suspended: bool = False
    stale: str | None = None


@dataclass(frozen=True)
class Register:
    target_group: str


@dataclass(frozen=True)
class Deregister:
    target_group: str


@dataclass(frozen=True)
class CheckHealth:
    """Check the health URL until it answers 2xx (bounded), for this invocation of the unit."""

    invocation: str


Command = Register | Deregister | CheckHealth


def eligible(o: Observed) -> str | None:
    """The invocation that may be put in the groups once healthy, or None."""
    if o.invocation is None or o.suspended or o.invocation == o.stale:
        return None
    return o.invocation


def wanted(o: Observed) -> bool:
    """Whether the host belongs in its target groups now."""
    inv = eligible(o)
    return inv is not None and (not o.needs_health or o.healthy == inv)


def decide(o: Observed) -> tuple[Command, ...]:
    """The commands that bring the groups to what `o` wants. A group whose registration is unknown gets
    the (idempotent) call either way, once the health check of the current run has said. The groups
    keep their given order."""
    commands: list[Command] = []
    inv = eligible(o)
    checking = inv is not None and o.needs_health and inv not in (o.healthy, o.gave_up)
    if checking and inv is not None:
        commands.append(CheckHealth(inv))
    want = wanted(o)
    for group, registered in o.registered.items():
        if want and registered is not True:
            commands.append(Register(group))
        elif not want and registered is False:
            continue
        elif not want and not (registered is None and checking):
            # An unknown registration is left alone while the run is being checked: an agent that
            # restarts under a serving unit does not take the host out for the time of a check.
            commands.append(Deregister(group))
    return tuple(commands)
