"""Load-balancer presence: this host is in its load balancer's groups while its web unit serves: its
ELBv2 target groups, or its HAProxy backends (norm.services.balancers, lb.backend).

It follows the web unit through systemd's D-Bus signals (the systemd adapter's watch, as the healer
does) and, once the unit is active, checks its health URL until it answers 2xx (bounded); then it
registers the host in every configured group. When the unit fails or stops, it deregisters the host.
Every lb.recheck_interval it reads the host's state in each group, and puts back a registration
someone else changed. The decisions are norm.core.presence's; this service carries them
out.

An update takes the host out first: the executor calls `before_stop()` before it stops the units
(deregister from every group, then wait for the host to drain, bounded by lb.drain_timeout), and
`after_start()` once it has started them again. In between, nothing registers the host, and the
unit's run that was stopped is never registered again: only a new run, once healthy. Should an update
end its hold on the units without starting them, presence resumes as after a start.
"""

from __future__ import annotations

import asyncio

import aiohttp
import structlog

from norm.adapters.systemd import Systemd, SystemdError, UnitChanged, UnitsResync
from norm.core.backoff import Backoff
from norm.core.config import LbConfig
from norm.core.errors import NormError, Permanent
from norm.core.presence import CheckHealth, Deregister, Observed, Register, decide
from norm.core.units import UnitState
from norm.services.balancers import LoadBalancer
from norm.services.base import OwnedTasks, Retry, first_of, pause, wake_or_deadline
from norm.services.holds import Holds
from norm.services.metrics import Metrics

log = structlog.get_logger("norm.presence")


def invocation_of(state: UnitState | None) -> str | None:
    """The run of the unit while it is active (or reloading), None otherwise."""
    if state is None or not state.healthy:
        return None
    return state.invocation_id or f"active-since-{state.active_enter_usec}"


class Presence:
    name = "presence"

    # How calls to the load balancer are retried, and how soon the health URL is asked again.
    RETRY = Backoff(first=0.5, factor=2.0, cap=60.0)
    HEALTH_BACKOFF = Backoff(first=0.05, factor=2.0, cap=1.0)

    def __init__(self, systemd: Systemd, balancer: LoadBalancer, lb: LbConfig, metrics: Metrics, *,
                 holds: Holds | None = None, hold_owner: str = "update") -> None:
        """`balancer`: the load balancer whose groups (lb.groups) the host joins. `holds`/`hold_owner`:
        the update's holds on the units, watched to resume should an update end without starting the
        units."""
        self._systemd = systemd
        self._balancer = balancer
        self._lb = lb
        self._metrics = metrics
        self._holds = holds
        self._hold_owner = hold_owner
        self._retry = self.RETRY
        self._health_backoff = self.HEALTH_BACKOFF
        self.unit: UnitState | None = None
        self.registered: dict[str, bool | None] = dict.fromkeys(lb.groups)
        self._invocation: str | None = None
        self._healthy: str | None = None
        self._gave_up: str | None = None
        self.suspended = False
        self._stale: str | None = None
        self._seen_held = False
        self._resume_asked = False
        self._lock = asyncio.Lock()  # one caller of the load balancer at a time: work loop or before_stop
        self._wake = asyncio.Event()
        self._probe_for: str | None = None  # the run the health probe checks, while there is one
        self._probe = OwnedTasks()
        self._http: aiohttp.ClientSession | None = None
        self.ready = asyncio.Event()  # the clients are open
        self._closed = False
        self.progress = asyncio.Event()  # set after every pass of the work loop and every first verdict of
        # the health probe (tests wait on it)
        self._registrations = asyncio.Event()  # set on every change of `registered`
        for group in lb.groups:
            metrics.lb_registered.labels(group).set(0)
        if holds is not None:
            holds.subscribe(self._on_holds)

    # -- the service

    async def run(self, stopping: asyncio.Event) -> None:
        structlog.contextvars.bind_contextvars(unit=self._lb.unit)
        try:
            async with self._balancer, aiohttp.ClientSession(trust_env=False) as http:
                self._http = http
                self.ready.set()
                log.info("lb.presence_started", load_balancer=self._balancer.kind,
                         member=self._balancer.member, target_groups=list(self._lb.groups))
                try:
                    await first_of(stopping=stopping.wait(), watch=self._follow(), work=self._work())
                finally:
                    self._closed = True
                    await self._stop_probe()
        finally:
            self._closed = True
            self.ready.clear()

    async def _follow(self) -> None:
        unit = self._lb.unit
        async with self._systemd.watch([unit]) as w:
            async for item in w:
                if isinstance(item, UnitsResync):
                    self._take(next((s for s in item.states if s.name == unit), None))
                elif isinstance(item, UnitChanged) and item.state.name == unit:
                    self._take(item.state)
                else:
                    continue
                self._wake.set()

    def _take(self, state: UnitState | None) -> None:
        self.unit = state
        invocation = invocation_of(state)
        if invocation != self._invocation:
            if invocation is None:
                log.info("lb.unit_down", state=None if state is None else state.active_state,
                         result=None if state is None else state.result)
            else:
                log.info("lb.unit_active")
            self._invocation = invocation
        if invocation is None:
            self._stale = None  # the run the update stopped is over: any later run is a new one

    def observed(self) -> Observed:
        return Observed(self._invocation, dict(self.registered), healthy=self._healthy,
                        gave_up=self._gave_up, needs_health=self._lb.health_url is not None,
                        suspended=self.suspended, stale=self._stale)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        retry = Retry(self._retry)
        retry_at: float | None = None
        every = self._lb.recheck_interval
        recheck_at = loop.time() + every if every > 0 else None
        while True:
            await wake_or_deadline(self._wake, min((t for t in (retry_at, recheck_at) if t is not None),
                                                   default=None))
            self._wake.clear()
            if self._resume_asked:
                await self._resume("the update released the units")
            if recheck_at is not None and loop.time() >= recheck_at:
                await self._recheck()
                recheck_at = loop.time() + every
            ok = await self._pass()
            if ok:
                retry.reset()
                retry_at = None
            else:
                delay = retry.next_delay()
                retry_at = loop.time() + delay
                log.info("lb.retry", retry_in=round(delay, 2))
            self.progress.set()

    async def _pass(self) -> bool:
        """Carry out what the core decides, one call at a time, deciding again after each (the unit may
        have changed meanwhile). False if a call failed (tried again later)."""
        await self._steer_probe(decide(self.observed()))
        failed: set[str] = set()
        async with self._lock:
            while True:
                calls = [c for c in decide(self.observed())
                         if isinstance(c, Register | Deregister) and c.target_group not in failed]
                if not calls:
                    break
                call = calls[0]
                if not await self._apply(call):
                    failed.add(call.target_group)
        await self._steer_probe(decide(self.observed()))
        return not failed

    async def _recheck(self) -> None:
        """Read the host's state in every group whose registration presence knows, and take what the
        groups say as the truth: someone else (a console, a script, a deployment tool) may have put the
        host in or taken it out. The pass that follows puts it back as presence wants it. Not while an
        update has the host out: its stop owns the groups until the units are started again."""
        if self.suspended:
            return
        async with self._lock:
            for group, registered in list(self.registered.items()):
                if registered is None:
                    continue
                try:
                    health = await self._balancer.membership(group)
                except NormError as e:
                    log.info("lb.recheck_failed", target_group=group, error=str(e))
                    continue
                if health.registered is not registered and not self.suspended:
                    log.warning("lb.registration_changed_elsewhere", target_group=group,
                                expected="registered" if registered else "not registered",
                                state=health.state, reason=health.reason)
                    self._set_registered(group, health.registered)

    async def _apply(self, call: Register | Deregister) -> bool:
        group = call.target_group
        try:
            if isinstance(call, Register):
                await self._balancer.register(group)
            else:
                await self._balancer.deregister(group)
        except Permanent as e:
            log.error("lb.call_refused", target_group=group, error=str(e))
            return False
        except NormError as e:
            log.warning("lb.call_failed", target_group=group, error=str(e))
            return False
        self._set_registered(group, isinstance(call, Register))
        return True

    def _set_registered(self, group: str, registered: bool) -> None:
        was = self.registered.get(group)
        self.registered[group] = registered
        self._registrations.set()
        self._metrics.lb_registered.labels(group).set(1 if registered else 0)
        if was is not registered:
            log.info("lb.registered" if registered else "lb.deregistered", target_group=group)

    # -- the health check

    async def _steer_probe(self, commands: tuple[object, ...]) -> None:
        want = next((c.invocation for c in commands if isinstance(c, CheckHealth)), None)
        if self._probe_for is not None:
            if self._probe.running("lb-health") and self._probe_for == want:
                return
            await self._stop_probe()
        if want is not None and not self._closed:
            self._probe_for = want
            self._probe.start("lb-health", self._check_health(want))

    async def _stop_probe(self) -> None:
        self._probe_for = None
        await self._probe.cancel_all()

    async def _check_health(self, invocation: str) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self._lb.health_give_up
        retry = Retry(self._health_backoff)
        told = False
        while True:
            status, error = await self._probe_once()
            if status is not None and 200 <= status < 300:
                self._healthy = invocation
                log.info("lb.healthy", seconds=round(loop.time() - started, 3), attempts=retry.failures + 1)
                self._wake.set()
                return
            if not told:  # once per run: the URL itself is never logged (it may carry a token)
                log.info("lb.not_healthy_yet", status=status, error=error)
                told = True
                self.progress.set()
            left = deadline - loop.time()
            if left <= 0:
                self._gave_up = invocation
                log.error("lb.health_gave_up", bound_s=self._lb.health_give_up, status=status, error=error)
                self._wake.set()
                return
            await pause(min(retry.next_delay(), left))

    async def _probe_once(self) -> tuple[int | None, str | None]:
        http, url = self._http, self._lb.health_url
        assert http is not None and url is not None
        try:
            async with asyncio.timeout(self._lb.health_timeout):
                async with http.get(url, allow_redirects=False) as r:
                    await r.read()
                    return r.status, None
        except TimeoutError:
            return None, "timeout"
        except (aiohttp.ClientError, OSError) as e:
            return None, type(e).__name__

    # -- the update's hooks

    async def before_stop(self) -> None:
        """Take the host out of every group and wait for it to drain, within lb.drain_timeout; nothing
        registers it again until `after_start()`. Never raises: a load balancer that does not answer
        in time, or refuses, is logged, and the update goes on."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self._lb.drain_timeout
        self._suspend()
        if self._closed:
            return
        if not self.ready.is_set():
            try:
                async with asyncio.timeout_at(deadline):
                    await self.ready.wait()
            except TimeoutError:
                log.warning("lb.not_ready_before_stop", bound_s=self._lb.drain_timeout)
                return
        async with self._lock:
            await self._steer_probe(())
            pending = [g for g, registered in self.registered.items() if registered is not False]
            retry = Retry(self._retry)
            while pending and not self._closed:
                for group in list(pending):
                    try:
                        await self._balancer.deregister(group)
                    except NormError as e:
                        log.warning("lb.call_failed", target_group=group, error=str(e))
                        continue
                    pending.remove(group)
                    self._set_registered(group, False)
                if not pending:
                    break
                delay = retry.next_delay()
                if loop.time() + delay >= deadline:
                    log.error("lb.deregister_gave_up", target_groups=pending, bound_s=self._lb.drain_timeout)
                    break
                await pause(delay)
            groups = [g for g in self._lb.groups if g not in pending]
            drained = await asyncio.gather(*(self._wait_drained(g, max(0.0, deadline - loop.time()))
                                             for g in groups))
        late = [g for g, ok in zip(groups, drained, strict=True) if not ok]
        if late:
            log.warning("lb.drain_timeout", target_groups=late, bound_s=self._lb.drain_timeout)
        log.info("lb.drained", seconds=round(loop.time() - started, 3), target_groups=groups)
        self._wake.set()

    async def _wait_drained(self, group: str, within: float) -> bool:
        try:
            return await self._balancer.wait_drained(group, within=within)
        except NormError as e:
            log.error("lb.drain_check_refused", target_group=group, error=str(e))
            return False

    async def after_start(self) -> None:
        """The update started the units again: a new run of the web unit is registered once healthy
        (by the work loop; this returns at once)."""
        await self._resume("the update started the units")
        self._wake.set()

    async def wait_serving(self, within: float) -> bool:
        """Whether the host is in every target group, now or within `within` seconds (a rolling
        update's host reports its move once it serves again)."""
        try:
            async with asyncio.timeout(within):
                while not all(self.registered.values()):
                    self._registrations.clear()
                    await self._registrations.wait()
        except TimeoutError:
            log.warning("lb.not_back_in_time", bound_s=within)
            return False
        return True

    def _suspend(self) -> None:
        if not self.suspended:
            self.suspended = True
            self._stale = self._invocation
            self._healthy = None
            self._seen_held = False
            log.info("lb.suspended")
        self._on_holds()
        self._wake.set()

    async def _resume(self, why: str) -> None:
        self._resume_asked = False
        if not self.suspended:
            return
        if self._stale is not None:
            # The run the update stopped stays out, unless it was never stopped (the unit is not one
            # the update manages): asked of systemd now, since the watch may lag behind.
            try:
                now = await self._systemd.unit(self._lb.unit)
                if invocation_of(now) == self._stale:
                    self._stale = None
            except SystemdError as e:
                log.info("lb.unit_read_failed", error=str(e))
        self.suspended = False
        self._seen_held = False
        log.info("lb.resumed", why=why)

    def _on_holds(self) -> None:
        if not self.suspended or self._holds is None:
            return
        if self._hold_owner in self._holds.owners(self._lb.unit):
            self._seen_held = True
        elif self._seen_held:
            self._resume_asked = True
            self._wake.set()
