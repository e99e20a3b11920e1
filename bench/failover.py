"""make bench-failover: how long a fleet update stalls when its leader dies with kill -9 during PULL.

The fleet (bench.fleet): 3 simulated hosts, each with its own systemd manager, Docker engine and real
`norm agent` process in update mode, on a 3-member etcd cluster, every agent with a lease TTL of
--ttl seconds (NORM_ETCD__LEASE_TTL; the agent's registration and its leadership hang on that lease).

Each round: a version never built before (--size-mb MB of its own random bytes, so the pull takes a
while) is set with `etcdctl put /djed-version <tag>`, as an operator would. This process watches
everything under /norm/ in etcd. When the rollout header of that tag shows phase "pull", it sends
SIGKILL to the agent of the host holding /norm/leader (the leader's own pull is killed with it). The
other agents must take over on their own: nothing is restarted until the rollout has advanced.
Times are time.monotonic() when the watch event reached this process; seconds from the kill:
- expired: /norm/leader deleted (the dead agent's lease expired on the server).
- elected: /norm/leader created again, by another host.
- resume_s: the rollout advancing again, defined as the first put of the rollout's record
  (/norm/rollouts/<revision>/record) at an etcd revision after the new leader key's create revision.
  Every write of the record is a transaction fenced on that key, so such a put is the new leader's
  first write to the rollout: here the dead host excluded from the PULL barrier (host lost), which
  also lets the barrier pass.
Then the killed agent is started again, the rollout must end "done" without that host, and that host
must catch up (every host serving the new tag) before the next round.

Figures: ttl_s, the configured lease TTL; resume_s, the median over --rounds rounds. The max and each
round's breakdown go to stderr; the last line printed is one JSON object with exactly the fields
ttl_s and resume_s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from pathlib import Path

from bench.fleet import BenchFleet, bench_dir, median, say
from norm.adapters.etcd import Etcd, Event, Resync
from norm.core.config import EtcdConfig
from sandbox import updates

PREFIX = "/norm/"
LEADER_KEY = "/norm/leader"
HEADER_KEY = "/norm/rollout"
MIN_SIZE_MB = 50
ROUND_TIMEOUT = 120.0


class Round:
    """What the watch showed in one round, in arrival order."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.leader: str | None = None  # machine id holding the leader key
        self.leader_create: int = 0
        self.killed: str | None = None  # machine id of the agent killed
        self.kill_at: float | None = None
        self.expired_at: float | None = None
        self.elected_at: float | None = None
        self.elected: str | None = None
        self.new_leader_create: int | None = None
        self.resumed_at: float | None = None
        self.rollout: int | None = None
        self.phases_after_kill: list[str] = []

    def seconds(self, t: float | None) -> float | None:
        return None if t is None or self.kill_at is None else round(t - self.kill_at, 3)


async def run_round(bf: BenchFleet, etcd: Etcd, tag: str, pids: dict[str, int]) -> Round:
    r = Round(tag)
    async with etcd.watch(PREFIX, prefix=True) as w:
        first = await anext(w)
        assert isinstance(first, Resync)
        for kv in first.snapshot.kvs:
            if kv.key == LEADER_KEY:
                r.leader, r.leader_create = kv.value.decode(), kv.create_revision
        put = asyncio.create_task(asyncio.to_thread(updates.set_version, bf.fleet, tag), name="put")
        try:
            async with asyncio.timeout(ROUND_TIMEOUT):
                async for item in w:
                    now = time.monotonic()
                    if not isinstance(item, Event):
                        continue  # a re-list after compaction: none is made during the benchmark
                    kv = item.kv
                    if kv.key == LEADER_KEY:
                        if item.kind == "delete":
                            if r.kill_at is not None and r.expired_at is None:
                                r.expired_at = now
                        elif kv.create_revision != r.leader_create:
                            r.leader, r.leader_create = kv.value.decode(), kv.create_revision
                            if r.kill_at is not None and r.elected_at is None:
                                r.elected_at, r.elected = now, r.leader
                                r.new_leader_create = kv.create_revision
                    elif kv.key == HEADER_KEY and item.kind == "put":
                        header = json.loads(kv.value)
                        if header.get("tag") != tag:
                            continue
                        r.rollout = int(header["revision"])
                        if r.kill_at is None and header["phase"] == "pull":
                            assert r.leader is not None, "no leader when the rollout began"
                            r.killed = r.leader
                            r.kill_at = time.monotonic()
                            os.kill(pids[r.leader], signal.SIGKILL)
                        elif r.kill_at is not None:
                            r.phases_after_kill.append(header["phase"])
                    elif (r.rollout is not None and kv.key == f"/norm/rollouts/{r.rollout}/record"
                          and item.kind == "put" and r.new_leader_create is not None
                          and kv.mod_revision > r.new_leader_create):
                        r.resumed_at = now
                        return r
        finally:
            await put
    raise AssertionError("the watch ended")


def finish_round(bf: BenchFleet, r: Round) -> None:
    """Start the killed agent again, and wait for the rollout to end and every host to serve the tag."""
    assert r.killed is not None and r.rollout is not None
    killed = bf.by_machine_id(r.killed)
    bf.fleet.restart_agent(killed["name"])
    header = updates.wait_phase(bf.fleet, r.rollout, timeout=ROUND_TIMEOUT)
    if int(header["revision"]) != r.rollout or header["phase"] != "done":
        raise RuntimeError(f"the rollout of {r.tag} ended {header}")
    if r.killed not in header["excluded"]:
        raise RuntimeError(f"the killed leader {killed['name']} was not excluded: {header}")
    watch = bf.serving(r.tag).start()
    try:
        watch.wait(ROUND_TIMEOUT)  # the killed host catches up once the rollout is over
    finally:
        watch.stop()
    bf.fleet.wait_registered(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ttl", type=int, default=5, help="the agents' lease TTL in seconds")
    ap.add_argument("--size-mb", type=int, default=MIN_SIZE_MB, help="random padding of each version")
    ap.add_argument("--workdir", type=Path, help="run under this new directory and keep it (logs)")
    args = ap.parse_args()
    if args.size_mb < MIN_SIZE_MB:
        ap.error(f"--size-mb must be at least {MIN_SIZE_MB}")
    env = {"NORM_ETCD__LEASE_TTL": str(args.ttl),
           "NORM_ETCD__REQUEST_TIMEOUT": "2",
           "NORM_LOG__FORMAT": "json"}
    resumes: list[float] = []
    with bench_dir(args.workdir, "norm-bench-failover-") as workdir, \
            BenchFleet(workdir, size=3, agent_env=env) as bf:
        first = bf.new_version(args.size_mb, prefix="w")
        say(f"first deploy of {first}: the units start, nothing is measured")
        bf.deploy(first)
        etcd_config = EtcdConfig(endpoints=tuple(bf.state["endpoints"]), request_timeout=2.0)

        async def measure(tag: str, pids: dict[str, int]) -> Round:
            async with Etcd(etcd_config) as etcd:
                return await run_round(bf, etcd, tag, pids)

        for i in range(1, args.rounds + 1):
            tag = bf.new_version(args.size_mb, prefix="f")
            pids: dict[str, int] = {}
            for h in bf.hosts:
                pid = bf.fleet.agent_pid(h["name"])
                if pid is None:
                    raise RuntimeError(f"{h['name']}: no agent running before round {i}")
                pids[h["machine_id"]] = pid
            r = asyncio.run(measure(tag, pids))
            assert r.killed is not None and r.elected is not None and r.resumed_at is not None
            killed, elected = bf.by_machine_id(r.killed)["name"], bf.by_machine_id(r.elected)["name"]
            resume = r.seconds(r.resumed_at)
            assert resume is not None
            resumes.append(resume)
            say(f"round {i}/{args.rounds} {tag} rollout {r.rollout}: killed {killed}'s agent during pull; "
                f"leader key gone after {r.seconds(r.expired_at)}s, {elected} elected after "
                f"{r.seconds(r.elected_at)}s, rollout record written by it after {resume}s; "
                f"header phases seen after the kill: {r.phases_after_kill}")
            finish_round(bf, r)
            say(f"round {i}/{args.rounds}: rollout done without {killed}, which caught up after its restart")
    say(f"resume_s by round: {resumes}; median {median(resumes):.3f}, max {max(resumes):.3f} "
        f"(ttl {args.ttl}s)")
    print(json.dumps({"ttl_s": args.ttl, "resume_s": round(median(resumes), 3)}), flush=True)


if __name__ == "__main__":
    main()
