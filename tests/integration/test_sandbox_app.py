"""The demo app's units (sandbox.app) on a real systemd --user manager and a real Docker engine: they
run the release the release file names, and a restart after the file changed runs the new one."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest

from sandbox import app
from sandbox.docker import DockerEngine
from sandbox.fleet import HostState, State
from sandbox.procs import SandboxError, wait_for
from sandbox.registry import Registry
from sandbox.systemd import SystemdManager

UNITS = ("djed-web.service", "djed-api.service")
SERVE_DEADLINE = 30.0  # seconds; a container whose image is already pulled serves within one or two


def one_host_state(tmp_path: Path, manager: SystemdManager, engine: DockerEngine) -> tuple[State, HostState]:
    """A sandbox fleet state whose single host is this test's systemd manager and Docker engine."""
    host_dir = tmp_path / "host"
    host_dir.mkdir(exist_ok=True)
    host = cast(HostState, {
        "name": manager.name, "machine_id": "0" * 32, "dir": str(host_dir), "config": "",
        "http_listen": "", "bus_address": manager.bus_address, "systemd_dir": str(manager.workdir),
        "cgroup": manager.cgroup, "systemd": None, "docker_host": engine.host,
        "docker_dir": str(engine.workdir), "docker": None, "agent": None,
    })
    state = cast(State, {"version": 1, "run_dir": str(tmp_path), "hosts": [host]})
    return state, host


def wait_serving(manager: SystemdManager, ports: tuple[int, int], version: str) -> None:
    """Until both units serve `version`; fails at once if a unit failed (no use waiting then)."""

    def serving() -> bool:
        for unit in UNITS:
            if manager.unit_property(unit, "ActiveState") == "failed":
                raise SandboxError(f"{unit} failed: {manager.systemctl('status', unit, check=False)}")
        return all(app.fetch(port) == version for port in ports)

    wait_for(serving, timeout=SERVE_DEADLINE, what=f"djed-web and djed-api serving {version}", interval=0.1)


def running_containers(engine: DockerEngine) -> dict[str, tuple[str, str]]:
    """{container name: (the reference it was run with, the image ID it runs)} of the running ones."""
    found: dict[str, tuple[str, str]] = {}
    for name in engine.docker("ps", "--format", "{{.Names}}").split():
        ref, image_id = engine.docker("inspect", "-f", "{{.Config.Image}} {{.Image}}", name).split()
        found[name] = (ref, image_id)
    return found


def test_units_render_the_release_file_contract() -> None:
    units = app.app_units(docker_host="unix:///run/d/docker.sock", release_file="/h/release.env",
                          web_port=8001, api_port=8002, docker_bin="/usr/bin/docker")
    assert sorted(units) == sorted(UNITS)
    for role, port in (("web", 8001), ("api", 8002)):
        text = units[f"djed-{role}.service"]
        cli = "/usr/bin/docker -H unix:///run/d/docker.sock"
        assert "StartLimitIntervalSec=0" in text.split("[Service]")[0]
        assert "EnvironmentFile=/h/release.env\n" in text
        assert f"ExecStartPre=-{cli} rm -f djed-{role}\n" in text
        assert (f"ExecStart={cli} run --rm --name djed-{role} --network host -e PORT={port} "
                f"-e NORM_DEMO_ROLE={role} ${{NORM_IMAGE}} serve\n") in text
        assert f"ExecStop={cli} stop -t 5 djed-{role}\n" in text
        assert "TimeoutStopSec=30\n" in text
        assert not re.search(r"^Restart=", text, re.MULTILINE), "Norm heals, not systemd"
    with pytest.raises(ValueError):
        app.app_units(docker_host="unix:///d.sock", release_file="/r", web_port=1, api_port=1)


def test_write_release_replaces_the_file_whole(tmp_path: Path) -> None:
    digest = "sha256:" + "ab" * 32
    path = tmp_path / "host" / "release.env"
    app.write_release(path, "v1", f"127.0.0.1:5000/djed/app@{digest}")
    app.write_release(path, "v2", f"127.0.0.1:5000/djed/app@{digest.replace('ab', 'cd')}")

    assert path.read_text() == (f"NORM_RELEASE=v2\nNORM_IMAGE=127.0.0.1:5000/djed/app@sha256:{'cd' * 32}\n"
                                f"NORM_DIGEST=sha256:{'cd' * 32}\n")
    assert os.listdir(path.parent) == ["release.env"], "no temp file left behind"
    assert path.stat().st_mode & 0o777 == 0o644
    for tag, ref in (("v1", "127.0.0.1:5000/djed/app:v1"), ("v 1", f"r/app@{digest}"),
                     ("v1", "r/app@sha256:1234")):
        with pytest.raises(ValueError):
            app.write_release(path, tag, ref)
    assert "NORM_RELEASE=v2\n" in path.read_text(), "a refused release leaves the file alone"


@pytest.mark.slow
def test_demo_images_returns_digest_refs(image_engine: DockerEngine, registry: Registry) -> None:
    refs = app.demo_images(image_engine, registry, versions=("v-app-a", "v-app-b"))

    assert sorted(refs) == ["v-app-a", "v-app-b"]
    for version, ref in refs.items():
        assert re.fullmatch(rf"{re.escape(registry.address)}/djed/app@sha256:[0-9a-f]{{64}}", ref)
        assert ref.split("@")[1] == registry.digest("djed/app", version)


@pytest.mark.slow
def test_units_run_the_release_file_and_a_restart_switches_release(
    systemd_manager: SystemdManager, docker_engine: DockerEngine, demo_app_digest: Callable[..., str],
    tmp_path: Path,
) -> None:
    v1, v2 = demo_app_digest("v1"), demo_app_digest("v2")
    state, host = one_host_state(tmp_path, systemd_manager, docker_engine)
    docker_engine.docker("pull", v1)
    app.write_release(app.release_path(host), "v1", v1)

    ports = app.install_app(state)
    web, api = ports[host["name"]]
    assert len({web, api}) == 2
    assert app.install_app(state) == ports, "a second install reuses the saved ports"
    for unit in UNITS:  # installed and loaded by the running manager, not started
        assert systemd_manager.unit_property(unit, "LoadState") == "loaded"
        assert systemd_manager.unit_property(unit, "ActiveState") == "inactive"

    try:
        systemd_manager.systemctl("start", *UNITS)
        wait_serving(systemd_manager, (web, api), "v1")
        assert running_containers(docker_engine).keys() == {"djed-web", "djed-api"}

        docker_engine.docker("pull", v2)
        app.write_release(app.release_path(host), "v2", v2)
        systemd_manager.systemctl("restart", *UNITS)
        wait_serving(systemd_manager, (web, api), "v2")

        v2_id = docker_engine.docker("image", "inspect", "-f", "{{.Id}}", v2).strip()
        assert running_containers(docker_engine) == {"djed-web": (v2, v2_id), "djed-api": (v2, v2_id)}
    finally:
        systemd_manager.systemctl("stop", *UNITS, check=False)

    for unit in UNITS:
        assert systemd_manager.unit_property(unit, "ActiveState") == "inactive"
    assert docker_engine.docker("ps", "-a", "--format", "{{.Names}}").strip() == "", "stop removes them"
