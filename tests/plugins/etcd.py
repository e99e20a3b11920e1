"""Real etcd for the tests: a fresh single member per test, and a 3-member cluster."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from norm.core.config import EtcdConfig
from sandbox.etcd import EtcdCluster, EtcdMember, ServerTls


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


@pytest.fixture
def etcd_config() -> Callable[..., EtcdConfig]:
    """An adapter config for given endpoints, with short timeouts so faults are seen quickly."""

    def make(*endpoints: str, **overrides: object) -> EtcdConfig:
        values: dict[str, object] = {
            "endpoints": tuple(endpoints), "request_timeout": 2.0, "dial_timeout": 3.0,
            "keepalive_time": 5.0, "keepalive_timeout": 2.0, "lease_ttl": 5,
        }
        values.update(overrides)
        return EtcdConfig(**values)  # type: ignore[arg-type]

    return make


@dataclass(frozen=True)
class Pki:
    ca: Path
    ca_key: Path  # to sign more client certificates (users named by their CN)
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(path: Path, key: rsa.RSAPrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _cert(subject: str, key: rsa.RSAPrivateKey, issuer: tuple[x509.Certificate, rsa.RSAPrivateKey] | None,
          *, ca: bool = False, server: bool = False) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    if not ca:
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA with a server and a client certificate, and a second CA with its own client."""
    d = tmp_path_factory.mktemp("pki")

    def pem(path: Path, cert: x509.Certificate) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    ca_key, other_key = _key(), _key()
    ca = _cert("norm-test-ca", ca_key, None, ca=True)
    other = _cert("other-ca", other_key, None, ca=True)
    out: dict[str, Path] = {"ca": pem(d / "ca.pem", ca), "other_ca": pem(d / "other-ca.pem", other),
                            "ca_key": d / "ca.key"}
    _write_key(d / "ca.key", ca_key)
    for name, issuer, server in (("server", (ca, ca_key), True), ("client", (ca, ca_key), False),
                                 ("other_client", (other, other_key), False)):
        key = _key()
        _write_key(d / f"{name}.key", key)
        out[f"{name}_key"] = d / f"{name}.key"
        out[f"{name}_cert"] = pem(d / f"{name}.pem", _cert(name, key, issuer, server=server))
    return Pki(**out)


@pytest.fixture
def etcd_tls(tmp_path: Path, pki: Pki) -> Iterator[EtcdMember]:
    """A member that serves TLS and demands client certificates signed by the test CA."""
    member = EtcdMember("etcd-tls", tmp_path / "etcd-tls",
                        tls=ServerTls(ca=pki.ca, cert=pki.server_cert, key=pki.server_key))
    member.start()
    try:
        yield member
    finally:
        member.stop()
