"""`norm hosts`, `norm units [stop|start]`, `norm heal lift`: the registered hosts, and this host's
units and the operator's requests for them (which the host's agent carries out).

`norm heal release` is the earlier name of `norm heal lift`, still accepted; its request keeps its key,
`<prefix>/control/<machine-id>/release/<unit>`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from norm.app import cli, views
from norm.app.views import EXIT_FAILED, EXIT_OK
from norm.core import wire
from norm.core.errors import InvalidValue
from norm.core.host import HostRecord


def register(sub: cli.Subparsers) -> None:
    hosts = sub.add_parser("hosts", help="list the hosts registered in etcd")
    cli.config_args(hosts)
    hosts.add_argument("--json", action="store_true", help="one JSON object per host")
    hosts.set_defaults(run=list_hosts)

    units = sub.add_parser("units", help="this host's managed units and their healing state")
    cli.config_args(units)
    units.add_argument("--json", action="store_true", help="the summary as the agent published it")
    units.set_defaults(run=list_units)
    usub = units.add_subparsers(dest="units_command", metavar="ACTION")
    for action, text in (("stop", "hold a unit: stop it and keep Norm from healing it"),
                         ("start", "end an operator's hold and start the unit again")):
        a = usub.add_parser(action, help=text)
        cli.config_args(a)
        a.add_argument("unit")
        a.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the agent")
        a.set_defaults(run=hold)

    heal = sub.add_parser("heal", help="healing controls")
    hsub = heal.add_subparsers(dest="heal_command", required=True, metavar="ACTION")
    lift = hsub.add_parser("lift", aliases=["release"],
                           help="lift a unit's quarantine: Norm heals it again")
    cli.config_args(lift)
    lift.add_argument("unit")
    lift.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the agent")
    lift.set_defaults(run=lift_quarantine)


def list_hosts(args: argparse.Namespace) -> int:
    from norm.core.host import hosts_key, leader_key

    config = cli.load(args)

    async def fetch() -> tuple[list[HostRecord], str | None]:
        async with cli.connect(config) as etcd:
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
    cli.print_lines(views.hosts_lines(records, leader))
    return EXIT_OK


def list_units(args: argparse.Namespace) -> int:
    from norm.core.host import units_key

    config, machine_id = cli.load_host(args)

    async def fetch() -> bytes | None:
        async with cli.connect(config, machine_id) as etcd:
            kv = await etcd.get(units_key(config.keys.prefix, machine_id))
        return None if kv is None else bytes(kv.value)

    raw = asyncio.run(fetch())
    if raw is None:
        print("norm: no unit summary for this host in etcd: is the agent running with healing enabled?",
              file=sys.stderr)
        return EXIT_FAILED
    try:
        summary = wire.parse(raw, "unit summary")
        if not isinstance(summary, list):
            raise InvalidValue("unit summary", "not a list")
    except InvalidValue:
        print("norm: the unit summary in etcd is not what the agent writes", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(summary, indent=2))
        return EXIT_OK
    cli.print_lines(views.units_lines(summary, time.time()))
    return EXIT_OK


def lift_quarantine(args: argparse.Namespace) -> int:
    from norm.core.units import parse_unit_name

    unit = parse_unit_name(args.unit, "unit")
    config, machine_id = cli.load_host(args)
    key = f"{config.keys.prefix}/control/{machine_id}/release/{unit}"  # the key's name is on the wire

    async def go() -> bool:
        async with cli.connect(config, machine_id) as etcd:
            await etcd.put(key, _request())
            return await _await_key(etcd, key, present=False, seconds=args.timeout)

    if not asyncio.run(go()):
        print(f"norm: the agent did not lift the quarantine of {unit} within {args.timeout:g}s; the request "
              f"stays in etcd and is carried out when the agent runs", file=sys.stderr)
        return EXIT_FAILED
    print(f"{unit}: quarantine lifted; Norm heals it again")
    return EXIT_OK


def hold(args: argparse.Namespace) -> int:
    """`units stop`: hold the unit; `units start`: end the hold and start it."""
    from norm.core.units import parse_unit_name

    unit = parse_unit_name(args.unit, "unit")
    config, machine_id = cli.load_host(args)
    stop = args.units_command == "stop"
    last: list[bytes] = []  # the latest summary seen

    async def go() -> bool:
        async with cli.connect(config, machine_id) as etcd:
            return await _hold(etcd, config.keys.prefix, machine_id, unit, stop, args.timeout, last)

    if not asyncio.run(go()):
        print(f"norm: the agent did not confirm within {args.timeout:g}s; the request stays in etcd and "
              f"the agent goes on with it", file=sys.stderr)
        for problem in views.request_errors(_summary(last[0] if last else b""), unit):
            print(f"norm: {unit}: {problem}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{unit}: {'held and stopped' if stop else 'unheld and started'}")
    return EXIT_OK


async def _hold(etcd: Any, prefix: str, machine_id: str, unit: str, stop: bool, seconds: float,
                last: list[bytes]) -> bool:
    """Ask, then follow the agent's published summary until it says it has acted; False on timeout."""
    from norm.adapters.etcd import Delete, Put, Resync
    from norm.core.host import units_key

    key = f"{prefix}/control/{machine_id}/hold/{unit}"
    if stop:
        await etcd.put(key, _request())
    else:
        # The hold ends and a start request takes its place, which the agent deletes once the unit is
        # started: a start that fails, or is asked while the agent is down, is not lost.
        await etcd.txn([], [Delete(key), Put(f"{prefix}/control/{machine_id}/start/{unit}", _request())])
    try:
        async with asyncio.timeout(seconds), etcd.watch(units_key(prefix, machine_id)) as w:
            async for item in w:
                for kv in item.snapshot.kvs if isinstance(item, Resync) else (item.kv,):
                    last[:] = [bytes(kv.value)]
                    if _unit_settled(kv.value, unit, stop):
                        return True
    except TimeoutError:
        return False
    return False


def _request() -> bytes:
    return wire.encode({"at": round(time.time(), 3)}, compact=False)


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


def _summary(raw: bytes) -> object:
    try:
        return wire.parse(raw, "unit summary") if raw else []
    except InvalidValue:
        return []


def _unit_settled(raw: bytes, unit: str, stop: bool) -> bool:
    try:
        summary = wire.parse(raw, "unit summary")
    except InvalidValue:
        return False
    for u in summary if isinstance(summary, list) else []:
        if isinstance(u, dict) and u.get("unit") == unit:
            if stop:
                return bool(u.get("heal") == "held" and u.get("active_state") in ("inactive", "failed"))
            return bool(u.get("heal") != "held" and u.get("active_state") == "active")
    return False
