"""systemd: Norm's own small typed interface over dbus-fast, for the manager org.freedesktop.systemd1.

What this adds to the client library:
- one connection, shared by calls and watches, reconnected in one place (a named task) with backoff;
  after every reconnect it subscribes again, re-adds its match rules and the watches re-read their
  units. Losing the bus, or systemd leaving it (NameOwnerChanged), is noticed at once, and calls made
  meanwhile raise SystemdUnavailable at once instead of waiting on D-Bus activation (every call to
  systemd carries NO_AUTOSTART: without it, a call to a dead manager waits 120 s for activation);
- jobs (start/stop/restart) awaited to their end through JobRemoved, whichever of the signal and the
  method reply comes first;
- watches on unit-name patterns that yield a full `UnitsResync` first and after every reconnect or
  daemon-reload, then one `UnitChanged` per real change of a unit's state, straight from the
  PropertiesChanged signals with no further D-Bus round trip.

Ordering: D-Bus delivers systemd's signals and its replies to us in the order systemd sent them. Every
reply that feeds a watch's cache (GetAll) is applied at the moment the message is received, in the
connection's message handler, so a signal received after a reply always wins over it and a stale reply
can never overwrite a newer signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Literal, Self

import structlog
from dbus_fast import BusType, Message, MessageFlag, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.signature import Variant

from norm.core.backoff import Backoff
from norm.core.errors import NormError, Permanent, Temporary
from norm.core.units import UnitState, matches, parse_unit_name, valid_unit_name

log = structlog.get_logger("norm.systemd")

SYSTEMD = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
UNIT = "org.freedesktop.systemd1.Unit"
SERVICE = "org.freedesktop.systemd1.Service"
PROPERTIES = "org.freedesktop.DBus.Properties"
UNIT_PATH_PREFIX = "/org/freedesktop/systemd1/unit/"
DBUS = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"

_MATCH_RULES = (
    f"type='signal',sender='{SYSTEMD}',path='{MANAGER_PATH}',interface='{MANAGER}'",
    f"type='signal',sender='{SYSTEMD}',interface='{PROPERTIES}',member='PropertiesChanged',"
    f"path_namespace='{UNIT_PATH_PREFIX.rstrip('/')}'",
    f"type='signal',sender='{DBUS}',path='{DBUS_PATH}',interface='{DBUS}',member='NameOwnerChanged',"
    f"arg0='{SYSTEMD}'",
)

# The properties a UnitState is built from, per interface.
_UNIT_PROPS = ("Id", "LoadState", "ActiveState", "SubState", "NeedDaemonReload", "InvocationID",
               "ActiveEnterTimestampMonotonic", "InactiveEnterTimestampMonotonic")
_SERVICE_PROPS = ("Result", "NRestarts", "Restart", "MainPID")
_WANTED = {UNIT: frozenset(_UNIT_PROPS), SERVICE: frozenset(_SERVICE_PROPS)}

NOT_LOADABLE = ("not-found", "bad-setting", "error", "masked")

# systemd's errors that mean the unit cannot be loaded, and the load state each stands for.
_LOAD_ERRORS = {
    "org.freedesktop.systemd1.NoSuchUnit": "not-found",
    "org.freedesktop.systemd1.BadUnitSetting": "bad-setting",
    "org.freedesktop.systemd1.UnitMasked": "masked",
    "org.freedesktop.systemd1.LoadFailed": "error",
}
# D-Bus errors that mean nobody is there to answer right now.
_UNAVAILABLE_ERRORS = frozenset({
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.NoReply",
    "org.freedesktop.DBus.Error.TimedOut",
    "org.freedesktop.DBus.Error.Timeout",
    "org.freedesktop.DBus.Error.Disconnected",
    "org.freedesktop.DBus.Error.NoServer",
    "org.freedesktop.DBus.Error.LimitsExceeded",
})


# ---------------------------------------------------------------------------------------------------
# Errors: what the caller should do


class SystemdError(NormError):
    """Something went wrong talking to systemd. Raised as such when systemd refused a request
    (access denied, invalid argument, a job type that does not apply): permanent for that request."""


class SystemdUnavailable(SystemdError, Temporary):
    """The bus is gone, systemd is not on it, or it did not answer in time. Transient: retry later."""


class UnitNotLoadable(SystemdError, Permanent):
    """The unit cannot be loaded (no unit file, a bad setting, masked). Permanent until the unit file
    is fixed and the manager reloaded."""

    def __init__(self, unit: str, load_state: str, detail: str = "") -> None:
        super().__init__(f"{unit}: cannot be loaded ({load_state})" + (f": {detail}" if detail else ""))
        self.unit = unit
        self.load_state = load_state


class JobFailed(SystemdError):
    """A job (start, stop, restart) ended with a result other than "done": "failed", "canceled",
    "timeout", "dependency", "skipped", ..."""

    def __init__(self, unit: str, job_type: str, result: str) -> None:
        super().__init__(f"{unit}: {job_type} job ended with result {result!r}")
        self.unit = unit
        self.job_type = job_type
        self.result = result


class JobTimeout(SystemdError):
    """A job was queued but had not ended within the call timeout. It may still run: read the unit's
    state, or wait on a watch, before deciding what to do."""

    def __init__(self, unit: str, job_type: str, job: str, timeout: float) -> None:
        super().__init__(f"{unit}: {job_type} job {job} had not ended after {timeout:g}s")
        self.unit = unit
        self.job_type = job_type
        self.job = job


# ---------------------------------------------------------------------------------------------------
# Watch items


@dataclass(frozen=True, slots=True)
class UnitsResync:
    """Every matching unit as read just now: replaces all the consumer knew (after the start of the
    watch, a reconnect, or a daemon-reload)."""

    states: tuple[UnitState, ...]
    reason: Literal["start", "reconnected", "reloaded"]


@dataclass(frozen=True, slots=True)
class UnitChanged:
    """A unit's state changed (or a matching unit appeared). `received` is the loop time at which the
    signal carrying the change was handled."""

    state: UnitState
    received: float


UnitItem = UnitsResync | UnitChanged
ResyncReason = Literal["start", "reconnected", "reloaded"]
_REASON_RANK: dict[ResyncReason, int] = {"reloaded": 0, "reconnected": 1, "start": 2}


# ---------------------------------------------------------------------------------------------------
# Helpers


def _merge(props: dict[str, Any], changed: dict[str, Variant], wanted: Iterable[str]) -> None:
    for key in wanted:
        v = changed.get(key)
        if v is not None:
            props[key] = v.value


def _build(name: str, unit: dict[str, Any], service: dict[str, Any] | None) -> UnitState:
    s = service if service is not None else {}
    invocation: bytes = unit.get("InvocationID", b"")
    return UnitState(
        name=unit.get("Id") or name,
        load_state=unit.get("LoadState", "loaded"),
        active_state=unit.get("ActiveState", "inactive"),
        sub_state=unit.get("SubState", "dead"),
        result=s.get("Result", "success"),
        n_restarts=int(s.get("NRestarts", 0)),
        invocation_id=bytes(invocation).hex(),
        restart=s.get("Restart", "no"),
        need_daemon_reload=bool(unit.get("NeedDaemonReload", False)),
        main_pid=int(s.get("MainPID", 0)),
        active_enter_usec=int(unit.get("ActiveEnterTimestampMonotonic", 0)),
        inactive_enter_usec=int(unit.get("InactiveEnterTimestampMonotonic", 0)),
    )


def _keep(state: UnitState) -> bool:
    """Whether a listed unit is worth reporting: a name systemd only knows because someone asked for
    it (no unit file, not running) is not a unit."""
    return not (state.load_state == "not-found" and state.active_state == "inactive")


def _is_template(name: str) -> bool:
    return "@." in name


async def _disconnected(bus: MessageBus) -> None:
    """Returns when the bus connection is closed; raises (EOFError, OSError) when it broke."""
    await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]


def _error_text(reply: Message) -> str:
    return str(reply.body[0]) if reply.body and isinstance(reply.body[0], str) else ""


class _Entry:
    """What a watch (or one listing) knows of one unit: the raw properties, and the state last handed
    out. `pending` counts the reads in flight: a unit is only reported once they are all in."""

    __slots__ = ("last", "name", "pending", "service", "unit")

    def __init__(self, name: str) -> None:
        self.name = name
        self.unit: dict[str, Any] = {}
        self.service: dict[str, Any] | None = {} if name.endswith(".service") else None
        self.last: UnitState | None = None
        self.pending = 0

    def state(self) -> UnitState:
        return _build(self.name, self.unit, self.service)

    def props(self, interface: str) -> dict[str, Any] | None:
        if interface == UNIT:
            return self.unit
        if interface == SERVICE:
            return self.service
        return None


class _Conn:
    """One bus connection: `live` once it is subscribed and handed to callers."""

    __slots__ = ("bus", "live", "owner", "owner_changed")

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self.owner = ""  # systemd's unique name on this bus
        self.live = False
        self.owner_changed = False  # NameOwnerChanged for systemd seen since its owner was read


class _JobCall:
    """A job method call in flight: JobRemoved signals received before its reply are kept here."""

    __slots__ = ("fut", "path", "removed")

    def __init__(self, fut: asyncio.Future[str]) -> None:
        self.fut = fut
        self.path = ""
        self.removed: dict[str, str] = {}


# ---------------------------------------------------------------------------------------------------
# The adapter


class Systemd:
    """A connection to systemd's manager: `async with Systemd() as systemd: ...`.

    `bus_address` None means the system bus; otherwise a D-Bus address used as is ("unix:path=...").
    Every call gives up after `call_timeout` seconds (SystemdUnavailable), or at once while the bus is
    down. A job (start/stop/restart) must end within `call_timeout` of being requested (JobTimeout)."""

    def __init__(self, bus_address: str | None = None, *, call_timeout: float = 10.0,
                 backoff: Backoff | None = None) -> None:
        self.bus_address = bus_address
        self.call_timeout = call_timeout
        self._backoff = backoff if backoff is not None else Backoff(first=0.05, factor=2.0, cap=1.0)
        self._conn: _Conn | None = None
        self._hooks: dict[int, Callable[[Message], None]] = {}
        self._job_calls: set[_JobCall] = set()
        # Job path -> the callers waiting for it (systemd merges a job requested twice into one).
        self._job_waits: dict[str, list[asyncio.Future[str]]] = {}
        self._watches: list[UnitWatch] = []
        self._reloading = False
        self._supervisor: asyncio.Task[None] | None = None
        self._closed = False
        self.generation = 0  # bumped on every (re)connection
        self.reconnects = 0
        self.jobs_removed_before_reply = 0  # how often JobRemoved came before the job's reply

    # -- lifecycle

    async def __aenter__(self) -> Self:
        await self._connect()
        self._supervisor = asyncio.create_task(self._supervise(), name="systemd-connection")
        self._supervisor.add_done_callback(self._supervisor_done)
        return self

    def _supervisor_done(self, task: asyncio.Task[None]) -> None:
        for w in self._watches:
            w._wake.set()

    def _check_supervised(self) -> None:
        """Raise if the task that keeps the connection died: nothing would ever reconnect."""
        task = self._supervisor
        if task is not None and task.done() and not self._closed:
            error = None if task.cancelled() else task.exception()
            raise SystemdError(f"the systemd connection task ended: {error!r}")

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection; calls in flight fail, watches end. The supervisor is not cancelled
        while it waits on the connection (cancelling that wait would cancel dbus-fast's own
        disconnect future): the connection is closed under it, and it returns."""
        self._closed = True
        for w in self._watches:
            w._wake.set()
        conn = self._conn
        if conn is not None:
            self._lost(conn, "closed")
            conn.bus.disconnect()
        task, self._supervisor = self._supervisor, None
        if task is None:
            if conn is not None:  # never supervised: wait for the socket to close here
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2):
                        await _disconnected(conn.bus)
            return
        if conn is None:
            task.cancel()  # sleeping before a retry, or connecting (a half-made bus is closed)
        done, _ = await asyncio.wait({task}, timeout=2)
        if not done:
            task.cancel()
            await asyncio.wait({task})
        if not task.cancelled() and task.exception() is not None:
            log.error("systemd.supervisor_failed", error=repr(task.exception()))

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.live

    async def _supervise(self) -> None:
        """The one place the connection is watched and made again."""
        attempt = 0
        while True:
            conn = self._conn
            if conn is None and self._closed:
                return
            if conn is not None:
                # Covers both ways of going away: the bus closing, and systemd leaving it (the
                # message handler then closes the connection).
                try:
                    await _disconnected(conn.bus)
                except Exception as e:  # the bus went away under us (EOFError, OSError)
                    self._lost(conn, f"the bus connection broke: {e!r}")
                else:
                    self._lost(conn, "the bus connection closed")
                continue
            try:
                await self._connect()
            except SystemdError as e:  # the address worked before: whatever it is now, retry
                delay = self._backoff.delay(attempt, random.random())
                attempt += 1
                log.info("systemd.reconnect_failed", error=str(e), delay=round(delay, 3))
                await asyncio.sleep(delay)
            else:
                attempt = 0
                self.reconnects += 1
                log.info("systemd.reconnected", generation=self.generation)

    async def _connect(self) -> None:
        """Connect, add the handler and match rules, find systemd's owner, Subscribe; then go live
        and ask every watch to re-read its units."""
        try:
            bus = (MessageBus(bus_address=self.bus_address) if self.bus_address is not None
                   else MessageBus(bus_type=BusType.SYSTEM))
        except Exception as e:  # a malformed address, or no system bus address at all
            raise SystemdError(f"bad D-Bus address {self.bus_address!r}: {e}") from None
        try:
            async with asyncio.timeout(self.call_timeout):
                await bus.connect()
        except Exception as e:
            raise SystemdUnavailable(f"cannot connect to the bus: {e!r}") from None
        conn = _Conn(bus)
        bus.add_message_handler(lambda msg: self._on_message(conn, msg))
        try:
            for rule in _MATCH_RULES:
                await self._call_on(conn, Message(
                    destination=DBUS, path=DBUS_PATH, interface=DBUS, member="AddMatch",
                    signature="s", body=[rule]), "adding a match rule")

            def owner_read(_reply: Message) -> None:
                conn.owner_changed = False  # only changes after this reply count

            reply = await self._call_on(conn, Message(
                destination=DBUS, path=DBUS_PATH, interface=DBUS, member="GetNameOwner",
                signature="s", body=[SYSTEMD]), "looking for systemd on the bus", hook=owner_read)
            conn.owner = str(reply.body[0])
            await self._call_on(conn, self._manager_msg("Subscribe"), "subscribing")
            if conn.owner_changed:
                raise SystemdUnavailable("systemd left the bus while subscribing")
        except BaseException:
            bus.disconnect()
            raise
        conn.live = True
        self._conn = conn
        self._reloading = False
        self.generation += 1
        log.info("systemd.connected", generation=self.generation, owner=conn.owner)
        for w in self._watches:
            w._request_resync("reconnected")

    def _lost(self, conn: _Conn, reason: str) -> None:
        """The connection is no longer usable: calls and jobs in flight fail, watches wait for the
        next connection and re-read everything then."""
        if self._conn is not conn:
            return
        self._conn = None
        conn.live = False
        if reason != "closed":
            log.warning("systemd.lost", reason=reason)
        err = SystemdUnavailable(f"lost systemd: {reason}")
        for futs in self._job_waits.values():
            for fut in futs:
                if not fut.done():
                    fut.set_exception(err)
        self._job_waits.clear()
        for w in self._watches:
            w._wake.set()

    # -- messages

    def _on_message(self, conn: _Conn, msg: Message) -> None:
        """Every message received on `conn`, in order, at the moment it is read."""
        mt = msg.message_type
        if mt is not MessageType.SIGNAL:
            if mt is MessageType.METHOD_RETURN or mt is MessageType.ERROR:
                hook = self._hooks.pop(msg.reply_serial, None)
                if hook is not None:
                    hook(msg)
            return
        if msg.member == "NameOwnerChanged":
            self._on_owner_changed(conn, msg)
            return
        if not conn.live or msg.sender != conn.owner:
            return
        handler = self._signal_handlers.get(msg.member)
        if handler is not None:
            handler(self, msg)

    def _on_owner_changed(self, conn: _Conn, msg: Message) -> None:
        if msg.sender == DBUS and msg.body and msg.body[0] == SYSTEMD:
            conn.owner_changed = True
            if conn.live and msg.body[2] != conn.owner:
                self._lost(conn, "systemd left the bus" if not msg.body[2] else "systemd changed")
                conn.bus.disconnect()  # the supervisor connects again and re-subscribes

    def _on_properties_changed(self, msg: Message) -> None:
        path = msg.path
        if path and path.startswith(UNIT_PATH_PREFIX) and self._watches:
            interface, changed, invalidated = msg.body
            now = asyncio.get_running_loop().time()
            for w in self._watches:
                w._on_properties(path, interface, changed, invalidated, now)

    def _on_job_removed(self, msg: Message) -> None:
        _id, job, _unit, result = msg.body
        for fut in self._job_waits.pop(job, ()):
            if not fut.done():
                fut.set_result(result)
        for call in self._job_calls:
            call.removed[job] = result

    def _on_unit_new(self, msg: Message) -> None:
        if not self._reloading:
            name, path = msg.body
            for w in self._watches:
                w._on_unit_new(name, path)

    def _on_reloading(self, msg: Message) -> None:
        self._reloading = bool(msg.body[0])
        if not self._reloading:
            for w in self._watches:
                w._request_resync("reloaded")

    # The manager's signals from its current owner, by member.
    _signal_handlers: ClassVar[dict[str | None, Callable[[Systemd, Message], None]]] = {
        "PropertiesChanged": _on_properties_changed,
        "JobRemoved": _on_job_removed,
        "UnitNew": _on_unit_new,
        "Reloading": _on_reloading,
    }

    def _manager_msg(self, member: str, signature: str = "", body: Sequence[Any] = ()) -> Message:
        return Message(destination=SYSTEMD, path=MANAGER_PATH, interface=MANAGER, member=member,
                       signature=signature, body=list(body), flags=MessageFlag.NO_AUTOSTART)

    async def _call(self, msg: Message, what: str, *, unit: str | None = None,
                    hook: Callable[[Message], None] | None = None) -> Message:
        conn = self._conn
        if conn is None or not conn.live:
            self._check_supervised()
            raise SystemdUnavailable(f"{what}: not connected to systemd")
        return await self._call_on(conn, msg, what, unit=unit, hook=hook)

    async def _call_on(self, conn: _Conn, msg: Message, what: str, *, unit: str | None = None,
                       hook: Callable[[Message], None] | None = None) -> Message:
        """One method call with a deadline. `hook` runs on the reply (or error) at the moment it is
        received, in order with the signals around it, before this coroutine resumes."""
        bus = conn.bus
        if not bus.connected:
            raise SystemdUnavailable(f"{what}: the bus connection is closed")
        msg.serial = bus.next_serial()
        if hook is not None:
            self._hooks[msg.serial] = hook
        try:
            async with asyncio.timeout(self.call_timeout):
                reply = await bus.call(msg)
        except TimeoutError:
            # A manager that does not answer is as good as gone: drop the connection, so that the
            # supervisor makes a new one and every watch re-reads its units once it answers again.
            if conn.live:
                self._lost(conn, f"no answer to {what} within {self.call_timeout:g}s")
                bus.disconnect()
            raise SystemdUnavailable(f"{what}: no answer within {self.call_timeout:g}s") from None
        except Exception as e:  # the connection broke while waiting (EOFError, OSError)
            raise SystemdUnavailable(f"{what}: {e!r}") from None
        finally:
            if hook is not None:
                self._hooks.pop(msg.serial, None)
        if reply.message_type is MessageType.ERROR:
            name = reply.error_name or ""
            text = _error_text(reply)
            if name in _UNAVAILABLE_ERRORS:
                raise SystemdUnavailable(f"{what}: {text or name}")
            if unit is not None and name in _LOAD_ERRORS:
                raise UnitNotLoadable(unit, _LOAD_ERRORS[name], text)
            raise SystemdError(f"{what}: {name}: {text}")
        return reply

    # -- reading units

    async def _load(self, name: str) -> str:
        reply = await self._call(self._manager_msg("LoadUnit", "s", [name]), f"loading {name}", unit=name)
        return str(reply.body[0])

    async def _read_into(self, path: str, entry: _Entry, current: Callable[[], bool]) -> None:
        """GetAll of the Unit (and Service) interface into `entry`, each applied on receipt while
        `current()` still holds."""
        for interface in [UNIT] if entry.service is None else [UNIT, SERVICE]:
            def apply(reply: Message, interface: str = interface) -> None:
                if current() and reply.message_type is MessageType.METHOD_RETURN:
                    props = entry.props(interface)
                    if props is not None:
                        _merge(props, reply.body[0], _WANTED[interface])

            msg = Message(destination=SYSTEMD, path=path, interface=PROPERTIES, member="GetAll",
                          signature="s", body=[interface], flags=MessageFlag.NO_AUTOSTART)
            entry.pending += 1  # signals are merged meanwhile, but the unit is not reported
            try:
                await self._call(msg, f"reading {entry.name}", unit=entry.name, hook=apply)
            finally:
                entry.pending -= 1

    async def _list(self, patterns: tuple[str, ...]) -> dict[str, str]:
        """Object path -> name of every unit matching `patterns`: those loaded, and the unit files
        not loaded yet (which LoadUnit loads)."""
        if not patterns:
            return {}
        found: dict[str, str] = {}
        reply = await self._call(self._manager_msg("ListUnitsByPatterns", "asas", [[], list(patterns)]),
                                 "listing units")
        for row in reply.body[0]:
            name, path = str(row[0]), str(row[6])
            if matches(name, patterns):
                found[path] = name
        loaded = set(found.values())
        reply = await self._call(
            self._manager_msg("ListUnitFilesByPatterns", "asas", [[], list(patterns)]), "listing unit files")
        for file_path, _file_state in reply.body[0]:
            name = str(file_path).rsplit("/", 1)[-1]
            if (name in loaded or _is_template(name) or not valid_unit_name(name)
                    or not matches(name, patterns)):
                continue
            try:
                path = await self._load(name)
            except UnitNotLoadable:
                continue
            found.setdefault(path, name)
            loaded.add(name)
        return found

    async def unit(self, name: str) -> UnitState:
        """The unit's state as systemd has it now (loading it if needed). `name` in the result is the
        unit's own id (an alias resolves to the unit it names). Raises UnitNotLoadable when the unit
        has no unit file, a bad setting, or is masked."""
        parse_unit_name(name, "unit name")
        path = await self._load(name)
        entry = _Entry(name)
        await self._read_into(path, entry, lambda: True)
        state = entry.state()
        if state.load_state in NOT_LOADABLE:
            raise UnitNotLoadable(name, state.load_state)
        return state

    async def units(self, patterns: Sequence[str]) -> list[UnitState]:
        """Every unit matching the fnmatch `patterns`, loaded or with a unit file never loaded yet,
        sorted by name."""
        out: list[UnitState] = []
        for path, name in (await self._list(tuple(patterns))).items():
            entry = _Entry(name)
            await self._read_into(path, entry, lambda: True)
            state = entry.state()
            if _keep(state):
                out.append(state)
        return sorted(out, key=lambda s: s.name)

    # -- jobs

    async def start(self, name: str) -> str:
        return await self._job("StartUnit", "start", name)

    async def stop(self, name: str) -> str:
        return await self._job("StopUnit", "stop", name)

    async def restart(self, name: str) -> str:
        return await self._job("RestartUnit", "restart", name)

    async def _job(self, method: str, job_type: str, name: str) -> str:
        """Queue a job with mode "replace" and wait for its JobRemoved. Interest in JobRemoved is
        registered before the call is sent: the signal may come before the reply."""
        parse_unit_name(name, "unit name")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.call_timeout
        call = _JobCall(loop.create_future())

        def queued(reply: Message) -> None:  # on receipt of the reply, in order with the signals
            self._job_calls.discard(call)
            if reply.message_type is not MessageType.METHOD_RETURN:
                return
            call.path = str(reply.body[0])
            if call.path in call.removed:
                self.jobs_removed_before_reply += 1
                call.fut.set_result(call.removed[call.path])
            else:
                self._job_waits.setdefault(call.path, []).append(call.fut)
            call.removed.clear()

        self._job_calls.add(call)
        try:
            await self._call(self._manager_msg(method, "ss", [name, "replace"]),
                             f"{job_type} {name}", unit=name, hook=queued)
            try:
                async with asyncio.timeout_at(deadline):
                    result = await call.fut
            except TimeoutError:
                raise JobTimeout(name, job_type, call.path, self.call_timeout) from None
        finally:
            self._job_calls.discard(call)
            waiting = self._job_waits.get(call.path)
            if waiting is not None and call.fut in waiting:
                waiting.remove(call.fut)
                if not waiting:
                    del self._job_waits[call.path]
            if call.fut.done() and not call.fut.cancelled():
                call.fut.exception()  # retrieved: never "exception was never retrieved"
            else:
                call.fut.cancel()
        if result != "done":
            raise JobFailed(name, job_type, result)
        return result

    async def reset_failed(self, name: str) -> None:
        """Forget a unit's failed state (and its start rate limit). A unit that is not loaded or not
        failed is fine."""
        parse_unit_name(name, "unit name")
        with contextlib.suppress(UnitNotLoadable):
            await self._call(self._manager_msg("ResetFailedUnit", "s", [name]), f"resetting {name}",
                             unit=name)

    async def daemon_reload(self) -> None:
        """Reload every unit file; systemd answers once the reload is done. Watches then re-read
        their units (UnitsResync with reason "reloaded")."""
        await self._call(self._manager_msg("Reload"), "reloading systemd")

    # -- watches

    def watch(self, patterns: Sequence[str]) -> UnitWatch:
        return UnitWatch(self, tuple(patterns))


# ---------------------------------------------------------------------------------------------------
# Watch


class UnitWatch:
    """`async with systemd.watch(["app-*.service"]) as w: async for item in w: ...`

    Yields a `UnitsResync` of every matching unit first, and again after every reconnect and
    daemon-reload; in between, a `UnitChanged` each time a matching unit's state changes (or a
    matching unit appears). It runs in the consumer's task: no task of its own, no polling. While the
    bus is down it yields nothing; the next item is then the resync with reason "reconnected". It
    ends (StopAsyncIteration) when the Systemd object is closed."""

    def __init__(self, systemd: Systemd, patterns: tuple[str, ...]) -> None:
        self._sd = systemd
        self.patterns = patterns
        self._entries: dict[str, _Entry] = {}  # object path -> unit
        self._queue: deque[UnitItem] = deque()
        self._wake = asyncio.Event()
        self._resync: ResyncReason | None = "start"
        self._syncing = False
        self._new: dict[str, str] = {}  # path -> name of matching units that appeared
        self._stale: dict[str, set[str]] = {}  # path -> interfaces whose properties were invalidated
        self.signals = 0  # PropertiesChanged signals handled for watched units
        self.changes = 0  # UnitChanged items queued
        self.resyncs = 0

    async def __aenter__(self) -> Self:
        self._sd._watches.append(self)
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self in self._sd._watches:
            self._sd._watches.remove(self)

    def __aiter__(self) -> Self:
        return self

    # -- called from the connection's message handler: synchronous and cheap

    def _request_resync(self, reason: ResyncReason) -> None:
        if self._resync is None or _REASON_RANK[reason] > _REASON_RANK[self._resync]:
            self._resync = reason
        self._wake.set()

    def _on_properties(self, path: str, interface: str, changed: dict[str, Variant],
                       invalidated: list[str], now: float) -> None:
        entry = self._entries.get(path)
        if entry is None:
            return
        props = entry.props(interface)
        if props is None:
            return
        self.signals += 1
        wanted = _WANTED[interface]
        _merge(props, changed, wanted)
        if invalidated and any(name in wanted for name in invalidated):
            # Only the names came: read that interface again before reporting the unit.
            stale = self._stale.setdefault(path, set())
            if interface not in stale:
                stale.add(interface)
                entry.pending += 1
            self._wake.set()
            return
        # systemd sends the Service interface's signal first and the Unit interface's right after
        # (dbus-unit.c: "clients may rely on this order to get atomic behavior"): report on the second,
        # so that a consumer never sees a state that was never systemd's (dead process, unit active).
        if interface == UNIT:
            self._report(entry, now)

    def _on_unit_new(self, name: str, path: str) -> None:
        if path not in self._entries and path not in self._new and matches(name, self.patterns):
            self._new[path] = name
            self._wake.set()

    def _report(self, entry: _Entry, now: float) -> None:
        if self._syncing or entry.pending:
            return
        state = entry.state()
        if state != entry.last:
            entry.last = state
            self.changes += 1
            self._queue.append(UnitChanged(state, now))
            self._wake.set()

    # -- the consumer's side

    async def __anext__(self) -> UnitItem:
        sd = self._sd
        while True:
            if sd._closed:
                raise StopAsyncIteration
            sd._check_supervised()
            if sd.connected:
                if self._resync is not None:
                    item = await self._do_resync()
                    if item is not None:
                        return item
                    continue
                if self._queue:
                    return self._queue.popleft()
                if self._stale or self._new:
                    await self._read_pending()
                    continue
            elif self._resync is None and self._queue:
                return self._queue.popleft()  # changes seen before the connection was lost
            await self._wake.wait()
            self._wake.clear()

    async def _do_resync(self) -> UnitsResync | None:
        """List and read every matching unit. None when superseded (the connection was lost or
        made again, or the manager reloaded meanwhile): the caller tries again."""
        assert self._resync is not None
        reason, self._resync = self._resync, None
        sd = self._sd
        generation = sd.generation
        self._syncing = True
        try:
            found = await sd._list(self.patterns)
            entries = {path: _Entry(name) for path, name in found.items()}
            self._entries = entries  # signals from here on merge into these
            self._stale.clear()
            for path, entry in entries.items():
                await sd._read_into(path, entry, lambda: self._entries is entries)
        except SystemdUnavailable as e:
            log.info("systemd.watch.resync_failed", error=str(e))
            self._request_resync(reason)
            return None
        finally:
            self._syncing = False
        if self._resync is not None or sd.generation != generation:
            self._request_resync(reason)
            return None
        states: list[UnitState] = []
        for path, entry in list(entries.items()):
            state = entry.state()
            if not _keep(state):
                del entries[path]
                continue
            entry.last = state
            states.append(state)
        for path in list(self._new):
            if path in entries:
                del self._new[path]
        self._queue.clear()  # older than this listing
        self.resyncs += 1
        return UnitsResync(tuple(sorted(states, key=lambda s: s.name)), reason)

    async def _read_pending(self) -> None:
        """Read what signals could not give: units that appeared, and invalidated properties."""
        sd = self._sd
        loop = asyncio.get_running_loop()
        entries = self._entries
        try:
            while self._stale:
                path, interfaces = self._stale.popitem()
                entry = entries.get(path)
                if entry is None:
                    continue
                entry.pending -= len(interfaces)
                await sd._read_into(path, entry, lambda: self._entries is entries)
                self._report(entry, loop.time())
            while self._new:
                path, name = self._new.popitem()
                if path in entries:
                    continue
                entry = _Entry(name)
                entries[path] = entry
                await sd._read_into(path, entry, lambda: self._entries is entries)
                if not _keep(entry.state()):
                    del entries[path]
                    continue
                self._report(entry, loop.time())
        except SystemdUnavailable as e:
            log.info("systemd.watch.read_failed", error=str(e))  # a resync follows the reconnect
        except SystemdError as e:
            log.warning("systemd.watch.read_failed", error=str(e))
