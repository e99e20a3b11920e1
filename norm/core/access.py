"""Least-privilege access to etcd: which key ranges each of Norm's etcd roles gets, and the changes that
bring etcd's users and roles to that, as pure data.

Three kinds of role, by who writes what:

- `norm-operator` (shared by the operators' users): reads everything; writes the desired version and
  environment keys, the fleet's update policy (`<prefix>/policy`), the per-host control requests and
  the abort requests (`<prefix>/aborts/`).
- `norm-host-<machine-id>` (one per host, granted to that host's user): reads the desired keys, the
  fleet's update policy, the rollout header and the rollouts' records and participant lists
  (`<prefix>/rollouts/`); writes its
  own registration, unit summary and control keys, and its own reports (`<prefix>/reports/<mid>/`);
  and the migration claims (`<prefix>/claims/`); it puts its own notices (a unit quarantined) in the
  outbox, `<prefix>/outbox/<mid>/`, which it cannot read back.
- `norm-leader` (shared, granted in addition to the hosts that may lead): the leader key, the rollout
  header, the rollouts' records and participant lists, the ledger and the history; it reads the host
  registrations to choose a rollout's participants and the hosts' reports to follow a rollout, and
  deletes finished rollouts' claims and aborts; it writes its notices in the outbox
  (`<prefix>/outbox/rollouts/`) and reads, rewrites and deletes every notice there as it delivers
  them (`<prefix>/outbox/`).

etcd grants a role a single key or a key range [key, range_end); it has no patterns and no denials.
The key layout (norm.core.protocol) gives each writer a range of its own, so every grant is exactly
the keys or ranges its role needs, with one shared range: the claims. A step's claim is one key that
whichever host the leader makes the step's migrator creates, once (exactly-once rests on that single
key), so every host role writes `<prefix>/claims/`: a host's user could claim a step of a rollout,
which makes it no migrator (the leader names the migrator in the header, and only the migrator runs a
step) but keeps the step from running (it halts the rollout once its barrier times out).
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from norm.core.errors import InvalidValue
from norm.core.host import control_prefix, hosts_key, leader_key, parse_machine_id, units_key
from norm.core.notify import outbox_prefix, source_prefix
from norm.core.policy import policy_key
from norm.core.protocol import (
    aborts_prefix,
    claims_prefix,
    deploy_key,
    header_key,
    host_reports_prefix,
    reports_prefix,
    requests_prefix,
)

Kind = Literal["read", "write", "readwrite"]

OPERATOR_ROLE = "norm-operator"
LEADER_ROLE = "norm-leader"
HOST_ROLE_PREFIX = "norm-host-"


def host_role(machine_id: str) -> str:
    return f"{HOST_ROLE_PREFIX}{machine_id}"


def _b(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def prefix_end(prefix: str) -> str:
    """The end of the range holding every key that starts with `prefix` (etcd's `--prefix`)."""
    raw = bytearray(_b(prefix))
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return bytes(raw).decode("utf-8", "surrogateescape")
        raw.pop()
    return "\0"  # every key


@dataclass(frozen=True, order=True)
class Permission:
    """One grant: `key` alone (range_end ""), or the keys in [key, range_end)."""

    key: str
    range_end: str
    kind: Kind

    @classmethod
    def one(cls, key: str, kind: Kind) -> Permission:
        return cls(key, "", kind)

    @classmethod
    def under(cls, prefix: str, kind: Kind) -> Permission:
        return cls(prefix, prefix_end(prefix), kind)

    @property
    def span(self) -> tuple[str, str]:
        """What etcd knows a grant by (a second grant of the same span replaces its kind)."""
        return self.key, self.range_end

    @property
    def is_prefix(self) -> bool:
        return self.range_end != "" and self.range_end == prefix_end(self.key)

    def describe(self) -> str:
        if self.range_end == "":
            return self.key
        return f"{self.key}*" if self.is_prefix else f"[{self.key}, {self.range_end})"

    def etcdctl_args(self) -> list[str]:
        if self.range_end == "":
            return [self.kind, self.key]
        if self.is_prefix:
            return ["--prefix=true", self.kind, self.key]
        return [self.kind, self.key, self.range_end]

    def covers(self, key: str, kind: Literal["read", "write"]) -> bool:
        if self.kind not in ("readwrite", kind):
            return False
        if self.range_end == "":
            return key == self.key
        k = _b(key)
        return _b(self.key) <= k and (self.range_end == "\0" or k < _b(self.range_end))


@dataclass(frozen=True)
class Role:
    name: str
    permissions: frozenset[Permission]
    what: str  # one line: who holds it and what it can do

    def allows(self, key: str, kind: Literal["read", "write"]) -> bool:
        return any(p.covers(key, kind) for p in self.permissions)


@dataclass(frozen=True)
class Keys:
    """The keys the roles are made for (config.keys)."""

    version: str
    environment: str
    prefix: str


def operator_role(keys: Keys) -> Role:
    p = keys.prefix
    return Role(OPERATOR_ROLE, frozenset({
        Permission.one(keys.version, "readwrite"),
        Permission.one(keys.environment, "readwrite"),
        Permission.one(policy_key(p), "readwrite"),
        Permission.under(f"{p}/", "read"),
        Permission.under(f"{p}/control/", "readwrite"),
        Permission.under(aborts_prefix(p), "readwrite"),
        Permission.under(requests_prefix(p), "readwrite"),
        Permission.one(deploy_key(p), "readwrite"),
    }), "operators: read everything; write the desired version and environment, the update policy, control "
        "and abort requests, and pause, resume and promote requests")


def host_permissions(keys: Keys, machine_id: str) -> frozenset[Permission]:
    p = keys.prefix
    return frozenset({
        Permission.one(keys.version, "read"),
        Permission.one(keys.environment, "read"),
        Permission.one(policy_key(p), "read"),
        Permission.one(header_key(p), "read"),
        Permission.under(f"{p}/rollouts/", "read"),
        Permission.under(host_reports_prefix(p, machine_id), "readwrite"),
        # Shared: one key per step, created once by the step's migrator (see the module's note).
        Permission.under(claims_prefix(p), "readwrite"),
        Permission.one(hosts_key(p, machine_id), "readwrite"),
        Permission.one(units_key(p, machine_id), "readwrite"),
        Permission.under(control_prefix(p, machine_id), "readwrite"),
        # Its own notices, put once; the leader reads and deletes them as it delivers them.
        Permission.under(source_prefix(p, machine_id), "write"),
    })


def make_host_role(keys: Keys, machine_id: str) -> Role:
    return Role(host_role(machine_id), host_permissions(keys, machine_id),
                f"host {machine_id}: its registration, unit summary, control requests, rollout reports, "
                "migration claims and notices")


def leader_role(keys: Keys) -> Role:
    p = keys.prefix
    return Role(LEADER_ROLE, frozenset({
        Permission.one(leader_key(p), "readwrite"),
        Permission.one(header_key(p), "readwrite"),
        Permission.under(f"{p}/rollouts/", "readwrite"),
        Permission.under(f"{p}/ledger/", "readwrite"),
        Permission.under(f"{p}/history/", "readwrite"),
        Permission.under(hosts_key(p), "read"),
        Permission.under(reports_prefix(p), "read"),
        # Trimmed when a rollout ends: the claims, aborts and requests of the others.
        Permission.under(claims_prefix(p), "readwrite"),
        Permission.under(aborts_prefix(p), "readwrite"),
        Permission.under(requests_prefix(p), "readwrite"),
        Permission.one(deploy_key(p), "read"),
        # The notices of every writer: delivered, rewritten with the webhooks that took them, deleted.
        Permission.under(outbox_prefix(p), "readwrite"),
    }), "leader-eligible hosts: the leader key, the rollout header, records, ledger, history and the "
        "notifications' outbox")


# ---------------------------------------------------------------------------------------------------
# Who gets what


@dataclass(frozen=True)
class HostGrant:
    machine_id: str
    user: str
    leader: bool


@dataclass(frozen=True)
class User:
    name: str
    roles: frozenset[str]
    password_file: str | None = None  # None: no password (the user of a client certificate's CN)


@dataclass(frozen=True)
class Policy:
    roles: tuple[Role, ...]
    users: tuple[User, ...]


def default_host_user(machine_id: str) -> str:
    return host_role(machine_id)


def parse_host(text: str, where: str) -> tuple[str, str]:
    """`MACHINE_ID[=USER]`: the host and its etcd user (the CN of its client certificate)."""
    mid, sep, user = text.partition("=")
    machine_id = parse_machine_id(mid, where)
    if sep and not user.strip():
        raise InvalidValue(where, "the user after '=' is empty")
    return machine_id, user.strip() if sep else default_host_user(machine_id)


def parse_user(text: str, where: str) -> str:
    name = text.strip()
    if not name or any(c.isspace() for c in name) or ":" in name:
        raise InvalidValue(where, "a user name is not empty and has no spaces or ':'")
    return name


def policy(keys: Keys, operators: Sequence[str], hosts: Sequence[HostGrant],
           passwords: Mapping[str, str] | None = None) -> Policy:
    """The roles and users for these operators and hosts. `passwords`: user -> password file, for the
    users that authenticate with a password rather than a client certificate."""
    passwords = passwords or {}
    roles: list[Role] = []
    wanted: dict[str, set[str]] = {}
    if operators:
        roles.append(operator_role(keys))
    if any(h.leader for h in hosts):
        roles.append(leader_role(keys))
    seen_hosts: set[str] = set()
    for h in hosts:
        if h.machine_id in seen_hosts:
            raise InvalidValue(h.machine_id, "the host is named twice")
        seen_hosts.add(h.machine_id)
        roles.append(make_host_role(keys, h.machine_id))
        wanted.setdefault(h.user, set()).add(host_role(h.machine_id))
        if h.leader:
            wanted[h.user].add(LEADER_ROLE)
    for name in operators:
        wanted.setdefault(name, set()).add(OPERATOR_ROLE)
    for name in passwords:
        if name not in wanted:
            raise InvalidValue(name, "a password is given for a user that is neither an operator nor a host")
    users = tuple(User(n, frozenset(r), passwords.get(n)) for n, r in sorted(wanted.items()))
    return Policy(tuple(roles), users)


# ---------------------------------------------------------------------------------------------------
# From what etcd holds to the policy


@dataclass(frozen=True)
class Current:
    """What etcd holds of the policy's roles and users: a role's grants or None if it does not exist;
    a user's roles or None if it does not exist."""

    roles: Mapping[str, frozenset[Permission] | None]
    users: Mapping[str, frozenset[str] | None]


@dataclass(frozen=True)
class AddRole:
    role: str


@dataclass(frozen=True)
class Grant:
    role: str
    permission: Permission


@dataclass(frozen=True)
class Revoke:
    role: str
    permission: Permission


@dataclass(frozen=True)
class AddUser:
    user: str
    password_file: str | None


@dataclass(frozen=True)
class GrantRole:
    user: str
    role: str


@dataclass(frozen=True)
class RevokeRole:
    user: str
    role: str


Change = AddRole | Grant | Revoke | AddUser | GrantRole | RevokeRole


def _norm_role(name: str) -> bool:
    return name in (OPERATOR_ROLE, LEADER_ROLE) or name.startswith(HOST_ROLE_PREFIX)


def changes(wanted: Policy, current: Current) -> tuple[Change, ...]:
    """What makes etcd hold `wanted`, in an order etcd accepts: roles and their grants first, then the
    users and their roles. A role gets exactly its grants (others are revoked); a user keeps the roles
    that are not Norm's, and gets exactly the Norm roles the policy gives it. Existing passwords are
    left as they are."""
    out: list[Change] = []
    for role in wanted.roles:
        have = current.roles.get(role.name)
        if have is None:
            out.append(AddRole(role.name))
            have = frozenset()
        spans = {p.span for p in role.permissions}
        out += [Revoke(role.name, p) for p in sorted(have) if p.span not in spans]
        out += [Grant(role.name, p) for p in sorted(role.permissions) if p not in have]
    for user in wanted.users:
        held = current.users.get(user.name)
        if held is None:
            out.append(AddUser(user.name, user.password_file))
            held = frozenset()
        out += [RevokeRole(user.name, r) for r in sorted(held) if _norm_role(r) and r not in user.roles]
        out += [GrantRole(user.name, r) for r in sorted(user.roles) if r not in held]
    return tuple(out)


def etcdctl(change: Change) -> str:
    """The etcdctl command that makes the same change (passwords read from their file, never shown)."""
    q = shlex.quote
    match change:
        case AddRole(role):
            args = ["role", "add", role]
        case Grant(role, p):
            args = ["role", "grant-permission", role, *p.etcdctl_args()]
        case Revoke(role, p):
            args = ["role", "revoke-permission", role, p.key] + (
                ["--prefix=true"] if p.is_prefix else [] if p.range_end == "" else [p.range_end])
        case AddUser(user, None):
            args = ["user", "add", user, "--no-password"]
        case AddUser(user, password_file):
            assert password_file is not None
            return (f"etcdctl user add {q(user)} --interactive=false "
                    f"--new-user-password=\"$(head -n1 {q(password_file)})\"")
        case GrantRole(user, role):
            args = ["user", "grant-role", user, role]
        case RevokeRole(user, role):
            args = ["user", "revoke-role", user, role]
    return "etcdctl " + " ".join(q(a) for a in args)


def allowed(roles: Iterable[Role], key: str, kind: Literal["read", "write"]) -> bool:
    """Whether a user holding `roles` may read or write `key`."""
    return any(r.allows(key, kind) for r in roles)
