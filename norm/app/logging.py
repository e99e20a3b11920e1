"""structlog, configured once: JSON lines when stdout is not a terminal, console otherwise.
Context (host, and per task whatever the task binds) travels in contextvars.

Under systemd, with stdout connected to the journal (`JOURNAL_STREAM` names stdout's device and
inode, as systemd.exec(5) documents), each line starts with its syslog priority, `<N>` (sd-daemon(3)):
journald strips it and files the line at that priority, so that `journalctl -u norm -p err` shows the
errors alone. The line itself, the JSON with every structured field, is the journal's MESSAGE."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Literal, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
# syslog priorities (sd-daemon(3)'s SD_DEBUG ... SD_CRIT), by structlog's level names.
PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}


def to_journal(stream: TextIO, environ: dict[str, str] | None = None) -> bool:
    """Whether `stream` is the journal's: JOURNAL_STREAM is "<device>:<inode>" of it."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (int(device), int(inode)) == (st.st_dev, st.st_ino)
    except (ValueError, OSError):
        return False


def with_priority(renderer: structlog.typing.Processor) -> structlog.typing.Processor:
    """`renderer`'s line, prefixed with the entry's syslog priority."""
    def render(logger: Any, name: str, event_dict: structlog.typing.EventDict) -> str:
        priority = PRIORITIES.get(str(event_dict.get("level", "info")), 6)
        line = renderer(logger, name, event_dict)
        return f"<{priority}>{line.decode() if isinstance(line, bytes) else line}"

    return render


class _PriorityFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = PRIORITIES.get(record.levelname.lower(), 4)
        return f"<{priority}>{super().format(record)}"


def configure(level: str = "info", fmt: Literal["auto", "json", "console"] = "auto") -> None:
    json_out = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json_out else structlog.dev.ConsoleRenderer(colors=False))
    if to_journal(sys.stdout):
        renderer = with_priority(renderer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    # Libraries that log through the standard library (aiohttp, grpc) go to stderr at warning.
    handler = logging.StreamHandler(sys.stderr)
    form = "%(name)s: %(message)s"
    handler.setFormatter(_PriorityFormatter(form) if to_journal(sys.stderr) else logging.Formatter(form))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
