"""The fleet's update policy: how every rollout is carried out, kept in one etcd key that every host
reads (`<prefix>/policy`), so that a change of leader never changes what a rollout does.

A fleet with no policy key uses what each host's `[update]` section says (`policy_from_update_config`):
today's behaviour, a recreate with every step run while the fleet is stopped. Operators write the key
with `norm policy apply FILE`, from the TOML file `parse_policy_toml` reads (docs/policy.md).

The key is read back by every host, so it is decoded strictly (norm.core.wire): a value of the wrong
type, or out of its grammar, is refused naming the field, never quoting the value. The same checks
run when a policy is made in code (`__post_init__`), so that no FleetPolicy breaks them.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shlex
import tomllib
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeAlias

from norm.core import values, wire
from norm.core.analysis import AnalysisQuery, analysis_toml, parse_analysis
from norm.core.config import UpdateConfig, step_name
from norm.core.desired import is_tag
from norm.core.errors import ConfigError, InvalidValue
from norm.core.notify import Webhook, parse_webhooks, webhook_text, webhooks_toml
from norm.core.tomltext import toml_string, toml_value
from norm.core.windows import MAX_WINDOWS, check_window
from norm.core.wire import StepName

Strategy = Literal["auto", "rolling", "recreate"]
When = Literal["pre", "post"]
OnTrouble = Literal["exclude", "abort"]

MAX_DURATION = 86400.0  # a day, as the [update] timeouts of the configuration
MAX_COMMAND = 4096  # characters of a step's command line
# A count of hosts (at least 1, at most 6 digits), or a whole percentage from 1% to 100%.
MAX_UNAVAILABLE = re.compile(r"[1-9][0-9]{0,5}|([1-9][0-9]?|100)%")


def policy_key(prefix: str) -> str:
    """The key holding the fleet's policy."""
    return f"{prefix}/policy"


# ---------------------------------------------------------------------------------------------------
# The grammar of each field: `check(value, name)` returns the value, or raises ValueError or TypeError
# naming `name` (a field's path), never quoting the value


def _duration(v: float, name: str) -> float:
    if not 0 < v <= MAX_DURATION:
        raise ValueError(f"{name}: must be more than 0 and at most {MAX_DURATION:g} seconds")
    return v


def _wait(v: float, name: str) -> float:
    if not 0 <= v < MAX_DURATION:
        raise ValueError(f"{name}: must be from 0 to less than {MAX_DURATION:g} seconds")
    return v


def _canary(v: str, name: str) -> str:
    if values.string(v, name) and not MAX_UNAVAILABLE.fullmatch(v):
        raise ValueError(f"{name}: must be empty (no canary), a count of hosts (1 or more) or a percentage "
                         "from 1% to 100%")
    return v


_MATCHERS = re.compile(r'[A-Za-z0-9_:.,=~!"\' \-|*+?()\[\]{}^$\\/]{0,1024}')


def _block_alerts(v: str, name: str) -> str:
    if not _MATCHERS.fullmatch(values.string(v, name)):
        raise ValueError(f"{name}: must be PromQL label matchers (such as severity=\"critical\"), at most "
                         "1024 characters, no control characters")
    return v


def _max_unavailable(v: str, name: str) -> str:
    if not MAX_UNAVAILABLE.fullmatch(values.string(v, name)):
        raise ValueError(f"{name}: must be a count of hosts (1 or more) or a percentage from 1% to 100%")
    return v


def _command(v: str, name: str) -> str:
    values.text(v, name, limit=MAX_COMMAND)
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, which JSON's escapes can carry
        raise ValueError(f"{name}: not Unicode text") from None
    try:
        words = shlex.split(v)
    except ValueError:
        raise ValueError(f"{name}: not a command line (an unclosed quote or a trailing backslash)") from None
    if not words:
        raise ValueError(f"{name}: an empty command")
    return v


def _role(v: str, name: str) -> str:
    if not values.LABEL.fullmatch(values.string(v, name)):
        raise ValueError(f"{name}: must be 1 to 63 letters, digits, '_', '.' or '-'")
    return v


def _tag_or_digest(v: str, name: str) -> str:
    if not (is_tag(values.string(v, name)) or values.DIGEST.fullmatch(v)):
        raise ValueError(f"{name}: must be an image tag or a sha256 digest")
    return v


Duration: TypeAlias = Annotated[float, wire.Check(_duration)]
Command: TypeAlias = Annotated[str, wire.Check(_command)]
Role: TypeAlias = Annotated[str, wire.Check(_role)]
TagOrDigest: TypeAlias = Annotated[str, wire.Check(_tag_or_digest)]


FieldChecks: TypeAlias = tuple[tuple[str, bool, tuple[wire.Check, ...]], ...]
_CHECKS: dict[str, FieldChecks] = {}  # by class name, made once


def _checks(cls: type[Any]) -> FieldChecks:
    """Each field of `cls` with the grammar checks its annotation declares: (name, whether they
    apply to each item of a tuple, checks)."""
    if cls.__qualname__ in _CHECKS:
        return _CHECKS[cls.__qualname__]
    hints = typing.get_type_hints(cls, include_extras=True)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        each = typing.get_origin(tp) is tuple
        if each:
            tp = typing.get_args(tp)[0]
        out.append((f.name, each, tuple(m for m in getattr(tp, "__metadata__", ())
                                        if isinstance(m, wire.Check))))
    checks = _CHECKS[cls.__qualname__] = tuple(out)
    return checks


def _checked(obj: StepPolicy | FleetPolicy) -> None:
    """Run the grammar checks the fields' annotations declare on `obj`'s values (on each item of a
    tuple), as the decoder does: for a record made in code."""
    for name, each, checks in _checks(type(obj)):
        value = getattr(obj, name)
        if each and not isinstance(value, tuple):
            raise TypeError(f"{name}: expected a tuple")
        items = [(f"{name}[{i}]", v) for i, v in enumerate(value)] if each else [(name, value)]
        for path, v in items:
            for check in checks:
                check.fn(v, path)


def batch_size(max_unavailable: str, hosts: int) -> int:
    """How many of `hosts` may be unavailable at once: `max_unavailable` resolved for that many.

    A percentage rounds down, as Kubernetes does maxUnavailable: the setting is a bound on the
    capacity lost, and rounding up would take more out than it says (25% of 10 hosts is 2, not
    3). It is never less than 1, or a small fleet would never move, and never more than `hosts`
    (but 1 for an empty fleet, so that a batch is never empty)."""
    _max_unavailable(max_unavailable, "max_unavailable")
    if hosts < 0:
        raise ValueError("hosts: must be 0 or more")
    text = max_unavailable
    n = hosts * int(text[:-1]) // 100 if text.endswith("%") else int(text)
    return max(1, min(hosts, n))


# ---------------------------------------------------------------------------------------------------
# The policy


@dataclass(frozen=True)
class StepPolicy:
    """One one-off command run in the new image, once per image digest."""

    name: StepName  # in the ledger and the keys; by default derived from the command (config.step_name)
    command: Command  # the command line (split like a shell's words, not run by a shell)
    # rolling: "pre" runs before the first batch (expand), "post" after every host passed its gate
    # (contract); recreate: all run while the fleet is stopped, every "pre" before any "post"
    when: When = "pre"

    def __post_init__(self) -> None:
        _checked(self)
        if self.when not in ("pre", "post"):
            raise ValueError("when: must be pre or post")


DEFAULT_STEPS = (StepPolicy("migrate", "migrate"), StepPolicy("collectstatic", "collectstatic"))


@dataclass(frozen=True)
class FleetPolicy:
    """How the fleet's rollouts are carried out (docs/policy.md says each field's meaning)."""

    # auto: rolling when the image declares its migrations none or expand, else recreate
    strategy: Strategy = "auto"
    max_unavailable: Annotated[str, wire.Check(_max_unavailable)] = "1"  # a count or "1%".."100%"
    min_healthy: Annotated[float, wire.Check(_wait)] = 10.0  # seconds a started host stays healthy
    healthy_deadline: Duration = 300.0  # seconds a started host has to become healthy
    progress_deadline: Duration = 600.0  # seconds a rollout may go without a host becoming healthy
    auto_rollback: bool = True
    roles: tuple[Role, ...] = ()  # roles taking part; every role when empty
    steps: tuple[StepPolicy, ...] = DEFAULT_STEPS
    compatible: tuple[TagOrDigest, ...] = ()  # safe to set the fleet back to without a down-migration
    pull_timeout: Duration = 600.0
    stop_timeout: Duration = 120.0
    start_timeout: Duration = 300.0
    migration_timeout: Duration = 1800.0
    on_trouble: OnTrouble = "exclude"
    # A rolling update's first batch, moved alone and watched before the rest: a count, a percentage
    # (rounded down, at least 1), or empty for none; how long it is watched (its analysis).
    canary: Annotated[str, wire.Check(_canary)] = ""
    canary_wait: Annotated[float, wire.Check(_wait)] = 0.0
    # What decides the canary besides its health gates: Prometheus queries (norm.core.analysis), run by
    # the leader against its update.prometheus_url while the canary is watched.
    analysis: tuple[AnalysisQuery, ...] = ()
    # Where the leader posts the rollouts' events and the hosts' quarantines (norm.core.notify); each
    # URL is read from a file on the leader-eligible hosts, never kept in etcd.
    webhooks: tuple[Webhook, ...] = ()
    # When rollouts may advance: maintenance windows in UTC (norm.core.windows: 'mon-fri 02:00-05:00');
    # none: always. And alerts that hold them while firing: label matchers of Prometheus's ALERTS,
    # asked of the leader's update.prometheus_url ("" for none). `norm deploy --now` overrides both.
    windows: tuple[Annotated[str, wire.Check(check_window)], ...] = ()
    block_alerts: Annotated[str, wire.Check(_block_alerts)] = ""

    def __post_init__(self) -> None:
        _check_types(self)
        _checked(self)
        _check_across(self)

    def batch_size(self, hosts: int) -> int:
        """How many of `hosts` may be unavailable at once (`batch_size`)."""
        return batch_size(self.max_unavailable, hosts)

    def encode(self) -> bytes:
        """As the policy key holds it."""
        return wire.encode(self, compact=False)

    @classmethod
    def decode(cls, raw: bytes, where: str) -> FleetPolicy:
        """The policy `raw` holds, strictly; InvalidValue naming the field at fault, never its value."""
        return wire.read(cls, raw, where, "fleet policy")


def _check_types(p: FleetPolicy) -> None:
    """What the annotations' grammar checks take for granted, for a policy made in code."""
    for name in ("min_healthy", "healthy_deadline", "progress_deadline", "pull_timeout",
                 "stop_timeout", "start_timeout", "migration_timeout", "canary_wait"):
        v = getattr(p, name)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"{name}: expected a finite number")
    if not isinstance(p.auto_rollback, bool):
        raise TypeError("auto_rollback: expected true or false")
    if p.strategy not in typing.get_args(Strategy):
        raise ValueError("strategy: must be auto, rolling or recreate")
    if p.on_trouble not in typing.get_args(OnTrouble):
        raise ValueError("on_trouble: must be exclude or abort")
    for i, step in enumerate(p.steps if isinstance(p.steps, tuple) else ()):
        if not isinstance(step, StepPolicy):
            raise TypeError(f"steps[{i}]: expected a step")


def _check_across(p: FleetPolicy) -> None:
    """The rules across fields."""
    if not p.min_healthy < p.healthy_deadline:
        raise ValueError("min_healthy: must be less than healthy_deadline")
    if not p.healthy_deadline < p.progress_deadline:
        raise ValueError("healthy_deadline: must be less than progress_deadline")
    if len({s.name for s in p.steps}) != len(p.steps):
        raise ValueError("steps: each step's name must be distinct")
    if len(set(p.roles)) != len(p.roles):
        raise ValueError("roles: a role is named twice")
    if len({h.name for h in p.webhooks}) != len(p.webhooks):
        raise ValueError("webhooks: each webhook's name must be distinct")
    if len(p.windows) > MAX_WINDOWS:
        raise ValueError(f"windows: at most {MAX_WINDOWS}")


# ---------------------------------------------------------------------------------------------------
# A fleet without a policy key


def policy_from_update_config(update: UpdateConfig) -> FleetPolicy:
    """The policy of a fleet with no policy key: what the host's [update] section says, carried out
    as always (a recreate, every step run while the fleet is stopped).

    The configuration's lists are taken as they mean: a role named twice once, and entries of
    `compatible` that are neither a tag nor a digest left out (no rollout's tag or digest can equal
    them). A step's command that no policy accepts (control characters, an unclosed quote) is
    refused naming the step."""
    steps = []
    for i, command in enumerate(update.steps):
        try:
            steps.append(StepPolicy(step_name(command), command))
        except (ValueError, TypeError) as e:
            raise InvalidValue(f"update.steps[{i}]", str(e).partition(": ")[2] or str(e)) from None
    compatible = tuple(c for c in dict.fromkeys(update.compatible)
                       if is_tag(c) or values.DIGEST.fullmatch(c))
    return FleetPolicy(
        strategy="recreate", min_healthy=0.0, roles=tuple(dict.fromkeys(update.roles)), steps=tuple(steps),
        compatible=compatible, pull_timeout=update.pull_timeout, stop_timeout=update.stop_timeout,
        start_timeout=update.start_timeout, migration_timeout=update.migration_timeout,
        on_trouble=update.on_trouble)


# ---------------------------------------------------------------------------------------------------
# The file `norm policy apply` takes


FIELDS = tuple(f.name for f in dataclasses.fields(FleetPolicy))
STEP_FIELDS = tuple(f.name for f in dataclasses.fields(StepPolicy))


def parse_policy_toml(text: str, source: str) -> FleetPolicy:
    """The policy a TOML file holds: its top-level keys are FleetPolicy's fields, each `[[steps]]`
    table a step (`name`, by default derived from `command`; `command`; `when`, by default "pre").
    A field left out takes its default. Raises ConfigError naming the key and `source`, never
    quoting a value."""
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("-", source, f"not valid TOML: {e}") from None
    except ValueError:  # tomllib refuses some values (an integer too long) with a bare ValueError
        raise ConfigError("-", source, "not valid TOML: a value cannot be read") from None
    for key in data:
        if key not in FIELDS:
            raise ConfigError(key, source, f"unknown key (known: {', '.join(FIELDS)})")
    _counts_as_text(data)
    _tables(data, source)
    try:
        return wire.decode(FleetPolicy, data)
    except (ValueError, TypeError) as e:
        key, sep, reason = str(e).partition(": ")
        if not sep:
            raise ConfigError("-", source, str(e)) from None
        allowed = _ALLOWED.get(re.sub(r"\[[0-9]+\]", "", key))
        if allowed is not None and reason == "not one of the values allowed":
            reason = f"must be one of {', '.join(allowed)}"
        raise ConfigError(key, source, reason) from None


def _tables(data: dict[str, Any], source: str) -> None:
    """The arrays of tables, each read (and refused, in its own words) by its own parser first."""
    if "steps" in data:
        data["steps"] = _steps(data["steps"], source)
    if "analysis" in data:
        parse_analysis(data["analysis"], source)
    if "webhooks" in data:
        parse_webhooks(data["webhooks"], source)


def _counts_as_text(data: dict[str, Any]) -> None:
    """A count of hosts may be written as a number; the policy keeps it as text."""
    for key in ("max_unavailable", "canary"):
        if isinstance(data.get(key), int) and not isinstance(data[key], bool):
            data[key] = str(data[key])


_ALLOWED = {"strategy": typing.get_args(Strategy), "on_trouble": typing.get_args(OnTrouble),
            "steps.when": typing.get_args(When)}


def _steps(steps: object, source: str) -> object:
    if not isinstance(steps, list):
        raise ConfigError("steps", source, "expected [[steps]] tables")
    out: list[object] = []
    for i, step in enumerate(steps):
        if not isinstance(step, dict):
            raise ConfigError(f"steps[{i}]", source, "expected a table with name, command and when")
        for key in step:
            if key not in STEP_FIELDS:
                raise ConfigError(f"steps[{i}].{key}", source,
                                  f"unknown key (known: {', '.join(STEP_FIELDS)})")
        if "name" not in step:
            if not isinstance(step.get("command"), str):
                reason = "expected a string" if "command" in step else "missing"
                raise ConfigError(f"steps[{i}].command", source, reason)
            name = step_name(step["command"])
            if not name:
                raise ConfigError(f"steps[{i}].name", source,
                                  "cannot be derived from the command: give the step a name")
            out.append({**step, "name": name})
        else:
            out.append(step)
    return out


# ---------------------------------------------------------------------------------------------------
# Showing a policy, and what changes from one to another


def step_text(s: StepPolicy) -> str:
    return f"{s.name} ({s.when}): {toml_string(s.command)}"


def policy_toml(policy: FleetPolicy) -> str:
    """The policy as a file `parse_policy_toml` reads back as the same policy."""
    lines = [f"{name} = {toml_value(getattr(policy, name))}" for name in FIELDS
             if name not in ("steps", "analysis", "webhooks")]
    if not policy.steps:
        lines.append("steps = []")
    for s in policy.steps:
        lines += ["", "[[steps]]", f"name = {toml_string(s.name)}", f"command = {toml_string(s.command)}",
                  f'when = "{s.when}"']
    if policy.analysis:
        lines += ["", analysis_toml(policy.analysis).rstrip("\n")]
    if policy.webhooks:
        lines += ["", webhooks_toml(policy.webhooks).rstrip("\n")]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Change:
    """One field that differs: its value before and after, as the policy file writes them."""

    field: str
    before: str
    after: str


def changes(before: FleetPolicy, after: FleetPolicy) -> tuple[Change, ...]:
    """What differs from `before` to `after`, field by field in the policy's order; the steps as a
    whole, each shown as `name (when): command`."""
    out = []
    for name in FIELDS:
        a, b = getattr(before, name), getattr(after, name)
        if a == b:
            continue
        if name == "steps":
            out.append(Change(name, "[" + ", ".join(step_text(s) for s in a) + "]",
                              "[" + ", ".join(step_text(s) for s in b) + "]"))
        elif name == "webhooks":
            out.append(Change(name, "[" + ", ".join(webhook_text(h) for h in a) + "]",
                              "[" + ", ".join(webhook_text(h) for h in b) + "]"))
        elif name == "analysis":
            out.append(Change(name, "[" + ", ".join(toml_string(q.name) for q in a) + "]",
                              "[" + ", ".join(toml_string(q.name) for q in b) + "]"))
        else:
            out.append(Change(name, toml_value(a), toml_value(b)))
    return tuple(out)
