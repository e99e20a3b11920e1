"""What the campaign watches while a run goes on: every etcd event from the run's first revision (one
`etcdctl watch` from before the run, each event stamped with when it arrived), and every Docker
engine's running containers, sampled."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sandbox.etcd import ETCDCTL


@dataclass(frozen=True)
class Event:
    revision: int
    kind: str  # put / delete
    key: str
    value: bytes
    create_revision: int
    lease: int
    prev_value: bytes | None
    at: float  # wall clock when the recorder received it

    def json(self) -> Any:
        try:
            return json.loads(self.value)
        except ValueError:
            return None


def _b64(s: str | None) -> bytes:
    return base64.b64decode(s) if s else b""


class Recorder:
    """Every event under `/` from revision `start` on, in order, through one `etcdctl watch` (started
    again from the last revision seen + 1 if it ever exits)."""

    def __init__(self, endpoints: list[str], start: int, log: Path,
                 snapshot: list[dict[str, Any]] | None = None) -> None:
        self.endpoints = endpoints
        self.start_revision = start
        self.log = log
        self.events: list[Event] = []
        # The latest of each key: from the snapshot read just before `start`, then from the events.
        self.latest: dict[str, Event] = {
            kv["key"]: Event(kv["mod_revision"], "put", kv["key"], kv["value"], kv["create_revision"], 0,
                             None, time.time()) for kv in snapshot or []}
        self.last_revision = start - 1
        self.gaps: list[str] = []  # what could not be recorded (a compaction ahead of the watch)
        self._cond = threading.Condition()
        self._stopping = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._run, name="chaos-recorder", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _spawn(self) -> subprocess.Popen[bytes]:
        argv = [ETCDCTL, "--endpoints", ",".join(self.endpoints), "watch", "--prefix", "/",
                "--rev", str(self.last_revision + 1), "--prev-kv", "-w", "json"]
        with open(self.log, "ab") as err:
            return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                    env=dict(os.environ, ETCDCTL_API="3"), start_new_session=True)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                self._proc = proc = self._spawn()
            assert proc.stdout is not None
            for line in proc.stdout:
                self._take(line)
            proc.wait()
            with self._cond:
                if self._stopping:
                    return
            time.sleep(0.2)  # etcdctl exited (no endpoint answered for long): watch again

    def _take(self, line: bytes) -> None:
        try:
            resp = json.loads(line)
        except ValueError:
            return
        now = time.time()
        if resp.get("CompactRevision"):
            self.gaps.append(f"history compacted at {resp['CompactRevision']} before the recorder "
                             f"read past {self.last_revision}")
        with self._cond:
            for ev in resp.get("Events") or []:
                kv = ev.get("kv", {})
                prev = ev.get("prev_kv")
                e = Event(revision=int(kv.get("mod_revision", 0)),
                          kind="delete" if ev.get("type") == 1 else "put",
                          key=_b64(kv.get("key")).decode(errors="replace"), value=_b64(kv.get("value")),
                          create_revision=int(kv.get("create_revision", 0)), lease=int(kv.get("lease", 0)),
                          prev_value=_b64(prev.get("value")) if prev else None, at=now)
                if e.revision < self.last_revision:
                    continue  # (a watch started again from the last revision + 1 repeats nothing)
                self.events.append(e)
                self.latest[e.key] = e
                self.last_revision = max(self.last_revision, e.revision)
            self._cond.notify_all()

    def value(self, key: str) -> bytes | None:
        with self._cond:
            e = self.latest.get(key)
        return None if e is None or e.kind == "delete" else e.value

    def wait_revision(self, revision: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.last_revision < revision:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._thread.join(timeout=10)


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("docker", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


def running_containers(docker_host: str, timeout: float = 1.0) -> list[dict[str, Any]] | None:
    """The engine's running containers (the API's /containers/json), or None if it does not answer."""
    conn = _UnixHTTP(docker_host.removeprefix("unix://"), timeout)
    try:
        conn.request("GET", "/containers/json")
        r = conn.getresponse()
        if r.status != 200:
            return None
        return list(json.loads(r.read()))
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        conn.close()


@dataclass(frozen=True)
class Sample:
    at: float
    host: str
    containers: tuple[tuple[str, str], ...]  # (name, image id) of each running container


class ContainerMonitor:
    """Samples every host's running containers every `interval` seconds."""

    def __init__(self, hosts: dict[str, str], interval: float = 0.3) -> None:
        self.hosts = hosts  # name -> docker host
        self.interval = interval
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-containers", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def sample(self) -> None:
        for name, docker_host in self.hosts.items():
            found = running_containers(docker_host)
            if found is None:
                continue
            now = time.time()
            pairs = tuple(sorted((str((c.get("Names") or ["?"])[0]).lstrip("/"), str(c.get("ImageID", "")))
                                 for c in found))
            self.samples.append(Sample(now, name, pairs))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):
                self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def entry_time(entry: dict[str, Any]) -> float:
    """A log entry's timestamp as seconds of the epoch (0.0 if it has none that reads)."""
    try:
        return datetime.fromisoformat(str(entry.get("timestamp", "")).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def read_log_events(path: Path, offset: int,
                    skews: Sequence[tuple[int, int, float]] = ()) -> list[dict[str, Any]]:
    """The JSON log entries of an agent's log from byte `offset` on (lines that are not JSON skipped).

    `skews` are the agents started under a skewed clock: (the log's size just before it was started,
    its pid, by how many seconds its clock was off). The entries of such an incarnation (from its
    `agent.starting`, the first after that size with that pid, to the next) get their timestamps put
    back on this machine's clock, so that they compare with everything else the campaign records. By
    the pid as well as the size: a skewed start that never logged (killed at once, or refused) must not
    make the next incarnation's clock skewed."""
    out: list[dict[str, Any]] = []
    try:
        with open(path, "rb") as f:
            f.seek(0 if skews else offset)
            data = f.read()
    except OSError:
        return out
    lines: list[tuple[int, dict[str, Any]]] = []
    pos = 0 if skews else offset
    for line in data.splitlines(keepends=True):
        at, pos = pos, pos + len(line)
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict):
                lines.append((at, entry))
    starts = [(at, entry.get("pid")) for at, entry in lines if entry.get("event") == "agent.starting"]
    skewed_from = {next((at for at, p in starts if at >= size and p == pid), -1): by
                   for size, pid, by in skews}
    skew = 0.0
    for at, entry in lines:
        if entry.get("event") == "agent.starting":
            skew = skewed_from.get(at, 0.0)
        if skew:
            real = datetime.fromtimestamp(entry_time(entry) - skew, tz=UTC)
            entry["timestamp"] = real.isoformat().replace("+00:00", "Z")
        if at >= offset:
            out.append(entry)
    return out


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
