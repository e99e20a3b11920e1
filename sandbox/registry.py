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
from dataclasses import dataclass
from pathlib import Path

from sandbox.procs import LocalServer

REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"


@dataclass
class Registry(LocalServer):
    name = "registry"

    @property
    def address(self) -> str:
        """What image references start with: `127.0.0.1:PORT`."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return self.endpoint

    @property
    def config(self) -> Path:
        return self.workdir / "config.yml"

    @property
    def storage(self) -> Path:
        return self.workdir / "storage"

    def prepare(self) -> None:
        self.storage.mkdir(exist_ok=True)
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

    def argv(self) -> list[str]:
        return [REGISTRY, "serve", str(self.config)]

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/", timeout=1) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

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
