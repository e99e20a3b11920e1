"""A real `norm agent` with load-balancer presence: its instance id from instance metadata, its target
groups in a real moto server, its web unit in a real systemd manager; seen through /metrics and moto."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path

from sandbox.etcd import EtcdMember
from sandbox.haproxy import HaproxyServer
from sandbox.imds import MetadataServer
from sandbox.moto import MotoServer
from sandbox.procs import free_port, wait_for
from sandbox.systemd import SystemdManager
from tests.integration.elb import ACCESS_KEY, SECRET_KEY, make_site, web_unit
from tests.integration.test_agent_healing import metric
from tests.plugins.agent import AgentProc


def test_the_agent_registers_its_instance_from_metadata_and_follows_the_web_unit(
        etcd: EtcdMember, systemd_manager: SystemdManager, moto_server: MotoServer,
        imds_server: MetadataServer, agents: Callable[..., AgentProc], tmp_path: Path) -> None:
    site = asyncio.run(make_site(moto_server, groups=2))
    imds_server.update(instance_id=site.instance_id)
    port = free_port()
    (tmp_path / "www").mkdir()
    systemd_manager.write_unit("djed-web.service", web_unit(port, tmp_path / "www"))
    systemd_manager.systemctl("start", "djed-web.service")
    groups = ", ".join(f'"{g}"' for g in site.groups)
    agent = agents(
        [etcd.endpoint], systemd_bus=systemd_manager.bus_address,
        env={"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY},
        extra_toml=(f'[aws]\nendpoint_url = "{moto_server.endpoint}"\nuse_metadata = true\n'
                    f'metadata_url = "{imds_server.endpoint}"\ncall_timeout = 5\n'
                    f'[lb]\ntarget_groups = [{groups}]\nhealth_url = "http://127.0.0.1:{port}/"\n'
                    "drain_timeout = 5\n"
                    "[healing]\nbackoff_initial = 0.05\nbackoff_max = 0.1\n"))
    agent.wait_notify("READY=1")

    def registered(value: float) -> Callable[[], bool]:
        return lambda: all(metric(agent, "norm_lb_registered", target_group=g) == value for g in site.groups)

    wait_for(registered(1), timeout=20, what="registered in both groups")
    assert asyncio.run(site.states()) == ["healthy", "healthy"]

    # The web unit dies: out of both groups; the healer starts it again: back in once healthy.
    pid = int(systemd_manager.unit_property("djed-web.service", "MainPID"))
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: '"lb.deregistered"' in agent.logs(), timeout=20, what="deregistered")
    wait_for(registered(1), timeout=20, what="registered again")
    assert asyncio.run(site.states()) == ["healthy", "healthy"]
    logs = agent.logs()
    assert logs.count('"lb.registered"') == 4 and logs.count('"lb.deregistered"') == 2
    assert SECRET_KEY not in logs


def test_without_an_instance_id_presence_is_off_and_says_why(
        etcd: EtcdMember, systemd_manager: SystemdManager, agents: Callable[..., AgentProc]) -> None:
    group = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web/0123456789abcdef"
    agent = agents([etcd.endpoint], systemd_bus=systemd_manager.bus_address,
                   extra_toml=f'[lb]\ntarget_groups = ["{group}"]\n')
    agent.wait_notify("READY=1")
    assert '"lb.presence_off"' in agent.logs() and "lb.instance_id" in agent.logs()
    assert metric(agent, "norm_lb_registered", target_group=group) == 0


def test_the_agent_puts_its_server_in_haproxy_without_any_instance_id(
        etcd: EtcdMember, systemd_manager: SystemdManager, haproxy: Callable[..., HaproxyServer],
        agents: Callable[..., AgentProc], tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "www").mkdir()
    systemd_manager.write_unit("djed-web.service", web_unit(port, tmp_path / "www"))
    systemd_manager.systemctl("start", "djed-web.service")
    lb = haproxy([("host1", port), ("host2", free_port())])
    # No [aws], no lb.instance_id, no lb.haproxy_server: the server is the host's name.
    agent = agents([etcd.endpoint], name="host1", systemd_bus=systemd_manager.bus_address,
                   extra_toml=(f'[lb]\nbackend = "haproxy"\nhaproxy_backends = ["web"]\n'
                               f'haproxy_socket = "{lb.socket_path}"\nhealth_url = "http://127.0.0.1:{port}/"\n'))
    agent.wait_notify("READY=1")
    wait_for(lambda: metric(agent, "norm_lb_registered", target_group="web") == 1, timeout=20,
             what="in service")
    assert lb.admin_states("web") == {"host1": "ready", "host2": "maint"}
    logs = agent.logs()
    assert '"lb.presence_off"' not in logs and '"load_balancer": "haproxy"' in logs
    assert '"member": "host1"' in logs
