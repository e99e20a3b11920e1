"""ELBv2: Norm's own small typed interface over aiobotocore, for the target groups of one region.

What this adds to the client library:
- a bound on every call (asyncio.timeout as well as botocore's connect and read timeouts), and no
  retries of botocore's own: the caller decides when to try again;
- errors that say what to do: ElbUnavailable (no answer, throttled, a server error, no credentials
  yet: retry later) or ElbRejected (the request was refused: unknown target group, invalid target,
  access denied: permanent until the configuration or the permissions change). Messages carry the
  operation, the error code and AWS's message, never the credentials nor a request's signature;
- `deregister` that is idempotent (a target that is not in the group is fine);
- `wait_drained`: polls describe_target_health until the target has left the group, within a bound.

Credentials come from botocore's default chain (environment, shared files, instance profile).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import aiohttp
import botocore.exceptions
import structlog
from aiobotocore.config import AioConfig

from norm.adapters.aws import session
from norm.core.errors import NormError, Permanent, Temporary
from norm.core.presence import DRAINING_STATES, is_drained, is_registered

log = structlog.get_logger("norm.elb")

# Error codes that mean "not now" rather than "no".
_TRANSIENT_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled", "RequestLimitExceeded",
    "TooManyRequestsException", "SlowDown", "ServiceUnavailable", "InternalFailure", "InternalError",
    "RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete", "IDPCommunicationError",
})
_MAX_MESSAGE = 300


class ElbError(NormError):
    """A call to ELBv2 failed. `operation` names the API call."""

    def __init__(self, message: str, *, operation: str, code: str | None = None) -> None:
        super().__init__(message)
        self.operation = operation
        self.code = code


class ElbUnavailable(ElbError, Temporary):
    """ELBv2 did not answer in time, throttled the call, failed on its side, or no credentials could be
    had right now. Transient: retry later."""


class ElbRejected(ElbError, Permanent):
    """ELBv2 refused the request (unknown target group, invalid target, access denied, bad parameter).
    Permanent for that request until the configuration or the permissions change."""


@dataclass(frozen=True)
class TargetHealth:
    """A target's state in one group, as describe_target_health reports it."""

    state: str  # initial, healthy, unhealthy, unhealthy.draining, unused, draining, unavailable
    reason: str | None = None

    @property
    def registered(self) -> bool:
        return is_registered(self.state, self.reason)

    @property
    def draining(self) -> bool:
        return self.state in DRAINING_STATES

    @property
    def drained(self) -> bool:
        return is_drained(self.state, self.reason)


def _target(instance_id: str, port: int | None) -> dict[str, Any]:
    return {"Id": instance_id} if port is None else {"Id": instance_id, "Port": port}


class Elb:
    """`async with Elb(region) as elb: await elb.register(group_arn, instance_id)`.

    `endpoint_url` replaces AWS's own endpoint (a private endpoint, or a test server). Every call gives
    up after `call_timeout` seconds (ElbUnavailable). `wait_drained` polls every `poll_interval`."""

    def __init__(self, region: str, *, endpoint_url: str | None = None, call_timeout: float = 10.0,
                 poll_interval: float = 2.0, metadata_url: str | None = None) -> None:
        self.region = region
        self.endpoint_url = endpoint_url
        self.metadata_url = metadata_url
        self.call_timeout = call_timeout
        self.poll_interval = poll_interval
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None

    async def __aenter__(self) -> Self:
        config = AioConfig(connect_timeout=self.call_timeout, read_timeout=self.call_timeout,
                           retries={"max_attempts": 1, "mode": "standard"})
        stack = contextlib.AsyncExitStack()
        try:
            aws = session(self.metadata_url, self.call_timeout)
            self._client = await stack.enter_async_context(aws.create_client(
                "elbv2", region_name=self.region, endpoint_url=self.endpoint_url, config=config))
        except botocore.exceptions.BotoCoreError as e:
            await stack.aclose()
            raise ElbRejected(f"cannot make an ELBv2 client: {type(e).__name__}",
                              operation="client") from None
        self._stack = stack
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    # -- the interface

    async def register(self, target_group: str, instance_id: str, port: int | None = None) -> None:
        """Put the instance in the group (idempotent: a registered target stays registered)."""
        await self._call("RegisterTargets", TargetGroupArn=target_group, Targets=[_target(instance_id, port)])

    async def deregister(self, target_group: str, instance_id: str, port: int | None = None) -> None:
        """Take the instance out of the group; it drains for the group's deregistration delay. A target
        that is not in the group is fine."""
        try:
            await self._call("DeregisterTargets", TargetGroupArn=target_group,
                             Targets=[_target(instance_id, port)])
        except ElbRejected as e:
            # Some endpoints refuse to deregister a target that is not registered: check that it is not.
            if e.code != "InvalidTarget":
                raise
            health = await self.target_health(target_group, instance_id, port)
            if health.registered:
                raise

    async def target_health(self, target_group: str, instance_id: str, port: int | None = None
                            ) -> TargetHealth:
        reply = await self._call("DescribeTargetHealth", TargetGroupArn=target_group,
                                 Targets=[_target(instance_id, port)])
        for d in reply.get("TargetHealthDescriptions", []):
            target = d.get("Target", {})
            if target.get("Id") == instance_id and (port is None or target.get("Port") == port):
                health = d.get("TargetHealth", {})
                return TargetHealth(str(health.get("State", "unavailable")), health.get("Reason"))
        return TargetHealth("unused", "Target.NotRegistered")

    async def wait_drained(self, target_group: str, instance_id: str, port: int | None = None, *,
                           within: float) -> bool:
        """Wait until the target has left the group (no longer draining, not registered): True; False
        when `within` seconds passed first. Calls that fail meanwhile are tried again until then."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        first = True
        while True:
            try:
                # The first check has its whole call timeout, even with nothing left to wait for.
                async with asyncio.timeout_at(None if first else deadline):
                    health = await self.target_health(target_group, instance_id, port)
                if health.drained:
                    return True
            except ElbUnavailable as e:
                log.info("elb.drain_check_failed", target_group=target_group, error=str(e))
            except TimeoutError:
                return False
            first = False
            left = deadline - loop.time()
            if left <= 0:
                return False
            await asyncio.sleep(min(self.poll_interval, left))

    # -- the calls

    async def _call(self, operation: str, **params: Any) -> dict[str, Any]:
        client = self._client
        if client is None:
            raise RuntimeError("Elb used outside its context")
        method = getattr(client, botocore.xform_name(operation))
        try:
            async with asyncio.timeout(self.call_timeout):
                reply: dict[str, Any] = await method(**params)
                return reply
        except TimeoutError:
            raise ElbUnavailable(f"{operation}: no answer within {self.call_timeout:g}s",
                                 operation=operation) from None
        except botocore.exceptions.ClientError as e:
            raise _client_error(operation, e) from None
        except (botocore.exceptions.ParamValidationError, botocore.exceptions.NoRegionError) as e:
            raise ElbRejected(f"{operation}: {type(e).__name__}", operation=operation) from None
        except botocore.exceptions.BotoCoreError as e:
            # Connection failures, timeouts, credentials not to be had: the class says enough, and a
            # message of botocore's might quote a credential source.
            raise ElbUnavailable(f"{operation}: {type(e).__name__}", operation=operation) from None
        except (aiohttp.ClientError, OSError) as e:
            raise ElbUnavailable(f"{operation}: {type(e).__name__}", operation=operation) from None


def _client_error(operation: str, e: botocore.exceptions.ClientError) -> ElbError:
    response: dict[str, Any] = getattr(e, "response", None) or {}
    error = response.get("Error") or {}
    code = str(error.get("Code") or "Unknown")
    message = str(error.get("Message") or "")[:_MAX_MESSAGE]
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    text = f"{operation}: {code}" + (f": {message}" if message else "")
    if code in _TRANSIENT_CODES or (isinstance(status, int) and status >= 500):
        return ElbUnavailable(text, operation=operation, code=code)
    return ElbRejected(text, operation=operation, code=code)
