"""The instance metadata adapter against the sandbox's IMDSv2 server, and botocore's default credential
chain through that server."""

from __future__ import annotations

import os
import time

import pytest
from aiobotocore.session import get_session

from norm.adapters.imds import InstanceMetadata, MetadataError, MetadataUnavailable
from sandbox.imds import MetadataServer
from sandbox.moto import MotoServer
from sandbox.procs import free_port


async def test_instance_id_region_and_tags_with_one_token(imds_server: MetadataServer) -> None:
    imds_server.update(instance_id="i-0fedcba9876543210", region="eu-west-1",
                       tags={"environment": "stage", "role": "celery", "Name": "web 1"})
    async with InstanceMetadata(imds_server.endpoint, timeout=2) as md:
        assert await md.instance_id() == "i-0fedcba9876543210"
        assert await md.region() == "eu-west-1"
        assert await md.tag("environment") == "stage"
        assert await md.tag("role") == "celery"
        assert await md.tag("Name") == "web 1"
        assert await md.tag("owner") is None
    seen = imds_server.requests()
    assert seen["PUT /latest/api/token"] == 1  # the token is cached across calls


async def test_tags_not_exposed_are_none(imds_server: MetadataServer) -> None:
    imds_server.update(tags=None)
    async with InstanceMetadata(imds_server.endpoint, timeout=2) as md:
        assert await md.tag("role") is None


async def test_a_token_the_service_forgot_is_renewed(imds_server: MetadataServer) -> None:
    async with InstanceMetadata(imds_server.endpoint, timeout=2) as md:
        assert await md.instance_id() == "i-0123456789abcdef0"
        imds_server.stop()  # a restarted service knows none of the tokens it gave before
        imds_server.start()
        assert await md.instance_id() == "i-0123456789abcdef0"
    assert imds_server.requests()["PUT /latest/api/token"] == 1  # the new server's count
    assert imds_server.requests()["GET /latest/meta-data/instance-id"] == 2  # 401, then with the new token


async def test_unreachable_service_is_unavailable_quickly() -> None:
    started = time.monotonic()
    async with InstanceMetadata(f"http://127.0.0.1:{free_port()}", timeout=1) as md:
        with pytest.raises(MetadataUnavailable, match="unreachable"):
            await md.instance_id()
    assert time.monotonic() - started < 2


async def test_malformed_answers_are_refused(imds_server: MetadataServer) -> None:
    imds_server.update(instance_id="not-an-instance", region="Mars")
    async with InstanceMetadata(imds_server.endpoint, timeout=2) as md:
        with pytest.raises(MetadataError, match="not an instance id"):
            await md.instance_id()
        with pytest.raises(MetadataError, match="not a region"):
            await md.region()
        with pytest.raises(MetadataError, match="not a tag name"):
            await md.tag("a/b")


async def test_botocore_default_chain_takes_the_instance_profile(
        imds_server: MetadataServer, moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    session = get_session()
    session.set_config_variable("ec2_metadata_service_endpoint", imds_server.endpoint)
    credentials = await session.get_credentials()
    assert credentials is not None and credentials.method == "iam-role"
    frozen = await credentials.get_frozen_credentials()
    assert frozen.access_key == imds_server.state["credentials"]["AccessKeyId"]
    async with session.create_client("s3", endpoint_url=moto_server.endpoint, region_name="us-east-1") as s3:
        await s3.list_buckets()
