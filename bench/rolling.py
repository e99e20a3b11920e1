"""make bench-rolling: a zero-downtime rolling update through Norm under steady load, next to the same
per-host work done by hand on the same fleet in the same run.

The fleet (bench.fleet, with HAProxy): 5 simulated hosts, each with its own systemd manager, Docker
engine and real `norm agent` process in update mode, on a 3-member etcd cluster, with a real HAProxy
(Debian's) in front of the hosts' web units, the agents keeping their servers in it (lb.backend =
"haproxy"). The fleet's policy is the default one an operator gets (strategy auto, max_unavailable 1,
min_healthy 10 s) with `migrate` before the batches and `collectstatic` after; every version's image
declares its migrations `expand`.

- limit: the per-host work of a rolling update done by hand, host after host, with that host's agent
  frozen (SIGSTOP) so that it does nothing meanwhile: HAProxy's `set server web/<host> state drain`,
  wait until the server has no session, `state maint`; `systemctl stop` of both units; `systemctl
  start` of both; the web unit's health URL answering 2xx (and the api unit active) without a break
  for min_healthy seconds, polled as the gate polls (every 0.5 s); `state ready`. limit_s is the sum
  over the hosts: one batch per host with max_unavailable = 1.
- Norm: `etcdctl put /djed-version <tag>` while an open-loop client (sandbox.load) sends `--rate`
  requests per second through HAProxy for the whole rollout, and HAProxy's Runtime API is sampled every
  50 ms for the servers in service. rollout_s: from the put to the header saying done (pull, the
  steps and every batch). requests / failed_requests: what the client sent during the rollout, and
  how many got no 2xx answer in time; min_serving: the fewest servers in service seen.

The last line printed is one JSON object with exactly the fields hosts, requests, failed_requests,
min_serving, rollout_s, limit_s and ratio (rollout_s / limit_s). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
import urllib.request
from pathlib import Path

from bench.fleet import BenchFleet, bench_dir, say
from norm.adapters.haproxy import parse_stat
from norm.core.policy import FleetPolicy, StepPolicy
from sandbox import app, load, updates
from sandbox.haproxy import HaproxyServer
from sandbox.images import DemoOptions
from sandbox.procs import SandboxError, wait_for
from sandbox.systemd import SystemdManager

AGENT_ENV = {"NORM_LOG__FORMAT": "json"}
# The defaults an operator gets, the steps split around the batches.
POLICY = FleetPolicy(steps=(StepPolicy("migrate", "migrate", "pre"),
                            StepPolicy("collectstatic", "collectstatic", "post")))
EXPAND = DemoOptions(migrations="expand")
GATE_INTERVAL = 0.5  # as the health gate polls


def runtime(bf: BenchFleet) -> HaproxyServer:
    lb = bf.state.get("haproxy")
    if lb is None:
        raise SandboxError("the benchmark's fleet has no HAProxy")
    return HaproxyServer(Path(lb["dir"]), port=lb["port"])


def serving_count(bf: BenchFleet) -> int:
    return sum(1 for admin in runtime(bf).admin_states().values() if admin == "ready")


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as r:
            return bool(200 <= r.status < 300)
    except OSError:
        return False


def by_hand(bf: BenchFleet, name: str) -> float:
    """One host's turn of a rolling update, by hand, its agent frozen; the seconds it took."""
    host = next(h for h in bf.hosts if h["name"] == name)
    rt = runtime(bf)
    web = bf.ports[name][0]
    manager = SystemdManager(name, Path(host["systemd_dir"]))
    pid = bf.fleet.agent_pid(name)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        rt.command(f"set server web/{name} state drain")
        wait_for(lambda: _sessions(rt, name) == 0, timeout=60, what=f"{name} drained", interval=0.05)
        rt.command(f"set server web/{name} state maint")
        manager.systemctl("stop", *app.UNITS)
        manager.systemctl("start", *app.UNITS)
        since: float | None = None
        while True:  # the gate: healthy without a break for min_healthy
            ok = healthy(f"http://127.0.0.1:{web}/healthz") and all(
                manager.systemctl("is-active", unit, check=False).strip() == "active" for unit in app.UNITS)
            now = time.monotonic()
            since = (since or now) if ok else None
            if since is not None and now - since >= POLICY.min_healthy:
                break
            if now - t0 > POLICY.healthy_deadline:
                raise SandboxError(f"{name} did not become healthy by hand")
            time.sleep(GATE_INTERVAL)
        rt.command(f"set server web/{name} state ready")
        return time.monotonic() - t0
    finally:
        os.kill(pid, signal.SIGCONT)


def _sessions(rt: HaproxyServer, name: str) -> int:
    for row in parse_stat(rt.command("show stat")):
        if row.get("pxname") == "web" and row.get("svname") == name:
            return int(row.get("scur") or 0)
    return 0


def norm_round(bf: BenchFleet, tag: str, rate: float) -> dict[str, float | int]:
    lb = bf.state.get("haproxy")
    assert lb is not None
    with load.running(lb["url"] + "/version", rate, lambda: serving_count(bf)) as (result, serving):
        t0 = time.monotonic()
        revision = updates.set_version(bf.fleet, tag)
        header = updates.wait_phase(bf.fleet, revision, timeout=1800)
        rollout_s = time.monotonic() - t0
    if int(header["revision"]) != revision or header["phase"] != "done":
        raise SandboxError(f"the rollout of {tag} ended {header}")
    if header.get("strategy") != "rolling":
        raise SandboxError(f"the rollout of {tag} was not rolling: {header.get('strategy_reason')}")
    for t, reason in result.failures[:10]:
        say(f"  failed request at {t:.3f}: {reason}")
    return {"requests": result.requests, "failed_requests": result.failed,
            "min_serving": serving.min_serving if serving.min_serving is not None else 0,
            "rollout_s": rollout_s}


def settle(bf: BenchFleet) -> None:
    """Every agent registered and every server in service (after the agents were frozen)."""
    bf.fleet.wait_registered(timeout=120)
    rt = runtime(bf)
    wait_for(lambda: set(rt.admin_states().values()) == {"ready"}, timeout=120,
             what="every server in service", interval=0.1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, default=5)
    ap.add_argument("--rate", type=float, default=200.0, help="requests per second through HAProxy")
    ap.add_argument("--workdir", type=Path, help="run under this new directory and keep it (logs)")
    args = ap.parse_args()
    with bench_dir(args.workdir, "norm-bench-rolling-") as workdir, \
            BenchFleet(workdir, size=args.hosts, agent_env=AGENT_ENV, haproxy=True) as bf:
        updates.put(bf.fleet, f"{updates.PREFIX}/policy", POLICY.encode().decode())
        first = bf.new_version(0, prefix="w", options=EXPAND)
        say(f"first deploy (through Norm) of {first}: a recreate, nothing is measured")
        bf.deploy(first, timeout=600)
        settle(bf)
        names = [h["name"] for h in bf.hosts]
        per_host = []
        for name in names:
            seconds = by_hand(bf, name)
            per_host.append(seconds)
            say(f"by hand: {name} drained, restarted, healthy for {POLICY.min_healthy:g}s and back "
                f"in {seconds:.3f}s")
        settle(bf)
        limit_s = sum(per_host)  # one batch per host
        tag = bf.new_version(0, prefix="r", options=EXPAND)
        say(f"rolling update to {tag} through Norm at {args.rate:g} requests/s")
        figures = norm_round(bf, tag, args.rate)
        say(f"Norm: {json.dumps({k: round(v, 3) for k, v in figures.items()})}; by hand: "
            f"{[round(s, 3) for s in per_host]}")
    rollout_s = float(figures["rollout_s"])
    print(json.dumps({"hosts": args.hosts, "requests": figures["requests"],
                      "failed_requests": figures["failed_requests"], "min_serving": figures["min_serving"],
                      "rollout_s": round(rollout_s, 3), "limit_s": round(limit_s, 3),
                      "ratio": round(rollout_s / limit_s, 3)}), flush=True)


if __name__ == "__main__":
    main()
