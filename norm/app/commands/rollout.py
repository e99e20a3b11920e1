"""`norm deploy`, `status`, `rollout`, `history`, `abort`, `pause`, `resume`, `promote`: the fleet's
updates, asked for, followed and steered.

Following a rollout is a loop over one etcd watch: each change goes into the tracker's model
(`norm.core.tracker`), what else the model asks for is read, and the screen draws the result.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from norm.app import cli, views
from norm.app.screen import Screen
from norm.app.views import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT
from norm.core import config as cfg
from norm.core import protocol as proto
from norm.core import tracker as trk
from norm.core import wire
from norm.core.errors import InvalidValue
from norm.core.tracker import Tracker

if TYPE_CHECKING:
    from norm.adapters.etcd import Etcd, WatchItem

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


def register(sub: cli.Subparsers) -> None:
    deploy = sub.add_parser("deploy", help="roll the fleet out to an image tag",
                            description="Write VERSION to the desired version key: the fleet's leader "
                            "rolls it out.", epilog=DEPLOY_EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.config_args(deploy)
    deploy.add_argument("version", metavar="VERSION", help="the image tag to run")
    deploy.add_argument("--wait", action="store_true", help="follow the rollout until it ends")
    deploy.add_argument("--by", default=None, metavar="NAME",
                        help="who asks (default $USER@hostname); recorded with the rollout")
    deploy.add_argument("--json", action="store_true",
                        help="one JSON object (with --wait, JSON objects, one per change, as `norm rollout`)")
    deploy.add_argument("--dry-run", action="store_true",
                        help="write nothing: print what the rollout would do (as `norm plan VERSION`)")
    deploy.add_argument("--now", action="store_true",
                        help="go on outside the maintenance windows and while blocking alerts fire "
                             "(recorded with the rollout)")
    deploy.add_argument("--timeout", type=_seconds, default=None, metavar="SECONDS",
                        help="with --wait: give up waiting after this long (default: no limit)")
    deploy.set_defaults(run=deploy_version)

    status = sub.add_parser("status", help="the fleet: hosts, releases, healing, leader and rollout")
    cli.config_args(status)
    status.add_argument("--json", action="store_true", help="one JSON object")
    status.set_defaults(run=over_etcd(fleet_status))

    rollout = sub.add_parser("rollout", help="follow the current rollout until it ends",
                             epilog=ROLLOUT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.config_args(rollout)
    rollout.add_argument("--once", action="store_true", help="print the current state and exit")
    rollout.add_argument("--json", action="store_true", help="JSON objects (one per change) instead of text")
    rollout.set_defaults(run=over_etcd(follow_rollout))

    history = sub.add_parser("history", help="finished rollouts, newest first")
    cli.config_args(history)
    history.add_argument("revision", nargs="?", type=_positive, default=None, metavar="REVISION",
                         help="show this one rollout in full (its record, steps and operators' actions)")
    history.add_argument("--limit", type=_positive, default=20, metavar="N", help="at most N (default 20)")
    history.add_argument("--json", action="store_true", help="one JSON record per line")
    history.set_defaults(run=over_etcd(list_history))

    abort = sub.add_parser("abort", help="ask the leader to abort the running rollout")
    cli.config_args(abort)
    abort.add_argument("--by", default=None, metavar="NAME",
                       help="who asks (default $USER@hostname); recorded as the reason")
    abort.add_argument("--json", action="store_true", help="one JSON object")
    abort.set_defaults(run=abort_rollout)

    for kind, text in REQUESTS.items():
        verb = sub.add_parser(kind, help=text)
        cli.config_args(verb)
        verb.add_argument("--by", default=None, metavar="NAME",
                          help="who asks (default $USER@hostname); recorded with the rollout")
        verb.add_argument("--json", action="store_true", help="one JSON object")
        verb.set_defaults(run=request_rollout, kind=kind)


REQUESTS = {
    "pause": "hold the running rollout at its next boundary (every host pulled, or before its next batch)",
    "resume": "let a paused rollout go on",
    "promote": "end a canary's analysis early: the other batches go",
}


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


def over_etcd(command: Callable[[argparse.Namespace, cfg.Config, Etcd], Awaitable[int]]
              ) -> Callable[[argparse.Namespace], int]:
    """`command` run with the configuration and a connection to etcd (out of reach: exit 4)."""

    def run(args: argparse.Namespace) -> int:
        config = cli.load(args)
        return cli.with_etcd(config, lambda etcd: command(args, config, etcd))

    return run


# ---------------------------------------------------------------------------------------------------
# deploy


def deploy_version(args: argparse.Namespace) -> int:
    from norm.core.desired import parse_version

    # Total on any str argv can hold (non-UTF-8 bytes arrive as surrogates): refused, never raised.
    version = parse_version(args.version.encode("utf-8", "surrogatepass"), "VERSION")
    args.by = _requester(args)
    config = cli.load(args)
    if args.dry_run:
        from norm.app.commands.plan import show_plan

        return cli.with_etcd(config, lambda etcd: show_plan(etcd, config, version, as_json=args.json))
    return cli.with_etcd(config, lambda etcd: deploy(args, config, etcd, version))


async def deploy(args: argparse.Namespace, config: cfg.Config, etcd: Etcd, version: str) -> int:
    from norm.adapters.etcd import Put

    # Who asks, in the same transaction: the deploy key's revision is the version's, the rollout's.
    result = await etcd.txn([], [Put(config.keys.version, version.encode("ascii")),
                                 Put(proto.deploy_key(config.keys.prefix),
                                     proto.deploy_request(args.by, now=args.now))])
    revision = result.revision
    if args.json:
        print(json.dumps({"version": version, "rollout": revision, "by": args.by, "now": args.now}),
              flush=True)
    else:
        print(f"deploying {version} (rollout {revision})", flush=True)
    if not args.wait:
        return EXIT_OK
    screen = Screen(json_lines=args.json)
    return await follow(etcd, Tracker(config.keys.prefix, revision), screen, args.timeout)


# ---------------------------------------------------------------------------------------------------
# Following a rollout


async def follow(etcd: Etcd, t: Tracker, screen: Screen, seconds: float | None) -> int:
    """Watch the header and the rollout's keys, redrawing on every change, until the rollout ends
    (the exit status it means) or `seconds` pass (EXIT_TIMEOUT)."""
    try:
        async with asyncio.timeout(seconds), _changes(etcd, t) as changes:
            while True:
                batch = [await changes.get()]  # what has arrived is drawn at once, as one change
                while not changes.empty():
                    batch.append(changes.get_nowait())
                for item in batch:
                    if isinstance(item, Exception):
                        raise item
                    t = _apply(t, item)
                t = screen.show(await read_more(etcd, t))
                if t.verdict in views.ENDED:
                    return ended(t)
    except TimeoutError:
        state = t.header.phase.value if t.header is not None else "not begun"
        print(f"norm: rollout {t.want} did not end within {seconds:g}s (it is {state}, and goes on; "
              f"follow it with `norm rollout`)", file=sys.stderr)
        return EXIT_TIMEOUT


@contextlib.asynccontextmanager
async def _changes(etcd: Etcd, t: Tracker) -> AsyncIterator[asyncio.Queue[WatchItem | Exception]]:
    """What one watch on proto.progress_range brings (the hosts' reports, the header and every
    rollout's keys, in etcd's order), from a task of its own so that it can be taken in batches; its
    end is an exception."""
    from norm.adapters.etcd import EtcdUnavailable

    queue: asyncio.Queue[WatchItem | Exception] = asyncio.Queue()
    key, end = proto.progress_range(t.prefix)

    async def pump() -> None:
        try:
            async with etcd.watch(key, range_end=end) as w:
                async for item in w:
                    queue.put_nowait(item)
        except Exception as e:  # CancelledError is not an Exception: it goes through
            queue.put_nowait(e)
        else:
            queue.put_nowait(EtcdUnavailable(f"watching [{key}, {end}): the watch ended"))

    task = asyncio.create_task(pump(), name=f"cli-watch-rollout-{t.want}")
    try:
        yield queue
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _apply(t: Tracker, item: WatchItem) -> Tracker:
    from norm.adapters.etcd import Resync

    if isinstance(item, Resync):
        return trk.resynced(t, item.snapshot.kvs)
    return trk.changed(t, item.kv, deleted=item.kind == "delete")


async def read_more(etcd: Etcd, t: Tracker) -> Tracker:
    """Read what the model asks for: the host names, and how the rollout ended once a later one holds
    the header."""
    from norm.core.host import hosts_key

    if trk.wants_names(t):
        t = trk.names_read(t, (await etcd.get_prefix(hosts_key(t.prefix))).kvs)
    if keys := trk.outcome_keys(t):
        values = []
        for key in keys:
            kv = await etcd.get(key)
            values.append((key, None if kv is None else kv.value))
        t = trk.outcome_read(t, values)
    return t


def ended(t: Tracker) -> int:
    """The exit status for a rollout that ended (or is still running, for --once), said on stderr
    when it is not a success."""
    code = views.exit_code(t.verdict)
    if code == EXIT_FAILED:
        print(f"norm: {views.ended_text(t)}", file=sys.stderr)
    return code


# ---------------------------------------------------------------------------------------------------
# rollout, status, history, abort


async def follow_rollout(args: argparse.Namespace, config: cfg.Config, etcd: Etcd) -> int:
    prefix = config.keys.prefix
    notes: list[str] = []
    # One read of proto.progress_range: the header, the rollout's keys and the reports as they stood
    # together.
    snap = await etcd.get_range(*proto.progress_range(prefix))
    head = next((kv for kv in snap.kvs if kv.key == proto.header_key(prefix)), None)
    header = cli.header_of(head, notes)
    cli.tell(notes)
    if header is None:
        if args.json:
            print(json.dumps({"revision": None, "verdict": views.Verdict.NONE.value, "rollout": None,
                              "hosts": []}))
        else:
            print(views.rollout_line(None))
        return EXIT_OK if head is None else EXIT_FAILED
    t = Tracker(prefix, header.revision)
    screen = Screen(json_lines=args.json, once=args.once)
    if not args.once:
        return await follow(etcd, t, screen, None)
    return ended(screen.show(await read_more(etcd, trk.resynced(t, snap.kvs))))


async def fleet_status(args: argparse.Namespace, config: cfg.Config, etcd: Etcd) -> int:
    from norm.core.host import leader_key

    prefix = config.keys.prefix
    notes: list[str] = []
    records = await cli.host_records(etcd, prefix, notes)
    leader_kv = await etcd.get(leader_key(prefix))
    leader = leader_kv.value.decode("ascii", "replace") if leader_kv is not None else None
    units: dict[str, object] = {}
    for kv in (await etcd.get_prefix(f"{prefix}/units/")).kvs:
        try:
            units[kv.key.rsplit("/", 1)[-1]] = wire.parse(kv.value, kv.key)
        except InvalidValue:
            notes.append(cli.skip(kv.key, "not a unit summary"))
    # The header, the rollout's keys and the reports, together.
    snap = await etcd.get_range(*proto.progress_range(prefix))
    header = cli.header_of(next((kv for kv in snap.kvs if kv.key == proto.header_key(prefix)), None), notes)
    running: tuple[proto.Header, Tracker] | None = None
    if header is not None and not header.terminal:
        t = trk.resynced(Tracker(prefix, header.revision), snap.kvs)
        notes += [views.skipped(s) for s in t.skipped]
        running = header, t
    rows = views.fleet_rows(records, units, leader, running)
    cli.tell(notes)
    if args.json:
        print(json.dumps(views.status_json(rows, header), sort_keys=True, default=str))
    else:
        cli.print_lines(views.status_lines(rows, header))
    return EXIT_OK


async def list_history(args: argparse.Namespace, config: cfg.Config, etcd: Etcd) -> int:
    from norm.core.record import Rollout

    if args.revision is not None:
        return await show_rollout(args, config, etcd, args.revision)
    records = []
    for kv in (await etcd.get_prefix(f"{config.keys.prefix}/history/")).kvs:
        try:
            records.append(Rollout.decode(kv.value, kv.key))
        except InvalidValue as e:
            print(cli.skip(kv.key, e.reason), file=sys.stderr)
    records.sort(key=lambda r: r.revision, reverse=True)
    records = records[:args.limit]
    if args.json:
        for r in records:
            print(r.encode().decode())
    elif not records:
        print("no finished rollout yet")
    else:
        cli.print_lines(views.table(views.history_rows(records)))
    return EXIT_OK


async def show_rollout(args: argparse.Namespace, config: cfg.Config, etcd: Etcd, revision: int) -> int:
    """One rollout in full: its record (the full one while its keys are kept, else its history entry)
    and the steps it ran."""
    from norm.app.commands.plan import read_ledger
    from norm.core.record import Rollout

    p = config.keys.prefix
    record = None
    for key in (proto.record_key(p, revision), proto.history_key(p, revision)):
        kv = await etcd.get(key)
        if kv is not None:
            try:
                record = Rollout.decode(kv.value, kv.key)
                break
            except InvalidValue as e:
                print(cli.skip(kv.key, e.reason), file=sys.stderr)
    if record is None:
        print(f"norm: no rollout {revision} is kept (`norm history` lists those that are)", file=sys.stderr)
        return EXIT_FAILED
    steps = await read_ledger(etcd, p, revision)
    notes: list[str] = []
    names = {h.machine_id: h.name for h in await cli.host_records(etcd, p, notes)}
    cli.tell(notes)
    if args.json:
        print(json.dumps({"record": json.loads(record.encode()),
                          "steps": [json.loads(e.encode()) for e in steps]}))
    else:
        cli.print_lines(views.rollout_details(record, steps, names))
    return EXIT_OK


def _requester(args: argparse.Namespace) -> str:
    by: str = args.by if args.by is not None else _default_requester()
    if not by or len(by) > 200 or views.clean(by) != by:
        raise InvalidValue("--by", "1 to 200 printable characters")
    return by


def abort_rollout(args: argparse.Namespace) -> int:
    by = _requester(args)
    config = cli.load(args)
    return cli.with_etcd(config, lambda etcd: abort(etcd, config.keys.prefix, by, as_json=args.json))


def request_rollout(args: argparse.Namespace) -> int:
    by, kind = _requester(args), args.kind
    config = cli.load(args)
    return cli.with_etcd(config, lambda etcd: ask(etcd, config.keys.prefix, kind, by, as_json=args.json))


async def abort(etcd: Etcd, prefix: str, by: str, *, as_json: bool = False) -> int:
    return await _write_request(etcd, prefix, "abort", by, as_json)


async def ask(etcd: Etcd, prefix: str, kind: str, by: str, *, as_json: bool = False) -> int:
    """An operator's pause, resume or promote request on the running rollout."""
    return await _write_request(etcd, prefix, kind, by, as_json)


async def _write_request(etcd: Etcd, prefix: str, kind: str, by: str, as_json: bool) -> int:
    from norm.adapters.etcd import Compare, Put

    for _ in range(10):
        notes: list[str] = []
        kv = await etcd.get(proto.header_key(prefix))
        header = cli.header_of(kv, notes)
        cli.tell(notes)
        if kv is None or header is None or header.terminal:
            last = "" if header is None else f" (the last, {views.rollout_line(header)})"
            print(f"norm: no rollout is running{last}", file=sys.stderr)
            return EXIT_FAILED
        # Written only while the header is the one read: never for a rollout that has ended since.
        put = Put(proto.abort_key(prefix, header.revision), proto.abort_request(by)) if kind == "abort" \
            else Put(proto.request_key(prefix, header.revision, kind), proto.operator_request(by))
        result = await etcd.txn([Compare(proto.header_key(prefix), "mod", "==", kv.mod_revision)], [put])
        if result.succeeded:
            if as_json:
                print(json.dumps({"request": kind, "rollout": header.revision, "by": by}))
            else:
                print(f"{kind} requested for rollout {header.revision}{_REQUESTED.get(kind, '')}")
            return EXIT_OK
    print(f"norm: the rollout kept changing while the {kind} was being written; try again", file=sys.stderr)
    return EXIT_FAILED


_REQUESTED = {
    "pause": ": it holds at its next boundary (every host pulled, or before its next batch); a recreate "
             "past its pull has none left and finishes",
    "promote": ": a canary waiting for its analysis is promoted; otherwise nothing changes",
}


def _default_requester() -> str:
    import getpass
    import socket

    try:
        user = os.environ.get("USER") or getpass.getuser()
    except (OSError, KeyError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"
