"""A real Prometheus (Debian's prometheus), one per test that asks, scraping what the test names."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.prometheus import PrometheusServer


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[PrometheusServer]:
    """A running Prometheus with no targets yet, scraping every second: `prometheus.set_targets(
    ["127.0.0.1:PORT"])`, then `prometheus.wait_scraped("127.0.0.1:PORT")`; `prometheus.url` for
    clients. Stopped after the test (a test may stop it itself first)."""
    server = PrometheusServer(tmp_path / "prometheus", scrape_interval=1.0)
    server.start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
