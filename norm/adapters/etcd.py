"""etcd: Norm's own small typed interface over aetcd.

What this adds to the client library:
- timeouts on every call and gRPC keepalives, so that a partition is noticed within seconds;
- TLS with client certificates and failover between several endpoints (a channel we build ourselves);
- password auth that authenticates again when the server forgets the token (a restart does that);
- a lease kept alive with a local deadline measured from when each renewal was sent, so the holder
  knows it lost the lease before the server can have expired it;
- watches that resume from the last revision + 1 across errors and re-list after compaction, so the
  consumer sees every change once, in order;
- leader election whose side effects are transactions fenced on the leader key's create revision.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar
from urllib.parse import urlsplit

import aetcd
import aetcd.exceptions as aex
import aetcd.rtypes
import grpc
import structlog
from aetcd import rpc, transactions

from norm.core.access import Kind, Permission
from norm.core.backoff import Backoff, renewal_retry
from norm.core.config import EtcdConfig
from norm.core.errors import NormError, Permanent, Temporary
from norm.core.secret import Secret

log = structlog.get_logger("norm.etcd")
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------
# Errors: what the caller should do


class EtcdError(NormError):
    """Something went wrong talking to etcd."""


class EtcdUnavailable(EtcdError, Temporary):
    """etcd did not answer in time or could not be reached. Transient: retry later."""


class EtcdRejected(EtcdError, Permanent):
    """etcd refused the request (bad credentials, permission, certificate, argument). Permanent."""


class EtcdTlsFailed(EtcdRejected):
    """The TLS handshake with etcd failed. Most often the configuration (CA, client certificate,
    server name), but an endpoint on its way up or down, a load balancer with no live backend, a
    certificate being rotated or a clock not yet set at boot fail the same way: a caller that can wait
    (the agent at start) retries it, and says so loudly."""


class LeaseLost(EtcdError):
    """The lease can no longer be proven alive: stop whatever depended on it."""


class NotLeader(EtcdError):
    """A fenced write was refused: this agent is not (or no longer) the leader."""


def _translate(e: BaseException, what: str) -> EtcdError:
    if isinstance(e, EtcdError):
        return e
    if isinstance(e, TimeoutError | aex.ConnectionTimeoutError | aex.WatchTimeoutError):
        return EtcdUnavailable(f"{what}: etcd did not answer in time")
    if isinstance(e, _CallDropped):
        return EtcdUnavailable(f"{what}: {e}")
    cause = e.__cause__ if isinstance(e, aex.ClientError) else e
    detail = cause.details() if isinstance(cause, grpc.aio.AioRpcError) else str(e)
    detail = (detail or type(e).__name__).strip()
    tls_words = ("SSL", "handshake", "CERTIFICATE", "TSI_", "Unwrap failed", "Verification")
    if any(w.upper() in detail.upper() for w in tls_words):
        return EtcdTlsFailed(f"{what}: TLS with etcd failed (check etcd.ca_file, cert_file, key_file and "
                             f"server_name): {detail}")
    if isinstance(e, aex.UnauthenticatedError | aex.InvalidArgumentError | aex.PreconditionFailedError):
        return EtcdRejected(f"{what}: {detail}")
    if isinstance(e, aex.ClientError) and "permission denied" in detail:
        return EtcdRejected(f"{what}: {detail}")
    return EtcdUnavailable(f"{what}: {detail}")


class _CallDropped(Exception):
    """gRPC cancelled a call because another task closed its channel (moving to another member):
    a failed call, to be retried, not a cancellation of the task that made it."""


async def _own_cancel(aw: Awaitable[T]) -> T:
    """Await one RPC (or a step of a stream). gRPC cancels the calls in flight on a channel that is
    closed, and they raise CancelledError in whichever task awaits them; only a cancellation of
    this task is passed on as one. Any other is the call failing (`_CallDropped`)."""
    try:
        return await aw
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise
        raise _CallDropped("the connection was closed under the call") from None


def _member_trouble(e: BaseException) -> bool:
    """Whether a failure tells against the member rather than the request: no answer in time, no
    connection, or (same code) a member without a leader. A refusal (a lease not found, say) does
    not."""
    if isinstance(e, TimeoutError | aex.ConnectionTimeoutError | aex.ConnectionFailedError
                  | aex.WatchTimeoutError):
        return True
    cause = e.__cause__ if isinstance(e, aex.ClientError) else e
    return isinstance(cause, grpc.aio.AioRpcError) and cause.code() in (
        grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


# ---------------------------------------------------------------------------------------------------
# Typed values


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def of(cls, kv: Any) -> KeyValue:
        return cls(kv.key.decode("utf-8", "surrogateescape"), bytes(kv.value), kv.create_revision,
                   kv.mod_revision, kv.version, kv.lease)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Keys as they stood at `revision`."""

    revision: int
    kvs: tuple[KeyValue, ...]


@dataclass(frozen=True, slots=True)
class Event:
    """A change: a put (kv holds the new value) or a delete (kv.value is empty)."""

    kind: Literal["put", "delete"]
    kv: KeyValue

    @property
    def revision(self) -> int:
        return self.kv.mod_revision


@dataclass(frozen=True, slots=True)
class Resync:
    """The watch re-listed: `snapshot` replaces everything the consumer knew (after start or compaction)."""

    snapshot: Snapshot
    reason: Literal["start", "compacted"]


WatchItem = Event | Resync


# Transaction building blocks


@dataclass(frozen=True, slots=True)
class Compare:
    key: str
    target: Literal["value", "version", "create", "mod"]
    op: Literal["==", "!=", "<", ">"]
    operand: int | bytes

    def build(self) -> Any:
        cls = {"value": transactions.Value, "version": transactions.Version,
               "create": transactions.Create, "mod": transactions.Mod}[self.target]
        c = cls(self.key.encode())
        match self.op:
            case "==":
                return c == self.operand
            case "!=":
                return c != self.operand
            case "<":
                return c < self.operand
            case ">":
                return c > self.operand


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: bytes
    lease: int | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    """Delete `key`, or every key under it (`prefix`), or every key in [key, range_end)."""

    key: str
    prefix: bool = False
    range_end: str | None = None


@dataclass(frozen=True, slots=True)
class Get:
    """Read `key`, or every key under it (`prefix`), or every key in [key, range_end)."""

    key: str
    prefix: bool = False
    range_end: str | None = None


Op = Put | Delete | Get


def _raw(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


def prefix_end(prefix: str) -> bytes:
    return bytes(aetcd.utils.prefix_range_end(prefix.encode()))


def _range_end(key: str, prefix: bool, range_end: str | None) -> bytes | None:
    if range_end is not None:
        return _raw(range_end)
    return prefix_end(key) if prefix else None


def _build_op(op: Op) -> Any:
    match op:
        case Put(key, value, lease):
            return transactions.Put(key.encode(), value, lease=lease)
        case Delete(key, prefix, range_end):
            return transactions.Delete(key.encode(), range_end=_range_end(key, prefix, range_end))
        case Get(key, prefix, range_end):
            return transactions.Get(key.encode(), range_end=_range_end(key, prefix, range_end))


def _written_at(responses: Sequence[Any]) -> int:
    """The revision a transaction's puts and deletes wrote at, from their responses' headers."""
    for r in responses:
        if isinstance(r, list):
            continue
        for kind in ("response_put", "response_delete_range"):
            if r.WhichOneof("response") == kind:
                return int(getattr(r, kind).header.revision)
    return 0


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    gets: tuple[tuple[KeyValue, ...], ...]  # one tuple per Get op of the branch taken, in order
    revision: int = 0  # the store's revision the transaction wrote at (0: it wrote nothing)


# ---------------------------------------------------------------------------------------------------
# The channel: TLS, several endpoints, keepalives, auth


@dataclass(frozen=True)
class _Target:
    address: str
    tls: bool
    server_name: str | None


def _target(endpoints: Sequence[str], server_name: str | None) -> _Target:
    parts = [urlsplit(e) for e in endpoints]
    tls = parts[0].scheme == "https"
    hosts = [(p.hostname or "", p.port or 2379) for p in parts]

    def ip_version(h: str) -> int | None:
        try:
            return ipaddress.ip_address(h).version
        except ValueError:
            return None

    versions = {ip_version(h) for h, _ in hosts}
    if versions == {4}:
        address = "ipv4:" + ",".join(f"{h}:{p}" for h, p in hosts)
    elif versions == {6}:
        address = "ipv6:" + ",".join(f"[{h}]:{p}" for h, p in hosts)
    elif len(hosts) == 1:
        address = f"dns:///{hosts[0][0]}:{hosts[0][1]}"
    else:
        # Names: resolved once per connection (see _Client.connect) into one address list.
        address = "names:" + ",".join(f"{h}:{p}" for h, p in hosts)
        if server_name is None and versions == {None}:
            server_name = hosts[0][0]
    return _Target(address, tls, server_name)


def endpoint_order(endpoints: Sequence[str], seed: str | None) -> tuple[str, ...]:
    """The order one host tries the endpoints in: shuffled, so that a fleet spreads over the members
    instead of every agent using the first one listed. Seeded with the machine id, a host keeps its
    order across restarts; without a seed it is random."""
    order = list(endpoints)
    random.Random(seed).shuffle(order)
    return tuple(order)


async def _resolve(address: str) -> str:
    if not address.startswith("names:"):
        return address
    loop = asyncio.get_running_loop()
    out: list[str] = []
    for item in address[len("names:"):].split(","):
        host, _, port = item.rpartition(":")
        for info in await loop.getaddrinfo(host, int(port), type=1):
            ip = str(info[4][0])
            if ":" not in ip and f"{ip}:{port}" not in out:
                out.append(f"{ip}:{port}")
    if not out:
        raise EtcdUnavailable("no etcd endpoint name resolved to an IPv4 address")
    return "ipv4:" + ",".join(out)


class _Client(aetcd.Client):  # type: ignore[misc]
    """aetcd's client on a channel of our making: TLS, several addresses, keepalives, auth."""

    def __init__(self, target: _Target, credentials: grpc.ChannelCredentials | None,
                 options: dict[str, Any], username: str | None, password: Secret | None,
                 timeout: float) -> None:
        super().__init__(host="unused", port=0, timeout=timeout, options=options,
                         connect_wait_timeout=int(timeout) + 1)
        self._norm_target = target
        self._norm_credentials = credentials
        self._norm_username = username
        self._norm_password = password
        self._is_connecting: bool = False

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            address = await _resolve(self._norm_target.address)
            options = list(self._options.items())
            if self._norm_credentials is not None:
                self.channel = grpc.aio.secure_channel(address, self._norm_credentials, options=options)
            else:
                self.channel = grpc.aio.insecure_channel(address, options=options)
            if self._norm_username and self._norm_password is not None:
                self.auth_stub = rpc.AuthStub(self.channel)
                request = rpc.AuthenticateRequest(name=self._norm_username,
                                                  password=self._norm_password.reveal())
                try:
                    reply = await self.auth_stub.Authenticate(request, timeout=self._timeout)
                except grpc.aio.AioRpcError as e:
                    await self.channel.close()
                    self.channel = None
                    if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                        raise EtcdUnavailable(f"authenticating to etcd: {e.details()}") from None
                    raise EtcdRejected(f"authenticating to etcd as {self._norm_username!r}: "
                                       f"{e.details()}") from None
                self.metadata = (("token", reply.token),)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            # Require a leader: a member cut off from its peers then ends its watches (and refuses
            # new ones) with "no leader" instead of leaving them silent.
            watch_metadata = (*(self.metadata or ()), ("hasleader", "true"))
            self._watcher = aetcd.watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                                  metadata=watch_metadata)
            self._connected.set()
        finally:
            self._is_connecting = False


def _read(path: str, what: str) -> bytes:
    """A certificate or key file's content; a file that cannot be read, or holds no PEM block, is the
    configuration's fault for certain (EtcdRejected, never EtcdTlsFailed)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise EtcdRejected(f"cannot read {what} {path}: {e.strerror}") from None
    if b"-----BEGIN " not in data:
        raise EtcdRejected(f"{what} {path} is not a PEM file (no -----BEGIN line)")
    return data


# ---------------------------------------------------------------------------------------------------
# The adapter


class Etcd:
    """An etcd connection: `async with Etcd(config) as etcd: ...`.

    The channel tries the endpoints in this host's order (`endpoint_order`, seeded with `seed`).
    After `failover_after` requests in a row fail on one member (unavailable, timed out), or at once
    when it says it has no leader, the client moves that endpoint to the back and connects again."""

    def __init__(self, config: EtcdConfig, *, password: Secret | None = None,
                 on_state: Callable[[bool], None] | None = None, probe_key: str = "/",
                 seed: str | None = None) -> None:
        self.config = config
        self._order = endpoint_order(config.endpoints, seed)
        self._failures = 0  # requests failed in a row on the current client
        self.failovers = 0
        self._probe_key = probe_key
        self._password = password if password is not None else config.password
        self._on_state = on_state
        self._client: _Client | None = None
        self._client_lock = asyncio.Lock()
        self.connected = False
        self.requests = 0  # RPCs sent, for the idle-traffic figure

    # -- lifecycle

    async def __aenter__(self) -> Self:
        await self.check(self._probe_key)
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self._drop_client()

    @property
    def endpoint(self) -> str:
        """The endpoint this client prefers now (its channel falls back on the others in order)."""
        return self._order[0]

    def _new_client(self) -> _Client:
        c = self.config
        credentials = None
        target = _target(self._order, c.server_name)
        if target.tls:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(c.ca_file, "etcd.ca_file") if c.ca_file else None,
                private_key=_read(c.key_file, "etcd.key_file") if c.key_file else None,
                certificate_chain=_read(c.cert_file, "etcd.cert_file") if c.cert_file else None,
            )
        options: dict[str, Any] = {
            "grpc.keepalive_time_ms": int(c.keepalive_time * 1000),
            "grpc.keepalive_timeout_ms": int(c.keepalive_timeout * 1000),
            "grpc.http2.ping_timeout_ms": int(c.keepalive_timeout * 1000),
            "grpc.keepalive_permit_without_calls": 1,
            # A listing of a big fleet's keys outgrows gRPC's default of 4 MiB per message.
            "grpc.max_receive_message_length": 64 * 1024 * 1024,
            "grpc.http2.max_pings_without_data": 0,
            "grpc.lb_policy_name": "pick_first",
            "grpc.initial_reconnect_backoff_ms": 100,
            "grpc.min_reconnect_backoff_ms": 100,
            "grpc.max_reconnect_backoff_ms": 1000,
            "grpc.enable_retries": 0,
        }
        if target.server_name:
            options["grpc.ssl_target_name_override"] = target.server_name
            options["grpc.default_authority"] = target.server_name
        return _Client(target, credentials, options, c.username, self._password, c.request_timeout)

    async def _get_client(self) -> _Client:
        async with self._client_lock:
            if self._client is None:
                self._client = self._new_client()
            client = self._client
        try:
            async with asyncio.timeout(self.config.dial_timeout):
                await _own_cancel(client.connect())
        except asyncio.CancelledError:
            raise
        except Exception as e:
            await self._drop_client(client)
            raise _translate(e, "connecting to etcd") from None
        return client

    async def _drop_client(self, client: _Client | None = None) -> None:
        async with self._client_lock:
            if self._client is None or (client is not None and client is not self._client):
                return
            old, self._client = self._client, None
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await _own_cancel(old.close())
        self._set_connected(False)

    async def _failed(self, client: _Client | None, e: BaseException, err: EtcdError) -> None:
        """Count a request that failed on `client` (raising `e`, translated `err`) if the failure
        tells against its member; move to the next endpoint when it is time."""
        if not _member_trouble(e) or client is None or client is not self._client:
            return
        self._failures += 1
        no_leader = "no leader" in str(err)
        if len(self._order) < 2 or (self._failures < self.config.failover_after and not no_leader):
            return
        left = self._order[0]
        self._order = (*self._order[1:], left)
        self._failures = 0
        self.failovers += 1
        log.warning("etcd.failover", left=left, to=self._order[0], error=str(err))
        await self._drop_client(client)

    def _set_connected(self, up: bool) -> None:
        if up != self.connected:
            self.connected = up
            if self._on_state is not None:
                self._on_state(up)

    async def _call(self, what: str, fn: Callable[[_Client], Awaitable[T]], *, retry: bool) -> T:
        """Run one RPC with a deadline; on a lost token authenticate again; retry idempotent calls
        on another endpoint while the request timeout allows."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.request_timeout
        attempt = 0
        reauthed = False
        while True:
            client = await self._get_client()
            try:
                self.requests += 1
                async with asyncio.timeout(max(0.05, deadline - loop.time())):
                    result = await _own_cancel(fn(client))
                if client is self._client:
                    self._failures = 0
                self._set_connected(True)
                return result
            except asyncio.CancelledError:
                raise
            except Exception as e:
                err = _translate(e, what)
                token_lost = isinstance(e, aex.UnauthenticatedError) or "invalid auth token" in str(err)
                if token_lost and not reauthed and self.config.username:
                    reauthed = True
                    log.info("etcd.reauthenticate", reason=str(err))
                    await self._drop_client(client)
                    continue
                await self._failed(client, e, err)
                if isinstance(err, EtcdRejected) or not retry or loop.time() >= deadline:
                    if isinstance(err, EtcdUnavailable):
                        self._set_connected(False)
                    raise err from None
                delay = Backoff(first=0.05, cap=0.5).delay(attempt, random.random())
                attempt += 1
                await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))

    async def check(self, key: str = "/") -> int:
        """Prove etcd answers, and that TLS, auth and the permission to read `key` are right;
        returns the current revision."""
        reply = await self._call("reaching etcd", lambda c: c.get_prefix(key.encode(), keys_only=True),
                                 retry=True)
        return int(reply.header.revision)

    # -- key-value

    async def get(self, key: str) -> KeyValue | None:
        reply = await self._call(f"reading {key}", lambda c: c.get(key.encode()), retry=True)
        return None if reply is None else KeyValue.of(reply)

    async def get_prefix(self, prefix: str, *, keys_only: bool = False) -> Snapshot:
        """Every key under `prefix`; with `keys_only`, their values are left empty (not sent)."""
        reply = await self._call(f"reading {prefix}*",
                                 lambda c: c.get_prefix(prefix.encode(), keys_only=keys_only), retry=True)
        return Snapshot(reply.header.revision, tuple(KeyValue.of(kv) for kv in reply))

    async def get_range(self, key: str, range_end: str) -> Snapshot:
        """Every key in [key, range_end), with the revision the read is current at."""
        start, end = _raw(key), _raw(range_end)
        reply = await self._call(f"reading [{key}, {range_end})", lambda c: c.get_range(start, end),
                                 retry=True)
        return Snapshot(reply.header.revision, tuple(KeyValue.of(kv) for kv in reply))

    async def get_one(self, key: str) -> Snapshot:
        """One key (none or one in `kvs`) with the revision the read is current at."""
        raw = key.encode()
        reply = await self._call(f"reading {key}", lambda c: c.get_range(raw, raw + b"\0"), retry=True)
        return Snapshot(reply.header.revision, tuple(KeyValue.of(kv) for kv in reply))

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        """Write a value; returns the revision of the write."""
        reply = await self._call(f"writing {key}", lambda c: c.put(key.encode(), value, lease=lease),
                                 retry=True)
        return int(reply.header.revision)

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        """Delete a key (or every key under a prefix); returns how many were deleted."""
        if prefix:
            reply = await self._call(f"deleting {key}*", lambda c: c.delete_prefix(key.encode()),
                                     retry=True)
        else:
            reply = await self._call(f"deleting {key}", lambda c: c.delete(key.encode()), retry=True)
        return 0 if reply is None else int(reply.deleted)

    async def txn(self, compare: Sequence[Compare], success: Sequence[Op],
                  failure: Sequence[Op] = ()) -> TxnResult:
        """One transaction. Not retried: a reply lost on the way may mean it applied; the caller
        checks, as it knows what the transaction meant."""

        async def run(c: _Client) -> tuple[bool, list[Any]]:
            return await c.transaction(  # type: ignore[no-any-return]
                compare=[x.build() for x in compare],
                success=[_build_op(o) for o in success],
                failure=[_build_op(o) for o in failure])

        succeeded, responses = await self._call("transaction", run, retry=False)
        gets = tuple(tuple(KeyValue.of(item[1]) for item in r) for r in responses if isinstance(r, list))
        return TxnResult(bool(succeeded), gets, _written_at(responses))

    async def compact(self, revision: int) -> None:
        await self._call("compacting", lambda c: c.compact(revision, physical=True), retry=False)

    # -- leases

    def lease(self, ttl: int | None = None) -> Lease:
        return Lease(self, ttl or self.config.lease_ttl)

    async def _grant(self, ttl: int) -> tuple[int, int]:
        reply = await self._call("granting a lease", lambda c: c.lease(ttl), retry=True)
        return int(reply.id), int(reply.ttl)

    async def _keepalive(self, lease_id: int, budget: float) -> int:
        async def run(c: _Client) -> int:
            async with asyncio.timeout(budget):
                reply = await c.refresh_lease(lease_id)
            return 0 if reply is None else int(reply.TTL)

        return await self._call("renewing the lease", run, retry=False)

    async def _revoke(self, lease_id: int) -> None:
        await self._call("revoking the lease", lambda c: c.revoke_lease(lease_id), retry=False)

    # -- watches

    def watch(self, key: str, *, prefix: bool = False, range_end: str | None = None,
              start_revision: int | None = None) -> Watch:
        """Watch `key`, or every key under it (`prefix`), or every key in [key, range_end)."""
        return Watch(self, key, prefix=prefix, range_end=range_end, start_revision=start_revision)

    # -- election

    def election(self, key: str, value: bytes) -> Election:
        return Election(self, key, value)

    # -- users and roles (etcd's own access control; changing them takes its root role)

    async def _auth(self, what: str, method: str, request: Any, *, retry: bool) -> Any:
        async def run(c: _Client) -> Any:
            stub = rpc.AuthStub(c.channel)
            try:
                return await getattr(stub, method)(request, timeout=self.config.request_timeout,
                                                   metadata=c.metadata)
            except grpc.aio.AioRpcError as e:
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                raise EtcdRejected(f"{what}: {e.details()}") from None

        return await self._call(what, run, retry=retry)

    async def auth_enabled(self) -> bool | None:
        """Whether etcd's authentication is on; None when the server cannot say (before etcd 3.5)."""
        try:
            reply = await self._auth("reading the auth status", "AuthStatus", rpc.AuthStatusRequest(),
                                     retry=True)
        except EtcdRejected as e:
            if "unknown method" in str(e):
                return None
            raise
        return bool(reply.enabled)

    async def role_permissions(self, role: str) -> frozenset[Permission] | None:
        """The grants of `role`; None if there is no such role."""
        try:
            reply = await self._auth(f"reading role {role}", "RoleGet", rpc.AuthRoleGetRequest(role=role),
                                     retry=True)
        except EtcdRejected as e:
            if "role name not found" in str(e):
                return None
            raise
        kinds: dict[int, Kind] = {0: "read", 1: "write", 2: "readwrite"}
        return frozenset(Permission(bytes(p.key).decode("utf-8", "surrogateescape"),
                                    bytes(p.range_end).decode("utf-8", "surrogateescape"),
                                    kinds[int(p.permType)]) for p in reply.perm)

    async def add_role(self, role: str) -> None:
        await self._auth(f"adding role {role}", "RoleAdd", rpc.AuthRoleAddRequest(name=role), retry=False)

    async def grant_permission(self, role: str, permission: Permission) -> None:
        codes = {"read": 0, "write": 1, "readwrite": 2}
        perm = rpc.Permission(permType=codes[permission.kind], key=_raw(permission.key),
                              range_end=_raw(permission.range_end))
        await self._auth(f"granting {permission.describe()} to role {role}", "RoleGrantPermission",
                         rpc.AuthRoleGrantPermissionRequest(name=role, perm=perm), retry=False)

    async def revoke_permission(self, role: str, permission: Permission) -> None:
        await self._auth(f"revoking {permission.describe()} from role {role}", "RoleRevokePermission",
                         rpc.AuthRoleRevokePermissionRequest(role=role, key=_raw(permission.key),
                                                            range_end=_raw(permission.range_end)),
                         retry=False)

    async def user_roles(self, user: str) -> frozenset[str] | None:
        """The roles of `user`; None if there is no such user."""
        try:
            reply = await self._auth(f"reading user {user}", "UserGet", rpc.AuthUserGetRequest(name=user),
                                     retry=True)
        except EtcdRejected as e:
            if "user name not found" in str(e):
                return None
            raise
        return frozenset(reply.roles)

    async def add_user(self, user: str, password: Secret | None) -> None:
        """A user with a password, or (None) one that only a client certificate's CN can be."""
        if password is None:
            request = rpc.AuthUserAddRequest(name=user, options=rpc.UserAddOptions(no_password=True))
        else:
            request = rpc.AuthUserAddRequest(name=user, password=password.reveal())
        await self._auth(f"adding user {user}", "UserAdd", request, retry=False)

    async def grant_role(self, user: str, role: str) -> None:
        await self._auth(f"granting role {role} to user {user}", "UserGrantRole",
                         rpc.AuthUserGrantRoleRequest(user=user, role=role), retry=False)

    async def revoke_role(self, user: str, role: str) -> None:
        await self._auth(f"revoking role {role} from user {user}", "UserRevokeRole",
                         rpc.AuthUserRevokeRoleRequest(name=user, role=role), retry=False)


# ---------------------------------------------------------------------------------------------------
# Lease with a local deadline


class Lease:
    """A lease kept alive in a named task. `deadline` (loop time) is the earliest moment the server
    could expire it: the send time of the last renewal it confirmed, plus the TTL it granted then.
    `lost` is set a safety margin before that deadline, or at once if the server says it is gone."""

    def __init__(self, etcd: Etcd, ttl: int) -> None:
        self._etcd = etcd
        self.ttl = ttl
        self.id = 0
        self.deadline = 0.0
        self.lost = asyncio.Event()
        self.lost_reason = ""
        self.renewals = 0
        self._renewed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def margin(self) -> float:
        return min(1.0, self.ttl * 0.1)

    def valid(self) -> bool:
        """True while the lease is certainly alive on the server, with a safety margin."""
        loop = asyncio.get_running_loop()
        return not self.lost.is_set() and loop.time() < self.deadline - self.margin

    def remaining(self) -> float:
        return self.deadline - self.margin - asyncio.get_running_loop().time()

    async def wait_renewals(self, count: int) -> None:
        """Wait until the lease has been renewed `count` times in all."""
        async with self._renewed:
            await self._renewed.wait_for(lambda: self.renewals >= count)

    async def __aenter__(self) -> Self:
        loop = asyncio.get_running_loop()
        sent = loop.time()
        self.id, granted = await self._etcd._grant(self.ttl)
        self.ttl = granted
        self.deadline = sent + granted
        self._task = asyncio.create_task(self._renew(), name=f"etcd-lease-{self.id:x}")
        log.debug("etcd.lease.granted", lease=f"{self.id:x}", ttl=granted)
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if not self.lost.is_set():
            self._lose("revoked")
            with contextlib.suppress(EtcdError):
                await self._etcd._revoke(self.id)

    def _lose(self, reason: str) -> None:
        if not self.lost.is_set():
            self.lost_reason = reason
            self.lost.set()
            if reason != "revoked":
                log.warning("etcd.lease.lost", lease=f"{self.id:x}", reason=reason)

    async def _renew(self) -> None:
        """Keep the lease alive; however renewing ends (other than by cancellation), the lease is
        lost from then on: its holders must never outlive the task that proves it alive."""
        try:
            await self._keep_alive()
        except Exception as e:  # a bug, not etcd's answer (those are retried): stop trusting the lease
            self._lose(f"renewing stopped: {type(e).__name__}: {e}")
        finally:
            if not self.lost.is_set() and not self._closing:
                self._lose("renewing stopped")

    async def _keep_alive(self) -> None:
        loop = asyncio.get_running_loop()
        interval = max(0.5, self.ttl / 3)
        retry = renewal_retry(self.ttl)
        failures = 0
        next_at = loop.time() + interval
        while True:
            # Sleep until the next renewal, but wake to declare the lease lost at the deadline.
            wake = min(next_at, self.deadline - self.margin)
            await asyncio.sleep(max(0.0, wake - loop.time()))
            if loop.time() >= self.deadline - self.margin:
                self._lose("not renewed in time")
                return
            sent = loop.time()
            # One try may not take the whole time left: a member that holds renewals (one with no
            # leader waits for one) must fail them soon enough for the client to move to another
            # member (after etcd.failover_after failures) and renew there in time.
            budget = min(self.deadline - self.margin - sent, max(1.0, interval / 2))
            try:
                ttl = await self._etcd._keepalive(self.id, budget=max(0.05, budget))
            except EtcdError as e:
                delay = retry.delay(failures, random.random())
                failures += 1
                log.info("etcd.lease.renew_failed", lease=f"{self.id:x}", error=str(e),
                         retry_in=round(delay, 3))
                next_at = loop.time() + delay
                continue
            failures = 0
            if ttl <= 0:
                self._lose("expired on the server")
                return
            self.deadline = sent + ttl
            async with self._renewed:
                self.renewals += 1
                self._renewed.notify_all()
            next_at = sent + interval


# ---------------------------------------------------------------------------------------------------
# Watch: every change once, in order, across errors and compaction


class Watch:
    """`async with etcd.watch(key) as w: async for item in w: ...`

    Without `start_revision` it first lists what is there (a `Resync` with reason "start"), then
    yields each change from the next revision. After compaction it lists again (reason
    "compacted") and goes on from there. Errors are retried with backoff, resuming from the revision
    after the last one delivered, so nothing is lost or repeated."""

    def __init__(self, etcd: Etcd, key: str, *, prefix: bool, start_revision: int | None,
                 range_end: str | None = None) -> None:
        self._etcd = etcd
        self.key = key
        self.prefix = prefix
        self.range_end = range_end
        self.next_revision = start_revision
        self._pending: deque[WatchItem] = deque()
        self._stream: Any = None
        self._stream_client: _Client | None = None
        self._iter: AsyncIterator[Any] | None = None
        self._failures = 0
        self.reconnects = 0
        self.resyncs = 0

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._close()

    def __aiter__(self) -> Self:
        return self

    async def _close(self) -> None:
        stream, self._stream, self._iter = self._stream, None, None
        if stream is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await _own_cancel(stream.cancel())

    async def _list(self, reason: Literal["start", "compacted"]) -> None:
        if self.range_end is not None:
            snap = await self._etcd.get_range(self.key, self.range_end)
        elif self.prefix:
            snap = await self._etcd.get_prefix(self.key)
        else:
            # One range read of [key, key + NUL) gives the key alone and the revision it is current at.
            snap = await self._etcd.get_one(self.key)
        self.next_revision = snap.revision + 1
        if reason == "compacted":
            self.resyncs += 1
        self._pending.append(Resync(snap, reason))

    async def _open(self) -> None:
        if self.next_revision is None:
            await self._list("start")
        client = self._stream_client = await self._etcd._get_client()
        range_end = _range_end(self.key, self.prefix, self.range_end)
        try:
            self._etcd.requests += 1
            self._stream = await _own_cancel(client.watch(self.key.encode(), range_end=range_end,
                                                          start_revision=self.next_revision))
        except aex.RevisionCompactedError:
            await self._list("compacted")
            return
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # aetcd waits for the watch to be created with asyncio.wait_for, which on Python 3.11 can
            # swallow a cancellation that arrives as the server answers: honour it here, or the
            # cancelled task would wait on the new watch for ever.
            await self._close()
            raise asyncio.CancelledError
        self._iter = self._stream.__aiter__()

    async def __anext__(self) -> WatchItem:
        while True:
            if self._pending:
                return self._pending.popleft()
            try:
                if self._iter is None:
                    await self._open()
                    continue
                raw = await _own_cancel(self._iter.__anext__())
            except asyncio.CancelledError:
                raise
            except StopAsyncIteration:
                await self._close()
                continue
            except aex.RevisionCompactedError:
                await self._close()
                with contextlib.suppress(EtcdUnavailable):
                    await self._list("compacted")
                continue
            except Exception as e:
                await self._close()
                await self._recover(e)
                continue
            kv = KeyValue.of(raw.kv)
            if not self._covers(kv.key):
                # An event of another watch: the client's shared stream has paired a watch with the
                # wrong server-side watcher. Nothing of it is delivered; the client is made anew, so
                # that every watch on it starts again, on a fresh stream, from where it stood.
                log.error("etcd.watch.crossed", key=self.key)
                client = self._stream_client
                await self._close()
                await self._etcd._drop_client(client)
                continue
            self._failures = 0
            self._etcd._set_connected(True)
            # The server sends a revision's events together, before any error on the stream, so
            # resuming after the revision of the last event handed out loses and repeats nothing.
            self.next_revision = kv.mod_revision + 1
            kind: Literal["put", "delete"] = (
                "delete" if raw.kind == aetcd.rtypes.EventKind.DELETE else "put")
            return Event(kind, kv)

    def _covers(self, key: str) -> bool:
        if self.range_end is not None:
            return _raw(self.key) <= _raw(key) < _raw(self.range_end)
        return key.startswith(self.key) if self.prefix else key == self.key

    async def _recover(self, e: Exception) -> None:
        err = _translate(e, f"watching {self.key}")
        token_lost = "invalid auth token" in str(err)
        if isinstance(err, EtcdRejected) and not token_lost:
            raise err from None
        if token_lost:
            await self._etcd._drop_client()
        elif not isinstance(e, EtcdError):  # a failure of the stream itself (calls count their own)
            await self._etcd._failed(self._stream_client, e, err)
        self._etcd._set_connected(False)
        delay = Backoff(first=0.1, cap=2.0).delay(self._failures, random.random())
        self._failures += 1
        self.reconnects += 1
        log.info("etcd.watch.retry", key=self.key, error=str(err), delay=round(delay, 3))
        await asyncio.sleep(delay)


# ---------------------------------------------------------------------------------------------------
# Election, fenced on the leader key's create revision


@dataclass(frozen=True)
class Leadership:
    """Proof of leadership: `token` is the create revision of the leader key."""

    key: str
    token: int
    lease: Lease = field(compare=False)

    def valid(self) -> bool:
        return self.lease.valid()


class Election:
    def __init__(self, etcd: Etcd, key: str, value: bytes) -> None:
        self._etcd = etcd
        self.key = key
        self.value = value

    async def leader(self) -> KeyValue | None:
        return await self._etcd.get(self.key)

    async def campaign(self, lease: Lease) -> Leadership:
        """Wait until this agent holds the leader key on `lease`. Raises LeaseLost if the lease goes.
        Failed tries are retried with jittered backoff, so that a fleet does not hammer etcd."""
        backoff = Backoff(first=0.1, cap=2.0)
        failures = 0
        while True:
            if not lease.valid():
                raise LeaseLost("the lease ran out while campaigning")
            try:
                result = await self._etcd.txn(
                    [Compare(self.key, "create", "==", 0)],
                    [Put(self.key, self.value, lease=lease.id), Get(self.key)],
                    [Get(self.key)],
                )
            except EtcdUnavailable as e:
                # The reply may be lost although the transaction applied: look at who holds the key.
                with contextlib.suppress(EtcdUnavailable):
                    current = await self._etcd.get(self.key)
                    if current is not None and current.lease == lease.id:
                        return Leadership(self.key, current.create_revision, lease)
                delay = backoff.delay(failures, random.random())
                failures += 1
                log.info("etcd.campaign.retry", key=self.key, error=str(e), delay=round(delay, 3))
                await self._wait_lease_or(lease, delay)
                continue
            failures = 0
            holder = result.gets[-1][0] if result.gets and result.gets[-1] else None
            if holder is not None and holder.lease == lease.id:
                return Leadership(self.key, holder.create_revision, lease)
            if holder is None:
                continue
            if holder.lease == 0:
                # Every agent puts the key on its own lease: this one was written by hand and proves
                # no leadership, yet it would stop every election for as long as it stands. It goes,
                # unless it has been written again since.
                log.warning("leader.foreign_key_removed", key=self.key, revision=holder.mod_revision)
                with contextlib.suppress(EtcdUnavailable):
                    await self._etcd.txn([Compare(self.key, "mod", "==", holder.mod_revision)],
                                         [Delete(self.key)])
                continue
            await self._wait_for_delete(holder.mod_revision + 1, lease)

    async def _wait_lease_or(self, lease: Lease, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await lease.lost.wait()

    async def _wait_for_delete(self, revision: int, lease: Lease) -> None:
        async def deleted() -> None:
            async with self._etcd.watch(self.key, start_revision=revision) as w:
                async for item in w:
                    if isinstance(item, Resync) and not item.snapshot.kvs:
                        return
                    if isinstance(item, Event) and item.kind == "delete":
                        return

        waiter = asyncio.create_task(deleted(), name=f"election-wait-{self.key}")
        lost = asyncio.create_task(lease.lost.wait(), name=f"election-lease-{self.key}")
        try:
            await asyncio.wait({waiter, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (waiter, lost):
                t.cancel()
            await asyncio.gather(waiter, lost, return_exceptions=True)
        if waiter.done() and not waiter.cancelled() and waiter.exception() is not None:
            raise waiter.exception()  # type: ignore[misc]

    async def deposed(self, leadership: Leadership) -> str:
        """Watch the leader key while leading; return (with the reason) once it no longer proves this
        leadership: deleted (by an operator, say), or put again with another create revision or on
        another lease. Watching from the create revision itself, nothing in between is missed."""
        async with self._etcd.watch(self.key, start_revision=leadership.token) as w:
            async for item in w:
                if isinstance(item, Resync):
                    kv = item.snapshot.kvs[0] if item.snapshot.kvs else None
                    if kv is None:
                        return "the leader key is gone"
                elif item.kind == "delete":
                    return "the leader key was deleted"
                else:
                    kv = item.kv
                if kv.create_revision != leadership.token or kv.lease != leadership.lease.id:
                    return "the leader key was replaced"
        raise EtcdUnavailable(f"watching {self.key} ended")  # pragma: no cover (a Watch does not end)

    async def confirm(self, leadership: Leadership) -> str | None:
        """One read of the leader key: None while it still proves this leadership, else the reason.
        A watch can stall on a member cut off from its peers without an error; this cannot."""
        kv = await self._etcd.get(self.key)
        if kv is None:
            return "the leader key is gone"
        if kv.create_revision != leadership.token or kv.lease != leadership.lease.id:
            return "the leader key was replaced"
        return None

    async def resign(self, leadership: Leadership) -> None:
        with contextlib.suppress(EtcdError):
            await self._etcd.txn([Compare(self.key, "create", "==", leadership.token)],
                                 [Delete(self.key)])

    async def fenced(self, leadership: Leadership, success: Sequence[Op],
                     compare: Sequence[Compare] = (), failure: Sequence[Op] = ()) -> TxnResult:
        """A leader's side effect: applied only while the leader key still has the leadership's
        create revision, and only sent while the lease is certainly alive. Raises NotLeader when the
        fence fails, unless extra `compare`s are given (then the caller reads `succeeded`)."""
        if not leadership.valid():
            raise NotLeader("the leader's lease cannot be proven alive")
        fence = Compare(self.key, "create", "==", leadership.token)
        result = await self._etcd.txn([fence, *compare], success, [Get(self.key), *failure])
        if not result.succeeded:
            holder = result.gets[0][0] if result.gets and result.gets[0] else None
            if holder is None or holder.create_revision != leadership.token:
                raise NotLeader(f"leadership {leadership.token} was lost")
        return result
