"""The `norm` command: the agent, configuration checks, and operator views of the fleet."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from norm import __version__
from norm.core import config as cfg
from norm.core.errors import ConfigError, InvalidValue, NormError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE",
                   help=f"configuration file (default {cfg.DEFAULT_PATH}, or $NORM_CONFIG)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting; may be repeated")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="norm", description=__doc__)
    p.add_argument("--version", action="version", version=f"norm {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    agent = sub.add_parser("agent", help="run the agent on this host")
    _config_args(agent)

    conf = sub.add_parser("config", help="check or describe the configuration")
    csub = conf.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = csub.add_parser("check", help="validate a configuration file (exit 2 if it is wrong)")
    check.add_argument("file")
    check.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE")
    show = csub.add_parser("show", help="print the effective configuration (secrets masked)")
    _config_args(show)
    ref = csub.add_parser("reference", help="print the configuration reference in Markdown")
    ref.add_argument("--check", metavar="FILE", help="exit 1 if FILE differs from the reference")

    hosts = sub.add_parser("hosts", help="list the hosts registered in etcd")
    _config_args(hosts)
    hosts.add_argument("--json", action="store_true", help="one JSON object per host")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        match args.command:
            case "agent":
                return _agent(args)
            case "config":
                return _config(args)
            case "hosts":
                return _hosts(args)
    except ConfigError as e:
        print(f"norm: configuration error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except InvalidValue as e:
        print(f"norm: {e}", file=sys.stderr)
        return EXIT_USAGE
    except NormError as e:
        print(f"norm: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    raise AssertionError(args.command)


def _load(args: argparse.Namespace) -> cfg.Config:
    from norm.app import settings

    return settings.load(args.config, flags=args.sets)


def _agent(args: argparse.Namespace) -> int:
    from norm.app import logging as norm_logging
    from norm.app import settings
    from norm.app.agent import Agent

    config = _load(args)
    identity = settings.identity(config)
    settings.etcd_password(config)  # a missing password file is a configuration error, said now
    norm_logging.configure(config.log.level, config.log.format)
    return asyncio.run(Agent(config, identity).run())


def _config(args: argparse.Namespace) -> int:
    from norm.app import settings

    if args.config_command == "check":
        config = settings.load(args.file, environ={}, flags=args.sets)
        settings.etcd_password(config)
        print(f"{args.file}: OK")
        return EXIT_OK
    if args.config_command == "show":
        config = _load(args)
        print(json.dumps(_plain(config), indent=2, default=str))
        return EXIT_OK
    text = cfg.reference_markdown()
    if args.check:
        current = Path(args.check).read_text() if Path(args.check).exists() else ""
        if current.rstrip("\n") != text.rstrip("\n"):
            print(f"norm: {args.check} is out of date; regenerate it with "
                  f"`norm config reference > {args.check}`", file=sys.stderr)
            return EXIT_FAILED
        return EXIT_OK
    print(text)
    return EXIT_OK


def _plain(obj: object) -> object:
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_plain(x) for x in obj]
    return obj if obj is None or isinstance(obj, str | int | float | bool) else str(obj)


def _hosts(args: argparse.Namespace) -> int:
    from norm.adapters.etcd import Etcd
    from norm.app import settings
    from norm.core.host import HostRecord, hosts_key, leader_key

    config = _load(args)

    async def fetch() -> tuple[list[HostRecord], str | None]:
        async with Etcd(config.etcd, password=settings.etcd_password(config),
                        probe_key=config.keys.prefix + "/") as etcd:
            snap = await etcd.get_prefix(hosts_key(config.keys.prefix))
            leader = await etcd.get(leader_key(config.keys.prefix))
        records = []
        for kv in snap.kvs:
            try:
                records.append(HostRecord.decode(kv.value, kv.key))
            except InvalidValue as e:
                print(f"norm: skipping {kv.key}: {e.reason}", file=sys.stderr)
        ordered = sorted(records, key=lambda r: (r.environment, r.role, r.name))
        return ordered, leader.value.decode("ascii", "replace") if leader else None

    records, leader = asyncio.run(fetch())
    if args.json:
        for r in records:
            print(r.encode().decode())
        return EXIT_OK
    rows = [("HOST", "MACHINE ID", "ENVIRONMENT", "ROLE", "AGENT", "RELEASE", "LEADER")]
    rows += [(r.name, r.machine_id[:12], r.environment, r.role, r.agent_version, r.release or "-",
              "*" if r.machine_id == leader else "") for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print(f"{len(records)} host{'s' if len(records) != 1 else ''} registered")
    return EXIT_OK
