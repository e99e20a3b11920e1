"""Prometheus: Norm's small typed interface over its HTTP API, for canary analysis (instant queries).

`async with Prometheus("http://127.0.0.1:9090") as p: samples = await p.query("sum(up)")`.

What this adds to an HTTP POST of `/api/v1/query`:
- a timeout on every call (`timeout`, seconds), and a bound on the size of an answer;
- errors that say what to do: PrometheusUnavailable (it could not be reached, did not answer in time,
  or answered 5xx: retry later) or PrometheusRejected (it refused the query: a bad query, any 4xx,
  an answer that is not an instant vector or not Prometheus's: permanent until the query changes);
- the answer as a tuple of frozen Samples (labels, value), the values as floats (NaN and the
  infinities included: what to make of them is norm.core.analysis's business).

A URL may carry credentials (`https://user:password@host/prefix`): they are sent as HTTP basic auth,
and the URL is only ever shown (errors, logs) as scheme://host:port/path, without them and without a
query string.
"""

from __future__ import annotations

import asyncio
import json
import os
from types import TracebackType
from typing import Self

import aiohttp
import structlog
from yarl import URL

from norm.core.analysis import Sample
from norm.core.errors import NormError, Permanent, Temporary

log = structlog.get_logger("norm.prometheus")

MAX_ANSWER = 8 * 1024 * 1024  # bytes of an answer; an analysis query's answer is a sample or a few
MAX_MESSAGE = 300  # characters of Prometheus's own error text kept in an error
QUERY_PATH = "api/v1/query"


class PrometheusError(NormError):
    """A query could not be answered. `url` is the server's, redacted (scheme://host:port/path);
    `status` the HTTP status, when there was one."""

    def __init__(self, message: str, *, url: str, status: int | None = None) -> None:
        super().__init__(f"prometheus at {url}: {message}")
        self.url = url
        self.status = status


class PrometheusUnavailable(PrometheusError, Temporary):
    """Prometheus could not be reached, did not answer in time, or failed on its side (5xx). Retry
    later."""


class PrometheusRejected(PrometheusError, Permanent):
    """Prometheus refused the query (a bad query: 4xx), or answered what is not an instant vector.
    Permanent until the query (or the URL) changes."""


def redacted(url: str | URL) -> str:
    """`url` as it may be shown: scheme://host:port/path, without credentials, query or fragment."""
    u = URL(url) if isinstance(url, str) else url
    try:
        host = u.host or ""
        port = u.explicit_port if u.explicit_port is not None else u.port
    except ValueError:
        return "(an unreadable URL)"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    return f"{u.scheme}://{netloc}{'' if u.path == '/' else u.path}"


def _describe(e: BaseException) -> str:
    """What went wrong, in words that never carry the URL (aiohttp's messages may)."""
    if isinstance(e, aiohttp.ClientConnectorError):
        inner = e.os_error  # its strerror may carry the address: the errno's own words do not
        return f"cannot connect ({os.strerror(inner.errno) if inner.errno else type(inner).__name__})"
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno)
    return type(e).__name__


def _error_text(doc: object) -> str | None:
    """Prometheus's own words for an error answer (`errorType: error`), cleaned and cut."""
    if not isinstance(doc, dict) or doc.get("status") != "error":
        return None
    kind, text = doc.get("errorType"), doc.get("error")
    words = f"{kind if isinstance(kind, str) else 'error'}: {text if isinstance(text, str) else ''}"
    return " ".join(words.split())[:MAX_MESSAGE]


def parse_answer(status: int, body: bytes, url: str) -> tuple[Sample, ...]:
    """The samples of an instant query's answer (HTTP `status`, JSON `body`), or the error it means."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        doc = None
    error = _error_text(doc)
    if status >= 500:
        raise PrometheusUnavailable(f"answered {status}" + (f" ({error})" if error else ""), url=url,
                                    status=status)
    if status != 200:
        raise PrometheusRejected(error or f"answered {status}", url=url, status=status)
    if not isinstance(doc, dict) or doc.get("status") != "success" or not isinstance(doc.get("data"), dict):
        raise PrometheusRejected(error or "not a Prometheus API answer", url=url, status=status)
    data = doc["data"]
    if data.get("resultType") != "vector":
        kind = data.get("resultType")
        shown = kind if isinstance(kind, str) and kind.isalpha() and len(kind) < 20 else "unknown"
        raise PrometheusRejected(f"the query gives a {shown} result, not an instant vector", url=url,
                                 status=status)
    result = data.get("result")
    if not isinstance(result, list):
        raise PrometheusRejected("not a Prometheus API answer (no result list)", url=url, status=status)
    samples = []
    for item in result:
        sample = _sample(item)
        if sample is None:
            raise PrometheusRejected("not a Prometheus API answer (a malformed sample)", url=url,
                                     status=status)
        samples.append(sample)
    return tuple(samples)


def _sample(item: object) -> Sample | None:
    if not isinstance(item, dict):
        return None
    metric, value = item.get("metric", {}), item.get("value")
    if not isinstance(metric, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in metric.items()):
        return None
    if not isinstance(value, list) or len(value) != 2 or not isinstance(value[1], str):
        return None
    try:
        number = float(value[1])  # Prometheus writes "NaN", "+Inf", "-Inf" as such
    except ValueError:
        return None
    return Sample(labels=dict(metric), value=number)


class Prometheus:
    """`async with Prometheus(url, timeout=10.0) as p: await p.query(promql)`.

    `url` is the server's base URL (`http://host:9090`, or with a path prefix when it is served
    under one); each query gives up after `timeout` seconds (PrometheusUnavailable)."""

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        u = URL(url)
        if u.scheme not in ("http", "https") or not u.host:
            raise ValueError(f"not an http(s) URL: {redacted(u)}")
        if not 0 < timeout <= 3600:
            raise ValueError("timeout must be more than 0 and at most 3600 seconds")
        self._headers = ({"Authorization": aiohttp.encode_basic_auth(u.user or "", u.password or "")}
                         if u.user is not None or u.password is not None else {})
        base = u.with_user(None).with_password(None).with_query(None).with_fragment(None)
        self._endpoint = base.with_path(base.path.rstrip("/") + "/" + QUERY_PATH)
        self.url = redacted(base)
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout),
                                              trust_env=False)
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def query(self, promql: str) -> tuple[Sample, ...]:
        """The instant vector `promql` evaluates to now, as samples (labels, value)."""
        if self._session is None:
            raise RuntimeError("use Prometheus as an async context manager")
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with self._session.post(self._endpoint, data={"query": promql}, headers=self._headers,
                                          allow_redirects=False) as resp:
                status = resp.status
                body = await _read_bounded(resp, MAX_ANSWER)
        except TimeoutError:
            log.info("prometheus.unavailable", url=self.url, error="timeout")
            raise PrometheusUnavailable(f"no answer within {self._timeout:g}s", url=self.url) from None
        except _TooLarge:
            raise PrometheusRejected(f"an answer larger than {MAX_ANSWER} bytes", url=self.url) from None
        except (aiohttp.ClientError, OSError) as e:
            log.info("prometheus.unavailable", url=self.url, error=_describe(e))
            raise PrometheusUnavailable(_describe(e), url=self.url) from None
        try:
            samples = parse_answer(status, body, self.url)
        except PrometheusError as e:
            log.info("prometheus.refused" if isinstance(e, PrometheusRejected) else "prometheus.unavailable",
                     url=self.url, status=status, error=str(e))
            raise
        log.debug("prometheus.query", url=self.url, samples=len(samples),
                  seconds=round(loop.time() - started, 3))
        return samples


class _TooLarge(Exception):
    pass


async def _read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(65536):
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)
