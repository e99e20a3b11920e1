"""Load-balancer presence against a real moto server (ELBv2, EC2) and a real systemd manager: the host
is registered once its web unit is active and answers its health URL, deregistered when the unit
fails, and an update takes it out (drained) before the stop and puts it back only once the new run is
healthy. The update is driven through the real executor, on a real etcd, by the rollout header a
leader would write."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import secrets
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from norm.adapters.docker import Docker
from norm.adapters.elb import Elb
from norm.adapters.etcd import Etcd, Event, Resync
from norm.adapters.systemd import Systemd
from norm.core import protocol as proto
from norm.core.config import EtcdConfig, LbConfig, UpdateConfig
from norm.core.record import Phase, Release
from norm.services.balancers import ElbTargets
from norm.services.context import HostContext
from norm.services.executor import HOLD_OWNER, Executor, Hooks
from norm.services.holds import Holds
from norm.services.metrics import Metrics
from norm.services.presence import Presence, invocation_of
from sandbox.docker import DockerEngine
from sandbox.etcd import EtcdMember
from sandbox.moto import MotoServer
from sandbox.procs import free_port
from sandbox.systemd import SystemdManager
from tests.integration.elb import REGION, Site, aws_credentials, make_site, web_unit

pytestmark = pytest.mark.usefixtures("aws_credentials")
__all__ = ["aws_credentials"]

WEB = "djed-web.service"
PATTERNS = ("djed*.service",)
DIGEST_1, DIGEST_2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64


@dataclass
class Rig:
    site: Site
    manager: SystemdManager
    systemd: Systemd
    presence: Presence
    metrics: Metrics
    holds: Holds
    logs: list[dict[str, Any]] = field(default_factory=list)

    async def until(self, what: str, predicate: Callable[[], bool], timeout: float = 20) -> None:
        """Wait, woken by each pass of presence's work loop, until `predicate()` holds."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    self.presence.progress.clear()
                    await self.presence.progress.wait()
        except TimeoutError:
            raise AssertionError(f"{what}: not within {timeout}s; unit {self.presence.unit}, registered "
                                 f"{self.presence.registered}, events {self.events()}") from None

    def registered(self, value: bool) -> Callable[[], bool]:
        return lambda: all(v is value for v in self.presence.registered.values())

    def gauge(self, group: str) -> float:
        return self.metrics.lb_registered.labels(group)._value.get()

    def events(self, *names: str) -> list[str]:
        return [e["event"] for e in self.logs if not names or e["event"] in names]


@asynccontextmanager
async def rig_for(moto: MotoServer, manager: SystemdManager, tmp_path: Path, *, groups: int = 2,
                  elb_class: type[Elb] = Elb, systemd_class: type[Systemd] = Systemd,
                  start: bool = True, drain_timeout: float = 5.0, recheck_interval: float = 0.0,
                  health_path: str = "/", health_give_up: float = 20.0) -> AsyncIterator[Rig]:
    site = await make_site(moto, groups=groups)
    port = free_port()
    root = tmp_path / "www"
    root.mkdir(exist_ok=True)
    manager.write_unit(WEB, web_unit(port, root))
    lb = LbConfig(target_groups=site.groups, instance_id=site.instance_id, unit=WEB,
                  health_url=f"http://127.0.0.1:{port}{health_path}", drain_timeout=drain_timeout,
                  recheck_interval=recheck_interval, health_timeout=1.0, health_give_up=health_give_up)
    metrics, holds = Metrics(), Holds()
    with capture_logs() as logs:
        async with systemd_class(manager.bus_address, call_timeout=10) as systemd:
            if start:
                await systemd.start(WEB)
            elb = elb_class(REGION, endpoint_url=moto.endpoint, call_timeout=5, poll_interval=0.1)
            presence = Presence(systemd, ElbTargets(elb, site.instance_id, lb.port), lb, metrics, holds=holds,
                                hold_owner=HOLD_OWNER)
            stopping = asyncio.Event()
            task = asyncio.create_task(presence.run(stopping), name="presence-under-test")
            try:
                yield Rig(site, manager, systemd, presence, metrics, holds, logs)
            finally:
                stopping.set()
                async with asyncio.timeout(15):
                    await task


async def test_registered_once_the_web_unit_is_active_and_healthy(
        moto_server: MotoServer, systemd_manager: SystemdManager, tmp_path: Path) -> None:
    async with rig_for(moto_server, systemd_manager, tmp_path, health_path="/ready") as rig:
        # The unit is active but its health URL does not answer 2xx until the test makes it.
        await rig.until("not healthy yet", lambda: "lb.not_healthy_yet" in rig.events())
        assert not any(rig.presence.registered.values())
        (tmp_path / "www" / "ready").write_text("ok\n")
        await rig.until("registered", rig.registered(True))
        assert await rig.site.states() == ["healthy", "healthy"]
        assert [rig.gauge(g) for g in rig.site.groups] == [1, 1]
        # Active first, not answering yet, then healthy, then in every group; nothing was registered
        # before the health check passed.
        assert rig.events("lb.unit_active", "lb.not_healthy_yet", "lb.healthy", "lb.registered") == [
            "lb.unit_active", "lb.not_healthy_yet", "lb.healthy", "lb.registered", "lb.registered"]
        assert "lb.deregistered" not in rig.events()


async def test_not_registered_while_the_unit_is_down_then_registered_when_it_starts(
        moto_server: MotoServer, systemd_manager: SystemdManager, tmp_path: Path) -> None:
    async with rig_for(moto_server, systemd_manager, tmp_path, groups=1, start=False) as rig:
        # The unit is not running: the registration, unknown at the start, is made sure of.
        await rig.until("known to be out", rig.registered(False))
        assert await rig.site.states() == ["unused"]
        await rig.systemd.start(WEB)
        await rig.until("registered", rig.registered(True))
        assert await rig.site.states() == ["healthy"]


async def test_a_run_that_never_answers_its_health_url_stays_out(
        moto_server: MotoServer, systemd_manager: SystemdManager, tmp_path: Path) -> None:
    async with rig_for(moto_server, systemd_manager, tmp_path, groups=1, health_path="/missing",
                       health_give_up=1.5) as rig:
        await rig.until("given up", lambda: "lb.health_gave_up" in rig.events())
        gave_up = next(e for e in rig.logs if e["event"] == "lb.health_gave_up")
        assert gave_up["bound_s"] == 1.5 and gave_up["status"] == 404
        assert rig.presence.registered == {rig.site.groups[0]: False}
        assert await rig.site.states() == ["unused"]
        assert "lb.registered" not in rig.events() and "lb.healthy" not in rig.events()
        # The next run of the unit is checked again.
        await rig.systemd.restart(WEB)
        await rig.until("checked again", lambda: rig.events("lb.health_gave_up") == ["lb.health_gave_up"] * 2)


async def test_deregistered_when_the_web_unit_fails(
        moto_server: MotoServer, systemd_manager: SystemdManager, tmp_path: Path) -> None:
    async with rig_for(moto_server, systemd_manager, tmp_path) as rig:
        await rig.until("registered", rig.registered(True))
        pid = (await rig.systemd.unit(WEB)).main_pid
        assert pid > 0
        os.kill(pid, signal.SIGKILL)
        await rig.until("deregistered", rig.registered(False))
        assert (await rig.systemd.unit(WEB)).active_state == "failed"
        assert await rig.site.states() == ["unused", "unused"]
        assert [rig.gauge(g) for g in rig.site.groups] == [0, 0]
        assert rig.events("lb.unit_down", "lb.deregistered")[-3:] == [
            "lb.unit_down", "lb.deregistered", "lb.deregistered"]

        # Started again (as the healer would): a new run, checked, and registered again.
        await rig.systemd.start(WEB)
        await rig.until("registered again", rig.registered(True))
        assert await rig.site.states() == ["healthy", "healthy"]


async def test_deregistered_when_the_web_unit_is_stopped(
        moto_server: MotoServer, systemd_manager: SystemdManager, tmp_path: Path) -> None:
    async with rig_for(moto_server, systemd_manager, tmp_path, groups=1) as rig:
        await rig.until("registered", rig.registered(True))
        await rig.systemd.stop(WEB)
        await rig.until("deregistered", rig.registered(False))
        assert await rig.site.states() == ["unused"]


async def test_a_registration_changed_elsewhere_is_put_back(
        moto_server: MotoServer, systemd_manager: SystemdManager, tmp_path: Path) -> None:
    async with rig_for(moto_server, systemd_manager, tmp_path, recheck_interval=0.3) as rig:
        await rig.until("registered", rig.registered(True))
        first, second = rig.site.groups
        # Taken out of one group behind the agent's back: the next read of the groups sees it, and the
        # host, still serving, goes back in; the other group is left alone.
        # (What the agent read of it, "unused", is in its log below: looking at the group here would race
        # with the agent's next read, 0.3 s away.)
        await rig.site.deregister(first)
        await rig.until("noticed and put back", lambda: "lb.registration_changed_elsewhere" in rig.events()
                        and rig.presence.registered == {first: True, second: True})
        assert await rig.site.states() == ["healthy", "healthy"]
        changed = [e for e in rig.logs if e["event"] == "lb.registration_changed_elsewhere"]
        assert [(e["target_group"], e["expected"], e["state"]) for e in changed] == [
            (first, "registered", "unused")]

        # The unit stopped, the host is out; put in by someone else, it is taken out again.
        await rig.systemd.stop(WEB)
        await rig.until("deregistered", rig.registered(False))
        await rig.site.register(second)
        await rig.until("noticed and taken out",
                        lambda: len(rig.events("lb.registration_changed_elsewhere")) == 2
                        and rig.registered(False)())
        assert await rig.site.states() == ["unused", "unused"]
        assert [rig.gauge(g) for g in rig.site.groups] == [0, 0]


async def test_an_update_that_releases_its_hold_without_a_start_puts_the_host_back(
        moto_server: MotoServer, systemd_manager: SystemdManager, tmp_path: Path) -> None:
    async with rig_for(moto_server, systemd_manager, tmp_path, groups=1) as rig:
        await rig.until("registered", rig.registered(True))
        rig.holds.hold(WEB, HOLD_OWNER)
        await rig.presence.before_stop()
        assert rig.presence.registered == {rig.site.groups[0]: False}
        assert await rig.site.states() == ["unused"]
        # The update moved on without stopping or starting the unit: its hold goes, the host comes back
        # once the unit (still the same run) has passed its health check again.
        rig.holds.unhold_all(HOLD_OWNER)
        await rig.until("registered again", rig.registered(True))
        assert await rig.site.states() == ["healthy"]
        assert rig.events("lb.suspended", "lb.drained", "lb.resumed", "lb.healthy", "lb.registered")[-5:] == [
            "lb.suspended", "lb.drained", "lb.resumed", "lb.healthy", "lb.registered"]


async def test_waiting_for_draining_before_a_stop_is_bounded(
        moto_server: MotoServer, systemd_manager: SystemdManager, tmp_path: Path) -> None:
    async with rig_for(moto_server, systemd_manager, tmp_path, groups=1, drain_timeout=0.5) as rig:
        await rig.until("registered", rig.registered(True))
        await rig.site.terminate()  # moto then shows the target draining for good
        loop = asyncio.get_running_loop()
        started = loop.time()
        await rig.presence.before_stop()
        assert 0.5 <= loop.time() - started < 5
        assert rig.presence.registered == {rig.site.groups[0]: False}
        assert "lb.drain_timeout" in rig.events()


# ---------------------------------------------------------------------------------------------------
# An update: the executor's stop and start, as moto and systemd see them


def recording(rig_logs: Callable[[], list[dict[str, Any]]], site: Callable[[], Site]
              ) -> tuple[type[Elb], type[Systemd]]:
    """Stand-ins for the adapters that add each step, with the target groups' states as moto has them
    at that moment, to the test's log capture: one ordered record with presence's own log events."""

    async def record(step: str, subject: str) -> None:
        states = tuple(await site().states())
        rig_logs().append({"event": f"observed.{step}", "subject": subject, "moto": states})

    class RecordingElb(Elb):
        async def register(self, target_group: str, instance_id: str, port: int | None = None) -> None:
            await super().register(target_group, instance_id, port)
            await record("register", target_group)

        async def deregister(self, target_group: str, instance_id: str, port: int | None = None) -> None:
            await super().deregister(target_group, instance_id, port)
            await record("deregister", target_group)

        async def wait_drained(self, target_group: str, instance_id: str, port: int | None = None, *,
                               within: float) -> bool:
            drained = await super().wait_drained(target_group, instance_id, port, within=within)
            await record("drained" if drained else "drain_timeout", target_group)
            return drained

    class RecordingSystemd(Systemd):
        async def stop(self, name: str) -> str:
            await record("stop", name)  # as moto has it when systemd is asked to stop the unit
            result = await super().stop(name)
            state = await self.unit(name)
            rig_logs().append({"event": "observed.stopped", "subject": name, "state": state.active_state})
            return result

        async def start(self, name: str) -> str:
            await record("start", name)
            return await super().start(name)

    return RecordingElb, RecordingSystemd


async def wait_put(etcd: Etcd, key: str, timeout: float = 30) -> bytes:
    async with asyncio.timeout(timeout):
        async with etcd.watch(key) as w:
            async for item in w:
                if isinstance(item, Resync) and item.snapshot.kvs:
                    return item.snapshot.kvs[0].value
                if isinstance(item, Event) and item.kind == "put":
                    return item.kv.value
    raise AssertionError(f"{key}: the watch ended")


@asynccontextmanager
async def serving_and_recorded(moto: MotoServer, manager: SystemdManager, tmp_path: Path
                               ) -> AsyncIterator[Rig]:
    """A rig whose web unit serves and whose host is in both groups; from here on its log holds each
    ELB and systemd step with the groups' states as moto had them."""
    current: list[Rig] = []
    elb_class, systemd_class = recording(lambda: current[0].logs, lambda: current[0].site)
    async with rig_for(moto, manager, tmp_path, elb_class=elb_class, systemd_class=systemd_class,
                       start=False) as rig:
        current.append(rig)
        await rig.systemd.start(WEB)
        await rig.until("registered", rig.registered(True))
        rig.logs.clear()
        yield rig


@asynccontextmanager
async def executor_for(rig: Rig, client: Etcd, docker: Docker, me: str, update: UpdateConfig
                       ) -> AsyncIterator[Executor]:
    """The real executor of host `me`, with the rig's presence, running until the block ends."""
    async def set_release(text: str | None) -> None:
        pass

    executor = Executor(HostContext(client, "/norm", me, rig.metrics, rig.holds, units=PATTERNS), rig.systemd,
                        docker, update, set_release, leading=lambda: False,
                        hooks=Hooks(presence=rig.presence))
    stopping = asyncio.Event()
    task = asyncio.create_task(executor.run(stopping), name="executor-under-test")
    try:
        yield executor
    finally:
        stopping.set()
        async with asyncio.timeout(15):
            await task


async def test_an_update_deregisters_drains_stops_starts_checks_and_registers_in_that_order(
        moto_server: MotoServer, systemd_manager: SystemdManager, etcd: EtcdMember, tmp_path: Path) -> None:
    prefix, me, revision = "/norm", secrets.token_hex(16), 1000
    update = UpdateConfig(image="127.0.0.1:5000/djed/app", release_file=str(tmp_path / "release.env"))
    config = EtcdConfig(endpoints=(etcd.endpoint,), request_timeout=5.0, lease_ttl=5)
    async with serving_and_recorded(moto_server, systemd_manager, tmp_path) as rig, \
            Etcd(config) as client, \
            executor_for(rig, client, Docker("unix:///nonexistent.sock"), me, update):
        # What the leader writes: the participants, then the header at STOP, later at START.
        await client.put(proto.hosts_list_key(prefix, revision), json.dumps([me]).encode())
        header = proto.Header(revision=revision, tag="v2", phase=Phase.STOP, digest=DIGEST_2,
                            previous=Release("v1", DIGEST_1), hosts_count=1)
        await client.put(proto.header_key(prefix), header.encode())
        await wait_put(client, proto.report_key(prefix, revision, "stopped", me))
        assert rig.holds.owners(WEB) == {HOLD_OWNER}
        assert rig.presence.registered == dict.fromkeys(rig.site.groups, False)
        assert await rig.site.states() == ["unused", "unused"]

        start = dataclasses.replace(header, phase=Phase.START)
        await client.put(proto.header_key(prefix), start.encode())
        report = json.loads(await wait_put(client, proto.report_key(prefix, revision, "started", me)))
        assert report["ok"] is True and report["digest"] == DIGEST_2
        await rig.until("registered again", rig.registered(True))
    assert_in_order(rig, Release("v2", DIGEST_2), tmp_path / "release.env")


def assert_in_order(rig: Rig, release: Release, release_file: Path) -> None:
    """Per host, exactly: deregister, drained, stop, start, healthy, register (each in both groups),
    with the groups, as moto had them, out from before the stop until the new run was healthy."""
    a, b = rig.site.groups
    out, both_in = ("unused", "unused"), ("healthy", "healthy")
    steps = [(e["event"].removeprefix("observed."), e.get("subject"), e.get("moto"), e.get("state"))
             for e in rig.logs if e["event"].startswith("observed.") or e["event"] == "lb.healthy"]
    kinds = [s for s, *_ in steps]
    assert kinds == ["deregister", "deregister", "drained", "drained", "stop", "stopped", "start",
                     "lb.healthy", "register", "register"], steps
    # Each target group once per kind (in either order within a kind).
    for kind in ("deregister", "drained", "register"):
        assert sorted(g for s, g, *_ in steps if s == kind) == sorted([a, b])
    # As moto had it: out of both groups from the second deregistration until the first registration;
    # in both at the end. As systemd had it: the unit stopped.
    assert steps[1][2] == out
    assert [m for s, _, m, _ in steps if s in ("drained", "stop", "start")] == [out] * 4
    assert steps[-2][2] in (("healthy", "unused"), ("unused", "healthy")) and steps[-1][2] == both_in
    assert steps[5] == ("stopped", WEB, None, "inactive")
    assert proto.parse_release(release_file.read_bytes()) == release
    assert [rig.gauge(g) for g in rig.site.groups] == [1, 1]


@pytest.mark.slow
async def test_a_host_catching_up_leaves_and_rejoins_in_the_same_order(
        moto_server: MotoServer, systemd_manager: SystemdManager, etcd: EtcdMember,
        docker_engine: DockerEngine, demo_app_digest: Callable[..., str], tmp_path: Path) -> None:
    """A host that missed a rollout (it joined late, or was down) moves to the fleet's release after it:
    the catch-up pulls the release, then takes the host out of the load balancer exactly as an update's
    stop and start do."""
    image, digest = (await asyncio.to_thread(demo_app_digest, "v2")).split("@")
    update = UpdateConfig(image=image, release_file=str(tmp_path / "release.env"))
    config = EtcdConfig(endpoints=(etcd.endpoint,), request_timeout=5.0, lease_ttl=5)
    async with serving_and_recorded(moto_server, systemd_manager, tmp_path) as rig, \
            Etcd(config) as client, Docker(docker_engine.host, call_timeout=30) as docker:
        released = asyncio.Event()
        rig.holds.subscribe(lambda: None if rig.holds.owners(WEB) else released.set())
        # A rollout this host took no part in ended with v2 as the fleet's release.
        header = proto.Header(revision=2000, tag="v2", phase=Phase.DONE, digest=digest,
                            previous=Release("v1", DIGEST_1), hosts_count=1, outcome=Phase.DONE)
        await client.put(proto.header_key("/norm"), header.encode())
        async with executor_for(rig, client, docker, secrets.token_hex(16), update) as executor:
            await rig.until("registered again", lambda: "lb.resumed" in rig.events()
                            and rig.registered(True)(), timeout=60)
            async with asyncio.timeout(10):
                await released.wait()  # the catch-up let go of the units
            assert executor.running == Release("v2", digest)
    assert_in_order(rig, Release("v2", digest), tmp_path / "release.env")


async def test_a_host_left_out_of_a_rollout_leaves_the_load_balancer_once_the_migration_begins(
        moto_server: MotoServer, systemd_manager: SystemdManager, etcd: EtcdMember, tmp_path: Path) -> None:
    """A host excluded from a rollout (lost or slow during the pull) keeps its old release; from the
    migrate phase on that release is behind the schema, so the host leaves the load balancer (its units
    keep running: it catches up later). When the rollout rolls back, the old release is the fleet's
    again, and the same run is registered again."""
    prefix, me, other, revision = "/norm", secrets.token_hex(16), "f" * 32, 3000
    release_file = tmp_path / "release.env"
    release_file.write_bytes(proto.render_release(Release("v1", DIGEST_1), "127.0.0.1:5000/djed/app", 1))
    update = UpdateConfig(image="127.0.0.1:5000/djed/app", release_file=str(release_file))
    config = EtcdConfig(endpoints=(etcd.endpoint,), request_timeout=5.0, lease_ttl=5)
    async with serving_and_recorded(moto_server, systemd_manager, tmp_path) as rig, \
            Etcd(config) as client, \
            executor_for(rig, client, Docker("unix:///nonexistent.sock"), me, update) as executor:
        run = invocation_of(rig.presence.unit)
        await client.put(proto.hosts_list_key(prefix, revision), json.dumps([me, other]).encode())
        pulling = proto.Header(revision=revision, tag="v2", phase=Phase.PULL, digest=DIGEST_2,
                             previous=Release("v1", DIGEST_1), hosts_count=2, excluded=(me,))
        await client.put(proto.header_key(prefix), pulling.encode())
        # Excluded at the pull barrier, then the others stop: this host still serves the old release.
        stopping = dataclasses.replace(pulling, phase=Phase.STOP)
        await client.put(proto.header_key(prefix), stopping.encode())
        migrating = dataclasses.replace(pulling, phase=Phase.MIGRATE, migrating="migrate", migrator=other)
        assert rig.presence.registered == dict.fromkeys(rig.site.groups, True)
        await client.put(proto.header_key(prefix), migrating.encode())
        await rig.until("out of the load balancer", rig.registered(False))
        assert await rig.site.states() == ["unused", "unused"]
        assert invocation_of(await rig.systemd.unit(WEB)) == run  # still running: not this host's to stop
        assert executor.running == Release("v1", DIGEST_1)
        assert "executor.behind_migration" in rig.events()

        # The step fails and the old release is started again everywhere: back in, the same run.
        rolling_back = dataclasses.replace(migrating, phase=Phase.START, migrating=None, migrator=None,
                                           rollback=True, outcome=Phase.FAILED)
        await client.put(proto.header_key(prefix), rolling_back.encode())
        await rig.until("registered again", rig.registered(True))
        assert invocation_of(await rig.systemd.unit(WEB)) == run
        assert proto.parse_release(release_file.read_bytes()) == Release("v1", DIGEST_1)


@pytest.mark.slow
async def test_a_host_left_out_of_a_rollout_stays_out_until_it_has_caught_up(
        moto_server: MotoServer, systemd_manager: SystemdManager, etcd: EtcdMember,
        docker_engine: DockerEngine, demo_app_digest: Callable[..., str], tmp_path: Path) -> None:
    """Out from the migration on; the rollout done, the host catches up on the new release and is
    registered again once its new run is healthy."""
    image, digest = (await asyncio.to_thread(demo_app_digest, "v2")).split("@")
    prefix, me, other, revision = "/norm", secrets.token_hex(16), "f" * 32, 3100
    release_file = tmp_path / "release.env"
    release_file.write_bytes(proto.render_release(Release("v1", DIGEST_1), image, 1))
    update = UpdateConfig(image=image, release_file=str(release_file))
    config = EtcdConfig(endpoints=(etcd.endpoint,), request_timeout=5.0, lease_ttl=5)
    async with serving_and_recorded(moto_server, systemd_manager, tmp_path) as rig, \
            Etcd(config) as client, Docker(docker_engine.host, call_timeout=30) as docker, \
            executor_for(rig, client, docker, me, update) as executor:
        run = invocation_of(rig.presence.unit)
        await client.put(proto.hosts_list_key(prefix, revision), json.dumps([me, other]).encode())
        migrating = proto.Header(revision=revision, tag="v2", phase=Phase.MIGRATE, digest=digest,
                               previous=Release("v1", DIGEST_1), hosts_count=2, excluded=(me,),
                               migrating="migrate", migrator=other)
        await client.put(proto.header_key(prefix), migrating.encode())
        await rig.until("out of the load balancer", rig.registered(False))
        starting = dataclasses.replace(migrating, phase=Phase.START, migrating=None, migrator=None)
        await client.put(proto.header_key(prefix), starting.encode())
        rig.logs.clear()
        done = dataclasses.replace(starting, phase=Phase.DONE, outcome=Phase.DONE)
        await client.put(proto.header_key(prefix), done.encode())
        await rig.until("registered again", lambda: executor.running == Release("v2", digest)
                        and rig.registered(True)(), timeout=60)
        assert invocation_of(await rig.systemd.unit(WEB)) != run  # a new run, on the new release
    # Out all along: from the catch-up's start, nothing was registered before the new run was healthy.
    steps = [e["event"].removeprefix("observed.") for e in rig.logs
             if e["event"].startswith("observed.") or e["event"] == "lb.healthy"]
    assert steps[-3:] == ["lb.healthy", "register", "register"] and "register" not in steps[:-2]
    assert "stop" in steps and "start" in steps
