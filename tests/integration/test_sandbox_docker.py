"""The sandbox's Docker engines, registry and images, against the real daemons."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from sandbox import images
from sandbox.docker import DockerEngine
from sandbox.procs import SandboxError, free_port, pid_alive, wait_for
from sandbox.registry import Registry

pytestmark = pytest.mark.slow


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as r:
        return str(r.read().decode())


def test_engine_starts_runs_a_container_and_stops_clean(
    docker_engine: DockerEngine, demo_app: Callable[..., str]
) -> None:
    info = json.loads(docker_engine.docker("info", "--format", "{{json .}}"))
    assert info["DockerRootDir"] == str(docker_engine.data_root)
    assert len(str(docker_engine.sock)) < 108
    ref = demo_app("v1")
    docker_engine.docker("pull", ref)
    cid = docker_engine.docker("run", "-d", "--network", "host", "-e", f"PORT={free_port()}", ref).strip()
    assert docker_engine.docker("inspect", "-f", "{{.State.Running}}", cid).strip() == "true"
    assert any("containerd-shim" in x for x in docker_engine.leftovers()), "a running container has a shim"

    docker_engine.stop()

    assert docker_engine.leftovers() == []


def test_two_engines_coexist_with_their_own_containerd(
    docker_engines: Callable[[int], list[DockerEngine]], demo_app: Callable[..., str]
) -> None:
    a, b = docker_engines(2)
    assert a.sock != b.sock
    pid_a, pid_b = a.containerd_pid(), b.containerd_pid()
    assert pid_a and pid_b and pid_a != pid_b, "each dockerd runs a containerd of its own"

    ref = demo_app("v1")
    a.docker("pull", ref)
    a.docker("run", "-d", "--name", "only-on-a", "--network", "host", "-e", f"PORT={free_port()}", ref)
    assert "only-on-a" in a.docker("ps", "--format", "{{.Names}}")
    assert b.docker("ps", "-a", "--format", "{{.Names}}").strip() == ""
    assert b.docker("images", "-q").strip() == ""

    a.stop()
    assert a.leftovers() == []
    assert b.docker("version", "--format", "{{.Server.Version}}").strip()
    assert pid_alive(pid_b)


def test_image_pushed_from_one_engine_is_pulled_by_digest_on_another(
    docker_engines: Callable[[int], list[DockerEngine]], registry: Registry
) -> None:
    builder, host = docker_engines(2)
    ref = images.demo_app_image(builder, registry, "v-pushed", size_mb=50)
    assert ref == f"{registry.address}/djed/app:v-pushed"
    pinned = images.repo_digest(builder, ref)
    assert pinned.split("@")[1] == registry.digest("djed/app", "v-pushed")
    assert "v-pushed" in registry.tags("djed/app")
    size = int(builder.docker("image", "inspect", "-f", "{{.Size}}", ref))
    assert size >= 50 * 1024 * 1024

    host.docker("pull", pinned)

    out = host.docker("run", "--rm", "--network", "host", pinned, "cat", "/app/VERSION")
    assert out.strip() == "v-pushed"
    with pytest.raises(SandboxError, match=r"manifest unknown|not found"):
        host.docker("pull", f"{registry.address}/djed/app:no-such-tag")


def test_demo_app_serves_its_version_and_records_its_tasks(
    docker_engine: DockerEngine, demo_app_digest: Callable[..., str], tmp_path: Path
) -> None:
    ref = demo_app_digest("v7")
    docker_engine.docker("pull", ref)
    port = free_port()
    cid = docker_engine.docker("run", "-d", "--network", "host", "-e", f"PORT={port}", ref).strip()
    wait_for(lambda: http_get(f"http://127.0.0.1:{port}/") == "v7\n", timeout=15, what="demo app")
    assert http_get(f"http://127.0.0.1:{port}/version") == "v7\n"
    assert http_get(f"http://127.0.0.1:{port}/health") == "ok\n"
    started = time.monotonic()
    docker_engine.docker("stop", "-t", "10", cid)
    assert time.monotonic() - started < 5, "the app stops on SIGTERM, not at the kill timeout"
    assert docker_engine.docker("inspect", "-f", "{{.State.ExitCode}}", cid).strip() == "0"

    data = tmp_path / "data"
    data.mkdir()
    for command in ("migrate", "collectstatic"):
        docker_engine.docker("run", "--rm", "--network", "host", "-v", f"{data}:/data", ref, command)
    mount = ["-v", f"{data}:/data"]
    docker_engine.docker("run", "--rm", *mount, "-e", "NORM_DEMO_RECORD=/data/sub/custom.log", ref, "migrate")
    with pytest.raises(SandboxError):
        docker_engine.docker("run", "--rm", *mount, "-e", "NORM_DEMO_TASK_FAIL=1", ref, "migrate")

    lines = [line.split() for line in (data / "record.log").read_text().splitlines()]
    assert [line[:2] for line in lines] == [["v7", "migrate"], ["v7", "collectstatic"]]
    assert all(line[2].endswith("Z") for line in lines)
    assert (data / "sub" / "custom.log").read_text().split()[:2] == ["v7", "migrate"]


def test_killed_engine_starts_again_and_stops_clean(
    docker_engine: DockerEngine, demo_app: Callable[..., str]
) -> None:
    ref = demo_app("v1")
    docker_engine.docker("pull", ref)
    port = free_port()
    docker_engine.docker("run", "-d", "--name", "app", "--network", "host", "-e", f"PORT={port}", ref)
    wait_for(lambda: http_get(f"http://127.0.0.1:{port}/") == "v1\n", timeout=15, what="demo app")

    docker_engine.kill()
    # The container outlives its daemon, as on a real host.
    assert http_get(f"http://127.0.0.1:{port}/") == "v1\n"

    docker_engine.start()
    assert docker_engine.docker("inspect", "-f", "{{.State.Running}}", "app").strip() == "false"
    assert ref in docker_engine.docker("images", "--format", "{{.Repository}}:{{.Tag}}")

    docker_engine.restart()
    assert docker_engine.docker("version", "--format", "{{.Server.Version}}").strip()
    docker_engine.kill()
    docker_engine.stop()
    assert docker_engine.leftovers() == []


def test_etcd_image_runs_under_testcontainers(testcontainers_engine: DockerEngine) -> None:
    from testcontainers.core.container import DockerContainer

    ref = images.etcd_image(testcontainers_engine)
    assert ref == f"norm/etcd:{images.etcd_version()}"
    container = DockerContainer(
        ref,
        command="--name member --listen-client-urls http://0.0.0.0:2379 "
        "--advertise-client-urls http://127.0.0.1:2379",
    ).with_exposed_ports(2379)
    with container:
        host = container.get_container_host_ip()
        port = container.get_exposed_port(2379)

        def healthy() -> bool:
            return bool(json.loads(http_get(f"http://{host}:{port}/health")).get("health") == "true")

        wait_for(healthy, timeout=30, what="etcd in a container")
        assert os.environ["DOCKER_HOST"] == testcontainers_engine.host
    assert testcontainers_engine.docker("ps", "-q").strip() == ""


def test_bridge_engine_uses_its_own_bridge(bridge_docker_engine: DockerEngine) -> None:
    name = bridge_docker_engine.bridge_interface
    net = bridge_docker_engine.bridge_network
    assert name is not None and net is not None
    assert len(name) <= 15
    subnet = bridge_docker_engine.docker(
        "network", "inspect", "bridge", "--format", "{{range .IPAM.Config}}{{.Subnet}}{{end}}"
    ).strip()
    assert subnet == str(net)
    bridge_docker_engine.stop()
    assert not Path(f"/sys/class/net/{name}").exists()
    assert bridge_docker_engine.leftovers() == []
