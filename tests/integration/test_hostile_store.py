"""Values in etcd that once made Norm fail, each pinned (the fuzz campaign of test_fuzz_etcd.py
found them). The agent over a hostile store refuses the value, counts it and runs on; the CLI's readers
answer with a clear error or show what they cannot read as such, never a traceback, and print nothing
that could drive the operator's terminal."""

from __future__ import annotations

import contextlib
import io
import json
import re
import secrets
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from norm.app import cli
from norm.core import protocol as proto
from norm.core.host import units_key
from norm.core.record import Phase, Release
from sandbox.etcd import EtcdMember
from sandbox.procs import wait_for
from sandbox.systemd import SystemdManager
from tests.plugins.agent import AgentProc

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
    '[{"unit": "djed-web.service", "heal": "ok", "next_attempt_at": ' + "9" * 400 + "}]",
    json.dumps([{"unit": "djed-\x1b[2J.service", "active_state": "\x1b]0;x\x07", "sub_state": "\r",
                 "n_restarts": "\x1b[1m", "attempts": "\x00", "heal": "ok"}]),
], ids=["nested", "nan-and-inf", "far-times", "past-a-float", "escapes"])
def test_norm_units_over_a_hostile_summary_answers_without_a_traceback_or_an_escape(
        etcd: EtcdMember, tmp_path: Path, summary: str) -> None:
    me = secrets.token_hex(16)
    etcd.ctl("put", units_key(P, me), summary)
    code, printed = run_cli(cli_config(tmp_path, etcd, me), "units")
    assert code in (0, 1)
    assert not CONTROL.search(printed), printed


def rejected(agent: AgentProc, key: str) -> float:
    with urllib.request.urlopen(f"{agent.url}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "norm_rejected_values_total" and s.labels.get("key") == key)


def update_agent(etcd: EtcdMember, systemd_manager: SystemdManager, agents: Callable[..., AgentProc],
                 tmp_path: Path) -> AgentProc:
    """An agent in update mode (no Docker engine) over what the test put in etcd, its web unit
    running, started and ready."""
    systemd_manager.write_unit("djed-web.service", "[Service]\nExecStart=/bin/sleep infinity\n")
    systemd_manager.systemctl("start", "djed-web.service")
    agent = agents([etcd.endpoint], systemd_bus=systemd_manager.bus_address,
                   extra_toml=('[docker]\nhost = "unix:///nonexistent/docker.sock"\n'
                               f'[update]\nimage = "127.0.0.1:5000/djed/app"\n'
                               f'release_file = "{tmp_path / "release.env"}"\n'))
    agent.wait_notify("READY=1", timeout=60)
    return agent


def pulling(**kw: float) -> proto.Header:
    """A header of rollout 7 in its pull barrier."""
    return proto.Header(revision=7, tag="v2", phase=Phase.PULL, digest="sha256:" + "2" * 64,
                        previous=Release("v1", "sha256:" + "1" * 64), hosts_count=1, **kw)


def test_an_agent_over_a_participant_list_nested_too_deep_refuses_it_and_runs(
        etcd: EtcdMember, systemd_manager: SystemdManager, agents: Callable[..., AgentProc],
        tmp_path: Path) -> None:
    etcd.ctl("put", proto.hosts_list_key(P, 7), "[" * 50_000 + "]" * 50_000)
    etcd.ctl("put", proto.header_key(P), pulling().encode().decode())
    agent = update_agent(etcd, systemd_manager, agents, tmp_path)
    wait_for(lambda: rejected(agent, "rollout hosts") == 1, timeout=30, what="the participant list refused")
    assert agent.proc is not None and agent.proc.alive
    assert "Traceback" not in agent.logs()


@pytest.mark.parametrize("command", ["stop", "start"])
def test_norm_units_stop_and_start_over_a_summary_nested_too_deep_time_out_without_a_traceback(
        etcd: EtcdMember, tmp_path: Path, command: str) -> None:
    me = secrets.token_hex(16)
    etcd.ctl("put", units_key(P, me), "[" * 50_000 + "]" * 50_000)
    code, printed = run_cli(cli_config(tmp_path, etcd, me), "units", command, "djed-web.service",
                            "--timeout", "2")
    assert code == 1
    assert "the agent did not confirm within 2s" in printed


def test_an_agent_over_headers_with_times_past_a_float_refuses_them_and_runs(
        etcd: EtcdMember, systemd_manager: SystemdManager, agents: Callable[..., AgentProc],
        tmp_path: Path) -> None:
    header = pulling(started_at=1.5)
    huge = header.encode().replace(b'"started_at":1.5', b'"started_at":' + b"9" * 400)
    etcd.ctl("put", proto.header_key(P), huge.decode())
    agent = update_agent(etcd, systemd_manager, agents, tmp_path)
    # The header is read at start by the executor and by the leader.
    wait_for(lambda: rejected(agent, proto.header_key(P)) >= 2, timeout=30,
             what="the header refused at start")
    before = rejected(agent, proto.header_key(P))
    infinite = header.encode().replace(b'"started_at":1.5', b'"started_at":1e400')
    etcd.ctl("put", proto.header_key(P), infinite.decode())
    wait_for(lambda: rejected(agent, proto.header_key(P)) > before, timeout=30,
             what="the header refused as it was written")
    assert agent.proc is not None and agent.proc.alive
    assert "Traceback" not in agent.logs()
