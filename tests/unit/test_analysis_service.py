"""The analysis shell (norm.services.analysis) against a scripted metrics source: it measures each query
when due, turns the source's errors into measurements, stops once decided, and logs each measurement.
Integration against a real Prometheus: tests/integration/test_prometheus_analysis.py."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable

import pytest
from structlog.testing import capture_logs

from norm.adapters.prometheus import PrometheusRejected, PrometheusUnavailable
from norm.core.analysis import AnalysisQuery, Measurement, Sample
from norm.services.analysis import analyse

INTERVAL = 0.02
BOUND = 10.0  # seconds any of these analyses may take at most


class Source:
    """Answers each query with the next of its scripted answers (samples, or an error to raise); the
    last answer repeats."""

    def __init__(self, script: dict[str, Iterable[object]]) -> None:
        self.script = {k: list(v) for k, v in script.items()}
        self.asked: list[tuple[str, float]] = []

    async def query(self, promql: str) -> tuple[Sample, ...]:
        self.asked.append((promql, asyncio.get_running_loop().time()))
        answers = self.script[promql]
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, Exception):
            raise answer
        return tuple(Sample({}, float(v)) for v in answer)  # type: ignore[attr-defined]


def q(name: str, promql: str, *, count: int = 3, failure_limit: int = 0,
      inconclusive_limit: int = 0) -> AnalysisQuery:
    return AnalysisQuery(name, promql, interval=INTERVAL, count=count, success="result < 1",
                         failure_limit=failure_limit, inconclusive_limit=inconclusive_limit)


async def test_passes_after_each_query_has_its_count_an_interval_apart() -> None:
    source = Source({"a": [[0]], "b": [[0.5]]})
    loop = asyncio.get_running_loop()
    started = loop.time()
    seen: list[Measurement] = []
    async with asyncio.timeout(BOUND):
        v = await analyse(source, [q("qa", "a"), q("qb", "b", count=2)], on_measurement=seen.append)
    assert v.state == "passed"
    assert [m.query for m in seen].count("qa") == 3 and [m.query for m in seen].count("qb") == 2
    times = [t for promql, t in source.asked if promql == "a"]
    assert times[0] - started >= INTERVAL * 0.99
    assert all(b - a >= INTERVAL * 0.99 for a, b in itertools.pairwise(times))


async def test_fails_once_failures_pass_the_limit_and_stops_measuring() -> None:
    source = Source({"a": [[0], [2], [0], [3], [0]]})
    async with asyncio.timeout(BOUND):
        v = await analyse(source, [q("qa", "a", count=5, failure_limit=1)])
    assert v.state == "failed"
    assert v.reason == "qa: 2 of 4 measurements failed result < 1 (limit 1): 2, 3"
    assert len(source.asked) == 4


async def test_an_unavailable_source_makes_inconclusive_measurements_with_its_reason() -> None:
    error = PrometheusUnavailable("cannot connect (Connection refused)", url="http://127.0.0.1:1")
    source = Source({"a": [[0], error]})
    seen: list[Measurement] = []

    async def record(m: Measurement) -> None:  # a coroutine function is awaited
        await asyncio.sleep(0)
        seen.append(m)

    with capture_logs() as logs:
        async with asyncio.timeout(BOUND):
            v = await analyse(source, [q("qa", "a", count=5, inconclusive_limit=1)], on_measurement=record)
    assert v.state == "inconclusive"
    assert [m.outcome for m in seen] == ["success", "inconclusive", "inconclusive"]
    assert seen[-1].reason == "prometheus at http://127.0.0.1:1: cannot connect (Connection refused)"
    assert "cannot connect" in v.reason
    measured = [e for e in logs if e["event"] == "analysis.measured"]
    assert [(e["query"], e["outcome"], e["value"]) for e in measured] == [
        ("qa", "success", 0.0), ("qa", "inconclusive", None), ("qa", "inconclusive", None)]
    assert [e["state"] for e in logs if e["event"] == "analysis.decided"] == ["inconclusive"]


async def test_a_refused_query_fails_at_once() -> None:
    error = PrometheusRejected("bad_data: parse error", url="http://127.0.0.1:1", status=400)
    source = Source({"a": [[0]], "bad": [error]})
    async with asyncio.timeout(BOUND):
        v = await analyse(source, [q("qa", "a"), q("qbad", "bad", count=5, failure_limit=4)])
    assert v.state == "failed"
    assert v.reason == "qbad: the query was refused: prometheus at http://127.0.0.1:1: bad_data: parse error"
    assert [p for p, _ in source.asked].count("bad") == 1


async def test_no_queries_pass_at_once_and_twice_named_queries_are_refused() -> None:
    assert (await analyse(Source({}), [])).state == "passed"
    with pytest.raises(ValueError):
        await analyse(Source({}), [q("x", "a"), q("x", "b")])
