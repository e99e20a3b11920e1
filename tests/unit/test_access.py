"""The etcd roles of least-privilege access, and the changes that bring etcd to them."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from norm.core import access
from norm.core import protocol as proto
from norm.core.access import (
    LEADER_ROLE,
    OPERATOR_ROLE,
    AddRole,
    AddUser,
    Current,
    Grant,
    GrantRole,
    HostGrant,
    Keys,
    Permission,
    Revoke,
    RevokeRole,
    allowed,
    changes,
    host_role,
    policy,
)
from norm.core.errors import InvalidValue
from norm.core.host import control_prefix, hosts_key, leader_key, units_key
from norm.core.notify import outbox_key, outbox_prefix
from norm.core.policy import policy_key

KEYS = Keys("/djed-version", "/djed-environment", "/norm")
P = "/norm"
A, B = "a" * 32, "b" * 32
DIGEST = "sha256:" + "1" * 64


def roles_of(mid: str, leader: bool = False) -> list[access.Role]:
    roles = [access.make_host_role(KEYS, mid)]
    return [*roles, access.leader_role(KEYS)] if leader else roles


def test_prefix_end_is_etcds() -> None:
    assert access.prefix_end("/norm/") == "/norm0"
    assert access.prefix_end("a\udcff") == "b"  # a trailing 0xff byte is dropped, then incremented
    assert Permission.under("/norm/", "read") == Permission("/norm/", "/norm0", "read")


def test_a_host_writes_its_own_keys_and_not_another_hosts() -> None:
    mine, other = roles_of(B), A
    for key in (hosts_key(P, B), units_key(P, B), control_prefix(P, B) + "release/djed-web.service",
                proto.report_key(P, 9, "pulled", B), proto.migrated_key(P, 9, B, "migrate")):
        assert allowed(mine, key, "write"), key
    for key in (hosts_key(P, other), units_key(P, other), control_prefix(P, other) + "hold/x.service",
                proto.report_key(P, 9, "pulled", other), proto.migrated_key(P, 9, other, "migrate")):
        assert not allowed(mine, key, "write"), key
        assert not allowed(mine, key, "read"), key
    # The hosts' own keys are single keys, not prefixes: no host can claim a longer name.
    assert not allowed(mine, hosts_key(P, B) + "x", "write")


def test_an_ordinary_host_neither_leads_nor_writes_the_leaders_keys() -> None:
    ordinary = roles_of(B)
    for key in (proto.header_key(P), leader_key(P), proto.ledger_key(P, 9, "migrate"),
                proto.history_key(P, 9)):
        assert not allowed(ordinary, key, "write"), key
    assert allowed(ordinary, proto.header_key(P), "read")
    assert not allowed(ordinary, hosts_key(P, A), "read")
    leader = roles_of(A, leader=True)
    for key in (proto.header_key(P), leader_key(P), proto.ledger_key(P, 9, "migrate"),
                proto.history_key(P, 9), proto.record_key(P, 9), proto.hosts_list_key(P, 9),
                proto.claim_key(P, 9, "migrate"), proto.abort_key(P, 9)):
        assert allowed(leader, key, "write"), key
    assert allowed(leader, hosts_key(P, B), "read") and not allowed(leader, hosts_key(P, B), "write")
    # It follows every host's reports, and writes none but its own host's.
    assert allowed(leader, proto.report_key(P, 9, "pulled", B), "read")
    assert not allowed(leader, proto.report_key(P, 9, "pulled", B), "write")


def test_each_writer_has_a_range_of_its_own() -> None:
    """A host writes its own reports and the shared claims; it reads the rollouts' records and
    participant lists and writes none of them, nor an abort request; the operators write the aborts
    range and no rollout's keys."""
    host = roles_of(B)
    for key in (proto.record_key(P, 9), proto.hosts_list_key(P, 9), proto.abort_key(P, 9),
                proto.legacy_report_key(P, 9, "pulled", B), proto.report_key(P, 9, "pulled", A)):
        assert not allowed(host, key, "write"), key
    for key in (proto.record_key(P, 9), proto.hosts_list_key(P, 9), proto.report_key(P, 9, "started", B)):
        assert allowed(host, key, "read"), key
    assert allowed(host, proto.claim_key(P, 9, "migrate"), "write")
    # What a host deletes with each report: its own older reports, inside its own range.
    start, end = proto.older_reports(P, 9, B)
    assert allowed(host, start, "write") and allowed(host, proto.report_key(P, 8, "started", B), "write")
    assert start == proto.host_reports_prefix(P, B) and end == proto.rollout_reports_prefix(P, 9, B)
    ops = [access.operator_role(KEYS)]
    assert allowed(ops, proto.abort_key(P, 9), "write")
    assert allowed(ops, proto.request_key(P, 9, "pause"), "write")
    assert not allowed(host, proto.request_key(P, 9, "pause"), "write")
    for key in (proto.record_key(P, 9), proto.hosts_list_key(P, 9), proto.report_key(P, 9, "pulled", A),
                proto.claim_key(P, 9, "migrate")):
        assert not allowed(ops, key, "write"), key


def test_the_grants_per_role() -> None:
    """What `norm access` grants, as the operator guide lists it."""
    def grants(role: access.Role) -> set[str]:
        return {f"{p.kind} {p.describe()}" for p in role.permissions}

    assert grants(access.operator_role(KEYS)) == {
        "readwrite /djed-version", "readwrite /djed-environment", "readwrite /norm/policy", "read /norm/*",
        "readwrite /norm/control/*", "readwrite /norm/aborts/*", "readwrite /norm/requests/*",
        "readwrite /norm/deploy"}
    assert grants(access.make_host_role(KEYS, B)) == {
        "read /djed-version", "read /djed-environment", "read /norm/policy", "read /norm/rollout",
        "read /norm/rollouts/*",
        f"readwrite /norm/reports/{B}/*", "readwrite /norm/claims/*", f"readwrite /norm/hosts/{B}",
        f"readwrite /norm/units/{B}", f"readwrite /norm/control/{B}/*", f"write /norm/outbox/{B}/*"}
    assert grants(access.leader_role(KEYS)) == {
        "readwrite /norm/leader", "readwrite /norm/rollout", "readwrite /norm/rollouts/*",
        "readwrite /norm/ledger/*", "readwrite /norm/history/*", "read /norm/hosts/*", "read /norm/reports/*",
        "readwrite /norm/claims/*", "readwrite /norm/aborts/*", "readwrite /norm/requests/*",
        "read /norm/deploy", "readwrite /norm/outbox/*"}


def test_no_agent_writes_the_operators_keys_and_operators_read_everything() -> None:
    for roles in (roles_of(A, leader=True), roles_of(B)):
        assert allowed(roles, "/djed-version", "read")
        assert not allowed(roles, "/djed-version", "write")
        assert not allowed(roles, "/djed-environment", "write")
    ops = [access.operator_role(KEYS)]
    for key in ("/djed-version", "/djed-environment", control_prefix(P, A) + "hold/djed-web.service",
                proto.abort_key(P, 9)):
        assert allowed(ops, key, "write"), key
    for key in (hosts_key(P, A), units_key(P, A), leader_key(P), proto.history_key(P, 1), "/djed-version"):
        assert allowed(ops, key, "read"), key
    for key in (hosts_key(P, A), proto.header_key(P), leader_key(P), proto.ledger_key(P, 1, "m")):
        assert not allowed(ops, key, "write"), key


def test_the_policy_names_each_user_and_its_roles() -> None:
    p = policy(KEYS, ["alice"], [HostGrant(A, "web-1", True), HostGrant(B, "web-2", False)],
               {"alice": "/etc/alice.pw"})
    assert [r.name for r in p.roles] == [OPERATOR_ROLE, LEADER_ROLE, host_role(A), host_role(B)]
    users = {u.name: u for u in p.users}
    assert users["web-1"].roles == {host_role(A), LEADER_ROLE}
    assert users["web-2"].roles == {host_role(B)}
    assert users["alice"] == access.User("alice", frozenset({OPERATOR_ROLE}), "/etc/alice.pw")
    assert users["web-1"].password_file is None
    with pytest.raises(InvalidValue):
        policy(KEYS, [], [HostGrant(A, "x", False), HostGrant(A, "y", True)])
    with pytest.raises(InvalidValue):
        policy(KEYS, ["alice"], [], {"bob": "/x"})


def test_parse_host() -> None:
    assert access.parse_host(A, "--host") == (A, host_role(A))
    assert access.parse_host(f"{A}=web-1.internal", "--host") == (A, "web-1.internal")
    for bad in ("nope", f"{A}=", A.upper()):
        with pytest.raises(InvalidValue):
            access.parse_host(bad, "--host")


def test_changes_from_nothing_then_none() -> None:
    p = policy(KEYS, ["alice"], [HostGrant(B, "web-2", False)], {"alice": "/pw"})
    todo = changes(p, Current({}, {}))
    assert todo[0] == AddRole(OPERATOR_ROLE)
    assert AddUser("alice", "/pw") in todo and AddUser("web-2", None) in todo
    assert GrantRole("web-2", host_role(B)) in todo
    # Roles come before the users that are granted them.
    assert max(i for i, c in enumerate(todo) if isinstance(c, AddRole | Grant)) < \
        min(i for i, c in enumerate(todo) if isinstance(c, AddUser | GrantRole))
    assert changes(p, applied(p, Current({}, {}), todo)) == ()


def test_changes_revoke_only_what_norm_gave() -> None:
    p = policy(KEYS, [], [HostGrant(B, "web-2", False)])
    role = p.roles[0]
    stray = Permission.under("/norm/", "readwrite")
    widened = dataclasses.replace(next(iter(role.permissions)), kind="readwrite")
    current = Current({role.name: (role.permissions - {next(iter(role.permissions))}) | {stray, widened}},
                      {"web-2": frozenset({host_role(B), LEADER_ROLE, "someone-elses"})})
    todo = changes(p, current)
    assert Revoke(role.name, stray) in todo
    # A grant of the same span but another kind is replaced by granting again, not revoked.
    assert Revoke(role.name, widened) not in todo
    assert RevokeRole("web-2", LEADER_ROLE) in todo
    assert all(not (isinstance(c, RevokeRole) and c.role == "someone-elses") for c in todo)


def test_etcdctl_commands_show_no_password() -> None:
    assert access.etcdctl(AddUser("web 2", None)) == "etcdctl user add 'web 2' --no-password"
    cmd = access.etcdctl(AddUser("alice", "/etc/norm/alice pw"))
    assert cmd == ("etcdctl user add alice --interactive=false "
                   "--new-user-password=\"$(head -n1 '/etc/norm/alice pw')\"")
    assert access.etcdctl(Grant("r", Permission.under("/norm/", "read"))) == \
        "etcdctl role grant-permission r --prefix=true read /norm/"
    assert access.etcdctl(Grant("r", Permission.one("/djed-version", "readwrite"))) == \
        "etcdctl role grant-permission r readwrite /djed-version"
    assert access.etcdctl(Revoke("r", Permission.under("/norm/", "read"))) == \
        "etcdctl role revoke-permission r /norm/ --prefix=true"
    assert access.etcdctl(RevokeRole("u", "r")) == "etcdctl user revoke-role u r"


def applied(p: access.Policy, current: Current, todo: tuple[access.Change, ...]) -> Current:
    """What etcd holds after `todo` (as etcd does it: a grant of a span replaces that span's kind)."""
    roles = {k: set(v) if v is not None else None for k, v in current.roles.items()}
    users = {k: set(v) if v is not None else None for k, v in current.users.items()}
    for c in todo:
        match c:
            case AddRole(role):
                assert roles.get(role) is None
                roles[role] = set()
            case Grant(role, perm):
                held = roles[role]
                assert held is not None
                roles[role] = {q for q in held if q.span != perm.span} | {perm}
            case Revoke(role, perm):
                held = roles[role]
                assert held is not None and perm in held
                held.discard(perm)
            case AddUser(user, _):
                assert users.get(user) is None
                users[user] = set()
            case GrantRole(user, role):
                assert roles.get(role) is not None or role not in {r.name for r in p.roles}
                held_roles = users[user]
                assert held_roles is not None
                held_roles.add(role)
            case RevokeRole(user, role):
                held_roles = users[user]
                assert held_roles is not None
                held_roles.discard(role)
    return Current({k: None if v is None else frozenset(v) for k, v in roles.items()},
                   {k: None if v is None else frozenset(v) for k, v in users.items()})


MIDS = st.sampled_from(["a" * 32, "b" * 32, "c" * 32])
PERMS = st.builds(Permission, st.sampled_from(["/norm/", "/norm/rollout", "/djed-version", "/x"]),
                  st.sampled_from(["", "/norm0", "/y"]), st.sampled_from(["read", "write", "readwrite"]))


@given(hosts=st.lists(st.tuples(MIDS, st.booleans()), unique_by=lambda t: t[0]),
       operators=st.lists(st.sampled_from(["alice", "bob"]), unique=True),
       existing=st.dictionaries(st.sampled_from([OPERATOR_ROLE, LEADER_ROLE, host_role("a" * 32)]),
                                st.frozensets(PERMS, max_size=4)),
       users=st.dictionaries(st.sampled_from(["alice", "u-a", "u-b"]),
                             st.frozensets(st.sampled_from([OPERATOR_ROLE, LEADER_ROLE, "other",
                                                            host_role("a" * 32)]))))
def test_applying_the_changes_converges_in_one_step(hosts: list[tuple[str, bool]], operators: list[str],
                                                    existing: dict[str, frozenset[Permission]],
                                                    users: dict[str, frozenset[str]]) -> None:
    grants = [HostGrant(mid, f"u-{mid[0]}", leader) for mid, leader in hosts]
    p = policy(KEYS, operators, grants)
    # etcd keeps one grant per span.
    current = Current({k: frozenset({q.span: q for q in sorted(v)}.values()) for k, v in existing.items()},
                      dict(users))
    after = applied(p, current, changes(p, current))
    assert changes(p, after) == ()
    for role in p.roles:
        assert after.roles[role.name] == role.permissions
    for user in p.users:
        held = after.users[user.name]
        assert held is not None
        assert {r for r in held if r.startswith("norm-")} == user.roles


def test_operators_write_the_update_policy_and_hosts_only_read_it() -> None:
    key = policy_key(P)
    assert allowed([access.operator_role(KEYS)], key, "write")
    for roles in (roles_of(A, leader=True), roles_of(B)):
        assert allowed(roles, key, "read")
        assert not allowed(roles, key, "write")
    # A single key: no longer name beside it is granted.
    assert not allowed([access.operator_role(KEYS)], key + "x", "write")
    assert not allowed(roles_of(B), key + "/x", "read")


def test_hosts_put_their_own_notices_and_the_leader_delivers_every_one() -> None:
    """A host writes (puts) its own notices in the outbox and reads none back; the leader writes its
    own, and reads, rewrites and deletes every writer's as it delivers them."""
    mine, theirs = outbox_key(P, B, f"{B}-1-0"), outbox_key(P, A, f"{A}-1-0")
    leaders = outbox_key(P, "rollouts", "9-1-0")
    host = roles_of(B)
    assert allowed(host, mine, "write")
    for key in (mine, theirs, leaders):
        assert not allowed(host, key, "read"), key
    for key in (theirs, leaders, outbox_prefix(P) + "x"):
        assert not allowed(host, key, "write"), key
    leader = roles_of(A, leader=True)
    for key in (mine, theirs, leaders):
        assert allowed(leader, key, "read") and allowed(leader, key, "write"), key
    ops = [access.operator_role(KEYS)]
    assert allowed(ops, leaders, "read") and not allowed(ops, leaders, "write")
