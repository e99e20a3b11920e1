"""The updater: while this agent leads, it drives the fleet's rollouts (norm.core.rollout) from etcd.

Nothing lives only here. On winning leadership it reads the rollout record, replays the hosts' reports
(in the order etcd took them) and resumes; every change of the record that is not mere per-host
progress is written before anything acts on it, in a transaction fenced on leadership. Hosts follow
the small header; their reports come back in each host's own range (`<prefix>/reports/<mid>/`), which
only the leader watches, all hosts' at once.

The ledger of every step ever run is its keys (`<prefix>/ledger/`, never trimmed): read whenever a
rollout begins, so that a version set back is known for one whose steps ran, however long ago. A
header that is missing or unreadable does not make the leader forget: it finds the last rollout's
record under the rollouts' or the history's keys, resumes from it and writes the header again.

Inputs, all funnelled into one queue and applied one at a time: the desired version (from the
watcher), the reports, hosts leaving (their key deleted with their lease), the barrier timer, and the
result of resolving the tag.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

import structlog

from norm.adapters.docker import DockerError, DockerRejected
from norm.adapters.etcd import Delete, EtcdError, KeyValue, NotLeader, Op, Put, Resync, Watch
from norm.core import protocol as proto
from norm.core.backoff import Backoff
from norm.core.config import UpdateConfig
from norm.core.desired import Desired
from norm.core.errors import InvalidValue, Temporary
from norm.core.host import HostRecord, hosts_key
from norm.core.notify import ROLLOUTS_SOURCE, notices_between
from norm.core.policy import FleetPolicy, policy_from_update_config
from norm.core.record import (
    TERMINAL,
    Asked,
    Deadline,
    HostStatus,
    LedgerEntry,
    Phase,
    Release,
    Rollout,
    decode_ledger_entry,
)
from norm.core.rollout import (
    AnalysisEnded,
    ArmDeadline,
    BarrierDeadline,
    BeginRollout,
    Blocked,
    HostLost,
    HostsExcluded,
    IllegalTransition,
    NewerVersion,
    RecordOutcome,
    Resolved,
    ResolveFailed,
    ResolveTag,
    Resumed,
    RolloutPolicy,
    RunAnalysis,
    RunMigration,
    Unblocked,
    barrier_state,
    ledger_order,
    ledger_summary,
    migrator_for,
    participants,
    policy_of,
    refused_rollout,
    start_rollout,
    step,
)
from norm.core.rollout import Event as RolloutEvent
from norm.core.windows import closed_reason
from norm.services.base import OwnedTasks, Retry, first_of, pause
from norm.services.context import HostContext
from norm.services.leadership import LeaderElection
from norm.services.notifier import outbox_puts
from norm.services.watcher import DesiredStateWatcher

log = structlog.get_logger("norm.updater")

Verdict = tuple[Literal["passed", "failed", "inconclusive"], str | None]
# Analyses a canary (its hosts' names, under the rollout's policy) to its verdict and why
# (norm.services.analysis.canary_analyser).
Analyse = Callable[[FleetPolicy, tuple[str, ...]], Awaitable[Verdict]]


class PolicySource(Protocol):
    """The fleet's policy (norm.services.policy.PolicyWatcher): the one in effect, and the one in
    etcd now."""

    def current(self) -> FleetPolicy: ...

    async def latest(self) -> FleetPolicy: ...


@dataclass(frozen=True)
class _Configured:
    """A fleet without a policy key: the [update] section's."""

    policy: FleetPolicy

    def current(self) -> FleetPolicy:
        return self.policy

    async def latest(self) -> FleetPolicy:
        return self.policy


async def watch_only(policy: FleetPolicy, hosts: tuple[str, ...]) -> Verdict:
    """A canary's analysis without queries: it passes once watched for the policy's canary_wait (its
    hosts passed their health gates as they moved)."""
    await pause(policy.canary_wait)
    return "passed", None

def _persisted(r: Rollout) -> Rollout:
    """What of a record must reach etcd before acting: all but per-host progress, which the hosts'
    reports already hold."""
    return dataclasses.replace(r, progress=(), updated_at=0.0)


class Updater:
    name = "updater"

    def __init__(self, host: HostContext, update: UpdateConfig, environment: str,
                 leadership: LeaderElection, watcher: DesiredStateWatcher,
                 resolve: Callable[[str], Awaitable[str]],
                 policy: PolicySource | None = None, analyse: Analyse = watch_only) -> None:
        """`update`: the [update] section (image, history); `environment`: this host's, whose hosts
        take part in rollouts; `resolve`: a tag's image reference to it pinned by digest; `policy`:
        the fleet's policy now (norm.services.policy), which a rollout keeps from its beginning;
        without one, the [update] section's."""
        assert update.image is not None
        self._etcd = host.etcd
        self._prefix = host.prefix
        self._me = host.machine_id
        self._environment = environment
        self._image: str = update.image
        self._policies = policy if policy is not None else _Configured(policy_from_update_config(update))
        self._fleet_policy = self._policies.current
        self._leadership = leadership
        self._watcher = watcher
        self._metrics = host.metrics
        self._resolve = resolve
        self._analyse = analyse
        self._prometheus_url = update.prometheus_url  # the blocking alerts' source
        self._history = update.history
        self._clock = host.clock
        self.record: Rollout | None = None
        self._queue: asyncio.Queue[RolloutEvent | Desired | _ReportOf | _ResolvedOf | BaseException] = \
            asyncio.Queue()
        # The leading loop's helpers (timer, resolver, reports): an error one ends with is raised in
        # that loop, in its turn among the events.
        self._helpers = OwnedTasks(on_error=self._helper_failed)
        self._phase_since: float = 0.0

    # -- the service ---------------------------------------------------------------------------------
    async def run(self, stopping: asyncio.Event) -> None:
        retry = Retry(Backoff(first=0.2, cap=5.0))
        while not stopping.is_set():
            elected = self._leadership.elected.wait()
            if await first_of(stopping=stopping.wait(), elected=elected) == "stopping":
                return
            try:
                await first_of(stopping=stopping.wait(), deposed=self._leadership.deposed.wait(),
                               lead=self._lead())
                retry.reset()
            except NotLeader as e:
                log.warning("updater.not_leader", error=str(e))
                await self._leadership.deposed.wait()
            except EtcdError as e:
                delay = retry.next_delay()
                log.warning("updater.etcd_failed", error=str(e), retry_in=round(delay, 2))
                await pause(delay, stopping)
            finally:
                await self._cancel_helpers()

    def _helper_failed(self, error: BaseException) -> None:
        self._queue.put_nowait(error)  # the queue of now: a new term of leading starts a new one

    async def _cancel_helpers(self) -> None:
        await self._helpers.cancel_all()
        self._queue = asyncio.Queue()

    async def _lead(self) -> None:
        log.info("updater.leading")
        await self._load()
        if self.record is not None and not self.record.terminal:
            self._follow_reports(self.record.revision)  # replays what hosts reported, in order
            await self._apply(Resumed())
        # Not a TaskGroup: it would wrap a NotLeader or EtcdError in an ExceptionGroup that `run` does
        # not handle; the first error of any of the three is raised as it is.
        await first_of(**{"updater-desired": self._follow_desired(), "updater-hosts": self._follow_hosts(),
                          "updater-queue": self._consume(), "updater-windows": self._keep_windows()})

    async def _consume(self) -> None:
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item  # a helper failed: leading starts over (or the agent stops)
            if isinstance(item, Desired):
                await self._on_desired(item)
            else:
                await self._apply(item)
            await asyncio.sleep(0)  # a backlog of a thousand reports must not starve the lease

    async def _load(self) -> None:
        kv = await self._etcd.get(proto.header_key(self._prefix))
        self.record = None
        header: proto.Header | None = None
        try:
            if kv is None:
                raise InvalidValue(proto.header_key(self._prefix), "missing")
            header = proto.Header.decode(kv.value, kv.key)
            raw = await self._etcd.get(proto.record_key(self._prefix, header.revision))
            if raw is None:
                raise InvalidValue(proto.record_key(self._prefix, header.revision), "missing")
            self.record = Rollout.decode(raw.value, raw.key)
        except InvalidValue as e:
            if kv is not None:
                self._metrics.rejected_values.labels(e.where).inc()
                log.error("updater.record_unreadable", key=e.where, reason=e.reason)
            self.record = await self._recover(header, refused=e.where)
            if self.record is None:
                return
            if header is None:
                # The hosts follow the header: theirs is written again, from the record found (one
                # that reads well stays: the hosts act on it already).
                await self._leadership.fenced([Put(proto.header_key(self._prefix),
                                                   proto.Header.of(self.record).encode())])
                log.warning("updater.header_restored", rollout=self.record.revision,
                            phase=self.record.phase.value)
        self._phase_since = asyncio.get_running_loop().time()
        self._show(self.record)

    async def _recover(self, header: proto.Header | None, refused: str) -> Rollout | None:
        """The last rollout's record when the header does not lead to it: the one the header names,
        or with no readable header the newest, from the rollout's own keys or the history. Never an
        older one (None then): hosts sent back to an earlier rollout's release could start it over a
        migration of the newer one. `refused`: the key just refused (counted once, not read again)."""
        p = self._prefix
        found: list[tuple[int, int, KeyValue]] = []
        for kv in (await self._etcd.get_prefix(f"{p}/rollouts/")).kvs:
            name, _, leaf = kv.key.removeprefix(f"{p}/rollouts/").partition("/")
            if leaf == "record" and name.isdigit():
                found.append((int(name), 1, kv))
        for kv in (await self._etcd.get_prefix(f"{p}/history/")).kvs:
            name = kv.key.removeprefix(f"{p}/history/")
            if name.isdigit():
                found.append((int(name), 0, kv))
        if not found:
            return None
        want = header.revision if header is not None else max(rev for rev, _, _ in found)
        for rev, _, kv in sorted(found, key=lambda f: (f[0], f[1]), reverse=True):
            if rev != want or kv.key == refused:
                continue
            try:
                record = Rollout.decode(kv.value, kv.key)
            except InvalidValue as e:
                self._metrics.rejected_values.labels(e.where).inc()
                log.error("updater.record_unreadable", key=e.where, reason=e.reason)
                continue
            log.warning("updater.record_recovered", rollout=rev, key=kv.key)
            return record
        return None

    # -- inputs --------------------------------------------------------------------------------------
    async def _follow_desired(self) -> None:
        seen = 0
        while True:
            desired = await self._watcher.wait_change(lambda d: d.version_revision > seen)  # noqa: B023
            seen = desired.version_revision
            self._queue.put_nowait(desired)

    async def _follow_hosts(self) -> None:
        prefix = hosts_key(self._prefix)
        async with self._etcd.watch(prefix, prefix=True) as w:
            async for item in w:
                if isinstance(item, Resync):
                    alive = {kv.key.removeprefix(prefix) for kv in item.snapshot.kvs}
                    record = self.record
                    if record is not None and not record.terminal:
                        for host in record.hosts:
                            if host not in alive:
                                self._queue.put_nowait(HostLost(host))
                elif item.kind == "delete":
                    self._queue.put_nowait(HostLost(item.kv.key.removeprefix(prefix)))

    def _follow_reports(self, revision: int) -> None:
        self._helpers.start("reports", self._watch_reports(revision), f"updater-reports-{revision}")

    async def _watch_reports(self, revision: int) -> None:
        """Follow rollout `revision`'s reports: one watch on every host's reports (those of other
        rollouts are passed over by their key), one on the operators' abort request, and one on the
        rollout's own prefix, where agents of the previous version write theirs (the previous layout,
        read while a fleet is being upgraded). What each lists first is replayed together, in the order
        etcd took it; then each change as it comes."""
        p = self._prefix
        async with self._etcd.watch(proto.reports_prefix(p), prefix=True) as reports, \
                self._etcd.watch(proto.abort_key(p, revision)) as aborts, \
                self._etcd.watch(proto.rollout_requests_prefix(p, revision), prefix=True) as requests, \
                self._etcd.watch(proto.rollout_prefix(p, revision), prefix=True) as legacy:
            listed: list[KeyValue] = []
            for w in (reports, aborts, requests, legacy):
                first = await anext(w)
                assert isinstance(first, Resync)  # a watch lists before it follows
                listed += first.snapshot.kvs
            self._take_reports(revision, sorted(listed, key=lambda kv: kv.mod_revision))
            await first_of(**{f"updater-reports-{name}-{revision}": self._pump_reports(revision, w)
                              for name, w in (("hosts", reports), ("abort", aborts), ("requests", requests),
                                              ("legacy", legacy))})

    async def _pump_reports(self, revision: int, w: Watch) -> None:
        async for item in w:
            kvs = sorted(item.snapshot.kvs, key=lambda kv: kv.mod_revision) if isinstance(item, Resync) \
                else [item.kv] if item.kind == "put" else []
            self._take_reports(revision, kvs)

    def _take_reports(self, revision: int, kvs: Iterable[KeyValue]) -> None:
        for kv in kvs:
            try:
                report = proto.parse_report(self._prefix, revision, kv.key, kv.value, kv.mod_revision)
            except InvalidValue as e:
                self._metrics.rejected_values.labels("rollout report").inc()
                log.warning("updater.report_refused", key=e.where, reason=e.reason)
                continue
            if report is not None:
                self._queue.put_nowait(_ReportOf(revision, report))

    # -- applying -------------------------------------------------------------------------------------
    async def _on_desired(self, desired: Desired) -> None:
        record = self.record
        if record is not None and desired.version_revision <= record.revision:
            log.info("updater.desired_known", revision=desired.version_revision, rollout=record.revision)
            return
        if desired.version_refused is not None:
            if record is None or record.terminal:
                now = self._clock()
                new, commands = refused_rollout(desired.version_revision, desired.version_refused, now,
                                                self._previous(record), await self._ledger(record))
                await self._adopt(record, new)
                await self._carry_out(new, commands)
            return
        if desired.version is None:
            return  # the key was deleted: nothing to roll out
        if record is None or record.terminal:
            await self._begin(desired.version, desired.version_revision)
        else:
            await self._apply(NewerVersion(desired.version, desired.version_revision))

    async def _begin(self, tag: str, revision: int) -> None:
        snapshot = await self._etcd.get_prefix(hosts_key(self._prefix))
        hosts: list[HostRecord] = []
        for kv in snapshot.kvs:
            try:
                hosts.append(HostRecord.decode(kv.value, kv.key))
            except InvalidValue as e:
                self._metrics.rejected_values.labels("host record").inc()
                log.warning("updater.host_refused", key=e.where, reason=e.reason)
        policy = await self._policies.latest()  # written just before the version, it counts
        chosen = participants(hosts, self._environment, frozenset(policy.roles) or None)
        record = self.record
        asked = await self._asked(revision)
        new, commands = start_rollout(revision, tag, chosen, self._clock(), self._previous(record),
                                      await self._ledger(record), policy, asked)
        log.info("rollout.begin", rollout=revision, tag=tag, hosts=len(chosen), by=new.by, undo=new.undo)
        await self._adopt(record, new)
        if not new.terminal:
            self._follow_reports(revision)
        await self._carry_out(new, commands)

    async def _asked(self, revision: int) -> Asked | None:
        """Who asked for the version written at `revision` (and, for an undo, what it goes back to):
        the deploy key written with it, if any."""
        kv = await self._etcd.get(proto.deploy_key(self._prefix))
        if kv is None or kv.mod_revision != revision:
            return None
        try:
            return proto.asked(kv.value, kv.key)
        except InvalidValue as e:
            self._metrics.rejected_values.labels(e.where).inc()
            log.warning("updater.deploy_request_refused", key=e.where, reason=e.reason)
            return None

    def _policy(self, record: Rollout) -> RolloutPolicy:
        """The policy the rollout began with; the fleet's now for a record written before rollouts
        kept theirs."""
        return policy_of(record.policy if record.policy is not None else self._fleet_policy())

    def _previous(self, record: Rollout | None) -> Release | None:
        if record is None:
            return None
        header = proto.Header.of(record)
        if not record.terminal:
            return record.previous
        return header.fleet_release() or record.previous

    async def _ledger(self, record: Rollout | None) -> tuple[LedgerEntry, ...]:
        """Every step ever run, from the ledger's keys (and the last record's own entries, should a
        key be missing), as a new record carries it (`ledger_summary`)."""
        entries: list[LedgerEntry] = []
        for kv in (await self._etcd.get_prefix(f"{self._prefix}/ledger/")).kvs:
            try:
                entries.append(decode_ledger_entry(kv.value, kv.key))
            except InvalidValue as e:
                self._metrics.rejected_values.labels("ledger entry").inc()
                log.error("updater.ledger_entry_refused", key=e.where, reason=e.reason)
        if record is not None:
            entries.extend(record.ledger)
        return ledger_summary(ledger_order(entries))

    async def _apply(self, event: RolloutEvent | _ReportOf | _ResolvedOf) -> None:
        if isinstance(event, _ResolvedOf):
            record = self.record
            if record is None or record.revision != event.revision:
                log.info("rollout.resolve_dropped", rollout=event.revision, reason="a newer rollout")
                return  # the answer for a rollout superseded while it was resolving
            event = event.event
        if isinstance(event, _ReportOf):
            record = self.record
            if record is None or record.revision != event.revision:
                return  # a report of an earlier rollout, still in the queue
            found = proto.report_event(record, event.report)
            if found is None:
                return
            event = found
        record = self.record
        if record is None:
            return
        try:
            new, commands = step(record, event, self._clock(), self._policy(record))
        except IllegalTransition as e:
            self._metrics.rejected_values.labels("rollout event").inc()
            log.warning("rollout.event_refused", rollout=record.revision, error=str(e))
            return
        if any(isinstance(c, RunMigration) for c in commands):
            new = dataclasses.replace(new, migrator=migrator_for(new, self._me))
        await self._adopt(record, new)
        await self._carry_out(new, commands)
        if new.waiting != "canary" and self._helpers.running("analysis"):
            await self._helpers.stop("analysis")  # promoted, or the rollout moved on: no verdict needed

    async def _adopt(self, old: Rollout | None, new: Rollout) -> None:
        """Write `new` (fenced) if it differs from `old` in more than progress, then make it current."""
        if old is None or old.revision != new.revision or _persisted(old) != _persisted(new):
            await self._persist(old, new)
        if new.terminal and (old is None or not old.terminal or old.revision != new.revision):
            self._metrics.rollouts.labels(new.phase.value).inc()
        if new.rollback and new.strategy == "rolling" and (old is None or not old.rollback
                                                           or old.revision != new.revision):
            self._metrics.rollout_rollbacks.inc()
            log.warning("rollout.rolling_back", rollout=new.revision, tag=new.tag, reason=new.reason)
        if old is None or old.phase is not new.phase or old.revision != new.revision:
            now = asyncio.get_running_loop().time()  # a phase's duration, on the monotonic clock
            if old is not None and old.phase not in TERMINAL:
                self._metrics.rollout_phase_seconds.labels(old.phase.value).observe(now - self._phase_since)
            self._phase_since = now
            log.info("rollout.phase", rollout=new.revision, tag=new.tag, phase=new.phase.value,
                     reason=new.reason)
        self.record = new
        self._show(new)

    async def _persist(self, old: Rollout | None, new: Rollout) -> None:
        p, rev = self._prefix, new.revision
        ops: list[Op] = [Put(proto.header_key(p), proto.Header.of(new).encode()),
                         Put(proto.record_key(p, rev), new.encode())]
        if new.phase is Phase.PULL and (old is None or old.revision != rev or old.phase is Phase.RESOLVE):
            ops.append(Put(proto.hosts_list_key(p, rev), proto.hosts_list(new.hosts)))
        known = set() if old is None else set(old.ledger)
        for entry in new.ledger:
            if entry not in known and entry.revision == rev:
                ops.append(Put(proto.ledger_key(p, rev, entry.step), entry.encode()))
        # The events the change makes, for the webhooks: in the same transaction, so made once.
        ops += outbox_puts(p, ROLLOUTS_SOURCE, notices_between(old, new, self._clock()))
        if new.terminal:
            # Kept small: without the per-host progress (hundreds of kB with a thousand hosts) and the
            # ledger (which has keys of its own); the full record stays with the rollout's keys.
            kept = dataclasses.replace(new, progress=(), ledger=())
            ops.append(Put(proto.history_key(p, rev), kept.encode()))
        await self._leadership.fenced(ops)
        if new.terminal and (old is None or not old.terminal or old.revision != rev):
            await self._trim_history(rev)

    async def _trim_history(self, current: int) -> None:
        """Keep the last `history` finished rollouts; of the rollouts' own keys, claims and aborts,
        those of the current one only. (Each host deletes its own older reports itself.)"""
        p = self._prefix
        try:
            snapshot = await self._etcd.get_prefix(f"{p}/history/", keys_only=True)
            old = sorted(kv.key for kv in snapshot.kvs)[:-self._history]
            rollouts = await self._etcd.get_prefix(f"{p}/rollouts/", keys_only=True)
            stale = sorted({kv.key.removeprefix(f"{p}/rollouts/").split("/", 1)[0]
                            for kv in rollouts.kvs} - {str(current)})
            ops: list[Op] = [Delete(k) for k in old]
            ops += [Delete(f"{p}/rollouts/{r}/", prefix=True) for r in stale]
            ops += [Delete(start, range_end=end) for start, end in proto.stale_ranges(p, current)]
            for i in range(0, len(ops), 64):
                await self._leadership.fenced(ops[i:i + 64])
        except NotLeader:
            raise  # another agent leads: this one stands down, it does not trim on
        except EtcdError as e:
            log.warning("updater.trim_failed", error=str(e))

    async def _carry_out(self, record: Rollout, commands: tuple[object, ...]) -> None:
        for c in commands:
            match c:
                case ResolveTag(tag=tag):
                    self._start_resolving(record.revision, tag)
                case ArmDeadline(deadline=deadline):
                    self._arm(record.revision, deadline)
                case BeginRollout(tag=tag, revision=revision):
                    await self._begin(tag, revision)
                    return  # the new rollout's commands were carried out by _begin
                case HostsExcluded(hosts=hosts, reason=reason):
                    log.warning("rollout.hosts_excluded", rollout=record.revision, hosts=list(hosts),
                                reason=reason)
                case RunAnalysis(revision=revision, hosts=hosts):
                    self._helpers.start("analysis", self._analysing(record, hosts),
                                        f"updater-analysis-{revision}")
                case RecordOutcome(phase=phase, reason=reason):
                    log.info("rollout.outcome", rollout=record.revision, tag=record.tag, outcome=phase.value,
                             reason=reason)
                case _:
                    pass  # the hosts' duties: they follow the header just written

    async def _keep_windows(self) -> None:
        """While a rollout is under way: whether the maintenance windows and the blocking alerts let it
        advance now, told to the state machine when that changes (Blocked, Unblocked). Looked at every
        second (a window's bounds are seconds)."""
        while True:
            record = self.record
            policy = None if record is None or record.terminal else record.policy
            if record is not None and policy is not None and (policy.windows or policy.block_alerts):
                reason = closed_reason(policy.windows, self._clock()) or await self._alerts(policy)
                if reason != record.blocked:
                    log.info("rollout.blocked" if reason else "rollout.unblocked", rollout=record.revision,
                             reason=reason)
                    self._queue.put_nowait(Blocked(reason) if reason else Unblocked())
            await pause(1.0)

    async def _alerts(self, policy: FleetPolicy) -> str | None:
        """Why the firing alerts the policy names hold the rollout (None: none fires). Not knowing holds
        it too: a rollout goes on blind only when asked (`norm deploy --now`)."""
        if not policy.block_alerts:
            return None
        if self._prometheus_url is None:
            return "blocking alerts are set, and update.prometheus_url is not: they cannot be checked"
        from norm.adapters.prometheus import Prometheus, PrometheusError

        query = f'ALERTS{{alertstate="firing",{policy.block_alerts}}}'
        try:
            async with Prometheus(self._prometheus_url) as source:
                firing = await source.query(query)
        except PrometheusError as e:
            return f"the blocking alerts cannot be checked: {e}"
        names = sorted({s.labels.get("alertname", "?") for s in firing})
        return f"alerts firing: {', '.join(names)}" if names else None

    async def _analysing(self, record: Rollout, hosts: tuple[str, ...]) -> None:
        policy = record.policy if record.policy is not None else self._fleet_policy()
        names = await self._names(hosts)
        log.info("rollout.analysing", rollout=record.revision, canary=list(names))
        verdict, reason = await self._analyse(policy, names)
        log.info("rollout.analysed", rollout=record.revision, verdict=verdict, reason=reason)
        self._queue.put_nowait(AnalysisEnded(record.revision, verdict, reason))

    async def _names(self, hosts: tuple[str, ...]) -> tuple[str, ...]:
        """The hosts' names as they registered them (a host not registered: its machine id)."""
        names: dict[str, str] = {}
        for kv in (await self._etcd.get_prefix(hosts_key(self._prefix))).kvs:
            try:
                host = HostRecord.decode(kv.value, kv.key)
            except InvalidValue:
                continue  # counted when a rollout begins
            names[host.machine_id] = host.name
        return tuple(names.get(h, h) for h in hosts)

    def _arm(self, revision: int, deadline: Deadline) -> None:
        """Time the barrier on the loop's clock (monotonic): the wall clock may be another host's
        minutes apart, or step."""
        log.info("rollout.deadline_armed", rollout=revision, barrier=deadline.barrier,
                 seconds=deadline.seconds)

        async def fire() -> None:
            await pause(deadline.seconds)  # a timer, not a wait on others
            log.info("rollout.deadline", rollout=revision, barrier=deadline.barrier)
            self._queue.put_nowait(BarrierDeadline(revision, deadline.barrier))

        self._helpers.start("timer", fire(), "updater-deadline")

    def _start_resolving(self, revision: int, tag: str) -> None:
        self._helpers.start("resolver", self._resolving(revision, tag), f"updater-resolve-{revision}")

    async def _resolving(self, revision: int, tag: str) -> None:
        ref = f"{self._image}:{tag}"
        loop = asyncio.get_running_loop()  # a duration: timed on the monotonic clock, not the wall's
        record = self.record
        deadline = loop.time() + (self._policy(record) if record is not None
                                  else policy_of(self._fleet_policy())).pull_timeout
        retry = Retry(Backoff(first=0.5, cap=10.0))
        while True:
            try:
                resolved = await self._resolve(ref)
            except DockerRejected as e:
                self._queue.put_nowait(_ResolvedOf(revision, ResolveFailed(str(e))))
                return
            except Temporary as e:
                if loop.time() >= deadline:
                    self._queue.put_nowait(_ResolvedOf(revision, ResolveFailed(f"still unavailable: {e}")))
                    return
                delay = retry.next_delay()
                log.warning("rollout.resolve_retry", rollout=revision, error=str(e), retry_in=round(delay, 2))
                await pause(delay)
                continue
            except DockerError as e:
                self._queue.put_nowait(_ResolvedOf(revision, ResolveFailed(str(e))))
                return
            # The engine answers `name@sha256:...`; the record keeps the digest alone.
            self._queue.put_nowait(_ResolvedOf(revision, Resolved(resolved.rpartition("@")[2])))
            return

    def _show(self, record: Rollout) -> None:
        self._metrics.show_phase(record.phase)
        if record.phase is Phase.PULL:
            pulled, pending, lost = barrier_state(record)
            for state, hosts in (("pulled", pulled), ("pending", pending), ("excluded", lost)):
                self._metrics.barrier_hosts.labels(state).set(len(hosts))
        if record.phase is Phase.ROLL:
            self._metrics.rollout_batch.labels("total").set(len(record.batches))
            self._metrics.rollout_batch.labels("passed").set(record.batch_index)
            self._metrics.rollout_batch.labels("moving").set(
                sum(1 for p in record.progress if p.status is HostStatus.MOVING))


@dataclasses.dataclass(frozen=True)
class _ReportOf:
    """A report of rollout `revision`, to be turned into an event against the record current when it
    is applied."""

    revision: int
    report: proto.Report



@dataclasses.dataclass(frozen=True)
class _ResolvedOf:
    """How resolving the tag of rollout `revision` ended. A resolver cancelled once its answer is
    queued cannot take it back: the answer applies only while that rollout is the current one."""

    revision: int
    event: Resolved | ResolveFailed
