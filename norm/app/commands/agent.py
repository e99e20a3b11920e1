"""`norm agent`: run the agent on this host."""

from __future__ import annotations

import argparse
import asyncio

from norm.app import cli
from norm.core import config as cfg


def register(sub: cli.Subparsers) -> None:
    agent = sub.add_parser("agent", help="run the agent on this host")
    cli.config_args(agent)
    agent.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from norm.app import logging as norm_logging
    from norm.app import settings
    from norm.app.agent import Agent

    tree = settings.load_tree(args.config, flags=args.sets)
    config = cfg.build(tree)
    identity = settings.identity(config)
    settings.etcd_password(config)  # a missing password file is a configuration error, said now
    norm_logging.configure(config.log.level, config.log.format)
    return asyncio.run(Agent(config, identity, host_given=settings.given(tree, "host")).run())
