"""The sandbox's moto server, reached the way the S3 adapter reaches AWS: aiobotocore with endpoint_url."""

from __future__ import annotations

import signal
import threading
import uuid

from aiobotocore.session import get_session

from sandbox.moto import MotoServer


async def test_s3_put_and_get_through_aiobotocore(moto_server: MotoServer) -> None:
    bucket = f"norm-env-{uuid.uuid4().hex[:12]}"
    session = get_session()
    async with session.create_client(
        "s3",
        endpoint_url=moto_server.endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ) as s3:
        await s3.create_bucket(Bucket=bucket)
        await s3.put_object(Bucket=bucket, Key="stage.env", Body=b"DJANGO_DEBUG=0\n")

        got = await s3.get_object(Bucket=bucket, Key="stage.env")
        async with got["Body"] as body:
            assert await body.read() == b"DJANGO_DEBUG=0\n"
        listed = await s3.list_objects_v2(Bucket=bucket)
        assert [o["Key"] for o in listed["Contents"]] == ["stage.env"]


def test_the_server_answers_and_stops(moto_server: MotoServer) -> None:
    assert moto_server.endpoint.startswith("http://127.0.0.1:")
    assert moto_server.alive
    assert moto_server.answers()


def test_a_server_slow_to_reply_is_waited_for(moto_server: MotoServer) -> None:
    """A busy machine may leave the server seconds behind: the helpers wait for its reply, they do
    not give up after a guess at how fast it is. The server is frozen, and thawed 3 s later."""
    assert moto_server.proc is not None
    moto_server.proc.signal(signal.SIGSTOP)
    thaw = threading.Timer(3.0, moto_server.proc.signal, (signal.SIGCONT,))
    thaw.start()
    try:
        assert moto_server.answers()
    finally:
        thaw.cancel()
        moto_server.proc.signal(signal.SIGCONT)
