"""make bench-control: how fast a bad canary is taken out, and how fast webhooks reach their receiver.

The fleet (bench.fleet, with HAProxy and Prometheus): 5 simulated hosts, each with its own systemd
manager, Docker engine and real `norm agent` process in update mode, on a 3-member etcd cluster, a real
HAProxy in front of the hosts' web units, a real Prometheus (Debian's) scraping every web unit each
second, its series labelled with the host's name, and a real webhook receiver (sandbox.webhooks) the
fleet's policy posts every event to. Steady load goes through HAProxy to `/` at `--rate` requests per
second during every rollout, so that the canary has traffic to be judged on.

The policy is the one an operator gets (strategy auto, max_unavailable 1, min_healthy 10 s) with a
canary of one host and one analysis query, its error rate over 10 s:

    sum(rate(djed_http_requests_total{code="500",host=~"$CANARY"}[10s]))
      / sum(rate(djed_http_requests_total{host=~"$CANARY"}[10s]))  < 0.01

measured every `--interval` seconds (2 by default, where a real fleet would take 30 s or more: the
benchmark overrides it to measure in minutes what it claims; the JSON says so), 5 measurements, one
failure tolerated (failure_limit 1).

- Canary aborts (`--aborts` rounds): a release whose `/` answers 500 to one request in twenty.
  verdict_s: from the analysis's start to its verdict (the leader's log), which the analysis settles
  at the second failed measurement: (failure_limit + 1) x interval after it began, plus the queries'
  time, when every measurement fails; abort_bound_s is that bound. The canary is back in HAProxy
  only as its analysis begins, so the first measurement's 10 s window may hold too few of its
  requests to show an error yet: it passes, and the verdict comes one interval later.
  canary_abort_s: from the analysis's start until the canary's web unit answers the previous
  release again (polled every 20 ms): the verdict, the canary's move back, its start. Every abort
  must end `rolled_back` with no other host moved.
- Webhooks: every event of those rollouts and of `--good` good rollouts (whose canary passes and the
  rest follow), as the receiver took them: latency = the receiver's clock when it took the POST minus
  the notice's `at` (the leader's clock when the change was written; one machine, one clock).
  webhook_p50_ms / webhook_p99_ms over webhook_events.

The last line printed is one JSON object: hosts, aborts, analysis_interval_s (overridden),
failure_limit, abort_bound_s, verdict_s_p50, verdict_s_max, canary_abort_s_p50, canary_abort_s_max,
webhook_events, webhook_p50_ms, webhook_p99_ms. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.common import percentile
from bench.fleet import BenchFleet, bench_dir, median, say
from bench.rolling import settle
from norm.core.analysis import AnalysisQuery
from norm.core.notify import Webhook
from norm.core.policy import FleetPolicy, StepPolicy
from sandbox import app, load, updates
from sandbox.images import DemoOptions
from sandbox.procs import SandboxError, wait_for
from sandbox.webhooks import WebhookReceiver

AGENT_ENV = {"NORM_LOG__FORMAT": "json"}
FAILURE_LIMIT = 1
ERRORS = DemoOptions(migrations="expand", error_rate=0.05)
GOOD = DemoOptions(migrations="expand", metrics=True)


def policy(interval: float, url_file: Path) -> FleetPolicy:
    error_rate = AnalysisQuery(
        name="error-rate", interval=interval, count=5, success="result < 0.01", failure_limit=FAILURE_LIMIT,
        inconclusive_limit=2,
        query='sum(rate(djed_http_requests_total{code="500",host=~"$CANARY"}[10s]))'
              ' / sum(rate(djed_http_requests_total{host=~"$CANARY"}[10s]))')
    return FleetPolicy(strategy="auto", canary="1", analysis=(error_rate,),
                       steps=(StepPolicy("migrate", "migrate", "pre"),),
                       webhooks=(Webhook("bench", str(url_file)),))


def log_events(bf: BenchFleet, event: str) -> list[dict[str, Any]]:
    """Every host's agent's log entries of `event`."""
    out = []
    for h in bf.hosts:
        for line in (Path(h["dir"]) / "agent.log").read_text().splitlines():
            if f'"{event}"' in line:
                entry = json.loads(line)
                if entry.get("event") == event:
                    out.append(entry)
    return out


def wall(entry: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(entry["timestamp"]).replace("Z", "+00:00")).timestamp()


def canary_abort(bf: BenchFleet, rate: float, old: str) -> tuple[float, float]:
    """One release serving errors, deployed under load: (verdict_s, canary_abort_s)."""
    lb = bf.state.get("haproxy")
    assert lb is not None
    tag = bf.new_version(0, prefix="e", options=ERRORS)
    with load.running(lb["url"] + "/", rate):
        revision = updates.set_version(bf.fleet, tag)

        found: list[str] = []

        def canary_watched() -> bool:
            rec = updates.record(bf.fleet, revision)
            if rec is None or rec.get("waiting") != "canary":
                return False
            found.append(str(rec["batches"][0][0]))
            return True

        wait_for(canary_watched, timeout=300, what=f"{tag}'s canary analysed", interval=0.05)
        name = bf.by_machine_id(found[0])["name"]
        web = bf.ports[name][0]

        def old_again() -> bool:
            try:
                return app.fetch(web, timeout=1.0) == old
            except OSError:
                return False

        wait_for(old_again, timeout=300, what=f"{name} serving {old} again", interval=0.02)
        back = time.time()
        header = updates.wait_phase(bf.fleet, revision, timeout=300)
    if header["phase"] != "rolled_back" or "failed its analysis" not in str(header.get("reason")):
        raise SandboxError(f"the rollout of {tag} ended {header}")
    moved = [e for e in log_events(bf, "executor.moving") if str(e.get("release", "")).startswith(f"{tag}@")]
    if len(moved) != 1:
        raise SandboxError(f"{len(moved)} hosts moved to {tag}, not the canary alone")
    began, decided = (wall([e for e in log_events(bf, event) if e.get("rollout") == revision][-1])
                      for event in ("rollout.analysing", "rollout.analysed"))
    return decided - began, back - began


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, default=5)
    ap.add_argument("--rate", type=float, default=100.0, help="requests per second through HAProxy")
    ap.add_argument("--interval", type=float, default=2.0, help="the analysis query's interval, seconds")
    ap.add_argument("--aborts", type=int, default=5)
    ap.add_argument("--good", type=int, default=2)
    ap.add_argument("--workdir", type=Path, help="run under this new directory and keep it (logs)")
    args = ap.parse_args()
    with bench_dir(args.workdir, "norm-bench-control-") as workdir, \
            BenchFleet(workdir, size=args.hosts, agent_env=AGENT_ENV, haproxy=True, prometheus=True) as bf:
        receiver = WebhookReceiver(workdir / "webhooks")
        receiver.start()
        try:
            url_file = workdir / "webhook.url"
            url_file.write_text(receiver.url)
            first = bf.new_version(0, prefix="w", options=GOOD)
            say(f"first deploy (through Norm) of {first}: a recreate, nothing is measured")
            bf.deploy(first, timeout=600)
            settle(bf)
            start = updates.put(bf.fleet, f"{updates.PREFIX}/policy",
                                policy(args.interval, url_file).encode().decode())
            current, verdicts, aborts = first, [], []
            for i in range(args.aborts):
                verdict_s, abort_s = canary_abort(bf, args.rate, current)
                verdicts.append(verdict_s)
                aborts.append(abort_s)
                say(f"abort {i + 1}: verdict {verdict_s:.3f}s after the analysis began; the canary served "
                    f"{current} again {abort_s:.3f}s after it began")
                settle(bf)
            lb = bf.state.get("haproxy")
            assert lb is not None
            for _ in range(args.good):
                current = bf.new_version(0, prefix="g", options=GOOD)
                with load.running(lb["url"] + "/", args.rate):
                    header = bf.deploy(current, timeout=600)
                say(f"good release {current}: {header['phase']}")
                settle(bf)
            wait_for(lambda: not updates.get_kvs(bf.fleet, f"{updates.PREFIX}/outbox/", prefix=True),
                     timeout=120, what="every webhook event delivered", interval=0.2)
            taken = [r for r in receiver.taken() if r["body"] and r["body"].get("rollout", 0) > start]
            latencies = [(r["at"] - r["body"]["at"]) * 1000 for r in taken]
        finally:
            receiver.stop()
    bound = (FAILURE_LIMIT + 1) * args.interval
    print(json.dumps({
        "hosts": args.hosts, "aborts": args.aborts, "analysis_interval_s": args.interval,
        "failure_limit": FAILURE_LIMIT, "abort_bound_s": bound,
        "verdict_s_p50": round(median(verdicts), 3), "verdict_s_max": round(max(verdicts), 3),
        "canary_abort_s_p50": round(median(aborts), 3), "canary_abort_s_max": round(max(aborts), 3),
        "webhook_events": len(latencies), "webhook_p50_ms": round(percentile(latencies, 50), 1),
        "webhook_p99_ms": round(percentile(latencies, 99), 1)}), flush=True)


if __name__ == "__main__":
    main()
