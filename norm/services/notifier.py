"""Webhook notifications of rollout events, delivered by the fleet's leader from an outbox in etcd.

Writers put notices (norm.core.notify) in the outbox, `<prefix>/outbox/<source>/<id>`, in the same
transaction as the change that makes them: the leader adds `outbox_puts(prefix, "rollouts", notices)`
to its fenced write of the rollout record, a host puts its own (a unit quarantined) with
`post_notices(etcd, prefix, machine_id, notices)`. A notice is therefore made exactly once: a new
leader never makes it again, it finds it in the outbox.

The `Notifier` works only while its agent leads. It follows the outbox with a watch and, for each
webhook of the fleet's policy, delivers the entries that webhook wants (`notify.matches`), oldest first
(by the revision that created them), one at a time, retried with jittered exponential backoff while
the receiver cannot take them. The webhooks are independent: one that is down holds back only its
own deliveries. Once a webhook took an entry (a 2xx) the entry is rewritten, fenced on leadership and
compared on its mod revision, with the names of the webhooks it was delivered to, so that the next
leader does not deliver it to them again; once every webhook that wants it took it, it is deleted (the
same way). A 4xx other than 408 and 429 is a refusal: logged, counted, and not tried again for that
entry (it counts as taken).

Delivery is at least once: a leader that dies (or loses its lease) between a receiver's 2xx and the
rewrite or delete leaves the entry for the next leader, which delivers it again. Every POST carries
the notice's id as its `Idempotency-Key` header, the same on every attempt by every leader, so a
receiver that keeps the keys it has seen takes each notice once. An agent that stops gracefully lets
its deliveries in flight finish and be recorded first (bounded by the HTTP timeout).

The URL of a webhook is read from its `url_file` at each delivery, never kept, logged or counted:
logs name a webhook by its name and show at most `scheme://host` of its URL.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import aiohttp
import structlog

from norm.adapters.etcd import (
    Compare,
    Delete,
    Etcd,
    EtcdError,
    KeyValue,
    NotLeader,
    Op,
    Put,
    Resync,
    TxnResult,
)
from norm.core import notify
from norm.core.backoff import Backoff
from norm.core.errors import InvalidValue, Temporary
from norm.core.notify import Notice, OutboxEntry, Webhook
from norm.services.base import OwnedTasks, Retry, first_of, pause
from norm.services.metrics import Metrics

log = structlog.get_logger("norm.notifier")

Result = Literal["ok", "retry", "refused"]

# From a second to five minutes between tries of one webhook: a receiver that is down for long is
# not hammered, one that comes back is tried again soon.
DEFAULT_BACKOFF = Backoff(first=1.0, factor=2.0, cap=300.0, jitter=0.5)


class Leading(Protocol):
    """What the notifier needs of the agent's leadership (norm.services.leadership.LeaderElection)."""

    @property
    def elected(self) -> asyncio.Event: ...  # set while this agent leads

    @property
    def deposed(self) -> asyncio.Event: ...  # set while it does not

    def is_leader(self) -> bool: ...

    async def fenced(self, success: Sequence[Op], compare: Sequence[Compare] = (),
                     failure: Sequence[Op] = ()) -> TxnResult: ...


def outbox_puts(prefix: str, source: str, notices: Iterable[Notice]) -> list[Put]:
    """The puts that place `notices` in the outbox, for the transaction that makes them: `source` is
    "rollouts" for the leader's, the host's machine id for a host's."""
    return [Put(notify.outbox_key(prefix, source, n.id), OutboxEntry(n).encode()) for n in notices]


async def post_notices(etcd: Etcd, prefix: str, source: str, notices: Sequence[Notice]) -> None:
    """Put a host's notices in the outbox (one transaction; a plain put for one)."""
    puts = outbox_puts(prefix, source, notices)
    if len(puts) == 1:
        await etcd.put(puts[0].key, puts[0].value)
    elif puts:
        await etcd.txn([], puts)


MAX_URL_FILE = 8192


def _read_url_file(path: str) -> str:
    with Path(path).open("rb") as f:
        raw = f.read(MAX_URL_FILE + 1)
    if len(raw) > MAX_URL_FILE:
        raise ValueError(f"longer than {MAX_URL_FILE} bytes")
    return raw.decode("utf-8")


@dataclass(frozen=True)
class _Held:
    kv: KeyValue
    entry: OutboxEntry

    @property
    def order(self) -> tuple[int, str]:
        return self.kv.create_revision, self.kv.key


class Notifier:
    name = "notifier"

    def __init__(self, etcd: Etcd, prefix: str, leadership: Leading,
                 webhooks: Callable[[], Sequence[Webhook] | None], metrics: Metrics, *, timeout: float = 10.0,
                 backoff: Backoff = DEFAULT_BACKOFF, recheck: float = 5.0) -> None:
        """`webhooks`: the fleet's webhooks now (the policy changes at run time), or None while they
        are not known yet (the policy not read yet): every notice is then kept; `timeout`: of each
        POST, and what a graceful stop waits for the deliveries in flight; `recheck`: how often the
        webhooks are read again while nothing happens in the outbox."""
        self._etcd = etcd
        self._prefix = prefix
        self._leadership = leadership
        self._webhooks = webhooks
        self._metrics = metrics
        self._timeout = timeout
        self._backoff = backoff
        self._recheck = recheck
        # The session's state, while leading.
        self._entries: dict[str, _Held] = {}
        self._done: dict[str, set[str]] = {}  # key -> webhooks that took it here, maybe not yet in etcd
        self._deleting: set[str] = set()
        self._hooks: dict[str, Webhook] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._changed = asyncio.Event()
        self._quit = asyncio.Event()
        self._failed = asyncio.Event()
        self._error: BaseException | None = None
        self._commit_lock = asyncio.Lock()
        self._http: aiohttp.ClientSession | None = None

    # -- the service ---------------------------------------------------------------------------------
    async def run(self, stopping: asyncio.Event) -> None:
        retry = Retry(Backoff(first=0.2, cap=5.0))
        while not stopping.is_set():
            elected = self._leadership.elected.wait()
            if await first_of(stopping=stopping.wait(), elected=elected) == "stopping":
                return
            try:
                await self._session(stopping)
                retry.reset()
            except NotLeader as e:
                log.info("notifier.not_leader", reason=str(e))
                await pause(retry.next_delay(), stopping, self._leadership.deposed)
            except EtcdError as e:
                delay = retry.next_delay()
                log.warning("notifier.failed", error=str(e), retry_in=round(delay, 2))
                await pause(delay, stopping)
            finally:
                self._reset()

    def _reset(self) -> None:
        self._entries.clear()
        self._done.clear()
        self._deleting.clear()
        self._hooks.clear()
        self._wake.clear()
        self._http = None
        self._metrics.outbox_pending.set(0)

    async def _session(self, stopping: asyncio.Event) -> None:
        """Deliver while leading; on `stopping`, let the deliveries in flight finish and be recorded."""
        log.info("notifier.leading")
        self._quit, self._failed, self._error = asyncio.Event(), asyncio.Event(), None
        async with aiohttp.ClientSession(trust_env=False) as http, \
                OwnedTasks(on_error=self._task_failed) as tasks, \
                OwnedTasks(on_error=self._task_failed) as workers:
            self._http = http
            tasks.start("follow", self._follow(), name="notifier-follow")
            tasks.start("supervise", self._supervise(workers), name="notifier-supervise")
            ended = await first_of(stopping=stopping.wait(), deposed=self._leadership.deposed.wait(),
                                   failed=self._failed.wait())
            if ended == "stopping":
                self._quit.set()
                self._wake_all()
                try:
                    async with asyncio.timeout(self._timeout + 5.0):
                        await workers.join()
                except TimeoutError:
                    log.warning("notifier.stop_timeout", seconds=self._timeout + 5.0)
        if self._error is not None:
            raise self._error
        log.info("notifier.stepped_down", why=ended)

    def _task_failed(self, e: BaseException) -> None:
        if self._error is None:
            self._error = e
        if not isinstance(e, EtcdError):
            log.error("notifier.task_failed", exc_info=e)
        self._failed.set()

    def _wake_all(self) -> None:
        self._changed.set()
        for wake in self._wake.values():
            wake.set()

    # -- the outbox, as etcd holds it ------------------------------------------------------------------
    async def _follow(self) -> None:
        async with self._etcd.watch(notify.outbox_prefix(self._prefix), prefix=True) as w:
            async for item in w:
                if isinstance(item, Resync):
                    present = {kv.key for kv in item.snapshot.kvs}
                    for key in set(self._entries) - present:
                        self._gone(key)
                    for kv in item.snapshot.kvs:
                        self._put(kv)
                elif item.kind == "delete":
                    self._gone(item.kv.key)
                else:
                    self._put(item.kv)
                self._metrics.outbox_pending.set(len(self._entries))
                self._wake_all()

    def _put(self, kv: KeyValue) -> None:
        held = self._entries.get(kv.key)
        if held is not None and held.kv.mod_revision >= kv.mod_revision:
            return
        try:
            entry = OutboxEntry.decode(kv.value, kv.key)
            try:
                notify.check_entry_key(self._prefix, kv.key, entry.notice)
            except ValueError as e:
                raise InvalidValue(kv.key, f"not an outbox entry ({e})") from None
        except InvalidValue as e:
            self._entries.pop(kv.key, None)
            self._metrics.rejected_values.labels("outbox").inc()
            log.warning("notifier.entry_refused", key=kv.key, error=str(e))
            return
        if held is not None and held.kv.create_revision != kv.create_revision:
            self._done.pop(kv.key, None)  # written anew: another notice
        self._entries[kv.key] = _Held(kv, entry)

    def _gone(self, key: str) -> None:
        self._entries.pop(key, None)
        self._done.pop(key, None)
        self._deleting.discard(key)

    # -- the webhooks ----------------------------------------------------------------------------------
    async def _supervise(self, workers: OwnedTasks) -> None:
        """One worker per webhook of the policy; entries that no webhook needs any more deleted."""
        while not self._quit.is_set():
            self._changed.clear()
            now = self._webhooks()
            if now is None:  # not known yet: nothing is delivered, nothing dropped
                await pause(self._recheck, self._changed, self._quit)
                continue
            hooks = {h.name: h for h in now}
            for name in set(self._hooks) - set(hooks):
                await workers.stop(name)
                del self._hooks[name], self._wake[name]
                log.info("notifier.webhook_removed", webhook=name)
            for name, hook in hooks.items():
                self._hooks[name] = hook  # a worker reads its webhook afresh at each delivery
                if not workers.running(name) and not self._quit.is_set():
                    self._wake[name] = asyncio.Event()
                    workers.start(name, self._worker(name), name=f"notifier-{name}")
            for key in [k for k in self._entries if self._settled(k) or self._unrecorded(k)]:
                await self._commit(key)
            await pause(self._recheck, self._changed, self._quit)

    def _settled(self, key: str) -> bool:
        """Whether every webhook that wants the entry took it (here or before)."""
        held = self._entries[key]
        took = set(held.entry.delivered) | self._done.get(key, set())
        return all(h.name in took for h in self._hooks.values() if notify.matches(h, held.entry.notice))

    def _unrecorded(self, key: str) -> bool:
        """Whether a webhook took the entry here and the entry does not say so yet (its rewrite failed)."""
        return bool(self._done.get(key, set()) - set(self._entries[key].entry.delivered))

    def _next_for(self, hook: Webhook) -> str | None:
        """The oldest entry `hook` wants and has not taken."""
        for held in sorted(self._entries.values(), key=lambda h: h.order):
            key = held.kv.key
            if key in self._deleting or hook.name in held.entry.delivered \
                    or hook.name in self._done.get(key, ()):
                continue
            if notify.matches(hook, held.entry.notice):
                return key
        return None

    async def _worker(self, name: str) -> None:
        retry = Retry(self._backoff)
        wake = self._wake[name]
        while not self._quit.is_set():
            hook = self._hooks.get(name)
            if hook is None:
                return
            wake.clear()
            key = self._next_for(hook)
            if key is None:
                await pause(None, wake, self._quit)
                continue
            if not self._leadership.is_leader():
                # The lease cannot be proven alive: no acting on a leadership that may be gone. The
                # session ends once the agent steps down; a late renewal lets it go on. Stepped down
                # already (deposed set), it waits for that end, never spinning on the event.
                deposed = self._leadership.deposed
                await pause(self._recheck, *((self._quit,) if deposed.is_set() else (deposed, self._quit)))
                continue
            result = await self._deliver(hook, self._entries[key].entry.notice)
            self._metrics.webhook_deliveries.labels(name, result).inc()
            if result == "retry":
                await pause(retry.next_delay(), self._quit)
                continue
            retry.reset()
            self._done.setdefault(key, set()).add(name)
            await self._commit(key)

    # -- one delivery ----------------------------------------------------------------------------------
    async def _deliver(self, hook: Webhook, notice: Notice) -> Result:
        bound = log.bind(webhook=hook.name, notice=notice.id, event=notice.event)
        try:
            raw = await asyncio.to_thread(_read_url_file, hook.url_file)
        except OSError as e:  # the path is the policy's; the file's content is the secret
            bound.warning("webhook.url_unreadable", url_file=hook.url_file,
                          error=e.strerror or type(e).__name__)
            return "retry"
        except UnicodeError:
            bound.warning("webhook.url_unreadable", url_file=hook.url_file, error="not UTF-8 text")
            return "retry"
        except ValueError as e:  # too long: its own message, without the content
            bound.warning("webhook.url_unreadable", url_file=hook.url_file, error=str(e))
            return "retry"
        try:
            url = notify.check_url(raw, f"webhook {hook.name}: {hook.url_file}")
        except ValueError as e:
            bound.warning("webhook.url_invalid", error=str(e))
            return "retry"
        bound = bound.bind(url=notify.redact_url(url))
        http = self._http
        assert http is not None
        headers = {"Content-Type": "application/json", "Idempotency-Key": notice.id}
        try:
            async with asyncio.timeout(self._timeout):
                async with http.post(url, data=notify.payload(hook, notice), headers=headers,
                                     allow_redirects=False) as r:
                    status = r.status
        except TimeoutError:
            bound.warning("webhook.no_answer", seconds=self._timeout)
            return "retry"
        except (aiohttp.ClientError, OSError, ValueError) as e:  # their text may quote the URL
            bound.warning("webhook.unreachable", error=type(e).__name__)
            return "retry"
        if 200 <= status < 300:
            bound.info("webhook.delivered", status=status)
            return "ok"
        if 400 <= status < 500 and status not in (408, 429):
            bound.error("webhook.refused", status=status)
            return "refused"
        bound.warning("webhook.retry", status=status)
        return "retry"

    # -- recording what was delivered ------------------------------------------------------------------
    async def _commit(self, key: str) -> None:
        """Rewrite the entry with the webhooks that took it, or delete it once every one that wants it
        did: fenced on leadership, and compared on the entry's mod revision (read afresh)."""
        async with self._commit_lock:
            try:
                for _ in range(5):  # the entry changed between the read and the write: read it again
                    if await self._commit_once(key):
                        return
            except NotLeader:
                raise
            except EtcdError as e:
                if not isinstance(e, Temporary):
                    raise
                # Kept here: the next commit of this entry, or the next check, records it.
                log.warning("notifier.record_failed", key=key, error=str(e))

    async def _commit_once(self, key: str) -> bool:
        kv = await self._etcd.get(key)
        if kv is None:
            self._done.pop(key, None)
            return True
        try:
            entry = OutboxEntry.decode(kv.value, key)
        except InvalidValue:
            return True
        took = set(entry.delivered) | self._done.get(key, set())
        hooks = self._webhooks()
        wanted = None if hooks is None else {h.name for h in hooks if notify.matches(h, entry.notice)}
        ops: list[Op]
        if wanted is not None and wanted <= took:
            ops = [Delete(key)]
            self._deleting.add(key)
        elif took <= set(entry.delivered):
            return True
        else:
            ops = [Put(key, dataclasses.replace(entry, delivered=tuple(sorted(took))).encode())]
        result = await self._leadership.fenced(ops, compare=[Compare(key, "mod", "==", kv.mod_revision)])
        if not result.succeeded:
            self._deleting.discard(key)
            return False
        log.debug("notifier.recorded", key=key, deleted=isinstance(ops[0], Delete), delivered=sorted(took))
        return True


class NoticePoster:
    """A host's own notices (a unit quarantined) put in the outbox, each retried with back-off until
    etcd takes it; the leader's notifier delivers them."""

    name = "notices"

    def __init__(self, etcd: Etcd, prefix: str, machine_id: str) -> None:
        self._etcd = etcd
        self._prefix = prefix
        self._me = machine_id
        self._queue: asyncio.Queue[Notice] = asyncio.Queue()

    def post(self, notice: Notice) -> None:
        self._queue.put_nowait(notice)

    async def run(self, stopping: asyncio.Event) -> None:
        retry = Retry(DEFAULT_BACKOFF)
        got: list[Notice] = []

        async def take() -> None:
            got.append(await self._queue.get())

        while not stopping.is_set():
            got.clear()
            if await first_of(stopping=stopping.wait(), take=take()) == "stopping":
                return
            while True:
                try:
                    await post_notices(self._etcd, self._prefix, self._me, got)
                    retry.reset()
                    break
                except EtcdError as e:
                    delay = retry.next_delay()
                    log.warning("notices.post_failed", error=str(e), retry_in=round(delay, 2))
                    if await pause(delay, stopping):
                        return
