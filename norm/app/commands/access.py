"""`norm access plan|apply`: least-privilege etcd users and roles for operators and hosts."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from norm.app import cli
from norm.app.views import EXIT_OK
from norm.core import access
from norm.core.errors import InvalidValue
from norm.core.secret import Secret

if TYPE_CHECKING:
    from norm.adapters.etcd import Etcd

ACCESS_DESCRIPTION = """\
Roles, by who writes what (see the operator guide, "Least-privilege access"):
  norm-operator            read everything; write the desired version and environment, the
                           update policy, control requests and abort requests
  norm-host-<machine-id>   one per host: read the desired keys, the update policy and the
                           rollouts; write its own
                           registration, unit summary, control keys, and rollout reports
  norm-leader              leader-eligible hosts: the leader key, the rollout header, records,
                           ledger and history; read the host registrations
"""

ACCESS_EPILOG = """\
exit status:
  0  planned, or applied (or nothing to change)
  1  etcd refused a change (apply needs a user with etcd's root role)
  2  an argument is not acceptable: nothing was changed
  4  etcd could not be reached
"""


def register(sub: cli.Subparsers) -> None:
    parent = sub.add_parser("access", help="least-privilege etcd users and roles for operators and hosts")
    asub = parent.add_subparsers(dest="access_command", required=True, metavar="ACTION")
    for action, text in (("plan", "print the etcdctl commands that would bring etcd to the roles and "
                                  "users named (nothing is changed)"),
                         ("apply", "make those changes in etcd (as a user with etcd's root role); "
                                   "running it again changes nothing")):
        a = asub.add_parser(action, help=text, description=ACCESS_DESCRIPTION, epilog=ACCESS_EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        cli.config_args(a)
        a.add_argument("--operator", dest="operators", action="append", default=[], metavar="USER",
                       help="an operator's etcd user (a client certificate's CN, or a password user); "
                       "may be repeated")
        a.add_argument("--host", dest="hosts", action="append", default=[], metavar="MACHINE_ID[=USER]",
                       help="a host that follows rollouts but never leads, and its etcd user (default "
                       "norm-host-MACHINE_ID); may be repeated")
        a.add_argument("--leader", dest="leaders", action="append", default=[], metavar="MACHINE_ID[=USER]",
                       help="a leader-eligible host (the host's role and the leader's); may be repeated")
        a.add_argument("--password-file", dest="password_files", action="append", default=[],
                       metavar="USER=FILE", help="USER authenticates with the password on FILE's first "
                       "line (set when the user is created); users without one are created for client "
                       "certificates only")
        a.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = cli.load(args)
    keys = access.Keys(config.keys.version, config.keys.environment, config.keys.prefix)
    operators = [access.parse_user(o, "--operator") for o in args.operators]
    hosts = [access.HostGrant(*access.parse_host(t, "--host"), leader=False) for t in args.hosts]
    hosts += [access.HostGrant(*access.parse_host(t, "--leader"), leader=True) for t in args.leaders]
    if not operators and not hosts:
        raise InvalidValue("norm access", "name at least one --operator, --host or --leader")
    files: dict[str, str] = {}
    for item in args.password_files:
        user, sep, path = item.partition("=")
        if not sep or not path:
            raise InvalidValue("--password-file", "expected USER=FILE")
        files[access.parse_user(user, "--password-file")] = path
    wanted = access.policy(keys, operators, hosts, files)
    passwords = {user: _password(user, path) for user, path in files.items()}  # all read before any change
    apply = args.access_command == "apply"
    return cli.with_etcd(config, lambda etcd: bring(etcd, wanted, passwords, apply))


def _password(user: str, path: str) -> Secret:
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidValue(f"--password-file {user}", f"cannot read {path}: "
                           f"{getattr(e, 'strerror', None) or 'not UTF-8 text'}") from None
    if not lines or not lines[0]:
        raise InvalidValue(f"--password-file {user}", f"the first line of {path} is empty")
    return Secret(lines[0])


async def bring(etcd: Etcd, wanted: access.Policy, passwords: Mapping[str, Secret], apply: bool) -> int:
    """Print the changes that bring etcd to `wanted`, and with `apply` make them."""
    current = access.Current(roles={r.name: await etcd.role_permissions(r.name) for r in wanted.roles},
                             users={u.name: await etcd.user_roles(u.name) for u in wanted.users})
    todo = access.changes(wanted, current)
    for change in todo:
        print(access.etcdctl(change), flush=True)
        if apply:
            await _change(etcd, change, passwords)
    verb = "applied" if apply else "to make"
    print(f"# {len(todo)} changes {verb}" if todo else "# nothing to change", flush=True)
    if await etcd.auth_enabled() is False:
        print("norm: etcd's authentication is off: the roles bind nobody until it is on "
              "(etcdctl user add root; etcdctl auth enable)", file=sys.stderr)
    return EXIT_OK


async def _change(etcd: Etcd, change: access.Change, passwords: Mapping[str, Secret]) -> None:
    match change:
        case access.AddRole(role):
            await etcd.add_role(role)
        case access.Grant(role, permission):
            await etcd.grant_permission(role, permission)
        case access.Revoke(role, permission):
            await etcd.revoke_permission(role, permission)
        case access.AddUser(user, _):
            await etcd.add_user(user, passwords.get(user))
        case access.GrantRole(user, role):
            await etcd.grant_role(user, role)
        case access.RevokeRole(user, role):
            await etcd.revoke_role(user, role)
