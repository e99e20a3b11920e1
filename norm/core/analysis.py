"""Canary analysis: queries measured over time, and how their measurements decide (like Argo Rollouts'
AnalysisTemplate, with Prometheus as the only provider).

An analysis is a tuple of `AnalysisQuery`: each names a PromQL query, how often to measure it
(`interval` seconds, first one interval after the analysis started), how many measurements to take
(`count`), the condition a measurement's value must satisfy (`success`, e.g. "result < 0.05"), and
how many failed or inconclusive measurements it tolerates (`failure_limit`, `inconclusive_limit`).

A measurement (`measure`) is the outcome of one run of a query:
- exactly one sample with a finite value: "success" when the condition holds, else "failure";
- no sample, several samples, or a value that is NaN or infinite: "inconclusive" (with the reason);
- the query could not be asked (`unavailable`: Prometheus unreachable, say): "inconclusive";
- Prometheus refused the query (`refused`: a bad query): "failure" with no value, which fails the
  query at once, whatever its failure_limit (no later measurement can do better).

`verdict` decides from the measurements taken so far; `due` and `next_due` say when each query is
measured next. Everything here is pure: times come in as arguments (seconds on any one clock).

The queries are written as `[[analysis]]` TOML tables (`parse_analysis`, `analysis_toml`); their
fields are held to a grammar (norm.core.wire checks) both when decoded and when made in code, and an
error names the field, never quoting the value.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeAlias

from norm.core import values, wire
from norm.core.errors import ConfigError
from norm.core.tomltext import toml_string

Outcome = Literal["success", "failure", "inconclusive"]
State = Literal["running", "passed", "failed", "inconclusive"]
Op = Literal["<", "<=", ">", ">=", "==", "!="]

MAX_QUERY = 4096  # characters of a PromQL query
MAX_CONDITION = 128  # characters of a condition
MAX_INTERVAL = 86400.0  # a day
MAX_COUNT = 10000  # measurements of one query
MAX_QUERIES = 64  # queries of one analysis

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq,
    "!=": operator.ne,
}
# result <op> <number>: blanks optional around each part; the number in decimal, with an exponent
# or not. The two-character operators come first in the alternation.
_CONDITION = re.compile(
    r"[ \t]*result[ \t]*(<=|>=|==|!=|<|>)[ \t]*"
    r"([-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)[ \t]*")


# ---------------------------------------------------------------------------------------------------
# Conditions


@dataclass(frozen=True)
class Condition:
    """`result <op> <threshold>`: what a measurement's value must satisfy to be a success."""

    op: Op
    threshold: float

    def holds(self, value: float) -> bool:
        """Whether `value` satisfies the condition (never for NaN)."""
        return not math.isnan(value) and _OPS[self.op](value, self.threshold)

    def __str__(self) -> str:
        return f"result {self.op} {self.threshold:g}"


def parse_condition(text: str, name: str = "success") -> Condition:
    """The condition `text` states (`result < 0.05`; op one of < <= > >= == !=; blanks optional).
    Parsed by a regular expression, never evaluated. Raises ValueError naming `name` (the field),
    never quoting the text."""
    values.string(text, name)
    if len(text) > MAX_CONDITION:
        raise ValueError(f"{name}: longer than {MAX_CONDITION} characters")
    m = _CONDITION.fullmatch(text)
    if m is None:
        raise ValueError(f"{name}: must be `result <op> <number>`, op one of < <= > >= == !=")
    threshold = float(m.group(2))
    if not math.isfinite(threshold):
        raise ValueError(f"{name}: the number is out of range")
    return Condition(typing.cast(Op, m.group(1)), threshold)


# ---------------------------------------------------------------------------------------------------
# The grammar of each field: `check(value, name)` returns the value, or raises ValueError or TypeError
# naming `name`, never quoting the value


def _name(v: str, name: str) -> str:
    if not values.LABEL.fullmatch(values.string(v, name)):
        raise ValueError(f"{name}: must be 1 to 63 letters, digits, '_', '.' or '-', starting with a "
                         "letter or digit")
    return v


def _query(v: str, name: str) -> str:
    values.text(v, name, limit=MAX_QUERY)
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        raise ValueError(f"{name}: not Unicode text") from None
    if not v.strip():
        raise ValueError(f"{name}: an empty query")
    return v


def _interval(v: float, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise TypeError(f"{name}: expected a finite number")
    if not 0 < v <= MAX_INTERVAL:
        raise ValueError(f"{name}: must be more than 0 and at most {MAX_INTERVAL:g} seconds")
    return v


def _count(v: int, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an integer")
    if not 1 <= v <= MAX_COUNT:
        raise ValueError(f"{name}: must be from 1 to {MAX_COUNT}")
    return v


def _limit(v: int, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an integer")
    if not 0 <= v < MAX_COUNT:
        raise ValueError(f"{name}: must be from 0 to {MAX_COUNT - 1}")
    return v


def _condition(v: str, name: str) -> str:
    parse_condition(v, name)
    return v


QueryName: TypeAlias = Annotated[str, wire.Check(_name)]
PromQL: TypeAlias = Annotated[str, wire.Check(_query)]
Interval: TypeAlias = Annotated[float, wire.Check(_interval)]
Count: TypeAlias = Annotated[int, wire.Check(_count)]
Limit: TypeAlias = Annotated[int, wire.Check(_limit)]
ConditionText: TypeAlias = Annotated[str, wire.Check(_condition)]


# ---------------------------------------------------------------------------------------------------
# Queries, samples, measurements


@dataclass(frozen=True)
class AnalysisQuery:
    """One query of an analysis (docs/analysis.md says each field's meaning)."""

    name: QueryName  # names the query in measurements, verdicts and logs
    query: PromQL  # PromQL, run as an instant query
    interval: Interval  # seconds between measurements; the first is one interval after the start
    count: Count  # measurements to take
    success: ConditionText  # what a measurement's value must satisfy: `result <op> <number>`
    failure_limit: Limit = 0  # failed measurements tolerated
    inconclusive_limit: Limit = 0  # inconclusive measurements tolerated

    def __post_init__(self) -> None:
        for f, check in _FIELD_CHECKS:
            check(getattr(self, f), f)
        if self.failure_limit >= self.count:
            raise ValueError("failure_limit: must be less than count")
        if self.inconclusive_limit >= self.count:
            raise ValueError("inconclusive_limit: must be less than count")

    @property
    def condition(self) -> Condition:
        return parse_condition(self.success)


_FIELD_CHECKS: tuple[tuple[str, Callable[[Any, str], object]], ...] = (
    ("name", _name), ("query", _query), ("interval", _interval), ("count", _count),
    ("success", _condition), ("failure_limit", _limit), ("inconclusive_limit", _limit),
)
FIELDS = tuple(f.name for f in dataclasses.fields(AnalysisQuery))


@dataclass(frozen=True)
class Sample:
    """One element of an instant vector: its labels and its value."""

    labels: Mapping[str, str]
    value: float


@dataclass(frozen=True)
class Measurement:
    """One run of the query named `query`, at time `at`: its outcome, the value it read (None when it
    read none, or one that is not a finite number) and why it is not a success (None for a success).
    It travels as a record (norm.core.wire.encode, decode)."""

    query: QueryName
    at: float
    outcome: Outcome
    value: float | None  # finite, or None
    reason: wire.Reason | None

    @property
    def refused(self) -> bool:
        """A failure without a value: the query itself was refused, which fails it at once."""
        return self.outcome == "failure" and self.value is None


def measure(query: AnalysisQuery, samples: Sequence[Sample], at: float) -> Measurement:
    """The measurement that `samples` (an instant query's answer) make for `query` at `at`."""
    if not samples:
        return Measurement(query.name, at, "inconclusive", None, "no data: the query returned no sample")
    if len(samples) > 1:
        return Measurement(query.name, at, "inconclusive", None,
                           f"{len(samples)} samples: the query must return exactly one (aggregate it)")
    value = samples[0].value
    if not math.isfinite(value):  # kept as None: a measurement is a record (norm.core.wire) of finite values
        return Measurement(query.name, at, "inconclusive", None,
                           f"the value is {value}, not a finite number")
    condition = query.condition
    if condition.holds(value):
        return Measurement(query.name, at, "success", value, None)
    return Measurement(query.name, at, "failure", value, f"{value:g} does not satisfy {condition}")


def unavailable(query: AnalysisQuery, at: float, reason: str) -> Measurement:
    """The measurement of a query that could not be asked (the server unreachable, say)."""
    return Measurement(query.name, at, "inconclusive", None, values.clean(reason))


def refused(query: AnalysisQuery, at: float, reason: str) -> Measurement:
    """The measurement of a query the server refused: it fails the query at once."""
    return Measurement(query.name, at, "failure", None, values.clean(reason))


# ---------------------------------------------------------------------------------------------------
# Deciding


@dataclass(frozen=True)
class Verdict:
    """Where an analysis stands: running until it is decided, then passed, failed or inconclusive;
    `reason` names the query and the values that decided it."""

    state: State
    reason: str

    @property
    def done(self) -> bool:
        return self.state != "running"


def _by_query(queries: Sequence[AnalysisQuery], measurements: Sequence[Measurement]
              ) -> dict[str, list[Measurement]]:
    names = [q.name for q in queries]
    if len(set(names)) != len(names):
        raise ValueError("queries: each query's name must be distinct")
    taken: dict[str, list[Measurement]] = {name: [] for name in names}
    for m in measurements:
        if m.query not in taken:
            raise ValueError("measurements: one is of a query the analysis does not have")
        taken[m.query].append(m)
    # A query's measurements beyond its count do not count.
    return {q.name: taken[q.name][:q.count] for q in queries}


def _values(ms: Sequence[Measurement], outcome: Outcome) -> str:
    shown = [f"{m.value:g}" if m.value is not None else "none" for m in ms if m.outcome == outcome]
    return ", ".join(shown[-10:]) + (" (the last 10)" if len(shown) > 10 else "")


def verdict(queries: Sequence[AnalysisQuery], measurements: Sequence[Measurement]) -> Verdict:
    """What the measurements so far decide, taken in the order given (the order they were taken): the
    first measurement that decides decides for good. A query fails when it is refused, or once its
    failures exceed its failure_limit; it is inconclusive once its inconclusive measurements exceed
    its inconclusive_limit. Undecided, the analysis has passed once every query has its count, else it
    is running. A query's measurements past its count do not count."""
    taken = _by_query(queries, measurements)
    by_name = {q.name: q for q in queries}
    seen: dict[str, list[Measurement]] = {name: [] for name in by_name}
    counted = {name: len(ms) for name, ms in taken.items()}
    for m in measurements:
        q, ms = by_name[m.query], seen[m.query]
        if len(ms) >= counted[q.name]:
            continue
        ms.append(m)
        if m.refused:
            return Verdict("failed", f"{q.name}: the query was refused: {m.reason}")
        failures = sum(x.outcome == "failure" for x in ms)
        if m.outcome == "failure" and failures > q.failure_limit:
            return Verdict("failed", f"{q.name}: {failures} of {len(ms)} measurements failed "
                                     f"{q.success} (limit {q.failure_limit}): {_values(ms, 'failure')}")
        inconclusive = sum(x.outcome == "inconclusive" for x in ms)
        if m.outcome == "inconclusive" and inconclusive > q.inconclusive_limit:
            return Verdict("inconclusive", f"{q.name}: {inconclusive} of {len(ms)} measurements "
                                           f"inconclusive (limit {q.inconclusive_limit}): {m.reason}")
    if all(len(taken[q.name]) >= q.count for q in queries):
        parts = [f"{q.name}: {sum(m.outcome == 'success' for m in taken[q.name])} of {q.count} "
                 f"measurements satisfied {q.success}" for q in queries]
        return Verdict("passed", "; ".join(parts) or "no queries")
    waiting = [f"{q.name} {len(taken[q.name])} of {q.count}" for q in queries
               if len(taken[q.name]) < q.count]
    return Verdict("running", "measured " + ", ".join(waiting))


def _next_at(q: AnalysisQuery, ms: Sequence[Measurement], started: float) -> float | None:
    if len(ms) >= q.count:
        return None
    if not ms:
        return started + q.interval
    return ms[-1].at + q.interval


def due(queries: Sequence[AnalysisQuery], measurements: Sequence[Measurement], started: float,
        now: float) -> tuple[str, ...]:
    """The names of the queries to measure at `now`: a query is measured first at `started +
    interval`, then one interval after its last measurement, until it has its count."""
    taken = _by_query(queries, measurements)
    out = []
    for q in queries:
        at = _next_at(q, taken[q.name], started)
        if at is not None and at <= now:
            out.append(q.name)
    return tuple(out)


def next_due(queries: Sequence[AnalysisQuery], measurements: Sequence[Measurement], started: float
             ) -> float | None:
    """When the next measurement is due (perhaps already past); None once every query has its count."""
    taken = _by_query(queries, measurements)
    times = [at for q in queries if (at := _next_at(q, taken[q.name], started)) is not None]
    return min(times) if times else None


# ---------------------------------------------------------------------------------------------------
# The [[analysis]] tables


def parse_analysis(tables: object, source: str) -> tuple[AnalysisQuery, ...]:
    """The queries that a TOML `[[analysis]]` array of tables holds (`tables`: the value of its key,
    as tomllib reads it). A field left out takes its default. Raises ConfigError naming the key
    (`analysis[1].success`) and `source`, never quoting a value."""
    if not isinstance(tables, list):
        raise ConfigError("analysis", source, "expected [[analysis]] tables")
    if len(tables) > MAX_QUERIES:
        raise ConfigError("analysis", source, f"at most {MAX_QUERIES} queries")
    out: list[AnalysisQuery] = []
    seen: set[str] = set()
    for i, table in enumerate(tables):
        where = f"analysis[{i}]"
        if not isinstance(table, dict):
            raise ConfigError(where, source, "expected a table")
        for key in table:
            if key not in FIELDS:
                raise ConfigError(f"{where}.{key}", source, f"unknown key (known: {', '.join(FIELDS)})")
        try:
            q = wire.decode(AnalysisQuery, table)
        except (ValueError, TypeError) as e:
            key, sep, reason = str(e).partition(": ")
            if not sep:
                raise ConfigError(where, source, str(e)) from None
            raise ConfigError(f"{where}.{key}", source, reason) from None
        if q.name in seen:
            raise ConfigError(f"{where}.name", source, "another query has that name")
        seen.add(q.name)
        out.append(q)
    return tuple(out)


def analysis_toml(queries: Sequence[AnalysisQuery]) -> str:
    """The queries as `[[analysis]]` tables that `parse_analysis` reads back as the same queries."""
    blocks = []
    for q in queries:
        blocks.append("\n".join([
            "[[analysis]]",
            f"name = {toml_string(q.name)}",
            f"query = {toml_string(q.query)}",
            f"interval = {float(q.interval)!r}",
            f"count = {q.count}",
            f"success = {toml_string(q.success)}",
            f"failure_limit = {q.failure_limit}",
            f"inconclusive_limit = {q.inconclusive_limit}",
        ]))
    return "\n\n".join(blocks) + ("\n" if blocks else "")
