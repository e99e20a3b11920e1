"""HAProxy: Norm's own small typed interface over HAProxy's Runtime API, on its unix stats socket.

HAProxy must expose the socket with `stats socket PATH mode 600 level admin` (in its `global`
section): state changes need the admin level.

What this adds to writing commands to a socket:
- one command per connection (HAProxy answers, then closes it), each bounded by `call_timeout`;
- errors that say what to do: HaproxyUnavailable (the socket is missing, refuses connections, or
  HAProxy did not answer in time: retry later) or HaproxyRejected (HAProxy refused the command: no such
  backend, no such server, permission denied, anything else it answers instead of doing it: permanent
  until the configuration changes);
- `servers()`: `show servers state BACKEND` parsed into frozen ServerState values, the administrative
  state decoded from its bit mask the way HAProxy itself does (maintenance wins over drain);
- `current_sessions()`: the server's `scur` in `show stat`;
- `wait_drained()`: drain, wait (polling with a backoff, within a bound) for the server's sessions to
  end, then maintenance. A server already in maintenance is not drained: HAProxy's `state drain`
  takes a server out of maintenance into drain.

Backend and server names are checked before they go into a command: a name with a space or a newline
would change the command.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import re
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

import structlog

from norm.core.backoff import Backoff
from norm.core.errors import NormError, Permanent, Temporary

log = structlog.get_logger("norm.haproxy")

AdminState = Literal["ready", "drain", "maint"]
OperationalState = Literal["down", "starting", "up", "stopping"]
ADMIN_STATES: tuple[AdminState, ...] = ("ready", "drain", "maint")

# srv_admin_state is a mask (HAProxy's enum srv_admin): forced, inherited and resolution maintenance
# make a server MAINT; forced and inherited drain make it DRAIN; the configuration's `disabled` (0x04)
# alone does not keep a server out once it was set ready.
_MAINT_MASK = 0x01 | 0x02 | 0x20
_DRAIN_MASK = 0x08 | 0x10
# srv_op_state (HAProxy's enum srv_state)
_OPERATIONAL: dict[int, OperationalState] = {0: "down", 1: "starting", 2: "up", 3: "stopping"}

NAME = re.compile(r"[A-Za-z0-9_.:-]{1,255}")  # what HAProxy accepts in proxy and server names
_MAX_MESSAGE = 300


class HaproxyError(NormError):
    """A command on HAProxy's Runtime API failed. `command` is the command sent."""

    def __init__(self, message: str, *, command: str) -> None:
        super().__init__(message)
        self.command = command


class HaproxyUnavailable(HaproxyError, Temporary):
    """The socket is missing or refuses connections, or HAProxy did not answer in time. Retry later."""


class HaproxyRejected(HaproxyError, Permanent):
    """HAProxy refused the command (no such backend or server, permission denied, a malformed
    command): permanent until the configuration changes."""


@dataclass(frozen=True)
class ServerState:
    """One server of a backend, as `show servers state` reports it."""

    backend: str
    name: str
    admin: AdminState
    operational: OperationalState
    address: str
    port: int | None
    weight: int  # the user-visible weight (srv_uweight)
    admin_flags: int = 0  # the raw srv_admin_state mask

    @property
    def ready(self) -> bool:
        """In service as far as the administrative state goes: neither draining nor in maintenance."""
        return self.admin == "ready"


def admin_state(mask: int) -> AdminState:
    """The administrative state a srv_admin_state mask means."""
    if mask & _MAINT_MASK:
        return "maint"
    if mask & _DRAIN_MASK:
        return "drain"
    return "ready"


def check_name(what: str, name: str) -> None:
    """Refuse a backend or server name that HAProxy would not have (or that would change the command)."""
    if not NAME.fullmatch(name):
        raise HaproxyRejected(f"{what} name must be letters, digits and - _ . : (1 to 255 of them)",
                              command="")


def parse_servers_state(text: str, backend: str, command: str = "show servers state"
                        ) -> tuple[ServerState, ...]:
    """The servers of `backend` in the answer to `show servers state BACKEND` (format version 1:
    a version line, a header line naming the columns, one line per server)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < 2 or lines[0].strip() != "1" or not lines[1].startswith("# "):
        raise _refusal(command, text)
    columns = lines[1][2:].split()
    try:
        at = {name: columns.index(name) for name in ("be_name", "srv_name", "srv_addr", "srv_op_state",
                                                      "srv_admin_state", "srv_uweight")}
    except ValueError:
        raise HaproxyRejected(f"{command}: unexpected columns", command=command) from None
    port_at = columns.index("srv_port") if "srv_port" in columns else None
    servers: list[ServerState] = []
    for line in lines[2:]:
        fields = line.split()
        if len(fields) < len(columns) or fields[at["be_name"]] != backend:
            continue
        try:
            mask = int(fields[at["srv_admin_state"]])
            op = int(fields[at["srv_op_state"]])
            port = int(fields[port_at]) if port_at is not None and fields[port_at] not in ("-", "0") else None
            weight = int(fields[at["srv_uweight"]])
        except ValueError:
            raise HaproxyRejected(f"{command}: a server line that is not numbers where they belong",
                                  command=command) from None
        servers.append(ServerState(backend=backend, name=fields[at["srv_name"]], admin=admin_state(mask),
                                   operational=_OPERATIONAL.get(op, "down"), address=fields[at["srv_addr"]],
                                   port=port, weight=weight, admin_flags=mask))
    return tuple(servers)


def parse_stat(text: str, command: str = "show stat") -> list[dict[str, str]]:
    """The rows of `show stat` (CSV whose header line starts with "# ")."""
    if not text.startswith("# "):
        raise _refusal(command, text)
    lines = [line for line in text[2:].splitlines() if line.strip()]
    return list(csv.DictReader(lines))


def _refusal(command: str, text: str) -> HaproxyRejected:
    message = " ".join(text.split())[:_MAX_MESSAGE] or "an empty answer"
    return HaproxyRejected(f"{command}: {message}", command=command)


class Haproxy:
    """`async with Haproxy("/run/haproxy/admin.sock") as h: await h.set_state("web", "host1", "ready")`.

    Every command gives up after `call_timeout` seconds (HaproxyUnavailable). `wait_drained` polls the
    server's sessions with a backoff from `poll_first` up to `poll_interval` seconds."""

    def __init__(self, socket_path: str, *, call_timeout: float = 5.0, poll_interval: float = 1.0,
                 poll_first: float = 0.05) -> None:
        self.socket_path = socket_path
        self.call_timeout = call_timeout
        self.poll = Backoff(first=min(poll_first, poll_interval), factor=2.0, cap=poll_interval, jitter=0.0)

    async def __aenter__(self) -> Self:
        return self  # nothing held open: one connection per command

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        pass

    # -- the interface

    async def set_state(self, backend: str, server: str, state: AdminState) -> None:
        """Put the server in `state`: ready (in service), drain (no new sessions; those it has go on)
        or maint (out). Idempotent."""
        if state not in ADMIN_STATES:
            raise ValueError(f"state must be one of {', '.join(ADMIN_STATES)}")
        check_name("backend", backend)
        check_name("server", server)
        command = f"set server {backend}/{server} state {state}"
        answer = await self.command(command)
        if answer.strip():
            raise _refusal(command, answer)

    async def servers(self, backend: str) -> tuple[ServerState, ...]:
        """Every server of the backend, in its configured order."""
        check_name("backend", backend)
        command = f"show servers state {backend}"
        return parse_servers_state(await self.command(command), backend, command)

    async def server(self, backend: str, server: str) -> ServerState:
        """One server of the backend; HaproxyRejected when there is no such server."""
        check_name("server", server)
        for s in await self.servers(backend):
            if s.name == server:
                return s
        raise HaproxyRejected(f"show servers state {backend}: No such server: {server}",
                              command=f"show servers state {backend}")

    async def current_sessions(self, backend: str, server: str) -> int:
        """The server's current sessions (`scur` in `show stat`)."""
        check_name("backend", backend)
        check_name("server", server)
        command = f"show stat {backend} 4 -1"  # the servers of that proxy only
        for row in parse_stat(await self.command(command), command):
            if row.get("pxname") == backend and row.get("svname") == server:
                try:
                    return int(row.get("scur") or 0)
                except ValueError:
                    raise HaproxyRejected(f"{command}: scur is not a number", command=command) from None
        raise HaproxyRejected(f"{command}: No such server: {server}", command=command)

    async def drain(self, backend: str, server: str) -> AdminState:
        """Put the server in drain unless it is in maintenance already (which `state drain` would take
        it out of); the state it was in."""
        was = (await self.server(backend, server)).admin
        if was != "maint":
            await self.set_state(backend, server, "drain")
        return was

    async def wait_drained(self, backend: str, server: str, *, within: float) -> bool:
        """Put the server in drain (unless it is in maintenance), wait until its sessions have ended,
        then put it in maintenance: True. False when `within` seconds passed first (the server is left
        draining). A HAProxy that does not answer meanwhile is asked again until then; a refusal is
        raised."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        attempt = 0
        drained_set = False
        while True:
            try:
                # The first try has its whole call timeout, even with no time left to wait.
                async with asyncio.timeout_at(None if attempt == 0 else deadline):
                    if not drained_set:
                        await self.drain(backend, server)
                        drained_set = True
                    sessions = await self.current_sessions(backend, server)
                    if sessions == 0:
                        await self.set_state(backend, server, "maint")
                        return True
            except HaproxyUnavailable as e:
                log.info("haproxy.drain_check_failed", backend=backend, server=server, error=str(e))
            except TimeoutError:
                return False
            left = deadline - loop.time()
            if left <= 0:
                return False
            await asyncio.sleep(min(self.poll.delay(attempt), left))
            attempt += 1

    # -- the socket

    async def command(self, command: str) -> str:
        """Send one command and return HAProxy's whole answer (it closes the connection after it)."""
        if "\n" in command or "\r" in command:
            raise ValueError("one command, without newlines")
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self.call_timeout):
                reader, writer = await asyncio.open_unix_connection(self.socket_path)
                writer.write(command.encode() + b"\n")
                await writer.drain()
                answer = await reader.read()
        except TimeoutError:
            raise HaproxyUnavailable(f"{command}: no answer within {self.call_timeout:g}s",
                                     command=command) from None
        except FileNotFoundError:
            raise HaproxyUnavailable(f"{command}: no socket at {self.socket_path}", command=command) from None
        except PermissionError:
            raise HaproxyRejected(f"{command}: permission denied on {self.socket_path}",
                                  command=command) from None
        except OSError as e:  # refused (nothing listens), reset
            raise HaproxyUnavailable(f"{command}: {type(e).__name__} on {self.socket_path}",
                                     command=command) from None
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        return answer.decode(errors="replace")
