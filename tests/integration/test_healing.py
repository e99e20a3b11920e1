"""The healer against a real systemd manager over D-Bus: Norm's Healer service and systemd adapter,
real units, real kill -9, a real bus and manager killed under it."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from norm.adapters.systemd import Systemd
from norm.core.backoff import Backoff
from norm.core.healing import HealPolicy
from norm.services.context import HostContext
from norm.services.healer import Healer
from norm.services.holds import Holds
from norm.services.metrics import Metrics
from sandbox.systemd import SystemdManager

SLEEPER = "[Unit]\nStartLimitIntervalSec=0\n[Service]\nExecStart=/bin/sleep infinity\n"
CRASHER = "[Unit]\nStartLimitIntervalSec=0\n[Service]\nExecStart=/bin/false\n"
BAD = "[Service]\nExecStart=relative/path/is/refused\n"
ENABLED_SLEEPER = SLEEPER + "[Install]\nWantedBy=default.target\n"


def fast_policy(**kw: object) -> HealPolicy:
    values: dict[str, object] = {
        "backoff": Backoff(first=0.05, factor=2.0, cap=0.2, jitter=0.0), "budget": 3, "window": 60.0,
        "cooldown": 3600.0, "forget_after": 600.0}
    values.update(kw)
    return HealPolicy(**values)  # type: ignore[arg-type]


@dataclass
class Rig:
    manager: SystemdManager
    systemd: Systemd
    healer: Healer
    metrics: Metrics
    holds: Holds
    progress: asyncio.Event

    async def until(self, what: str, predicate: Callable[[], bool], timeout: float = 15) -> None:
        """Wait, woken by each decision pass of the healer, until `predicate()` holds."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    self.progress.clear()
                    await self.progress.wait()
        except TimeoutError:
            raise AssertionError(f"{what}: not within {timeout}s; states {self.healer.states}, "
                                 f"history {self.healer.history}") from None

    def traces(self, unit: str) -> list[str]:
        return [t.result for t in self.healer.traces if t.unit == unit]

    def attempts(self, unit: str, result: str = "started") -> float:
        return self.metrics.heal_attempts.labels(unit, result)._value.get()

    async def main_pid(self, unit: str) -> int:
        return (await self.systemd.unit(unit)).main_pid

    async def kill(self, unit: str) -> None:
        pid = await self.main_pid(unit)
        assert pid > 0, unit
        os.kill(pid, signal.SIGKILL)

    def active(self, unit: str) -> bool:
        state = self.healer.states.get(unit)
        return state is not None and state.healthy


async def rig_for(manager: SystemdManager, units: dict[str, str], policy: HealPolicy,
                  start: tuple[str, ...], resync_interval: float = 3600,
                  state_file: Path | None = None) -> AsyncIterator[Rig]:
    for name, text in units.items():
        manager.write_unit(name, text)
    for name in start:
        manager.systemctl("start", name, check=name != "app-crash.service")
    metrics, holds, progress = Metrics(), Holds(), asyncio.Event()
    async with Systemd(manager.bus_address, call_timeout=10) as systemd:
        # The healer needs no etcd: its summary goes nowhere here.
        host = HostContext(None, "/norm", "a" * 32, metrics, holds, units=("app-*.service",))  # type: ignore[arg-type]
        healer = Healer(host, systemd, policy, resync_interval=resync_interval, state_file=state_file)
        original = healer._decide_now

        def decide_and_tell(now: float) -> None:
            original(now)
            progress.set()

        healer._decide_now = decide_and_tell  # type: ignore[method-assign]
        stopping = asyncio.Event()
        task = asyncio.create_task(healer.run(stopping), name="healer-under-test")
        try:
            async with asyncio.timeout(15):
                await healer.synced.wait()
            yield Rig(manager, systemd, healer, metrics, holds, progress)
        finally:
            stopping.set()
            async with asyncio.timeout(15):
                await task


@pytest.fixture
async def rig(systemd_manager: SystemdManager) -> AsyncIterator[Rig]:
    units = {"app-web.service": SLEEPER, "app-api.service": SLEEPER, "app-crash.service": CRASHER,
             "app-bad.service": BAD, "other.service": SLEEPER}
    async for r in rig_for(systemd_manager, units, fast_policy(),
                           ("app-web.service", "app-api.service", "other.service")):
        yield r


async def test_a_unit_killed_with_sigkill_is_healed_and_the_metrics_say_so(rig: Rig) -> None:
    await rig.until("web active", lambda: rig.active("app-web.service"))
    before = (await rig.systemd.unit("app-web.service")).invocation_id
    await rig.kill("app-web.service")
    await rig.until("web healed", lambda: rig.traces("app-web.service") == ["started"]
                    and rig.active("app-web.service"))
    after = await rig.systemd.unit("app-web.service")
    assert after.active_state == "active" and after.invocation_id != before
    assert rig.attempts("app-web.service") == 1
    assert rig.metrics.unit_active.labels("app-web.service")._value.get() == 1
    assert rig.metrics.heal_seconds._sum.get() > 0  # one failure-to-active duration observed
    assert rig.healer.history["app-web.service"].failed_since is None


async def test_a_crash_loop_is_quarantined_within_its_budget_until_released(rig: Rig) -> None:
    unit = "app-crash.service"
    rig.manager.systemctl("start", unit, check=False)
    await rig.until("crash-looper quarantined", lambda: rig.healer.history[unit].quarantined)
    assert len(rig.traces(unit)) == rig.healer.policy.budget == 3
    assert rig.metrics.units_quarantined._value.get() == 1
    # No attempt while quarantined: decision passes keep coming (other units' signals, timers), and
    # the longest backoff step is 0.2 s; watch far longer than that for an attempt that must not come.
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(2):
            await rig.until("an attempt while quarantined", lambda: len(rig.traces(unit)) > 3, timeout=3)
    assert rig.healer.lift(unit) is True
    await rig.until("healing resumed", lambda: len(rig.traces(unit)) > 3)
    summary = {u["unit"]: u for u in rig.healer.summary(0.0, 0.0)}
    assert summary["app-web.service"]["heal"] == "ok"


async def test_healthy_units_are_never_restarted_while_others_crash(rig: Rig) -> None:
    before = {u: await rig.systemd.unit(u) for u in ("app-web.service", "app-api.service")}
    rig.manager.systemctl("start", "app-crash.service", check=False)
    await rig.kill("app-api.service")
    await rig.until("api healed, crash-looper quarantined",
                    lambda: rig.traces("app-api.service") == ["started"]
                    and rig.healer.history["app-crash.service"].quarantined)
    web = await rig.systemd.unit("app-web.service")
    assert (web.invocation_id, web.n_restarts) == (before["app-web.service"].invocation_id,
                                                   before["app-web.service"].n_restarts)
    assert rig.traces("app-web.service") == []
    assert "other.service" not in rig.healer.states  # outside the patterns: never touched


async def test_a_held_unit_is_not_healed_and_releasing_the_hold_resumes_healing(rig: Rig) -> None:
    unit = "app-web.service"
    rig.holds.hold(unit, "operator")
    await rig.kill(unit)
    await rig.until("failure seen", lambda: rig.healer.states[unit].failed)
    # Make the healer decide again, twice, with the failure in view: a hold change wakes it.
    for change in (rig.holds.hold, rig.holds.unhold):
        rig.progress.clear()
        change("app-api.service", "test")
        async with asyncio.timeout(5):
            await rig.progress.wait()
    assert rig.traces(unit) == []
    rig.holds.unhold(unit, "operator")
    await rig.until("healed after release", lambda: rig.traces(unit) == ["started"] and rig.active(unit))


async def test_a_unit_that_crashes_while_the_bus_is_down_is_healed_when_it_is_back(rig: Rig) -> None:
    unit = "app-web.service"
    pid = await rig.main_pid(unit)
    # Take the bus away (its socket and daemon; the manager stays), crash the unit while Norm can
    # hear nothing, then bring the bus back. (SIGKILL of the bus daemon at the very moment a unit
    # dies sometimes deadlocks this machine's user manager with its new bus, which no Norm can cure.)
    generation = rig.systemd.generation
    await asyncio.to_thread(rig.manager.systemctl, "stop", "dbus.socket")
    os.kill(pid, signal.SIGKILL)
    assert rig.manager.unit_property(unit, "ActiveState") == "failed"
    await asyncio.to_thread(rig.manager.systemctl, "start", "dbus.socket")
    await rig.until("healed after the bus came back", lambda: rig.traces(unit) == ["started"]
                    and rig.active(unit), timeout=30)
    assert rig.systemd.generation > generation
    assert rig.traces("app-api.service") == []


async def test_the_bus_daemon_killed_is_survived_and_healing_goes_on(rig: Rig) -> None:
    generation = rig.systemd.generation
    os.kill(int(rig.manager.unit_property("dbus.service", "MainPID")), signal.SIGKILL)
    await rig.until("reconnected to the new bus", lambda: rig.systemd.generation > generation)
    await rig.kill("app-web.service")
    await rig.until("healed on the new bus", lambda: rig.traces("app-web.service") == ["started"]
                    and rig.active("app-web.service"))
    assert rig.traces("app-api.service") == []


async def test_a_unit_that_cannot_be_loaded_is_reported_once_not_retried(rig: Rig) -> None:
    state = rig.healer.states.get("app-bad.service")
    if state is None or state.load_state == "loaded":
        pytest.fail(f"app-bad.service should be listed as not loadable: {state}")
    assert rig.healer.history["app-bad.service"].reported_unloadable
    await rig.kill("app-web.service")
    await rig.until("web healed", lambda: rig.traces("app-web.service") == ["started"])
    assert rig.traces("app-bad.service") == []


async def test_a_restarted_manager_is_recovered_from_and_only_what_needs_it_is_healed(
        systemd_manager: SystemdManager) -> None:
    units = {"app-web.service": ENABLED_SLEEPER, "app-api.service": ENABLED_SLEEPER}
    systemd_manager.write_unit("app-web.service", ENABLED_SLEEPER)
    systemd_manager.write_unit("app-api.service", ENABLED_SLEEPER)
    systemd_manager.systemctl("enable", "app-web.service", "app-api.service")
    rigs = rig_for(systemd_manager, units, fast_policy(), ("app-web.service", "app-api.service"))
    rig = await anext(rigs)
    try:
        generation = rig.systemd.generation
        await asyncio.to_thread(systemd_manager.restart)
        # The new manager starts the enabled units itself; Norm reconnects and reads them afresh.
        await rig.until("reconnected with both active", lambda: rig.systemd.generation > generation
                        and rig.active("app-web.service") and rig.active("app-api.service"), timeout=30)
        api_before = await rig.systemd.unit("app-api.service")
        await rig.kill("app-web.service")
        await rig.until("web healed", lambda: rig.traces("app-web.service") == ["started"]
                        and rig.active("app-web.service"))
        api_after = await rig.systemd.unit("app-api.service")
        assert api_after.invocation_id == api_before.invocation_id
        assert rig.traces("app-api.service") == []
    finally:
        await rigs.aclose()


async def test_the_safety_net_resync_changes_nothing_that_the_signals_got_right(
        systemd_manager: SystemdManager) -> None:
    units = {"app-web.service": SLEEPER, "app-api.service": SLEEPER}
    rigs = rig_for(systemd_manager, units, fast_policy(), ("app-web.service", "app-api.service"),
                   resync_interval=0.05)
    rig = await anext(rigs)
    try:
        await rig.kill("app-web.service")
        await rig.until("web healed", lambda: rig.traces("app-web.service") == ["started"]
                        and rig.active("app-web.service"))
        done = rig.healer.resyncs
        await rig.until("ten more re-reads", lambda: rig.healer.resyncs >= done + 10)
        assert rig.traces("app-web.service") == ["started"]
        assert rig.traces("app-api.service") == []
    finally:
        await rigs.aclose()


async def test_a_quarantine_outlives_the_healer_and_a_release_does_too(
        systemd_manager: SystemdManager, tmp_path: Path) -> None:
    units, unit = {"app-crash.service": CRASHER}, "app-crash.service"
    state = tmp_path / "state" / "healing.json"

    async def healer_run() -> AsyncIterator[Rig]:
        async for r in rig_for(systemd_manager, units, fast_policy(), (), state_file=state):
            yield r

    rigs = healer_run()
    rig = await anext(rigs)
    try:
        rig.manager.systemctl("start", unit, check=False)
        await rig.until("quarantined", lambda: unit in rig.healer.history
                        and rig.healer.history[unit].quarantined)
    finally:
        await rigs.aclose()
    assert oct(state.stat().st_mode & 0o777) == "0o600"

    # The next healer takes the quarantine up: no attempt, still quarantined.
    rigs = healer_run()
    rig = await anext(rigs)
    try:
        await rig.until("the quarantine taken up", lambda: unit in rig.healer.history
                        and rig.healer.history[unit].quarantined)
        assert rig.traces(unit) == [] and len(rig.healer.history[unit].attempts) == 3
        rig.healer.lift(unit)
        await rig.healer.save_state()
        await rig.until("healing resumed", lambda: len(rig.traces(unit)) >= 1)
    finally:
        await rigs.aclose()
