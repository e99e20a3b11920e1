"""The `norm` command: the agent, configuration checks, operator views of the fleet, and its updates."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from norm import __version__
from norm.app import views
from norm.app.views import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_RUNNING,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
)
from norm.core import config as cfg
from norm.core.errors import ConfigError, InvalidValue, NormError

if TYPE_CHECKING:
    from norm.adapters.etcd import Etcd, KeyValue, WatchItem
    from norm.core.access import Change
    from norm.core.host import HostRecord
    from norm.core.release import Header
    from norm.core.rollout import Rollout
    from norm.core.secret import Secret

T = TypeVar("T")

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_RUNNING", "EXIT_TIMEOUT", "EXIT_UNREACHABLE", "EXIT_USAGE",
           "main", "parser"]

DEPLOY_EPILOG = """\
exit status:
  0  written (without --wait), or the rollout is done (with --wait)
  1  the rollout failed, was halted, or was superseded by a newer version (the reason
     is printed); or etcd refused the request
  2  VERSION or the configuration is not acceptable: nothing was written
  3  --timeout passed before the rollout ended (it goes on: follow it with `norm rollout`)
  4  etcd could not be reached
"""

ROLLOUT_EPILOG = """\
exit status:
  0  the rollout is done, or there is none
  1  the rollout failed, was halted, or was superseded by a newer version (the reason is printed)
  4  etcd could not be reached
  5  with --once: the rollout is still running
"""


ACCESS_DESCRIPTION = """\
Roles, by who writes what (see the operator guide, "Least-privilege access"):
  norm-operator            read everything; write the desired version and environment,
                           control requests and abort requests
  norm-host-<machine-id>   one per host: read the desired keys and the rollouts; write its own
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


class _Unreachable(NormError):
    """etcd could not be reached: exit EXIT_UNREACHABLE."""


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

    deploy = sub.add_parser("deploy", help="roll the fleet out to an image tag",
                            description="Write VERSION to the desired version key: the fleet's leader "
                            "rolls it out.", epilog=DEPLOY_EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    _config_args(deploy)
    deploy.add_argument("version", metavar="VERSION", help="the image tag to run")
    deploy.add_argument("--wait", action="store_true", help="follow the rollout until it ends")
    deploy.add_argument("--timeout", type=_seconds, default=None, metavar="SECONDS",
                        help="with --wait: give up waiting after this long (default: no limit)")

    status = sub.add_parser("status", help="the fleet: hosts, releases, healing, leader and rollout")
    _config_args(status)
    status.add_argument("--json", action="store_true", help="one JSON object")

    rollout = sub.add_parser("rollout", help="follow the current rollout until it ends",
                             epilog=ROLLOUT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _config_args(rollout)
    rollout.add_argument("--once", action="store_true", help="print the current state and exit")
    rollout.add_argument("--json", action="store_true", help="JSON objects (one per change) instead of text")

    history = sub.add_parser("history", help="finished rollouts, newest first")
    _config_args(history)
    history.add_argument("--limit", type=_positive, default=20, metavar="N", help="at most N (default 20)")
    history.add_argument("--json", action="store_true", help="one JSON record per line")

    abort = sub.add_parser("abort", help="ask the leader to abort the running rollout")
    _config_args(abort)
    abort.add_argument("--by", default=None, metavar="NAME",
                       help="who asks (default $USER@hostname); recorded as the reason")

    access = sub.add_parser("access", help="least-privilege etcd users and roles for operators and hosts")
    asub = access.add_subparsers(dest="access_command", required=True, metavar="ACTION")
    for action, text in (("plan", "print the etcdctl commands that would bring etcd to the roles and "
                                  "users named (nothing is changed)"),
                         ("apply", "make those changes in etcd (as a user with etcd's root role); "
                                   "running it again changes nothing")):
        a = asub.add_parser(action, help=text, description=ACCESS_DESCRIPTION, epilog=ACCESS_EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        _config_args(a)
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
    return p


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("a number of seconds, more than 0")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("at least 1")
    return value


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
            case "deploy":
                return _deploy(args)
            case "status":
                return _status(args)
            case "rollout":
                return _rollout(args)
            case "history":
                return _history(args)
            case "abort":
                return _abort(args)
            case "access":
                return _access(args)
    except _Unreachable as e:
        print(f"norm: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
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

    tree = settings.load_tree(args.config, flags=args.sets)
    config = cfg.build(tree)
    identity = settings.identity(config)
    settings.etcd_password(config)  # a missing password file is a configuration error, said now
    norm_logging.configure(config.log.level, config.log.format)
    return asyncio.run(Agent(config, identity, host_given=settings.given(tree, "host")).run())


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
    env = any(r.env_etag for r in records)  # the column shows only where environment files are used
    rows = [("HOST", "MACHINE ID", "ENVIRONMENT", "ROLE", "AGENT", "RELEASE", *(("ENV FILE",) if env else ()),
             "LEADER")]
    rows += [(r.name, r.machine_id[:12], r.environment, r.role, r.agent_version, r.release or "-",
              *((views.short_etag(r.env_etag),) if env else ()), "*" if r.machine_id == leader else "")
             for r in records]
    _table(rows)
    print(f"{len(records)} host{'s' if len(records) != 1 else ''} registered")
    return EXIT_OK


def _host_etcd(args: argparse.Namespace) -> tuple[cfg.Config, str]:
    from norm.app import settings

    config = _load(args)
    return config, settings.identity(config).machine_id


def _connect(config: cfg.Config, machine_id: str | None = None) -> Any:
    """A connection that proves it may read the prefix, or with `machine_id`, that host's control keys
    (all a host's own etcd user may read there, for the commands run on the host)."""
    from norm.adapters.etcd import Etcd
    from norm.app import settings
    from norm.core.host import control_prefix

    probe = config.keys.prefix + "/" if machine_id is None else control_prefix(config.keys.prefix, machine_id)
    return Etcd(config.etcd, password=settings.etcd_password(config), probe_key=probe)


def _units(args: argparse.Namespace) -> int:
    if args.units_command in ("stop", "start"):
        return _hold(args)
    from norm.core.host import units_key

    config, machine_id = _host_etcd(args)

    async def fetch() -> bytes | None:
        async with _connect(config, machine_id) as etcd:
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
    except (ValueError, RecursionError):
        print("norm: the unit summary in etcd is not what the agent writes", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(summary, indent=2))
        return EXIT_OK
    now = time.time()

    def until(t: object) -> str:
        if isinstance(t, bool) or not isinstance(t, int | float) or abs(t) > 1e15 or math.isnan(t):
            return "-"  # not a time (nor one within 30 million years)
        return f"in {max(0, round(float(t) - now))}s"

    rows = [("UNIT", "STATE", "RESTARTS", "HEAL", "ATTEMPTS", "NEXT ATTEMPT", "QUARANTINE ENDS")]
    def heal(u: dict[str, object]) -> str:
        by = u.get("held_by")
        owners = [str(o) for o in by] if isinstance(by, list) else []
        return str(u.get("heal")) + (f"({'+'.join(owners)})" if u.get("heal") == "held" and owners else "")

    # What etcd holds is shown, never obeyed: a value that would drive the terminal is printed cleaned.
    rows += [(views.clean(u.get("unit"), 80),
              views.clean(f"{u.get('active_state')}/{u.get('sub_state')}", 40),
              views.clean(u.get("n_restarts"), 20), views.clean(heal(u), 40),
              views.clean(u.get("attempts"), 20), until(u.get("next_attempt_at")),
              until(u.get("quarantined_until")))
             for u in summary if isinstance(u, dict)]
    _table(rows)
    # Operator requests the agent has not carried out yet, and why.
    for u in summary:
        for r in (u.get("requests") or []) if isinstance(u, dict) else []:
            if isinstance(r, dict):
                why = (f"; failed {r.get('failures')} time(s): {r.get('error')}; "
                       f"next try {until(r.get('next_try'))}") if r.get("error") else ""
                print(views.clean(f"{u.get('unit')}: {r.get('action')} requested, not done yet{why}", 500))
    return EXIT_OK


def _table(rows: Sequence[Sequence[str]]) -> None:
    for line in views.table(rows):
        print(line)


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
        async with _connect(config, machine_id) as etcd:
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
    start_key = f"{config.keys.prefix}/control/{machine_id}/start/{unit}"
    stop = args.units_command == "stop"
    last: list[bytes] = []  # the latest summary seen

    async def go() -> bool:
        from norm.adapters.etcd import Delete, Put

        async with _connect(config, machine_id) as etcd:
            request = json.dumps({"at": round(time.time(), 3)}).encode()
            if stop:
                await etcd.put(key, request)
            else:
                # The hold ends and a start request takes its place, which the agent deletes once the
                # unit is started: a start that fails, or is asked while the agent is down, is not lost.
                await etcd.txn([], [Delete(key), Put(start_key, request)])
            # The agent's published summary says when it has acted.
            summary_key = units_key(config.keys.prefix, machine_id)
            try:
                async with asyncio.timeout(args.timeout), etcd.watch(summary_key) as w:
                    async for item in w:
                        kvs = item.snapshot.kvs if isinstance(item, Resync) else (item.kv,)
                        for kv in kvs:
                            last[:] = [bytes(kv.value)]
                            if _unit_settled(kv.value, unit, stop):
                                return True
            except TimeoutError:
                return False
        return False

    if not asyncio.run(go()):
        print(f"norm: the agent did not confirm within {args.timeout:g}s; the request stays in etcd and "
              f"the agent goes on with it", file=sys.stderr)
        for problem in _request_errors(last[0] if last else b"", unit):
            print(f"norm: {unit}: {problem}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{unit}: {'held and stopped' if stop else 'released and started'}")
    return EXIT_OK


def _request_errors(raw: bytes, unit: str) -> list[str]:
    """What the agent's summary says of the requests for `unit` that keep failing."""
    try:
        summary = json.loads(raw) if raw else []
    except (ValueError, RecursionError):
        return []
    out: list[str] = []
    for u in summary if isinstance(summary, list) else []:
        if isinstance(u, dict) and u.get("unit") == unit:
            for r in u.get("requests") or []:
                if isinstance(r, dict) and r.get("error"):
                    out.append(views.clean(f"{r.get('action')} failed {r.get('failures')} time(s), "
                                           f"retried with backoff; last error: {r.get('error')}", 400))
    return out


def _unit_settled(raw: bytes, unit: str, stop: bool) -> bool:
    try:
        summary = json.loads(raw)
    except (ValueError, RecursionError):
        return False
    for u in summary if isinstance(summary, list) else []:
        if isinstance(u, dict) and u.get("unit") == unit:
            if stop:
                return bool(u.get("heal") == "held" and u.get("active_state") in ("inactive", "failed"))
            return bool(u.get("heal") != "held" and u.get("active_state") == "active")
    return False


# ---------------------------------------------------------------------------------------------------
# Fleet updates: deploy, status, rollout, history, abort


def _with_etcd(config: cfg.Config, go: Callable[[Etcd], Awaitable[T]]) -> T:
    """Run `go` with a connection to etcd; etcd out of reach is EXIT_UNREACHABLE."""
    from norm.adapters.etcd import EtcdUnavailable

    async def run() -> T:
        async with _connect(config) as etcd:
            return await go(etcd)

    try:
        return asyncio.run(run())
    except EtcdUnavailable as e:
        raise _Unreachable(f"{e} (etcd.endpoints: {', '.join(config.etcd.endpoints)})") from None


def _skip(key: str, reason: str) -> str:
    return f"norm: skipping {views.clean(key, 200)}: {reason}"


def _header_of(kv: KeyValue | None, notes: list[str]) -> Header | None:
    from norm.core.release import Header

    if kv is None:
        return None
    try:
        return Header.decode(kv.value, kv.key)
    except InvalidValue as e:
        notes.append(_skip(kv.key, e.reason))
        return None


def _flush_notes(notes: list[str]) -> bool:
    for note in notes:
        print(note, file=sys.stderr)
    had = bool(notes)
    notes.clear()
    return had


async def _host_records(etcd: Etcd, prefix: str, notes: list[str]) -> list[HostRecord]:
    from norm.core.host import HostRecord, hosts_key

    records = []
    for kv in (await etcd.get_prefix(hosts_key(prefix))).kvs:
        try:
            records.append(HostRecord.decode(kv.value, kv.key))
        except InvalidValue as e:
            notes.append(_skip(kv.key, e.reason))
    return records


class _Tracker:
    """What the CLI knows of one rollout (revision `want`), from the header and the rollout's keys."""

    def __init__(self, prefix: str, want: int) -> None:
        self.prefix = prefix
        self.want = want
        self.header: Header | None = None  # the header of `want`, once seen
        self.current: Header | None = None  # the header etcd holds now
        self.listed: tuple[str, ...] = ()
        self.reports: dict[tuple[str, str], Mapping[str, Any]] = {}
        self.record: Rollout | None = None
        self.names: dict[str, str] = {}
        self.note: str | None = None
        self.notes: list[str] = []
        self._loaded = False
        self._tried: frozenset[str] = frozenset()  # participants looked for once already

    def progress(self) -> views.Progress:
        return views.Progress(want=self.want, header=self.header, current=self.current, listed=self.listed,
                              reports=dict(self.reports), names=dict(self.names), record=self.record,
                              verdict_note=self.note)

    def verdict(self) -> views.Verdict:
        return views.Verdict.WAITING if self.header is None else views.verdict(self.header)

    # -- the header

    def header_kvs(self, kvs: Sequence[KeyValue]) -> None:
        self.current = None
        for kv in kvs:
            self.header_kv(kv)

    def header_kv(self, kv: KeyValue | None) -> None:
        h = _header_of(kv, self.notes)
        if kv is None or h is not None:
            self.current = h
        if h is not None and h.revision == self.want:
            self.header = h

    # -- the rollout's own keys: record, participants, reports

    def rollout_kvs(self, kvs: Sequence[KeyValue]) -> None:
        self.listed, self.reports, self.record = (), {}, None
        for kv in kvs:
            self.rollout_kv(kv)

    def rollout_kv(self, kv: KeyValue, deleted: bool = False) -> None:
        from norm.core import release as rel
        from norm.core.host import parse_machine_id
        from norm.core.rollout import Rollout

        rest = kv.key.removeprefix(rel.rollout_prefix(self.prefix, self.want))
        if deleted:
            if rest == "record":
                self.record = None
            elif rest == "hosts":
                self.listed = ()
            else:
                kind, _, name = rest.partition("/")
                self.reports.pop(("abort", "") if rest == "abort" else (kind, name), None)
            return
        try:
            if rest == "record":
                record = Rollout.decode(kv.value, kv.key)
                if record.revision == self.want:
                    self.record = record
            elif rest == "hosts":
                listed = json.loads(kv.value)
                if not isinstance(listed, list) or not all(isinstance(m, str) for m in listed):
                    raise InvalidValue(kv.key, "not a list of machine ids")
                self.listed = tuple(parse_machine_id(m, kv.key) for m in listed)
            elif (report := rel.parse_report(self.prefix, self.want, kv.key, kv.value)) is not None:
                self.reports[(report.kind, report.name)] = report.value
        except InvalidValue as e:
            self.notes.append(_skip(kv.key, e.reason))
        except (ValueError, RecursionError):
            self.notes.append(_skip(kv.key, "not JSON"))

    def apply(self, item: WatchItem) -> None:
        """A change from the one watch on `<prefix>/rollout*`: the header, and every rollout's keys
        (of which only those of `want` matter). One watch keeps them in etcd's order: a header never
        gets ahead of the reports written before it."""
        from norm.adapters.etcd import Resync
        from norm.core import release as rel

        header, mine = rel.header_key(self.prefix), rel.rollout_prefix(self.prefix, self.want)
        if isinstance(item, Resync):
            self.header_kvs([kv for kv in item.snapshot.kvs if kv.key == header])
            self.rollout_kvs([kv for kv in item.snapshot.kvs if kv.key.startswith(mine)])
        elif item.kv.key == header:
            self.header_kv(None if item.kind == "delete" else item.kv)
        elif item.kv.key.startswith(mine):
            self.rollout_kv(item.kv, deleted=item.kind == "delete")

    async def name_hosts(self, etcd: Etcd) -> None:
        """Read the host names again when participants appear that have none yet."""
        mids = frozenset(self.listed) | (frozenset(self.header.excluded) if self.header else frozenset())
        if self.record is not None:
            mids |= frozenset(self.record.hosts)
        unnamed = mids - frozenset(self.names)
        if self._loaded and unnamed <= self._tried:
            return
        self._loaded, self._tried = True, self._tried | unnamed
        for r in await _host_records(etcd, self.prefix, self.notes):
            self.names[r.machine_id] = r.name

    async def judge(self, etcd: Etcd) -> views.Verdict:
        """The followed rollout's state. A later rollout in the header means it is over: its record in
        the history says how; without one it was superseded before it got a record of its own."""
        from norm.core import release as rel
        from norm.core.rollout import Rollout

        v = self.verdict()
        cur = self.current
        if v in views.ENDED or cur is None or cur.revision <= self.want:
            return v
        for key in (rel.history_key(self.prefix, self.want), rel.record_key(self.prefix, self.want)):
            kv = await etcd.get(key)
            if kv is None:
                continue
            try:
                record = Rollout.decode(kv.value, key)
            except InvalidValue as e:
                self.notes.append(_skip(key, e.reason))
                continue
            if record.revision == self.want and record.terminal:
                self.header = rel.Header.of(record)
                return views.verdict(self.header)
        self.note = f"superseded by {views.title(cur)}"
        return views.Verdict.SUPERSEDED


class _Screen:
    """Draws the live view: on a terminal it redraws in place; otherwise one line per change."""

    def __init__(self, json_lines: bool = False, once: bool = False) -> None:
        self.json_lines = json_lines
        self.tty = not once and sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
        self.frame: views.Frame = []
        self.drawn = 0
        self.last_json = ""

    def show(self, progress: views.Progress, verdict: views.Verdict, notes: list[str]) -> None:
        if _flush_notes(notes):
            self.drawn = 0  # the notes went between: draw anew below them
            self.frame = []
        if self.json_lines:
            text = json.dumps(views.progress_json(progress, verdict), sort_keys=True, default=str)
            if text != self.last_json:
                print(text, flush=True)
                self.last_json = text
            return
        frame = views.rollout_frame(progress)
        if frame == self.frame:
            return
        if self.tty:
            lines = [text for _, text in frame]
            sys.stdout.write(views.redraw(self.drawn, lines, shutil.get_terminal_size().columns))
            self.drawn = len(lines)
        else:
            for line in views.changed_lines(self.frame, frame):
                print(line)
        sys.stdout.flush()
        self.frame = frame


async def _follow(etcd: Etcd, tracker: _Tracker, screen: _Screen) -> views.Verdict:
    """Watch the header and the rollout's keys, redrawing on every change, until the rollout ends."""
    from norm.adapters.etcd import EtcdUnavailable
    from norm.core import release as rel

    queue: asyncio.Queue[WatchItem | Exception] = asyncio.Queue()
    key = rel.header_key(tracker.prefix)  # as a prefix: the header and <prefix>/rollouts/...

    async def pump() -> None:
        try:
            async with etcd.watch(key, prefix=True) as w:
                async for item in w:
                    queue.put_nowait(item)
        except Exception as e:  # CancelledError is not an Exception: it goes through
            queue.put_nowait(e)
        else:
            queue.put_nowait(EtcdUnavailable(f"watching {key}*: the watch ended"))

    # The watch runs in a task of its own so that what has arrived can be drawn at once, as one change.
    task = asyncio.create_task(pump(), name=f"cli-watch-rollout-{tracker.want}")
    try:
        while True:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            for item in batch:
                if isinstance(item, Exception):
                    raise item
                tracker.apply(item)
            await tracker.name_hosts(etcd)
            verdict = await tracker.judge(etcd)
            screen.show(tracker.progress(), verdict, tracker.notes)
            if verdict in views.ENDED:
                return verdict
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _ended(tracker: _Tracker, verdict: views.Verdict) -> int:
    """The exit status for a rollout that ended (or is still running, for --once), said on stderr
    when it is not a success."""
    code = views.exit_code(verdict)
    if code == EXIT_FAILED:
        h = tracker.header
        what = views.title(h) if h is not None else f"rollout {tracker.want}"
        why = tracker.note if tracker.note else (views.outcome_text(h) if h is not None else verdict.value)
        print(f"norm: {what}: {why}", file=sys.stderr)
    return code


async def _follow_for(etcd: Etcd, tracker: _Tracker, screen: _Screen, seconds: float | None) -> int:
    try:
        async with asyncio.timeout(seconds):
            return _ended(tracker, await _follow(etcd, tracker, screen))
    except TimeoutError:
        state = tracker.header.phase.value if tracker.header is not None else "not begun"
        print(f"norm: rollout {tracker.want} did not end within {seconds:g}s (it is {state}, and goes on; "
              f"follow it with `norm rollout`)", file=sys.stderr)
        return EXIT_TIMEOUT


def _deploy(args: argparse.Namespace) -> int:
    from norm.core.desired import parse_version

    # Total on any str argv can hold (non-UTF-8 bytes arrive as surrogates): refused, never raised.
    version = parse_version(args.version.encode("utf-8", "surrogatepass"), "VERSION")
    config = _load(args)

    async def go(etcd: Etcd) -> int:
        revision = await etcd.put(config.keys.version, version.encode("ascii"))
        print(f"deploying {version} (rollout {revision})", flush=True)
        if not args.wait:
            return EXIT_OK
        return await _follow_for(etcd, _Tracker(config.keys.prefix, revision), _Screen(), args.timeout)

    return _with_etcd(config, go)


def _rollout(args: argparse.Namespace) -> int:
    from norm.core import release as rel

    config = _load(args)
    prefix = config.keys.prefix

    async def go(etcd: Etcd) -> int:
        from norm.adapters.etcd import Resync

        notes: list[str] = []
        # One read of <prefix>/rollout*: the header and the rollout's keys as they stood together.
        snap = await etcd.get_prefix(rel.header_key(prefix))
        head = next((kv for kv in snap.kvs if kv.key == rel.header_key(prefix)), None)
        header = _header_of(head, notes)
        _flush_notes(notes)
        if header is None:
            if args.json:
                print(json.dumps({"revision": None, "verdict": views.Verdict.NONE.value, "rollout": None,
                                  "hosts": []}))
            else:
                print(views.rollout_line(None))
            return EXIT_OK if head is None else EXIT_FAILED
        tracker = _Tracker(prefix, header.revision)
        screen = _Screen(json_lines=args.json, once=args.once)
        if not args.once:
            return await _follow_for(etcd, tracker, screen, None)
        tracker.apply(Resync(snap, "start"))
        await tracker.name_hosts(etcd)
        verdict = await tracker.judge(etcd)
        screen.show(tracker.progress(), verdict, tracker.notes)
        return _ended(tracker, verdict)

    return _with_etcd(config, go)


def _status(args: argparse.Namespace) -> int:
    from norm.core import release as rel
    from norm.core.host import leader_key

    config = _load(args)
    prefix = config.keys.prefix

    async def go(etcd: Etcd) -> int:
        notes: list[str] = []
        records = await _host_records(etcd, prefix, notes)
        leader_kv = await etcd.get(leader_key(prefix))
        leader = leader_kv.value.decode("ascii", "replace") if leader_kv is not None else None
        units: dict[str, object] = {}
        for kv in (await etcd.get_prefix(f"{prefix}/units/")).kvs:
            try:
                units[kv.key.rsplit("/", 1)[-1]] = json.loads(kv.value)
            except (ValueError, RecursionError):
                notes.append(_skip(kv.key, "not a unit summary"))
        snap = await etcd.get_prefix(rel.header_key(prefix))  # the header and the rollout's keys, together
        header = _header_of(next((kv for kv in snap.kvs if kv.key == rel.header_key(prefix)), None), notes)
        tracker: _Tracker | None = None
        mids: tuple[str, ...] = ()
        if header is not None and not header.terminal:
            tracker = _Tracker(prefix, header.revision)
            tracker.rollout_kvs([kv for kv in snap.kvs if kv.key.startswith(rel.rollout_prefix(prefix,
                                                                                               header.revision))])
            notes += tracker.notes
            mids = views.participants(header, tracker.listed, tracker.record)

        def state(mid: str) -> views.HostState | None:
            if tracker is None or header is None or mid not in mids:
                return None
            return views.host_state(header, mid, tracker.reports, tracker.record)

        rows = [views.HostRow(r.machine_id, r.name, r.environment, r.role, r.release,
                              views.heal_summary(units.get(r.machine_id)), r.machine_id == leader,
                              state(r.machine_id), r.env_etag)
                for r in records]
        known = {r.machine_id for r in records}
        rows += [views.HostRow(m, m[:12], "-", "-", None, views.heal_summary(units.get(m)), m == leader,
                               state(m)) for m in mids if m not in known]  # taking part, not registered
        rows.sort(key=lambda r: (r.environment, r.role, r.name))
        _flush_notes(notes)
        if args.json:
            print(json.dumps(views.status_json(rows, header), sort_keys=True, default=str))
        else:
            for line in views.status_lines(rows, header):
                print(line)
        return EXIT_OK

    return _with_etcd(config, go)


def _history(args: argparse.Namespace) -> int:
    from norm.core.rollout import Rollout

    config = _load(args)

    async def go(etcd: Etcd) -> int:
        records = []
        for kv in (await etcd.get_prefix(f"{config.keys.prefix}/history/")).kvs:
            try:
                records.append(Rollout.decode(kv.value, kv.key))
            except InvalidValue as e:
                print(_skip(kv.key, e.reason), file=sys.stderr)
        records.sort(key=lambda r: r.revision, reverse=True)
        records = records[:args.limit]
        if args.json:
            for r in records:
                print(r.encode().decode())
        elif not records:
            print("no finished rollout yet")
        else:
            for line in views.table(views.history_rows(records)):
                print(line)
        return EXIT_OK

    return _with_etcd(config, go)


def _default_requester() -> str:
    import getpass
    import socket

    try:
        user = os.environ.get("USER") or getpass.getuser()
    except (OSError, KeyError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _abort(args: argparse.Namespace) -> int:
    from norm.adapters.etcd import Compare, Put
    from norm.core import release as rel

    by = args.by if args.by is not None else _default_requester()
    if not by or len(by) > 200 or views.clean(by) != by:
        raise InvalidValue("--by", "1 to 200 printable characters")
    config = _load(args)
    prefix = config.keys.prefix

    async def go(etcd: Etcd) -> int:
        for _ in range(10):
            notes: list[str] = []
            kv = await etcd.get(rel.header_key(prefix))
            header = _header_of(kv, notes)
            _flush_notes(notes)
            if kv is None or header is None or header.terminal:
                last = "" if header is None else f" (the last, {views.rollout_line(header)})"
                print(f"norm: no rollout is running{last}", file=sys.stderr)
                return EXIT_FAILED
            # Written only while the header is the one read: never for a rollout that has ended since.
            result = await etcd.txn([Compare(rel.header_key(prefix), "mod", "==", kv.mod_revision)],
                                    [Put(rel.abort_key(prefix, header.revision), rel.abort_request(by))])
            if result.succeeded:
                print(f"abort requested for rollout {header.revision}")
                return EXIT_OK
        print("norm: the rollout kept changing while the abort was being written; try again",
              file=sys.stderr)
        return EXIT_FAILED

    return _with_etcd(config, go)


def _access(args: argparse.Namespace) -> int:
    from norm.core import access
    from norm.core.secret import Secret

    config = _load(args)
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
    passwords: dict[str, Secret] = {}
    for user, path in files.items():  # every file read before anything changes
        try:
            lines = Path(path).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidValue(f"--password-file {user}", f"cannot read {path}: "
                               f"{getattr(e, 'strerror', None) or 'not UTF-8 text'}") from None
        if not lines or not lines[0]:
            raise InvalidValue(f"--password-file {user}", f"the first line of {path} is empty")
        passwords[user] = Secret(lines[0])
    apply = args.access_command == "apply"

    async def go(etcd: Etcd) -> int:
        current = access.Current(roles={r.name: await etcd.role_permissions(r.name) for r in wanted.roles},
                                 users={u.name: await etcd.user_roles(u.name) for u in wanted.users})
        todo = access.changes(wanted, current)
        for change in todo:
            print(access.etcdctl(change), flush=True)
            if apply:
                await _change_access(etcd, change, passwords)
        verb = "applied" if apply else "to make"
        print(f"# {len(todo)} changes {verb}" if todo else "# nothing to change", flush=True)
        if await etcd.auth_enabled() is False:
            print("norm: etcd's authentication is off: the roles bind nobody until it is on "
                  "(etcdctl user add root; etcdctl auth enable)", file=sys.stderr)
        return EXIT_OK

    return _with_etcd(config, go)


async def _change_access(etcd: Etcd, change: Change, passwords: Mapping[str, Secret]) -> None:
    from norm.core import access

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
