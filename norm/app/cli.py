"""The `norm` command: the agent, configuration checks, operator views of the fleet, and its updates.

This module is the shell: the parser (each group of commands in `norm.app.commands` adds its own),
the exit statuses, and what the commands share: loading the configuration, connecting to etcd, and
reading the values every view needs. What is shown is made in `norm.app.views`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

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
from norm.core import tracker as trk
from norm.core.errors import ConfigError, InvalidValue, NormError

if TYPE_CHECKING:
    from norm.adapters.etcd import Etcd, KeyValue
    from norm.core.host import HostRecord
    from norm.core.protocol import Header

DESCRIPTION = ("The `norm` command: the agent, configuration checks, operator views of the fleet, "
               "and its updates.")
T = TypeVar("T")
# What each group of commands adds its parsers to.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_RUNNING", "EXIT_TIMEOUT", "EXIT_UNREACHABLE", "EXIT_USAGE",
           "main", "parser"]


class Unreachable(NormError):
    """etcd could not be reached: exit EXIT_UNREACHABLE."""


def parser() -> argparse.ArgumentParser:
    # They import this module.
    from norm.app.commands import access, agent, config, hosts, plan, policy, rollout, undo

    p = argparse.ArgumentParser(prog="norm", description=DESCRIPTION)
    p.add_argument("--version", action="version", version=f"norm {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # In the order `norm --help` lists them.
    for group in (agent, config, hosts, rollout, undo, plan, policy, access):
        group.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except Unreachable as e:
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


# ---------------------------------------------------------------------------------------------------
# Arguments and configuration


def config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE",
                   help=f"configuration file (default {cfg.DEFAULT_PATH}, or $NORM_CONFIG)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting; may be repeated")


def load(args: argparse.Namespace) -> cfg.Config:
    from norm.app import settings

    return settings.load(args.config, flags=args.sets)


def load_host(args: argparse.Namespace) -> tuple[cfg.Config, str]:
    """The configuration, and the machine id of the host the command runs on."""
    from norm.app import settings

    config = load(args)
    return config, settings.identity(config).machine_id


# ---------------------------------------------------------------------------------------------------
# Connections to etcd


def connect(config: cfg.Config, machine_id: str | None = None) -> Any:
    """A connection that proves it may read the prefix, or with `machine_id`, that host's control keys
    (all a host's own etcd user may read there, for the commands run on the host)."""
    from norm.adapters.etcd import Etcd
    from norm.app import settings
    from norm.core.host import control_prefix

    probe = config.keys.prefix + "/" if machine_id is None else control_prefix(config.keys.prefix, machine_id)
    return Etcd(config.etcd, password=settings.etcd_password(config), probe_key=probe)


def with_etcd(config: cfg.Config, go: Callable[[Etcd], Awaitable[T]]) -> T:
    """Run `go` with a connection to etcd; etcd out of reach is EXIT_UNREACHABLE."""
    from norm.adapters.etcd import EtcdUnavailable

    async def run() -> T:
        async with connect(config) as etcd:
            return await go(etcd)

    try:
        return asyncio.run(run())
    except EtcdUnavailable as e:
        raise Unreachable(f"{e} (etcd.endpoints: {', '.join(config.etcd.endpoints)})") from None


# ---------------------------------------------------------------------------------------------------
# Values every view reads; what does not decode is noted (said on stderr) and left out


def skip(key: str, reason: str) -> str:
    return views.skipped(trk.Skipped(key, reason))


def header_of(kv: KeyValue | None, notes: list[str]) -> Header | None:
    if kv is None:
        return None
    header = trk.decode_header(kv)
    if isinstance(header, trk.Skipped):
        notes.append(views.skipped(header))
        return None
    return header


async def host_records(etcd: Etcd, prefix: str, notes: list[str]) -> list[HostRecord]:
    from norm.core.host import hosts_key

    records, skipped = trk.decode_hosts((await etcd.get_prefix(hosts_key(prefix))).kvs)
    notes += [views.skipped(s) for s in skipped]
    return records


def tell(notes: list[str]) -> bool:
    """Say the notes on stderr (and forget them); whether there were any."""
    for note in notes:
        print(note, file=sys.stderr)
    had = bool(notes)
    notes.clear()
    return had


def print_lines(lines: Sequence[str]) -> None:
    for line in lines:
        print(line)
