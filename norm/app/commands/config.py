"""`norm config check|show|reference`: the configuration, checked or described."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from norm.app import cli
from norm.app.views import EXIT_FAILED, EXIT_OK
from norm.core import config as cfg


def register(sub: cli.Subparsers) -> None:
    conf = sub.add_parser("config", help="check or describe the configuration")
    csub = conf.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = csub.add_parser("check", help="validate a configuration file (exit 2 if it is wrong)")
    check.add_argument("file")
    check.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE")
    check.set_defaults(run=check_file)
    show = csub.add_parser("show", help="print the effective configuration (secrets masked)")
    cli.config_args(show)
    show.set_defaults(run=show_config)
    ref = csub.add_parser("reference", help="print the configuration reference in Markdown")
    ref.add_argument("--check", metavar="FILE", help="exit 1 if FILE differs from the reference")
    ref.set_defaults(run=reference)


def check_file(args: argparse.Namespace) -> int:
    from norm.app import settings

    config = settings.load(args.file, environ={}, flags=args.sets)
    settings.etcd_password(config)
    print(f"{args.file}: OK")
    return EXIT_OK


def show_config(args: argparse.Namespace) -> int:
    print(json.dumps(_plain(cli.load(args)), indent=2, default=str))
    return EXIT_OK


def reference(args: argparse.Namespace) -> int:
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
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_plain(x) for x in obj]
    return obj if obj is None or isinstance(obj, str | int | float | bool) else str(obj)
