"""The Prometheus adapter's pure parts: how an answer of the HTTP API reads, and how its URL is shown."""

from __future__ import annotations

import json
import math

import pytest

from norm.adapters.prometheus import (
    Prometheus,
    PrometheusRejected,
    PrometheusUnavailable,
    parse_answer,
    redacted,
)
from norm.core.analysis import Sample
from norm.core.errors import Permanent, Temporary

URL = "http://127.0.0.1:9090"


def answer(result: object, kind: str = "vector") -> bytes:
    return json.dumps({"status": "success", "data": {"resultType": kind, "result": result}}).encode()


def test_a_vector_reads_as_samples() -> None:
    body = answer([{"metric": {"code": "500"}, "value": [1.5, "0.25"]},
                   {"metric": {}, "value": [1.5, "NaN"]}, {"metric": {}, "value": [1.5, "+Inf"]}])
    a, b, c = parse_answer(200, body, URL)
    assert a == Sample({"code": "500"}, 0.25)
    assert math.isnan(b.value) and c.value == math.inf
    assert parse_answer(200, answer([]), URL) == ()


@pytest.mark.parametrize(("status", "body", "error", "words"), [
    (400, {"status": "error", "errorType": "bad_data", "error": "parse error at char 3"},
     PrometheusRejected, "bad_data: parse error at char 3"),
    (422, {"status": "error", "errorType": "execution", "error": "many-to-many"}, PrometheusRejected,
     "execution: many-to-many"),
    (404, None, PrometheusRejected, "answered 404"),
    (503, {"status": "error", "errorType": "timeout", "error": "query timed out"}, PrometheusUnavailable,
     "answered 503 (timeout: query timed out)"),
    (502, None, PrometheusUnavailable, "answered 502"),
    (200, {"status": "success", "data": {"resultType": "scalar", "result": [1, "1"]}}, PrometheusRejected,
     "a scalar result, not an instant vector"),
    (200, {"status": "success", "data": {"resultType": "matrix", "result": []}}, PrometheusRejected,
     "a matrix result"),
    (200, {"status": "success", "data": {"resultType": "vector", "result": [{"value": [1, 2]}]}},
     PrometheusRejected, "a malformed sample"),
    (200, {"status": "success", "data": {"resultType": "vector", "result": [{"value": [1, "x"]}]}},
     PrometheusRejected, "a malformed sample"),
    (200, {"status": "success", "data": {"resultType": "vector",
                                         "result": [{"metric": {"a": 1}, "value": [1, "1"]}]}},
     PrometheusRejected, "a malformed sample"),
    (200, None, PrometheusRejected, "not a Prometheus API answer"),
    (301, None, PrometheusRejected, "answered 301"),
])
def test_errors_say_what_to_do(status: int, body: object, error: type[Exception], words: str) -> None:
    raw = b"<html>" if body is None else json.dumps(body).encode()
    with pytest.raises(error) as e:
        parse_answer(status, raw, URL)
    assert words in str(e.value)
    assert str(e.value).startswith(f"prometheus at {URL}: ")
    assert isinstance(e.value, Temporary if error is PrometheusUnavailable else Permanent)


@pytest.mark.parametrize(("url", "shown"), [
    ("http://127.0.0.1:9090", "http://127.0.0.1:9090"),
    ("https://user:s3cret@prom.example:8443/prefix/?token=s3cret#x", "https://prom.example:8443/prefix/"),
    ("http://prom.example/p", "http://prom.example:80/p"),
    ("http://[::1]:9090/", "http://[::1]:9090"),
])
def test_a_url_is_shown_without_credentials_or_query(url: str, shown: str) -> None:
    assert redacted(url) == shown
    assert "s3cret" not in Prometheus(url).url


def test_only_http_urls_and_sane_timeouts() -> None:
    for bad in ("ftp://x:1", "127.0.0.1:9090", "http://"):
        with pytest.raises(ValueError) as e:
            Prometheus(bad.replace("x", "x"))
        assert "s3cret" not in str(e.value)
    with pytest.raises(ValueError) as e:
        Prometheus("file://u:s3cret@/x?t=s3cret")
    assert "s3cret" not in str(e.value)
    with pytest.raises(ValueError):
        Prometheus(URL, timeout=0)
