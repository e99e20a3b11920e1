"""Least-privilege access against a real etcd with authentication on: `norm access apply` makes the
documented roles and users, idempotently; what each kind of user may not do is refused by etcd; and
the agents do their work (registration, leadership, healing, a whole update) with only these grants."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from norm.adapters.etcd import Compare, Delete, Etcd, EtcdRejected, Get, Put, Resync
from norm.app import cli
from norm.core import protocol as proto
from norm.core.config import EtcdConfig
from norm.core.host import HostRecord, control_prefix, hosts_key, leader_key, units_key
from norm.core.notify import Notice, OutboxEntry, outbox_key, outbox_prefix, quarantine_notice
from norm.core.policy import FleetPolicy, policy_key
from norm.core.record import Phase
from norm.core.secret import Secret
from norm.services.notifier import post_notices
from sandbox import app, updates
from sandbox.etcd import EtcdMember
from sandbox.fleet import Fleet
from sandbox.procs import wait_for
from sandbox.registry import Registry
from sandbox.systemd import SystemdManager
from tests.plugins.agent import AgentProc
from tests.plugins.etcd import Pki

T = TypeVar("T")
P = "/norm"
VERSION = "/djed-version"
ROOT_PW = "root-canary-pw"
A, B = "a" * 32, "b" * 32  # A may lead, B may not
OPS, HOST_A, HOST_B = "ops", "host-a", "host-b"
PASSWORDS = {OPS: "ops-canary-pw", HOST_A: "host-a-canary-pw", HOST_B: "host-b-canary-pw"}


@dataclass
class Secured:
    etcd: EtcdMember
    admin_conf: Path  # a `norm` config as etcd's root user
    dir: Path

    def config(self, user: str, **kw: object) -> EtcdConfig:
        values: dict[str, object] = {"endpoints": (self.etcd.endpoint,), "request_timeout": 2.0,
                                     "dial_timeout": 3.0, "lease_ttl": 5, "username": user,
                                     "password": Secret(PASSWORDS[user])}
        values.update(kw)
        return EtcdConfig(**values)  # type: ignore[arg-type]

    def access_args(self) -> list[str]:
        args = ["--operator", OPS, "--leader", f"{A}={HOST_A}", "--host", f"{B}={HOST_B}"]
        for user, password in PASSWORDS.items():
            path = self.dir / f"{user}.pw"
            path.write_text(password + "\n")
            args += ["--password-file", f"{user}={path}"]
        return args


def norm_access(capsys: pytest.CaptureFixture[str], conf: Path, action: str,
                *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(["access", action, "--config", str(conf), *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


# What each user proves it can read on connecting (as the agent does with its control keys).
PROBES = {HOST_A: control_prefix(P, A), HOST_B: control_prefix(P, B), "web-1.internal": control_prefix(P, A),
          "web-2.internal": control_prefix(P, B)}


def as_user(config: EtcdConfig, go: Callable[[Etcd], Awaitable[T]]) -> T:
    user = config.username or Path(config.cert_file or "").stem

    async def run() -> T:
        async with Etcd(config, probe_key=PROBES.get(user, P + "/")) as etcd:
            return await go(etcd)

    return asyncio.run(run())


def refused(config: EtcdConfig, go: Callable[[Etcd], Awaitable[object]]) -> str:
    with pytest.raises(EtcdRejected, match="permission denied") as info:
        as_user(config, go)
    return str(info.value)


def root_on(etcd: EtcdMember, tmp: Path, **etcd_toml: str) -> Path:
    """Make etcd's root user, turn authentication on, and write a `norm` config that is root."""
    etcd.ctl("user", "add", f"root:{ROOT_PW}")
    etcd.ctl("auth", "enable")
    (tmp / "root.pw").write_text(ROOT_PW + "\n")
    conf = tmp / "admin.toml"
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in etcd_toml.items())
    conf.write_text(f'[etcd]\nendpoints = ["{etcd.endpoint}"]\nrequest_timeout = 2.0\ndial_timeout = 3.0\n'
                    f'username = "root"\npassword_file = "{tmp / "root.pw"}"\n{extra}')
    return conf


@pytest.fixture
def secured(etcd: EtcdMember, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Secured:
    s = Secured(etcd, root_on(etcd, tmp_path), tmp_path)
    code, _, err = norm_access(capsys, s.admin_conf, "apply", *s.access_args())
    assert code == 0, err
    return s


# ---------------------------------------------------------------------------------------------------
# The verb


def test_apply_makes_the_documented_roles_and_a_second_run_changes_nothing(
        etcd: EtcdMember, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = Secured(etcd, root_on(etcd, tmp_path), tmp_path)
    code, planned, err = norm_access(capsys, s.admin_conf, "plan", *s.access_args())
    assert code == 0, err
    assert "etcdctl role add norm-operator" in planned
    assert f"etcdctl user add {HOST_B} --interactive=false" in planned
    assert all(pw not in planned for pw in PASSWORDS.values())
    assert etcd.ctl("role", "list", user=f"root:{ROOT_PW}").split() == ["root"]  # the plan changed nothing

    code, applied, err = norm_access(capsys, s.admin_conf, "apply", *s.access_args())
    assert code == 0, err
    assert applied == planned.replace("changes to make", "changes applied")
    roles = etcd.ctl("role", "list", user=f"root:{ROOT_PW}").split()
    assert {"norm-operator", "norm-leader", f"norm-host-{A}", f"norm-host-{B}"} <= set(roles)
    assert etcd.ctl("user", "get", HOST_A, user=f"root:{ROOT_PW}").split()[-2:] == ["norm-host-" + A,
                                                                                    "norm-leader"]
    host_b = etcd.ctl("role", "get", f"norm-host-{B}", user=f"root:{ROOT_PW}")
    assert f"{P}/hosts/{B}" in host_b and f"{P}/hosts/{A}" not in host_b

    for action in ("plan", "apply"):
        code, out, _ = norm_access(capsys, s.admin_conf, action, *s.access_args())
        assert (code, out) == (0, "# nothing to change\n")

    # B becomes leader-eligible, A no longer: only those grants change.
    args = ["--operator", OPS, "--host", f"{A}={HOST_A}", "--leader", f"{B}={HOST_B}"]
    code, out, _ = norm_access(capsys, s.admin_conf, "apply", *args)
    assert code == 0
    assert out.splitlines() == [f"etcdctl user revoke-role {HOST_A} norm-leader",
                                f"etcdctl user grant-role {HOST_B} norm-leader", "# 2 changes applied"]


def test_apply_as_a_user_without_the_root_role_is_refused(
        secured: Secured, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "ops.toml"
    conf.write_text(f'[etcd]\nendpoints = ["{secured.etcd.endpoint}"]\nusername = "{OPS}"\n'
                    f'password = "{PASSWORDS[OPS]}"\n')
    code, _, err = norm_access(capsys, conf, "apply", "--host", "c" * 32)
    assert code == 1
    assert "permission denied" in err and PASSWORDS[OPS] not in err


def test_bad_arguments_change_nothing(secured: Secured, capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["--host", "not-a-machine-id"], [], ["--operator", "a b"],
                 ["--operator", "x", "--password-file", "x=/nonexistent/file"]):
        code, out, err = norm_access(capsys, secured.admin_conf, "apply", *args)
        assert code == 2 and out == "", (args, err)


# ---------------------------------------------------------------------------------------------------
# What each kind of user may not do


def test_a_host_cannot_write_another_hosts_keys(secured: Secured) -> None:
    b = secured.config(HOST_B)
    for key in (hosts_key(P, A), units_key(P, A), control_prefix(P, A) + "release/djed-web.service"):
        refused(b, lambda etcd, key=key: etcd.put(key, b"{}"))  # type: ignore[misc]
    refused(b, lambda etcd: etcd.delete(hosts_key(P, A)))
    # A's user, with the leader's role too, cannot either.
    refused(secured.config(HOST_A), lambda etcd: etcd.put(hosts_key(P, B), b"{}"))


def test_a_host_cannot_write_another_hosts_reports_nor_a_rollouts_keys(secured: Secured) -> None:
    """Each host's reports are a range of its own: no host writes (nor deletes, nor reads) another's;
    the rollouts' records and participant lists are the leader's, the abort requests the operators'."""
    b = secured.config(HOST_B)
    for key in (proto.report_key(P, 7, "pulled", A), proto.migrated_key(P, 7, A, "migrate"),
                proto.record_key(P, 7), proto.hosts_list_key(P, 7), proto.abort_key(P, 7),
                proto.legacy_report_key(P, 7, "pulled", B)):
        refused(b, lambda etcd, key=key: etcd.put(key, b"{}"))  # type: ignore[misc]
    refused(b, lambda etcd: etcd.get(proto.report_key(P, 7, "pulled", A)))
    refused(b, lambda etcd: etcd.delete(proto.host_reports_prefix(P, A), prefix=True))
    refused(b, lambda etcd: etcd.delete(f"{P}/rollouts/", prefix=True))
    # Its own trim is no way into A's range: a range that reaches beyond its own is refused whole.
    _, end = proto.older_reports(P, 7, B)
    refused(b, lambda etcd: etcd.txn([], [Put(proto.report_key(P, 7, "pulled", B), b"{}"),
                                          Delete(proto.reports_prefix(P), range_end=end)]))
    # Even a host that may lead writes no other host's reports (it reads them, to follow a rollout).
    a = secured.config(HOST_A)
    refused(a, lambda etcd: etcd.put(proto.report_key(P, 7, "pulled", B), b"{}"))
    refused(a, lambda etcd: etcd.delete(proto.host_reports_prefix(P, B), prefix=True))
    as_user(a, lambda etcd: etcd.get_prefix(proto.reports_prefix(P)))
    # The operators write the abort requests, and none of the rollouts' own keys nor any report.
    ops = secured.config(OPS)
    as_user(ops, lambda etcd: etcd.put(proto.abort_key(P, 7), proto.abort_request("alice")))
    for key in (proto.record_key(P, 7), proto.report_key(P, 7, "pulled", A), proto.claim_key(P, 7, "m")):
        refused(ops, lambda etcd, key=key: etcd.put(key, b"{}"))  # type: ignore[misc]


def test_an_ordinary_host_cannot_write_the_header_nor_lead(secured: Secured) -> None:
    b = secured.config(HOST_B)
    refused(b, lambda etcd: etcd.put(proto.header_key(P), b"{}"))
    refused(b, lambda etcd: etcd.put(proto.ledger_key(P, 7, "migrate"), b"{}"))
    refused(b, lambda etcd: etcd.put(proto.history_key(P, 7), b"{}"))

    async def campaign(etcd: Etcd) -> None:
        async with etcd.lease() as lease:
            await etcd.election(leader_key(P), B.encode()).campaign(lease)

    refused(b, campaign)
    # It cannot list who else is registered either (only the leader needs to).
    refused(b, lambda etcd: etcd.get_prefix(hosts_key(P)))


def test_agents_cannot_write_the_operators_keys(secured: Secured) -> None:
    for user in (HOST_A, HOST_B):
        config = secured.config(user)
        refused(config, lambda etcd: etcd.put(VERSION, b"v2"))
        refused(config, lambda etcd: etcd.put("/djed-environment", b"prod"))
        refused(config, lambda etcd: etcd.put(policy_key(P), FleetPolicy().encode()))
        refused(config, lambda etcd: etcd.delete(policy_key(P)))
    # The operator can, and reads everything, but writes no host's registration nor the header.
    ops = secured.config(OPS)
    as_user(ops, lambda etcd: etcd.put(VERSION, b"v2"))
    as_user(ops, lambda etcd: etcd.put(policy_key(P), FleetPolicy().encode()))
    as_user(ops, lambda etcd: etcd.get_prefix(P + "/"))
    refused(ops, lambda etcd: etcd.put(hosts_key(P, A), b"{}"))
    refused(ops, lambda etcd: etcd.put(proto.header_key(P), b"{}"))


def test_the_operators_commands_work_as_the_operator_and_not_as_a_host(
        secured: Secured, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def conf(user: str) -> Path:
        path = tmp_path / f"{user}.toml"
        path.write_text(f'[etcd]\nendpoints = ["{secured.etcd.endpoint}"]\nrequest_timeout = 2.0\n'
                        f'username = "{user}"\npassword = "{PASSWORDS[user]}"\n')
        return path

    def norm(user: str, *args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        at = 2 if args[0] == "policy" else 1  # after the command (and its action)
        code = cli.main([*args[:at], "--config", str(conf(user)), *args[at:]])
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return code, out, err

    code, out, err = norm(OPS, "deploy", "v2")
    assert code == 0, err
    # A leader (played here by A's user) has begun the rollout: the operator follows and aborts it.
    header = proto.Header(revision=int(out.split("rollout ")[1].rstrip(")\n")), tag="v2", phase=Phase.PULL,
                        digest="sha256:" + "2" * 64)
    as_user(secured.config(HOST_A), lambda etcd: etcd.put(proto.header_key(P), header.encode()))
    for command in (["status"], ["hosts"], ["history"], ["rollout", "--once"]):
        code, _, err = norm(OPS, *command)
        assert code in (0, 5), (command, err)  # 5: `rollout --once` while it runs
    code, out, err = norm(OPS, "abort", "--by", "alice")
    assert (code, out) == (0, f"abort requested for rollout {header.revision}\n"), err
    # The fleet's update policy too: written by the operator, shown to the operator.
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text('max_unavailable = "50%"\n')
    code, out, err = norm(OPS, "policy", "apply", str(policy_file))
    assert code == 0 and out.splitlines()[-1].startswith("written: fleet policy revision"), err
    code, out, err = norm(OPS, "policy", "show")
    assert code == 0 and 'max_unavailable = "50%"' in out.splitlines(), err
    # The abort requests, the desired version and the policy are the operators' alone.
    for user in (HOST_A, HOST_B):
        code, _, err = norm(user, "deploy", "v3")
        assert code == 1 and "permission denied" in err, err
        code, _, err = norm(user, "policy", "apply", str(policy_file))
        assert code == 1 and "permission denied" in err, err
        code, _, err = norm(user, "abort", "--by", "mallory")
        assert code == 1 and "permission denied" in err, err


def test_a_host_does_its_own_work_with_its_grants(secured: Secured) -> None:
    """Everything a host's agent does in etcd, done as its user: no refusal."""

    async def host_work(etcd: Etcd) -> None:
        assert (await etcd.get_one(VERSION)).kvs == ()
        await etcd.get(proto.header_key(P))
        # The fleet's update policy, followed as the policy watcher does.
        async with etcd.watch(policy_key(P)) as w:
            await anext(w)
        async with etcd.lease() as lease:
            await etcd.put(hosts_key(P, B), HostRecord(B, "b", "test", "web", "0").encode(), lease=lease.id)
            await etcd.put(units_key(P, B), b"[]", lease=lease.id)
            await etcd.put(control_prefix(P, B) + "release/djed-web.service", b"{}")
            await etcd.delete(control_prefix(P, B) + "release/djed-web.service")
            # A report, fenced on the header, deleting its reports of older rollouts (as the executor).
            start, end = proto.older_reports(P, 7, B)
            report = Put(proto.report_key(P, 7, "pulled", B), proto.pulled_ok("sha256:" + "1" * 64))
            result = await etcd.txn([Compare(proto.header_key(P), "mod", "==", 0)],
                                    [report, Delete(start, range_end=end)], [Get(proto.header_key(P))])
            assert result.succeeded
            # Reading back its reports of a rollout, its earlier version's, and the participants.
            await etcd.txn([], [Get(proto.hosts_list_key(P, 7)),
                                Get(proto.rollout_reports_prefix(P, 7, B), prefix=True),
                                Get(proto.legacy_report_key(P, 7, "pulled", B)),
                                Get(proto.rollout_prefix(P, 7) + "migrated/", prefix=True)])
            # Claiming a step (the shared claims range), fenced on the header as the migrator does.
            claim = proto.claim_key(P, 7, "migrate")
            legacy = proto.legacy_report_key(P, 7, "claim", "migrate")
            result = await etcd.txn([Compare(proto.header_key(P), "mod", "==", 0),
                                     Compare(claim, "version", "==", 0), Compare(legacy, "version", "==", 0)],
                                    [Put(claim, proto.claim(B))], [Get(claim), Get(legacy)])
            assert result.succeeded
            async with etcd.watch(control_prefix(P, B), prefix=True) as w:
                await anext(w)
        # The lease's keys went with it: the revoke was allowed.
        assert await etcd.get(hosts_key(P, B)) is None

    as_user(secured.config(HOST_B), host_work)


def test_a_leader_eligible_host_leads_with_its_grants(secured: Secured) -> None:
    async def lead(etcd: Etcd) -> None:
        async with etcd.lease() as lease:
            election = etcd.election(leader_key(P), A.encode())
            leadership = await election.campaign(lease)
            await election.fenced(leadership, [Put(proto.header_key(P), b"{}"),
                                               Put(proto.record_key(P, 7), b"{}"),
                                               Put(proto.ledger_key(P, 7, "migrate"), b"{}"),
                                               Put(proto.history_key(P, 7), b"{}")])
            await etcd.get_prefix(hosts_key(P))
            # Following a rollout's reports: every host's, the abort request, the previous layout's.
            for key, prefix in ((proto.reports_prefix(P), True), (proto.abort_key(P, 7), False),
                                (proto.rollout_prefix(P, 7), True)):
                async with etcd.watch(key, prefix=prefix) as w:
                    await anext(w)
            # The trim at a rollout's end: older rollouts' keys, claims and aborts.
            await election.fenced(leadership, [Delete(f"{P}/rollouts/6/", prefix=True),
                                               *(Delete(start, range_end=end)
                                                 for start, end in proto.stale_ranges(P, 7))])
            await election.fenced(leadership, [])
            await election.resign(leadership)
        assert await etcd.get(leader_key(P)) is None

    as_user(secured.config(HOST_A), lead)


# ---------------------------------------------------------------------------------------------------
# Users from client certificates' common names


def _client_cert(pki: Pki, cn: str, d: Path) -> tuple[Path, Path]:
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), None)
    ca = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    cert_path, key_path = d / f"{cn}.pem", d / f"{cn}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def test_users_from_client_certificate_names(
        etcd_tls: EtcdMember, pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = root_on(etcd_tls, tmp_path, ca_file=str(pki.ca), cert_file=str(pki.client_cert),
                   key_file=str(pki.client_key))
    code, out, err = norm_access(capsys, conf, "apply", "--operator", "alice",
                                 "--leader", f"{A}=web-1.internal", "--host", f"{B}=web-2.internal")
    assert code == 0, err
    assert "etcdctl user add web-2.internal --no-password" in out

    def tls(cn: str) -> EtcdConfig:
        cert, key = _client_cert(pki, cn, tmp_path)
        return EtcdConfig(endpoints=(etcd_tls.endpoint,), ca_file=str(pki.ca), cert_file=str(cert),
                          key_file=str(key), request_timeout=2.0, dial_timeout=3.0)

    web2 = tls("web-2.internal")
    as_user(web2, lambda etcd: etcd.put(hosts_key(P, B), b"{}"))
    refused(web2, lambda etcd: etcd.put(hosts_key(P, A), b"{}"))
    refused(web2, lambda etcd: etcd.put(proto.header_key(P), b"{}"))
    refused(web2, lambda etcd: etcd.put(VERSION, b"v2"))
    as_user(tls("web-1.internal"), lambda etcd: etcd.put(proto.header_key(P), b"{}"))
    as_user(tls("alice"), lambda etcd: etcd.put(VERSION, b"v2"))
    # A certificate whose name is no user reads nothing.
    refused(tls("mallory"), lambda etcd: etcd.get(VERSION))


# ---------------------------------------------------------------------------------------------------
# Real agents with only these grants

SLEEPER = "[Unit]\nStartLimitIntervalSec=0\n[Service]\nExecStart=/bin/sleep infinity\n"
FAST_HEALING = "[healing]\nbackoff_initial = 0.05\nbackoff_max = 0.1\n"


def agent_env(user: str, leader: bool = True) -> dict[str, str]:
    env = {"NORM_ETCD__USERNAME": user, "NORM_ETCD__PASSWORD": PASSWORDS[user]}
    return env if leader else {**env, "NORM_AGENT__LEADER_ELIGIBLE": "false"}


def events(agent: AgentProc) -> list[dict[str, object]]:
    return [json.loads(line) for line in agent.logs().splitlines() if line.startswith("{")]


def test_agents_register_lead_and_heal_with_only_their_grants(
        secured: Secured, systemd_managers: Callable[[int], list[SystemdManager]],
        agents: Callable[..., AgentProc]) -> None:
    managers = systemd_managers(2)
    for m in managers:
        m.write_unit("djed-web.service", SLEEPER)
        m.systemctl("start", "djed-web.service")
    endpoint = [secured.etcd.endpoint]
    a = agents(endpoint, machine_id=A, systemd_bus=managers[0].bus_address, extra_toml=FAST_HEALING,
               env=agent_env(HOST_A), updates=True)
    b = agents(endpoint, machine_id=B, systemd_bus=managers[1].bus_address, extra_toml=FAST_HEALING,
               env=agent_env(HOST_B, leader=False))
    a.wait_notify("READY=1")
    b.wait_notify("READY=1")
    ops = secured.config(OPS)

    def get(key: str) -> bytes | None:
        async def go(etcd: Etcd) -> bytes | None:
            kv = await etcd.get(key)
            return None if kv is None else kv.value

        return as_user(ops, go)

    wait_for(lambda: get(leader_key(P)) == A.encode(), timeout=20, what="A leads")
    assert get(hosts_key(P, A)) is not None and get(hosts_key(P, B)) is not None
    wait_for(lambda: get(units_key(P, B)) is not None, timeout=20, what="B's unit summary")

    # B heals its unit, and carries out an operator's hold and its release.
    pid = int(managers[1].unit_property("djed-web.service", "MainPID"))
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: int(managers[1].unit_property("djed-web.service", "MainPID")) not in (0, pid),
             timeout=20, what="djed-web healed on B")
    hold = control_prefix(P, B) + "hold/djed-web.service"
    as_user(ops, lambda etcd: etcd.put(hold, b"{}"))
    wait_for(lambda: managers[1].unit_property("djed-web.service", "ActiveState") == "inactive",
             timeout=20, what="djed-web held on B")
    as_user(ops, lambda etcd: etcd.delete(hold))
    wait_for(lambda: managers[1].unit_property("djed-web.service", "ActiveState") == "active",
             timeout=20, what="djed-web started again on B")

    # On the host, with the host's own user, the operator's host commands work.
    def norm_on_b(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "norm", *args, "--config", str(b.config_path)],
                              env=dict(os.environ, **agent_env(HOST_B, leader=False)), capture_output=True,
                              text=True, timeout=60, check=False)

    r = norm_on_b("units")
    assert r.returncode == 0 and "djed-web.service" in r.stdout, r.stderr
    r = norm_on_b("heal", "release", "djed-web.service")
    assert r.returncode == 0, r.stderr

    # A stops: its record and the leader key go; B, not eligible, does not campaign.
    assert a.proc is not None
    a.proc.signal(signal.SIGTERM)
    assert a.wait_exit(timeout=15) == 0
    wait_for(lambda: get(leader_key(P)) is None, timeout=10, what="the leader key gone")
    assert get(hosts_key(P, B)) is not None
    for agent in (a, b):
        seen = {e["event"] for e in events(agent)}
        assert not seen & {"agent.etcd_refused", "leader.campaign_failed", "host.register_failed",
                            "host.update_failed", "control.ack_failed"}, (agent.name, seen)
    assert "leader.not_eligible" in {e["event"] for e in events(b)}
    assert all(pw not in a.logs() + b.logs() for pw in PASSWORDS.values())


FLEET_ENV = {"NORM_ETCD__LEASE_TTL": "4", "NORM_ETCD__REQUEST_TIMEOUT": "2",
             "NORM_UPDATE__PULL_TIMEOUT": "60", "NORM_UPDATE__STOP_TIMEOUT": "30",
             "NORM_UPDATE__START_TIMEOUT": "60", "NORM_UPDATE__MIGRATION_TIMEOUT": "60",
             "NORM_LOG__LEVEL": "debug"}


@pytest.fixture
def restricted_fleet(tmp_path: Path, registry: Registry, capsys: pytest.CaptureFixture[str],
                     monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    """Three hosts with their own systemd manager and Docker engine, on an etcd with authentication
    on; host1 and host2 may lead, host3 may not; every agent runs as its own user, with only the roles
    `norm access apply` gave it, and the operator's etcdctl runs as the operator."""
    (tmp_path / "steps.env").write_text("")
    fleet = Fleet(tmp_path / "fleet", size=3, etcd_size=1, agents=False, image=f"{registry.address}/djed/app",
                  agent_env=dict(FLEET_ENV, NORM_UPDATE__STEPS_ENV_FILE=str(tmp_path / "steps.env")))
    try:
        fleet.up()
        state = fleet.load_state()
        assert state is not None
        app.install_app(state)
        fleet.etcdctl("user", "add", f"root:{ROOT_PW}")
        fleet.etcdctl("auth", "enable")
        (tmp_path / "root.pw").write_text(ROOT_PW + "\n")
        admin = tmp_path / "admin.toml"
        admin.write_text(f'[etcd]\nendpoints = {json.dumps(state["endpoints"])}\nusername = "root"\n'
                         f'password_file = "{tmp_path / "root.pw"}"\n')
        passwords = {OPS: PASSWORDS[OPS]} | {f"web-{i}": f"web-{i}-canary-pw" for i in (1, 2, 3)}
        args = ["--operator", OPS]
        for i, h in enumerate(state["hosts"], start=1):
            args += ["--leader" if i < 3 else "--host", f"{h['machine_id']}=web-{i}"]
        for user, password in passwords.items():
            (tmp_path / f"{user}.pw").write_text(password + "\n")
            args += ["--password-file", f"{user}={tmp_path / f'{user}.pw'}"]
        code, _, err = norm_access(capsys, admin, "apply", *args)
        assert code == 0, err
        monkeypatch.setenv("ETCDCTL_USER", f"{OPS}:{PASSWORDS[OPS]}")
        for i, h in enumerate(state["hosts"], start=1):
            conf = Path(h["config"])
            pw_file = tmp_path / f"web-{i}.pw"
            text = conf.read_text().replace(
                "[etcd]\n", f'[etcd]\nusername = "web-{i}"\npassword_file = "{pw_file}"\n', 1)
            assert f'username = "web-{i}"' in text
            if i == 3:  # one host that may not lead
                text = text.replace("[agent]\n", "[agent]\nleader_eligible = false\n", 1) \
                    if "[agent]\n" in text else text + "\n[agent]\nleader_eligible = false\n"
            conf.write_text(text)
            fleet.restart_agent(h["name"])
        fleet.wait_registered(timeout=60)
        yield fleet
    finally:
        fleet.down()


def test_a_whole_update_and_a_leader_failover_with_only_these_grants(
        restricted_fleet: Fleet, demo_app: Callable[..., str]) -> None:
    fleet = restricted_fleet
    state = fleet.load_state()
    assert state is not None
    hosts = state["hosts"]
    names = {h["machine_id"]: h["name"] for h in hosts}
    ports = app.install_app(state)  # the ports saved when the units were installed
    record_log = fleet.data_dir / "record.log"

    def leader() -> str | None:
        kvs = updates.get_kvs(fleet, f"{P}/leader")
        return names[kvs[0]["value"].decode()] if kvs else None

    def deploy(tag: str) -> None:
        demo_app(tag)
        h = updates.deploy(fleet, tag, timeout=180)
        assert h["phase"] == "done", h
        wait_for(lambda: all((app.fetch(web), app.fetch(api)) == (tag, tag) for web, api in ports.values()),
                 timeout=60, what=f"every host serving {tag}")
        steps = [ln.split()[1] for ln in record_log.read_text().splitlines() if ln.split()[0] == tag]
        assert steps == ["migrate", "collectstatic"]

    deploy("rbac1")
    first = leader()
    assert first in ("host1", "host2")
    deploy("rbac2")

    # The leader dies: the other leader-eligible host takes over (host3 may not) and leads the next.
    fleet.kill_agent(first)
    other = "host2" if first == "host1" else "host1"
    wait_for(lambda: leader() == other, timeout=30, what=f"{other} leading")
    fleet.restart_agent(first)
    fleet.wait_registered(timeout=60)
    deploy("rbac3")

    for h in hosts:
        log = Path(h["dir"], "agent.log").read_text()
        assert "permission denied" not in log, h["name"]
        assert "canary-pw" not in log
    host3 = Path(hosts[2]["dir"], "agent.log").read_text()
    assert "leader.not_eligible" in host3 and "leader.elected" not in host3


def test_notices_a_host_puts_and_the_leader_delivers(secured: Secured) -> None:
    """A host puts its own notices in the outbox, and reads none back nor writes another's; the leader's
    role reads every one, rewrites and deletes them (fenced, as the notifier does)."""
    b = secured.config(HOST_B)
    mine = quarantine_notice(B, "djed-web.service", "failed 5 times", 1.0)
    as_user(b, lambda etcd: post_notices(etcd, P, B, [mine]))
    theirs = quarantine_notice(A, "djed-web.service", None, 1.0)
    refused(b, lambda etcd: post_notices(etcd, P, A, [theirs]))
    refused(b, lambda etcd: etcd.put(outbox_key(P, "rollouts", "7-1-0"), b"{}"))
    refused(b, lambda etcd: etcd.get(outbox_key(P, B, mine.id)))
    refused(b, lambda etcd: etcd.get_prefix(outbox_prefix(P)))
    started = Notice("7-1-0", "rollout_started", "info", 1.0, rollout=7, tag="v2", phase="resolve")

    async def deliver(etcd: Etcd) -> None:
        await post_notices(etcd, P, "rollouts", [started])
        async with etcd.watch(outbox_prefix(P), prefix=True) as w:
            first = await anext(w)
        assert isinstance(first, Resync)
        keys = {kv.key: kv for kv in first.snapshot.kvs}
        assert set(keys) == {outbox_key(P, B, mine.id), outbox_key(P, "rollouts", started.id)}
        kv = keys[outbox_key(P, B, mine.id)]
        fence = Compare(leader_key(P), "create", "==", 0)  # no leader in this test: the fence's read
        result = await etcd.txn([fence, Compare(kv.key, "mod", "==", kv.mod_revision)],
                                [Put(kv.key, OutboxEntry(mine, ("ops",)).encode())], [Get(leader_key(P))])
        assert result.succeeded
        result = await etcd.txn([fence], [Delete(kv.key), Delete(outbox_key(P, "rollouts", started.id))])
        assert result.succeeded

    as_user(secured.config(HOST_A), deliver)
    assert as_user(secured.config(OPS), lambda etcd: etcd.get_prefix(outbox_prefix(P))).kvs == ()
    refused(secured.config(OPS), lambda etcd: etcd.put(outbox_key(P, "rollouts", "7-2-0"), b"{}"))
