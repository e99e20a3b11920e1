"""make bench-update: how long a whole fleet update through Norm takes, next to the same work done
directly, without Norm, on the same fleet in the same run.

The fleet (bench.fleet): 3 simulated hosts, each with its own systemd manager, Docker engine and real
`norm agent` process in update mode, on a 3-member etcd cluster, with the demo app's two units
(djed-web, djed-api, which `docker run` the image the release file names) and a local registry.
Every round deploys a version never built before, padded with --size-mb MB of its own random bytes
(at least 50 MB), so that every host really pulls it: no layer is shared with an earlier version.

Two kinds of rounds, interleaved (limit, Norm, Norm, limit, limit, Norm, ... so that a drift of the
machine's speed weighs on both alike):
- Norm: `etcdctl put /djed-version <tag>`, as an operator types it. Norm's leader resolves the tag to a
  digest, every host pulls by digest, reports, stops its units, the leader runs `migrate` then
  `collectstatic` in one-off containers of the new image, every host writes its release file and
  starts its units. converge_s: from just before the put until every host's two units serve the new
  tag (GET /version on each port, polled every 20 ms from the put on; a unit is active only once its
  port answers, see sandbox.app).
- limit: the same work by hand, at once, without Norm (whose agents keep running, idle): resolve the
  tag to a digest through the first host's engine (the API call Norm's leader makes), pull
  <repo>@<digest> on all hosts in parallel, `systemctl stop` of both units on all hosts in parallel,
  run `migrate` then `collectstatic` in one-off containers of the new image with the mounts Norm gives
  them, then on all hosts in parallel the release file written and `systemctl start` of both units;
  timed and polled exactly as the Norm rounds are, until every port serves the new tag. limit_s is
  that time. The engines are driven through their API, one connection each made before the clock
  starts, as an agent keeps one (--limit-client api, the default); --limit-client cli runs the docker
  command line client for every call instead (`docker pull`, `docker run --rm`), which adds a process
  start to each call: on a loaded machine that is slower than Norm itself, so no limit.

Figures are medians over --rounds rounds of each kind: limit_s, converge_s, ratio = converge_s /
limit_s, and hosts. Progress and a per-phase breakdown (from the agents' JSON logs) go to stderr; the
last line printed is one JSON object with exactly the fields hosts, limit_s, converge_s, ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiodocker

from bench.fleet import BenchFleet, bench_dir, engine_get_json, median, say
from sandbox import app, updates

AGENT_ENV = {"NORM_LOG__FORMAT": "json"}
MIN_SIZE_MB = 50
ROUND_TIMEOUT = 300.0


class Marks:
    """When each part of a round ended (time.monotonic()), and how long each took."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self._at: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self._at[name] = time.monotonic()

    def parts(self, done: float) -> dict[str, float]:
        out, last = {}, self.t0
        for name, t in self._at.items():
            out[name] = t - last
            last = t
        out["serving"] = done - last  # below 0: every port served before the last start returned
        return out


def limit_round(bf: BenchFleet, tag: str, client: str) -> tuple[float, dict[str, float]]:
    """The update done by hand; (seconds to every port serving `tag`, what each part took). `client`:
    "api" speaks to the engines' API over their sockets (one connection per engine, made beforehand,
    as an agent keeps one); "cli" runs the docker command line client for each call."""
    hosts = bf.hosts
    engines = [bf.engine(h) for h in hosts]
    managers = [bf.manager(h) for h in hosts]
    mount = f"{bf.fleet.data_dir}:/data"
    watch = bf.serving(tag)
    ref = ""  # the digest reference, once resolved

    def start(i: int) -> None:
        app.write_release(app.release_path(hosts[i]), tag, ref)
        managers[i].systemctl("start", *app.UNITS)

    def resolve() -> str:
        data = engine_get_json(engines[0], f"/distribution/{bf.repository}:{tag}/json")
        return f"{bf.repository}@{data['Descriptor']['digest']}"

    async def by_api() -> Marks:
        nonlocal ref
        clients = [aiodocker.Docker(url=e.host) for e in engines]
        try:
            await asyncio.gather(*(c.version() for c in clients))  # connected before the clock starts
            marks = Marks()
            watch.start()
            ref = resolve()
            marks.mark("resolve")
            await asyncio.gather(*(c.images.pull(ref) for c in clients))
            marks.mark("pull")
            await asyncio.gather(*(asyncio.to_thread(m.systemctl, "stop", *app.UNITS) for m in managers))
            marks.mark("stop")
            for step in ("migrate", "collectstatic"):
                container = await clients[0].containers.create({
                    "Image": ref, "Cmd": [step], "AttachStdout": False, "AttachStderr": False,
                    "HostConfig": {"NetworkMode": "host", "Binds": [mount]}})
                await container.start()
                status = await container.wait()
                await container.delete(force=True)
                if status.get("StatusCode") != 0:
                    raise RuntimeError(f"{step} exited {status}")
            marks.mark("migrate")
            await asyncio.gather(*(asyncio.to_thread(start, i) for i in range(len(hosts))))
            marks.mark("start")
            return marks
        finally:
            await asyncio.gather(*(c.close() for c in clients))

    def by_cli() -> Marks:
        nonlocal ref
        with concurrent.futures.ThreadPoolExecutor(len(hosts), thread_name_prefix="limit") as pool:
            marks = Marks()
            watch.start()
            ref = resolve()
            marks.mark("resolve")
            list(pool.map(lambda e: e.docker("pull", "-q", ref), engines))
            marks.mark("pull")
            list(pool.map(lambda m: m.systemctl("stop", *app.UNITS), managers))
            marks.mark("stop")
            for step in ("migrate", "collectstatic"):
                engines[0].docker("run", "--rm", "--network", "host", "-v", mount, ref, step)
            marks.mark("migrate")
            list(pool.map(start, range(len(hosts))))
            marks.mark("start")
            return marks

    try:
        marks = asyncio.run(by_api()) if client == "api" else by_cli()
        done = watch.wait(ROUND_TIMEOUT)
    finally:
        watch.stop()
    return done - marks.t0, marks.parts(done)


def _log_events(path: Path, rollout: int) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("rollout") == rollout:
            out.append(rec)
    return out


def _at(rec: dict[str, Any]) -> float:
    return datetime.fromisoformat(rec["timestamp"]).timestamp()


def norm_round(bf: BenchFleet, tag: str, verbose: bool = False) -> tuple[float, dict[str, float]]:
    """The update through Norm; (seconds to every port serving `tag`, what each phase took, from the
    leader's rollout.phase log lines). `verbose` shows every host's log lines of the rollout."""
    watch = bf.serving(tag)
    t0 = time.monotonic()
    wall0 = time.time()
    watch.start()
    try:
        revision = updates.set_version(bf.fleet, tag)
        done = watch.wait(ROUND_TIMEOUT)
    finally:
        watch.stop()
    converge = done - t0
    header = updates.wait_phase(bf.fleet, revision, timeout=ROUND_TIMEOUT)
    if int(header["revision"]) != revision or header["phase"] != "done":
        raise RuntimeError(f"the rollout of {tag} ended {header}")
    parts: dict[str, float] = {}
    last = 0.0
    for h in bf.hosts:
        for rec in _log_events(Path(h["dir"]) / "agent.log", revision):
            if rec.get("event") == "rollout.phase":
                at = _at(rec) - wall0
                parts[f"->{rec['phase']}"] = round(at - last, 3)
                last = at
    parts["done->serving"] = round(converge - last, 3)
    if verbose:
        for line in breakdown(bf, revision, wall0):
            say(f"    {line}")
        say(f"    {converge:7.3f} every port serves {tag}")
    return converge, parts


def breakdown(bf: BenchFleet, revision: int, wall0: float) -> list[str]:
    """Every host's rollout log lines of `revision`, seconds after wall0 (for a closer look)."""
    lines = []
    for h in bf.hosts:
        for rec in _log_events(Path(h["dir"]) / "agent.log", revision):
            lines.append((_at(rec) - wall0, h["name"], rec.get("event"), rec.get("phase") or rec.get("kind")
                          or rec.get("step") or ""))
    return [f"{t:7.3f} {name} {event} {what}" for t, name, event, what in sorted(lines)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5, help="rounds of each kind")
    ap.add_argument("--size-mb", type=int, default=MIN_SIZE_MB, help="random padding of each version")
    ap.add_argument("--limit-client", choices=("api", "cli"), default="api",
                    help="how the limit rounds drive the engines: their API, or the docker CLI")
    ap.add_argument("--verbose", action="store_true", help="every host's log lines of each Norm round")
    ap.add_argument("--workdir", type=Path, help="run under this new directory and keep it (logs)")
    args = ap.parse_args()
    if args.size_mb < MIN_SIZE_MB:
        ap.error(f"--size-mb must be at least {MIN_SIZE_MB}")
    order = [("limit", "norm", "norm", "limit")[i % 4] for i in range(2 * args.rounds)]
    results: dict[str, list[float]] = {"limit": [], "norm": []}
    with bench_dir(args.workdir, "norm-bench-update-") as workdir, \
            BenchFleet(workdir, size=3, agent_env=AGENT_ENV) as bf:
        first = bf.new_version(args.size_mb, prefix="w")
        say(f"first deploy (through Norm) of {first}: the units start, nothing is measured")
        bf.deploy(first, timeout=ROUND_TIMEOUT)
        for i, kind in enumerate(order, 1):
            tag = bf.new_version(args.size_mb, prefix="n" if kind == "norm" else "l")
            if kind == "norm":
                seconds, parts = norm_round(bf, tag, args.verbose)
            else:
                seconds, parts = limit_round(bf, tag, args.limit_client)
            results[kind].append(seconds)
            shown = {k: round(v, 3) for k, v in parts.items()}
            say(f"round {i}/{len(order)} {kind:5} {tag}: {seconds:.3f}s {json.dumps(shown)}")
        hosts = len(bf.hosts)
    limit_s = median(results["limit"])
    converge_s = median(results["norm"])
    say(f"limit rounds: {[round(s, 3) for s in results['limit']]}; "
        f"Norm rounds: {[round(s, 3) for s in results['norm']]}")
    print(json.dumps({"hosts": hosts, "limit_s": round(limit_s, 3), "converge_s": round(converge_s, 3),
                      "ratio": round(converge_s / limit_s, 3)}), flush=True)


if __name__ == "__main__":
    main()
