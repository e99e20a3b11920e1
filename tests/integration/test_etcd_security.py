"""TLS with client certificates, and password auth, against real etcd."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from norm.adapters.etcd import Etcd, EtcdRejected, Event
from norm.core.config import EtcdConfig
from norm.core.secret import Secret
from sandbox.etcd import EtcdMember
from tests.plugins.etcd import Pki


async def test_tls_with_a_client_certificate_works(
        etcd_tls: EtcdMember, pki: Pki, etcd_config: Callable[..., EtcdConfig]) -> None:
    config = etcd_config(etcd_tls.endpoint, ca_file=str(pki.ca), cert_file=str(pki.client_cert),
                         key_file=str(pki.client_key))
    async with Etcd(config) as client:
        await client.put("/tls", b"ok")
        assert (await client.get("/tls")).value == b"ok"  # type: ignore[union-attr]


async def test_tls_by_host_name_checks_the_name(
        etcd_tls: EtcdMember, pki: Pki, etcd_config: Callable[..., EtcdConfig]) -> None:
    endpoint = etcd_tls.endpoint.replace("127.0.0.1", "localhost")
    config = etcd_config(endpoint, ca_file=str(pki.ca), cert_file=str(pki.client_cert),
                         key_file=str(pki.client_key))
    async with Etcd(config) as client:
        assert await client.check() > 0
    wrong_name = etcd_config(etcd_tls.endpoint, ca_file=str(pki.ca), cert_file=str(pki.client_cert),
                             key_file=str(pki.client_key), server_name="etcd.example.org")
    with pytest.raises(EtcdRejected, match="TLS"):
        async with Etcd(wrong_name):
            pass


@pytest.mark.parametrize("case", ["wrong ca", "client cert from another ca", "no client cert"])
async def test_a_wrong_certificate_or_ca_gives_a_clear_error(
        etcd_tls: EtcdMember, pki: Pki, etcd_config: Callable[..., EtcdConfig], case: str) -> None:
    files = {
        "wrong ca": (pki.other_ca, pki.client_cert, pki.client_key),
        "client cert from another ca": (pki.ca, pki.other_client_cert, pki.other_client_key),
        "no client cert": (pki.ca, None, None),
    }[case]
    ca, cert, key = files
    config = etcd_config(etcd_tls.endpoint, ca_file=str(ca), cert_file=cert and str(cert),
                         key_file=key and str(key))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(EtcdRejected) as info:
        async with Etcd(config):
            pass
    assert "TLS" in str(info.value) or "certificate" in str(info.value).lower()
    assert loop.time() - started < config.dial_timeout + config.request_timeout + 1


async def test_a_missing_certificate_file_is_named(
        etcd_tls: EtcdMember, pki: Pki, tmp_path: Path, etcd_config: Callable[..., EtcdConfig]) -> None:
    missing = tmp_path / "nope.pem"
    config = etcd_config(etcd_tls.endpoint, ca_file=str(missing), cert_file=str(pki.client_cert),
                         key_file=str(pki.client_key))
    with pytest.raises(EtcdRejected, match=r"etcd\.ca_file"):
        async with Etcd(config):
            pass


@pytest.fixture
def etcd_auth(etcd: EtcdMember) -> EtcdMember:
    etcd.ctl("user", "add", "root:rootpw")
    etcd.ctl("user", "add", "norm:s3cret-canary")
    etcd.ctl("role", "add", "norm")
    etcd.ctl("role", "grant-permission", "norm", "--prefix=true", "readwrite", "/")
    etcd.ctl("user", "grant-role", "norm", "norm")
    etcd.ctl("auth", "enable")
    return etcd


async def test_password_auth_works_and_survives_a_lost_token(
        etcd_auth: EtcdMember, etcd_config: Callable[..., EtcdConfig]) -> None:
    config = etcd_config(etcd_auth.endpoint, username="norm", password=Secret("s3cret-canary"))
    async with Etcd(config) as client:
        await client.put("/auth", b"1")
        async with client.watch("/auth") as w:
            await anext(w)
            # A restart forgets every simple token the server handed out.
            await asyncio.to_thread(etcd_auth.restart)
            await client.put("/auth", b"2")
            async with asyncio.timeout(20):
                item = await anext(w)
        assert (await client.get("/auth")).value == b"2"  # type: ignore[union-attr]
    assert isinstance(item, Event) and item.kv.value == b"2"


async def test_a_wrong_password_is_refused_without_showing_it(
        etcd_auth: EtcdMember, etcd_config: Callable[..., EtcdConfig]) -> None:
    config = etcd_config(etcd_auth.endpoint, username="norm", password=Secret("not-the-password"))
    with pytest.raises(EtcdRejected) as info:
        async with Etcd(config):
            pass
    assert "not-the-password" not in str(info.value)
    assert "norm" in str(info.value)
