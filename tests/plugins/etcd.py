"""Real etcd for the tests: a fresh single member per test, and a 3-member cluster."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.etcd import EtcdCluster, EtcdMember


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdMember]:
    member = EtcdMember("etcd", tmp_path / "etcd")
    member.start()
    try:
        yield member
    finally:
        member.stop()


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster.create(tmp_path / "cluster", size=3)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
