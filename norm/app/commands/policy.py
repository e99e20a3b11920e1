"""`norm policy apply|show`: the fleet's update policy, in the one etcd key every host reads
(`<prefix>/policy`; see docs/policy.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from norm.app import cli
from norm.app.views import EXIT_FAILED, EXIT_OK
from norm.core import config as cfg
from norm.core.errors import ConfigError, InvalidValue
from norm.core.policy import (
    FleetPolicy,
    changes,
    parse_policy_toml,
    policy_from_update_config,
    policy_key,
    policy_toml,
)

if TYPE_CHECKING:
    from norm.adapters.etcd import Etcd, KeyValue

POLICY_DESCRIPTION = """\
The fleet's update policy (strategy, batches, health gates, steps, timeouts, roles) lives in one
etcd key, <prefix>/policy, that every host reads: a change of leader never changes what a rollout
does. While the key is absent, each host uses its own [update] configuration.
"""

APPLY_EPILOG = """\
exit status:
  0  written, or nothing to change (or --dry-run)
  1  etcd refused the write, or the policy changed while this one was being applied
  2  FILE or the configuration is not acceptable: nothing was written
  4  etcd could not be reached
"""

SHOW_EPILOG = """\
exit status:
  0  shown
  1  the key holds a value the hosts refuse (they keep the last good policy they read)
  4  etcd could not be reached
"""

NO_POLICY = "no fleet policy: hosts use their [update] config"


def register(sub: cli.Subparsers) -> None:
    parent = sub.add_parser("policy", help="the fleet's update policy, in one etcd key every host reads",
                            description=POLICY_DESCRIPTION,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    psub = parent.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    apply = psub.add_parser("apply", help="validate a policy file, show what it changes, and write it",
                            description=POLICY_DESCRIPTION, epilog=APPLY_EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.config_args(apply)
    apply.add_argument("file", metavar="FILE", help="the policy, as TOML (docs/policy.md); - for stdin")
    apply.add_argument("--dry-run", action="store_true", help="show what would change; write nothing")
    apply.set_defaults(run=apply_policy)

    show = psub.add_parser("show", help="the policy in effect, as a file `norm policy apply` takes",
                           description=POLICY_DESCRIPTION, epilog=SHOW_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.config_args(show)
    show.add_argument("--json", action="store_true", help="one JSON object")
    show.set_defaults(run=show_policy)


def read_file(path: str) -> FleetPolicy:
    """The policy FILE holds; ConfigError naming the file (and the key) for anything else."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("-", path, "no such file") from None
    except UnicodeDecodeError:
        raise ConfigError("-", path, "not UTF-8 text") from None
    except OSError as e:
        raise ConfigError("-", path, f"cannot read it: {e.strerror or type(e).__name__}") from None
    return parse_policy_toml(text, "stdin" if path == "-" else path)


def _derived(config: cfg.Config) -> FleetPolicy | None:
    """What a host with this configuration uses while the key is absent (None if its [update] makes
    no policy)."""
    try:
        return policy_from_update_config(config.update)
    except InvalidValue:
        return None


# ---------------------------------------------------------------------------------------------------
# apply


def apply_policy(args: argparse.Namespace) -> int:
    wanted = read_file(args.file)  # refused before anything is read from etcd
    config = cli.load(args)
    return cli.with_etcd(config, lambda etcd: apply(etcd, config, wanted, dry_run=args.dry_run))


async def apply(etcd: Etcd, config: cfg.Config, wanted: FleetPolicy, *, dry_run: bool) -> int:
    from norm.adapters.etcd import Compare, Get, Put

    key = policy_key(config.keys.prefix)
    kv = await etcd.get(key)
    current: FleetPolicy | None = None
    if kv is None:
        before = _derived(config)
        print(f"no fleet policy yet at {key}: hosts use their [update] config; compared with the policy "
              "this configuration's [update] makes:")
    else:
        try:
            current = before = FleetPolicy.decode(kv.value, key)
        except InvalidValue as e:
            before = None
            print(f"norm: {e} (hosts refuse it); it is replaced", file=sys.stderr)
        print(f"fleet policy at {key}, revision {kv.mod_revision}:")
    if current == wanted:
        print("nothing to change")
        return EXIT_OK
    if before is None:
        lines = [line for line in policy_toml(wanted).splitlines() if line]
    else:
        lines = [f"{c.field}: {c.before} -> {c.after}" for c in changes(before, wanted)]
    for line in lines or ["(no field differs: written, it becomes the fleet's policy)"]:
        print(f"  {line}")
    if dry_run:
        print("dry run: nothing written")
        return EXIT_OK
    # Written only over the value read: a policy another operator wrote meanwhile is not lost unseen.
    result = await etcd.txn([Compare(key, "mod", "==", 0 if kv is None else kv.mod_revision)],
                            [Put(key, wanted.encode()), Get(key)])
    if not result.succeeded:
        print("norm: the fleet policy changed while this one was being applied; nothing written "
              "(see `norm policy show`, then apply again)", file=sys.stderr)
        return EXIT_FAILED
    print(f"written: fleet policy revision {result.gets[0][0].mod_revision}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------
# show


def show_policy(args: argparse.Namespace) -> int:
    config = cli.load(args)
    return cli.with_etcd(config, lambda etcd: show(etcd, config, as_json=args.json))


async def show(etcd: Etcd, config: cfg.Config, *, as_json: bool) -> int:
    key = policy_key(config.keys.prefix)
    kv = await etcd.get(key)
    if kv is None:
        return _show_derived(key, config, as_json)
    return _show_key(key, kv, as_json)


def _show_derived(key: str, config: cfg.Config, as_json: bool) -> int:
    try:
        derived: FleetPolicy | None = policy_from_update_config(config.update)
        refused = None
    except InvalidValue as e:
        derived, refused = None, str(e)
    if as_json:
        print(json.dumps({"key": key, "source": "config", "revision": None, "refused": refused,
                          "policy": None if derived is None else json.loads(derived.encode())},
                         sort_keys=True))
    else:
        print(f"# {NO_POLICY}; {key} is absent")
        if derived is not None:
            print("# as this configuration's [update] section makes it:")
            print(policy_toml(derived), end="")
    if refused is not None:
        print(f"norm: {refused}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _show_key(key: str, kv: KeyValue, as_json: bool) -> int:
    try:
        policy: FleetPolicy | None = FleetPolicy.decode(kv.value, key)
        refused = None
    except InvalidValue as e:
        policy, refused = None, e.reason
    if as_json:
        print(json.dumps({"key": key, "source": "etcd", "revision": kv.mod_revision, "refused": refused,
                          "policy": None if policy is None else json.loads(policy.encode())},
                         sort_keys=True))
    elif policy is not None:
        print(f"# fleet policy from {key}, revision {kv.mod_revision}")
        print(policy_toml(policy), end="")
    if refused is not None:
        print(f"norm: {key}, revision {kv.mod_revision}: {refused}: the hosts refuse it and keep the last "
              "good policy they read", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
