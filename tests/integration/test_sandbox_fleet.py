"""The sandbox fleet: up, reuse, status and down (also from another process), by pid and never more."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from sandbox.etcd import ETCDCTL
from sandbox.fleet import Fleet, ProcState, State, owned
from sandbox.procs import Proc, pid_alive, wait_for
from sandbox.systemd import SystemdManager, cgroup_paths

REPO = Path(__file__).resolve().parents[2]


def sandbox_cli(run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sandbox", "--run-dir", str(run_dir), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120, check=False)


def recorded(state: State) -> list[ProcState]:
    procs = [m["proc"] for m in state["etcd"]]
    for h in state["hosts"]:
        procs += [p for p in (h["systemd"], h["docker"], h["agent"]) if p is not None]
    return procs


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "f"


def test_a_fleet_comes_up_and_goes_down(run_dir: Path) -> None:
    fleet = Fleet(run_dir, size=2, docker=False, agents=False)
    assert fleet.up() == "started"
    try:
        state = fleet.load_state()
        assert state is not None and state["complete"]
        assert fleet.problems() == []
        assert len(state["etcd"]) == 3 and len(state["hosts"]) == 2

        # One etcd cluster of three members, reachable through every endpoint.
        fleet.etcdctl("put", "/sandbox-test", "ok")
        for endpoint in state["endpoints"]:
            out = subprocess.run(["etcdctl", "--endpoints", endpoint, "get", "--print-value-only",
                                  "/sandbox-test"], capture_output=True, text=True, check=True,
                                 env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"})
            assert out.stdout.strip() == "ok"

        ids = [h["machine_id"] for h in state["hosts"]]
        assert len(set(ids)) == 2 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
        for h in state["hosts"]:
            manager = SystemdManager(h["name"], Path(h["systemd_dir"]))
            assert manager.bus_address == h["bus_address"]
            assert manager.bus_has_owner()
            assert all(p.is_dir() for p in cgroup_paths(h["cgroup"]))
            config = tomllib.loads(Path(h["config"]).read_text())
            assert config == {
                "etcd": {"endpoints": state["endpoints"]},
                "host": {"machine_id": h["machine_id"], "environment": "sandbox", "role": "web",
                         "name": h["name"]},
                "http": {"listen": h["http_listen"]},
                "systemd": {"bus_address": h["bus_address"]},
                "docker": {"host": h["docker_host"]},
                "agent": {"state_dir": str(Path(h["dir"]) / "state")},
            }
            assert (Path(h["dir"]) / "machine-id").read_text().strip() == h["machine_id"]
    finally:
        said = fleet.down()

    assert any("stopped etcd0" in s for s in said)
    assert not fleet.state_path.exists()
    assert not any(pid_alive(p["pid"]) for p in recorded(state))
    assert not any(p.exists() for h in state["hosts"] for p in cgroup_paths(h["cgroup"]))


def test_state_round_trip_and_down_from_another_process(run_dir: Path) -> None:
    first = Fleet(run_dir, size=1, docker=False, agents=False)
    first.up()
    try:
        state = first.load_state()
        assert state is not None
        assert json.loads(first.state_path.read_text()) == state

        # Another Fleet object (as another process would) sees the same fleet and reuses it.
        second = Fleet(run_dir, size=1, docker=False, agents=False)
        assert second.load_state() == state
        assert second.up() == "reused"
        assert second.load_state() == state
        assert all(owned(p) for p in recorded(state))

        status = sandbox_cli(run_dir, "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert state["hosts"][0]["machine_id"] in status.stdout

        down = sandbox_cli(run_dir, "down")
        assert down.returncode == 0, down.stdout + down.stderr
        assert "sandbox fleet stopped" in down.stdout
        assert not any(owned(p) for p in recorded(state))
        assert not any(pid_alive(p["pid"]) for p in recorded(state))
        assert not any(p.exists() for p in cgroup_paths(state["hosts"][0]["cgroup"]))

        again = sandbox_cli(run_dir, "down")
        assert again.returncode == 0, again.stdout + again.stderr
        assert "no sandbox fleet recorded" in again.stdout
        assert sandbox_cli(run_dir, "status").returncode == 3
    finally:
        first.down()  # harmless: nothing is recorded any more
    assert first.down() == [f"no sandbox fleet recorded in {run_dir.resolve()}"]


def test_down_never_stops_what_it_did_not_start(run_dir: Path, tmp_path: Path) -> None:
    fleet = Fleet(run_dir, size=1, docker=False, agents=False)
    fleet.up()
    bystander = Proc("bystander", ["/bin/sleep", "300"], tmp_path / "bystander.log")
    bystander.start()
    try:
        state = fleet.load_state()
        assert state is not None
        # The agent's pid is now someone else's process (as after pid reuse): down must leave it alone.
        assert bystander.pid is not None
        state["hosts"][0]["agent"] = ProcState(
            name="agent-host1", pid=bystander.pid, argv=["/work/main/.venv/bin/python", "-m", "norm"],
            starttime=1, log=str(tmp_path / "agent.log"))
        fleet.state_path.write_text(json.dumps(state))

        assert fleet.problems() != []  # a fleet whose agent is not ours is not healthy
        said = fleet.down()

        assert f"pid {bystander.pid} is no longer agent-host1: left alone" in said
        assert bystander.alive
        assert not any(pid_alive(m["proc"]["pid"]) for m in state["etcd"])
    finally:
        bystander.stop()
        fleet.down()


def test_up_replaces_a_fleet_that_is_no_longer_healthy(run_dir: Path) -> None:
    fleet = Fleet(run_dir, size=1, docker=False, agents=False)
    fleet.up()
    try:
        before = fleet.load_state()
        assert before is not None
        victim = Proc("etcd1", before["etcd"][1]["proc"]["argv"], Path(before["etcd"][1]["proc"]["log"]),
                      pid=before["etcd"][1]["proc"]["pid"])
        victim.kill()
        assert any("etcd1" in p for p in fleet.problems())

        again = Fleet(run_dir, size=1, docker=False, agents=False)
        try:
            assert again.up() == "started"
            after = again.load_state()
            assert after is not None and again.problems() == []
            assert not any(pid_alive(p["pid"]) for p in recorded(before))
            assert {p["pid"] for p in recorded(after)}.isdisjoint(p["pid"] for p in recorded(before))
        finally:
            again.down()
    finally:
        fleet.down()


@pytest.mark.slow
def test_a_fleet_with_docker_engines(run_dir: Path) -> None:
    fleet = Fleet(run_dir, size=2, docker=True, agents=False)
    fleet.up()
    try:
        state = fleet.load_state()
        assert state is not None and state["docker"]
        assert fleet.problems() == []
        hosts = {h["docker_host"] for h in state["hosts"]}
        assert len(hosts) == 2
        for h in state["hosts"]:
            assert h["docker"] is not None and owned(h["docker"])
            assert tomllib.loads(Path(h["config"]).read_text())["docker"]["host"] == h["docker_host"]
    finally:
        fleet.down()
    assert not any(pid_alive(p["pid"]) for p in recorded(state))


def _reads(endpoint: str) -> bool:
    """Whether a linearizable read on this member alone succeeds (it needs the cluster's leader)."""
    r = subprocess.run([ETCDCTL, "--endpoints", endpoint, "--command-timeout", "2s", "get", "/probe"],
                       capture_output=True, text=True, timeout=30, check=False)
    return r.returncode == 0


def test_an_isolatable_fleet_cuts_etcd0_off_from_its_peers_and_down_removes_its_namespace(
        run_dir: Path) -> None:
    fleet = Fleet(run_dir, size=1, docker=False, agents=False, isolatable_etcd=True)
    fleet.up()
    try:
        state = fleet.load_state()
        assert state is not None and state.get("netns")
        netns = state["netns"]["name"]
        cut, other = state["etcd"][0]["endpoint"], state["etcd"][1]["endpoint"]
        assert fleet.isolate_etcd() == "etcd0"
        # Its clients still reach it, but it has no leader: it cannot serve a read; the others can.
        wait_for(lambda: not _reads(cut), timeout=60, what="etcd0 cut off")
        assert _reads(other)
        fleet.heal_etcd()
        wait_for(lambda: _reads(cut), timeout=60, what="etcd0 back with its peers")

        down = sandbox_cli(run_dir, "down")
        assert down.returncode == 0, down.stdout + down.stderr
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        assert netns not in names
    finally:
        fleet.down()


def test_a_fleet_with_haproxy_in_front_of_the_web_units(run_dir: Path) -> None:
    from sandbox.app import reserve_ports
    from sandbox.haproxy import HaproxyServer

    fleet = Fleet(run_dir, size=2, docker=False, agents=False, haproxy=True)
    assert fleet.up() == "started"
    try:
        state = fleet.load_state()
        assert state is not None and state["complete"] and fleet.problems() == []
        lb = state.get("haproxy")
        assert lb is not None and owned(lb["proc"])
        assert fleet.haproxy_url() == lb["url"] == f"http://127.0.0.1:{lb['port']}"
        # The web ports are reserved before the units are installed; HAProxy has one server per host,
        # named after it, on that port, every one in maintenance until its agent puts it in.
        ports = reserve_ports(state["hosts"])
        runtime = HaproxyServer(Path(lb["dir"]), port=lb["port"])
        servers = runtime.command(f"show servers state {lb['backend']}")
        rows = [line.split() for line in servers.splitlines()[2:] if line.strip()]
        assert [(r[3], r[4], int(r[18]), int(r[6])) for r in rows] == [
            (h["name"], "127.0.0.1", ports[h["name"]][0], 5) for h in state["hosts"]]
        for h in state["hosts"]:
            config = tomllib.loads(Path(h["config"]).read_text())
            assert config["lb"] == {
                "backend": "haproxy", "haproxy_backends": ["web"], "haproxy_server": h["name"],
                "haproxy_socket": lb["socket"], "drain_timeout": 10, "health_timeout": 1,
                "health_url": f"http://127.0.0.1:{ports[h['name']][0]}/healthz"}
        # The frontend answers; with every server out, HAProxy itself answers 503.
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(lb["url"], timeout=10)
        assert answer.value.code == 503
        # A fleet without HAProxy is not this one: asked for, it is started again.
        assert Fleet(run_dir, size=2, docker=False, agents=False)._mismatch(state) is not None

        down = sandbox_cli(run_dir, "down")  # from another process, by pid
        assert down.returncode == 0, down.stdout + down.stderr
        assert "stopped haproxy" in down.stdout
        assert not pid_alive(lb["proc"]["pid"])
    finally:
        fleet.down()
