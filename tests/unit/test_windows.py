"""Maintenance windows: their grammar, when they are open, when the next opens."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from norm.core.windows import closed_reason, is_open, next_open, parse_window

MON_0300 = datetime(2026, 11, 30, 3, 0, tzinfo=UTC).timestamp()  # a Monday


@pytest.mark.parametrize(("text", "days", "start", "end"), [
    ("mon-fri 02:00-05:00", {0, 1, 2, 3, 4}, 7200, 18000),
    ("* 00:00-24:00", set(range(7)), 0, 86400),
    ("sat,sun 10:30:15-10:30:45", {5, 6}, 37815, 37845),
    ("mon,wed,fri-sun 23:00-23:59:59", {0, 2, 4, 5, 6}, 82800, 86399),
])
def test_a_window_is_read_as_written(text: str, days: set[int], start: int, end: int) -> None:
    w = parse_window(text)
    assert (set(w.days), w.start, w.end) == (days, start, end)


@pytest.mark.parametrize("text", [
    "", "mon-fri", "mon-fri 02:00", "fri-mon 02:00-05:00", "mon 05:00-02:00", "mon 02:00-02:00",
    "mon 25:00-26:00", "Mon 02:00-05:00", "mon  02:00-05:00", "mon 2:00-5:00", "mon 02:00-24:01",
    "mon 02:00-05:00\n", "mon 02:60-05:00",
])
def test_a_window_outside_the_grammar_is_refused_naming_the_field(text: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_window(text, "windows[3]")
    assert str(e.value).startswith("windows[3]: ")
    assert not text.strip() or text.strip() in "mon-fri 02:00-05:00" or text.strip() not in str(e.value)


def test_open_and_the_next_opening() -> None:
    windows = ("mon-fri 02:00-05:00", "sat 10:00-11:00")
    assert is_open((), MON_0300) and closed_reason((), MON_0300) is None and next_open((), MON_0300) is None
    assert is_open(windows, MON_0300)
    assert is_open(windows, MON_0300 + 7199) and not is_open(windows, MON_0300 + 7200)  # 05:00 is out
    after = MON_0300 + 7200
    assert next_open(windows, after) == MON_0300 + 86400 - 3600  # Tuesday 02:00
    friday_late = MON_0300 + 4 * 86400 + 3 * 3600  # Friday 06:00
    assert next_open(windows, friday_late) == MON_0300 + 5 * 86400 + 7 * 3600  # Saturday 10:00
    reason = closed_reason(windows, after)
    assert reason == "outside the maintenance windows; the next opens at 2026-12-01T02:00:00Z"
