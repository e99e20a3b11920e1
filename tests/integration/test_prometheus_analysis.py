"""Canary analysis against a real Prometheus (Debian's, scraping every second) scraping real demo-app
containers (sandbox.images.DemoOptions: `metrics`, `error_rate`) that a loop of HTTP GETs keeps busy:
an app that fails 5% of its requests fails an error-rate analysis, a healthy one passes it, a query
for a metric nobody exports is inconclusive, and a Prometheus that stops makes the measurements
inconclusive with the adapter's PrometheusUnavailable as their reason."""

from __future__ import annotations

import asyncio
import contextlib
import math
import subprocess
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import aiohttp
import pytest
from structlog.testing import capture_logs

from norm.adapters.prometheus import Prometheus, PrometheusRejected, PrometheusUnavailable
from norm.core.analysis import AnalysisQuery, Measurement, Sample
from norm.services.analysis import analyse
from sandbox.docker import DockerEngine
from sandbox.images import DemoOptions
from sandbox.procs import free_port, wait_for
from sandbox.prometheus import PROMETHEUS, PrometheusServer

pytestmark = pytest.mark.slow

BOUND = 60.0  # seconds any wait of these tests may take at most, on a busy machine
SCRAPE_SLACK = 2.0  # seconds: two scrapes, for the data Prometheus has to catch up with the app's
ERROR_RATIO = ('sum(rate(djed_http_requests_total{code="500"}[10s]))'
               " / sum(rate(djed_http_requests_total[10s]))")
FAILING = DemoOptions(error_rate=0.05)
HEALTHY = DemoOptions(metrics=True)


def error_rate(*, interval: float = 2.0, count: int = 5, failure_limit: int = 1) -> AnalysisQuery:
    return AnalysisQuery("error-rate", ERROR_RATIO, interval=interval, count=count, success="result < 0.01",
                         failure_limit=failure_limit)


class App:
    """One demo-app container on the image engine, on the host network at `port`."""

    def __init__(self, engine: DockerEngine, ref: str) -> None:
        self.engine = engine
        self.port = free_port()
        self.name = f"prom-app-{self.port}"
        engine.docker("run", "-d", "--name", self.name, "--network", "host", "-e", f"PORT={self.port}",
                      ref, "serve")
        wait_for(lambda: self.get("/healthz")[0] == 200, timeout=BOUND, what=f"{self.name} serving")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://{self.target}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def remove(self) -> None:
        self.engine.docker("rm", "-f", self.name, check=False)


@pytest.fixture
def run_app(image_engine: DockerEngine, demo_app: Callable[..., str]) -> Iterator[Callable[..., App]]:
    """`run_app(version, options)`: that build of the demo app running; removed after the test."""
    apps: list[App] = []

    def run(version: str, options: DemoOptions) -> App:
        app = App(image_engine, demo_app(version, 0, options))
        apps.append(app)
        return app

    try:
        yield run
    finally:
        for app in apps:
            app.remove()


async def traffic(app: App, answered: Counter[int]) -> None:
    """GET / from `app` one request after another, for ever; `answered` counts the statuses."""
    url = f"http://{app.target}/"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        while True:
            try:
                async with http.get(url) as r:
                    await r.read()
                    answered[r.status] += 1
            except (aiohttp.ClientError, TimeoutError):
                answered[0] += 1


@contextlib.asynccontextmanager
async def busy(app: App) -> AsyncIterator[Counter[int]]:
    answered: Counter[int] = Counter()
    task = asyncio.create_task(traffic(app, answered), name=f"traffic-{app.port}")
    try:
        yield answered
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def eventually(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Until `condition()` holds, asked every 0.2 s, for at most BOUND seconds."""
    async with asyncio.timeout(BOUND):
        while True:
            if await condition():
                return
            await asyncio.sleep(0.2)


async def first_data(prometheus: Prometheus, promql: str) -> float:
    """Wait until `promql` gives one finite value; return it."""
    found: list[float] = []

    async def has_data() -> bool:
        samples = await prometheus.query(promql)
        if len(samples) == 1 and math.isfinite(samples[0].value):
            found.append(samples[0].value)
            return True
        return False

    await eventually(has_data, f"data for {promql}")
    return found[-1]


async def scraping(prometheus: PrometheusServer, app: App) -> None:
    prometheus.set_targets([app.target])
    await asyncio.to_thread(prometheus.wait_scraped, app.target, BOUND)


# ---------------------------------------------------------------------------------------------------


def counted(app: App) -> dict[str, int]:
    """{status code: requests answered} as the app's /metrics says."""
    status, text = app.get("/metrics")
    assert status == 200
    found = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            assert name.startswith('djed_http_requests_total{code="') and name.endswith('"}'), line
            found[name[len('djed_http_requests_total{code="'):-2]] = int(value)
    return found


def test_the_demo_app_counts_its_answers_and_fails_as_often_as_built(run_app: Callable[..., App]) -> None:
    app = run_app("v-prom-5pct", FAILING)
    before = counted(app)  # the start's own /healthz probe, nothing else
    assert before["500"] == 0 and counted(app) == before, "scrapes are not counted"
    statuses = Counter(app.get("/")[0] for _ in range(100))
    assert statuses == {200: 95, 500: 5}
    assert [app.get("/healthz")[0], app.get("/version")[0], app.get("/nothing")[0]] == [200, 200, 404]
    after = counted(app)
    assert after == {"200": before["200"] + 97, "500": 5, "404": 1}  # 95 of /, /healthz, /version
    text = app.get("/metrics")[1]
    check = subprocess.run([PROMETHEUS.replace("prometheus", "promtool"), "check", "metrics"],
                           input=text, capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr


def test_a_healthy_build_counts_500_from_zero(run_app: Callable[..., App]) -> None:
    app = run_app("v-prom-ok", HEALTHY)
    assert {app.get("/")[0] for _ in range(30)} == {200}
    assert 'djed_http_requests_total{code="500"} 0' in app.get("/metrics")[1].splitlines()


async def test_an_app_failing_5_percent_fails_the_analysis_within_its_limit(
        prometheus: PrometheusServer, run_app: Callable[..., App]) -> None:
    app = await asyncio.to_thread(run_app, "v-prom-5pct", FAILING)
    await scraping(prometheus, app)
    query = error_rate()
    seen: list[Measurement] = []
    async with busy(app) as answered, Prometheus(prometheus.url) as p:
        ratio = await first_data(p, ERROR_RATIO)
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(BOUND):
            verdict = await analyse(p, [query], on_measurement=seen.append)
        took = loop.time() - started
    assert verdict.state == "failed", verdict
    assert took <= (query.failure_limit + 1) * query.interval + query.interval + SCRAPE_SLACK, took
    assert [m.outcome for m in seen] == ["failure", "failure"]
    # Every 20th request fails: over the 10 s of a rate, close to 5% (a window may hold few requests).
    assert all(m.value is not None and 0.02 < m.value < 0.1 for m in seen), (ratio, seen)
    assert verdict.reason.startswith("error-rate: 2 of 2 measurements failed result < 0.01 (limit 1): ")
    assert answered[0] == 0, "the app answered every request"
    assert abs(answered[500] - (answered[200] + answered[500]) // 20) <= 1, answered  # the last may be cut


async def test_a_healthy_app_passes(prometheus: PrometheusServer, run_app: Callable[..., App]) -> None:
    app = await asyncio.to_thread(run_app, "v-prom-ok", HEALTHY)
    await scraping(prometheus, app)
    query = error_rate(interval=1.0, count=3, failure_limit=0)
    seen: list[Measurement] = []
    async with busy(app), Prometheus(prometheus.url) as p:
        assert await first_data(p, ERROR_RATIO) == 0.0
        async with asyncio.timeout(BOUND):
            verdict = await analyse(p, [query], on_measurement=seen.append)
    assert verdict.state == "passed", verdict
    assert [(m.outcome, m.value) for m in seen] == [("success", 0.0)] * 3
    assert verdict.reason == "error-rate: 3 of 3 measurements satisfied result < 0.01"


async def test_a_metric_nobody_exports_is_inconclusive(prometheus: PrometheusServer) -> None:
    query = AnalysisQuery("missing", "sum(rate(djed_no_such_metric_total[10s]))", interval=0.5, count=3,
                          success="result < 1")
    async with Prometheus(prometheus.url) as p:
        assert await p.query(query.query) == ()
        async with asyncio.timeout(BOUND):
            verdict = await analyse(p, [query])
    assert verdict.state == "inconclusive"
    assert verdict.reason == ("missing: 1 of 1 measurements inconclusive (limit 0): "
                              "no data: the query returned no sample")


async def test_a_query_prometheus_refuses_fails_the_analysis(prometheus: PrometheusServer) -> None:
    query = AnalysisQuery("bad", "sum(rate(up[10s]", interval=0.5, count=3, success="result < 1",
                          failure_limit=2)
    async with Prometheus(prometheus.url) as p:
        with pytest.raises(PrometheusRejected) as e:
            await p.query(query.query)
        assert e.value.status == 400 and "bad_data" in str(e.value)
        async with asyncio.timeout(BOUND):
            verdict = await analyse(p, [query])
    assert verdict.state == "failed"
    assert verdict.reason.startswith("bad: the query was refused: prometheus at http://127.0.0.1:")


async def test_measurements_are_inconclusive_once_prometheus_stops(
        prometheus: PrometheusServer, run_app: Callable[..., App]) -> None:
    app = await asyncio.to_thread(run_app, "v-prom-ok", HEALTHY)
    await scraping(prometheus, app)
    query = AnalysisQuery("error-rate", ERROR_RATIO, interval=1.0, count=5, success="result < 0.01",
                          inconclusive_limit=1)
    seen: list[Measurement] = []

    async def record(m: Measurement) -> None:
        seen.append(m)
        if len(seen) == 1:  # Prometheus goes away after the first measurement
            await asyncio.to_thread(prometheus.stop)

    async with busy(app), Prometheus(prometheus.url, timeout=5.0) as p:
        await first_data(p, ERROR_RATIO)
        async with asyncio.timeout(BOUND):
            verdict = await analyse(p, [query], on_measurement=record)
        with pytest.raises(PrometheusUnavailable) as e:
            await p.query(ERROR_RATIO)
    assert not prometheus.alive
    assert verdict.state == "inconclusive", verdict
    assert [m.outcome for m in seen] == ["success", "inconclusive", "inconclusive"]
    reason = f"prometheus at {prometheus.url}: cannot connect (Connection refused)"
    assert str(e.value) == reason
    assert [m.reason for m in seen[1:]] == [reason, reason]
    assert verdict.reason == f"error-rate: 2 of 3 measurements inconclusive (limit 1): {reason}"


def test_targets_are_replaced_while_prometheus_runs(prometheus: PrometheusServer) -> None:
    assert prometheus.address == f"127.0.0.1:{prometheus.port}"
    prometheus.set_targets([prometheus.address])  # Prometheus scraping itself
    prometheus.wait_scraped(prometheus.address, BOUND)
    idle = f"127.0.0.1:{free_port()}"  # nothing listens there
    prometheus.set_targets([idle])
    wait_for(lambda: [r["metric"]["instance"] for r in prometheus.query("up")] == [idle], timeout=BOUND,
             what="the new target alone")
    assert prometheus.query(f'up{{instance="{idle}"}}')[0]["value"][1] == "0"
    with pytest.raises(ValueError):
        prometheus.set_targets(["no-port"])


async def test_the_url_s_credentials_and_query_never_show(prometheus: PrometheusServer) -> None:
    secret = "s3cret-7f3a"
    url = f"http://norm:{secret}@{prometheus.address}/?token={secret}"
    with capture_logs() as logs:
        async with Prometheus(url, timeout=5.0) as p:
            assert p.url == prometheus.url
            assert await p.query("vector(1)") == (Sample({}, 1.0),)  # the basic auth is sent, and ignored
            with pytest.raises(PrometheusRejected) as refused:
                await p.query("vector(")
            await asyncio.to_thread(prometheus.stop)
            with pytest.raises(PrometheusUnavailable) as unavailable:
                await p.query("vector(1)")
    for e in (refused.value, unavailable.value):
        assert e.url == prometheus.url and secret not in str(e)
    assert logs and secret not in repr(logs)
