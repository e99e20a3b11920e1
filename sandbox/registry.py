"""A local image registry: Debian's docker-registry (distribution 2.8) on a free loopback port.

The packaged /etc/docker/registry/config.yml demands htpasswd auth; this one gets its own config:
filesystem storage under the work dir, plain HTTP on 127.0.0.1 (engines need no TLS for loopback
registries), no auth, deletes enabled.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.procs import Proc, SandboxError, free_port, wait_for

REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"


@dataclass
class Registry:
    workdir: Path
    port: int = field(default_factory=free_port)
    proc: Proc | None = field(default=None, init=False)

    @property
    def address(self) -> str:
        """What image references start with: `127.0.0.1:PORT`."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def config(self) -> Path:
        return self.workdir / "config.yml"

    @property
    def storage(self) -> Path:
        return self.workdir / "storage"

    def write_config(self) -> None:
        # JSON is YAML: no YAML library needed to write it.
        config = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": self.address, "secret": "norm-sandbox"},
        }
        self.config.write_text(json.dumps(config, indent=2) + "\n")

    def start(self, timeout: float = 30) -> None:
        if self.proc is not None and self.proc.alive:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(exist_ok=True)
        self.write_config()
        self.proc = Proc("registry", [REGISTRY, "serve", str(self.config)], self.workdir / "registry.log")
        self.proc.start()

        def ready() -> bool:
            if self.proc is None or not self.proc.alive:
                raise SandboxError(f"registry exited:\n{self.proc.tail() if self.proc else ''}")
            with urllib.request.urlopen(f"{self.url}/v2/", timeout=1) as r:
                return bool(r.status == 200)

        try:
            wait_for(ready, timeout=timeout, what=f"registry on {self.address}")
        except SandboxError as e:
            tail = self.proc.tail()
            self.stop()
            raise SandboxError(f"{e}\n{tail}") from None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def tags(self, repository: str) -> list[str]:
        """Tags of `repository` (e.g. "djed/app"); empty when it does not exist."""
        try:
            with urllib.request.urlopen(f"{self.url}/v2/{repository}/tags/list", timeout=5) as r:
                return list(json.loads(r.read()).get("tags") or [])
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return []
            raise

    def digest(self, repository: str, tag: str) -> str:
        """The manifest digest the registry serves for `repository:tag` (what `@sha256:...` pins)."""
        req = urllib.request.Request(
            f"{self.url}/v2/{repository}/manifests/{tag}",
            method="HEAD",
            headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            return str(r.headers["Docker-Content-Digest"])
