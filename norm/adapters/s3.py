"""S3: Norm's small typed interface over aiobotocore, for reading one object at a time.

What this adds to the client library:
- credentials from botocore's default chain (environment, shared files, then the instance profile
  through instance metadata, IMDSv2, at the configured metadata URL), or an explicit endpoint for a
  private endpoint or a test server;
- `get` with a conditional GET on the ETag: an unchanged object answers NotModified and costs no body
  bytes; `body_bytes` counts every body byte received, for a metric;
- a bound on every call (connect, read, retries: the whole call) and a bound on the object's size;
- errors that say what to do: ObjectMissing (no such bucket or key), ObjectDenied (access denied, no
  or bad credentials), StoreUnavailable (unreachable, too slow, throttled, a server error: retry later),
  ObjectTooLarge. Their messages name the bucket, the key and S3's error code, never the object's
  content nor S3's message text, and they chain no library exception.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import aiohttp
import botocore.exceptions
import structlog
from aiobotocore.config import AioConfig

from norm.adapters.aws import session
from norm.core.errors import NormError, Permanent, Temporary

log = structlog.get_logger("norm.s3")

_MISSING = frozenset({"NoSuchBucket", "NoSuchKey", "404", "NotFound"})
_DENIED = frozenset({"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                     "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled",
                     "AccountProblem", "InvalidObjectState"})


class StoreError(NormError):
    """Reading an object failed. `bucket`, `key`, and `code`: S3's error code when it answered."""

    def __init__(self, message: str, *, bucket: str, key: str, code: str | None = None) -> None:
        super().__init__(f"s3://{bucket}/{key}: {message}")
        self.bucket = bucket
        self.key = key
        self.code = code


class ObjectMissing(StoreError, Permanent):
    """No such bucket, or no such key in it. Permanent until someone creates it."""


class ObjectDenied(StoreError, Permanent):
    """Access denied, or no usable credentials. Permanent until the policy or the credentials change."""


class ObjectTooLarge(StoreError, Permanent):
    """The object is larger than the caller accepts."""


class StoreUnavailable(StoreError, Temporary):
    """S3 (or the endpoint, or the credential source) could not be reached, was too slow, throttled
    or failed. Transient: retry later."""


@dataclass(frozen=True)
class Fetched:
    """The object's current content. `body` may be a secret: never shown."""

    etag: str
    body: bytes = field(repr=False)


@dataclass(frozen=True)
class NotModified:
    """The object still has the ETag the caller gave."""

    etag: str


class ObjectStore:
    """`async with ObjectStore(...) as store: await store.get(bucket, key, if_none_match=etag)`."""

    def __init__(self, *, region: str | None = None, endpoint_url: str | None = None,
                 metadata_url: str | None = None, timeout: float = 10.0,
                 max_bytes: int = 1024 * 1024) -> None:
        self._region = region
        self._endpoint_url = endpoint_url
        self._metadata_url = metadata_url
        self._timeout = timeout
        self.max_bytes = max_bytes
        self.body_bytes = 0  # body bytes received, over the store's life
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    async def __aenter__(self) -> Self:
        aws = session(self._metadata_url, self._timeout)
        config = AioConfig(
            connect_timeout=self._timeout, read_timeout=self._timeout,
            retries={"max_attempts": 2, "mode": "standard"},
            s3={"addressing_style": "path"} if self._endpoint_url else None,
        )
        self._client = await self._stack.enter_async_context(aws.create_client(
            "s3", region_name=self._region, endpoint_url=self._endpoint_url, config=config))
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._client = None
        await self._stack.aclose()

    async def get(self, bucket: str, key: str, if_none_match: str | None = None) -> Fetched | NotModified:
        """The object, or NotModified when its ETag is still `if_none_match` (no body is sent)."""
        if self._client is None:
            raise RuntimeError("ObjectStore used outside its context")
        kwargs: dict[str, str] = {"Bucket": bucket, "Key": key}
        if if_none_match:
            kwargs["IfNoneMatch"] = if_none_match
        try:
            async with asyncio.timeout(self._timeout):
                etag, body = await self._fetch(self._client, bucket, key, kwargs)
        except StoreError:
            raise
        except botocore.exceptions.ClientError as e:
            if if_none_match and _not_modified(e):
                return NotModified(if_none_match)
            raise _classify_client_error(e, bucket, key) from None
        except TimeoutError:
            raise StoreUnavailable(f"no answer within {self._timeout:g}s", bucket=bucket, key=key) from None
        except botocore.exceptions.NoCredentialsError:
            raise ObjectDenied("no credentials found (environment, shared files, instance profile)",
                               bucket=bucket, key=key) from None
        except (botocore.exceptions.BotoCoreError, aiohttp.ClientError, OSError) as e:
            raise StoreUnavailable(f"unreachable ({type(e).__name__})", bucket=bucket, key=key) from None
        if not etag:
            raise StoreUnavailable("the answer carries no ETag", bucket=bucket, key=key)
        return Fetched(etag, body)


    async def _fetch(self, client: Any, bucket: str, key: str, kwargs: dict[str, str]) -> tuple[str, bytes]:
        """One GET: the object's ETag and body, refused past `max_bytes` (read no further than that)."""
        reply = await client.get_object(**kwargs)
        etag = str(reply.get("ETag") or "")
        length = reply.get("ContentLength")
        async with reply["Body"] as stream:
            if isinstance(length, int) and length > self.max_bytes:
                raise ObjectTooLarge(f"{length} bytes; at most {self.max_bytes} accepted",
                                     bucket=bucket, key=key)
            body = await stream.read(self.max_bytes + 1)
            self.body_bytes += len(body)
            if len(body) > self.max_bytes:
                raise ObjectTooLarge(f"more than {self.max_bytes} bytes", bucket=bucket, key=key)
        return etag, body


def _status(e: botocore.exceptions.ClientError) -> tuple[str, int | None]:
    response: dict[str, Any] = e.response or {}
    code = str((response.get("Error") or {}).get("Code") or "")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return code, status if isinstance(status, int) else None


def _not_modified(e: botocore.exceptions.ClientError) -> bool:
    code, status = _status(e)
    return status == 304 or code in ("304", "NotModified")


def _classify_client_error(e: botocore.exceptions.ClientError, bucket: str, key: str) -> StoreError:
    code, status = _status(e)
    text = f"{code or 'error'} (HTTP {status})" if status else code or "error"
    if code in _MISSING or (status == 404 and code not in _DENIED):
        return ObjectMissing(f"not found: {text}", bucket=bucket, key=key, code=code)
    if code in _DENIED or status in (401, 403):
        return ObjectDenied(f"denied: {text}", bucket=bucket, key=key, code=code)
    return StoreUnavailable(f"failed: {text}", bucket=bucket, key=key, code=code)
