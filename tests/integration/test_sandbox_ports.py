"""The sandbox's ports: one handed out to a process is not handed to another while the first lives
(a fleet reserves its app units' ports long before the units listen on them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sandbox import procs


def test_a_claimed_port_is_not_handed_out_again_while_its_claimer_lives(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(procs, "PORT_CLAIMS", tmp_path)
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; from sandbox import procs; "
         "print(procs.free_port(), flush=True); sys.stdin.read()"],
        env={"NORM_SANDBOX_PORT_CLAIMS": str(tmp_path), "PATH": "/usr/bin:/bin"},
        cwd=Path(procs.__file__).parents[1], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        assert (tmp_path / str(port)).read_text() == str(child.pid)
        assert not procs._claim(port)  # the child holds it
        mine = procs.free_port()
        assert mine != port and not procs._claim(mine)  # and this process holds its own
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)
    assert procs._claim(port)  # its claimer gone, the port can be handed out again
