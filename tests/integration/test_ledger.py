"""The exactly-once ledger against a real etcd: the ledger's own keys are what the leader knows of
every step ever run, however many rollouts ago and whatever became of the rollout header; and the
migrator claims its step only against the header that asks it to."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import pytest
from structlog.testing import capture_logs

from norm.adapters.docker import RunResult
from norm.adapters.etcd import Compare, Etcd, NotLeader, Op, Resync, TxnResult
from norm.core import protocol as proto
from norm.core.config import EtcdConfig, UpdateConfig
from norm.core.host import HostRecord, hosts_key
from norm.core.record import LedgerEntry, Phase, Release, Rollout
from norm.services.context import HostContext
from norm.services.executor import Executor
from norm.services.metrics import Metrics
from norm.services.updater import Updater
from norm.services.watcher import DesiredStateWatcher
from sandbox.etcd import EtcdMember

P = "/norm"
ME = "a" * 32
DEADLINE = 20.0


def digest(n: int) -> str:
    return f"sha256:{n:064x}"


class Leading:
    """The leadership as the updater sees it, for an agent that leads throughout: every leader write
    is a real transaction on etcd (the fence on the leader key is the election's, tested with it)."""

    def __init__(self, client: Etcd) -> None:
        self.client = client
        self.elected = asyncio.Event()
        self.elected.set()
        self.deposed = asyncio.Event()

    async def fenced(self, success: Sequence[Op], compare: Sequence[Compare] = (),
                     failure: Sequence[Op] = ()) -> TxnResult:
        result = await self.client.txn(compare, success, failure)
        if not result.succeeded and not compare:
            raise NotLeader("refused")
        return result


async def wait_header(client: Etcd, ok: Any) -> proto.Header:
    """The rollout header once `ok(header)` holds (watched, with a generous deadline)."""
    async with asyncio.timeout(DEADLINE):
        while True:
            kv = await client.get(proto.header_key(P))
            if kv is not None:
                try:
                    h = proto.Header.decode(kv.value, kv.key)
                except Exception:
                    h = None
                if h is not None and ok(h):
                    return h
            await asyncio.sleep(0.05)  # polling etcd for the test's check only, not for the code


@pytest.mark.parametrize("header", ["deleted", "corrupt", "deleted-and-newest-record-corrupt"])
async def test_a_setback_halts_with_the_header_gone_and_hundreds_of_rollouts_since(
        etcd: EtcdMember, header: str) -> None:
    config = EtcdConfig(endpoints=(etcd.endpoint,), request_timeout=5.0, lease_ttl=5)
    metrics, stopping = Metrics(), asyncio.Event()
    # t0 ran its steps first; 250 versions ran theirs after it (500 ledger keys). The last rollout's
    # record is kept in the history; the header is deleted, or unreadable.
    versions = [(f"t{i}", digest(i + 1)) for i in range(251)]
    last_tag, last_digest = versions[-1]

    async def resolve(ref: str) -> str:
        tag = ref.rpartition(":")[2]
        return f"127.0.0.1:5000/djed/app@{dict(versions)[tag]}"

    async with Etcd(config) as client:
        for i, (tag, d) in enumerate(versions):
            for step in ("migrate", "collectstatic"):
                entry = LedgerEntry(d, tag, step, True, i + 1, float(i))
                await client.put(proto.ledger_key(P, i + 1, step),
                                 json.dumps(dataclasses.asdict(entry), sort_keys=True).encode())
        last = Rollout(revision=251, tag=last_tag, hosts=(ME,), phase=Phase.DONE, started_at=250.0,
                       updated_at=251.0, previous=Release(*versions[-2]), digest=last_digest,
                       outcome=Phase.DONE, ended_at=251.0)
        await client.put(proto.history_key(P, 251), last.encode())
        if header == "corrupt":
            await client.put(proto.header_key(P), b"{not a header")
        if header == "deleted-and-newest-record-corrupt":  # a rollout after 251 whose record is lost
            await client.put(proto.record_key(P, 300), b"{not a record")
        host = HostRecord(ME, "host1", "test", "django", "0")
        await client.put(f"{hosts_key(P)}{ME}", host.encode())

        watcher = DesiredStateWatcher(client, "/djed-version", "/djed-environment", metrics, 300.0)
        updater = Updater(HostContext(client, P, ME, metrics), UpdateConfig(image="127.0.0.1:5000/djed/app"),
                          "test", Leading(client), watcher, resolve)  # type: ignore[arg-type]
        with capture_logs() as logs:
            watching = asyncio.create_task(watcher.run(stopping), name="watcher-under-test")
            updating = asyncio.create_task(updater.run(stopping), name="updater-under-test")
            try:
                revision = await client.put("/djed-version", b"t0")
                h = await wait_header(client, lambda h: h.revision == revision
                                      and h.phase is not Phase.RESOLVE)
            finally:
                stopping.set()
                async with asyncio.timeout(DEADLINE):
                    await asyncio.gather(watching, updating, return_exceptions=True)
    assert h.phase is Phase.HALTED and "no down-migrations" in (h.reason or ""), h
    restored = [(e["rollout"], e["phase"]) for e in logs if e["event"] == "updater.header_restored"]
    if header == "deleted-and-newest-record-corrupt":
        # The newest rollout's record is unreadable: an older one is not taken for the last (its
        # release could be started over the newer one's steps). The ledger's keys still decide.
        assert h.previous is None and restored == []
        return
    # It knew the last release too: from the last record, found in the history; and it wrote the
    # header again from that record before the new rollout began.
    assert h.previous == Release(last_tag, last_digest)
    assert restored == [(251, "done")]


class RecordingDocker:
    """The migrator's engine as the executor's claim test needs it: it records what it is asked."""

    def __init__(self) -> None:
        self.made: list[str] = []
        self.runs: list[str] = []
        self.removed: list[str] = []

    async def create_named(self, name: str, *args: Any, **kwargs: Any) -> bool:
        self.made.append(name)
        return True

    async def run_named(self, name: str, *args: Any, **kwargs: Any) -> RunResult:
        self.runs.append(name)
        return RunResult(0, "", 0.1)

    async def remove_container(self, name: str) -> bool:
        self.removed.append(name)
        return True


async def test_a_migrator_acting_on_a_stale_header_claims_nothing_and_runs_nothing(etcd: EtcdMember) -> None:
    config = EtcdConfig(endpoints=(etcd.endpoint,), request_timeout=5.0, lease_ttl=5)
    d = digest(2)
    asked = proto.Header(revision=7, tag="v2", phase=Phase.MIGRATE, digest=d,
                         previous=Release("v1", digest(1)), migrating="migrate", migrator=ME, hosts_count=1)
    async with Etcd(config) as client:
        await client.put(proto.header_key(P), asked.encode())
        docker = RecordingDocker()
        update = UpdateConfig(image="127.0.0.1:5000/djed/app", steps=("migrate",))

        async def set_release(text: str | None) -> None:
            pass

        executor = Executor(HostContext(client, P, ME, Metrics()), None, docker, update,  # type: ignore[arg-type]
                            set_release, leading=lambda: False)
        executor._take_header(await client.get(proto.header_key(P)))  # what this host acts on
        # Meanwhile the rollout moved on (here: halted by its leader); this host has not seen it yet.
        await client.put(proto.header_key(P), dataclasses.replace(asked, phase=Phase.HALTED, migrating=None,
                                                                outcome=Phase.HALTED).encode())
        with capture_logs() as logs:
            await executor._migrate(asked, "migrate", d)
        assert await client.get(proto.claim_key(P, 7, "migrate")) is None
        assert docker.runs == [] and docker.made == docker.removed  # made, never started, removed
        assert [e["event"] for e in logs] == ["executor.claim_dropped"]

        # Against the header that asks it, the claim is made once and the step run.
        await client.put(proto.header_key(P), asked.encode())
        executor._take_header(await client.get(proto.header_key(P)))
        await executor._migrate(asked, "migrate", d)
        claim = await client.get(proto.claim_key(P, 7, "migrate"))
        assert claim is not None and claim.value == proto.claim(ME)
        assert docker.runs == [proto.migration_container(7, "migrate")]


async def deleted(client: Etcd, key: str) -> None:
    """Once `key` is gone (watched)."""
    async with client.watch(key) as w:
        async for item in w:
            if (not item.snapshot.kvs) if isinstance(item, Resync) else item.kind == "delete":
                return


def _executor(client: Etcd, docker: RecordingDocker) -> Executor:
    update = UpdateConfig(image="127.0.0.1:5000/djed/app", steps=("migrate",))

    async def set_release(text: str | None) -> None:
        pass

    return Executor(HostContext(client, P, ME, Metrics()), None, docker, update,  # type: ignore[arg-type]
                    set_release, leading=lambda: False)


async def test_a_step_its_agent_of_the_previous_version_ran_or_claimed_is_not_run_again(
        etcd: EtcdMember) -> None:
    """An agent upgraded while the rollout runs: what it reported and claimed before, in the previous
    layout (every report under the rollout's prefix), still holds."""
    config = EtcdConfig(endpoints=(etcd.endpoint,), request_timeout=5.0, lease_ttl=5)
    other = "b" * 32
    d = digest(2)
    asked = proto.Header(revision=7, tag="v2", phase=Phase.MIGRATE, digest=d,
                         previous=Release("v1", digest(1)), migrating="migrate", migrator=ME, hosts_count=1)
    async with Etcd(config) as client:
        await client.put(proto.header_key(P), asked.encode())
        await client.put(proto.hosts_list_key(P, 7), json.dumps([ME]).encode())
        await client.put(proto.legacy_report_key(P, 7, "stopped", ME), proto.stopped())
        await client.put(proto.legacy_report_key(P, 7, "migrated", "migrate"),
                         proto.migrated(True, 0, None, 1.0, ME))
        docker = RecordingDocker()
        executor = _executor(client, docker)
        executor._take_header(await client.get(proto.header_key(P)))
        await executor._load_rollout()
        assert executor._duties() == ()  # stopped, and the step reported: nothing left to do

        # A claim of the previous layout holds the step as the claim in its own range does.
        await client.put(proto.legacy_report_key(P, 7, "claim", "migrate"), proto.claim(other))
        with capture_logs() as logs:
            await executor._migrate(asked, "migrate", d)
        assert docker.made == [] and docker.runs == []
        assert await client.get(proto.claim_key(P, 7, "migrate")) is None
        assert [e["event"] for e in logs] == ["executor.step_claimed_elsewhere"]


async def test_a_host_reports_in_its_own_range_and_deletes_its_older_reports(etcd: EtcdMember) -> None:
    config = EtcdConfig(endpoints=(etcd.endpoint,), request_timeout=5.0, lease_ttl=5)
    other = "b" * 32
    h = proto.Header(revision=70, tag="v2", phase=Phase.STOP, digest=digest(2),
                     previous=Release("v1", digest(1)), hosts_count=2)
    async with Etcd(config) as client:
        await client.put(proto.header_key(P), h.encode())
        older = [proto.report_key(P, 7, "started", ME), proto.migrated_key(P, 9, ME, "migrate"),
                 proto.report_key(P, 69, "pulled", ME)]
        kept = [proto.report_key(P, 70, "pulled", ME), proto.report_key(P, 7, "started", other),
                proto.report_key(P, 69, "pulled", other)]
        for key in older + kept:
            await client.put(key, b"{}")
        executor = _executor(client, RecordingDocker())
        executor._take_header(await client.get(proto.header_key(P)))
        assert await executor._report(h, "stopped", proto.stopped())
        left = {kv.key for kv in (await client.get_prefix(proto.reports_prefix(P))).kvs}
        assert left == {*kept, proto.report_key(P, 70, "stopped", ME)}


async def test_a_leader_follows_the_reports_of_both_layouts_in_a_fleet_being_upgraded(
        etcd: EtcdMember) -> None:
    """While a fleet is being upgraded, hosts of the previous version report under the rollout's
    prefix and upgraded ones in their own ranges: the leader takes both, for the same rollout; it takes
    an abort request of either layout; and when a rollout ends it deletes older rollouts' claims and
    aborts, never a host's reports."""
    config = EtcdConfig(endpoints=(etcd.endpoint,), request_timeout=5.0, lease_ttl=5)
    metrics, stopping = Metrics(), asyncio.Event()
    other = "b" * 32
    d = digest(2)

    async def resolve(ref: str) -> str:
        tag = ref.rpartition(":")[2]
        return f"127.0.0.1:5000/djed/app@{d if tag == 'v2' else digest(int(tag[1:]))}"

    async with Etcd(config) as client:
        for mid, name in ((ME, "host1"), (other, "host2")):
            await client.put(f"{hosts_key(P)}{mid}", HostRecord(mid, name, "test", "django", "0").encode())
        stale = [proto.claim_key(P, 1, "migrate"), proto.abort_key(P, 1)]
        for key in stale:
            await client.put(key, b"{}")
        watcher = DesiredStateWatcher(client, "/djed-version", "/djed-environment", metrics, 300.0)
        updater = Updater(HostContext(client, P, ME, metrics),
                          UpdateConfig(image="127.0.0.1:5000/djed/app", steps=("migrate",)),
                          "test", Leading(client), watcher, resolve)  # type: ignore[arg-type]
        watching = asyncio.create_task(watcher.run(stopping), name="watcher-under-test")
        updating = asyncio.create_task(updater.run(stopping), name="updater-under-test")
        try:
            rev = await client.put("/djed-version", b"v2")
            await wait_header(client, lambda h: h.revision == rev and h.phase is Phase.PULL)
            await client.put(proto.report_key(P, rev, "pulled", ME), proto.pulled_ok(d))
            await client.put(proto.legacy_report_key(P, rev, "pulled", other), proto.pulled_ok(d))
            await wait_header(client, lambda h: h.phase is Phase.STOP)
            await client.put(proto.legacy_report_key(P, rev, "stopped", other), proto.stopped())
            await client.put(proto.report_key(P, rev, "stopped", ME), proto.stopped())
            h = await wait_header(client, lambda h: h.phase is Phase.MIGRATE)
            assert (h.migrating, h.migrator) == ("migrate", ME)
            await client.put(proto.migrated_key(P, rev, ME, "migrate"),
                             proto.migrated(True, 0, None, 1.0, ME))
            await wait_header(client, lambda h: h.phase is Phase.START)
            await client.put(proto.report_key(P, rev, "started", ME), proto.started(d, True))
            await client.put(proto.legacy_report_key(P, rev, "started", other), proto.started(d, True))
            h = await wait_header(client, lambda h: h.terminal)
            assert h.phase is Phase.DONE, h
            async with asyncio.timeout(DEADLINE):  # the trim follows the outcome's write
                for key in stale:
                    await deleted(client, key)
            assert len((await client.get_prefix(proto.reports_prefix(P))).kvs) == 4

            # An abort in the previous layout, then one in the aborts' range: each fails its rollout.
            for abort in (proto.legacy_abort_key, proto.abort_key):
                rev = await client.put("/djed-version", f"v{rev}".encode())
                await wait_header(client, lambda h: h.revision == rev and h.phase is Phase.PULL)  # noqa: B023
                await client.put(abort(P, rev), proto.abort_request("alice"))
                h = await wait_header(client, lambda h: h.revision == rev and h.terminal)  # noqa: B023
                assert h.phase is Phase.FAILED and "alice" in (h.reason or ""), h
        finally:
            stopping.set()
            async with asyncio.timeout(DEADLINE):
                await asyncio.gather(watching, updating, return_exceptions=True)
