"""`norm agent` as a process against real etcd: lifecycle, registration, endpoints, election."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from norm.adapters.etcd import Etcd, Event, Leadership, NotLeader, Put, Resync
from norm.core.config import EtcdConfig
from norm.core.host import HostRecord
from sandbox.etcd import EtcdCluster, EtcdMember
from sandbox.procs import free_port, wait_for
from sandbox.systemd import SystemdManager
from tests.plugins.agent import AgentProc
from tests.plugins.etcd import Pki


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_agent_starts_registers_serves_and_stops_cleanly(
        etcd: EtcdMember, agents: Callable[..., AgentProc]) -> None:
    agent = agents([etcd.endpoint])
    agent.wait_notify("READY=1")

    record = HostRecord.decode(etcd.ctl("get", f"/norm/hosts/{agent.machine_id}", "--print-value-only")
                               .strip().encode(), "test")
    assert (record.machine_id, record.name, record.environment, record.role) == (
        agent.machine_id, "host1", "test", "web")

    status, body = http_get(f"{agent.url}/readyz")
    assert status == 200 and json.loads(body)["ready"] is True
    assert http_get(f"{agent.url}/healthz")[0] == 200
    status, metrics = http_get(f"{agent.url}/metrics")
    assert status == 200
    for name in ("norm_build_info", "norm_etcd_connected 1.0", "norm_host_registered 1.0",
                 "norm_watch_events_total", "norm_watch_resyncs_total"):
        assert name in metrics, name

    etcd.ctl("put", "/djed-version", "v2")
    etcd.ctl("put", "/djed-version", "x;reboot")
    # The watcher counts the event and the refusal; wait for the log line that says so.
    wait_for(lambda: "desired.rejected" in agent.logs(), timeout=10, what="the refusal logged")
    _, metrics = http_get(f"{agent.url}/metrics")
    assert 'norm_watch_events_total{key="/djed-version"} 2.0' in metrics
    assert 'norm_rejected_values_total{key="/djed-version"} 1.0' in metrics
    assert "x;reboot" not in agent.logs()

    started = time.monotonic()
    assert agent.proc is not None
    agent.proc.signal(signal.SIGTERM)
    agent.wait_notify("STOPPING=1", timeout=5)
    assert agent.wait_exit(timeout=5 + 1) == 0
    assert time.monotonic() - started < 5
    assert etcd.ctl("get", "--prefix", "/norm/hosts/").strip() == ""
    lines = [json.loads(line) for line in agent.logs().splitlines() if line.startswith("{")]
    assert {"host.deregistered", "agent.stopped"} <= {line["event"] for line in lines}
    assert all(line.get("host") == "host1" for line in lines)


def test_a_service_that_dies_stops_the_agent_with_a_failure(
        etcd: EtcdMember, agents: Callable[..., AgentProc]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        agent = agents([etcd.endpoint], http_port=taken.getsockname()[1])
        assert agent.wait_exit(timeout=15) == 1
    assert "agent.service_died" in agent.logs()
    assert "READY=1" not in agent.drain_notify()


def test_sd_watchdog_is_pinged_while_the_loop_runs(
        etcd: EtcdMember, agents: Callable[..., AgentProc]) -> None:
    agent = agents([etcd.endpoint], env={"WATCHDOG_USEC": "400000"})
    agent.wait_notify("READY=1")
    seen = agent.wait_notify("WATCHDOG=1", timeout=5)
    assert "WATCHDOG=1" in seen


def test_a_certificate_file_that_cannot_be_used_exits_2_with_the_reason(
        etcd_tls: EtcdMember, agents: Callable[..., AgentProc], pki: Pki, tmp_path: Path) -> None:
    not_pem = tmp_path / "not-a-certificate.pem"
    not_pem.write_text("this is not a certificate\n")
    for name, ca in (("missing", tmp_path / "missing.pem"), ("garbled", not_pem)):
        agent = agents([etcd_tls.endpoint], name=name, env={
            "NORM_ETCD__CA_FILE": str(ca), "NORM_ETCD__CERT_FILE": str(pki.client_cert),
            "NORM_ETCD__KEY_FILE": str(pki.client_key)})
        assert agent.wait_exit(timeout=30) == 2
        assert "etcd.ca_file" in agent.logs() and str(ca) in agent.logs()
        assert "READY=1" not in agent.drain_notify()


class ClosingListener:
    """A TCP port that accepts connections and closes them at once, as a load balancer with no live
    backend, or a server on its way up or down, does: every TLS handshake through it fails."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="closing-listener", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.sock.close()


def test_a_tls_handshake_that_fails_at_start_is_retried_until_etcd_answers(
        etcd_tls: EtcdMember, agents: Callable[..., AgentProc], pki: Pki, tmp_path: Path) -> None:
    port = free_port()
    listener = ClosingListener(port)
    member = EtcdMember("etcd-late", tmp_path / "etcd-late", client_port=port, tls=etcd_tls.tls)
    try:
        agent = agents([f"https://127.0.0.1:{port}"], env={
            "NORM_ETCD__CA_FILE": str(pki.ca), "NORM_ETCD__CERT_FILE": str(pki.client_cert),
            "NORM_ETCD__KEY_FILE": str(pki.client_key)})
        wait_for(lambda: agent.logs().count('"event": "agent.etcd_tls_failed"') >= 2
                 or not agent.proc.alive,  # type: ignore[union-attr]
                 timeout=60, what="the agent retrying the TLS handshake")
        assert agent.proc is not None and agent.proc.alive, agent.logs()
        assert "TLS with etcd failed" in agent.logs() and listener.accepted >= 2
        listener.close()
        member.start()
        agent.wait_notify("READY=1", timeout=60)
        assert agent.proc.alive
    finally:
        listener.close()
        member.stop()



async def test_killing_the_leader_agent_moves_leadership_within_ttl_plus_one_second(
        etcd_cluster: EtcdCluster, agents: Callable[..., AgentProc],
        systemd_managers: Callable[[int], list[SystemdManager]],
        etcd_config: Callable[..., EtcdConfig]) -> None:
    fleet = [agents(etcd_cluster.endpoints, systemd_bus=m.bus_address, updates=True)
             for m in systemd_managers(3)]
    for a in fleet:
        await asyncio.to_thread(a.wait_notify, "READY=1")
    by_id = {a.machine_id: a for a in fleet}
    async with Etcd(etcd_config(*etcd_cluster.endpoints)) as client:
        async with client.watch("/norm/leader") as w:
            first = await anext(w)
            while not (isinstance(first, Resync) and first.snapshot.kvs):
                first = await anext(w)  # the leader key appears once some agent has won
            assert isinstance(first, Resync)
            old = first.snapshot.kvs[0]
            leader = by_id[old.value.decode()]
            ttl = 3
            loop = asyncio.get_running_loop()
            assert leader.proc is not None
            await asyncio.to_thread(leader.proc.kill)
            killed_at = loop.time()
            async with asyncio.timeout(ttl + 5):
                async for item in w:
                    if isinstance(item, Event) and item.kind == "put":
                        new = item.kv
                        break
            moved_after = loop.time() - killed_at
        assert new.value.decode() in by_id and new.value != old.value
        assert moved_after <= ttl + 1, moved_after
        # The dead leader's token no longer opens the fence.
        election = client.election("/norm/leader", b"impostor")
        async with client.lease() as lease:
            with pytest.raises(NotLeader):
                await election.fenced(Leadership("/norm/leader", old.create_revision, lease),
                                      [Put("/norm/side-effect", b"stale")])
        assert await client.get("/norm/side-effect") is None


def test_norm_hosts_lists_the_registered_fleet_and_marks_the_leader(
        etcd: EtcdMember, agents: Callable[..., AgentProc],
        systemd_managers: Callable[[int], list[SystemdManager]]) -> None:
    # Two hosts run updates; the third does not, and so never campaigns for leadership.
    fleet = [agents([etcd.endpoint], systemd_bus=m.bus_address, updates=True) for m in systemd_managers(2)]
    fleet.append(agents([etcd.endpoint]))
    for a in fleet:
        a.wait_notify("READY=1")
    wait_for(lambda: etcd.ctl("get", "/norm/leader", "--print-value-only").strip(), timeout=20,
             what="a leader elected")
    leader = etcd.ctl("get", "/norm/leader", "--print-value-only").strip()
    assert leader in {a.machine_id for a in fleet[:2]}
    wait_for(lambda: '"reason": "update.image is not set: this host runs no updates"' in fleet[2].logs(),
             timeout=20, what="host3 saying why it does not campaign")
    cmd = [sys.executable, "-m", "norm", "hosts", "--config", str(fleet[0].config_path)]
    table = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    lines = table.splitlines()
    assert lines[0].split() == ["HOST", "MACHINE", "ID", "ENVIRONMENT", "ROLE", "AGENT", "RELEASE", "LEADER"]
    rows = {line.split()[0]: line.split() for line in lines[1:-1]}
    assert set(rows) == {"host1", "host2", "host3"}
    assert [name for name, row in rows.items() if row[-1] == "*"] == [
        a.name for a in fleet if a.machine_id == leader]
    assert lines[-1] == "3 hosts registered"
    out = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=30, check=True).stdout
    assert {json.loads(line)["machine_id"] for line in out.splitlines()} == {a.machine_id for a in fleet}
