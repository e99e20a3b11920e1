"""`python -m sandbox.chaos --seeds N` (or `--seed S` to replay one run): runs the campaign on a fleet
of its own and prints one JSON line last: {"runs", "violations", "faults", "operator_actions",
"seconds"}. Exits 1 when a run found a violation (each is printed with its seed and the command
that replays it), or when the campaign itself could not do what a seed asked (a fault that could
not be undone: printed as a campaign error, not counted as a violation)."""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import time
from pathlib import Path

from sandbox.chaos.campaign import Campaign, replay_command
from sandbox.chaos.check import summary_line
from sandbox.chaos.schedule import make_schedule
from sandbox.docker import DockerEngine
from sandbox.procs import REPO
from sandbox.registry import Registry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sandbox.chaos", description=__doc__)
    p.add_argument("--seed", type=int, action="append", default=[], help="run this seed (may be repeated)")
    p.add_argument("--seeds", type=int, default=0, help="run this many seeds")
    p.add_argument("--first", type=int, default=None,
                   help="with --seeds: the first seed (the others follow it); default: random seeds")
    p.add_argument("--duration", type=float, default=18.0, help="seconds of schedule per run")
    p.add_argument("--run-dir", type=Path, default=None, help="where the fleet and logs go")
    p.add_argument("--verbose", "-v", action="store_true", help="say what each run did, violations or not")
    p.add_argument("--show", action="store_true", help="print the schedules and exit")
    args = p.parse_args(argv)
    seeds = list(args.seed)
    if args.seeds:
        if args.first is not None:
            seeds += [args.first + i for i in range(args.seeds)]
        else:
            rng = random.SystemRandom()
            seeds += [rng.randrange(1, 1_000_000) for _ in range(args.seeds)]
    if not seeds:
        seeds = [random.SystemRandom().randrange(1, 1_000_000)]
    if args.show:
        for s in seeds:
            print(f"seed {s}:\n{make_schedule(s, args.duration).describe()}")
        return 0

    def say(msg: str) -> None:
        print(msg, flush=True)

    began = time.monotonic()
    run_dir = args.run_dir or REPO / ".run" / "chaos" / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    say(f"chaos: {len(seeds)} run(s), seeds {' '.join(map(str, seeds))}; logs in {run_dir}")
    registry = Registry(run_dir / "registry")
    engine = DockerEngine("images", run_dir / "images")
    campaign: Campaign | None = None
    violations = faults = actions = runs = errors = 0
    failed: list[int] = []
    stopped = False

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # the campaign stops, and everything it started goes down with it

    signal.signal(signal.SIGTERM, stop)
    try:
        registry.start()
        engine.start()
        campaign = Campaign(run_dir, registry, engine, say=say)
        say("chaos: starting the fleet")
        campaign.setup()
        for i, seed in enumerate(seeds, 1):
            say(f"chaos: run {i}/{len(seeds)}, seed {seed} ({replay_command(seed)})")
            result = campaign.run(seed, duration=args.duration)
            runs += 1
            violations += len(result.violations)
            faults += result.schedule.faults
            actions += result.schedule.operator_actions
            errors += len(result.errors)
            if result.ok:
                say(f"chaos: seed {seed}: no violation ({result.seconds:.0f}s)")
                if args.verbose:
                    say("\n".join(result.story()))
            else:
                failed.append(seed)
                say(result.report())
            with open(run_dir / "results.jsonl", "a") as f:  # each run as it ends, for the record
                f.write(json.dumps({"seed": seed, "ok": result.ok, "violations": len(result.violations),
                                    "faults": result.schedule.faults,
                                    "operator_actions": result.schedule.operator_actions,
                                    "seconds": round(result.seconds, 1)}) + "\n")
    except KeyboardInterrupt:
        stopped = True
        say(f"chaos: stopped after {runs} run(s); stopping the fleet")
    finally:
        if campaign is not None:
            campaign.close()
        engine.stop()
        registry.stop()
    if failed:
        say("chaos: seeds with violations: " + ", ".join(f"{s} ({replay_command(s)})" for s in failed))
    say(summary_line(runs, violations, faults, actions, time.monotonic() - began))
    return 130 if stopped else 1 if violations or errors else 0


if __name__ == "__main__":
    sys.exit(main())
