"""The environment file service against the real parts: a moto server for S3, etcd for the key naming
the environment, a systemd --user manager whose units read the file through EnvironmentFile=.

Every wait is on a condition (the service's count of checks, a unit's state), with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import stat
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiobotocore.session import get_session
from structlog.testing import capture_logs

from norm.adapters.etcd import Etcd
from norm.adapters.s3 import ObjectStore
from norm.adapters.systemd import Systemd
from norm.core.config import EnvFileConfig, EtcdConfig
from norm.core.envfile import parse_env_file, source_of
from norm.services.context import HostContext
from norm.services.envfiles import EnvFiles
from norm.services.holds import Holds
from norm.services.metrics import Metrics
from norm.services.watcher import DesiredStateWatcher
from sandbox.docker import DockerEngine
from sandbox.etcd import EtcdMember
from sandbox.imds import MetadataServer
from sandbox.moto import MotoServer
from sandbox.procs import free_port, wait_for
from sandbox.registry import Registry
from sandbox.systemd import SystemdManager
from tests.plugins.agent import AgentProc

CANARY = "canary-5be01c9a7d3f"
ENV_KEY = "/djed-environment"


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


async def put_object(endpoint: str, bucket: str, key: str, body: bytes) -> None:
    async with get_session().create_client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                           aws_access_key_id="testing",
                                           aws_secret_access_key="testing") as s3:
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
            await s3.create_bucket(Bucket=bucket)
        await s3.put_object(Bucket=bucket, Key=key, Body=body)


def assert_absent(secret: str, text: str, where: str) -> None:
    """Fails if `secret` shows in `text`, without printing either (a failing test must not leak)."""
    shows = secret in text
    assert not shows, f"a secret shows in {where}"


def secret_values(path: Path) -> dict[str, str]:
    return {k: v.reveal() for k, v in parse_env_file(path.read_bytes()).variables.items()}


def raw(path: Path) -> bytes:
    return path.read_bytes()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def fingerprint(path: Path) -> tuple[int, int]:
    """Changes with every write of the file (a new inode, a new mtime)."""
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def etag_of(path: Path) -> str:
    source = source_of(path.read_bytes())
    assert source is not None
    return source.etag


@dataclass
class Rig:
    service: EnvFiles
    metrics: Metrics
    etcd: Etcd
    path: Path
    etags: list[str | None] = field(default_factory=list)

    async def until(self, what: str, predicate: Callable[[], bool], timeout: float = 20) -> None:
        try:
            async with asyncio.timeout(timeout), self.service.checked:
                await self.service.checked.wait_for(predicate)
        except TimeoutError:
            raise AssertionError(f"{what}: not within {timeout}s") from None

    async def check_again(self, environment: str = "stage") -> None:
        """Write keys.environment (the same value will do: any write triggers a check) and wait for the
        check it triggers to finish."""
        before = self.service.checks
        await self.etcd.put(ENV_KEY, environment.encode())
        await self.until("a check after the environment key was written",
                         lambda: self.service.checks > before)

    def fetches(self, result: str) -> float:
        return self.metrics.env_fetches.labels(result)._value.get()

    def restarts(self, unit: str, result: str = "ok") -> float:
        return self.metrics.env_restarts.labels(unit, result)._value.get()

    @property
    def body_bytes(self) -> float:
        return self.metrics.env_body_bytes._value.get()

    @property
    def up_to_date(self) -> float:
        return self.metrics.env_up_to_date._value.get()


@contextlib.asynccontextmanager
async def rig(etcd_member: EtcdMember, config: EnvFileConfig, store: ObjectStore, *,
              systemd: Systemd | None = None, holds: Holds | None = None,
              environment: str | None = "stage") -> AsyncIterator[Rig]:
    metrics = Metrics()
    etcd_config = EtcdConfig(endpoints=(etcd_member.endpoint,), request_timeout=2.0, dial_timeout=3.0,
                             keepalive_time=5.0, keepalive_timeout=2.0, lease_ttl=5)
    async with Etcd(etcd_config) as etcd:
        if environment is not None:
            await etcd.put(ENV_KEY, environment.encode())
        watcher = DesiredStateWatcher(etcd, "/djed-version", ENV_KEY, metrics, 3600)
        etags: list[str | None] = []

        async def set_etag(etag: str | None) -> None:
            etags.append(etag)

        host = HostContext(etcd, "/norm", "a" * 32, metrics, holds or Holds(), units=("app-*.service",))
        service = EnvFiles(host, config, store, watcher, "prod", set_etag, systemd=systemd)
        stopping = asyncio.Event()
        tasks = [asyncio.create_task(watcher.run(stopping), name="watcher"),
                 asyncio.create_task(service.run(stopping), name="envfiles")]
        r = Rig(service, metrics, etcd, Path(config.path), etags)
        try:
            await r.until("the first check", lambda: service.checks >= 1 or any(t.done() for t in tasks))
            for t in tasks:
                if t.done():
                    t.result()
            yield r
        finally:
            stopping.set()
            async with asyncio.timeout(10):
                await asyncio.gather(*tasks)


def env_config(tmp_path: Path, bucket: str, **kw: object) -> EnvFileConfig:
    values: dict[str, object] = {"bucket": bucket, "key": "{environment}.env",
                                 "path": str(tmp_path / "run" / "app.env"), "interval": 3600.0,
                                 "on_change": "restart"}
    values.update(kw)
    return EnvFileConfig(**values)  # type: ignore[arg-type]


def store_at(endpoint: str) -> ObjectStore:
    return ObjectStore(region="us-east-1", endpoint_url=endpoint, timeout=3)


def unit_text(env_path: Path, seen: Path) -> str:
    # ExecStartPost keeps the unit activating for a while: a restart that did not wait for the previous
    # unit to be active again would overlap it.
    return ("[Unit]\nStartLimitIntervalSec=0\n[Service]\n"
            f"EnvironmentFile={env_path}\n"
            f"ExecStart=/bin/sh -c 'printf %%s \"$$SECRET\" > {seen}; exec sleep infinity'\n"
            "ExecStartPost=/bin/sleep 0.3\n")


def bucket_name() -> str:
    return f"norm-env-{uuid.uuid4().hex[:12]}"


# ---------------------------------------------------------------------------------------------------
# Fetch, rotate, unchanged


async def test_fetch_then_rotate_restarts_units_one_at_a_time_and_unchanged_does_nothing(
        tmp_path: Path, etcd: EtcdMember, moto_server: MotoServer, systemd_manager: SystemdManager) -> None:
    bucket = bucket_name()
    units = ["app-1.service", "app-2.service", "app-3.service"]
    config = env_config(tmp_path, bucket)
    env_path = Path(config.path)
    for unit in units:
        systemd_manager.write_unit(unit, unit_text(env_path, tmp_path / f"{unit}.seen"))
    v1 = f"# stage\nexport SECRET='{CANARY}-one'\nDEBUG=0\n".encode()
    await put_object(moto_server.endpoint, bucket, "stage.env", v1)

    async with Systemd(systemd_manager.bus_address, call_timeout=15) as systemd, \
            rig(etcd, config, store_at(moto_server.endpoint), systemd=systemd) as r:
        # At start: fetched and written, 0600, canonical, with its source; no unit was running.
        assert r.fetches("changed") == 1 and r.up_to_date == 1
        assert mode(env_path) == 0o600
        assert secret_values(env_path) == {"SECRET": f"{CANARY}-one", "DEBUG": "0"}
        source = source_of(raw(env_path))
        assert source is not None and (source.bucket, source.key) == (bucket, "stage.env")
        assert r.etags == [None, source.etag]
        assert r.body_bytes == len(v1)
        assert all(r.restarts(u, "inactive") == 1 for u in units)

        for unit in units:
            systemd_manager.systemctl("start", unit)
        assert all((tmp_path / f"{u}.seen").read_text() == f"{CANARY}-one" for u in units)
        first_invocations = {u: (await systemd.unit(u)).invocation_id for u in units}

        # Rotate: the file is replaced, every unit restarted one at a time, each reading the new value.
        v2 = f"SECRET='{CANARY}-two'\nDEBUG=0\n".encode()
        await put_object(moto_server.endpoint, bucket, "stage.env", v2)
        await r.check_again()
        assert r.fetches("changed") == 2
        assert secret_values(env_path)["SECRET"] == f"{CANARY}-two"
        assert all((tmp_path / f"{u}.seen").read_text() == f"{CANARY}-two" for u in units)
        assert all(r.restarts(u) == 1 for u in units)
        states = [await systemd.unit(u) for u in units]
        assert all(s.active_state == "active" for s in states)
        assert all(s.invocation_id != first_invocations[s.name] for s in states)
        for before, after in itertools.pairwise(states):
            # The next unit went down only once the one before was active again.
            assert after.inactive_enter_usec >= before.active_enter_usec, (before, after)
        etag2 = etag_of(env_path)
        assert r.etags[-1] == etag2 != source.etag
        assert r.body_bytes == len(v1) + len(v2)

        # Unchanged: no body bytes, no write, no restart.
        before_write = fingerprint(env_path)
        invocations = {u: (await systemd.unit(u)).invocation_id for u in units}
        await r.check_again()
        assert r.fetches("unchanged") == 1 and r.up_to_date == 1
        assert fingerprint(env_path) == before_write
        assert {u: (await systemd.unit(u)).invocation_id for u in units} == invocations
        assert r.body_bytes == len(v1) + len(v2)
        assert r.etags[-1] == etag2


async def test_agent_restart_with_an_unchanged_object_writes_and_restarts_nothing(
        tmp_path: Path, etcd: EtcdMember, moto_server: MotoServer) -> None:
    bucket = bucket_name()
    config = env_config(tmp_path, bucket, on_change="next_rollout")
    await put_object(moto_server.endpoint, bucket, "stage.env", b"A=1\n")
    async with rig(etcd, config, store_at(moto_server.endpoint)) as r:
        assert r.fetches("changed") == 1
    written = fingerprint(Path(config.path))
    async with rig(etcd, config, store_at(moto_server.endpoint)) as r:
        assert r.fetches("unchanged") == 1 and r.body_bytes == 0
        etag = r.etags[0]
        assert etag is not None and r.etags == [etag]  # the running file's ETag, read from its header
    assert fingerprint(Path(config.path)) == written


async def test_next_rollout_leaves_running_units_alone(
        tmp_path: Path, etcd: EtcdMember, moto_server: MotoServer, systemd_manager: SystemdManager) -> None:
    bucket = bucket_name()
    config = env_config(tmp_path, bucket, on_change="next_rollout")
    env_path = Path(config.path)
    systemd_manager.write_unit("app-1.service", unit_text(env_path, tmp_path / "seen"))
    await put_object(moto_server.endpoint, bucket, "stage.env", b"SECRET=one\n")
    async with Systemd(systemd_manager.bus_address, call_timeout=15) as systemd, \
            rig(etcd, config, store_at(moto_server.endpoint), systemd=systemd) as r:
        systemd_manager.systemctl("start", "app-1.service")
        invocation = (await systemd.unit("app-1.service")).invocation_id
        await put_object(moto_server.endpoint, bucket, "stage.env", b"SECRET=two\n")
        await r.check_again()
        assert secret_values(env_path) == {"SECRET": "two"}
        assert (await systemd.unit("app-1.service")).invocation_id == invocation
        assert (tmp_path / "seen").read_text() == "one"


async def test_held_units_are_left_to_whoever_holds_them(
        tmp_path: Path, etcd: EtcdMember, moto_server: MotoServer, systemd_manager: SystemdManager) -> None:
    bucket = bucket_name()
    config = env_config(tmp_path, bucket, units=("app-1.service", "app-2.service"))
    env_path = Path(config.path)
    for unit in ("app-1.service", "app-2.service"):
        systemd_manager.write_unit(unit, unit_text(env_path, tmp_path / f"{unit}.seen"))
    await put_object(moto_server.endpoint, bucket, "stage.env", b"SECRET=one\n")
    holds = Holds()
    async with Systemd(systemd_manager.bus_address, call_timeout=15) as systemd, \
            rig(etcd, config, store_at(moto_server.endpoint), systemd=systemd, holds=holds) as r:
        for unit in ("app-1.service", "app-2.service"):
            systemd_manager.systemctl("start", unit)
        holds.hold("app-1.service", "operator")
        await put_object(moto_server.endpoint, bucket, "stage.env", b"SECRET=two\n")
        await r.check_again()
        assert r.restarts("app-1.service", "held") == 1 and r.restarts("app-2.service") == 1
        assert (tmp_path / "app-1.service.seen").read_text() == "one"
        assert (tmp_path / "app-2.service.seen").read_text() == "two"
        assert holds.owners("app-1.service") == {"operator"} and not holds.owners("app-2.service")


async def test_a_unit_that_fails_its_restart_stops_the_sequence(
        tmp_path: Path, etcd: EtcdMember, moto_server: MotoServer, systemd_manager: SystemdManager) -> None:
    bucket = bucket_name()
    config = env_config(tmp_path, bucket)
    env_path = Path(config.path)
    systemd_manager.write_unit("app-1.service", unit_text(env_path, tmp_path / "1.seen"))
    # Starts only while the file says GOOD=yes.
    systemd_manager.write_unit("app-2.service", (
        "[Unit]\nStartLimitIntervalSec=0\n[Service]\n"
        f"EnvironmentFile={env_path}\nExecStart=/bin/sh -c 'test \"$$GOOD\" = yes && exec sleep infinity'\n"
        "ExecStartPost=/bin/sleep 0.3\n"))
    systemd_manager.write_unit("app-3.service", unit_text(env_path, tmp_path / "3.seen"))
    await put_object(moto_server.endpoint, bucket, "stage.env", b"GOOD=yes\nSECRET=one\n")
    async with Systemd(systemd_manager.bus_address, call_timeout=15) as systemd, \
            rig(etcd, config, store_at(moto_server.endpoint), systemd=systemd) as r:
        for unit in ("app-1.service", "app-2.service", "app-3.service"):
            systemd_manager.systemctl("start", unit)
        await put_object(moto_server.endpoint, bucket, "stage.env", b"GOOD=no\nSECRET=two\n")
        with capture_logs() as logs:
            await r.check_again()
        assert r.restarts("app-1.service") == 1 and r.restarts("app-2.service", "failed") == 1
        assert r.restarts("app-3.service") == 0 and (tmp_path / "3.seen").read_text() == "one"
        stopped = [e for e in logs if e["event"] == "env.restarts_stopped"]
        assert stopped and stopped[0]["not_restarted"] == ["app-3.service"]


# ---------------------------------------------------------------------------------------------------
# Failures keep the old file


@pytest.mark.parametrize("failure", ["missing_key", "missing_bucket", "unreachable", "denied"])
async def test_failures_keep_the_old_file_and_are_counted(
        tmp_path: Path, etcd: EtcdMember, moto_server: MotoServer, failure: str) -> None:
    bucket = bucket_name()
    config = env_config(tmp_path, bucket, on_change="next_rollout")
    env_path = Path(config.path)
    await put_object(moto_server.endpoint, bucket, "stage.env", f"SECRET={CANARY}\n".encode())
    async with rig(etcd, config, store_at(moto_server.endpoint)):
        pass
    old = raw(env_path)

    endpoint, environment, expected = moto_server.endpoint, "stage", failure
    own_server = None
    if failure == "missing_key":
        environment, expected = "prod", "missing"
    elif failure == "missing_bucket":
        config = env_config(tmp_path, bucket_name(), on_change="next_rollout")
        expected = "missing"
    elif failure == "unreachable":
        endpoint, expected = f"http://127.0.0.1:{free_port()}", "unavailable"
    else:
        own_server = MotoServer(tmp_path / "moto-auth")
        own_server.start()
        endpoint = own_server.endpoint
        await put_object(endpoint, bucket, "stage.env", b"SECRET=other\n")
        own_server.enforce_auth()  # the "testing" key is no IAM user's: refused
    try:
        with capture_logs() as logs:
            async with rig(etcd, config, store_at(endpoint), environment=environment) as r:
                assert r.fetches(expected) == 1 and r.up_to_date == 0
                assert r.etags == [source_of(old).etag]  # type: ignore[union-attr]
    finally:
        if own_server is not None:
            own_server.stop()
    assert raw(env_path) == old
    failed = [e for e in logs if e["event"] == "env.fetch_failed"]
    assert failed and failed[0]["result"] == expected
    assert "s3://" in failed[0]["error"] and "kept" in failed[0]
    assert_absent(CANARY, repr(logs), "the logs")


async def test_a_malformed_file_is_refused_naming_the_line_not_the_value(
        tmp_path: Path, etcd: EtcdMember, moto_server: MotoServer) -> None:
    bucket = bucket_name()
    config = env_config(tmp_path, bucket, on_change="next_rollout")
    env_path = Path(config.path)
    await put_object(moto_server.endpoint, bucket, "stage.env", b"SECRET=good\n")
    with capture_logs() as logs:
        async with rig(etcd, config, store_at(moto_server.endpoint)) as r:
            old = raw(env_path)
            bad = f"# rotated\nDEBUG=0\nSECRET={CANARY} oops\n".encode()
            await put_object(moto_server.endpoint, bucket, "stage.env", bad)
            await r.check_again()
            assert r.fetches("invalid") == 1 and r.up_to_date == 0
            assert raw(env_path) == old
            bytes_after_refusal = r.body_bytes

            # The same refused object again: a conditional GET on its ETag, no body, still refused.
            await r.check_again()
            assert r.fetches("unchanged") == 1 and r.up_to_date == 0
            assert r.body_bytes == bytes_after_refusal and raw(env_path) == old

            # Fixed: written.
            await put_object(moto_server.endpoint, bucket, "stage.env", b"SECRET=fixed\n")
            await r.check_again()
            assert secret_values(env_path) == {"SECRET": "fixed"} and r.up_to_date == 1
    refused = [e for e in logs if e["event"] == "env.refused"]
    assert len(refused) == 1 and refused[0]["line"] == 3
    assert "more than one word" in refused[0]["reason"]
    assert_absent(CANARY, repr(logs), "the logs")


async def test_the_environment_key_selects_the_object(
        tmp_path: Path, etcd: EtcdMember, moto_server: MotoServer) -> None:
    bucket = bucket_name()
    config = env_config(tmp_path, bucket, on_change="next_rollout")
    await put_object(moto_server.endpoint, bucket, "stage.env", b"WHERE=stage\n")
    await put_object(moto_server.endpoint, bucket, "prod.env", b"WHERE=prod\n")
    async with rig(etcd, config, store_at(moto_server.endpoint), environment=None) as r:
        # No key in etcd: the host's own environment ("prod" here).
        assert secret_values(Path(config.path)) == {"WHERE": "prod"}
        await r.check_again("stage")
        assert secret_values(Path(config.path)) == {"WHERE": "stage"}
        source = source_of(raw(Path(config.path)))
        assert source is not None and source.key == "stage.env"


# ---------------------------------------------------------------------------------------------------
# A whole run of `norm agent`: secrets never show


def norm_cli(agent: AgentProc, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "norm", *args, "--config", str(agent.config_path)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout + r.stderr


def http_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return str(r.read().decode())


def test_canary_secrets_never_show_in_logs_metrics_etcd_or_the_cli(
        tmp_path: Path, etcd: EtcdMember, moto_server: MotoServer, imds_server: MetadataServer,
        systemd_manager: SystemdManager, agents: Callable[..., AgentProc], docker_engine: DockerEngine,
        registry: Registry, demo_app: Callable[..., str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Credentials come from the instance profile (the metadata server): they are secrets too.
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    imds_server.update(instance_id="i-0abc1234def567890", tags={"environment": "stage", "role": "celery"})
    canaries = [f"{CANARY}-{n}" for n in ("first", "rotated", "refused", "step", "step-quoted")]
    profile = imds_server.state["credentials"]
    credentials = [profile["SecretAccessKey"], profile["Token"]]
    bucket = bucket_name()
    env_path = tmp_path / "run" / "app.env"
    seen = tmp_path / "seen"
    # Update mode: a one-off step that prints its environment and the host's environment file, then
    # fails (its output is logged); the steps' own environment file holds secrets too.
    steps_env = tmp_path / "steps.env"
    steps_env.write_text(f"STEP_TOKEN={canaries[3]}\nSTEP_QUOTED='{canaries[4]}'\nDEBUG=0\n")
    demo_app("v1")
    step = "sh -c 'env; cat /hostenv/app.env; echo step-output-end; exit 3'"
    asyncio.run(put_object(moto_server.endpoint, bucket, "stage.env",
                           f"DJANGO_SECRET_KEY='{canaries[0]}'\nDEBUG=0\n".encode()))
    systemd_manager.write_unit("djed-web.service", unit_text(env_path, seen).replace("$$SECRET",
                                                                                      "$$DJANGO_SECRET_KEY"))
    agent = agents(
        [etcd.endpoint], systemd_bus=systemd_manager.bus_address, host_labels=False,
        env={"NORM_HOST__ROLE": "web"},  # the configuration speaks for the role only
        extra_toml=(f'[aws]\nendpoint_url = "{moto_server.endpoint}"\nuse_metadata = true\n'
                    f'metadata_url = "{imds_server.endpoint}"\ncall_timeout = 5\n'
                    f'[env]\nbucket = "{bucket}"\npath = "{env_path}"\ninterval = 3600\n'
                    f'[docker]\nhost = "{docker_engine.host}"\n'
                    f'[update]\nimage = "{registry.address}/djed/app"\n'
                    f'release_file = "{tmp_path / "run" / "release.env"}"\nsteps = ["{step}"]\n'
                    f'steps_env_file = "{steps_env}"\nsteps_mounts = ["{env_path.parent}:/hostenv"]\n'))
    agent.wait_notify("READY=1")
    wait_for(env_path.exists, timeout=20, what="the environment file written")
    assert mode(env_path) == 0o600
    systemd_manager.systemctl("start", "djed-web.service")
    assert seen.read_text() == canaries[0]

    # Host metadata: environment from the tag, role from the configuration, the instance id.
    record = json.loads(etcd.ctl("get", f"/norm/hosts/{agent.machine_id}", "--print-value-only"))
    assert (record["environment"], record["role"], record["instance_id"]) == (
        "stage", "web", "i-0abc1234def567890")
    assert record["env_etag"] == etag_of(env_path)

    # Rotate: the unit restarted with the new value; the record shows the new ETag.
    asyncio.run(put_object(moto_server.endpoint, bucket, "stage.env",
                           f"DJANGO_SECRET_KEY='{canaries[1]}'\nDEBUG=0\n".encode()))
    etcd.ctl("put", ENV_KEY, "stage")
    wait_for(lambda: seen.read_text() == canaries[1], timeout=20, what="the unit restarted with the new file")
    wait_for(lambda: json.loads(etcd.ctl("get", f"/norm/hosts/{agent.machine_id}", "--print-value-only"))
             ["env_etag"] == etag_of(env_path), timeout=10, what="the new ETag in the host record")

    # A malformed file with a secret in it: refused, the old file kept.
    kept = raw(env_path)
    asyncio.run(put_object(moto_server.endpoint, bucket, "stage.env",
                           f"DEBUG=0\nDJANGO_SECRET_KEY={canaries[2]} $(reboot)\n".encode()))
    etcd.ctl("put", ENV_KEY, "stage")
    wait_for(lambda: '"env.refused"' in agent.logs(), timeout=20, what="the refusal logged")
    assert raw(env_path) == kept
    # And a missing object (the environment key names one that does not exist).
    etcd.ctl("put", ENV_KEY, "nowhere")
    wait_for(lambda: '"env.fetch_failed"' in agent.logs(), timeout=20, what="the missing object logged")
    assert raw(env_path) == kept

    # A rollout whose step fails: its output (the last 2000 characters) is logged, every value of the
    # host's environment file and of the steps' environment file masked.
    etcd.ctl("put", "/djed-version", "v1")
    wait_for(lambda: '"executor.step_failed"' in agent.logs(), timeout=120, what="the failed step logged")
    failed = [json.loads(x) for x in agent.logs().splitlines() if '"executor.step_failed"' in x]
    assert failed[0]["exit_code"] == 3 and "step-output-end" in failed[0]["logs"]
    assert "STEP_TOKEN=[redacted]" in failed[0]["logs"]
    assert "DJANGO_SECRET_KEY=[redacted]" in failed[0]["logs"]
    assert "DEBUG=0" in failed[0]["logs"]  # what is too short to be a secret stays
    wait_for(lambda: json.loads(etcd.ctl("get", "/norm/rollout", "--print-value-only"))["phase"] == "failed",
             timeout=60, what="the rollout failed")

    metrics = http_text(f"{agent.url}/metrics")
    assert 'norm_env_fetches_total{result="invalid"} 1.0' in metrics
    assert 'norm_env_fetches_total{result="missing"} ' in metrics  # retried: once or more
    assert 'norm_env_restarts_total{result="ok",unit="djed-web.service"} 1.0' in metrics
    outputs = {
        "logs": agent.logs(),
        "metrics": metrics,
        "etcd": etcd.ctl("get", "", "--prefix"),
        "norm status": norm_cli(agent, "status"),
        "norm status --json": norm_cli(agent, "status", "--json"),
        "norm hosts": norm_cli(agent, "hosts"),
        "norm hosts --json": norm_cli(agent, "hosts", "--json"),
        "norm units": norm_cli(agent, "units"),
        "norm config show": norm_cli(agent, "config", "show"),
    }
    assert "ENV FILE" in outputs["norm status"]
    assert etag_of(env_path).strip('"')[:12] in outputs["norm status"]
    assert "ENV FILE" in outputs["norm hosts"]
    refused = [json.loads(x) for x in agent.logs().splitlines() if '"env.refused"' in x]
    assert refused[0]["line"] == 2 and "more than one word" in refused[0]["reason"]
    for where, text in outputs.items():
        for secret in canaries + credentials:
            assert_absent(secret, text, where)
    agent.stop()
    for secret in canaries + credentials:
        assert_absent(secret, agent.logs(), "the logs of the whole run")


def owner_of(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_uid, st.st_gid


async def test_the_file_gets_the_configured_owner_and_an_unknown_owner_keeps_the_old_file(
        tmp_path: Path, etcd: EtcdMember, moto_server: MotoServer) -> None:
    import grp
    import os
    import pwd

    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    bucket = bucket_name()
    config = env_config(tmp_path, bucket, on_change="next_rollout", owner="nobody:nogroup")
    env_path = Path(config.path)
    await put_object(moto_server.endpoint, bucket, "stage.env", b"A=1\n")
    async with rig(etcd, config, store_at(moto_server.endpoint)) as r:
        assert owner_of(env_path) == (pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid)
        assert mode(env_path) == 0o600
    kept = raw(env_path)
    await put_object(moto_server.endpoint, bucket, "stage.env", b"A=2\n")
    config = env_config(tmp_path, bucket, on_change="next_rollout", owner="no-such-user-here")
    with capture_logs() as logs:
        async with rig(etcd, config, store_at(moto_server.endpoint)) as r:
            assert r.fetches("write_failed") == 1 and r.up_to_date == 0
    assert raw(env_path) == kept
    assert any(e["event"] == "env.write_failed" and "no user" in e["error"] for e in logs)


def test_an_owner_the_agent_cannot_give_the_file_to_stops_it_at_start_with_the_reason(
        tmp_path: Path, etcd: EtcdMember, agents: Callable[..., AgentProc]) -> None:
    """As under deploy/norm.service, whose bounding set is empty: here the agent runs without
    CAP_CHOWN in its bounding set (setpriv), so no file of its can be given to another user."""
    env_path = tmp_path / "run" / "app.env"
    agent = agents([etcd.endpoint], wrapper=["setpriv", "--bounding-set", "-chown", "--"],
                   extra_toml=f'[env]\nbucket = "{bucket_name()}"\npath = "{env_path}"\nowner = "daemon"\n')
    assert agent.wait_exit(timeout=30) == 2
    logs = agent.logs()
    assert '"event": "agent.env_owner_refused"' in logs and "env-owner.conf" in logs, logs
    assert "Traceback" not in logs and not env_path.exists()
    assert list(env_path.parent.iterdir()) == []  # the check left nothing behind
