"""Values in etcd that once made Norm fail, each pinned (the fuzz campaign of test_fuzz_etcd.py
found them): a reader over a hostile store answers with a clear error or shows what it cannot read
as such, never a traceback, and prints nothing that could drive the operator's terminal."""

from __future__ import annotations

import contextlib
import io
import json
import re
import secrets
from pathlib import Path

import pytest

from norm.app import cli
from norm.core.host import units_key
from sandbox.etcd import EtcdMember

P = "/norm"
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def cli_config(tmp_path: Path, etcd: EtcdMember, machine_id: str) -> Path:
    path = tmp_path / "norm.toml"
    path.write_text(f'[etcd]\nendpoints = ["{etcd.endpoint}"]\n[host]\nmachine_id = "{machine_id}"\n')
    return path


def run_cli(config: Path, *args: str) -> tuple[int, str]:
    """One of the CLI's readers, in this process: its exit status and all it printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([*args, "--config", str(config)])
    return code, out.getvalue() + err.getvalue()


@pytest.mark.parametrize("summary", [
    "[" * 50_000 + "]" * 50_000,
    json.dumps([{"unit": "djed-web.service", "heal": "ok", "next_attempt_at": float("nan"),
                 "quarantined_until": float("inf")}]),
    json.dumps([{"unit": "djed-web.service", "heal": "ok", "next_attempt_at": 1e300,
                 "quarantined_until": -1e300}]),
    json.dumps([{"unit": "djed-\x1b[2J.service", "active_state": "\x1b]0;x\x07", "sub_state": "\r",
                 "n_restarts": "\x1b[1m", "attempts": "\x00", "heal": "ok"}]),
], ids=["nested", "nan-and-inf", "far-times", "escapes"])
def test_norm_units_over_a_hostile_summary_answers_without_a_traceback_or_an_escape(
        etcd: EtcdMember, tmp_path: Path, summary: str) -> None:
    me = secrets.token_hex(16)
    etcd.ctl("put", units_key(P, me), summary)
    code, printed = run_cli(cli_config(tmp_path, etcd, me), "units")
    assert code in (0, 1)
    assert not CONTROL.search(printed), printed
