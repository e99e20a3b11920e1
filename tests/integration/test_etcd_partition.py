"""Faults that need Docker: etcd members in containers (testcontainers), frozen with `docker pause`
or cut off with `docker network disconnect`, while a client uses them."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from norm.adapters.etcd import Etcd, Event, Resync
from norm.core.config import EtcdConfig
from sandbox import images
from sandbox.docker import DockerEngine
from sandbox.procs import wait_for


@dataclass
class Member:
    name: str
    container: object
    endpoint: str

    @property
    def id(self) -> str:
        return str(self.container._container.id)  # type: ignore[attr-defined]


def _healthy(endpoint: str) -> bool:
    with urllib.request.urlopen(f"{endpoint}/health", timeout=1) as r:
        return bool(json.loads(r.read()).get("health") == "true")


@pytest.fixture
def container_cluster(testcontainers_engine: DockerEngine) -> Iterator[tuple[DockerEngine, list[Member]]]:
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.network import Network

    image = images.etcd_image(testcontainers_engine)
    names = ["m0", "m1", "m2"]
    initial = ",".join(f"{n}=http://{n}:2380" for n in names)
    with Network() as network:
        members: list[Member] = []
        try:
            for n in names:
                container = (
                    DockerContainer(image, command=(
                        f"--name {n} --listen-client-urls http://0.0.0.0:2379 "
                        f"--advertise-client-urls http://{n}:2379 --listen-peer-urls http://0.0.0.0:2380 "
                        f"--initial-advertise-peer-urls http://{n}:2380 --initial-cluster {initial} "
                        f"--initial-cluster-state new --initial-cluster-token partition-test"))
                    .with_network(network).with_network_aliases(n).with_exposed_ports(2379))
                container.start()
                endpoint = f"http://127.0.0.1:{container.get_exposed_port(2379)}"
                members.append(Member(n, container, endpoint))
            for m in members:
                wait_for(lambda m=m: _healthy(m.endpoint), timeout=30, what=f"etcd {m.name} in a container")
            yield testcontainers_engine, members
        finally:
            for m in members:
                testcontainers_engine.docker("unpause", m.id, check=False)
                m.container.stop()  # type: ignore[attr-defined]


def last_put(key: str) -> Callable[[object], bool]:
    return lambda item: isinstance(item, Event) and item.kind == "put" and item.kv.key == key


@pytest.mark.parametrize("fault", ["pause", "disconnect"])
async def test_the_client_carries_on_when_its_member_is_frozen_or_cut_off(
        container_cluster: tuple[DockerEngine, list[Member]], fault: str) -> None:
    engine, members = container_cluster
    # Keepalives notice a silent member: 5 s without data, then 2 s for the ping's answer.
    config = EtcdConfig(endpoints=tuple(m.endpoint for m in members), keepalive_time=5,
                        keepalive_timeout=2, request_timeout=15, dial_timeout=5, lease_ttl=20)
    async with Etcd(config) as client, client.watch("/p/", prefix=True) as w:
        assert isinstance(await anext(w), Resync)
        await client.put("/p/00", b"x")
        async with asyncio.timeout(10):
            while not last_put("/p/00")(await anext(w)):
                pass
        # Freeze or cut off the member the client prefers (the first of its shuffled order).
        m0 = next(m for m in members if m.endpoint == client.endpoint)
        if fault == "pause":
            await asyncio.to_thread(engine.docker, "pause", m0.id)
        else:
            network = next(iter(json.loads(engine.docker(
                "inspect", "--format", "{{json .NetworkSettings.Networks}}", m0.id))))
            await asyncio.to_thread(engine.docker, "network", "disconnect", network, m0.id)
        for i in range(1, 11):
            await client.put(f"/p/{i:02}", b"x")
        seen: list[str] = []
        async with asyncio.timeout(30):
            async for item in w:
                if isinstance(item, Event) and item.kind == "put":
                    seen.append(item.kv.key)
                if last_put("/p/10")(item):
                    break
        assert (await client.get("/p/10")) is not None
        assert w.reconnects >= 1  # the watch really lost its member and came back elsewhere
    assert seen == [f"/p/{i:02}" for i in range(1, 11)]
