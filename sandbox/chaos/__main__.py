"""`python -m sandbox.chaos --seeds N` (or `--seed S` to replay one run): runs the campaign on a fleet
of its own and prints one JSON line last: {"runs", "violations", "faults", "operator_actions",
"seconds"}. Exits 1 when a run found a violation (each is printed with its seed and the command
that replays it), or when the campaign itself could not do what a seed asked (a fault that could
not be undone: printed as a campaign error, not counted as a violation)."""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sandbox.chaos.campaign import Campaign, replay_command
from sandbox.chaos.check import summary_line
from sandbox.chaos.schedule import make_schedule
from sandbox.docker import DockerEngine
from sandbox.procs import REPO
from sandbox.registry import Registry

CODE = ("norm", "sandbox", "pyproject.toml", "constraints.txt")  # what a run's outcome depends on


def _code_version() -> str:
    """The git trees of the code the campaign runs (Norm, the sandbox, the pinned dependencies), with
    "+changes" when those files differ from the commit: a change elsewhere (docs) keeps the version."""
    def git(*args: str) -> str:
        r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return r.stdout.strip()

    trees = git("rev-parse", *(f"HEAD:{path}" for path in CODE)).split()
    changed = git("status", "--porcelain", "--untracked-files=no", "--", *CODE)
    return (hashlib.sha256(" ".join(trees).encode()).hexdigest()[:16] if trees else "unknown") + \
        ("+changes" if changed else "")


def _plan(args: argparse.Namespace) -> tuple[Path, dict[str, Any], list[dict[str, Any]]]:
    """The campaign's directory, its plan (seeds, duration, code) and the runs already done in it."""
    if args.resume is not None:
        run_dir = args.resume
        try:
            plan = json.loads((run_dir / "campaign.json").read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"chaos: {run_dir} holds no campaign to resume ({e})") from None
        if plan["code"] != _code_version() or plan["code"].endswith("+changes"):
            raise SystemExit(f"chaos: the campaign in {run_dir} ran {plan['code']}, and this is "
                             f"{_code_version()}: its runs do not count for this code; start a new one")
        done = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines() if line] \
            if (run_dir / "results.jsonl").exists() else []
        return run_dir, plan, done
    seeds = list(args.seed)
    if args.seeds:
        if args.first is not None:
            seeds += [args.first + i for i in range(args.seeds)]
        else:
            rng = random.SystemRandom()
            seeds += [rng.randrange(1, 1_000_000) for _ in range(args.seeds)]
    if not seeds:
        seeds = [random.SystemRandom().randrange(1, 1_000_000)]
    run_dir = args.run_dir or REPO / ".run" / "chaos" / time.strftime("%Y%m%d-%H%M%S")
    plan = {"seeds": seeds, "duration": args.duration, "code": _code_version(), "sessions": []}
    return run_dir, plan, []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sandbox.chaos", description=__doc__)
    p.add_argument("--seed", type=int, action="append", default=[], help="run this seed (may be repeated)")
    p.add_argument("--seeds", type=int, default=0, help="run this many seeds")
    p.add_argument("--first", type=int, default=None,
                   help="with --seeds: the first seed (the others follow it); default: random seeds")
    p.add_argument("--duration", type=float, default=18.0, help="seconds of schedule per run")
    p.add_argument("--run-dir", type=Path, default=None, help="where the fleet and logs go")
    p.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help="go on with the campaign of RUN_DIR (same code only): the seeds it has not run yet")
    p.add_argument("--verbose", "-v", action="store_true", help="say what each run did, violations or not")
    p.add_argument("--show", action="store_true", help="print the schedules and exit")
    args = p.parse_args(argv)
    run_dir, plan, done = _plan(args)
    if args.show:
        for s in plan["seeds"]:
            print(f"seed {s}:\n{make_schedule(s, plan['duration']).describe()}")
        return 0
    ran = {r["seed"] for r in done}
    seeds = [s for s in plan["seeds"] if s not in ran]

    def say(msg: str) -> None:
        print(msg, flush=True)

    began = time.monotonic()
    if not seeds and done:  # a campaign resumed once all its runs had ended: its figures again
        return _summary(done, plan, say, stopped=False, run_dir=run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "campaign.json").write_text(json.dumps(plan, indent=2))
    say(f"chaos: {len(seeds)} run(s), seeds {' '.join(map(str, seeds))}; logs in {run_dir}"
        + (f" (resumed: {len(done)} run(s) done before)" if done else ""))
    registry = Registry(run_dir / "registry")
    engine = DockerEngine("images", run_dir / "images")
    campaign: Campaign | None = None
    results = list(done)
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
            result = campaign.run(seed, duration=plan["duration"])
            if result.ok:
                say(f"chaos: seed {seed}: no violation ({result.seconds:.0f}s)")
                if args.verbose:
                    say("\n".join(result.story()))
            else:
                say(result.report())
            outcome = {"seed": seed, "ok": result.ok, "violations": len(result.violations),
                       "errors": len(result.errors), "faults": result.schedule.faults,
                       "operator_actions": result.schedule.operator_actions,
                       "seconds": round(result.seconds, 1)}
            results.append(outcome)
            with open(run_dir / "results.jsonl", "a") as f:  # each run as it ends, for the record
                f.write(json.dumps(outcome) + "\n")
    except KeyboardInterrupt:
        stopped = True
        say(f"chaos: stopped after {len(results) - len(done)} run(s); stopping the fleet")
    finally:
        if campaign is not None:
            campaign.close()
        engine.stop()
        registry.stop()
        plan["sessions"].append(round(time.monotonic() - began, 1))
        (run_dir / "campaign.json").write_text(json.dumps(plan, indent=2))
    return _summary(results, plan, say, stopped=stopped, run_dir=run_dir)


def _summary(results: list[dict[str, Any]], plan: dict[str, Any], say: Callable[[str], None], *,
             stopped: bool, run_dir: Path) -> int:
    failed = [r["seed"] for r in results if not r["ok"]]
    if failed:
        say("chaos: seeds with violations: " + ", ".join(f"{s} ({replay_command(s)})" for s in failed))
    if stopped:
        say(f"chaos: to go on: make chaos CHAOS_ARGS='--resume {run_dir}'")
    # `seconds`: the wall time of every session of the campaign (a resumed one has several).
    say(summary_line(len(results), sum(r["violations"] for r in results), sum(r["faults"] for r in results),
                     sum(r["operator_actions"] for r in results), sum(plan["sessions"])))
    bad = any(r["violations"] or r.get("errors") for r in results)
    return 130 if stopped else 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
