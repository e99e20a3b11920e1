"""A network namespace of the sandbox's own, joined to this machine's by a veth pair.

A process run in it (`wrap(argv)`) is reached from here at `inner`; it reaches this side at `outer`.
Traffic stays on this machine. Firewall rules for faults go *inside* the namespace (`isolate`), so
they touch no rule of the host's, and they vanish with the namespace: `remove()` deletes the
namespace and the veth pair, whatever state a failed test left them in.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field

from sandbox.procs import SandboxError

IP = shutil.which("ip") or "/usr/sbin/ip"
IPTABLES = shutil.which("iptables") or "/usr/sbin/iptables"


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    if check and r.returncode != 0:
        raise SandboxError(f"{' '.join(argv)}: {r.stderr.strip()}")
    return r


def _free_subnet() -> ipaddress.IPv4Network:
    """A /30 in 10.0.0.0/8 that no address of this machine is in."""
    used = _run(IP, "-4", "-o", "addr", "show").stdout
    for _ in range(100):
        net = ipaddress.IPv4Network((f"10.{secrets.randbelow(200) + 50}.{secrets.randbelow(256)}.0", 30))
        if f" 10.{net.network_address.packed[1]}.{net.network_address.packed[2]}." not in used:
            return net
    raise SandboxError("no free 10.x.y.0/30 for a network namespace")


def exec_argv(argv: list[str]) -> list[str]:
    """The command line a process started with `argv` has once running: `ip netns exec` execs its
    program, which keeps the pid (and start time) under its own command line."""
    if len(argv) > 4 and os.path.basename(argv[0]) == "ip" and argv[1:3] == ["netns", "exec"]:
        return argv[4:]
    return argv


@dataclass
class NetNs:
    """`with NetNs() as ns:` creates it; leaving the block removes everything it made."""

    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    name: str = ""
    outer: str = ""
    inner: str = ""
    _made: bool = False

    def __post_init__(self) -> None:
        self.name = self.name or f"norm-{os.getpid()}-{self.tag}"
        self.outer_link, self.inner_link = f"nv{self.tag}o", f"nv{self.tag}i"  # at most 15 characters

    def saved(self) -> dict[str, str]:
        """What another process needs to find this namespace again (`NetNs.of(saved)`)."""
        return {"tag": self.tag, "name": self.name, "outer": self.outer, "inner": self.inner}

    @classmethod
    def of(cls, saved: dict[str, str]) -> NetNs:
        """A namespace made by another process, from what it saved: its rules can be changed and
        `remove()` deletes it."""
        return cls(tag=saved["tag"], name=saved["name"], outer=saved["outer"], inner=saved["inner"],
                   _made=True)

    def __enter__(self) -> NetNs:
        self.create()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def create(self) -> None:
        net = _free_subnet()
        outer, inner = list(net.hosts())
        self.outer, self.inner = str(outer), str(inner)
        self._made = True  # from here on remove() cleans up, whatever step fails
        _run(IP, "netns", "add", self.name)
        _run(IP, "link", "add", self.outer_link, "type", "veth", "peer", "name", self.inner_link)
        _run(IP, "link", "set", self.inner_link, "netns", self.name)
        _run(IP, "addr", "add", f"{self.outer}/30", "dev", self.outer_link)
        _run(IP, "link", "set", self.outer_link, "up")
        _run(IP, "-n", self.name, "addr", "add", f"{self.inner}/30", "dev", self.inner_link)
        _run(IP, "-n", self.name, "link", "set", self.inner_link, "up")
        _run(IP, "-n", self.name, "link", "set", "lo", "up")

    def wrap(self, argv: list[str]) -> list[str]:
        """argv run inside the namespace (`ip netns exec` execs it: the pid is the program's)."""
        return [IP, "netns", "exec", self.name, *argv]

    def iptables(self, *args: str) -> None:
        _run(*self.wrap([IPTABLES, "-w", *args]))

    def isolate(self, *, except_ports: tuple[int, ...]) -> None:
        """Drop every TCP packet in or out of the namespace except those to or from `except_ports`
        on the inner side (a member's client port: clients reach it, its peers do not)."""
        for port in except_ports:
            self.iptables("-A", "INPUT", "-p", "tcp", "--dport", str(port), "-j", "ACCEPT")
            self.iptables("-A", "OUTPUT", "-p", "tcp", "--sport", str(port), "-j", "ACCEPT")
        self.iptables("-A", "INPUT", "-i", "lo", "-j", "ACCEPT")
        self.iptables("-A", "OUTPUT", "-o", "lo", "-j", "ACCEPT")
        self.iptables("-A", "INPUT", "-j", "DROP")
        self.iptables("-A", "OUTPUT", "-j", "DROP")

    def heal(self) -> None:
        self.iptables("-F", "INPUT")
        self.iptables("-F", "OUTPUT")

    def remove(self) -> None:
        if not self._made:
            return
        self._made = False
        with contextlib.suppress(SandboxError, subprocess.TimeoutExpired):
            _run(IP, "netns", "del", self.name, check=False)
        with contextlib.suppress(SandboxError, subprocess.TimeoutExpired):
            # Gone with the namespace's end of the pair, usually; make sure.
            _run(IP, "link", "del", self.outer_link, check=False)
