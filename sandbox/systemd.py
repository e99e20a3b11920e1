"""One real `systemd --user` manager per simulated host, driven over its own D-Bus bus.

systemd is not PID 1 on these machines and there is no system bus, but a user manager runs fine and
answers on D-Bus exactly like the system manager. Each manager gets a runtime dir R (its bus is R/bus,
activated by the manager's own dbus.socket), a config dir C (units in C/systemd/user/), and its own
cgroup in both the unified (v2) and the named systemd (v1) hierarchy, so that managers never share
cgroups and tearing one down cannot touch another's processes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sandbox.procs import Proc, SandboxError, wait_for

SYSTEMD = "/lib/systemd/systemd"
SYSTEMCTL = shutil.which("systemctl") or "/usr/bin/systemctl"
BUSCTL = shutil.which("busctl") or "/usr/bin/busctl"
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_TREES = ("unified", "systemd")
CGROUP_PREFIX = "norm-sbx-"
# sockaddr_un.sun_path is 108 bytes and the manager binds R/systemd/private; a runtime dir whose path
# is longer than this goes under SHORT_RUNTIME_ROOT instead (named by a hash of the work dir).
_MAX_RUNTIME_DIR = 88
SHORT_RUNTIME_ROOT = Path("/run/norm-systemd")
_serial = itertools.count(1)  # makes cgroup names unique among the managers of one process


def cgroup_paths(cgroup: str) -> list[Path]:
    """The directories of one sandbox cgroup in each hierarchy."""
    return [CGROUP_ROOT / tree / cgroup for tree in CGROUP_TREES]


def _cgroup_procs(top: Path) -> list[int]:
    """Every pid in `top` and the cgroups below it."""
    pids: list[int] = []
    for procs in top.rglob("cgroup.procs"):
        with contextlib.suppress(OSError, ValueError):
            pids += [int(line) for line in procs.read_text().split()]
    return pids


def _cgroup_empty(top: Path) -> bool:
    events = top / "cgroup.events"
    if events.exists():  # v2: the kernel keeps the answer for the whole subtree
        return "populated 0" in events.read_text()
    return not _cgroup_procs(top)


def remove_cgroup(cgroup: str, timeout: float = 10.0) -> None:
    """Kill everything in a sandbox cgroup and remove its directories in both hierarchies.

    Only names starting with `norm-sbx-` are touched: those are the ones this module creates.
    Missing directories are fine (idempotent).
    """
    if not cgroup.startswith(CGROUP_PREFIX) or "/" in cgroup:
        raise SandboxError(f"refusing to remove cgroup {cgroup!r}: not a sandbox cgroup")
    unified, legacy = cgroup_paths(cgroup)
    if unified.exists():
        with contextlib.suppress(OSError):
            (unified / "cgroup.kill").write_text("1")
    # cgroup.kill covers the processes of both trees (they are the same processes); SIGKILL any
    # stragglers the v1 tree still lists, in case the v2 kill raced with a fork.
    for top in (unified, legacy):
        if top.exists():
            for pid in _cgroup_procs(top):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    for top in (unified, legacy):
        if top.exists():
            wait_for(functools.partial(_cgroup_empty, top), timeout=timeout, what=f"cgroup {top} empty")
    for top in (unified, legacy):
        wait_for(functools.partial(_rmdir_tree, top), timeout=timeout, what=f"cgroup {top} removed")


def _rmdir_tree(top: Path) -> bool:
    """Remove a cgroup dir and its children, deepest first; whether it is gone."""
    if not top.exists():
        return True
    dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
    for d in [*dirs, top]:
        with contextlib.suppress(OSError):  # EBUSY until the kernel has let go of the last task
            d.rmdir()
    return not top.exists()


@dataclass
class SystemdManager:
    """A `systemd --user` manager standing in for one host's system manager."""

    name: str
    workdir: Path
    cgroup: str = ""
    proc: Proc | None = None
    # Its own messages to its log file (the default target, the journal, does not run here).
    extra_args: tuple[str, ...] = ("--log-target=console",)

    # -- layout ---------------------------------------------------------------------------------
    @property
    def runtime_dir(self) -> Path:
        """R: the manager's XDG_RUNTIME_DIR, holding its bus socket. Recreated empty by start()."""
        workdir = self.workdir.resolve()
        if len(str(workdir / "run")) <= _MAX_RUNTIME_DIR:
            return workdir / "run"
        return SHORT_RUNTIME_ROOT / hashlib.sha256(str(workdir).encode()).hexdigest()[:12]

    @property
    def config_dir(self) -> Path:
        return self.workdir / "config"

    @property
    def units_dir(self) -> Path:
        return self.config_dir / "systemd" / "user"

    @property
    def bus_path(self) -> Path:
        return self.runtime_dir / "bus"

    @property
    def bus_address(self) -> str:
        return f"unix:path={self.bus_path}"

    @property
    def log(self) -> Path:
        return self.workdir / "systemd.log"

    @property
    def env(self) -> dict[str, str]:
        """The environment a client of this manager (systemctl --user, busctl --user) needs."""
        return {
            "PATH": os.environ.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
            "LANG": "C.UTF-8",
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
            "XDG_CONFIG_HOME": str(self.config_dir),
            "HOME": str(self.runtime_dir),
            "DBUS_SESSION_BUS_ADDRESS": self.bus_address,
            "SYSTEMD_PAGER": "",
            "SYSTEMD_COLORS": "0",
        }

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, timeout: float = 15.0) -> None:
        """Start the manager in its own cgroups and wait until it owns its bus name."""
        if self.alive:
            return
        if not self.name or "/" in self.name:
            raise SandboxError(f"bad systemd manager name {self.name!r}")
        self.workdir = self.workdir.resolve()
        Path("/run/systemd/system").mkdir(parents=True, exist_ok=True)  # sd_booted() is true
        shutil.rmtree(self.runtime_dir, ignore_errors=True)  # a fresh /run, as after a boot
        self.runtime_dir.mkdir(parents=True, mode=0o700)
        self.runtime_dir.chmod(0o700)
        self.units_dir.mkdir(parents=True, exist_ok=True)
        # Fault tests kill the bus again and again; the stock rate limits on the bus's socket and
        # service would then leave the manager with no bus at all, which no real host sees.
        for unit, body in (("dbus.service", "[Unit]\nStartLimitIntervalSec=0\n"),
                           ("dbus.socket",
                            "[Unit]\nStartLimitIntervalSec=0\n[Socket]\nTriggerLimitIntervalSec=0\n")):
            dropin = self.units_dir / f"{unit}.d"
            dropin.mkdir(exist_ok=True)
            (dropin / "norm-sandbox.conf").write_text(body)

        if self.cgroup:  # started before: same name again, after clearing what a kill() left in it
            remove_cgroup(self.cgroup)
        else:
            self.cgroup = f"{CGROUP_PREFIX}{os.getpid()}-{next(_serial)}-{self.name}"
        paths = cgroup_paths(self.cgroup)
        for p in paths:
            p.mkdir(exist_ok=True)
        procs_files = [str(p / "cgroup.procs") for p in paths]

        def into_own_cgroups() -> None:  # runs in the child, between fork and exec
            pid = str(os.getpid()).encode()
            for f in procs_files:
                fd = os.open(f, os.O_WRONLY)
                try:
                    os.write(fd, pid)
                finally:
                    os.close(fd)

        argv = [SYSTEMD, "--user", *self.extra_args]
        self.proc = Proc(f"systemd-{self.name}", argv, self.log, env=self.env)
        try:
            self.proc.start(preexec=into_own_cgroups)
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def bus_has_owner(self) -> bool:
        """Whether org.freedesktop.systemd1 has an owner on this manager's bus."""
        if not self.bus_path.exists():
            return False
        r = subprocess.run(
            [BUSCTL, f"--address={self.bus_address}", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
             "org.freedesktop.DBus", "NameHasOwner", "s", "org.freedesktop.systemd1"],
            capture_output=True, text=True, env=self.env, timeout=5, check=False,
        )
        return r.returncode == 0 and r.stdout.strip() == "b true"

    def wait_ready(self, timeout: float = 15.0) -> None:
        # The condition is also true when the manager died, so that a crash fails fast.
        try:
            wait_for(lambda: not self.alive or self.bus_has_owner(), timeout=timeout,
                     what=f"systemd {self.name} on {self.bus_address}")
        except SandboxError as e:
            raise SandboxError(f"{e}\n{self.proc.tail() if self.proc else ''}") from None
        if not self.alive:
            raise SandboxError(f"systemd {self.name} exited:\n{self.proc.tail() if self.proc else ''}")

    def kill(self) -> None:
        """SIGKILL the manager alone (a fault): its units' processes stay in its cgroups."""
        if self.proc is not None:
            self.proc.kill()

    def stop(self) -> None:
        """SIGKILL the manager, kill everything left in its cgroups, remove the cgroups. Idempotent;
        the cgroup name is kept, so that a later start() (restart()) uses the same one."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.pid = None
        if self.cgroup:
            remove_cgroup(self.cgroup)
        if self.runtime_dir.is_relative_to(SHORT_RUNTIME_ROOT):
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def restart(self, timeout: float = 15.0) -> None:
        """A fresh manager on the same dirs, bus address and cgroup name (units are loaded again from
        disk; whatever the old one ran is killed first)."""
        self.stop()
        self.start(timeout)

    # -- control --------------------------------------------------------------------------------
    def systemctl(self, *args: str, check: bool = True, timeout: float = 30.0) -> str:
        """Run `systemctl --user ARGS` against this manager; its stdout."""
        r = subprocess.run([SYSTEMCTL, "--user", "--no-pager", *args], capture_output=True, text=True,
                           env=self.env, timeout=timeout, check=False)
        if check and r.returncode != 0:
            raise SandboxError(f"systemd {self.name}: systemctl --user {' '.join(args)} "
                               f"exited {r.returncode}: {r.stderr.strip()}")
        return r.stdout

    def write_unit(self, name: str, text: str) -> Path:
        """Write a unit file into this manager's unit dir and, if it runs, daemon-reload."""
        if "/" in name or not name:
            raise SandboxError(f"bad unit name {name!r}")
        self.units_dir.mkdir(parents=True, exist_ok=True)
        path = self.units_dir / name
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
        if self.alive:
            self.systemctl("daemon-reload")
        return path

    def unit_property(self, unit: str, prop: str) -> str:
        """One property of a unit, as `systemctl show -P` prints it."""
        return self.systemctl("show", "-P", prop, unit).strip()
