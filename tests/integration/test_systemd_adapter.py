"""The systemd adapter against real `systemd --user` managers, each on its own bus."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import statistics
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from norm.adapters.systemd import (
    JobFailed,
    Systemd,
    SystemdUnavailable,
    UnitChanged,
    UnitItem,
    UnitNotLoadable,
    UnitsResync,
    UnitWatch,
)
from norm.core.errors import InvalidValue
from norm.core.units import UnitState
from sandbox.procs import pid_alive
from sandbox.systemd import SystemdManager

DEADLINE = 10.0  # seconds; the changes come within milliseconds
RECONNECT_DEADLINE = 20.0  # a fresh manager, then the next retry of the backoff (capped at 1 s)


def service(exec_start: str = "/bin/sleep infinity", *, restart: str = "no", extra: str = "") -> str:
    return ("[Unit]\nStartLimitIntervalSec=0\n\n"
            f"[Service]\nExecStart={exec_start}\nRestart={restart}\n{extra}")


@pytest.fixture
async def systemd(systemd_manager: SystemdManager) -> AsyncIterator[Systemd]:
    async with Systemd(systemd_manager.bus_address, call_timeout=5.0) as sd:
        yield sd
    left = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("systemd")]
    assert not left, f"tasks left behind: {left}"


async def write_unit(manager: SystemdManager, name: str, text: str) -> None:
    await asyncio.to_thread(manager.write_unit, name, text)


async def until(w: UnitWatch, want: Callable[[UnitItem], bool], *, seen: list[UnitItem] | None = None,
                timeout: float = DEADLINE) -> UnitItem:
    """The first item from the watch for which `want` holds; every item read goes to `seen`."""
    async with asyncio.timeout(timeout):
        async for item in w:
            if seen is not None:
                seen.append(item)
            if want(item):
                return item
    raise AssertionError("the watch ended")


def changed(unit: str, check: Callable[[UnitState], bool]) -> Callable[[UnitItem], bool]:
    return lambda item: isinstance(item, UnitChanged) and item.state.name == unit and check(item.state)


def resync(reason: str) -> Callable[[UnitItem], bool]:
    return lambda item: isinstance(item, UnitsResync) and item.reason == reason


def running(state: UnitState) -> bool:
    return state.active_state == "active" and state.sub_state == "running" and state.main_pid > 0


def by_name(item: UnitItem) -> dict[str, UnitState]:
    assert isinstance(item, UnitsResync)
    return {s.name: s for s in item.states}


# ---------------------------------------------------------------------------------------------------
# Reading units


async def test_units_lists_loaded_units_and_unit_files_never_started(
        systemd_manager: SystemdManager, systemd: Systemd) -> None:
    for name in ("app-web.service", "app-idle.service", "other.service"):
        await write_unit(systemd_manager, name, service())
    assert await systemd.start("app-web.service") == "done"

    states = await systemd.units(["app-*.service"])

    assert [s.name for s in states] == ["app-idle.service", "app-web.service"]
    idle, web = states
    assert (idle.load_state, idle.active_state, idle.sub_state) == ("loaded", "inactive", "dead")
    assert idle.invocation_id == "" and idle.main_pid == 0 and idle.active_enter_usec == 0
    assert (web.active_state, web.sub_state) == ("active", "running")
    assert await systemd.units(["nothing-*.service"]) == []
    assert await systemd.units([]) == []


async def test_unit_reads_what_systemctl_shows(systemd_manager: SystemdManager, systemd: Systemd) -> None:
    await write_unit(systemd_manager, "web.service", service(restart="on-failure"))
    await systemd.start("web.service")

    state = await systemd.unit("web.service")

    def show(prop: str) -> str:
        return systemd_manager.unit_property("web.service", prop)

    assert running(state) and pid_alive(state.main_pid)
    assert state.main_pid == int(await asyncio.to_thread(show, "MainPID"))
    assert state.invocation_id == await asyncio.to_thread(show, "InvocationID")
    assert len(state.invocation_id) == 32
    assert state.active_enter_usec == int(await asyncio.to_thread(show, "ActiveEnterTimestampMonotonic"))
    assert (state.load_state, state.result, state.restart, state.n_restarts) == (
        "loaded", "success", "on-failure", 0)
    assert not state.need_daemon_reload and state.healthy


async def test_units_that_cannot_be_loaded(systemd_manager: SystemdManager, systemd: Systemd) -> None:
    await write_unit(systemd_manager, "bad.service", "[Service]\nType=simple\n")  # no ExecStart=

    with pytest.raises(UnitNotLoadable) as missing:
        await systemd.unit("missing.service")
    assert (missing.value.unit, missing.value.load_state) == ("missing.service", "not-found")
    with pytest.raises(UnitNotLoadable) as bad:
        await systemd.unit("bad.service")
    assert bad.value.load_state == "bad-setting"
    with pytest.raises(UnitNotLoadable) as start_missing:
        await systemd.start("missing.service")
    assert start_missing.value.load_state == "not-found"
    with pytest.raises(UnitNotLoadable):
        await systemd.start("bad.service")
    with pytest.raises(InvalidValue):
        await systemd.unit("not a unit")
    # A name systemd only knows because it was asked for is not listed.
    assert await systemd.units(["missing*"]) == []
    assert [s.load_state for s in await systemd.units(["bad.service"])] == ["bad-setting"]


# ---------------------------------------------------------------------------------------------------
# Jobs


async def test_start_stop_restart_return_done_and_change_the_state(
        systemd_manager: SystemdManager, systemd: Systemd) -> None:
    await write_unit(systemd_manager, "web.service", service())

    assert await systemd.start("web.service") == "done"
    first = await systemd.unit("web.service")
    assert running(first)

    assert await systemd.restart("web.service") == "done"
    second = await systemd.unit("web.service")
    assert running(second)
    assert second.invocation_id != first.invocation_id and second.main_pid != first.main_pid
    assert not pid_alive(first.main_pid)

    assert await systemd.stop("web.service") == "done"
    stopped = await systemd.unit("web.service")
    assert (stopped.active_state, stopped.sub_state, stopped.main_pid) == ("inactive", "dead", 0)
    assert await systemd.stop("web.service") == "done"  # stopping a stopped unit is fine


async def test_a_start_that_fails_raises_job_failed(
        systemd_manager: SystemdManager, systemd: Systemd) -> None:
    await write_unit(systemd_manager, "false.service", service("/bin/false", extra="Type=oneshot\n"))
    await write_unit(systemd_manager, "noexec.service", service("/nonexistent/binary", extra="Type=exec\n"))

    with pytest.raises(JobFailed) as oneshot:
        await systemd.start("false.service")
    assert (oneshot.value.unit, oneshot.value.job_type, oneshot.value.result) == (
        "false.service", "start", "failed")
    state = await systemd.unit("false.service")
    assert (state.active_state, state.result) == ("failed", "exit-code")

    with pytest.raises(JobFailed) as noexec:
        await systemd.start("noexec.service")
    assert noexec.value.result == "failed"
    assert (await systemd.unit("noexec.service")).failed


async def test_fast_jobs_end_whichever_of_reply_and_job_removed_comes_first(
        systemd_manager: SystemdManager, systemd: Systemd) -> None:
    await write_unit(systemd_manager, "tick.service", service("/bin/true", extra="Type=oneshot\n"))
    await write_unit(systemd_manager, "idle.service", service())

    for _ in range(40):
        assert await systemd.start("tick.service") == "done"
        assert await systemd.stop("idle.service") == "done"  # nothing to do: the job ends at once
    # Several jobs in flight at once on the one connection.
    results = await asyncio.gather(*(systemd.start("tick.service") for _ in range(10)))
    assert results == ["done"] * 10
    print(f"JobRemoved before the method reply: {systemd.jobs_removed_before_reply} of 90 jobs")
    assert (await systemd.unit("tick.service")).result == "success"


async def test_reset_failed_clears_a_failed_unit(systemd_manager: SystemdManager, systemd: Systemd) -> None:
    await write_unit(systemd_manager, "web.service", service())
    await systemd.start("web.service")
    async with systemd.watch(["web.service"]) as w:
        await until(w, resync("start"))
        os.kill((await systemd.unit("web.service")).main_pid, signal.SIGKILL)
        failed = await until(w, changed("web.service", lambda s: s.failed))
        assert isinstance(failed, UnitChanged) and failed.state.result == "signal"

        await systemd.reset_failed("web.service")
        cleared = await until(w, changed("web.service", lambda s: not s.failed))
        assert isinstance(cleared, UnitChanged)
        assert (cleared.state.active_state, cleared.state.result) == ("inactive", "success")
    assert (await systemd.unit("web.service")).active_state == "inactive"
    await systemd.reset_failed("web.service")  # not failed: fine
    await systemd.reset_failed("missing.service")  # not loaded: fine


# ---------------------------------------------------------------------------------------------------
# Watching


async def test_watch_sees_a_killed_process_fail(systemd_manager: SystemdManager, systemd: Systemd) -> None:
    await write_unit(systemd_manager, "app-web.service", service())
    await write_unit(systemd_manager, "app-idle.service", service())
    await write_unit(systemd_manager, "other.service", service())
    await systemd.start("app-web.service")
    await systemd.start("other.service")

    async with systemd.watch(["app-*.service"]) as w:
        first = await until(w, resync("start"))
        states = by_name(first)
        assert set(states) == {"app-web.service", "app-idle.service"}
        assert running(states["app-web.service"])
        assert states["app-idle.service"].active_state == "inactive"

        os.kill(states["app-web.service"].main_pid, signal.SIGKILL)
        os.kill((await systemd.unit("other.service")).main_pid, signal.SIGKILL)
        seen: list[UnitItem] = []
        item = await until(w, changed("app-web.service", lambda s: s.failed), seen=seen)
        assert isinstance(item, UnitChanged)
        assert (item.state.sub_state, item.state.result, item.state.main_pid) == ("failed", "signal", 0)
        # The Service interface's signal comes first; no state is reported between the two signals.
        assert all(isinstance(i, UnitChanged) and i.state.name == "app-web.service" for i in seen)
        assert len(seen) == 1, seen


async def test_watch_follows_restart_always_without_repeats(
        systemd_manager: SystemdManager, systemd: Systemd) -> None:
    await write_unit(systemd_manager, "web.service", service(restart="always", extra="RestartSec=50ms\n"))
    await systemd.start("web.service")

    async with systemd.watch(["web.service"]) as w:
        before = by_name(await until(w, resync("start")))["web.service"]
        assert running(before) and before.n_restarts == 0

        os.kill(before.main_pid, signal.SIGKILL)
        seen: list[UnitItem] = []
        restarting = await until(w, changed("web.service", lambda s: s.systemd_will_restart), seen=seen)
        assert isinstance(restarting, UnitChanged)
        assert (restarting.state.active_state, restarting.state.result) == ("activating", "signal")
        back = await until(w, changed("web.service", running), seen=seen)
        assert isinstance(back, UnitChanged)
        assert back.state.n_restarts == 1
        assert back.state.invocation_id not in ("", before.invocation_id)
        assert back.state.main_pid != before.main_pid and pid_alive(back.state.main_pid)

        # systemd repeats unchanged values in PropertiesChanged: none of it is handed out twice.
        states = [before] + [i.state for i in seen if isinstance(i, UnitChanged)]
        assert all(a != b for a, b in itertools.pairwise(states)), states
        assert w.signals > w.changes
        print(f"PropertiesChanged handled: {w.signals}, UnitChanged queued: {w.changes}")


async def test_watch_reports_a_matching_unit_that_appears(
        systemd_manager: SystemdManager, systemd: Systemd) -> None:
    async with systemd.watch(["app-*.service"]) as w:
        assert by_name(await until(w, resync("start"))) == {}
        # A unit file written without daemon-reload: systemd loads it when it is first asked for.
        (systemd_manager.units_dir / "app-new.service").write_text(service())
        await systemd.start("app-new.service")
        seen: list[UnitItem] = []
        item = await until(w, changed("app-new.service", running), seen=seen)
        assert isinstance(item, UnitChanged)
        assert not any(isinstance(i, UnitsResync) for i in seen)


async def test_daemon_reload_after_editing_a_unit_file(
        systemd_manager: SystemdManager, systemd: Systemd) -> None:
    path = await asyncio.to_thread(systemd_manager.write_unit, "web.service", service())
    await systemd.start("web.service")
    async with systemd.watch(["web.service"]) as w:
        before = by_name(await until(w, resync("start")))["web.service"]
        assert before.restart == "no" and not before.need_daemon_reload

        path.write_text(service(restart="always"))  # on disk only
        assert (await systemd.unit("web.service")).need_daemon_reload
        await systemd.daemon_reload()
        after = (await systemd.unit("web.service"))
        assert not after.need_daemon_reload and after.restart == "always"

        fresh = by_name(await until(w, resync("reloaded")))["web.service"]
        assert not fresh.need_daemon_reload and fresh.restart == "always"
        assert fresh.invocation_id == before.invocation_id  # a reload restarts nothing


# ---------------------------------------------------------------------------------------------------
# Losing the manager and its bus


async def test_manager_killed_then_started_again(systemd_manager: SystemdManager, systemd: Systemd) -> None:
    await write_unit(systemd_manager, "web.service", service())
    await systemd.start("web.service")
    loop = asyncio.get_running_loop()
    async with systemd.watch(["web.service"]) as w:
        assert running(by_name(await until(w, resync("start")))["web.service"])
        generation = systemd.generation

        # The manager alone dies; its bus lives on (and would hold calls for 120 s of activation).
        await asyncio.to_thread(systemd_manager.kill)
        t0 = loop.time()
        with pytest.raises(SystemdUnavailable):
            await systemd.unit("web.service")
        with pytest.raises(SystemdUnavailable):
            await systemd.start("web.service")
        assert loop.time() - t0 < 3.0
        assert not systemd.connected

        await asyncio.to_thread(systemd_manager.start)
        item = await until(w, resync("reconnected"), timeout=RECONNECT_DEADLINE)
        fresh = by_name(item)["web.service"]
        assert (fresh.active_state, fresh.invocation_id) == ("inactive", "")  # a new manager
        assert systemd.connected and systemd.generation > generation

        assert await systemd.start("web.service") == "done"
        item = await until(w, changed("web.service", running))
        assert isinstance(item, UnitChanged)


async def test_manager_and_bus_restarted_under_a_watch(
        systemd_manager: SystemdManager, systemd: Systemd) -> None:
    await write_unit(systemd_manager, "web.service", service())
    await write_unit(systemd_manager, "tick.service", service("/bin/true", extra="Type=oneshot\n"))
    await systemd.start("web.service")
    async with systemd.watch(["web.service"]) as w:
        await until(w, resync("start"))
        await asyncio.to_thread(systemd_manager.restart)
        item = await until(w, resync("reconnected"), timeout=RECONNECT_DEADLINE)
        assert by_name(item)["web.service"].active_state == "inactive"
        assert systemd.reconnects >= 1

        assert await systemd.start("tick.service") == "done"
        assert await systemd.start("web.service") == "done"
        state = (await until(w, changed("web.service", running)))
        assert isinstance(state, UnitChanged)
        os.kill(state.state.main_pid, signal.SIGKILL)  # signals flow on the new connection
        await until(w, changed("web.service", lambda s: s.failed))


async def test_a_frozen_manager_times_out_then_is_reconnected(systemd_manager: SystemdManager) -> None:
    await write_unit(systemd_manager, "web.service", service())
    assert systemd_manager.proc is not None and systemd_manager.proc.pid is not None
    manager_pid = systemd_manager.proc.pid
    loop = asyncio.get_running_loop()
    async with Systemd(systemd_manager.bus_address, call_timeout=0.5) as systemd:
        async with systemd.watch(["web.service"]) as w:
            await until(w, resync("start"))
            os.kill(manager_pid, signal.SIGSTOP)
            try:
                t0 = loop.time()
                with pytest.raises(SystemdUnavailable):
                    await systemd.unit("web.service")
                assert loop.time() - t0 < 2.0
                assert not systemd.connected  # a manager that does not answer is dropped
                with pytest.raises(SystemdUnavailable):
                    await systemd.start("web.service")
            finally:
                os.kill(manager_pid, signal.SIGCONT)
            item = await until(w, resync("reconnected"), timeout=RECONNECT_DEADLINE)
            assert by_name(item)["web.service"].active_state == "inactive"
            assert await systemd.start("web.service") == "done"


async def test_closing_ends_the_watch(systemd_manager: SystemdManager) -> None:
    async with Systemd(systemd_manager.bus_address) as systemd:
        async with systemd.watch(["*.service"]) as w:
            assert isinstance(await anext(w), UnitsResync)
            await systemd.close()
            with pytest.raises(StopAsyncIteration):
                await anext(w)
            with pytest.raises(SystemdUnavailable):
                await systemd.units(["*.service"])


async def test_a_dead_bus_on_entry_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(SystemdUnavailable):
        async with Systemd(f"unix:path={tmp_path}/no-bus", call_timeout=2.0):
            pass


# ---------------------------------------------------------------------------------------------------
# Latency


async def test_kill_to_unit_changed_latency(systemd_manager: SystemdManager, systemd: Systemd) -> None:
    await write_unit(systemd_manager, "web.service", service(restart="always", extra="RestartSec=10ms\n"))
    await systemd.start("web.service")
    loop = asyncio.get_running_loop()
    to_handler: list[float] = []
    to_consumer: list[float] = []
    async with systemd.watch(["web.service"]) as w:
        state = by_name(await until(w, resync("start")))["web.service"]
        for _ in range(20):
            assert running(state)
            pid = state.main_pid
            t0 = loop.time()
            os.kill(pid, signal.SIGKILL)
            item = await until(w, changed("web.service", lambda s: s.systemd_will_restart))
            t1 = loop.time()
            assert isinstance(item, UnitChanged) and item.state.main_pid == 0
            to_handler.append(item.received - t0)
            to_consumer.append(t1 - t0)
            back = await until(w, changed("web.service", lambda s, pid=pid: running(s) and s.main_pid != pid))
            assert isinstance(back, UnitChanged)
            state = back.state

    def ms(xs: list[float]) -> str:
        xs = sorted(xs)
        return (f"p50 {statistics.median(xs) * 1000:.2f} ms, p90 {xs[int(len(xs) * 0.9)] * 1000:.2f} ms, "
                f"max {xs[-1] * 1000:.2f} ms")

    print(f"kill -9 -> signal handled: {ms(to_handler)}")
    print(f"kill -9 -> UnitChanged in the consumer: {ms(to_consumer)}")
    assert statistics.median(to_consumer) < 0.050
