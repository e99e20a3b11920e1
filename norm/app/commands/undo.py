"""`norm undo [--to REVISION]`: the fleet back on the release it ran before (or on the one a finished
rollout deployed), with no configuration to edit.

Checked before anything is written, with what the leader would check: the ledger of every step run
(the release gone back to must not be below a rollback floor, nor need a down-migration: steps of a
newer release that ran with the fleet stopped, or after its batches) and the fleet's policy
(`compatible`). The version key is written with a deploy request naming the digest: the rollout fails,
touching nothing, if the tag was pushed again since and names another image.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from norm.app import cli
from norm.app.views import EXIT_FAILED, EXIT_OK
from norm.core import config as cfg
from norm.core import protocol as proto
from norm.core.errors import InvalidValue
from norm.core.protocol import release_text
from norm.core.record import Phase, Release, Rollout

if TYPE_CHECKING:
    from norm.adapters.etcd import Etcd

UNDO_EPILOG = """\
exit status:
  0  written (without --wait), or the rollout back is done (with --wait)
  1  refused (a rollout under way, nothing to go back to, a rollback floor, a down-migration:
     the reason is printed; nothing was written), or the rollout back did not end done
  2  the arguments or the configuration are not acceptable
  3  --timeout passed before the rollout ended (it goes on)
  4  etcd could not be reached
"""


def register(sub: cli.Subparsers) -> None:
    from norm.app.commands.rollout import _seconds

    undo = sub.add_parser("undo", help="roll the fleet back to the release before (no config edit)",
                          description="Roll the fleet back to the release it ran before the current one, "
                          "or to the one rollout REVISION deployed.", epilog=UNDO_EPILOG,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.config_args(undo)
    undo.add_argument("--to", type=_revision, default=None, metavar="REVISION",
                      help="the finished rollout whose release to go back to (see `norm history`)")
    undo.add_argument("--by", default=None, metavar="NAME",
                      help="who asks (default $USER@hostname); recorded with the rollout")
    undo.add_argument("--wait", action="store_true", help="follow the rollout until it ends")
    undo.add_argument("--json", action="store_true",
                      help="one JSON object (with --wait, JSON objects, one per change, as `norm rollout`)")
    undo.add_argument("--timeout", type=_seconds, default=None, metavar="SECONDS",
                      help="with --wait: give up following after this long")
    undo.set_defaults(run=undo_release)


def _revision(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("a rollout's revision") from None
    if value < 1:
        raise argparse.ArgumentTypeError("a rollout's revision, 1 or more")
    return value


def undo_release(args: argparse.Namespace) -> int:
    from norm.app.commands.rollout import _requester

    args.by = _requester(args)
    config = cli.load(args)
    return cli.with_etcd(config, lambda etcd: undo(args, config, etcd))


async def undo(args: argparse.Namespace, config: cfg.Config, etcd: Etcd) -> int:
    from norm.adapters.etcd import Compare, Put

    p = config.keys.prefix
    notes: list[str] = []
    header_kv = await etcd.get(proto.header_key(p))
    header = cli.header_of(header_kv, notes)
    cli.tell(notes)
    if header is not None and not header.terminal:
        return _refuse(f"rollout {header.revision} is under way ({header.phase.value}): let it end, or "
                       "`norm abort` it, first")
    current = None if header is None else header.fleet_release()
    finished = await _finished(etcd, p)
    target = _target(finished, current, args.to)
    if isinstance(target, str):
        return _refuse(target)
    release = target.release
    assert release is not None
    from norm.app.commands.plan import crossing, fleet_policy, read_ledger

    problem = crossing(await read_ledger(etcd, p), await fleet_policy(etcd, config), release)
    if problem is not None:
        return _refuse(problem)
    compare = [Compare(proto.header_key(p), "mod", "==", header_kv.mod_revision)] if header_kv is not None \
        else [Compare(proto.header_key(p), "version", "==", 0)]
    result = await etcd.txn(compare, [
        Put(config.keys.version, release.tag.encode("ascii")),
        Put(proto.deploy_key(p), proto.deploy_request(args.by, release.digest, target.revision))])
    if not result.succeeded:
        return _refuse("a rollout began meanwhile: look again (`norm status`)")
    if args.json:
        print(json.dumps({"tag": release.tag, "digest": release.digest, "undo": target.revision,
                          "rollout": result.revision, "by": args.by}), flush=True)
    else:
        print(f"undoing to {release_text(release)}, the release rollout {target.revision} deployed "
              f"(rollout {result.revision})", flush=True)
    if not args.wait:
        return EXIT_OK
    from norm.app.commands.rollout import follow
    from norm.app.screen import Screen
    from norm.core.tracker import Tracker

    return await follow(etcd, Tracker(p, result.revision), Screen(json_lines=args.json), args.timeout)


def _refuse(reason: str) -> int:
    print(f"norm: undo refused: {reason}", file=sys.stderr)
    return EXIT_FAILED


async def _finished(etcd: Etcd, prefix: str) -> list[Rollout]:
    """The finished rollouts kept in the history, newest first."""
    out = []
    for kv in (await etcd.get_prefix(f"{prefix}/history/")).kvs:
        try:
            out.append(Rollout.decode(kv.value, kv.key))
        except InvalidValue as e:
            print(cli.skip(kv.key, e.reason), file=sys.stderr)
    return sorted(out, key=lambda r: r.revision, reverse=True)


def _target(finished: list[Rollout], current: Release | None, to: int | None) -> Rollout | str:
    """The finished rollout whose release to go back to, or why there is none."""
    done = [r for r in finished if r.phase is Phase.DONE and r.release is not None]
    if to is not None:
        chosen = next((r for r in finished if r.revision == to), None)
        if chosen is None:
            return f"rollout {to} is not in the history kept (`norm history` lists it)"
        if chosen not in done:
            ended = (chosen.outcome or chosen.phase).value
            return f"rollout {to} did not end done ({ended}): it deployed nothing"
        if current is not None and chosen.release == current:
            return f"the fleet runs {release_text(current)}, the release rollout {to} deployed, already"
        return chosen
    before = next((r for r in done if current is None or r.release != current), None)
    if before is None:
        return "no earlier release in the history kept to go back to"
    return before
