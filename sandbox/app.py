"""The demo application as each simulated host runs it: two systemd units that `docker run` one image.

On a real host the stack is a handful of units that `docker run` the Django app and its API. Here it is
`djed-web.service` and `djed-api.service`: both run the same demo image (see sandbox.images, it serves
its version over HTTP at /version) with different settings (`PORT`, `NORM_DEMO_ROLE`), on the host's
own Docker engine (`docker -H unix://...`), on the host network.

The units never talk to etcd. Which release they run comes from an environment file Norm owns and
replaces atomically, one per host at `<host dir>/release.env` (`release_path`):

    NORM_RELEASE=v2
    NORM_IMAGE=127.0.0.1:5000/djed/app@sha256:<64 hex>
    NORM_DIGEST=sha256:<64 hex>

The units read it with `EnvironmentFile=` and run `${NORM_IMAGE}`, the image pinned by digest, so that
a restart after the file changed runs the new release and nothing else. They have no `Restart=`: when
a unit fails, Norm heals it. `ExecStartPre=-docker rm -f` clears a container a crash left behind, and
`ExecStop=docker stop -t 5` stops the container itself (stopping the `docker run` client alone would
leave it running).

- `app_units(...)`: the two unit texts for one host.
- `write_release(path, tag, digest_ref)`: the release file, written atomically (temp file in the same
  directory, fsync, rename), for tests and for a first deploy by hand; Norm writes it in update mode.
- `install_app(state)`: writes both units into every host of a sandbox fleet (sandbox.fleet.State) and
  reloads its manager, without starting them; picks free ports once and keeps them in
  `<host dir>/app-ports.json` (`reserve_ports`), so that calling it again changes nothing.
- `fetch(port)`: GET http://127.0.0.1:<port>/version, what a unit serves.
- `demo_images(engine, registry)`: builds and pushes the demo app's versions, returns their digest refs.
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from norm.adapters.files import replace_file
from sandbox import images
from sandbox.procs import SandboxError, free_port
from sandbox.systemd import SystemdManager

if TYPE_CHECKING:
    from sandbox.docker import DockerEngine
    from sandbox.fleet import HostState, State
    from sandbox.registry import Registry

UNITS = ("djed-web.service", "djed-api.service")
RELEASE_FILE = "release.env"
PORTS_FILE = "app-ports.json"
STOP_TIMEOUT = 5  # seconds `docker stop` gives the container; the demo app stops on SIGTERM at once

_DIGEST_REF = re.compile(r"[^@\s]+@(sha256:[0-9a-f]{64})")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def _unit(*, role: str, docker: str, docker_host: str, release_file: str, port: int,
          docker_config: str | None, log_dir: str | None) -> str:
    container = f"djed-{role}"
    cli = f"{docker} -H {docker_host}"
    lines = [
        "# Written by sandbox.app: the demo app's " + role + " unit. The release it runs comes from the",
        "# environment file Norm owns; Norm heals the unit when it fails (hence no Restart=).",
        "[Unit]",
        f"Description=djed {role} (demo app, release from {release_file})",
        "StartLimitIntervalSec=0",
        "",
        "[Service]",
        "Type=simple",
        f"EnvironmentFile={release_file}",
    ]
    if docker_config is not None:
        lines.append(f"Environment=DOCKER_CONFIG={docker_config}")
    lines += [
        "Environment=DOCKER_CLI_HINTS=false",
        f"ExecStartPre=-{cli} rm -f {container}",
        f"ExecStart={cli} run --rm --name {container} --network host"
        f" -e PORT={port} -e NORM_DEMO_ROLE={role} ${{NORM_IMAGE}} serve",
        # Active means serving: the start job ends when the port answers (or fails after 30 s).
        "ExecStartPost=/bin/bash -c 'for _ in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/"
        f"{port}) 2>/dev/null && exit 0; sleep 0.1; done; exit 1'",
        f"ExecStop={cli} stop -t {STOP_TIMEOUT} {container}",
        "TimeoutStartSec=60",
        "TimeoutStopSec=30",
    ]
    if log_dir is not None:
        lines += [f"StandardOutput=append:{log_dir}/{container}.log", "StandardError=inherit"]
    return "\n".join(lines) + "\n"


def app_units(
    *,
    docker_host: str,
    release_file: str,
    web_port: int,
    api_port: int,
    docker_bin: str = shutil.which("docker") or "/usr/bin/docker",
    docker_config: str | None = None,
    log_dir: str | None = None,
) -> dict[str, str]:
    """{unit name: unit text} of djed-web.service and djed-api.service for one host whose Docker engine
    is at `docker_host` (unix://...). `docker_config` sets the CLI's DOCKER_CONFIG (nobody's credential
    helpers); `log_dir`, when given, gets each unit's output in `<log_dir>/djed-<role>.log`."""
    if not docker_host.startswith("unix://"):
        raise ValueError(f"docker_host must be a unix:// address, not {docker_host!r}")
    if web_port == api_port:
        raise ValueError(f"web and api need distinct ports, both are {web_port}")
    return {
        f"djed-{role}.service": _unit(role=role, port=port, docker=docker_bin, docker_host=docker_host,
                                      release_file=release_file, docker_config=docker_config,
                                      log_dir=log_dir)
        for role, port in (("web", web_port), ("api", api_port))
    }


def release_file_text(tag: str, image_digest_ref: str) -> str:
    """The release file's content for `tag` running `<registry>/<repo>@sha256:<hex>`."""
    if not _TAG.fullmatch(tag):
        raise ValueError(f"not a valid image tag: {tag!r}")
    m = _DIGEST_REF.fullmatch(image_digest_ref)
    if not m:
        raise ValueError(f"not an image reference pinned by digest: {image_digest_ref!r}")
    return f"NORM_RELEASE={tag}\nNORM_IMAGE={image_digest_ref}\nNORM_DIGEST={m.group(1)}\n"


def write_release(path: Path, tag: str, image_digest_ref: str) -> None:
    """Replace the release file at `path` atomically, as Norm does: a reader sees the old content or
    the new, whole."""
    replace_file(Path(path), release_file_text(tag, image_digest_ref).encode())


def release_path(host: HostState) -> Path:
    """Where a sandbox host's release file lives: `<host dir>/release.env`."""
    return Path(host["dir"]) / RELEASE_FILE


def ports_path(host: HostState) -> Path:
    return Path(host["dir"]) / PORTS_FILE


def _saved_ports(host: HostState) -> tuple[int, int] | None:
    try:
        data = json.loads(ports_path(host).read_text())
        web, api = int(data["web"]), int(data["api"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise SandboxError(f"{ports_path(host)} is unreadable ({e}): remove it to pick new ports") from None
    return web, api


def _save_ports(host: HostState, web: int, api: int) -> None:
    path = ports_path(host)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"web": web, "api": api}) + "\n")
    tmp.replace(path)


def _check_distinct(chosen: dict[str, tuple[int, int]]) -> None:
    """All the hosts share one network namespace: every port of every host must differ."""
    seen: dict[int, str] = {}
    for name, pair in chosen.items():
        for port in pair:
            if port in seen:
                raise SandboxError(f"port {port} is given to both {seen[port]} and {name}")
            seen[port] = name


def _pick_ports(taken: set[int]) -> tuple[int, int]:
    picked: list[int] = []
    while len(picked) < 2:
        port = free_port()
        if port not in taken and port not in picked:
            picked.append(port)
    return picked[0], picked[1]


def reserve_ports(
    hosts: Iterable[HostState], *, ports: dict[str, tuple[int, int]] | None = None
) -> dict[str, tuple[int, int]]:
    """The web and api ports of every host: from `ports`, else from `<host dir>/app-ports.json`, else
    picked free (distinct across the fleet); saved there, so that the units installed later (and a
    load balancer configured before them) agree. Returns {host: (web, api)}."""
    hosts = list(hosts)
    chosen: dict[str, tuple[int, int]] = {}
    for h in hosts:
        given = (ports or {}).get(h["name"]) or _saved_ports(h)
        if given is not None:
            chosen[h["name"]] = (int(given[0]), int(given[1]))
    taken = {p for pair in chosen.values() for p in pair}
    for h in hosts:
        if h["name"] not in chosen:
            chosen[h["name"]] = _pick_ports(taken)
            taken.update(chosen[h["name"]])
    _check_distinct(chosen)
    for h in hosts:
        _save_ports(h, *chosen[h["name"]])
    return {h["name"]: chosen[h["name"]] for h in hosts}


def install_app(
    state: State, *, ports: dict[str, tuple[int, int]] | None = None
) -> dict[str, tuple[int, int]]:
    """Write djed-web.service and djed-api.service into every host's systemd manager, and reload it if
    it runs, without starting them. Ports come from `ports`, else from `<host dir>/app-ports.json`,
    else are picked free (distinct across the fleet) and saved there. Returns {host: (web, api)}."""
    hosts = list(state["hosts"])
    chosen = reserve_ports(hosts, ports=ports)
    for h in hosts:
        web, api = chosen[h["name"]]
        units = app_units(docker_host=h["docker_host"], release_file=str(release_path(h)), web_port=web,
                          api_port=api, docker_config=str(Path(h["docker_dir"]) / "client"),
                          log_dir=h["dir"])
        manager = SystemdManager(h["name"], Path(h["systemd_dir"]))
        for name, text in units.items():
            manager.write_unit(name, text)
        # write_unit reloads only a manager this process started; this one may run in another process.
        if not manager.alive and manager.bus_has_owner():
            manager.systemctl("daemon-reload")
    return {h["name"]: chosen[h["name"]] for h in hosts}


def fetch(port: int, path: str = "/version", timeout: float = 2.0) -> str:
    """GET http://127.0.0.1:<port><path>; the body, stripped (the demo app answers "v2\\n")."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return str(r.read().decode()).strip()


def demo_images(
    engine: DockerEngine, registry: Registry, versions: Iterable[str] = ("v1", "v2"), size_mb: int = 0,
    options: images.DemoOptions | None = None,
) -> dict[str, str]:
    """Build the demo app at each version on `engine`, push it to `registry`, and return
    {version: "<registry>/djed/app@sha256:..."}. Building again is fine: the tag then names the new
    build (a new digest, as the image config carries its build time), which is the one returned.
    `options` builds them all alike misbehaving (images.DemoOptions)."""
    refs: dict[str, str] = {}
    for version in versions:
        ref = images.demo_app_image(engine, registry, version, size_mb=size_mb,
                                    options=options or images.DemoOptions())
        refs[version] = images.repo_digest(engine, ref)
    return refs
