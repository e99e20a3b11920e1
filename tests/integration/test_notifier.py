"""Webhook notifications against a real etcd and a real HTTP receiver: the leader delivers the outbox
in order and empties it; a receiver that is down gets every notice once it is back; a webhook that
took a notice does not get it again from the next leader; with the leadership moved back and forth
while notices keep coming, each notice reaches the receiver exactly once."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from norm.adapters.etcd import Etcd
from norm.core.backoff import Backoff
from norm.core.config import EtcdConfig
from norm.core.host import HostRecord, leader_key
from norm.core.notify import Notice, OutboxEntry, Webhook, outbox_prefix, payload, quarantine_notice
from norm.services.context import HostContext
from norm.services.leadership import LeaderElection
from norm.services.metrics import Metrics
from norm.services.notifier import Notifier, post_notices
from norm.services.registration import Registration
from sandbox.etcd import EtcdMember
from sandbox.webhooks import WebhookReceiver

P = "/norm"
DEADLINE = 60.0
FAST = Backoff(first=0.05, factor=2.0, cap=0.5, jitter=0.5)
SECRET = "canary-token-0123456789"


@dataclass
class Agent:
    """The registration, leadership and notifier services of one agent, on a client of its own; its
    leadership and notifier can be stopped (gracefully) and started again."""

    name: str
    etcd: Etcd
    webhooks: Callable[[], Sequence[Webhook] | None]
    metrics: Metrics = field(default_factory=Metrics)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    lead_stop: asyncio.Event = field(default_factory=asyncio.Event)
    notify_stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        machine_id = self.name * 32
        host = HostContext(self.etcd, P, machine_id, self.metrics)
        self.registration = Registration(host, HostRecord(machine_id, self.name, "test", "web", "0"))
        self.leadership = LeaderElection(host, self.registration)
        self.notifier = Notifier(self.etcd, P, self.leadership, self.webhooks, self.metrics, timeout=5.0,
                                 backoff=FAST, recheck=0.5)

    def start(self) -> None:
        self.tasks["reg"] = asyncio.create_task(self.registration.run(self.stopping), name=f"{self.name}-reg")
        self.start_leading()

    def start_leading(self) -> None:
        self.lead_stop, self.notify_stop = asyncio.Event(), asyncio.Event()
        self.tasks["lead"] = asyncio.create_task(self.leadership.run(self.lead_stop),
                                                 name=f"{self.name}-lead")
        self.tasks["notify"] = asyncio.create_task(self.notifier.run(self.notify_stop),
                                                   name=f"{self.name}-notify")

    async def step_down(self) -> None:
        """A graceful hand-over: the notifier finishes (and records) the deliveries in flight and
        stops, then the leadership resigns."""
        self.notify_stop.set()
        async with asyncio.timeout(DEADLINE):
            await self.tasks.pop("notify")
        self.lead_stop.set()
        async with asyncio.timeout(DEADLINE):
            await self.tasks.pop("lead")

    async def stop(self) -> None:
        for event in (self.notify_stop, self.lead_stop, self.stopping):
            event.set()
        async with asyncio.timeout(30):
            results = await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        self.tasks.clear()
        for r in results:
            if isinstance(r, BaseException):
                raise r

    def count(self, webhook: str, result: str) -> float:
        return self.metrics.registry.get_sample_value(
            "norm_webhook_deliveries_total", {"webhook": webhook, "result": result}) or 0.0


@asynccontextmanager
async def agents(config: EtcdConfig, names: str,
                 webhooks: Callable[[], Sequence[Webhook] | None]) -> AsyncIterator[list[Agent]]:
    clients = [Etcd(config) for _ in names]
    made: list[Agent] = []
    try:
        for c in clients:
            await c.__aenter__()
        made = [Agent(n, c, webhooks) for n, c in zip(names, clients, strict=True)]
        for a in made:
            a.start()
        yield made
    finally:
        for a in made:
            await a.stop()
        for c in clients:
            await c.close()


async def leader_of(group: list[Agent]) -> Agent:
    async with asyncio.timeout(DEADLINE):
        while True:
            leading = [a for a in group if a.leadership.elected.is_set()]
            if len(leading) == 1:
                return leading[0]
            await asyncio.sleep(0.02)  # polling the test's condition only


async def until(condition: Callable[[], Any], what: str, deadline: float = DEADLINE) -> None:
    """Wait (bounded) until `condition()` holds."""
    try:
        async with asyncio.timeout(deadline):
            while True:
                if condition():
                    return
                await asyncio.sleep(0.05)  # polling the test's condition only
    except TimeoutError:
        raise AssertionError(f"not within {deadline:g}s: {what}") from None


async def until_async(condition: Callable[[], Any], what: str, deadline: float = DEADLINE) -> None:
    try:
        async with asyncio.timeout(deadline):
            while True:
                if await condition():
                    return
                await asyncio.sleep(0.05)  # polling the test's condition only
    except TimeoutError:
        raise AssertionError(f"not within {deadline:g}s: {what}") from None


def notice(i: int, event: str = "phase_changed") -> Notice:
    severity = {"phase_changed": "info", "halted": "critical", "failed": "warning"}[event]
    return Notice(id=f"7-{1000000 + i}-0", event=event, severity=severity,  # type: ignore[arg-type]
                  at=1700000000.0 + i, rollout=7, tag="v2", phase="pull", reason=f"step {i}")


async def add(etcd: Etcd, notices: Sequence[Notice]) -> None:
    """As the leader's record writes put them (one key each, in order)."""
    for n in notices:
        await post_notices(etcd, P, "rollouts", [n])


async def outbox(etcd: Etcd) -> dict[str, OutboxEntry]:
    snap = await etcd.get_prefix(outbox_prefix(P))
    return {kv.key: OutboxEntry.decode(kv.value, kv.key) for kv in snap.kvs}


def url_file(tmp_path: Path, name: str, url: str) -> Path:
    path = tmp_path / f"{name}.url"
    path.write_text(url + "\n")
    path.chmod(0o600)
    return path


def once_each(receiver: WebhookReceiver, ids: Sequence[str]) -> bool:
    counts = Counter(receiver.keys())
    assert all(c == 1 for c in counts.values()), [k for k, c in counts.items() if c > 1]
    return set(counts) == set(ids)


# ---------------------------------------------------------------------------------------------------


async def test_notices_are_delivered_in_order_and_the_outbox_empties(
        etcd: EtcdMember, etcd_config: Callable[..., EtcdConfig], webhook_receiver: WebhookReceiver,
        tmp_path: Path) -> None:
    ops = Webhook("ops", str(url_file(tmp_path, "ops", webhook_receiver.url)))
    # The pager's URL carries a secret, as Slack's do: it never shows.
    pager = Webhook("pager", str(url_file(tmp_path, "pager", f"{webhook_receiver.url}/pager?token={SECRET}")),
                    format="slack", min_severity="critical")
    hooks = (ops, pager)
    notices = [notice(i) for i in range(12)] + [notice(12, "halted")]
    quarantined = quarantine_notice("a" * 32, "djed-web.service", "failed 5 times", 1700000100.0,
                                    host="web-1")
    with capture_logs() as logs:
        async with agents(etcd_config(etcd.endpoint), "a", lambda: hooks) as (agent,):
            await leader_of([agent])
            await add(agent.etcd, notices)
            await post_notices(agent.etcd, P, "a" * 32, [quarantined])  # a host's own notice
            every = [n.id for n in notices] + [quarantined.id]
            await until(lambda: len(webhook_receiver.received()) == len(every) + 2, "every delivery")
            await until_async(lambda: _empty(agent.etcd), "the outbox empties")
            assert agent.metrics.registry.get_sample_value("norm_outbox_pending") == 0
            assert agent.count("ops", "ok") == len(every) and agent.count("pager", "ok") == 2
    got = webhook_receiver.received()
    to_ops = [r for r in got if r["path"] == "/hook"]
    assert [r["idempotency_key"] for r in to_ops] == every  # in the order they were put
    assert all(r["content_type"] == "application/json" for r in got)
    assert [r["body"] for r in to_ops] == [json.loads(payload(ops, n)) for n in [*notices, quarantined]]
    to_pager = [r for r in got if r["path"] == "/hook/pager"]
    assert [r["idempotency_key"] for r in to_pager] == [notices[-1].id, quarantined.id]
    assert to_pager[0]["body"] == {"text": notices[-1].text()}
    assert SECRET not in repr(logs) and "/pager" not in repr(logs)
    assert any(e["event"] == "webhook.delivered" and e["url"] == f"http://127.0.0.1:{webhook_receiver.port}"
               for e in logs)


async def _empty(etcd: Etcd) -> bool:
    return not await outbox(etcd)


async def test_a_receiver_that_is_down_gets_every_notice_once_it_is_back(
        etcd: EtcdMember, etcd_config: Callable[..., EtcdConfig], webhook_receiver: WebhookReceiver,
        tmp_path: Path) -> None:
    hooks = (Webhook("ops", str(url_file(tmp_path, "ops", webhook_receiver.url))),)
    webhook_receiver.stop()
    async with agents(etcd_config(etcd.endpoint), "a", lambda: hooks) as (agent,):
        await leader_of([agent])
        notices = [notice(i) for i in range(8)]
        await add(agent.etcd, notices)
        await until(lambda: agent.count("ops", "retry") >= 3, "the notifier retrying")
        assert len(await outbox(agent.etcd)) == len(notices)
        await asyncio.to_thread(webhook_receiver.start)
        await until(lambda: once_each(webhook_receiver, [n.id for n in notices]), "every notice, once")
        await until_async(lambda: _empty(agent.etcd), "the outbox empties")
        assert webhook_receiver.keys() == [n.id for n in notices]


async def test_a_receiver_answering_500_is_tried_again_until_it_takes_the_notice(
        etcd: EtcdMember, etcd_config: Callable[..., EtcdConfig], webhook_receiver: WebhookReceiver,
        tmp_path: Path) -> None:
    hooks = (Webhook("ops", str(url_file(tmp_path, "ops", webhook_receiver.url))),)
    await asyncio.to_thread(webhook_receiver.start, status=500)
    async with agents(etcd_config(etcd.endpoint), "a", lambda: hooks) as (agent,):
        await leader_of([agent])
        notices = [notice(0), notice(1)]
        await add(agent.etcd, notices)
        await until(lambda: webhook_receiver.keys().count(notices[0].id) >= 3, "tried again")
        # Oldest first: the second waits for the first.
        assert set(webhook_receiver.keys()) == {notices[0].id}
        assert len(await outbox(agent.etcd)) == 2
        await asyncio.to_thread(webhook_receiver.start, status=200)
        await until(lambda: webhook_receiver.keys(answered_ok=True) == [n.id for n in notices], "taken")
        await until_async(lambda: _empty(agent.etcd), "the outbox empties")
        assert agent.count("ops", "retry") >= 3 and agent.count("ops", "ok") == 2


async def test_an_unreadable_url_file_is_retried_and_a_refusal_is_not(
        etcd: EtcdMember, etcd_config: Callable[..., EtcdConfig], webhook_receiver: WebhookReceiver,
        tmp_path: Path) -> None:
    missing = tmp_path / "later.url"
    hooks = (Webhook("later", str(missing)),)
    with capture_logs() as logs:
        async with agents(etcd_config(etcd.endpoint), "a", lambda: hooks) as (agent,):
            await leader_of([agent])
            await add(agent.etcd, [notice(0)])
            await until(lambda: agent.count("later", "retry") >= 2, "the notifier retrying")
            url_file(tmp_path, "later", f"{webhook_receiver.url}?secret={SECRET}")
            await until(lambda: webhook_receiver.keys() == [notice(0).id], "delivered once the file is there")
            await until_async(lambda: _empty(agent.etcd), "the outbox empties")
            # A receiver that refuses (404): counted, not tried again, and the entry goes.
            await asyncio.to_thread(webhook_receiver.start, status=404)
            await add(agent.etcd, [notice(1)])
            await until_async(lambda: _empty(agent.etcd), "the refused entry goes")
            assert agent.count("later", "refused") == 1
            assert webhook_receiver.keys() == [notice(0).id, notice(1).id]
    assert any(e["event"] == "webhook.url_unreadable" and e["webhook"] == "later" for e in logs)
    assert any(e["event"] == "webhook.refused" and e["status"] == 404 for e in logs)
    assert SECRET not in repr(logs)


async def test_one_webhook_down_and_one_up_across_a_leader_change(
        etcd: EtcdMember, etcd_config: Callable[..., EtcdConfig],
        webhook_receivers: Callable[[str], WebhookReceiver], tmp_path: Path) -> None:
    up, down = webhook_receivers("up"), webhook_receivers("down")
    down.stop()
    hooks = (Webhook("up", str(url_file(tmp_path, "up", up.url))),
             Webhook("down", str(url_file(tmp_path, "down", down.url))))
    notices = [notice(i) for i in range(6)]
    ids = [n.id for n in notices]
    async with agents(etcd_config(etcd.endpoint), "ab", lambda: hooks) as group:
        first = await leader_of(group)
        await add(first.etcd, notices)
        await until(lambda: once_each(up, ids), "the webhook up gets each notice")
        # Each entry records that it was delivered to the webhook up, and waits for the other.
        await until_async(lambda: _delivered_to(first.etcd, ids, ("up",)), "the entries rewritten")
        assert first.count("down", "retry") >= 1
        # The leadership moves; the new leader does not deliver them again to the webhook up.
        await first.step_down()
        second = await leader_of(group)
        assert second is not first
        first.start_leading()
        more = [notice(i) for i in range(6, 9)]
        await add(second.etcd, more)
        ids += [n.id for n in more]
        await until(lambda: once_each(up, ids), "the webhook up gets the new ones")
        await asyncio.to_thread(down.start)
        await until(lambda: once_each(down, ids), "the webhook down gets each notice once back")
        await until_async(lambda: _empty(second.etcd), "the outbox empties")
        assert up.keys() == ids and down.keys() == ids


async def _delivered_to(etcd: Etcd, ids: Sequence[str], names: tuple[str, ...]) -> bool:
    held = await outbox(etcd)
    return sorted(e.notice.id for e in held.values()) == sorted(ids) and \
        all(e.delivered == names for e in held.values())


async def test_each_notice_once_with_the_leadership_moved_back_and_forth(
        etcd: EtcdMember, etcd_config: Callable[..., EtcdConfig], webhook_receiver: WebhookReceiver,
        tmp_path: Path) -> None:
    """Moves are graceful (the leader's notifier finishes and records its delivery in flight, then the
    leader resigns): a leader that dies between a receiver's 2xx and recording it leaves the notice to
    be delivered again, with the same Idempotency-Key."""
    hooks = (Webhook("ops", str(url_file(tmp_path, "ops", webhook_receiver.url))),)
    ids: list[str] = []
    n = 0

    async def more(etcd: Etcd, count: int) -> None:
        nonlocal n
        batch = [notice(i) for i in range(n, n + count)]
        n += count
        ids.extend(x.id for x in batch)
        await add(etcd, batch)

    async with agents(etcd_config(etcd.endpoint), "ab", lambda: hooks) as group:
        leaders = []
        for _ in range(24):
            leader = await leader_of(group)
            leaders.append(leader.name)
            await more(leader.etcd, 3)
            await leader.step_down()
            await more(leader.etcd, 2)  # while no notifier delivers
            nxt = await leader_of(group)
            assert nxt is not leader
            leader.start_leading()
            await more(nxt.etcd, 2)
        await until(lambda: once_each(webhook_receiver, ids), "every notice, once")
        await until_async(lambda: _empty(group[0].etcd), "the outbox empties")
    assert len(ids) == 24 * 7 and Counter(leaders) == {"a": 12, "b": 12}
    # In the order they were put.
    assert webhook_receiver.keys() == ids


async def test_the_webhooks_are_read_at_run_time_and_notices_no_one_wants_go(
        etcd: EtcdMember, etcd_config: Callable[..., EtcdConfig], webhook_receiver: WebhookReceiver,
        tmp_path: Path) -> None:
    hooks: list[Webhook] | None = None
    async with agents(etcd_config(etcd.endpoint), "a", lambda: hooks) as (agent,):
        await leader_of([agent])
        # The webhooks not known yet (the policy not read): the notices are kept.
        await add(agent.etcd, [notice(0)])
        await until(lambda: agent.metrics.registry.get_sample_value("norm_outbox_pending") == 1, "seen")
        await add(agent.etcd, [notice(1)])
        await until(lambda: agent.metrics.registry.get_sample_value("norm_outbox_pending") == 2, "kept")
        # No webhook: nothing to deliver, the notices go.
        hooks = []
        await until_async(lambda: _empty(agent.etcd), "the unwanted notices go")
        # A webhook for the grave ones only: an info notice goes undelivered, a critical one reaches it.
        hooks.append(Webhook("pager", str(url_file(tmp_path, "pager", webhook_receiver.url)),
                             min_severity="critical"))
        await add(agent.etcd, [notice(3), notice(2, "halted")])
        await until(lambda: webhook_receiver.keys() == [notice(2).id], "the critical one delivered")
        await until_async(lambda: _empty(agent.etcd), "the outbox empties")
    assert webhook_receiver.keys() == [notice(2).id]


async def test_every_notice_at_least_once_with_the_leader_key_deleted_under_the_leader(
        etcd: EtcdMember, etcd_config: Callable[..., EtcdConfig], webhook_receiver: WebhookReceiver,
        tmp_path: Path) -> None:
    """Moves that are not graceful (the leader key deleted, as an operator may): a leader may lose its
    leadership between a receiver's 2xx and recording it, and the next one delivers that notice again,
    with the same Idempotency-Key. Every notice arrives; none is lost."""
    hooks = (Webhook("ops", str(url_file(tmp_path, "ops", webhook_receiver.url))),)
    ids: list[str] = []
    async with agents(etcd_config(etcd.endpoint), "ab", lambda: hooks) as group:
        for move in range(20):
            leader = await leader_of(group)
            token = leader.leadership.leadership.token if leader.leadership.leadership else None
            batch = [notice(i) for i in range(move * 4, move * 4 + 4)]
            ids.extend(n.id for n in batch)
            await add(leader.etcd, batch)
            await asyncio.to_thread(etcd.ctl, "del", leader_key(P))
            await until(lambda token=token: any(a.leadership.leadership is not None  # type: ignore[misc]
                                                and a.leadership.leadership.token != token for a in group),
                        "a new term")
        await until(lambda: set(webhook_receiver.keys()) == set(ids), "every notice")
        await until_async(lambda: _empty(group[0].etcd), "the outbox empties")
    got = webhook_receiver.keys()
    assert set(got) == set(ids)
    # Again only what was in flight as the leadership went: at most one delivery a move.
    assert len(got) - len(ids) <= 20
    # Each webhook's notices in order, but for a notice delivered again after a later one.
    firsts = list(dict.fromkeys(got))
    assert firsts == ids
