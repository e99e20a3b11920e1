"""ELBv2 and EC2 resources in the shared moto server, unique per test: a VPC with a running instance and
target groups for it, and the test's own view of a target's state; a web unit that serves HTTP."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiobotocore.session import get_session

from sandbox.moto import MotoServer

REGION = "us-east-1"
ACCESS_KEY = "AKIANORMTESTKEY00001"
SECRET_KEY = "norm-test-secret-never-shown-0123456789"  # checked to be absent from errors and logs


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Keys for botocore's default chain, as an instance would have them; no instance metadata."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    yield


@dataclass(frozen=True)
class Site:
    endpoint: str
    vpc: str
    instance_id: str
    groups: tuple[str, ...]

    async def state(self, group: str, port: int | None = None) -> tuple[str, str | None]:
        """(state, reason) of this instance in `group`, as moto's describe_target_health has it."""
        target = {"Id": self.instance_id} if port is None else {"Id": self.instance_id, "Port": port}
        async with _client("elbv2", self.endpoint) as elb:
            reply = await elb.describe_target_health(TargetGroupArn=group, Targets=[target])
        health = reply["TargetHealthDescriptions"][0]["TargetHealth"]
        return health["State"], health.get("Reason")

    async def states(self) -> list[str]:
        return [(await self.state(g))[0] for g in self.groups]

    async def deregister(self, group: str) -> None:
        """Take the instance out of `group` behind the agent's back, as an operator's console would."""
        async with _client("elbv2", self.endpoint) as elb:
            await elb.deregister_targets(TargetGroupArn=group, Targets=[{"Id": self.instance_id}])

    async def register(self, group: str) -> None:
        """Put the instance in `group` behind the agent's back."""
        async with _client("elbv2", self.endpoint) as elb:
            await elb.register_targets(TargetGroupArn=group, Targets=[{"Id": self.instance_id}])

    async def terminate(self) -> None:
        async with _client("ec2", self.endpoint) as ec2:
            await ec2.terminate_instances(InstanceIds=[self.instance_id])


def _client(service: str, endpoint: str):  # type: ignore[no-untyped-def]
    return get_session().create_client(service, region_name=REGION, endpoint_url=endpoint,
                                       aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)


async def make_site(moto: MotoServer, groups: int = 1, port: int = 8080) -> Site:
    """A VPC, a running instance in it, and `groups` HTTP target groups on `port`."""
    tag = uuid.uuid4().hex[:10]
    async with _client("ec2", moto.endpoint) as ec2, _client("elbv2", moto.endpoint) as elb:
        vpc = (await ec2.create_vpc(CidrBlock="10.0.0.0/16"))["Vpc"]["VpcId"]
        subnet = (await ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.0.0/24"))["Subnet"]["SubnetId"]
        image = (await ec2.describe_images(Owners=["amazon"]))["Images"][0]["ImageId"]
        instance = (await ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, SubnetId=subnet)
                    )["Instances"][0]["InstanceId"]
        arns = []
        for i in range(groups):
            reply = await elb.create_target_group(Name=f"web-{tag}-{i}", Protocol="HTTP", Port=port,
                                                  VpcId=vpc, TargetType="instance")
            arns.append(reply["TargetGroups"][0]["TargetGroupArn"])
    return Site(moto.endpoint, vpc, instance, tuple(arns))


def web_unit(port: int, root: Path) -> str:
    """A unit that is active at once and serves HTTP on `port` a moment later: its health check, not its
    state, says when it serves."""
    return ("[Unit]\nStartLimitIntervalSec=0\n[Service]\n"
            f"ExecStart=/bin/sh -c 'sleep 0.3; exec /usr/bin/python3 -m http.server {port} "
            f"--bind 127.0.0.1 --directory {root}'\n")
