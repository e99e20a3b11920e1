"""A real moto server (S3, ELBv2, EC2, STS over HTTP) shared by the whole test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sandbox.moto import MotoServer


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """`moto_server.endpoint` is the endpoint_url for every AWS client. Tests share its state: name
    buckets and other resources uniquely, or call `moto_server.reset()` first."""
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
