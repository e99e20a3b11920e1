"""The `norm` command: the agent, configuration checks, and operator views of the fleet."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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

    units = sub.add_parser("units", help="this host's managed units and their healing state")
    _config_args(units)
    units.add_argument("--json", action="store_true", help="the summary as the agent published it")
    usub = units.add_subparsers(dest="units_command", metavar="ACTION")
    for action, text in (("stop", "hold a unit: stop it and keep Norm from healing it"),
                         ("start", "release an operator's hold and start the unit again")):
        a = usub.add_parser(action, help=text)
        _config_args(a)
        a.add_argument("unit")
        a.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the agent")

    heal = sub.add_parser("heal", help="healing controls")
    hsub = heal.add_subparsers(dest="heal_command", required=True, metavar="ACTION")
    rel = hsub.add_parser("release", help="release a quarantined unit: Norm heals it again")
    _config_args(rel)
    rel.add_argument("unit")
    rel.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the agent")
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
            case "units":
                return _units(args)
            case "heal":
                return _heal(args)
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
    _table(rows)
    print(f"{len(records)} host{'s' if len(records) != 1 else ''} registered")
    return EXIT_OK


def _host_etcd(args: argparse.Namespace) -> tuple[cfg.Config, str]:
    from norm.app import settings

    config = _load(args)
    return config, settings.identity(config).machine_id


def _connect(config: cfg.Config) -> Any:
    from norm.adapters.etcd import Etcd
    from norm.app import settings

    return Etcd(config.etcd, password=settings.etcd_password(config), probe_key=config.keys.prefix + "/")


def _units(args: argparse.Namespace) -> int:
    if args.units_command in ("stop", "start"):
        return _hold(args)
    from norm.core.host import units_key

    config, machine_id = _host_etcd(args)

    async def fetch() -> bytes | None:
        async with _connect(config) as etcd:
            kv = await etcd.get(units_key(config.keys.prefix, machine_id))
        return None if kv is None else bytes(kv.value)

    raw = asyncio.run(fetch())
    if raw is None:
        print("norm: no unit summary for this host in etcd: is the agent running with healing enabled?",
              file=sys.stderr)
        return EXIT_FAILED
    try:
        summary = json.loads(raw)
        if not isinstance(summary, list):
            raise ValueError("not a list")
    except ValueError:
        print("norm: the unit summary in etcd is not what the agent writes", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(summary, indent=2))
        return EXIT_OK
    now = time.time()

    def until(t: object) -> str:
        return f"in {max(0, round(float(t) - now))}s" if isinstance(t, int | float) else "-"

    rows = [("UNIT", "STATE", "RESTARTS", "HEAL", "ATTEMPTS", "NEXT ATTEMPT", "QUARANTINE ENDS")]
    rows += [(str(u.get("unit")), f"{u.get('active_state')}/{u.get('sub_state')}", str(u.get("n_restarts")),
              str(u.get("heal")), str(u.get("attempts")), until(u.get("next_attempt_at")),
              until(u.get("quarantined_until"))) for u in summary if isinstance(u, dict)]
    _table(rows)
    return EXIT_OK


def _table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


async def _await_key(etcd: Any, key: str, present: bool, seconds: float) -> bool:
    """Wait until `key` exists (present=True) or not, through a watch; False on timeout."""
    from norm.adapters.etcd import Event, Resync

    try:
        async with asyncio.timeout(seconds), etcd.watch(key) as w:
            async for item in w:
                exists = (bool(item.snapshot.kvs) if isinstance(item, Resync)
                          else isinstance(item, Event) and item.kind == "put")
                if exists == present:
                    return True
    except TimeoutError:
        return False
    return False


def _heal(args: argparse.Namespace) -> int:
    from norm.core.units import parse_unit_name

    unit = parse_unit_name(args.unit, "unit")
    config, machine_id = _host_etcd(args)
    key = f"{config.keys.prefix}/control/{machine_id}/release/{unit}"

    async def go() -> bool:
        async with _connect(config) as etcd:
            await etcd.put(key, json.dumps({"at": round(time.time(), 3)}).encode())
            return await _await_key(etcd, key, present=False, seconds=args.timeout)

    if not asyncio.run(go()):
        print(f"norm: the agent did not take the release of {unit} within {args.timeout:g}s; the request "
              f"stays in etcd and is carried out when the agent runs", file=sys.stderr)
        return EXIT_FAILED
    print(f"{unit}: released; Norm heals it again")
    return EXIT_OK


def _hold(args: argparse.Namespace) -> int:
    from norm.adapters.etcd import Resync
    from norm.core.host import units_key
    from norm.core.units import parse_unit_name

    unit = parse_unit_name(args.unit, "unit")
    config, machine_id = _host_etcd(args)
    key = f"{config.keys.prefix}/control/{machine_id}/hold/{unit}"
    stop = args.units_command == "stop"

    async def go() -> bool:
        async with _connect(config) as etcd:
            if stop:
                await etcd.put(key, json.dumps({"at": round(time.time(), 3)}).encode())
            else:
                await etcd.delete(key)
            # The agent's published summary says when it has acted.
            summary_key = units_key(config.keys.prefix, machine_id)
            try:
                async with asyncio.timeout(args.timeout), etcd.watch(summary_key) as w:
                    async for item in w:
                        kvs = item.snapshot.kvs if isinstance(item, Resync) else (item.kv,)
                        for kv in kvs:
                            if _unit_settled(kv.value, unit, stop):
                                return True
            except TimeoutError:
                return False
        return False

    if not asyncio.run(go()):
        print(f"norm: the agent did not confirm within {args.timeout:g}s; the request stays in etcd",
              file=sys.stderr)
        return EXIT_FAILED
    print(f"{unit}: {'held and stopped' if stop else 'released and started'}")
    return EXIT_OK


def _unit_settled(raw: bytes, unit: str, stop: bool) -> bool:
    try:
        summary = json.loads(raw)
    except ValueError:
        return False
    for u in summary if isinstance(summary, list) else []:
        if isinstance(u, dict) and u.get("unit") == unit:
            if stop:
                return bool(u.get("heal") == "held" and u.get("active_state") in ("inactive", "failed"))
            return bool(u.get("heal") != "held" and u.get("active_state") == "active")
    return False
