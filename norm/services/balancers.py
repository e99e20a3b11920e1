"""The load balancers presence keeps a host in, behind one small interface (`LoadBalancer`).

A load balancer has groups (ELBv2 target groups, HAProxy backends) that this host is a member of (as
an EC2 instance, as an HAProxy server). Presence registers the host in each group while its web unit
serves, deregisters it when it stops or fails, and before an update stops the units deregisters it and
waits until it has drained.

- `ElbTargets`: ELBv2, through norm.adapters.elb. Registered means in the target group and not
  draining; deregister starts the group's deregistration delay; drained means out of the group.
- `HaproxyBackends`: HAProxy, through norm.adapters.haproxy. Registered means the server's
  administrative state is ready; deregister puts it in drain (no new sessions; those it has go on),
  unless it is in maintenance already; waiting until drained waits for its sessions to end, then puts
  it in maintenance.

Every call raises a Temporary error (retry later) or a Permanent one (refused) when it fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self

if TYPE_CHECKING:  # a host pays only for the client library of the load balancer it uses
    from norm.adapters.elb import Elb
    from norm.adapters.haproxy import Haproxy


@dataclass(frozen=True)
class Membership:
    """The host's state in one group as the load balancer reports it. `state` and `reason` are the load
    balancer's own words (for ELBv2 the target health's state and reason; for HAProxy the server's
    administrative and operational states), for logs."""

    registered: bool
    state: str
    reason: str | None = None


class LoadBalancer(Protocol):
    """What presence needs of a load balancer. An async context manager: calls only inside it."""

    kind: str  # "elbv2", "haproxy": for logs
    member: str  # this host as the load balancer knows it (instance id, server name)

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None: ...

    async def register(self, group: str) -> None:
        """Put the host in the group (idempotent)."""
        ...

    async def deregister(self, group: str) -> None:
        """Start taking the host out of the group: no new traffic; what it serves may go on while it
        drains. Idempotent: a host that is not in the group is fine."""
        ...

    async def wait_drained(self, group: str, *, within: float) -> bool:
        """Wait until the host is out of the group for good (nothing left to drain): True; False when
        `within` seconds passed first."""
        ...

    async def membership(self, group: str) -> Membership:
        """The host's state in the group, read from the load balancer now."""
        ...


class ElbTargets:
    """This EC2 instance (on `port`, or the groups' own) in ELBv2 target groups."""

    kind = "elbv2"

    def __init__(self, elb: Elb, instance_id: str, port: int | None = None) -> None:
        self.elb = elb
        self.member = instance_id
        self.port = port

    async def __aenter__(self) -> Self:
        await self.elb.__aenter__()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.elb.__aexit__(et, e, tb)

    async def register(self, group: str) -> None:
        await self.elb.register(group, self.member, self.port)

    async def deregister(self, group: str) -> None:
        await self.elb.deregister(group, self.member, self.port)

    async def wait_drained(self, group: str, *, within: float) -> bool:
        return await self.elb.wait_drained(group, self.member, self.port, within=within)

    async def membership(self, group: str) -> Membership:
        health = await self.elb.target_health(group, self.member, self.port)
        return Membership(health.registered, health.state, health.reason)


class HaproxyBackends:
    """This host's server (named `server` in every backend) in HAProxy backends."""

    kind = "haproxy"

    def __init__(self, haproxy: Haproxy, server: str) -> None:
        self.haproxy = haproxy
        self.member = server

    async def __aenter__(self) -> Self:
        await self.haproxy.__aenter__()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.haproxy.__aexit__(et, e, tb)

    async def register(self, group: str) -> None:
        await self.haproxy.set_state(group, self.member, "ready")

    async def deregister(self, group: str) -> None:
        await self.haproxy.drain(group, self.member)

    async def wait_drained(self, group: str, *, within: float) -> bool:
        return await self.haproxy.wait_drained(group, self.member, within=within)

    async def membership(self, group: str) -> Membership:
        server = await self.haproxy.server(group, self.member)
        return Membership(server.ready, server.admin, server.operational)
