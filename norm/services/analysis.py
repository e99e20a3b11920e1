"""Running a canary analysis (norm.core.analysis) against a metrics source: each query is measured when
it is due, until the measurements decide.

`await analyse(prometheus, queries)` returns the verdict: passed, failed or inconclusive, never
running. A query the source could not answer for now (a norm.core.errors.Temporary, such as
norm.adapters.prometheus.PrometheusUnavailable) is an inconclusive measurement, with the error as its
reason; a query it refused (a Permanent, such as PrometheusRejected) fails the analysis at once. Each
measurement is logged (`analysis.measured`) and handed to `on_measurement`, when given (a function or
a coroutine function: the caller's record of the measurements, say).

Between measurements the analysis pauses on the loop's clock (norm.services.base.pause) until the
next one is due; `clock` says what time it is (the loop's by default: tests may run their own).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import re
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Literal, Protocol

import structlog

from norm.core import analysis
from norm.core.analysis import AnalysisQuery, Measurement, Sample, Verdict
from norm.core.errors import Permanent, Temporary
from norm.core.policy import FleetPolicy
from norm.services.base import pause

log = structlog.get_logger("norm.analysis")


class QueryApi(Protocol):
    """What an analysis asks of its metrics source (norm.adapters.prometheus.Prometheus is one)."""

    async def query(self, promql: str) -> tuple[Sample, ...]: ...


OnMeasurement = Callable[[Measurement], object]
CanaryVerdict = tuple[Literal["passed", "failed", "inconclusive"], str | None]


async def measure_once(source: QueryApi, query: AnalysisQuery, at: float) -> Measurement:
    """One measurement of `query`, taken at `at`: the source's answer judged by the query's condition;
    inconclusive when the source is unavailable for now, a refusal when it refused the query."""
    try:
        samples = await source.query(query.query)
    except Temporary as e:
        return analysis.unavailable(query, at, str(e))
    except Permanent as e:
        return analysis.refused(query, at, str(e))
    return analysis.measure(query, samples, at)


async def analyse(prometheus: QueryApi, queries: Sequence[AnalysisQuery], *,
                  clock: Callable[[], float] | None = None,
                  on_measurement: OnMeasurement | None = None) -> Verdict:
    """Measure each of `queries` when it is due (the first one interval after now, then one interval
    after its last measurement) until the measurements decide; the verdict (never "running")."""
    now = clock or asyncio.get_running_loop().time
    queries = tuple(queries)
    by_name = {q.name: q for q in queries}
    if len(by_name) != len(queries):
        raise ValueError("queries: each query's name must be distinct")
    started = now()
    measurements: list[Measurement] = []
    log.info("analysis.started", queries=[q.name for q in queries])
    verdict = analysis.verdict(queries, measurements)
    while not verdict.done:
        names = analysis.due(queries, measurements, started, now())
        if not names:
            at = analysis.next_due(queries, measurements, started)
            if at is None:  # cannot be: an analysis whose queries all have their count is decided
                raise RuntimeError("an analysis with nothing left to measure is not decided")
            await pause(max(0.0, at - now()))
            continue
        for name in names:
            query = by_name[name]
            m = await measure_once(prometheus, query, now())
            measurements.append(m)
            log.info("analysis.measured", query=m.query, outcome=m.outcome, value=m.value, reason=m.reason)
            if on_measurement is not None:
                result = on_measurement(m)
                if inspect.isawaitable(result):
                    await result
            verdict = analysis.verdict(queries, measurements)
            if verdict.done:
                break
    log.info("analysis.decided", state=verdict.state, reason=verdict.reason)
    return verdict


# ---------------------------------------------------------------------------------------------------
# A rollout's canary


CANARY = "$CANARY"  # in a query: a regular expression matching the canary hosts' names


def for_canary(queries: Sequence[AnalysisQuery], names: Sequence[str]) -> tuple[AnalysisQuery, ...]:
    """The queries with `$CANARY` replaced by a regular expression matching exactly the canary hosts'
    names (each escaped, as PromQL's `=~` reads it): `rate(x{host=~"$CANARY"}[1m])`."""
    pattern = "|".join(re.escape(n).replace("\\", "\\\\") for n in names) or "(?!)"
    return tuple(dataclasses.replace(q, query=q.query.replace(CANARY, pattern)) for q in queries)


def canary_analyser(prometheus_url: str | None) -> Callable[[FleetPolicy, tuple[str, ...]],
                                                            Coroutine[Any, Any, CanaryVerdict]]:
    """What the leader's updater runs for a canary (its hosts' names, under the rollout's policy): the
    policy's queries against `prometheus_url` until they decide, and the canary watched for
    `canary_wait` in all; the verdict and why."""

    async def run(policy: FleetPolicy, names: tuple[str, ...]) -> CanaryVerdict:
        loop = asyncio.get_running_loop()
        until = loop.time() + policy.canary_wait
        if policy.analysis:
            if prometheus_url is None:
                return "inconclusive", ("the fleet policy has analysis queries, and update.prometheus_url "
                                        "is not set on the leader")
            from norm.adapters.prometheus import Prometheus

            async with Prometheus(prometheus_url) as source:
                verdict = await analyse(source, for_canary(policy.analysis, names))
            if verdict.state != "passed":
                return verdict.state, verdict.reason  # type: ignore[return-value]
        await pause(max(0.0, until - loop.time()))
        return "passed", None

    return run
