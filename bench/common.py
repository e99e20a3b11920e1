"""What the benchmarks share: a real `norm agent` process, started the way an operator's unit would,
and waited for through sd_notify READY=1."""

from __future__ import annotations

import os
import secrets
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from sandbox.etcd import EtcdMember
from sandbox.procs import Proc, free_port

REPO = Path(__file__).resolve().parents[1]


def percentile(values: Sequence[float], p: float) -> float:
    """The `p`-th percentile (0-100) of `values`: the nearest rank, no interpolation."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def start_agent(workdir: Path, member: EtcdMember, bus: str, healing: str = "") -> tuple[Proc, socket.socket]:
    """An agent with every section of its configuration set; `healing` adds lines to [healing]."""
    config = workdir / "norm.toml"
    config.write_text(f"""
[etcd]
endpoints = ["{member.endpoint}"]
[keys]
prefix = "/norm"
[host]
machine_id = "{secrets.token_hex(16)}"
name = "bench"
environment = "prod"
role = "web"
[units]
patterns = ["djed-*.service"]
[systemd]
bus_address = "{bus}"
[healing]
enabled = true
{healing}
[docker]
host = "unix:///nonexistent/docker.sock"
[http]
listen = "127.0.0.1:{free_port()}"
[agent]
shutdown_timeout = 10
state_dir = "{workdir / 'state'}"
[log]
format = "json"
""")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(workdir / "notify.sock"))
    env = dict(os.environ, NOTIFY_SOCKET=str(workdir / "notify.sock"))
    env.pop("PYTHONASYNCIODEBUG", None)
    proc = Proc("agent", [sys.executable, "-m", "norm", "agent", "--config", str(config)],
                workdir / "agent.log", env=env, cwd=REPO)
    try:
        proc.start()
        notify.settimeout(30)
        while b"READY=1" not in notify.recv(4096):
            pass
    except BaseException:
        proc.stop()
        notify.close()
        raise
    return proc, notify
