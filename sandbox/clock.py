"""A process's wall clock set off from this machine's, with libfaketime (the Debian package `faketime`,
which scripts/bootstrap.sh installs): what an agent on a host with a wrong clock, or after an NTP
step, sees. Its monotonic clock is left alone (FAKETIME_DONT_FAKE_MONOTONIC), as on a real host."""

from __future__ import annotations

import glob

from sandbox.procs import SandboxError


def libfaketime() -> str:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not found:
        raise SandboxError("libfaketime is missing: scripts/bootstrap.sh installs the `faketime` package")
    return found[0]


def skewed_env(seconds: int) -> dict[str, str]:
    """The environment that runs a process with its wall clock `seconds` off, its monotonic clock not."""
    return {"LD_PRELOAD": libfaketime(), "FAKETIME": f"{seconds:+d}s", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
