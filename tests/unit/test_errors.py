"""Every adapter's errors say what the caller should do the same way: try again later, or not."""

from __future__ import annotations

import pytest

from norm.adapters.docker import DockerError, DockerRejected, DockerUnavailable
from norm.adapters.elb import ElbError, ElbRejected, ElbUnavailable
from norm.adapters.etcd import EtcdError, EtcdRejected, EtcdTlsFailed, EtcdUnavailable
from norm.adapters.imds import MetadataError, MetadataUnavailable
from norm.adapters.s3 import ObjectDenied, ObjectMissing, ObjectTooLarge, StoreError, StoreUnavailable
from norm.adapters.systemd import SystemdError, SystemdUnavailable, UnitNotLoadable
from norm.core.errors import NormError, Permanent, Temporary

TEMPORARY = [
    DockerUnavailable("down", ref="app:v1", action="pulling"),
    ElbUnavailable("throttled", operation="RegisterTargets"),
    EtcdUnavailable("no answer"),
    MetadataUnavailable("no answer", path="instance-id"),
    StoreUnavailable("slow", bucket="b", key="k"),
    SystemdUnavailable("bus gone"),
]
PERMANENT = [
    DockerRejected("unknown tag", ref="app:v1", action="resolving"),
    ElbRejected("no such group", operation="RegisterTargets"),
    EtcdRejected("permission denied"),
    EtcdTlsFailed("handshake"),
    ObjectMissing("no such key", bucket="b", key="k"),
    ObjectDenied("denied", bucket="b", key="k"),
    ObjectTooLarge("too large", bucket="b", key="k"),
    UnitNotLoadable("web.service", "not-found"),
]
ADAPTER_BASES = (DockerError, ElbError, EtcdError, MetadataError, StoreError, SystemdError)


@pytest.mark.parametrize("error", TEMPORARY, ids=lambda e: type(e).__name__)
def test_unavailable_is_temporary_and_still_its_adapters_error(error: NormError) -> None:
    assert isinstance(error, Temporary) and not isinstance(error, Permanent)
    assert isinstance(error, ADAPTER_BASES)
    with pytest.raises(Temporary):
        raise error


@pytest.mark.parametrize("error", PERMANENT, ids=lambda e: type(e).__name__)
def test_refused_is_permanent(error: NormError) -> None:
    assert isinstance(error, Permanent) and not isinstance(error, Temporary)
    assert isinstance(error, ADAPTER_BASES)


def test_the_messages_and_context_are_the_adapters() -> None:
    e = DockerUnavailable("engine restarting", ref="app:v1", action="pulling", status=503)
    assert str(e) == "pulling app:v1: engine restarting" and e.status == 503
    s = StoreUnavailable("slow", bucket="b", key="k", code="SlowDown")
    assert str(s) == "s3://b/k: slow" and s.code == "SlowDown"
