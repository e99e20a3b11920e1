"""A local EC2 instance metadata service (IMDSv2) per test, in its own process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.imds import MetadataServer


@pytest.fixture
def imds_server(tmp_path: Path) -> Iterator[MetadataServer]:
    """`imds_server.endpoint` is aws.metadata_url (or AWS_EC2_METADATA_SERVICE_ENDPOINT for botocore);
    `imds_server.update(tags={...})` changes what it serves from the next request on."""
    server = MetadataServer(tmp_path / "imds")
    server.start()
    try:
        yield server
    finally:
        server.stop()
