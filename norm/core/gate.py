"""The health gate of an update, as pure decisions: when a host that started its units on a new
release counts as started.

systemd saying "active" is not enough: the release must serve. The host passes the gate when every
updated unit is active and its check is healthy, continuously for `min_healthy` seconds, within
`healthy_deadline` seconds of the start. A unit's check is healthy when:
- its health URL, if it has one, answered 2xx;
- its container, if it has one, runs, and, where its image has a Docker HEALTHCHECK, is "healthy";
- a unit with neither a URL nor a Docker healthcheck only needs to be active.

Any failed observation of a unit, or its run changing (a new invocation: it restarted), resets that
unit's clock; a unit going down is not a failure by itself, only the deadline fails the gate. The gate
fails as soon as passing has become impossible: at the deadline, or earlier once a unit whose clock
was reset could no longer stay healthy `min_healthy` seconds before it. A failure names the unit and
the last output of its check (status code, error, or the Docker health log's last output), cleaned
and cut (values.clean) with the given secrets redacted.

The shell (norm.services.gate) observes every unit each round and feeds `observe`; `verdict` says
whether the host passed, failed, or is still pending. Time is a monotonic clock passed in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Literal

from norm.core.secret import redact
from norm.core.values import MAX_REASON, clean

DockerHealth = Literal["starting", "healthy", "unhealthy", "none"]


# ---------------------------------------------------------------------------------------------------
# What the shell observed of one unit in one round


@dataclass(frozen=True)
class HttpCheck:
    """The latest answer of a unit's health URL: a status code, or the error that stood for one."""

    status: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def text(self) -> str:
        if self.status is not None:
            return f"HTTP {self.status}"
        return f"no answer: {self.error or 'unknown error'}"


@dataclass(frozen=True)
class ContainerCheck:
    """What the engine said of a unit's container. `found` False: there is no such container (yet).
    `health` "none": its image has no HEALTHCHECK. `output`/`exit_code`: the health log's last entry.
    `error`: the engine could not be asked (then nothing else is known)."""

    found: bool
    running: bool = False
    health: DockerHealth = "none"
    output: str = ""
    exit_code: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.found and self.running and self.health in ("healthy", "none")

    @property
    def text(self) -> str:
        if self.error is not None:
            return f"docker: {self.error}"
        if not self.found:
            return "no container"
        if not self.running:
            return "container not running"
        if self.health == "none":
            return "container running"
        code = "" if self.exit_code is None else f" (exit {self.exit_code})"
        out = self.output.strip()
        return f"docker health {self.health}{code}" + (f": {out}" if out else "")


@dataclass(frozen=True)
class Observation:
    """One unit, observed at one moment. `invocation` is the unit's run while it is active (None
    otherwise); `state` is systemd's word for where it is ("active", "failed (exit-code)", ...). `http`
    is None for a unit without a health URL, or when it was not asked (the unit is not active);
    `container` None for a unit without a container to check."""

    unit: str
    active: bool
    invocation: str | None = None
    state: str = ""
    http: HttpCheck | None = None
    container: ContainerCheck | None = None


# ---------------------------------------------------------------------------------------------------
# The gate's configuration and state


@dataclass(frozen=True)
class GateSpec:
    """What the gate checks: the units (in the order failures are reported), which have a health URL
    and which a container, and the two bounds in seconds."""

    units: tuple[str, ...]
    min_healthy: float
    healthy_deadline: float
    with_url: frozenset[str] = frozenset()
    with_container: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not self.units:
            raise ValueError("the gate needs at least one unit")
        if len(set(self.units)) != len(self.units):
            raise ValueError("the gate's units must be distinct")
        if not 0 <= self.min_healthy <= self.healthy_deadline:
            raise ValueError("min_healthy must be from 0 to healthy_deadline")


@dataclass(frozen=True)
class UnitClock:
    """One unit's clock: since when it has been healthy without a break (None: it is not healthy), the
    run it was healthy in, and the last output of its check (and of its last failure)."""

    healthy_since: float | None = None
    invocation: str | None = None
    output: str = "not observed yet"
    last_failure: str | None = None


@dataclass(frozen=True)
class GateState:
    started_at: float
    clocks: tuple[tuple[str, UnitClock], ...]

    def clock(self, unit: str) -> UnitClock:
        return dict(self.clocks)[unit]


@dataclass(frozen=True)
class Pending:
    """Not decided yet. `pass_at`: the earliest moment it could pass (every unit staying healthy)."""

    pass_at: float


@dataclass(frozen=True)
class Passed:
    seconds: float


@dataclass(frozen=True)
class Failed:
    """The gate failed: `unit` is the one that was not healthy, `reason` says how (`output`: its
    check's last output), cleaned, cut and redacted."""

    seconds: float
    unit: str
    reason: str
    output: str


Verdict = Pending | Passed | Failed


def start(spec: GateSpec, now: float) -> GateState:
    return GateState(started_at=now, clocks=tuple((u, UnitClock()) for u in spec.units))


def healthy(spec: GateSpec, obs: Observation) -> bool:
    """Whether one observation of a unit is a healthy one."""
    if not obs.active or obs.invocation is None:
        return False
    if obs.unit in spec.with_url and (obs.http is None or not obs.http.ok):
        return False
    return not (obs.unit in spec.with_container and (obs.container is None or not obs.container.ok))


def output_of(spec: GateSpec, obs: Observation) -> str:
    """What an observation says, for a report: the first thing that is wrong, or that all is well."""
    if not obs.active or obs.invocation is None:
        return f"unit {obs.state or 'not active'}"
    parts: list[tuple[bool, str]] = []
    if obs.unit in spec.with_url:
        http = obs.http
        parts.append((False, "health URL not asked yet") if http is None else (http.ok, http.text))
    if obs.unit in spec.with_container:
        box = obs.container
        parts.append((False, "container not inspected yet") if box is None else (box.ok, box.text))
    bad = [text for ok, text in parts if not ok]
    return "; ".join(bad or [text for _, text in parts] or ["unit active"])


def observe(spec: GateSpec, state: GateState, obs: Observation, now: float) -> GateState:
    """The state after observing `obs` at `now`: a healthy observation starts the unit's clock (or
    keeps it running, in the same run); anything else, or a new run, resets it."""
    if obs.unit not in spec.units:
        raise ValueError("an observation of a unit the gate does not check")
    old = state.clock(obs.unit)
    text = output_of(spec, obs)
    if healthy(spec, obs):
        same_run = old.healthy_since is not None and old.invocation == obs.invocation
        new = UnitClock(healthy_since=old.healthy_since if same_run else now, invocation=obs.invocation,
                        output=text, last_failure=old.last_failure)
    else:
        new = UnitClock(healthy_since=None, invocation=obs.invocation, output=text, last_failure=text)
    clocks = tuple((u, new if u == obs.unit else c) for u, c in state.clocks)
    return replace(state, clocks=clocks)


def observe_all(spec: GateSpec, state: GateState, observations: Iterable[Observation],
                now: float) -> GateState:
    for obs in observations:
        state = observe(spec, state, obs, now)
    return state


def verdict(spec: GateSpec, state: GateState, now: float,
            secrets: Iterable[str] = ()) -> Verdict:
    """Passed once every unit has been healthy `min_healthy` seconds (as last observed); Failed as soon
    as that cannot happen by the deadline; Pending otherwise."""
    deadline_at = state.started_at + spec.healthy_deadline
    clocks = dict(state.clocks)
    # When each unit could have been healthy long enough: a unit not healthy now could become so only
    # after now.
    ready_at = {u: (c.healthy_since if c.healthy_since is not None else now) + spec.min_healthy
                for u, c in clocks.items()}

    def long_enough(c: UnitClock) -> bool:
        return c.healthy_since is not None and now - c.healthy_since >= spec.min_healthy

    if now <= deadline_at and all(long_enough(c) for c in clocks.values()):
        return Passed(seconds=now - state.started_at)
    pass_at = max(ready_at.values())
    # All healthy long enough but past the deadline: each of them is to blame.
    not_ready = [u for u in spec.units if not long_enough(clocks[u])] or list(spec.units)
    if pass_at <= deadline_at and now <= deadline_at:
        return Pending(pass_at=pass_at)
    # Report a unit not healthy now first, else the one furthest from healthy long enough.
    down = [u for u in not_ready if clocks[u].healthy_since is None]
    unit = down[0] if down else max(not_ready, key=lambda u: ready_at[u])
    return _failed(spec, clocks[unit], unit, now - state.started_at, late=long_enough(clocks[unit]),
                   secrets=secrets)


def _failed(spec: GateSpec, clock: UnitClock, unit: str, seconds: float, *, late: bool,
            secrets: Iterable[str]) -> Failed:
    secrets = tuple(secrets)
    output = cleaned(clock.output, secrets)
    if late:  # seen healthy long enough only by a round that ended past the deadline
        reason = f"{unit} seen healthy for {spec.min_healthy:g}s only after {spec.healthy_deadline:g}s"
    elif clock.healthy_since is None:
        reason = f"{unit} not healthy within {spec.healthy_deadline:g}s: {clock.output}"
    else:
        reason = (f"{unit} not healthy for {spec.min_healthy:g}s without a break within "
                  f"{spec.healthy_deadline:g}s; last failure: {clock.last_failure or 'none'}")
    return Failed(seconds=seconds, unit=unit, reason=cleaned(reason, secrets), output=output)


def cleaned(text: str, secrets: Iterable[str] = (), limit: int = MAX_REASON) -> str:
    """Text for a report, log line or etcd: the secrets redacted, control characters replaced, cut to
    `limit` characters."""
    return clean(redact(text, secrets), limit)


def secrets_of_url(url: str) -> tuple[str, ...]:
    """What of a health URL must not be shown: the whole URL, its query and its user info (a token
    often rides in either)."""
    out = [url]
    _, _, rest = url.partition("://")
    authority, _, path = rest.partition("/")
    if "@" in authority:
        out.append(authority.rpartition("@")[0])
    query = path.partition("?")[2].partition("#")[0]
    if query:
        out.append(query)
    return tuple(out)


# ---------------------------------------------------------------------------------------------------
# An image's declared migrations (its label)

MIGRATIONS_LABEL = "org.norm.migrations"
MIGRATIONS = ("none", "expand", "breaking")
Migrations = Literal["none", "expand", "breaking"]
_KINDS: dict[str, Migrations] = {"none": "none", "expand": "expand", "breaking": "breaking"}


@dataclass(frozen=True)
class DeclaredMigrations:
    """What an image's MIGRATIONS_LABEL says: `kind` None when it says nothing usable (absent:
    `problem` None; malformed: `problem` says why)."""

    kind: Migrations | None
    problem: str | None = None


def declared_migrations(labels: Mapping[str, str] | None) -> DeclaredMigrations:
    """Read the migrations label of an image's labels: "none" (no schema change), "expand" (only
    additions the running release tolerates), "breaking" (the running release cannot work on the new
    schema). Case and surrounding blanks are ignored."""
    raw = (labels or {}).get(MIGRATIONS_LABEL)
    if raw is None:
        return DeclaredMigrations(None)
    if not isinstance(raw, str):
        return DeclaredMigrations(None, f"{MIGRATIONS_LABEL} is not text")
    kind = _KINDS.get(raw.strip().lower())
    if kind is not None:
        return DeclaredMigrations(kind)
    return DeclaredMigrations(None, f"{MIGRATIONS_LABEL} is {cleaned(repr(raw), limit=80)}, not one of "
                                    f"{', '.join(MIGRATIONS)}")


def migrations_of(labels: Mapping[str, str] | None) -> Migrations | None:
    """The migrations an image declares, or None when it declares none usable (absent or malformed:
    see `declared_migrations` for why)."""
    return declared_migrations(labels).kind
