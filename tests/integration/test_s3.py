"""The S3 adapter against a real moto server: conditional GETs, and every failure classified with a
message that never carries the object's content."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiobotocore.session import get_session

from norm.adapters.s3 import (
    Fetched,
    NotModified,
    ObjectDenied,
    ObjectMissing,
    ObjectStore,
    ObjectTooLarge,
    StoreError,
    StoreUnavailable,
)
from sandbox.imds import MetadataServer
from sandbox.moto import MotoServer
from sandbox.procs import free_port

CANARY = "canary-9f2c41d7e0b35a68"


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Static test credentials in the environment, and nothing else botocore could pick up."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    yield


async def put(endpoint: str, bucket: str, key: str, body: bytes, create: bool = True,
              access: tuple[str, str] = ("testing", "testing")) -> None:
    async with get_session().create_client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                           aws_access_key_id=access[0],
                                           aws_secret_access_key=access[1]) as s3:
        if create:
            await s3.create_bucket(Bucket=bucket)
        await s3.put_object(Bucket=bucket, Key=key, Body=body)


def bucket_name() -> str:
    return f"norm-env-{uuid.uuid4().hex[:12]}"


def assert_clean(e: StoreError) -> None:
    assert CANARY not in str(e) and CANARY not in repr(e)
    assert e.__cause__ is None and e.__suppress_context__


async def test_get_then_not_modified_costs_no_body_bytes(moto_server: MotoServer, aws_env: None) -> None:
    bucket = bucket_name()
    body = f"SECRET={CANARY}\n".encode()
    await put(moto_server.endpoint, bucket, "stage.env", body)
    async with ObjectStore(region="us-east-1", endpoint_url=moto_server.endpoint, timeout=5) as store:
        got = await store.get(bucket, "stage.env")
        assert isinstance(got, Fetched) and got.body == body and got.etag.startswith('"')
        assert CANARY not in repr(got)
        assert store.body_bytes == len(body)

        again = await store.get(bucket, "stage.env", if_none_match=got.etag)
        assert again == NotModified(got.etag)
        assert store.body_bytes == len(body)

        await put(moto_server.endpoint, bucket, "stage.env", b"SECRET=rotated\n", create=False)
        rotated = await store.get(bucket, "stage.env", if_none_match=got.etag)
        assert isinstance(rotated, Fetched) and rotated.body == b"SECRET=rotated\n"
        assert rotated.etag != got.etag
        assert store.body_bytes == len(body) + len(rotated.body)


async def test_missing_bucket_and_key(moto_server: MotoServer, aws_env: None) -> None:
    bucket = bucket_name()
    await put(moto_server.endpoint, bucket, "stage.env", f"A={CANARY}\n".encode())
    async with ObjectStore(region="us-east-1", endpoint_url=moto_server.endpoint, timeout=5) as store:
        with pytest.raises(ObjectMissing) as info:
            await store.get(bucket, "prod.env")
        assert info.value.code == "NoSuchKey" and f"s3://{bucket}/prod.env" in str(info.value)
        assert_clean(info.value)
        with pytest.raises(ObjectMissing) as info:
            await store.get(bucket_name(), "stage.env", if_none_match='"abc"')
        assert info.value.code == "NoSuchBucket"
        assert_clean(info.value)


async def test_unreachable_endpoint_is_unavailable_within_the_bound(aws_env: None) -> None:
    started = time.monotonic()
    async with ObjectStore(region="us-east-1", endpoint_url=f"http://127.0.0.1:{free_port()}",
                           timeout=2) as store:
        with pytest.raises(StoreUnavailable) as info:
            await store.get("some-bucket", "stage.env")
    assert time.monotonic() - started < 3
    # Refused connections, retried once: "unreachable", or on a loaded machine the call's bound first.
    assert "unreachable" in str(info.value) or "no answer within 2s" in str(info.value)
    assert_clean(info.value)


async def test_too_large_objects_are_refused(moto_server: MotoServer, aws_env: None) -> None:
    bucket = bucket_name()
    await put(moto_server.endpoint, bucket, "big.env", b"A='" + b"x" * 5000 + b"'\n")
    async with ObjectStore(region="us-east-1", endpoint_url=moto_server.endpoint, timeout=5,
                           max_bytes=4096) as store:
        with pytest.raises(ObjectTooLarge):
            await store.get(bucket, "big.env")


async def test_access_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, aws_env: None) -> None:
    # A server of this test's own: enforcing IAM is server-wide.
    server = MotoServer(tmp_path / "moto-auth")
    server.start()
    try:
        bucket = bucket_name()
        await put(server.endpoint, bucket, "stage.env", f"A={CANARY}\n".encode())
        async with get_session().create_client("iam", endpoint_url=server.endpoint, region_name="us-east-1",
                                               aws_access_key_id="testing",
                                               aws_secret_access_key="testing") as iam:
            await iam.create_user(UserName="nobody")
            key = (await iam.create_access_key(UserName="nobody"))["AccessKey"]
        server.enforce_auth()
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        async with ObjectStore(region="us-east-1", endpoint_url=server.endpoint, timeout=5) as store:
            with pytest.raises(ObjectDenied) as info:
                await store.get(bucket, "stage.env")
        assert info.value.code == "AccessDenied"
        assert_clean(info.value)
        assert key["SecretAccessKey"] not in str(info.value)
    finally:
        server.stop()


async def test_no_credentials_anywhere_is_denied(moto_server: MotoServer, aws_env: None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    started = time.monotonic()
    async with ObjectStore(region="us-east-1", endpoint_url=moto_server.endpoint,
                           metadata_url=f"http://127.0.0.1:{free_port()}", timeout=2) as store:
        with pytest.raises(ObjectDenied, match="no credentials"):
            await store.get("some-bucket", "stage.env")
    assert time.monotonic() - started < 5


async def test_credentials_from_the_instance_profile(moto_server: MotoServer, imds_server: MetadataServer,
                                                     aws_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    bucket = bucket_name()
    await put(moto_server.endpoint, bucket, "stage.env", b"A=1\n")
    async with ObjectStore(region=None, endpoint_url=moto_server.endpoint,
                           metadata_url=imds_server.endpoint, timeout=5) as store:
        got = await store.get(bucket, "stage.env")
    assert isinstance(got, Fetched) and got.body == b"A=1\n"
    seen = imds_server.requests()
    assert seen.get("GET /latest/meta-data/iam/security-credentials/norm-host", 0) >= 1
