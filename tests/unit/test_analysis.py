"""Canary analysis, the pure part: the condition grammar, the queries' fields, what a query's samples
make of a measurement, the verdict measurements reach, when each query is due, and the [[analysis]]
tables."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from norm.core import wire
from norm.core.analysis import (
    AnalysisQuery,
    Condition,
    Measurement,
    Sample,
    analysis_toml,
    due,
    measure,
    next_due,
    parse_analysis,
    parse_condition,
    refused,
    unavailable,
    verdict,
)
from norm.core.errors import ConfigError

SECRET = "Hunter2-secret"
ERRORS = AnalysisQuery("error-rate", 'sum(rate(x{code="500"}[1m])) / sum(rate(x[1m]))', interval=2,
                       count=5, success="result < 0.01", failure_limit=1)


def q(name: str = "q", *, count: int = 3, interval: float = 1.0, success: str = "result < 1",
      failure_limit: int = 0, inconclusive_limit: int = 0) -> AnalysisQuery:
    return AnalysisQuery(name, "up", interval=interval, count=count, success=success,
                         failure_limit=failure_limit, inconclusive_limit=inconclusive_limit)


def m(outcome: str, name: str = "q", at: float = 0.0, value: float | None = 0.0) -> Measurement:
    return Measurement(name, at, outcome, value, None if outcome == "success" else "why")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# The condition grammar


@pytest.mark.parametrize(("text", "op", "threshold"), [
    ("result < 0.05", "<", 0.05),
    ("result<0.05", "<", 0.05),
    ("  result   <=   1  ", "<=", 1.0),
    ("result > -3", ">", -3.0),
    ("result >= +2.5e-3", ">=", 0.0025),
    ("result == 0", "==", 0.0),
    ("result != .5", "!=", 0.5),
    ("result < 5.", "<", 5.0),
    ("result\t<\t1E3", "<", 1000.0),
])
def test_conditions_that_parse(text: str, op: str, threshold: float) -> None:
    assert parse_condition(text) == Condition(op, threshold)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", [
    "", "result", "result <", "< 1", "result < x", "result = 1", "result => 1", "result << 1",
    "value < 1", "result < 1 and 1", "result < 1; import os", "__import__('os')", "result < nan",
    "result < inf", "result < 1e999", "result < 0x10", "result < 1_000", "Result < 1", "result <\n1",
    "result < 1 < 2", "result < " + "1" * 200,
])
def test_conditions_refused_naming_the_field(text: str) -> None:
    with pytest.raises(ValueError, match=r"^success: "):
        parse_condition(text)
    with pytest.raises(ValueError, match=r"^success: ") as e:
        parse_condition(text + SECRET)
    assert SECRET not in str(e.value)


def test_a_condition_that_is_not_text() -> None:
    with pytest.raises(TypeError, match=r"^success: expected a string"):
        parse_condition(5)  # type: ignore[arg-type]


@pytest.mark.parametrize(("op", "value", "holds"), [
    ("<", 0.5, True), ("<", 1.0, False), ("<=", 1.0, True), ("<=", 1.5, False),
    (">", 1.5, True), (">", 1.0, False), (">=", 1.0, True), (">=", 0.5, False),
    ("==", 1.0, True), ("==", 0.5, False), ("!=", 0.5, True), ("!=", 1.0, False),
])
def test_a_condition_holds(op: str, value: float, holds: bool) -> None:
    assert Condition(op, 1.0).holds(value) is holds  # type: ignore[arg-type]


@given(op=st.sampled_from(["<", "<=", ">", ">=", "==", "!="]),
       threshold=st.floats(allow_nan=False, allow_infinity=False),
       value=st.floats(allow_nan=False, allow_infinity=True),
       blanks=st.tuples(*[st.sampled_from(["", " ", "  ", "\t"])] * 4))
def test_a_condition_parses_back_from_its_text_and_holds_as_the_operator_says(
        op: str, threshold: float, value: float, blanks: tuple[str, ...]) -> None:
    text = f"{blanks[0]}result{blanks[1]}{op}{blanks[2]}{threshold!r}{blanks[3]}"
    c = parse_condition(text)
    assert c == Condition(op, threshold)  # type: ignore[arg-type]
    expected = {"<": value < threshold, "<=": value <= threshold, ">": value > threshold,
                ">=": value >= threshold, "==": value == threshold, "!=": value != threshold}[op]
    assert c.holds(value) is expected
    assert parse_condition(str(c)).op == op
    assert not c.holds(math.nan)


@given(st.text(max_size=40))
def test_any_text_parses_or_is_refused_with_a_value_error(text: str) -> None:
    try:
        c = parse_condition(text)
    except ValueError as e:
        assert str(e).startswith("success: ")
    else:
        assert math.isfinite(c.threshold)


# ---------------------------------------------------------------------------------------------------
# A query's fields


def test_a_query_keeps_its_fields() -> None:
    assert (ERRORS.interval, ERRORS.count, ERRORS.failure_limit, ERRORS.inconclusive_limit) == (2, 5, 1, 0)
    assert ERRORS.condition == Condition("<", 0.01)


@pytest.mark.parametrize(("change", "field"), [
    ({"name": ""}, "name"), ({"name": "-x"}, "name"), ({"name": "a b"}, "name"), ({"name": "x" * 64}, "name"),
    ({"name": 3}, "name"),
    ({"query": ""}, "query"), ({"query": "   "}, "query"), ({"query": "up\x1b[2J"}, "query"),
    ({"query": "x" * 4097}, "query"), ({"query": "up\ud800"}, "query"),
    ({"interval": 0}, "interval"), ({"interval": -1}, "interval"), ({"interval": math.inf}, "interval"),
    ({"interval": math.nan}, "interval"), ({"interval": 86401}, "interval"), ({"interval": True}, "interval"),
    ({"interval": "2"}, "interval"),
    ({"count": 0}, "count"), ({"count": 10001}, "count"), ({"count": 2.0}, "count"),
    ({"count": True}, "count"),
    ({"success": "result ~ 1"}, "success"), ({"success": ""}, "success"),
    ({"failure_limit": -1}, "failure_limit"), ({"failure_limit": 5}, "failure_limit"),
    ({"failure_limit": 1.0}, "failure_limit"),
    ({"inconclusive_limit": -1}, "inconclusive_limit"), ({"inconclusive_limit": 5}, "inconclusive_limit"),
])
def test_a_query_out_of_its_grammar_is_refused_naming_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises((ValueError, TypeError), match=rf"^{field}: "):
        dataclasses.replace(ERRORS, **change)


def test_a_refusal_never_quotes_the_value() -> None:
    for change in ({"name": SECRET + " x"}, {"query": SECRET + "\x07"}, {"success": SECRET}):
        with pytest.raises(ValueError) as e:
            dataclasses.replace(ERRORS, **change)
        assert SECRET not in str(e.value)


def test_a_query_may_span_lines() -> None:
    assert dataclasses.replace(ERRORS, query="sum(\n\trate(x[1m])\n)").query.count("\n") == 2


# ---------------------------------------------------------------------------------------------------
# Measurements


@pytest.mark.parametrize(("samples", "outcome", "value", "reason"), [
    ([Sample({}, 0.005)], "success", 0.005, None),
    ([Sample({"job": "app"}, 0.0)], "success", 0.0, None),
    ([Sample({}, 0.01)], "failure", 0.01, "0.01 does not satisfy result < 0.01"),
    ([Sample({}, 0.05)], "failure", 0.05, "0.05 does not satisfy result < 0.01"),
    ([], "inconclusive", None, "no data: the query returned no sample"),
    ([Sample({"a": "1"}, 0.0), Sample({"a": "2"}, 0.0)], "inconclusive", None,
     "2 samples: the query must return exactly one (aggregate it)"),
])
def test_what_samples_make_of_a_measurement(samples: list[Sample], outcome: str, value: float | None,
                                             reason: str | None) -> None:
    assert measure(ERRORS, samples, 7.0) == Measurement("error-rate", 7.0, outcome, value, reason)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_value_that_is_not_a_finite_number_is_inconclusive(value: float) -> None:
    got = measure(ERRORS, [Sample({}, value)], 1.0)
    assert (got.outcome, got.value) == ("inconclusive", None)
    assert got.reason == f"the value is {value}, not a finite number"
    assert wire.decode(Measurement, json.loads(wire.encode(got))) == got


@pytest.mark.parametrize("m", [
    Measurement("error-rate", 12.5, "success", 0.001, None),
    Measurement("error-rate", 14.5, "failure", 0.05, "0.05 does not satisfy result < 0.01"),
    Measurement("error-rate", 16.5, "inconclusive", None, "no data: the query returned no sample"),
])
def test_a_measurement_travels_as_a_record(m: Measurement) -> None:
    assert wire.decode(Measurement, json.loads(wire.encode(m))) == m


@pytest.mark.parametrize(("data", "field"), [
    ({"query": "a b", "at": 1.0, "outcome": "success", "value": 1.0, "reason": None}, "query"),
    ({"query": "a", "at": 1.0, "outcome": "great", "value": 1.0, "reason": None}, "outcome"),
    ({"query": "a", "at": 1.0, "outcome": "success", "value": "1", "reason": None}, "value"),
    ({"query": "a", "at": 1.0, "outcome": "failure", "value": 1.0, "reason": "x" * 301}, "reason"),
])
def test_a_measurement_read_back_is_held_to_its_grammar(data: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: "):
        wire.decode(Measurement, data)


def test_unavailable_and_refused_measurements() -> None:
    u = unavailable(ERRORS, 3.0, "connection refused\x1b")
    assert (u.outcome, u.value, u.reason, u.refused) == ("inconclusive", None, "connection refused?", False)
    r = refused(ERRORS, 3.0, "parse error")
    assert (r.outcome, r.value, r.reason, r.refused) == ("failure", None, "parse error", True)


# ---------------------------------------------------------------------------------------------------
# The verdict


@pytest.mark.parametrize(("outcomes", "state"), [
    ([], "running"),
    (["success"], "running"),
    (["success"] * 3, "passed"),
    (["success"] * 5, "passed"),  # measurements past the count do not count
    (["success", "success", "success", "failure"], "passed"),
    (["failure"], "failed"),
    (["success", "inconclusive"], "inconclusive"),
    (["success", "success", "failure"], "failed"),
])
def test_the_verdict_of_one_query_without_limits(outcomes: list[str], state: str) -> None:
    assert verdict([q()], [m(o) for o in outcomes]).state == state


@pytest.mark.parametrize(("outcomes", "state"), [
    (["failure"], "running"),
    (["failure", "inconclusive"], "running"),
    (["failure", "inconclusive", "success", "success", "success"], "passed"),
    (["failure", "failure"], "failed"),
    (["inconclusive", "inconclusive"], "inconclusive"),
    (["failure", "failure", "inconclusive", "inconclusive"], "failed"),  # the first to decide decides
    (["inconclusive", "inconclusive", "failure", "failure"], "inconclusive"),
    (["inconclusive", "failure", "inconclusive", "failure"], "inconclusive"),
])
def test_the_verdict_with_limits(outcomes: list[str], state: str) -> None:
    query = q(count=5, failure_limit=1, inconclusive_limit=1)
    assert verdict([query], [m(o) for o in outcomes]).state == state


def test_a_refused_query_fails_at_once_whatever_its_limit() -> None:
    query = q(count=5, failure_limit=4)
    v = verdict([query], [refused(query, 1.0, "bad_data: parse error")])
    assert v == verdict([query], [refused(query, 1.0, "bad_data: parse error")])
    assert v.state == "failed"
    assert v.reason == "q: the query was refused: bad_data: parse error"


def test_the_reason_names_the_query_and_the_values() -> None:
    ms = [measure(ERRORS, [Sample({}, x)], float(i)) for i, x in enumerate([0.05, 0.0, 0.048])]
    v = verdict([ERRORS], ms)
    assert v.state == "failed"
    assert v.reason == "error-rate: 2 of 3 measurements failed result < 0.01 (limit 1): 0.05, 0.048"
    v = verdict([ERRORS], [measure(ERRORS, [], 1.0)])
    assert v == verdict([ERRORS], [measure(ERRORS, [], 1.0)])
    assert v.state == "inconclusive"
    assert v.reason == ("error-rate: 1 of 1 measurements inconclusive (limit 0): "
                        "no data: the query returned no sample")
    ok = [measure(ERRORS, [Sample({}, 0.0)], float(i)) for i in range(5)]
    assert verdict([ERRORS], ok) == verdict([ERRORS], ok)
    assert verdict([ERRORS], ok).reason == "error-rate: 5 of 5 measurements satisfied result < 0.01"


def test_every_query_must_pass() -> None:
    a, b = q("a", count=1), q("b", count=2)
    assert verdict([a, b], [m("success", "a")]).state == "running"
    assert verdict([a, b], [m("success", "a"), m("success", "b")]).state == "running"
    assert verdict([a, b], [m("success", "a"), m("success", "b"), m("success", "b")]).state == "passed"
    assert verdict([a, b], [m("success", "a"), m("failure", "b")]).reason.startswith("b: ")


def test_no_queries_pass_at_once() -> None:
    assert verdict([], []).state == "passed"


def test_measurements_of_unknown_queries_and_twice_named_queries_are_bugs() -> None:
    with pytest.raises(ValueError):
        verdict([q("a")], [m("success", "b")])
    with pytest.raises(ValueError):
        verdict([q("a"), q("a")], [])


outcomes = st.lists(st.sampled_from(["success", "failure", "inconclusive"]), max_size=12)


@settings(max_examples=300)
@given(count=st.integers(1, 6), failure_limit=st.integers(0, 5), inconclusive_limit=st.integers(0, 5),
       taken=outcomes)
def test_verdict_invariants(count: int, failure_limit: int, inconclusive_limit: int,
                            taken: list[str]) -> None:
    query = q(count=count, failure_limit=min(failure_limit, count - 1),
              inconclusive_limit=min(inconclusive_limit, count - 1))
    ms = [m(o, at=float(i)) for i, o in enumerate(taken)]
    v = verdict([query], ms)
    counted = taken[:count]
    # The first prefix of the measurements that crosses a limit decides.
    decided = None
    for n in range(1, len(counted) + 1):
        if counted[:n].count("failure") > query.failure_limit:
            decided = "failed"
        elif counted[:n].count("inconclusive") > query.inconclusive_limit:
            decided = "inconclusive"
        if decided:
            break
    if decided:
        assert v.state == decided
    elif len(counted) == count:
        assert v.state == "passed"
    else:
        assert v.state == "running"
    # Once decided, more measurements never change the verdict.
    if v.done:
        for extra in ("success", "failure", "inconclusive"):
            assert verdict([query], [*ms, m(extra, at=99.0)]).state == v.state
    # A success never turns a verdict that is not running into failed or inconclusive.
    if v.state == "running":
        assert verdict([query], [*ms, m("success", at=99.0)]).state in ("running", "passed")


# ---------------------------------------------------------------------------------------------------
# When queries are due


def test_a_query_is_due_one_interval_after_the_start_then_one_after_its_last_measurement() -> None:
    a = q("a", count=2, interval=2.0)
    b = q("b", count=1, interval=5.0)
    assert due([a, b], [], 10.0, 11.9) == ()
    assert next_due([a, b], [], 10.0) == 12.0
    assert due([a, b], [], 10.0, 12.0) == ("a",)
    ms = [m("success", "a", at=12.3)]
    assert due([a, b], ms, 10.0, 13.0) == ()
    assert next_due([a, b], ms, 10.0) == 14.3
    assert due([a, b], ms, 10.0, 15.0) == ("a", "b")
    ms += [m("success", "a", at=15.0), m("success", "b", at=15.0)]
    assert due([a, b], ms, 10.0, 100.0) == ()
    assert next_due([a, b], ms, 10.0) is None


@given(interval=st.floats(0.1, 100), count=st.integers(1, 10), delays=st.lists(st.floats(0, 5), max_size=12))
def test_a_query_taken_when_due_is_taken_count_times_an_interval_apart(
        interval: float, count: int, delays: list[float]) -> None:
    query = q(count=count, interval=interval)
    ms: list[Measurement] = []
    for delay in delays:
        at = next_due([query], ms, 0.0)
        if at is None:
            break
        assert due([query], ms, 0.0, at) == ("q",)
        assert due([query], ms, 0.0, at - interval / 2) == ()
        ms.append(m("success", at=at + delay))
    assert len(ms) <= count
    assert all(b.at - a.at >= interval * (1 - 1e-9) for a, b in itertools.pairwise(ms))


# ---------------------------------------------------------------------------------------------------
# The [[analysis]] tables

EXAMPLE = """
[[analysis]]
name = "error-rate"
query = 'sum(rate(djed_http_requests_total{code="500"}[1m])) / sum(rate(djed_http_requests_total[1m]))'
interval = 30
count = 10
success = "result < 0.01"
failure_limit = 1

[[analysis]]
name = "latency"
query = '''
histogram_quantile(0.99,
  sum by (le) (rate(http_request_duration_seconds_bucket[1m])))
'''
interval = 60.5
count = 5
success = "result<=0.5"
inconclusive_limit = 2
"""


def test_parse_the_tables() -> None:
    a, b = parse_analysis(tomllib.loads(EXAMPLE)["analysis"], "canary.toml")
    assert a == AnalysisQuery("error-rate", 'sum(rate(djed_http_requests_total{code="500"}[1m])) / '
                              'sum(rate(djed_http_requests_total[1m]))', 30.0, 10, "result < 0.01", 1, 0)
    assert (b.name, b.interval, b.count, b.inconclusive_limit, b.condition) == (
        "latency", 60.5, 5, 2, Condition("<=", 0.5))
    assert b.query.startswith("histogram_quantile(0.99,\n")


@pytest.mark.parametrize(("tables", "key", "reason"), [
    ({"name": "x"}, "analysis", "expected [[analysis]] tables"),
    (["x"], "analysis[0]", "expected a table"),
    ([{"name": "x", "query": "up", "interval": 1, "count": 1, "success": "result < 1", "extra": 1}],
     "analysis[0].extra", "unknown key"),
    ([{"query": "up", "interval": 1, "count": 1, "success": "result < 1"}], "analysis[0].name", "missing"),
    ([{"name": "x", "query": "up", "interval": 1, "count": 1.5, "success": "result < 1"}],
     "analysis[0].count", "expected an integer"),
    ([{"name": "x", "query": "up", "interval": "1s", "count": 1, "success": "result < 1"}],
     "analysis[0].interval", "expected a number"),
    ([{"name": "x", "query": "up", "interval": 1, "count": 1, "success": f"result < {SECRET}"}],
     "analysis[0].success", "must be `result <op> <number>`"),
    ([{"name": "x", "query": "up", "interval": 1, "count": 2, "success": "result < 1", "failure_limit": 2}],
     "analysis[0].failure_limit", "must be less than count"),
    ([{"name": "x", "query": "up", "interval": 1, "count": 1, "success": "result < 1"},
      {"name": "x", "query": "up", "interval": 1, "count": 1, "success": "result < 1"}],
     "analysis[1].name", "another query has that name"),
    ([{"name": "x", "query": "up", "interval": 1, "count": 1, "success": "result < 1"}] * 65,
     "analysis", "at most 64 queries"),
])
def test_bad_tables_are_refused_naming_the_key(tables: object, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_analysis(tables, "canary.toml")
    assert (e.value.key, e.value.source) == (key, "canary.toml")
    assert e.value.reason.startswith(reason)
    assert SECRET not in str(e.value)


def test_no_tables_no_queries() -> None:
    assert parse_analysis([], "x") == ()
    assert analysis_toml([]) == ""


names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)
query_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from("\n\t\"\\'"),
                     min_size=1, max_size=60).filter(lambda s: s.strip() != "" and "\u2028" not in s
                                                     and "\u2029" not in s)


@st.composite
def queries(draw: st.DrawFn) -> AnalysisQuery:
    count = draw(st.integers(1, 100))
    return AnalysisQuery(
        name=draw(names), query=draw(query_text),
        interval=draw(st.floats(0.001, 86400, allow_nan=False) | st.integers(1, 86400)),
        count=count,
        success=f"result {draw(st.sampled_from(['<', '<=', '>', '>=', '==', '!=']))} "
                f"{draw(st.floats(allow_nan=False, allow_infinity=False))!r}",
        failure_limit=draw(st.integers(0, count - 1)),
        inconclusive_limit=draw(st.integers(0, count - 1)))


@given(st.lists(queries(), max_size=4, unique_by=lambda x: x.name))
def test_the_tables_render_back_to_the_same_queries(qs: list[AnalysisQuery]) -> None:
    text = analysis_toml(qs)
    parsed = parse_analysis(tomllib.loads(text).get("analysis", []), "x")
    assert parsed == tuple(qs)


def test_the_documented_example_parses() -> None:
    path = Path(__file__).resolve().parents[2] / "docs" / "examples" / "analysis.toml"
    (query,) = parse_analysis(tomllib.loads(path.read_text())["analysis"], str(path))
    assert (query.name, query.interval, query.count, query.failure_limit, query.inconclusive_limit) == (
        "error-rate", 30.0, 10, 1, 2)
    assert query.condition == Condition("<", 0.01)
    assert "djed_http_requests_total" in (path.parent.parent / "analysis.md").read_text()
