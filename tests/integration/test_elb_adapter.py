"""The ELBv2 adapter against a real moto server (ELBv2 and EC2 over HTTP): registration, idempotent
deregistration, draining within a bound, and errors that say what to do without showing credentials."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from norm.adapters.elb import Elb, ElbRejected, ElbUnavailable
from sandbox.moto import MotoServer
from sandbox.procs import free_port
from tests.integration.elb import REGION, SECRET_KEY, aws_credentials, make_site

pytestmark = pytest.mark.usefixtures("aws_credentials")
__all__ = ["aws_credentials"]


async def test_register_and_deregister_as_moto_sees_it(moto_server: MotoServer) -> None:
    site = await make_site(moto_server, groups=2)
    a, b = site.groups
    async with Elb(REGION, endpoint_url=moto_server.endpoint, call_timeout=5) as elb:
        assert not (await elb.target_health(a, site.instance_id)).registered
        await elb.register(a, site.instance_id)
        await elb.register(a, site.instance_id)  # idempotent
        health = await elb.target_health(a, site.instance_id)
        assert health.registered and health.state == "healthy"
        assert await site.states() == ["healthy", "unused"]

        await elb.deregister(a, site.instance_id)
        health = await elb.target_health(a, site.instance_id)
        assert health.drained and not health.registered
        assert await site.state(a) == ("unused", "Target.NotRegistered")
        await elb.deregister(a, site.instance_id)  # not registered: fine
        await elb.deregister(b, site.instance_id)  # never registered: fine
        assert await elb.wait_drained(a, site.instance_id, within=5)


async def test_a_port_override(moto_server: MotoServer) -> None:
    site = await make_site(moto_server, port=8080)
    (group,) = site.groups
    async with Elb(REGION, endpoint_url=moto_server.endpoint, call_timeout=5) as elb:
        await elb.register(group, site.instance_id, 9090)
        assert (await elb.target_health(group, site.instance_id, 9090)).registered
        assert (await site.state(group, 9090))[0] == "healthy"
        await elb.deregister(group, site.instance_id, 9090)
        assert (await elb.target_health(group, site.instance_id, 9090)).drained


async def test_waiting_for_a_target_that_keeps_draining_is_bounded(moto_server: MotoServer) -> None:
    # moto shows the target of a terminated instance as draining for good.
    site = await make_site(moto_server)
    (group,) = site.groups
    async with Elb(REGION, endpoint_url=moto_server.endpoint, call_timeout=5, poll_interval=0.1) as elb:
        await elb.register(group, site.instance_id)
        await site.terminate()
        health = await elb.target_health(group, site.instance_id)
        assert health.draining and not health.drained
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert not await elb.wait_drained(group, site.instance_id, within=0.5)
        assert 0.5 <= loop.time() - started < 3.0
        assert not await elb.wait_drained(group, site.instance_id, within=0)


async def test_refusals_are_rejected_and_name_the_code(moto_server: MotoServer) -> None:
    site = await make_site(moto_server)
    (group,) = site.groups
    missing = group[:-16] + "0" * 16
    with capture_logs() as logs:
        async with Elb(REGION, endpoint_url=moto_server.endpoint, call_timeout=5) as elb:
            with pytest.raises(ElbRejected) as e:
                await elb.register(missing, site.instance_id)
            assert e.value.code == "TargetGroupNotFound" and e.value.operation == "RegisterTargets"
            with pytest.raises(ElbRejected) as e2:
                await elb.deregister(missing, site.instance_id)
            await site.terminate()
            with pytest.raises(ElbRejected) as e3:
                await elb.register(group, site.instance_id)
            assert e3.value.code == "InvalidTarget"
    for err in (e.value, e2.value, e3.value):
        assert SECRET_KEY not in str(err) and SECRET_KEY not in repr(err)
        assert err.__cause__ is None and err.__suppress_context__
    assert SECRET_KEY not in repr(logs)


async def test_an_endpoint_that_does_not_answer_is_unavailable() -> None:
    port = free_port()  # nothing listens there
    async with Elb(REGION, endpoint_url=f"http://127.0.0.1:{port}", call_timeout=2) as elb:
        group = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web/0123456789abcdef"
        with pytest.raises(ElbUnavailable) as e:
            await elb.register(group, "i-0123456789abcdef0")
        assert e.value.operation == "RegisterTargets"
        assert SECRET_KEY not in str(e.value)
        assert not await elb.wait_drained(group, "i-0123456789abcdef0", within=0.2)
