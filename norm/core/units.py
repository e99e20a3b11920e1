"""What Norm knows of one systemd unit: plain data read over D-Bus, and unit-name validation."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from norm.core.errors import InvalidValue

# systemd's unit name grammar: [a-zA-Z0-9:_.\\-]+ with an optional single '@' instance part, then a
# known suffix; at most 255 characters (unit-name.c).
UNIT_TYPES = ("service", "socket", "target", "device", "mount", "automount", "swap", "timer", "path",
              "slice", "scope")
_UNIT_NAME = re.compile(r"[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.\\-]*)?\.(" + "|".join(UNIT_TYPES) + ")")


def valid_unit_name(name: str) -> bool:
    return len(name) <= 255 and _UNIT_NAME.fullmatch(name) is not None


def parse_unit_name(name: str, where: str) -> str:
    if not valid_unit_name(name):
        raise InvalidValue(where, "not a systemd unit name (letters, digits, ':_.\\-', one '@', and a "
                                  "suffix such as .service)")
    return name


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


@dataclass(frozen=True)
class UnitState:
    """A unit's state as systemd reports it. Times are CLOCK_MONOTONIC microseconds (systemd's own
    `*TimestampMonotonic` properties); 0 means never."""

    name: str
    load_state: str = "loaded"  # loaded, not-found, bad-setting, error, masked
    active_state: str = "inactive"  # active, reloading, inactive, failed, activating, deactivating
    sub_state: str = "dead"  # running, exited, failed, auto-restart, start, stop-sigterm, ...
    result: str = "success"  # success, exit-code, signal, core-dump, watchdog, start-limit-hit, ...
    n_restarts: int = 0  # restarts systemd itself made (Restart=)
    invocation_id: str = ""  # hex; changes with every start
    restart: str = "no"  # the Restart= setting
    need_daemon_reload: bool = False  # the unit file changed on disk since it was loaded
    main_pid: int = 0
    active_enter_usec: int = 0  # ActiveEnterTimestampMonotonic
    inactive_enter_usec: int = 0  # InactiveEnterTimestampMonotonic

    @property
    def healthy(self) -> bool:
        return self.active_state in ("active", "reloading")

    @property
    def failed(self) -> bool:
        return self.active_state == "failed"

    @property
    def systemd_will_restart(self) -> bool:
        """systemd has scheduled a restart of its own (Restart= set, limit not reached)."""
        return self.sub_state == "auto-restart"

    @property
    def in_transition(self) -> bool:
        return self.active_state in ("activating", "deactivating") and not self.systemd_will_restart
