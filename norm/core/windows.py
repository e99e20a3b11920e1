"""Maintenance windows: when automatic rollouts may advance, in UTC.

A window is written `DAYS START-END`: DAYS is `*` (every day), a day (`mon`), a range (`mon-fri`) or
a list of those (`mon,wed,sat-sun`); START and END are times of day, `HH:MM` or `HH:MM:SS`, END after
START (`24:00` is the end of the day). `mon-fri 02:00-05:00` is open from 02:00 to 05:00 UTC every
weekday. A window does not span midnight: write two (`fri 22:00-24:00`, `sat 00:00-02:00`).

A fleet without windows is always open. The times are the leader's wall clock, in UTC: leaders' clocks
should agree within the seconds that matter to a window.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_TIME = r"([01][0-9]|2[0-4]):([0-5][0-9])(?::([0-5][0-9]))?"
_DAY = r"(?:mon|tue|wed|thu|fri|sat|sun)"
_DAY_SET = rf"\*|{_DAY}(?:-{_DAY})?(?:,{_DAY}(?:-{_DAY})?)*"
_WINDOW = re.compile(rf"({_DAY_SET}) {_TIME}-{_TIME}")
MAX_WINDOWS = 64


@dataclass(frozen=True)
class Window:
    days: frozenset[int]  # 0 is Monday
    start: int  # seconds into the day
    end: int

    def open_at(self, t: datetime) -> bool:
        seconds = t.hour * 3600 + t.minute * 60 + t.second
        return t.weekday() in self.days and self.start <= seconds < self.end


def _seconds(h: str, m: str, s: str | None) -> int:
    total = int(h) * 3600 + int(m) * 60 + int(s or 0)
    if total > 86400:
        raise ValueError("a time of day is at most 24:00")
    return total


def _days(text: str) -> frozenset[int]:
    if text == "*":
        return frozenset(range(7))
    out: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        a, b = DAYS.index(first), DAYS.index(last or first)
        if b < a:
            raise ValueError("a range of days runs from Monday to Sunday (mon-fri, not fri-mon)")
        out.update(range(a, b + 1))
    return frozenset(out)


def parse_window(text: str, name: str = "window") -> Window:
    """A window from its text; ValueError naming `name` (never quoting the text) otherwise."""
    m = _WINDOW.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"{name}: must be DAYS HH:MM-HH:MM in UTC, such as 'mon-fri 02:00-05:00' "
                         "(DAYS: *, a day, a range or a list: mon,wed,sat-sun)")
    try:
        window = Window(_days(m.group(1)), _seconds(*m.group(2, 3, 4)), _seconds(*m.group(5, 6, 7)))
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    if window.end <= window.start:
        raise ValueError(f"{name}: its end must come after its start (a window does not span midnight)")
    return window


def check_window(text: str, name: str) -> str:
    """The grammar check the fleet policy's field runs (norm.core.wire.Check)."""
    parse_window(text, name)
    return text


def is_open(windows: Sequence[str], at: float) -> bool:
    """Whether any of `windows` is open at `at` (a Unix time); no window: always."""
    if not windows:
        return True
    t = datetime.fromtimestamp(at, UTC)
    return any(parse_window(w).open_at(t) for w in windows)


def next_open(windows: Sequence[str], at: float) -> float | None:
    """When one of `windows` opens next after `at` (a Unix time), within a week; None without windows."""
    if not windows:
        return None
    parsed = [parse_window(w) for w in windows]
    t = datetime.fromtimestamp(at, UTC)
    midnight = t.replace(hour=0, minute=0, second=0, microsecond=0)
    best: datetime | None = None
    for day in range(8):
        base = midnight + timedelta(days=day)
        for w in parsed:
            opens = base + timedelta(seconds=w.start)
            if base.weekday() in w.days and opens > t and (best is None or opens < best):
                best = opens
    return None if best is None else best.timestamp()


def closed_reason(windows: Sequence[str], at: float) -> str | None:
    """Why a rollout may not advance at `at` for the windows (None: it may), naming when one opens."""
    if is_open(windows, at):
        return None
    opens = next_open(windows, at)
    when = "" if opens is None else \
        f"; the next opens at {datetime.fromtimestamp(opens, UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}"
    return f"outside the maintenance windows{when}"
