"""The live view of a rollout on stdout, drawn from `norm.app.views`: on a terminal it is redrawn in
place; otherwise each change is one line (or, with --json, one JSON object)."""

from __future__ import annotations

import json
import os
import shutil
import sys

from norm.app import views
from norm.app.cli import tell
from norm.core.tracker import Tracker


class Screen:
    def __init__(self, json_lines: bool = False, once: bool = False) -> None:
        self.json_lines = json_lines
        self.tty = not once and sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
        self.frame: views.Frame = []
        self.drawn = 0
        self.last_json = ""

    def show(self, t: Tracker) -> Tracker:
        """Draw what changed in `t`, after saying what was skipped; `t` with that said."""
        if tell([views.skipped(s) for s in t.skipped]):
            self.drawn = 0  # the notes went between: draw anew below them
            self.frame = []
        progress = views.progress_of(t)
        if self.json_lines:
            text = json.dumps(views.progress_json(progress, t.verdict), sort_keys=True, default=str)
            if text != self.last_json:
                print(text, flush=True)
                self.last_json = text
            return t.said()
        frame = views.rollout_frame(progress)
        if frame == self.frame:
            return t.said()
        if self.tty:
            lines = [text for _, text in frame]
            sys.stdout.write(views.redraw(self.drawn, lines, shutil.get_terminal_size().columns))
            self.drawn = len(lines)
        else:
            for line in views.changed_lines(self.frame, frame):
                print(line)
        sys.stdout.flush()
        self.frame = frame
        return t.said()
