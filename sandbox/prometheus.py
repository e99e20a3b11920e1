"""A real Prometheus for the sandbox: Debian's `prometheus` (2.42) in the foreground on a free loopback
port, with its own configuration and its TSDB in its work dir (the package's own service is not used).

It scrapes two jobs every `scrape_interval` seconds (1 by default): `demo` (the app's units, or the job
named by `job`) and `norm` (the agents' /metrics, as deploy/prometheus/scrape.yml names them). Each
job's targets ("host:port") come from a file_sd file in its work dir, written atomically, so that
`set_targets` replaces them while it runs (Prometheus watches the file, and rereads it every second
too). `rule_files` are loaded (deploy/prometheus/norm-rules.yml, say). The lifecycle API is on
(`POST /-/reload`, `/-/quit`).

- `address`: "127.0.0.1:PORT"; `url`: "http://127.0.0.1:PORT".
- `wait_ready()`: until `/-/ready` answers 200.
- `wait_scraped(target)`: until `up{instance=target} == 1`, within a deadline.
- `query(promql)`: an instant query, synchronously (for the sandbox's own checks); the result list.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox.procs import LocalServer, SandboxError, wait_for

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
JOB = "demo"
AGENTS_JOB = "norm"


def _duration(seconds: float) -> str:
    """Seconds as Prometheus writes a duration (whole milliseconds)."""
    ms = round(seconds * 1000)
    if ms <= 0:
        raise ValueError("a duration must be at least 1ms")
    return f"{ms}ms"


def config_text(*, targets_files: Mapping[str, str], scrape_interval: float = 1.0,
                rule_files: Sequence[str] = ()) -> str:
    """Prometheus's configuration: a job per entry of `targets_files` (job name: file_sd file), each
    scraping what its file lists every `scrape_interval` seconds, the rules of `rule_files` evaluated as
    often. JSON is YAML: no YAML library needed to write it."""
    interval = _duration(scrape_interval)
    config = {
        "global": {"scrape_interval": interval, "scrape_timeout": interval,
                   "evaluation_interval": interval},
        "rule_files": list(rule_files),
        "scrape_configs": [{
            "job_name": job,
            "file_sd_configs": [{"files": [path], "refresh_interval": "1s"}],
        } for job, path in targets_files.items()],
    }
    return json.dumps(config, indent=2) + "\n"


@dataclass
class PrometheusServer(LocalServer):
    """`PrometheusServer(workdir, targets=["127.0.0.1:8081"]).start()`; `set_targets([...])` while it
    runs."""

    targets: Sequence[str] = field(default_factory=list)
    labels: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # per target, as set_targets
    scrape_interval: float = 1.0
    job: str = JOB
    rule_files: Sequence[str] = ()

    name = "prometheus"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return self.endpoint

    @property
    def config(self) -> Path:
        return self.workdir / "prometheus.yml"

    @property
    def targets_file(self) -> Path:
        return self.workdir / "targets.json"

    def targets_file_of(self, job: str) -> Path:
        return self.targets_file if job == self.job else self.workdir / f"targets-{job}.json"

    @property
    def storage(self) -> Path:
        return self.workdir / "data"

    def set_targets(self, targets: Sequence[str], labels: Mapping[str, Mapping[str, str]] | None = None,
                    *, job: str | None = None) -> None:
        """Scrape `targets` ("host:port" each) in `job` (the app's by default) from now on, instead of
        those before: the job's file_sd file, replaced atomically. `labels`: labels some targets' series
        get (a sandbox host's name as `host`)."""
        for t in targets:
            host, sep, port = t.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"a target is host:port, not {t!r}")
        labels = dict(labels or {})
        if job is None or job == self.job:
            self.targets, self.labels = list(targets), labels
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.targets_file_of(job or self.job)
        tmp = path.with_name(f".{path.name}.tmp")
        groups = [{"targets": [t], "labels": dict(labels.get(t, {}))} for t in targets]
        tmp.write_text(json.dumps(groups) + "\n")
        os.replace(tmp, path)

    def prepare(self) -> None:
        self.storage.mkdir(exist_ok=True)
        self.set_targets(self.targets, self.labels)
        if not self.targets_file_of(AGENTS_JOB).exists():
            self.set_targets([], job=AGENTS_JOB)
        files = {job: str(self.targets_file_of(job)) for job in (self.job, AGENTS_JOB)}
        self.config.write_text(config_text(targets_files=files, scrape_interval=self.scrape_interval,
                                           rule_files=[str(Path(f).resolve()) for f in self.rule_files]))

    def argv(self) -> list[str]:
        return [
            PROMETHEUS,
            f"--config.file={self.config}",
            f"--storage.tsdb.path={self.storage}",
            f"--web.listen-address={self.address}",
            "--web.enable-lifecycle",
            "--log.level=warn",
        ]

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until `/-/ready` answers 200 (SandboxError after `timeout` seconds)."""
        wait_for(self._ready_or_dead, timeout=timeout, what=f"prometheus ready on {self.url}")

    def _ready_or_dead(self) -> bool:
        if not self.alive:
            raise SandboxError(f"prometheus exited:\n{self.proc.tail() if self.proc else ''}")
        return self.answers()

    def query(self, promql: str, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The result of an instant query (`data.result`: for a vector, [{"metric": {...}, "value":
        [time, "text"]}, ...])."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise SandboxError(f"query refused: {body.get('error')}")
        return list(body["data"]["result"])

    def wait_scraped(self, target: str, timeout: float = 30.0) -> None:
        """Until Prometheus has scraped `target` ("host:port") successfully: `up{instance=target} == 1`
        (SandboxError after `timeout` seconds)."""
        promql = f'up{{instance="{target}"}} == 1'
        wait_for(lambda: bool(self.query(promql)), timeout=timeout, what=f"prometheus scraping {target}",
                 interval=0.2)

    def rules(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The rule groups Prometheus loaded, with each rule's health (`/api/v1/rules`)."""
        with urllib.request.urlopen(f"{self.url}/api/v1/rules", timeout=timeout) as r:
            body = json.loads(r.read())
        return list(body["data"]["groups"])

    def reload(self) -> None:
        """Reread the configuration (the lifecycle API)."""
        req = urllib.request.Request(f"{self.url}/-/reload", method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            if r.status != 200:
                raise SandboxError(f"prometheus reload answered {r.status}")
