"""The sandbox's systemd managers: real `systemd --user`, driven over D-Bus with dbus-fast."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from dbus_fast.aio import MessageBus, ProxyInterface

from sandbox.procs import pid_alive
from sandbox.systemd import SystemdManager, cgroup_paths

SYSTEMD = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
STATE_CHANGE_DEADLINE = 10.0  # seconds; the changes come within milliseconds

SLEEPER = """\
[Unit]
Description=a unit that runs until it is stopped
StartLimitIntervalSec=0

[Service]
ExecStart=/bin/sleep infinity
Restart=no
"""


@asynccontextmanager
async def connected(manager: SystemdManager) -> AsyncIterator[MessageBus]:
    bus = await MessageBus(bus_address=manager.bus_address).connect()
    try:
        yield bus
    finally:
        bus.disconnect()
        await bus.wait_for_disconnect()


async def interface(bus: MessageBus, path: str, name: str) -> ProxyInterface:
    obj = bus.get_proxy_object(SYSTEMD, path, await bus.introspect(SYSTEMD, path))
    return obj.get_interface(name)


async def start_unit(bus: MessageBus, unit: str) -> str:
    """StartUnit over D-Bus; the unit's object path."""
    manager = await interface(bus, SYSTEMD_PATH, "org.freedesktop.systemd1.Manager")
    await manager.call_subscribe()  # type: ignore[attr-defined]  # else no PropertiesChanged signals
    path: str = await manager.call_load_unit(unit)  # type: ignore[attr-defined]
    await manager.call_start_unit(unit, "replace")  # type: ignore[attr-defined]
    return path


async def wait_active_state(bus: MessageBus, unit_path: str, want: str) -> None:
    """Wait, on PropertiesChanged signals, until the unit's ActiveState is `want`."""
    unit = await interface(bus, unit_path, "org.freedesktop.systemd1.Unit")
    props = await interface(bus, unit_path, "org.freedesktop.DBus.Properties")
    changed = asyncio.Event()

    def on_changed(_iface: str, _changed: object, _invalidated: list[str]) -> None:
        changed.set()

    props.on_properties_changed(on_changed)  # type: ignore[attr-defined]
    try:
        async with asyncio.timeout(STATE_CHANGE_DEADLINE):
            while True:
                changed.clear()  # before reading: a change after the read wakes us
                state = await unit.get_active_state()  # type: ignore[attr-defined]
                if state == want:
                    return
                await changed.wait()
    finally:
        props.off_properties_changed(on_changed)  # type: ignore[attr-defined]


async def main_pid(bus: MessageBus, unit_path: str) -> int:
    service = await interface(bus, unit_path, "org.freedesktop.systemd1.Service")
    return int(await service.get_main_pid())  # type: ignore[attr-defined]


def own_cgroup(pid: int) -> str:
    """The pid's cgroup in the unified hierarchy."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise AssertionError(f"pid {pid} has no unified cgroup")


async def test_a_unit_started_over_dbus_runs_in_the_managers_cgroup(systemd_manager: SystemdManager) -> None:
    assert systemd_manager.bus_address == f"unix:path={systemd_manager.runtime_dir}/bus"
    await asyncio.to_thread(systemd_manager.write_unit, "sleeper.service", SLEEPER)

    async with connected(systemd_manager) as bus:
        path = await start_unit(bus, "sleeper.service")
        await wait_active_state(bus, path, "active")
        pid = await main_pid(bus, path)

    assert pid_alive(pid)
    assert own_cgroup(pid) == f"/{systemd_manager.cgroup}/app.slice/sleeper.service"
    assert await asyncio.to_thread(systemd_manager.unit_property, "sleeper.service", "SubState") == "running"
    assert str(pid) == await asyncio.to_thread(systemd_manager.unit_property, "sleeper.service", "MainPID")


async def test_kill_9_of_a_units_main_process_shows_failed(systemd_manager: SystemdManager) -> None:
    await asyncio.to_thread(systemd_manager.write_unit, "victim.service", SLEEPER)

    async with connected(systemd_manager) as bus:
        path = await start_unit(bus, "victim.service")
        await wait_active_state(bus, path, "active")
        os.kill(await main_pid(bus, path), signal.SIGKILL)
        await wait_active_state(bus, path, "failed")

    assert await asyncio.to_thread(systemd_manager.unit_property, "victim.service", "Result") == "signal"


async def test_two_managers_do_not_share_cgroups(
    systemd_managers: Callable[[int], list[SystemdManager]],
) -> None:
    one, two = await asyncio.to_thread(systemd_managers, 2)
    assert one.cgroup != two.cgroup
    pids: list[int] = []
    for manager in (one, two):
        await asyncio.to_thread(manager.write_unit, "app.service", SLEEPER)
        async with connected(manager) as bus:
            path = await start_unit(bus, "app.service")
            await wait_active_state(bus, path, "active")
            pids.append(await main_pid(bus, path))

    await asyncio.to_thread(one.stop)

    assert not pid_alive(pids[0])
    assert pid_alive(pids[1])
    assert own_cgroup(pids[1]) == f"/{two.cgroup}/app.slice/app.service"
    async with connected(two) as bus:
        unit = await interface(bus, f"{SYSTEMD_PATH}/unit/app_2eservice", "org.freedesktop.systemd1.Unit")
        assert await unit.get_active_state() == "active"  # type: ignore[attr-defined]


def test_teardown_leaves_no_cgroup_and_no_process(tmp_path: Path) -> None:
    manager = SystemdManager("gone", tmp_path / "gone")
    manager.write_unit("app.service", SLEEPER)  # before start: loaded at start-up
    manager.start()
    cgroup = manager.cgroup
    manager.systemctl("start", "app.service")
    unit_pid = int(manager.unit_property("app.service", "MainPID"))
    manager_pid = manager.proc.pid if manager.proc else None
    assert all(p.is_dir() for p in cgroup_paths(cgroup))

    manager.stop()

    assert not any(p.exists() for p in cgroup_paths(cgroup))
    assert manager_pid is not None and not pid_alive(manager_pid)
    assert not pid_alive(unit_pid)
    manager.stop()  # twice is harmless


def test_kill_takes_only_the_manager_and_restart_brings_a_fresh_one(tmp_path: Path) -> None:
    manager = SystemdManager("crash", tmp_path / "crash")
    manager.start()
    try:
        manager.write_unit("app.service", SLEEPER)
        manager.systemctl("start", "app.service")
        unit_pid = int(manager.unit_property("app.service", "MainPID"))

        manager.kill()  # a crash of the manager alone: its unit's process lives on in its cgroup
        assert not manager.alive
        assert pid_alive(unit_pid)
        assert not manager.bus_has_owner()  # its bus daemon lives on too, but nobody owns systemd1

        cgroup = manager.cgroup
        manager.restart()
        assert not pid_alive(unit_pid)  # restart tears the old cgroups down first
        assert manager.cgroup == cgroup
        assert manager.bus_has_owner()
        assert manager.unit_property("app.service", "ActiveState") == "inactive"
        manager.systemctl("start", "app.service")
        assert manager.unit_property("app.service", "ActiveState") == "active"
    finally:
        manager.stop()


def test_a_long_work_dir_gets_a_short_runtime_dir(tmp_path: Path) -> None:
    manager = SystemdManager("long", tmp_path / ("deep" * 20))
    assert len(str(manager.runtime_dir / "systemd" / "private")) < 108
    manager.start()
    try:
        assert manager.bus_has_owner()
        assert manager.systemctl("is-system-running", check=False).strip() in {"running", "degraded"}
    finally:
        manager.stop()
    assert not manager.runtime_dir.exists()
