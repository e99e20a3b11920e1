"""Log lines carry their syslog priority to the journal: `<N>` before each line, only when stdout is
the journal's stream (JOURNAL_STREAM), the line itself unchanged (its structured fields kept)."""

from __future__ import annotations

import json
import os
import tempfile

import structlog

from norm.app.logging import PRIORITIES, to_journal, with_priority


def test_the_journal_is_recognised_by_its_stream_device_and_inode() -> None:
    with tempfile.TemporaryFile("w") as f:
        st = os.fstat(f.fileno())
        assert to_journal(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not to_journal(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not to_journal(f, {})
        assert not to_journal(f, {"JOURNAL_STREAM": "garbage"})


def test_each_line_starts_with_its_priority_and_keeps_its_fields() -> None:
    render = with_priority(structlog.processors.JSONRenderer())
    for level, priority in (("debug", 7), ("info", 6), ("warning", 4), ("error", 3), ("critical", 2)):
        line = render(None, "", {"event": "x.happened", "level": level, "unit": "djed-web.service"})
        assert isinstance(line, str) and line.startswith(f"<{priority}>{{")
        assert json.loads(line[len(f"<{priority}>"):]) == {"event": "x.happened", "level": level,
                                                           "unit": "djed-web.service"}
    assert PRIORITIES["error"] == 3  # what `journalctl -p err` shows
