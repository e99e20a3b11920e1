"""EC2 instance metadata (IMDSv2): Norm's small typed interface over aiohttp.

IMDSv2 is token-based: a PUT to /latest/api/token with the token's lifetime in the
`X-aws-ec2-metadata-token-ttl-seconds` header returns a token; every GET carries it in
`X-aws-ec2-metadata-token`. The token is cached and renewed a while before it expires, and once more
when the service answers 401 (it was restarted, or the clock jumped).

Every call has a timeout. Errors say what to do: MetadataUnavailable (the service could not be reached,
was too slow, or answered an error: retry later; off EC2 it never answers) or MetadataError (it
answered something that is not acceptable). A tag that is not there (or tags not exposed in instance
metadata at all) is None, not an error.

Nothing read here is a secret: the instance identity credentials the service also serves are botocore's
business (its default credential chain reads them itself), not this adapter's.
"""

from __future__ import annotations

import asyncio
import re
from types import TracebackType
from typing import Self
from urllib.parse import quote

import aiohttp
import structlog

from norm.core.errors import NormError, Temporary

log = structlog.get_logger("norm.imds")

TOKEN_TTL = 21600  # seconds a token is asked for (the service's maximum: six hours)
TOKEN_MARGIN = 60.0  # a token is renewed this long before it would expire
_TOKEN_PATH = "/latest/api/token"
_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
_TOKEN_HEADER = "X-aws-ec2-metadata-token"
_MAX_ANSWER = 64 * 1024  # no metadata value Norm reads is anywhere near this

_INSTANCE_ID = re.compile(r"i-[0-9a-f]{8,17}", re.ASCII)
_REGION = re.compile(r"[a-z]{2}(?:-[a-z]+)+-\d{1,2}", re.ASCII)


class MetadataError(NormError):
    """Instance metadata answered something unacceptable. `path` is what was asked."""

    def __init__(self, message: str, *, path: str = "", status: int | None = None) -> None:
        super().__init__(f"instance metadata {path}: {message}" if path else f"instance metadata: {message}")
        self.path = path
        self.status = status


class MetadataUnavailable(MetadataError, Temporary):
    """The instance metadata service could not be reached, did not answer in time, or answered an
    error. Transient: retry later (off EC2, or with the service disabled, it stays so)."""


class InstanceMetadata:
    """`async with InstanceMetadata(url, timeout) as md: await md.instance_id()`."""

    def __init__(self, url: str = "http://169.254.169.254", timeout: float = 10.0) -> None:
        self._url = url.rstrip("/")
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = None
        self._token_expires = 0.0  # loop time
        self._token_lock = asyncio.Lock()

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            # The service is link-local: never through a proxy from the environment.
            trust_env=False,
        )
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._token = None

    # -- the interface ------------------------------------------------------------------------------

    async def instance_id(self) -> str:
        """This instance's id (`i-0123456789abcdef0`)."""
        path = "/latest/meta-data/instance-id"
        value = await self._get_required(path)
        if not _INSTANCE_ID.fullmatch(value):
            raise MetadataError("not an instance id", path=path)
        return value

    async def region(self) -> str:
        """The region this instance runs in (`eu-west-1`)."""
        path = "/latest/meta-data/placement/region"
        value = await self._get_required(path)
        if not _REGION.fullmatch(value):
            raise MetadataError("not a region name", path=path)
        return value

    async def tag(self, name: str) -> str | None:
        """The value of this instance's tag `name`, or None when the instance has no such tag (or its
        tags are not exposed in instance metadata)."""
        if not name or len(name) > 128 or "/" in name:
            raise MetadataError("not a tag name", path="/latest/meta-data/tags/instance/")
        return await self._get(f"/latest/meta-data/tags/instance/{quote(name, safe='')}")

    # -- the protocol ----------------------------------------------------------------------------------

    async def _get_required(self, path: str) -> str:
        value = await self._get(path)
        if value is None:
            raise MetadataUnavailable("not found", path=path, status=404)
        return value

    async def _get(self, path: str) -> str | None:
        """The text at `path`, stripped; None on 404. Renews the token once on 401."""
        for attempt in range(2):
            token = await self._current_token(renew=attempt > 0)
            status, text = await self._request("GET", path, {_TOKEN_HEADER: token})
            if status == 200:
                return text.strip()
            if status == 404:
                return None
            if status == 401 and attempt == 0:
                continue
            break
        raise MetadataUnavailable(f"answered HTTP {status}", path=path, status=status)

    async def _current_token(self, *, renew: bool = False) -> str:
        async with self._token_lock:
            now = asyncio.get_running_loop().time()
            if renew or self._token is None or now >= self._token_expires:
                status, text = await self._request("PUT", _TOKEN_PATH, {_TTL_HEADER: str(TOKEN_TTL)})
                if status != 200 or not text.strip():
                    raise MetadataUnavailable(f"no token: HTTP {status}", path=_TOKEN_PATH, status=status)
                self._token = text.strip()
                self._token_expires = now + TOKEN_TTL - TOKEN_MARGIN
                log.debug("imds_token_renewed")
            return self._token

    async def _request(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, str]:
        if self._session is None:
            raise RuntimeError("InstanceMetadata used outside its context")
        try:
            async with self._session.request(method, self._url + path, headers=headers,
                                             allow_redirects=False) as r:
                body = await r.content.read(_MAX_ANSWER + 1)
                if len(body) > _MAX_ANSWER:
                    raise MetadataError("answer too long", path=path, status=r.status)
                return r.status, body.decode("utf-8", errors="replace")
        except MetadataError:
            raise
        except TimeoutError as e:
            raise MetadataUnavailable(f"no answer within {self._timeout:g}s", path=path) from e
        except (aiohttp.ClientError, OSError) as e:
            raise MetadataUnavailable(f"unreachable: {type(e).__name__}", path=path) from e
