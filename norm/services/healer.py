"""The healer: follows the managed units' state through systemd's D-Bus signals and carries out the
healing policy's commands. No polling: a decision is taken when a signal arrives, a regimen
finishes, a hold changes, or a time the policy asked to be woken at comes; a rare full re-read of
every unit is the safety net. At most one regimen runs per unit at a time.

What counts against each unit's budget (attempts in the window, backoff, quarantine) is kept in a
state file (`<agent.state_dir>/healing.json`), read at start and written after each change to it:
a restart of the agent, or of the host, does not give a crash-looping unit a fresh budget."""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from norm.adapters.files import read_file, write_atomic
from norm.adapters.systemd import (
    JobFailed,
    Systemd,
    SystemdError,
    UnitChanged,
    UnitNotLoadable,
    UnitsResync,
)
from norm.core import wire
from norm.core.backoff import Backoff
from norm.core.errors import InvalidValue, NormError
from norm.core.healing import (
    Command,
    Heal,
    HealPolicy,
    Lasting,
    Quarantine,
    QuarantineLifted,
    Recovered,
    UnitHealth,
    Unloadable,
    decide,
    from_record,
    heal_finished,
    lasting,
    lift,
    to_record,
)
from norm.core.units import UnitState, matches
from norm.services.base import OwnedTasks, Retry, first_of, pause, wake_or_deadline
from norm.services.context import HostContext

log = structlog.get_logger("norm.healer")


@dataclass(frozen=True)
class HealTrace:
    """Timings of one regimen, on the loop's clock: the signal that showed the failure handled,
    the decision taken, the start job sent, the regimen done."""

    unit: str
    seen: float
    decided: float
    start_sent: float
    done: float
    result: str


class Healer:
    name = "healer"

    def __init__(self, host: HostContext, systemd: Systemd, policy: HealPolicy, *,
                 resync_interval: float = 60.0, publish: Callable[[bytes], Awaitable[None]] | None = None,
                 gate: asyncio.Event | None = None, state_file: str | Path | None = None,
                 quarantined: Callable[[str, int], None] | None = None) -> None:
        """`quarantined(unit, attempts)`: told of each unit quarantined (the webhooks' notice)."""
        self._gate = gate  # set once units an update holds are known to be held
        self._quarantined = quarantined
        self._systemd = systemd
        self.patterns = host.units
        self.policy = policy
        self._metrics = host.metrics
        self.holds = host.holds
        self._resync_interval = resync_interval
        self._publish = publish
        self.states: dict[str, UnitState] = {}
        self.history: dict[str, UnitHealth] = {}
        self._seen: dict[str, float] = {}  # unit -> when the latest change of it was handled
        self._wake = asyncio.Event()
        self.holds.subscribe(self._wake.set)
        self._regimens = OwnedTasks()  # one a unit, named heal:<unit>
        self._wake_at: float | None = None
        self.synced = asyncio.Event()
        self.traces: deque[HealTrace] = deque(maxlen=1000)
        self.resyncs = 0  # safety-net re-reads done
        self._summary_dirty = asyncio.Event()
        # What of the history outlives the agent, and the last of it written to the state file.
        self.state_file = None if state_file is None else Path(state_file)
        self._saved: Lasting = ()
        self._state_dirty = asyncio.Event()
        self._state_lock = asyncio.Lock()
        self._state_loaded = asyncio.Event()  # no write before what the last agent left is read
        # Operator requests for a unit not carried out yet (see norm.services.control), for the summary.
        self._requests: dict[str, list[dict[str, object]]] = {}

    # -- operator actions

    def lift(self, unit: str) -> bool:
        """Lift `unit`'s quarantine and forget its budget; `save_state` makes it last."""
        self.history, was = lift(self.history, unit)
        if was:
            self._on_command(QuarantineLifted(unit, "operator"))
        self._history_changed()
        self._wake.set()
        return was

    def set_requests(self, unit: str, requests: list[dict[str, object]]) -> None:
        """What an operator asked of `unit` that is not done yet, for the published summary: each an
        action, its failures so far, the last error, and its next try on the loop's clock."""
        if requests:
            self._requests[unit] = requests
        else:
            self._requests.pop(unit, None)
        self._summary_dirty.set()

    # -- the state that outlives the agent

    def _history_changed(self) -> None:
        if self.state_file is not None and lasting(self.history) != self._saved:
            self._state_dirty.set()

    async def load_state(self) -> None:
        """Take up what an earlier agent left in the state file. A file that cannot be read or is not
        a record the healer writes is reported, counted and left for the next write to replace."""
        if self.state_file is None:
            return
        try:
            await self._load_state()
        finally:
            self._state_loaded.set()

    async def _load_state(self) -> None:
        assert self.state_file is not None
        try:
            raw = await read_file(self.state_file)
        except OSError as e:
            self._metrics.rejected_values.labels("healing-state").inc()
            log.error("heal.state_unreadable", path=str(self.state_file), error=str(e))
            return
        if raw is None:
            return
        now, wall = asyncio.get_running_loop().time(), time.time()
        try:
            record = wire.parse(raw, f"healing state {self.state_file}")
            history, problems = from_record(record, now, wall, self.policy)
        except InvalidValue as e:
            self._metrics.rejected_values.labels("healing-state").inc()
            log.error("heal.state_refused", path=str(self.state_file), reason=str(e))
            return
        for problem in problems:
            self._metrics.rejected_values.labels("healing-state").inc()
            log.error("heal.state_refused", path=str(self.state_file), reason=str(problem))
        self.history = {**history, **self.history}
        self._saved = lasting(history)
        self._history_changed()
        quarantined = sorted(name for name, h in history.items() if h.quarantined)
        log.info("heal.state_loaded", path=str(self.state_file), units=len(history), quarantined=quarantined)

    async def save_state(self) -> None:
        """Write the history's lasting part to the state file now, if it changed since the last
        write. Raises OSError."""
        if self.state_file is None:
            return
        await self._state_loaded.wait()
        async with self._state_lock:
            self._state_dirty.clear()
            current = lasting(self.history)
            if current == self._saved:
                return
            record = to_record(self.history, asyncio.get_running_loop().time(), time.time())
            try:
                await write_atomic(self.state_file, wire.encode(record, compact=False), mode=0o600)
            except OSError:
                self._state_dirty.set()
                raise
            self._saved = current

    async def _save_loop(self) -> None:
        retry = Retry(Backoff(first=1.0, cap=30.0))
        while True:
            await self._state_dirty.wait()
            try:
                await self.save_state()
                retry.reset()
            except OSError as e:
                delay = retry.next_delay()
                log.error("heal.state_write_failed", path=str(self.state_file), error=str(e),
                          retry_in=round(delay, 2))
                await pause(delay)

    # -- the service

    async def run(self, stopping: asyncio.Event) -> None:
        await self.load_state()
        if self._gate is not None and await first_of(stopping=stopping.wait(),
                                                     gate=self._gate.wait()) == "stopping":
            return
        try:
            await first_of(
                stopping=stopping.wait(),
                watch=self._follow(),
                decide=self._decide_loop(),
                resync=self._resync_loop(stopping),
                publish=self._publish_loop(),
                save=self._save_loop(),
            )
        finally:
            # A regimen in flight finishes (bounded by the systemd call timeout): a unit is never left
            # stopped half-way through by a graceful shutdown.
            await self._regimens.join()
            try:
                await self.save_state()
            except OSError as e:
                log.error("heal.state_write_failed", path=str(self.state_file), error=str(e))

    async def _follow(self) -> None:
        async with self._systemd.watch(self.patterns) as w:
            async for item in w:
                loop_now = asyncio.get_running_loop().time()
                if isinstance(item, UnitsResync):
                    self.states = {s.name: s for s in item.states if matches(s.name, self.patterns)}
                    for name in self.states:
                        self._seen[name] = loop_now
                    self.synced.set()
                    log.info("units.resynced", reason=item.reason, units=len(self.states))
                elif isinstance(item, UnitChanged):
                    if not matches(item.state.name, self.patterns):
                        continue
                    self.states[item.state.name] = item.state
                    self._seen[item.state.name] = item.received
                self._wake.set()

    async def _resync_loop(self, stopping: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not await pause(self._resync_interval, stopping):
            asked = loop.time()
            try:
                fresh = {s.name: s for s in await self._systemd.units(self.patterns)}
            except SystemdError as e:
                log.warning("units.resync_failed", error=str(e))
                continue
            # A unit whose signal arrived while the listing was on its way is newer than the listing.
            stale = {name for name, seen in self._seen.items() if seen >= asked}
            drift = sorted(name for name in set(fresh) | set(self.states)
                           if name not in stale and fresh.get(name) != self.states.get(name))
            if drift:
                log.warning("units.drift", units=drift)
                for name in drift:
                    if name in fresh:
                        self.states[name] = fresh[name]
                        self._seen[name] = asked
                    else:
                        self.states.pop(name, None)
            self.resyncs += 1
            self._wake.set()

    async def _decide_loop(self) -> None:
        loop = asyncio.get_running_loop()
        # Not before the units are known: a pass over none would forget every unit's history.
        await self.synced.wait()
        while True:
            await wake_or_deadline(self._wake, self._wake_at)
            self._wake.clear()
            self._decide_now(loop.time())

    def _decide_now(self, now: float) -> None:
        decision = decide(self.states, self.history, self.holds.held(), now, self.policy, random.random())
        self.history = dict(decision.history)
        self._wake_at = decision.wake_at
        for command in decision.commands:
            self._on_command(command, now)
        self._update_gauges()
        self._summary_dirty.set()
        self._history_changed()

    def _on_command(self, command: Command, now: float = 0.0) -> None:
        match command:
            case Heal(unit, attempt, reload):
                if self._regimens.running(unit):
                    # A unit that dropped out of a listing mid-regimen lost its history, in_flight
                    # included; its regimen is still running: one at a time, always.
                    return
                log.warning("heal.start", unit=unit, attempt=attempt, reload=reload,
                            state=self.states[unit].active_state, result=self.states[unit].result)
                self._regimens.start(unit, self._regimen(unit, reload, self._seen.get(unit, now), now),
                                     name=f"heal:{unit}")
            case Quarantine(unit, until, attempts):
                log.error("heal.quarantined", unit=unit, attempts=attempts,
                          cooldown_s=round(until - now, 1))
                if self._quarantined is not None:
                    self._quarantined(unit, attempts)
            case QuarantineLifted(unit, reason):
                log.info("heal.quarantine_lifted", unit=unit, reason=reason)
            case Recovered(unit, seconds):
                self._metrics.heal_seconds.observe(seconds)
                log.info("heal.recovered", unit=unit, seconds=round(seconds, 3))
            case Unloadable(unit, load_state):
                log.error("unit.unloadable", unit=unit, load_state=load_state)

    async def _regimen(self, unit: str, reload: bool, seen: float, decided: float) -> None:
        loop = asyncio.get_running_loop()
        start_sent = 0.0
        result = "started"
        try:
            await self._systemd.stop(unit)
            await self._systemd.reset_failed(unit)
            if reload:
                await self._systemd.daemon_reload()
            start_sent = loop.time()
            await self._systemd.start(unit)
        except JobFailed as e:
            result = "failed"
            log.warning("heal.job_failed", unit=unit, error=str(e))
        except UnitNotLoadable as e:
            result = "unloadable"
            log.error("heal.unloadable", unit=unit, error=str(e))
        except SystemdError as e:
            result = "error"
            log.warning("heal.error", unit=unit, error=str(e))
        finally:
            self._metrics.heal_attempts.labels(unit, result).inc()
            trace = HealTrace(unit, seen, decided, start_sent, loop.time(), result)
            self.traces.append(trace)
            # The timings on the monotonic clock, which every process on the host shares.
            log.info("heal.done", unit=unit, result=result, seen=trace.seen, decided=trace.decided,
                     start_sent=trace.start_sent, done=trace.done)
            self.history = heal_finished(self.history, unit)
            self._wake.set()

    def _update_gauges(self) -> None:
        for name, state in self.states.items():
            self._metrics.unit_active.labels(name).set(1 if state.healthy else 0)
        self._metrics.units_quarantined.set(sum(1 for h in self.history.values() if h.quarantined))

    # -- the summary published for the fleet and `norm units`

    def summary(self, now: float, wall: float) -> list[dict[str, object]]:
        held = self.holds.held()
        out: list[dict[str, object]] = []
        for name in sorted(self.states):
            s = self.states[name]
            h = self.history.get(name, UnitHealth())
            if name in held:
                heal = "held"
            elif s.load_state != "loaded":
                heal = "unloadable"
            elif h.quarantined:
                heal = "quarantined"
            elif h.in_flight:
                heal = "healing"
            elif s.failed:
                heal = "backoff"
            else:
                heal = "ok"

            def at(t: float | None) -> float | None:
                return None if t is None or t <= now else round(wall + (t - now))

            out.append({
                "unit": name, "active_state": s.active_state, "sub_state": s.sub_state,
                "result": s.result, "n_restarts": s.n_restarts, "heal": heal,
                "attempts": len(h.attempts), "next_attempt_at": at(h.next_at) if s.failed else None,
                "quarantined_until": at(h.quarantined_until),
                "held_by": sorted(self.holds.owners(name)),  # "operator" (norm units stop), "update"
                "requests": [{**r, "next_try": at(t) if isinstance(t := r["next_try"], float) else None}
                             for r in self._requests.get(name, [])],
            })
        return out

    async def _publish_loop(self) -> None:
        if self._publish is None:
            await asyncio.Event().wait()  # nothing to publish to; keep the service's shape
        assert self._publish is not None
        loop = asyncio.get_running_loop()
        last = b""
        while True:
            await self._summary_dirty.wait()
            self._summary_dirty.clear()
            body = wire.encode(self.summary(loop.time(), time.time()), compact=False)
            if body != last:
                try:
                    await self._publish(body)
                    last = body
                except NormError as e:  # publishing is best effort; the next change retries
                    log.info("units.publish_failed", error=str(e))
            # At most one write a second, however busy the units are.
            await pause(1.0)
