"""Operator requests for this host, written to etcd by the `norm` CLI and carried out by the agent:

- `<prefix>/control/<machine-id>/hold/<unit>`: while the key exists the unit is held (stopped on
  purpose, never healed); putting it stops the unit, deleting it starts the unit again (the hold
  ends once the unit is started, so that healing never races the start; a unit an update holds too
  is started once the update lets go of it).
- `<prefix>/control/<machine-id>/start/<unit>`: start the unit again (the CLI writes it as it deletes
  the hold, in one transaction); the agent deletes the key once the unit is started.
- `<prefix>/control/<machine-id>/release/<unit>`: lift a unit's quarantine (`norm heal lift`); the
  agent deletes the key once done (the lift written to the healing state file first), which is the
  CLI's acknowledgement. The key keeps its name `release/` (what is in etcd does not change).

Requests travel through etcd (authenticated, audited, visible) rather than a local socket, and a
request made while the agent was down is carried out when it comes back.

A request whose action fails (the bus is down, systemd refuses or times out, the healing state cannot
be written, etcd does not take the acknowledgement) is not dropped: it is tried again with backoff
until it is done or another request replaces it, and meanwhile each failure is logged
(`control.action_failed`), the request is counted in `norm_control_pending` and shown, with its last
error, in the host's unit summary in etcd (`norm units`). The one exception: a start job that fails
and leaves the unit failed hands the unit to healing, whose regimen, budget and quarantine take over
(`control.start_failed`)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from norm.adapters.etcd import EtcdError, Event, KeyValue, Resync
from norm.adapters.systemd import JobFailed, Systemd, SystemdError
from norm.core.backoff import Backoff
from norm.core.errors import InvalidValue
from norm.core.host import control_prefix
from norm.core.units import matches, parse_unit_name
from norm.services.base import Retry, first_of, wake_or_deadline
from norm.services.context import HostContext
from norm.services.healer import Healer
from norm.services.holds import OPERATOR

log = structlog.get_logger("norm.control")

__all__ = ["OPERATOR", "Control", "control_prefix"]
# The requests' kinds as their keys name them (`<prefix>/control/<machine-id>/<kind>/<unit>`): names on
# the wire, kept as they are. A quarantine's lift is asked under `release/`, and a pending one is shown
# in the unit summary as the action "release".
HOLD, START, LIFT = "hold", "start", "release"
KINDS = (HOLD, START, LIFT)
RETRY = Backoff(first=0.5, factor=2.0, cap=30.0, jitter=0.2)
DEFERRED_RECHECK = 60.0  # seconds: a deferred start looks again at the latest this late


class _Deferred(Exception):
    """A start that must wait for another owner's hold to end (not a failure)."""


@dataclass(eq=False)
class _Action:
    """An operator's request for one unit that is not carried out yet."""

    action: str  # "stop", START or LIFT
    unit: str
    key: str | None = None  # the request's key, deleted once done (start and lift)
    retry: Retry = field(default_factory=lambda: Retry(RETRY))  # its failed tries so far
    next_at: float = 0.0  # no try before this time (the loop's clock)
    error: str | None = None  # the last failure
    lifted: bool = False  # lift: the healer has lifted the quarantine
    # START: the operator's hold ends once the unit is started, not before: until then the healer
    # leaves the unit (failed, as a stopped `docker run` is) alone, instead of racing to start it.
    unhold: bool = False
    deferred: bool = False  # START: an update holds the unit too; tried again once the holds change

    @property
    def attempts(self) -> int:
        return self.retry.failures

    @property
    def slot(self) -> tuple[str, str]:
        """At most one action is pending per slot: a unit's stop or start, and its quarantine's lift."""
        return ("lift" if self.action == LIFT else "unit", self.unit)


class Control:
    name = "control"

    def __init__(self, host: HostContext, systemd: Systemd, healer: Healer) -> None:
        self._etcd = host.etcd
        self.prefix = host.control_prefix
        self._systemd = systemd
        self._healer = healer
        self._holds = host.holds
        self._metrics = host.metrics
        # At most one pending action per unit for stop/start ("unit") and one lift ("lift").
        self._pending: dict[tuple[str, str], _Action] = {}
        self._kick = asyncio.Event()
        self._holds.subscribe(self._holds_changed)

    async def run(self, stopping: asyncio.Event) -> None:
        await first_of(stopping=stopping.wait(), follow=self._follow(), act=self._act_loop())

    # -- requests, as etcd says them

    async def _follow(self) -> None:
        async with self._etcd.watch(self.prefix, prefix=True) as w:
            async for item in w:
                if isinstance(item, Resync):
                    self._resync(item.snapshot.kvs)
                elif isinstance(item, Event):
                    self._on_event(item)

    def _resync(self, kvs: Sequence[KeyValue]) -> None:
        """Every request there is, after a (re-)list: the operator's holds become those listed."""
        wanted = set()
        for kv in kvs:
            request = self._parse(kv.key)
            if request and request[0] == HOLD:
                wanted.add(request[1])
            elif request and request[0] == START:
                self._start(request[1], kv.key)
            elif request:
                self._lift(request[1], kv.key)
        current = {u for u in self._holds.held() if OPERATOR in self._holds.owners(u)}
        for unit in sorted(wanted - current):
            self._hold(unit)
        for unit in sorted(current - wanted):
            self._unhold(unit)
        self._holds.operator_known.set()

    def _on_event(self, event: Event) -> None:
        request = self._parse(event.kv.key)
        if request is None:
            return
        kind, unit = request
        if kind == HOLD and event.kind == "put":
            self._hold(unit)
        elif kind == HOLD:
            self._unhold(unit)
        elif event.kind == "put" and kind == START:
            self._start(unit, event.kv.key)
        elif event.kind == "put":
            self._lift(unit, event.kv.key)

    def _parse(self, key: str) -> tuple[str, str] | None:
        kind, _, unit = key[len(self.prefix):].partition("/")
        try:
            if kind not in KINDS:
                raise InvalidValue(key, f"not a request Norm knows ({HOLD}/<unit>, {START}/<unit> or "
                                        f"{LIFT}/<unit>)")
            parse_unit_name(unit, key)
            if not matches(unit, self._healer.patterns):
                raise InvalidValue(key, "not a unit this agent manages (see units.patterns)")
        except InvalidValue as e:
            self._metrics.rejected_values.labels(self.prefix).inc()
            log.error("control.rejected", key=key, reason=e.reason)
            return None
        return kind, unit

    def _holds_changed(self) -> None:
        """A start waiting for an update's hold to end is tried again."""
        for action in self._pending.values():
            if action.deferred:
                action.next_at = 0.0
                self._kick.set()

    def _want(self, action: _Action) -> None:
        old = self._pending.get(action.slot)
        if old is not None and old.action == action.action and old.key == action.key:
            return  # the same request seen again (a re-list): its retries go on as they were
        self._pending[action.slot] = action
        self._report(action.unit)
        self._kick.set()

    def _hold(self, unit: str) -> None:
        self._holds.hold(unit, OPERATOR)
        log.info("unit.held", unit=unit, by=OPERATOR)
        self._want(_Action("stop", unit))

    def _unhold(self, unit: str) -> None:
        """The operator's hold is gone: the unit starts, and the hold ends once it has."""
        pending = self._pending.get(("unit", unit))
        if pending is not None and pending.action == START:
            pending.unhold = True  # a start request (start/<unit>) is on its way already
            return
        self._want(_Action(START, unit, unhold=True))

    def _start(self, unit: str, key: str) -> None:
        """A start request: the unit starts, then the operator's hold ends; the key goes once it has."""
        self._want(_Action(START, unit, key=key, unhold=True))

    def _let_go(self, unit: str) -> None:
        if OPERATOR in self._holds.owners(unit):
            self._holds.unhold(unit, OPERATOR)
            log.info("unit.unheld", unit=unit, by=OPERATOR)

    def _lift(self, unit: str, key: str) -> None:
        """A request to lift the unit's quarantine: the key goes once the lift is saved."""
        self._want(_Action(LIFT, unit, key=key))

    # -- carrying them out

    async def _act_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._kick.clear()
            for action in sorted((a for a in self._pending.values() if a.next_at <= loop.time()),
                                 key=lambda a: (a.unit, a.action)):
                if self._current(action):
                    await self._try(action)
            await wake_or_deadline(self._kick, min((a.next_at for a in self._pending.values()),
                                                   default=None))

    def _current(self, action: _Action) -> bool:
        return self._pending.get(action.slot) is action

    async def _try(self, action: _Action) -> None:
        unit = action.unit
        try:
            await self._carry_out(action)
            if action.key is not None and self._current(action):
                await self._etcd.delete(action.key)
        except _Deferred:
            return
        except asyncio.CancelledError:
            raise
        except (SystemdError, EtcdError, OSError) as e:
            if self._current(action):
                self._failed(action, e)
            return
        if self._current(action):
            if action.attempts:
                log.info("control.action_done", unit=unit, action=action.action,
                         after_failures=action.attempts)
            self._done(action)

    async def _carry_out(self, action: _Action) -> None:
        unit = action.unit
        if action.action == "stop":
            await self._systemd.stop(unit)
        elif action.action == START:
            others = self._holds.owners(unit) - ({OPERATOR} if action.unhold else set())
            if others:
                # An update holds it too: started once the update lets go (the update may have started
                # the fleet's units while this one was still the operator's, and left it stopped).
                if not action.deferred:
                    log.info("control.start_deferred", unit=unit, reason="held by an update",
                             owners=sorted(others))
                action.deferred = True
                action.next_at = asyncio.get_running_loop().time() + DEFERRED_RECHECK
                raise _Deferred
            action.deferred = False
            await self._start_unit(action)
            if action.unhold and self._current(action):  # not if held again meanwhile
                self._let_go(unit)
        else:
            if not action.lifted:
                was = self._healer.lift(unit)
                action.lifted = True
                log.info("heal.lift", unit=unit, was_quarantined=was)
            # The lift lasts (a restarted agent must not take the quarantine up again) before the
            # operator is told it is done.
            await self._healer.save_state()

    async def _start_unit(self, action: _Action) -> None:
        unit = action.unit
        await self._systemd.reset_failed(unit)
        try:
            await self._systemd.start(unit)
        except JobFailed as e:
            state = await self._systemd.unit(unit)
            if not state.failed:
                raise
            # The unit failed as it started: healing's regimen, budget and quarantine take over.
            log.error("control.start_failed", unit=unit, error=str(e), handed_to="healing")

    def _failed(self, action: _Action, error: Exception) -> None:
        delay = action.retry.next_delay()
        action.error = str(error)
        action.next_at = asyncio.get_running_loop().time() + delay
        log.error("control.action_failed", unit=action.unit, action=action.action, attempt=action.attempts,
                  error=action.error, retry_in=round(delay, 2))
        self._report(action.unit)

    def _done(self, action: _Action) -> None:
        if self._pending.get(action.slot) is action:
            del self._pending[action.slot]
        self._report(action.unit)

    def _report(self, unit: str) -> None:
        """Publish what is pending for `unit` in the unit summary, and count what is pending."""
        self._metrics.control_pending.set(len(self._pending))
        requests = sorted((a for a in self._pending.values() if a.unit == unit), key=lambda a: a.action)
        self._healer.set_requests(unit, [
            {"action": a.action, "failures": a.attempts, "error": a.error,
             "next_try": a.next_at if a.attempts else None} for a in requests])
