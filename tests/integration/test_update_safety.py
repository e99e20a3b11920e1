"""What one host's executor does with values it must not trust, and with units it must not start,
against the real parts: a real etcd, where the header is written as a leader (or an intruder) would
write it, and a real systemd manager whose unit reads the release file through EnvironmentFile=.

Every wait is on a condition (a report key written, a counter moved), with a deadline."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from norm.adapters.docker import Docker
from norm.adapters.etcd import Delete, Etcd, Event, Put, Resync
from norm.adapters.systemd import Systemd
from norm.core import protocol as proto
from norm.core.config import EtcdConfig, UpdateConfig
from norm.core.healing import HealPolicy
from norm.core.record import Phase, Release
from norm.services.context import HostContext
from norm.services.control import OPERATOR, Control
from norm.services.executor import HOLD_OWNER, Executor
from norm.services.healer import Healer
from norm.services.holds import Holds
from norm.services.metrics import Metrics
from sandbox.etcd import EtcdMember
from sandbox.systemd import SystemdManager

P = "/norm"
WEB = "djed-web.service"
PATTERNS = ("djed*.service",)
IMAGE = "127.0.0.1:5000/djed/app"
D1, D2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
OLD, NEW = Release("v1", D1), Release("v2", D2)


def unit_text(release_file: Path, seen: Path) -> str:
    """Writes what it was given as NORM_IMAGE and any NORM_EVIL before it is active, then waits."""
    return ("[Unit]\nStartLimitIntervalSec=0\n[Service]\n"
            f"EnvironmentFile=-{release_file}\n"
            f"ExecStartPre=/bin/sh -c 'printf \"%%s|%%s\" \"$NORM_IMAGE\" \"$NORM_EVIL\" > {seen}'\n"
            "ExecStart=/bin/sleep infinity\n")


@dataclass
class Rig:
    etcd: Etcd
    systemd: Systemd
    manager: SystemdManager
    executor: Executor
    metrics: Metrics
    holds: Holds
    me: str
    release_file: Path
    seen: Path
    logs: list[dict[str, Any]] = field(default_factory=list)

    def invocation(self, unit: str = WEB) -> str:
        """systemd's id of the unit's current run: a new one at every start."""
        return self.manager.systemctl("show", "-p", "InvocationID", "--value", unit).strip()

    def active_state(self, unit: str = WEB) -> str:
        return self.manager.systemctl("show", "-p", "ActiveState", "--value", unit).strip()

    def rejected(self, key: str) -> float:
        return self.metrics.rejected_values.labels(key)._value.get()

    async def until(self, what: str, predicate: Callable[[], bool], timeout: float = 30) -> None:
        """Wait for `predicate()` (checked every 50 ms: it reads a counter the executor moves)."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate():  # noqa: ASYNC110 (a counter has no event to wait on)
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise AssertionError(f"{what}: not within {timeout}s; events {self.events()}") from None

    def events(self, *names: str) -> list[str]:
        return [e["event"] for e in self.logs if not names or e["event"] in names]

    async def begin(self, header: proto.Header | dict[str, Any], hosts: list[str] | None = None) -> None:
        """Write the participants of the header's rollout, then the header (as the leader does)."""
        revision = header.revision if isinstance(header, proto.Header) else header["revision"]
        raw = header.encode() if isinstance(header, proto.Header) else json.dumps(header).encode()
        await self.etcd.put(proto.hosts_list_key(P, revision), json.dumps(hosts or [self.me]).encode())
        await self.etcd.put(proto.header_key(P), raw)

    async def started(self, revision: int) -> dict[str, Any]:
        """This host's start report for `revision` (waits for it)."""
        value = json.loads(await wait_put(self.etcd, proto.report_key(P, revision, "started", self.me)))
        assert isinstance(value, dict)
        return value


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
async def host_rig(etcd_member: EtcdMember, manager: SystemdManager, tmp_path: Path,
                   holds: Holds | None = None, **update: Any) -> AsyncIterator[Rig]:
    """One host's executor, on a real etcd and a real systemd manager, running until the block ends.
    Its Docker engine is absent: the tests here need none until a pull or a step."""
    release_file, seen = tmp_path / "release.env", tmp_path / "seen"
    manager.write_unit(WEB, unit_text(release_file, seen))
    config = UpdateConfig(image=IMAGE, release_file=str(release_file), **update)
    metrics, me = Metrics(), secrets.token_hex(16)
    holds = holds or Holds()  # by default, an agent without healing: no operator holds to wait for

    async def set_release(text: str | None) -> None:
        pass

    with capture_logs() as logs:
        async with Etcd(EtcdConfig(endpoints=(etcd_member.endpoint,), request_timeout=5.0)) as client, \
                Systemd(manager.bus_address, call_timeout=10) as systemd:
            host = HostContext(client, P, me, metrics, holds, units=PATTERNS)
            executor = Executor(host, systemd, Docker("unix:///nonexistent.sock"), config, set_release,
                                leading=lambda: False)
            stopping = asyncio.Event()
            task = asyncio.create_task(executor.run(stopping), name="executor-under-test")
            try:
                yield Rig(client, systemd, manager, executor, metrics, holds, me, release_file, seen, logs)
            finally:
                stopping.set()
                async with asyncio.timeout(15):
                    await task


def header(revision: int, phase: Phase = Phase.START, **kw: Any) -> proto.Header:
    return proto.Header(revision=revision, tag=kw.pop("tag", "v2"), phase=phase, digest=kw.pop("digest", D2),
                      previous=kw.pop("previous", OLD), hosts_count=1, **kw)


# ---------------------------------------------------------------------------------------------------
# Values under the prefix are not trusted


async def test_a_hostile_header_is_refused_counted_and_changes_nothing(
        etcd: EtcdMember, systemd_manager: SystemdManager, tmp_path: Path) -> None:
    async with host_rig(etcd, systemd_manager, tmp_path) as rig:
        # A real rollout first: the release file written, the unit started on it.
        await rig.begin(header(1000))
        assert (await rig.started(1000))["ok"] is True
        written = rig.release_file.read_bytes()
        assert proto.parse_release(written) == NEW
        assert rig.seen.read_text() == f"{IMAGE}@{D2}|"
        run = rig.invocation()

        # Then whoever can write under the prefix writes a header whose tag carries lines of its own
        # (a new rollout, at START, with this host among its participants).
        hostile = json.loads(header(1001, tag="v3").encode())
        hostile["tag"] = f"v3\nNORM_IMAGE=evil.example/app@{D1}\nNORM_EVIL=1"
        await rig.begin(hostile)
        await rig.until("the header refused", lambda: rig.rejected(proto.header_key(P)) == 1)

        assert rig.executor.header is not None and rig.executor.header.revision == 1000
        assert rig.release_file.read_bytes() == written
        assert rig.invocation() == run and rig.active_state() == "active"
        assert rig.seen.read_text() == f"{IMAGE}@{D2}|"
        assert await rig.etcd.get(proto.report_key(P, 1001, "started", rig.me)) is None
        refused = [e for e in rig.logs if e["event"] == "executor.header_refused"]
        assert len(refused) == 1 and "tag" in refused[0]["reason"]
        assert "evil" not in repr(rig.logs)


# ---------------------------------------------------------------------------------------------------
# An operator's hold wins over an update


async def test_an_update_leaves_a_unit_the_operator_stopped_stopped_and_says_so(
        etcd: EtcdMember, systemd_manager: SystemdManager, tmp_path: Path) -> None:
    async with host_rig(etcd, systemd_manager, tmp_path) as rig:
        await rig.systemd.start(WEB)
        # `norm units stop djed-web.service`, as the agent's control service carries it out.
        rig.holds.hold(WEB, OPERATOR)
        await rig.systemd.stop(WEB)
        assert rig.active_state() == "inactive"

        await rig.begin(header(1000, Phase.STOP))
        await wait_put(rig.etcd, proto.report_key(P, 1000, "stopped", rig.me))
        await rig.etcd.put(proto.header_key(P), header(1000, Phase.START).encode())
        report = await rig.started(1000)

        # The release is written (the unit gets it when the operator starts it again); the unit stays
        # stopped and held by the operator only; the host's report and the log say why.
        assert proto.parse_release(rig.release_file.read_bytes()) == NEW
        assert rig.active_state() == "inactive"
        await rig.until("the update's holds ended", lambda: rig.holds.owners(WEB) == {OPERATOR})
        assert rig.active_state() == "inactive"
        assert report["ok"] is True
        assert report["reason"] == f"{WEB}: held by the operator, left stopped"
        held = [e for e in rig.logs if e["event"] == "executor.units_held_by_operator"]
        assert len(held) == 1 and held[0]["units"] == [WEB]


async def test_a_restarted_agent_knows_the_operators_holds_before_it_starts_a_unit(
        etcd: EtcdMember, systemd_manager: SystemdManager, tmp_path: Path) -> None:
    """The agent restarts while its host is to start the new release; the operator's hold on a unit
    is in etcd, and the executor must not start that unit before the control service has read it."""
    holds = Holds(operator_holds=True)  # the agent's, as it starts: nothing known yet
    async with host_rig(etcd, systemd_manager, tmp_path, holds=holds) as rig:
        assert rig.active_state() == "inactive"
        before = rig.invocation()
        await rig.etcd.put(f"{P}/control/{rig.me}/hold/{WEB}", b"{}")  # `norm units stop`, earlier
        await rig.begin(header(1000, Phase.START))
        await rig.until("the executor waiting for the operator's holds",
                        lambda: "executor.awaiting_operator_holds" in rig.events())
        # The control service comes up (after the executor, as it may on a loaded machine).
        host = HostContext(rig.etcd, P, rig.me, rig.metrics, holds, units=PATTERNS)
        healer = Healer(host, rig.systemd, HealPolicy())
        control = Control(host, rig.systemd, healer)
        stopping = asyncio.Event()
        task = asyncio.create_task(control.run(stopping), name="control-under-test")
        try:
            report = await rig.started(1000)
        finally:
            stopping.set()
            async with asyncio.timeout(15):
                await task
        assert report["reason"] == f"{WEB}: held by the operator, left stopped"
        assert rig.active_state() == "inactive" and rig.invocation() == before  # never started


async def test_units_an_update_stopped_stay_held_until_an_update_starts_them_again(
        etcd: EtcdMember, systemd_manager: SystemdManager, tmp_path: Path) -> None:
    # A rollout stops the units and is superseded (after its steps ran, say) by one still pulling:
    # between the two, nothing may start the old release (the healer would, were they let go). When
    # the newer rollout fails without a release to switch to, the update starts the units itself.
    async with host_rig(etcd, systemd_manager, tmp_path) as rig:
        rig.release_file.write_bytes(proto.render_release(OLD, IMAGE, 1999))
        await rig.systemd.start(WEB)
        await rig.begin(header(2000, Phase.STOP))
        await wait_put(rig.etcd, proto.report_key(P, 2000, "stopped", rig.me))
        assert rig.active_state() == "inactive" and rig.holds.owners(WEB) == {HOLD_OWNER}

        tries = len(rig.events("executor.retry"))
        await rig.begin(header(2001, Phase.PULL, tag="v3", digest="sha256:" + "3" * 64))
        # Its pull fails (this host has no Docker engine) and is tried again: the executor has taken
        # the newer rollout up.
        await rig.until("the newer rollout's pull tried", lambda: len(rig.events("executor.retry")) > tries)
        assert rig.holds.owners(WEB) == {HOLD_OWNER}  # still the update's to start
        assert rig.active_state() == "inactive"

        ended = header(2001, Phase.FAILED, tag="v3", digest="sha256:" + "3" * 64, outcome=Phase.FAILED,
                       reason="its image could not be pulled")
        await rig.etcd.put(proto.header_key(P), ended.encode())
        await rig.until("the units started again", lambda: rig.active_state() == "active")
        await rig.until("the update's holds ended", lambda: not rig.holds.owners(WEB))


async def test_a_start_on_units_this_agent_did_not_stop_restarts_them_on_the_new_release(
        etcd: EtcdMember, systemd_manager: SystemdManager, tmp_path: Path) -> None:
    # The rollout reached its start with this host a participant that never stopped its units here
    # (its agent restarted after the stop, or a header it read late): they run the old release, and
    # a start alone would leave them on it, the release file saying otherwise.
    async with host_rig(etcd, systemd_manager, tmp_path) as rig:
        rig.release_file.write_bytes(proto.render_release(OLD, IMAGE, 2999))
        await rig.systemd.start(WEB)
        before = rig.invocation()
        await rig.begin(header(3000, Phase.START))
        report = await rig.started(3000)
        assert report["ok"] is True and report["digest"] == D2
        assert rig.invocation() != before, "the units were started again, not left running"
        assert rig.active_state() == "active"
        assert proto.parse_release(rig.release_file.read_bytes()) == NEW
        assert "executor.stopping_before_start" in rig.events()


async def test_a_unit_the_operator_starts_while_an_update_holds_it_starts_once_the_update_lets_go(
        etcd: EtcdMember, systemd_manager: SystemdManager, tmp_path: Path) -> None:
    """Held by the operator and stopped by an update: the operator's start comes while the update holds
    the unit, which the update then starts with the others, leaving it stopped as the operator's. The
    start waits for the update to let go, and then starts it: never left stopped by both."""
    holds = Holds(operator_holds=True)
    async with host_rig(etcd, systemd_manager, tmp_path, holds=holds) as rig:
        host = HostContext(rig.etcd, P, rig.me, rig.metrics, holds, units=PATTERNS)
        control = Control(host, rig.systemd, Healer(host, rig.systemd, HealPolicy()))
        stopping = asyncio.Event()
        task = asyncio.create_task(control.run(stopping), name="control-under-test")
        try:
            rig.release_file.write_bytes(proto.render_release(OLD, IMAGE, 3999))
            await rig.systemd.start(WEB)
            hold, start = f"{P}/control/{rig.me}/hold/{WEB}", f"{P}/control/{rig.me}/start/{WEB}"
            await rig.etcd.put(hold, b"{}")  # `norm units stop`
            await rig.until("held and stopped", lambda: rig.active_state() == "inactive")
            await rig.begin(header(4000, Phase.STOP))
            await wait_put(rig.etcd, proto.report_key(P, 4000, "stopped", rig.me))
            # `norm units start`: the hold deleted and the start asked, in one transaction.
            await rig.etcd.txn([], [Delete(hold), Put(start, b"{}")])
            await rig.until("the start waiting for the update",
                            lambda: "control.start_deferred" in rig.events())
            assert rig.active_state() == "inactive"
            await rig.etcd.put(proto.header_key(P), header(4000, Phase.START).encode())
            await rig.started(4000)
            await rig.until("started once the update let go", lambda: rig.active_state() == "active")
            await rig.until("the start request done", lambda: not holds.owners(WEB))
            assert await rig.etcd.get(start) is None
        finally:
            stopping.set()
            async with asyncio.timeout(15):
                await task
