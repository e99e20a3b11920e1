"""Fleet leadership: every agent campaigns; the one holding the leader key on its live lease leads.

Side effects of the leader go through `fenced()`, a transaction that applies only while the leader
key keeps the create revision it had when this agent won, and that is not even sent once the lease
can no longer be proven alive. An agent frozen past its lease therefore cannot act on waking.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import structlog

from norm.adapters.etcd import Compare, EtcdError, Leadership, Lease, NotLeader, Op, TxnResult
from norm.core.backoff import Backoff
from norm.core.host import leader_key
from norm.services.base import Retry, first_of, pause
from norm.services.context import HostContext
from norm.services.registration import Registration

log = structlog.get_logger("norm.leadership")

# While leading, the leader key is also read this many times per lease TTL (one small read a second at
# the default TTL, by the leader alone), so that a stalled watch delays stepping down by a second at most.
CONFIRMS_PER_TTL = 10


class LeaderElection:
    name = "leadership"

    def __init__(self, host: HostContext, registration: Registration, *,
                 ineligible: str | None = None) -> None:
        self._etcd = host.etcd
        self.ineligible = ineligible  # why this host never campaigns, or None: it does
        self._election = host.etcd.election(leader_key(host.prefix), host.machine_id.encode())
        self._registration = registration
        self._metrics = host.metrics
        self.leadership: Leadership | None = None
        self.elected = asyncio.Event()  # set while this agent leads
        self.deposed = asyncio.Event()  # set while it does not
        self.deposed.set()
        self._fence_failed = asyncio.Event()  # a fenced write found the leader key no longer ours

    def is_leader(self) -> bool:
        return self.leadership is not None and self.leadership.valid()

    async def fenced(self, success: Sequence[Op], compare: Sequence[Compare] = (),
                     failure: Sequence[Op] = ()) -> TxnResult:
        leadership = self.leadership
        if leadership is None:
            raise NotLeader("this agent is not the leader")
        try:
            return await self._election.fenced(leadership, success, compare, failure)
        except NotLeader:
            # The lease provably alive, so it was the key (a lease in doubt ends the term its own way).
            if self.leadership is leadership and leadership.valid():
                self._fence_failed.set()
            raise

    async def run(self, stopping: asyncio.Event) -> None:
        if self.ineligible is not None:
            log.info("leader.not_eligible", reason=self.ineligible)
            await stopping.wait()
            return
        retry = Retry(Backoff(first=0.2, cap=5.0))
        while not stopping.is_set():
            try:
                lease = await self._registration.current_lease()
                won: list[Leadership] = []

                async def campaign() -> None:
                    won.append(await self._election.campaign(lease))  # noqa: B023

                if await first_of(stopping=stopping.wait(), campaign=campaign()) == "stopping":
                    return
                self._set(won[0])
                log.info("leader.elected", token=won[0].token)
                retry.reset()
                await self._lead(won[0], lease, stopping)
            except EtcdError as e:
                self._set(None)
                delay = retry.next_delay()
                log.warning("leader.campaign_failed", error=str(e), retry_in=round(delay, 2))
                await pause(delay, stopping)

    async def _lead(self, leadership: Leadership, lease: Lease, stopping: asyncio.Event) -> None:
        """One term: until stopping, the lease lost, or the leader key no longer this agent's (its
        watch, a read of it, or a fenced write says so, whichever first)."""
        deposed: list[str] = []
        self._fence_failed.clear()

        async def watch_key() -> None:
            deposed.append(await self._election.deposed(leadership))

        async def read_key() -> None:
            deposed.append(await self._confirm_every(leadership, lease.ttl / CONFIRMS_PER_TTL))

        async def fence_failed() -> None:
            await self._fence_failed.wait()
            deposed.append("a fenced write found the leader key changed")

        try:
            await first_of(stopping=stopping.wait(), lease_lost=lease.lost.wait(), leader_key=watch_key(),
                           leader_key_read=read_key(), fence_failed=fence_failed())
        finally:
            # Step down at once whatever ended the term (an error too): no acting on a leadership
            # this agent can no longer prove.
            self._set(None)
        if stopping.is_set():
            await self._election.resign(leadership)
            log.info("leader.resigned", token=leadership.token)
        elif deposed:
            log.warning("leader.deposed", token=leadership.token, reason=deposed[0])
        else:
            log.warning("leader.lost", token=leadership.token, reason=lease.lost_reason)

    async def _confirm_every(self, leadership: Leadership, seconds: float) -> str:
        """Read the leader key every `seconds` until it no longer proves `leadership`: the watch's
        word comes first, but a watch on a member cut off from its peers may say nothing. A read
        that fails proves nothing either way (the lease bounds that case)."""
        while True:
            await asyncio.sleep(seconds)
            try:
                reason = await self._election.confirm(leadership)
            except EtcdError:
                continue
            if reason is not None:
                return reason

    def _set(self, leadership: Leadership | None) -> None:
        self.leadership = leadership
        self._metrics.leader.set(1 if leadership else 0)
        (self.elected.set if leadership else self.elected.clear)()
        (self.deposed.clear if leadership else self.deposed.set)()
