"""`norm plan VERSION` (and `norm deploy VERSION --dry-run`): what a rollout of VERSION would do, with
nothing changed: the digest the tag resolves to, the strategy and why, the hosts and their batches,
the steps that would run and those the ledger has already, the gates, and whether the maintenance
windows let it go now.

It reads what the leader would read (the fleet's policy, the registered hosts, the ledger, the
rollout header) and asks this host's Docker engine for the digest, as the leader asks its own; the
image's label (what decides the strategy) is read when the image is on this engine already, else the
plan says the hosts will read it when they pull.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from norm.app import cli
from norm.app.views import EXIT_FAILED, EXIT_OK
from norm.core import config as cfg
from norm.core import protocol as proto
from norm.core.errors import InvalidValue
from norm.core.gate import declared_migrations
from norm.core.policy import FleetPolicy, policy_from_update_config, policy_key
from norm.core.record import LedgerEntry, Release, decode_ledger_entry
from norm.core.rollout import (
    choose_strategy,
    ledger_order,
    plan_batches,
    policy_of,
    rollback_floor,
    setback_step,
    steps_done,
)
from norm.core.windows import closed_reason

if TYPE_CHECKING:
    from norm.adapters.etcd import Etcd


def register(sub: cli.Subparsers) -> None:
    plan = sub.add_parser("plan", help="what a rollout of VERSION would do; nothing is changed")
    cli.config_args(plan)
    plan.add_argument("version", metavar="VERSION", help="the image tag")
    plan.add_argument("--json", action="store_true", help="one JSON object")
    plan.set_defaults(run=plan_version)


def plan_version(args: argparse.Namespace) -> int:
    from norm.core.desired import parse_version

    version = parse_version(args.version.encode("utf-8", "surrogatepass"), "VERSION")
    config = cli.load(args)
    return cli.with_etcd(config, lambda etcd: show_plan(etcd, config, version, as_json=args.json))


@dataclass
class Plan:
    tag: str
    digest: str | None = None
    digest_note: str | None = None
    refused: str | None = None  # why the leader would end it at once (a floor, a down-migration)
    strategy: str | None = None
    strategy_reason: str = ""
    hosts: list[str] = field(default_factory=list)
    batches: list[list[str]] = field(default_factory=list)
    canary: int = 0
    steps: list[dict[str, str]] = field(default_factory=list)
    gate: dict[str, float] = field(default_factory=dict)
    held: str | None = None  # why it would hold now (outside the windows)
    running: str | None = None  # a rollout under way: this one would wait for it, or supersede it


async def show_plan(etcd: Etcd, config: cfg.Config, tag: str, *, as_json: bool) -> int:
    plan = await make_plan(etcd, config, tag)
    if as_json:
        print(json.dumps(asdict(plan)))
    else:
        cli.print_lines(plan_lines(plan))
    return EXIT_FAILED if plan.refused else EXIT_OK


async def make_plan(etcd: Etcd, config: cfg.Config, tag: str) -> Plan:
    p = config.keys.prefix
    plan = Plan(tag)
    policy = await fleet_policy(etcd, config)
    rp = policy_of(policy)
    notes: list[str] = []
    header = cli.header_of(await etcd.get(proto.header_key(p)), notes)
    names = {h.machine_id: h.name for h in await cli.host_records(etcd, p, notes)}
    hosts = await _participants(etcd, config, policy, notes)
    cli.tell(notes)
    plan.hosts = [names.get(h, h) for h in hosts]
    if header is not None and not header.terminal:
        plan.running = (f"rollout {header.revision} ({header.tag}) is under way in {header.phase.value}: "
                        "this one would supersede it before its cut-over, or wait for its end after")
    previous = None if header is None else header.fleet_release()
    labels: Mapping[str, str] | None = None
    if config.update.image is None:
        plan.digest_note = "update.image is not set here: the tag cannot be resolved"
    else:
        plan.digest, labels, plan.digest_note = await _resolve(config, f"{config.update.image}:{tag}")
    ledger = await read_ledger(etcd, p)
    if plan.digest is not None:
        plan.refused = crossing(ledger, policy, Release(tag, plan.digest))
        if previous is not None and previous.digest == plan.digest:
            plan.refused = f"{tag} is the release already running: the rollout would end at once, done"
    if labels is None:
        plan.strategy_reason = ("decided once every host has pulled the image, by its label "
                                "org.norm.migrations (the image is not on this host's engine)")
    else:
        strategy, why = choose_strategy(rp, declared_migrations(labels).kind, previous)
        plan.strategy, plan.strategy_reason = strategy, why
        if strategy == "rolling":
            batches, plan.canary = plan_batches(hosts, rp)
            plan.batches = [[names.get(h, h) for h in b] for b in batches]
    done = steps_done(ledger, plan.digest) if plan.digest is not None else frozenset()
    for step in policy.steps:
        state = "in the ledger already: not run again" if step.name in done else "would run once"
        plan.steps.append({"name": step.name, "when": step.when, "command": step.command, "state": state})
    plan.gate = {"min_healthy": policy.min_healthy, "healthy_deadline": policy.healthy_deadline,
                 "progress_deadline": policy.progress_deadline}
    plan.held = closed_reason(policy.windows, time.time())
    return plan


def plan_lines(plan: Plan) -> list[str]:
    lines = [f"plan for {plan.tag} (nothing changed)"]
    note = f" ({plan.digest_note})" if plan.digest_note else ""
    lines.append(f"  image:     {plan.digest or '-'}{note}")
    if plan.running:
        lines.append(f"  now:       {plan.running}")
    lines.append(f"  strategy:  {plan.strategy or '?'}: {plan.strategy_reason}")
    lines.append(f"  hosts:     {len(plan.hosts)}" + (f" ({', '.join(plan.hosts)})" if plan.hosts else ""))
    for i, batch in enumerate(plan.batches):
        what = "canary" if plan.canary and i == 0 else f"batch {i + 1}"
        lines.append(f"  {what + ':':10} {', '.join(batch)}")
    for s in plan.steps:
        lines.append(f"  step:      {s['name']} ({s['when']}): {s['state']}")
    g = plan.gate
    lines.append(f"  gate:      healthy for {g['min_healthy']:g}s within {g['healthy_deadline']:g}s; "
                 f"a batch has {g['progress_deadline']:g}s")
    if plan.held:
        lines.append(f"  windows:   {plan.held}")
    if plan.refused:
        lines.append(f"  refused:   {plan.refused}")
    return lines


async def fleet_policy(etcd: Etcd, config: cfg.Config) -> FleetPolicy:
    """The fleet's policy: its key, else what this host's [update] section makes."""
    kv = await etcd.get(policy_key(config.keys.prefix))
    if kv is not None:
        try:
            return FleetPolicy.decode(kv.value, kv.key)
        except InvalidValue as e:
            print(f"norm: {e}: the hosts keep their [update] section's policy", file=sys.stderr)
    return policy_from_update_config(config.update)


async def read_ledger(etcd: Etcd, prefix: str, revision: int | None = None) -> tuple[LedgerEntry, ...]:
    """Every step ever run (or those of rollout `revision`), in the order it ran."""
    entries = []
    under = "" if revision is None else f"{proto.rev12(revision)}-"
    for kv in (await etcd.get_prefix(f"{prefix}/ledger/{under}")).kvs:
        try:
            entries.append(decode_ledger_entry(kv.value, kv.key))
        except InvalidValue as e:
            print(cli.skip(kv.key, e.reason), file=sys.stderr)
    return ledger_order(entries)


def crossing(ledger: tuple[LedgerEntry, ...], policy: FleetPolicy, release: Release) -> str | None:
    """Why the leader would refuse `release` at once (below a rollback floor, or a down-migration);
    None when it would not. A release listed `compatible` goes."""
    if release.tag in policy.compatible or release.digest in policy.compatible:
        return None
    name = proto.release_text(release)
    floor = rollback_floor(ledger, release.digest)
    if floor is not None:
        return (f"{name} is below the rollback floor: step {floor.step} of {floor.tag} ran after every host "
                "had moved to it (contract), and the release before cannot run on what it left")
    since = setback_step(ledger, release.digest)
    if since is not None:
        return (f"going back to {name} would need a down-migration: step {since.step} of {since.tag} ran "
                "with the fleet stopped since; list the release in the policy's `compatible` if it is safe")
    return None


async def _participants(etcd: Etcd, config: cfg.Config, policy: FleetPolicy,
                        notes: list[str]) -> tuple[str, ...]:
    """The registered hosts a rollout would take: those of the leader's environment (this host's when
    no leader is known) and of the policy's roles."""
    from norm.core.host import leader_key
    from norm.core.rollout import participants

    records = await cli.host_records(etcd, config.keys.prefix, notes)
    leader = await etcd.get(leader_key(config.keys.prefix))
    leading = None if leader is None else leader.value.decode(errors="replace")
    lead = next((r for r in records if r.machine_id == leading), None)
    environment = lead.environment if lead is not None else (config.host.environment or "")
    return participants(records, environment, frozenset(policy.roles) or None)


async def _resolve(config: cfg.Config, ref: str) -> tuple[str | None, Mapping[str, str] | None, str | None]:
    """The digest `ref` resolves to, the image's labels when this engine has the image, and a note when
    the digest is not known."""
    from norm.adapters.docker import Docker, DockerError

    async with Docker(config.docker.host) as docker:
        try:
            digest = (await docker.resolve(ref)).rpartition("@")[2]
        except DockerError as e:
            return None, None, f"not resolved here: {e}"
        try:
            info = await docker.inspect_image(f"{ref.rpartition(':')[0]}@{digest}")
        except DockerError:
            return digest, None, None
        return digest, info.labels, None
