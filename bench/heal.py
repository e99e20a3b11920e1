"""make bench-heal: how fast a real `norm agent` heals a crashed unit, next to systemd's own restart.

A real etcd, a real `systemd --user` manager and a real `norm agent` process healing that manager's
units over D-Bus. Two units run `sleep infinity`: djed-web.service (Restart=no) is Norm's to heal;
other-web.service (Restart=always, RestartSec=0) is not matched by Norm's units.patterns and is
restarted by systemd alone: the baseline. The agent forgets a unit's failures soon after it is healthy
again and has a budget it never spends, so that every crash starts a fresh failure episode, whose
first attempt is immediate.

This process watches the manager's bus itself with bare dbus-fast (PropertiesChanged of both units,
time.monotonic() on receipt) and SIGKILLs the units' main processes, alternating the two. Norm's
timings come from its `heal.done` log lines, on the monotonic clock every process on the host shares.
Figures are milliseconds from the kill; medians unless named p99:
- signal_p50_ms: the failure's PropertiesChanged (ActiveState leaving active) at the bare listener.
- detect_p50_ms: the same signal as handled by Norm (`seen`).
- restart_issued_p50_ms, restart_issued_p99_ms: Norm's StartUnit sent (`start_sent`).
- active_again_p50_ms: Norm's unit active again, as the bare listener sees it.
- systemd_restart_active_p50_ms: the baseline unit active again, as the bare listener sees it.
- active_ratio: active_again_p50_ms / systemd_restart_active_p50_ms.
- crashes: the Norm-unit crashes measured (as many baseline crashes are interleaved with them).
Progress and a breakdown go to stderr; the last line printed is one JSON object with these fields.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from bench.common import percentile, start_agent
from sandbox.etcd import EtcdMember
from sandbox.systemd import SystemdManager

NORM_UNIT = "djed-web.service"
BASE_UNIT = "other-web.service"
NORM_UNIT_FILE = ("[Unit]\nStartLimitIntervalSec=0\n"
                  "[Service]\nExecStart=/bin/sleep infinity\nRestart=no\n")
BASE_UNIT_FILE = ("[Unit]\nStartLimitIntervalSec=0\n"
                  "[Service]\nExecStart=/bin/sleep infinity\nRestart=always\nRestartSec=0\n")

SYSTEMD = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
UNIT = "org.freedesktop.systemd1.Unit"
SERVICE = "org.freedesktop.systemd1.Service"
PROPERTIES = "org.freedesktop.DBus.Properties"
DBUS = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"

CRASH_TIMEOUT = 10.0  # seconds a crash may take to be healed before the benchmark gives up


def ms(t: float, t0: float) -> float:
    return (t - t0) * 1000


# ---------------------------------------------------------------------------------------------------
# The bare listener on the manager's bus


@dataclass(frozen=True)
class Signal:
    """One PropertiesChanged of a unit's Unit interface, as received."""

    t: float  # time.monotonic() when the message was handled
    active_state: str
    sub_state: str
    invocation: bytes  # empty when the signal did not carry it


@dataclass
class Track:
    name: str
    path: str
    signals: list[Signal] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class Listener:
    """A bare dbus-fast connection to the manager's bus: every PropertiesChanged of the tracked units,
    stamped with time.monotonic() in the message handler, the moment it is read."""

    def __init__(self, bus_address: str, units: tuple[str, ...]) -> None:
        self.bus = MessageBus(bus_address=bus_address)
        self.units = units
        self.tracks: dict[str, Track] = {}  # unit name -> track
        self._by_path: dict[str, Track] = {}

    async def __aenter__(self) -> Self:
        await self.bus.connect()
        try:
            self.bus.add_message_handler(self._on_message)  # before the match rules: nothing is lost
            for name in self.units:
                reply = await self.call(Message(destination=SYSTEMD, path=MANAGER_PATH, interface=MANAGER,
                                                member="LoadUnit", signature="s", body=[name]))
                track = Track(name, str(reply.body[0]))
                self.tracks[name] = track
                self._by_path[track.path] = track
                await self.call(Message(
                    destination=DBUS, path=DBUS_PATH, interface=DBUS, member="AddMatch", signature="s",
                    body=[f"type='signal',interface='{PROPERTIES}',member='PropertiesChanged',"
                          f"path='{track.path}'"]))
            await self.call(Message(destination=SYSTEMD, path=MANAGER_PATH, interface=MANAGER,
                                    member="Subscribe"))
        except BaseException:
            self.bus.disconnect()
            raise
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.bus.disconnect()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await self.bus.wait_for_disconnect()  # type: ignore[no-untyped-call]

    def _on_message(self, msg: Message) -> None:
        t = time.monotonic()
        if msg.message_type is not MessageType.SIGNAL or msg.member != "PropertiesChanged":
            return
        track = self._by_path.get(msg.path or "")
        if track is None:
            return
        interface, changed, _invalidated = msg.body
        if interface != UNIT or "ActiveState" not in changed:
            return
        invocation = changed.get("InvocationID")
        track.signals.append(Signal(t, changed["ActiveState"].value,
                                    changed["SubState"].value if "SubState" in changed else "",
                                    bytes(invocation.value) if invocation is not None else b""))
        track.changed.set()

    async def call(self, msg: Message) -> Message:
        async with asyncio.timeout(5):
            reply = await self.bus.call(msg)
        assert reply is not None
        if reply.message_type is MessageType.ERROR:
            raise RuntimeError(f"{msg.member} on {msg.path}: {reply.error_name}: {reply.body}")
        return reply

    async def get(self, unit: str, interface: str, prop: str) -> Any:
        reply = await self.call(Message(destination=SYSTEMD, path=self.tracks[unit].path,
                                        interface=PROPERTIES, member="Get", signature="ss",
                                        body=[interface, prop]))
        return reply.body[0].value

    async def active_again(self, unit: str, since: int, old_invocation: bytes,
                           deadline: float) -> tuple[float | None, float]:
        """Wait for the unit to be active again after a kill: its signals from index `since` on (those
        received after the kill). Returns (the first signal of it leaving active, or None if systemd
        folded the whole restart into one signal; the signal of it active again)."""
        track = self.tracks[unit]
        i = since
        t_fail: float | None = None
        async with asyncio.timeout_at(deadline):
            while True:
                while i < len(track.signals):
                    s = track.signals[i]
                    i += 1
                    if s.active_state != "active":
                        if t_fail is None:
                            t_fail = s.t
                    elif t_fail is not None or (s.invocation and s.invocation != old_invocation):
                        return t_fail, s.t
                track.changed.clear()  # everything received so far was read above
                await track.changed.wait()


# ---------------------------------------------------------------------------------------------------
# The agent's log, followed as it is written


_IN_MODIFY = 0x2


class LogTail:
    """The agent's JSON log records as they are written, woken by inotify rather than by polling."""

    def __init__(self, path: Path) -> None:
        self.records: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        self._buf = b""
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if self._libc.inotify_add_watch(self._fd, os.fsencode(path), _IN_MODIFY) < 0:
            os.close(self._fd)
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._read()  # what was written before the watch
        asyncio.get_running_loop().add_reader(self._fd, self._on_inotify)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self._fd)
        os.close(self._fd)
        self._file.close()

    def _on_inotify(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._fd, 4096):
                pass
        self._read()

    def _read(self) -> None:
        self._buf += self._file.read()
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    self.records.append(record)
                    self.changed.set()

    async def heal_done(self, unit: str, after: float, deadline: float) -> tuple[dict[str, Any], int | None]:
        """The `heal.done` record of the regimen for `unit` that saw a failure after `after`, and the
        attempt number its `heal.start` gave."""
        i = 0
        attempt: int | None = None
        async with asyncio.timeout_at(deadline):
            while True:
                while i < len(self.records):
                    r = self.records[i]
                    i += 1
                    if r.get("unit") != unit:
                        continue
                    if r.get("event") == "heal.start":
                        attempt = r.get("attempt")
                    elif r.get("event") == "heal.done" and r.get("seen", 0.0) > after:
                        return r, attempt
                self.changed.clear()  # every record so far was read above
                await self.changed.wait()


# ---------------------------------------------------------------------------------------------------
# One crash of each unit


@dataclass(frozen=True)
class NormCrash:
    signal_ms: float | None
    detect_ms: float
    decided_ms: float
    start_sent_ms: float
    done_ms: float
    active_ms: float
    result: str
    attempt: int | None


async def kill_main(listener: Listener, unit: str) -> tuple[float, int, bytes]:
    """SIGKILL the unit's main process: (t_kill, the index its next signal will have, the invocation
    it had)."""
    pid = int(await listener.get(unit, SERVICE, "MainPID"))
    invocation = bytes(await listener.get(unit, UNIT, "InvocationID"))
    if pid <= 0:
        raise RuntimeError(f"{unit} has no main process to kill")
    since = len(listener.tracks[unit].signals)
    t_kill = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    return t_kill, since, invocation


async def crash_norm(listener: Listener, tail: LogTail) -> NormCrash:
    t_kill, since, invocation = await kill_main(listener, NORM_UNIT)
    deadline = asyncio.get_running_loop().time() + CRASH_TIMEOUT
    (t_fail, t_active), (done, attempt) = await asyncio.gather(
        listener.active_again(NORM_UNIT, since, invocation, deadline),
        tail.heal_done(NORM_UNIT, t_kill, deadline))
    return NormCrash(
        signal_ms=None if t_fail is None else ms(t_fail, t_kill),
        detect_ms=ms(done["seen"], t_kill), decided_ms=ms(done["decided"], t_kill),
        start_sent_ms=ms(done["start_sent"], t_kill), done_ms=ms(done["done"], t_kill),
        active_ms=ms(t_active, t_kill), result=str(done.get("result")), attempt=attempt)


async def crash_baseline(listener: Listener) -> tuple[float | None, float]:
    t_kill, since, invocation = await kill_main(listener, BASE_UNIT)
    deadline = asyncio.get_running_loop().time() + CRASH_TIMEOUT
    t_fail, t_active = await listener.active_again(BASE_UNIT, since, invocation, deadline)
    return (None if t_fail is None else ms(t_fail, t_kill)), ms(t_active, t_kill)


async def measure(bus_address: str, log_path: Path, crashes: int, warmup: int,
                  forget_after: float) -> tuple[list[NormCrash], list[tuple[float | None, float]]]:
    norm: list[NormCrash] = []
    base: list[tuple[float | None, float]] = []
    # The agent starts forgetting once it has seen the unit healthy again (about when we do); a margin
    # on top of forget_after so that its wake-up has certainly run.
    pause = forget_after * 1.5 + 0.05

    async def quiet(since: float) -> None:
        # Waiting for time itself to pass, not for an event: nothing signals that the agent has
        # forgotten an episode, so this one wait is a sleep. It comes before the baseline's crashes
        # too, so that every crash of either unit starts from the same quiet host: moving a process
        # into a cgroup (every start does) costs ~10 ms of kernel RCU sync when no other move happened
        # in the last few ms, ~0.1 ms right after one. A baseline crash right after Norm's restart
        # would ride on that restart's fast path and measure the kernel, not systemd.
        await asyncio.sleep(max(0.0, since + pause - time.monotonic()))

    async with Listener(bus_address, (NORM_UNIT, BASE_UNIT)) as listener:
        tail = LogTail(log_path)
        try:
            last = 0.0
            for i in range(warmup + crashes):
                await quiet(last)
                n = await crash_norm(listener, tail)
                await quiet(time.monotonic())
                b = await crash_baseline(listener)
                last = time.monotonic()
                if i < warmup:
                    print(f"warm-up {i + 1}/{warmup}: norm active after {n.active_ms:.1f} ms, "
                          f"systemd after {b[1]:.1f} ms", file=sys.stderr)
                    continue
                norm.append(n)
                base.append(b)
                if n.result != "started" or n.attempt != 0:
                    print(f"crash {len(norm)}: heal result {n.result}, attempt {n.attempt} (expected "
                          "started, 0)", file=sys.stderr)
                if len(norm) % 10 == 0 or len(norm) == crashes:
                    print(f"{len(norm)}/{crashes} crashes: last norm detect {n.detect_ms:.2f} ms, "
                          f"start sent {n.start_sent_ms:.2f} ms, active {n.active_ms:.2f} ms; "
                          f"systemd active {b[1]:.2f} ms", file=sys.stderr)
        finally:
            tail.close()
    return norm, base


# ---------------------------------------------------------------------------------------------------
# The parts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--crashes", type=int, default=60, help="Norm-unit crashes measured (at least 50); "
                    "as many crashes of the baseline unit are interleaved")
    ap.add_argument("--warmup", type=int, default=3, help="crashes of each unit first, not counted")
    ap.add_argument("--forget-after", type=float, default=0.2, help="the agent's healing.forget_after")
    args = ap.parse_args()
    if args.crashes < 50:
        ap.error("--crashes must be at least 50")

    with tempfile.TemporaryDirectory(prefix="norm-bench-heal-") as tmp:
        workdir = Path(tmp)
        member = EtcdMember("etcd", workdir / "etcd")
        member.start()
        try:
            manager = SystemdManager("bench-heal", workdir / "systemd")
            manager.write_unit(NORM_UNIT, NORM_UNIT_FILE)
            manager.write_unit(BASE_UNIT, BASE_UNIT_FILE)
            manager.start()
            try:
                manager.systemctl("start", NORM_UNIT, BASE_UNIT)
                proc, notify = start_agent(workdir, member, manager.bus_address, healing=(
                    "backoff_initial = 1.0\nbackoff_max = 60\nbudget = 1000\nwindow = 60\ncooldown = 60\n"
                    f"forget_after = {args.forget_after}\nresync_interval = 600\n"))
                print(f"agent ready; {args.warmup} warm-up and {args.crashes} measured crashes of each "
                      "unit", file=sys.stderr)
                try:
                    norm, base = asyncio.run(measure(manager.bus_address, workdir / "agent.log",
                                                     args.crashes, args.warmup, args.forget_after))
                except BaseException:
                    print(proc.tail(), file=sys.stderr)
                    raise
                finally:
                    proc.stop()
                    notify.close()
            finally:
                manager.stop()
        finally:
            member.stop()

    signals = [c.signal_ms for c in norm if c.signal_ms is not None]
    detect = [c.detect_ms for c in norm]
    issued = [c.start_sent_ms for c in norm]
    active = [c.active_ms for c in norm]
    base_active = [b[1] for b in base]
    base_signals = [b[0] for b in base if b[0] is not None]
    p50 = statistics.median
    figures = {
        "crashes": len(norm),
        "signal_p50_ms": round(p50(signals), 3),
        "detect_p50_ms": round(p50(detect), 3),
        "restart_issued_p50_ms": round(p50(issued), 3),
        "restart_issued_p99_ms": round(percentile(issued, 99), 3),
        "active_again_p50_ms": round(p50(active), 3),
        "systemd_restart_active_p50_ms": round(p50(base_active), 3),
        "active_ratio": round(p50(active) / p50(base_active), 3),
    }
    print(f"breakdown (p50 ms from the kill): decided {p50(c.decided_ms for c in norm):.3f}, "
          f"heal done {p50(c.done_ms for c in norm):.3f}, detect-signal per crash "
          f"{p50(c.detect_ms - c.signal_ms for c in norm if c.signal_ms is not None):.3f}, "
          f"baseline failure signal {p50(base_signals) if base_signals else float('nan'):.3f} "
          f"({len(base_signals)}/{len(base)} seen); restart issued max {max(issued):.3f}; "
          f"heals not 'started' or not a first attempt: "
          f"{sum(1 for c in norm if c.result != 'started' or c.attempt != 0)}", file=sys.stderr)
    targets = [
        ("detect - signal <= 2 ms at p50", figures["detect_p50_ms"] - figures["signal_p50_ms"] <= 2),
        ("restart issued p99 <= 50 ms", figures["restart_issued_p99_ms"] <= 50),
        ("active_ratio <= 2.0", figures["active_ratio"] <= 2.0),
    ]
    for what, met in targets:
        print(f"target {what}: {'met' if met else 'MISSED'}", file=sys.stderr)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
