"""make bench-env: environment files from S3 and load-balancer presence, measured on a sandbox fleet.

The parts, all real and started under one temporary directory: a moto server (S3, ELBv2, EC2) and the
local instance metadata server (sandbox.imds: IMDSv2, the instance-profile credentials every agent's
S3 and ELBv2 clients sign with); the fleet of bench.fleet (3 simulated hosts, each with its own systemd
manager, Docker engine and real `norm agent` process in update mode, a 3-member etcd cluster, a local
image registry and the demo app's units). In moto: one VPC, one running EC2 instance per host, one
HTTP target group with the attribute deregistration_delay.timeout_seconds = 0, and the bucket holding
the environment file `sandbox.env` (the hosts' environment is "sandbox", so env.key's default
`{environment}.env` names it).

Every agent runs with, besides the fleet's own configuration:
    [aws]  endpoint_url = moto, metadata_url = the metadata server, region = "us-east-1"
    [env]  bucket, path = <host dir>/app.env, on_change = "next_rollout" (nothing is restarted: the
           figure is the fetch and the write alone), interval (see below)
    [lb]   target_groups = [the group], instance_id = the host's own EC2 instance, port = the host's
           web port, health_url = http://127.0.0.1:<web port>/health (the demo app's), drain_timeout = 5
and AWS_EC2_METADATA_SERVICE_ENDPOINT = the metadata server in its environment, no keys of its own.

Figures (the last line printed is one JSON object with exactly these fields):

- fetch_apply_p50_ms: a changed object, from the moment the agent's fetch starts to the new file in
  place, median over --rounds rounds x 3 hosts. Each round uploads a new version of the object
  (about 2 KB, 40 variables) to moto, then asks the fleet to look now, as an operator does:
  `etcdctl put /djed-environment sandbox` (written again with the same value: the trigger the service
  offers besides its timer; env.interval is 3600 s in this part, so no timed check interferes). The
  agent logs `env.environment_changed` when it sees that write, right before it starts the check (the
  conditional GET); it logs `env.written` once the file is in place (written to a temporary file,
  fsynced, renamed over the old one, the directory fsynced). The figure is the difference of those
  two lines' timestamps, on the host's one clock. Each round checks that every host's file carries
  the new object's ETag. The p99 and the time from the bench's put to `env.written` go to stderr.

- unchanged_poll_body_bytes: body bytes the agent received per check of an object that did not
  change. The agents are restarted with env.interval = 1 s; once each has done its first check, the
  counters norm_env_body_bytes_total and norm_env_fetches_total{result} are read on every host's
  /metrics, again after at least --polls more checks, and the figure is the body bytes' increase
  divided by the number of checks in between (over the 3 hosts; every one of those checks must be
  result="unchanged", i.e. a 304 to If-None-Match). moto's request log gives the statuses it sent
  for the object in that window (stderr), and the fetch rounds show the same counter does count the
  body of a changed object (stderr).

- lb_cutover_s: how long a host is out of its target group during a fleet update, median over
  --update-rounds updates x 3 hosts. Each update is `etcdctl put /djed-version <new tag>` (a version
  never deployed before, --size-mb MB of padding). Per host, from its `lb.deregistered` log line
  (the deregistration call returned, before the units are stopped) to its next `lb.registered` (the
  registration call returned, after the start, once the web unit answered its health URL). The max
  goes to stderr, with a breakdown (drained, healthy) and the time the group had no target at all:
  an update stops every host before the migrations, so the group is empty from the last host's
  deregistration to the first one's registration. After each update moto must show every host's
  target healthy again.

Progress goes to stderr. The whole run takes about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import secrets
import signal
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3

from bench.fleet import BenchFleet, bench_dir, median, say
from norm.core.envfile import source_of
from sandbox.fleet import HostState
from sandbox.imds import MetadataServer
from sandbox.moto import MotoServer
from sandbox.procs import SandboxError, wait_for

REGION = "us-east-1"
ENVIRONMENT = "sandbox"  # the fleet's hosts' host.environment
ENV_KEY = "/djed-environment"
OBJECT_KEY = f"{ENVIRONMENT}.env"
BENCH_KEYS = {"aws_access_key_id": "AKIANORMBENCH0000001", "aws_secret_access_key": "norm-bench-secret"}
DRAIN_TIMEOUT = 5
ROUND_TIMEOUT = 120.0
AGENT_ENV = {"NORM_LOG__FORMAT": "json"}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def at(rec: dict[str, Any]) -> float:
    return datetime.fromisoformat(rec["timestamp"]).timestamp()


class AgentLog:
    """A host's agent log (JSON lines, appended to across restarts), read incrementally."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self.events: list[dict[str, Any]] = []

    def refresh(self) -> list[dict[str, Any]]:
        with contextlib.suppress(FileNotFoundError), self.path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
            end = data.rfind(b"\n") + 1  # a line being written is read next time
            self._offset += end
            for line in data[:end].decode(errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # the standard library's warnings on stderr, not JSON
                if isinstance(rec, dict) and "timestamp" in rec and "event" in rec:
                    self.events.append(rec)
        return self.events

    def since(self, t: float, *names: str) -> list[dict[str, Any]]:
        return [e for e in self.refresh() if at(e) >= t and (not names or e["event"] in names)]


class Aws:
    """The bench's own clients of moto (keys of its own: moto checks nothing until told to)."""

    def __init__(self, endpoint: str) -> None:
        kw = dict(region_name=REGION, endpoint_url=endpoint, **BENCH_KEYS)
        self.s3 = boto3.client("s3", **kw)
        self.ec2 = boto3.client("ec2", **kw)
        self.elb = boto3.client("elbv2", **kw)

    def site(self, hosts: int) -> tuple[list[str], str]:
        """(one running instance per host, a target group with no deregistration delay)."""
        vpc = self.ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        subnet = self.ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.0.0/24")["Subnet"]["SubnetId"]
        image = self.ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        reply = self.ec2.run_instances(ImageId=image, MinCount=hosts, MaxCount=hosts, SubnetId=subnet)
        instances = [i["InstanceId"] for i in reply["Instances"]]
        group = self.elb.create_target_group(Name="djed-web", Protocol="HTTP", Port=80, VpcId=vpc,
                                             TargetType="instance")["TargetGroups"][0]["TargetGroupArn"]
        self.elb.modify_target_group_attributes(TargetGroupArn=group, Attributes=[
            {"Key": "deregistration_delay.timeout_seconds", "Value": "0"}])
        return instances, group

    def put_env(self, bucket: str, body: bytes) -> str:
        return str(self.s3.put_object(Bucket=bucket, Key=OBJECT_KEY, Body=body)["ETag"]).strip('"')

    def target_states(self, group: str) -> dict[tuple[str, int], str]:
        reply = self.elb.describe_target_health(TargetGroupArn=group)
        return {(d["Target"]["Id"], int(d["Target"]["Port"])): d["TargetHealth"]["State"]
                for d in reply["TargetHealthDescriptions"]}


def env_body(n: int) -> bytes:
    """An environment file of about 2 KB, 40 variables, different every time."""
    lines = [f"# round {n}", f"NORM_BENCH_ROUND={n}", f"DJANGO_SECRET_KEY='{secrets.token_urlsafe(40)}'"]
    lines += [f"SETTING_{i:02d}=value-{i:02d}-{secrets.token_hex(12)}" for i in range(38)]
    return ("\n".join(lines) + "\n").encode()


class EnvBench:
    """The fleet with the environment file and presence configured on every agent."""

    def __init__(self, bf: BenchFleet, aws: Aws, moto: MotoServer, imds: MetadataServer, bucket: str,
                 instances: list[str], group: str) -> None:
        self.bf = bf
        self.aws = aws
        self.moto = moto
        self.imds = imds
        self.bucket = bucket
        self.group = group
        self.hosts = bf.hosts
        self.instance = {h["name"]: instances[i] for i, h in enumerate(self.hosts)}
        self.base_config = {h["name"]: Path(h["config"]).read_text() for h in self.hosts}
        self.logs = {h["name"]: AgentLog(Path(h["dir"]) / "agent.log") for h in self.hosts}

    def env_path(self, host: HostState) -> Path:
        return Path(host["dir"]) / "app.env"

    def config(self, host: HostState, interval: float) -> str:
        web, _ = self.bf.ports[host["name"]]
        return self.base_config[host["name"]] + f"""
[aws]
endpoint_url = "{self.moto.endpoint}"
metadata_url = "{self.imds.endpoint}"
region = "{REGION}"
call_timeout = 5

[env]
bucket = "{self.bucket}"
path = "{self.env_path(host)}"
interval = {interval}
on_change = "next_rollout"

[lb]
target_groups = ["{self.group}"]
instance_id = "{self.instance[host['name']]}"
port = {web}
health_url = "http://127.0.0.1:{web}/health"
drain_timeout = {DRAIN_TIMEOUT}
"""

    def restart_agents(self, interval: float) -> None:
        """Every agent stopped (SIGTERM, as systemd stops it), configured, and started again; until
        each has done its first check of the object and started presence."""
        t0 = time.time()
        for h in self.hosts:
            if self.bf.fleet.agent_pid(h["name"]) is not None:
                self.bf.fleet.kill_agent(h["name"], signal.SIGTERM)
            Path(h["config"]).write_text(self.config(h, interval))
            self.bf.fleet.restart_agent(h["name"])

        def started() -> bool:
            return all(self.logs[n].since(t0, "lb.presence_started") and self.metrics(n).get(
                "norm_env_up_to_date") == 1.0 for n in self.logs)

        wait_for(started, timeout=60, what="every agent started, its first check of the object done",
                 interval=0.1)
        say(f"agents restarted with env.interval = {interval:g} s in {time.time() - t0:.1f}s")

    def metrics(self, name: str) -> dict[str, float]:
        host = self.bf.fleet.host(name)
        try:
            with urllib.request.urlopen(f"http://{host['http_listen']}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return {}
        out = {}
        for line in text.splitlines():
            if line.startswith("norm_env_") or line.startswith("norm_lb_"):
                sample, _, value = line.rpartition(" ")
                out[sample] = float(value)
        return out

    def wait_registered(self, timeout: float = 60.0) -> None:
        wanted = {(self.instance[h["name"]], self.bf.ports[h["name"]][0]) for h in self.hosts}

        def all_healthy() -> bool:
            states = self.aws.target_states(self.group)
            return all(states.get(t) == "healthy" for t in wanted)

        wait_for(all_healthy, timeout=timeout, what="every host's target healthy in moto", interval=0.2)

    def moto_statuses(self) -> dict[str, int]:
        """Statuses moto's request log shows for GETs of the object so far."""
        counts: dict[str, int] = {}
        needle = f"GET /{self.bucket}/{OBJECT_KEY} "
        for line in self.moto.log.read_text(errors="replace").splitlines():
            if needle in line:
                status = line.rsplit('"', 1)[-1].split()[0]
                counts[status] = counts.get(status, 0) + 1
        return counts


# -- the figures -------------------------------------------------------------------------------------


def fetch_rounds(eb: EnvBench, rounds: int) -> list[float]:
    """Milliseconds from env.environment_changed to env.written, one per host and round."""
    samples: list[float] = []
    end_to_end: list[float] = []
    before = {n: eb.metrics(n) for n in eb.logs}
    size = 0
    for i in range(1, rounds + 1):
        body = env_body(i)
        size = len(body)
        etag = eb.aws.put_env(eb.bucket, body)
        t_put = time.time()
        eb.bf.fleet.etcdctl("put", ENV_KEY, ENVIRONMENT)

        def written(name: str, etag: str = etag, t_put: float = t_put) -> dict[str, Any] | None:
            return next((e for e in eb.logs[name].since(t_put, "env.written")
                         if str(e.get("etag", "")).strip('"') == etag), None)

        wait_for(lambda: all(written(n) for n in eb.logs), timeout=ROUND_TIMEOUT,
                 what=f"round {i}: every host's env.written", interval=0.02)
        got = []
        for h in eb.hosts:
            name = h["name"]
            done = written(name)
            assert done is not None
            starts = [e for e in eb.logs[name].since(t_put, "env.environment_changed") if at(e) <= at(done)]
            if not starts:
                raise SandboxError(f"{name}: round {i}: env.written without env.environment_changed")
            running = source_of(eb.env_path(h).read_bytes())
            if running is None or running.etag.strip('"') != etag:
                raise SandboxError(f"{name}: the file in place is not the object of round {i}")
            ms = (at(done) - at(starts[-1])) * 1000
            samples.append(ms)
            end_to_end.append((at(done) - t_put) * 1000)
            got.append(f"{name} {ms:6.1f}")
        say(f"fetch round {i}/{rounds}: {', '.join(got)} ms (fetch start to file in place)")
    changed = 0.0
    grown = 0.0
    for n in eb.logs:
        after = eb.metrics(n)
        changed += after.get('norm_env_fetches_total{result="changed"}', 0) - before[n].get(
            'norm_env_fetches_total{result="changed"}', 0)
        grown += after.get("norm_env_body_bytes_total", 0) - before[n].get("norm_env_body_bytes_total", 0)
    say(f"fetch_apply: p50 {median(samples):.1f} ms, p99 {percentile(samples, 0.99):.1f} ms, "
        f"max {max(samples):.1f} ms over {len(samples)}; put to env.written p50 {median(end_to_end):.1f} ms")
    say(f"norm_env_body_bytes_total grew by {grown:.0f} over {changed:.0f} changed fetches "
        f"({grown / max(changed, 1):.0f} per fetch; the object is {size} bytes)")
    return samples


def unchanged_polls(eb: EnvBench, polls: int) -> float:
    """Body bytes per check of an unchanged object, over every host, across at least `polls` checks."""
    results = ("changed", "unchanged", "missing", "denied", "unavailable", "invalid", "too_large",
               "write_failed")

    def snapshot() -> dict[str, dict[str, float]]:
        return {n: eb.metrics(n) for n in eb.logs}

    def checks(m: dict[str, float]) -> dict[str, float]:
        return {r: m.get(f'norm_env_fetches_total{{result="{r}"}}', 0.0) for r in results}

    before, moto_before = snapshot(), eb.moto_statuses()
    wait_for(lambda: all(checks(eb.metrics(n))["unchanged"] - checks(before[n])["unchanged"] >= polls
                         for n in eb.logs), timeout=polls * 3 + 30, what=f"{polls} checks on every host",
             interval=0.2)
    after, moto_after = snapshot(), eb.moto_statuses()
    total_bytes = total_checks = 0.0
    for n in eb.logs:
        delta = {r: checks(after[n])[r] - checks(before[n])[r] for r in results}
        body = after[n].get("norm_env_body_bytes_total", 0) - before[n].get("norm_env_body_bytes_total", 0)
        others = {r: v for r, v in delta.items() if r != "unchanged" and v}
        if others:
            raise SandboxError(f"{n}: checks other than unchanged while nothing changed: {others}")
        say(f"{n}: {delta['unchanged']:.0f} unchanged checks, {body:.0f} body bytes")
        total_bytes += body
        total_checks += delta["unchanged"]
    statuses = {s: moto_after.get(s, 0) - moto_before.get(s, 0) for s in moto_after}
    say(f"moto's log for GET {OBJECT_KEY} in that window (by status): {statuses}")
    return total_bytes / total_checks


def update_rounds(eb: EnvBench, rounds: int, size_mb: int) -> list[float]:
    """Seconds from lb.deregistered to the next lb.registered, one per host and update."""
    samples: list[float] = []
    for i in range(1, rounds + 1):
        tag = eb.bf.new_version(size_mb, prefix="u")
        t_put = time.time()
        header = eb.bf.deploy(tag, timeout=ROUND_TIMEOUT)
        deploy_s = time.time() - t_put

        def cutover(name: str, t_put: float = t_put) -> tuple[dict[str, Any], dict[str, Any]] | None:
            events = eb.logs[name].since(t_put, "lb.deregistered", "lb.registered")
            out = next((k for k, e in enumerate(events) if e["event"] == "lb.deregistered"), None)
            if out is None:
                return None
            back = next((e for e in events[out:] if e["event"] == "lb.registered"), None)
            return (events[out], back) if back is not None else None

        wait_for(lambda: all(cutover(n) for n in eb.logs), timeout=60,
                 what=f"update {i}: every host registered again", interval=0.05)
        eb.wait_registered(timeout=30)
        outs, backs, got = [], [], []
        for h in eb.hosts:
            name = h["name"]
            pair = cutover(name)
            assert pair is not None
            t_out, t_back = at(pair[0]), at(pair[1])
            outs.append(t_out)
            backs.append(t_back)
            samples.append(t_back - t_out)
            part = {e["event"]: round(at(e) - t_out, 3)
                    for e in eb.logs[name].since(t_out, "lb.drained", "lb.resumed", "lb.healthy")
                    if at(e) <= t_back}
            got.append(f"{name} {t_back - t_out:.3f}s {json.dumps(part)}")
        say(f"update {i}/{rounds} to {tag} (rollout {header['revision']} {header['phase']}, "
            f"{deploy_s:.1f}s to every port serving it): out of the group, per host:")
        for line in got:
            say(f"    {line}")
        say(f"    the group had no target for {min(backs) - max(outs):.3f}s")
    say(f"lb_cutover: median {median(samples):.3f}s, max {max(samples):.3f}s over {len(samples)}")
    return samples


@contextlib.contextmanager
def aws_parts(workdir: Path) -> Iterator[tuple[MotoServer, MetadataServer]]:
    moto = MotoServer(workdir / "moto")
    imds = MetadataServer(workdir / "imds")
    with contextlib.ExitStack() as stack:
        stack.callback(moto.stop)
        moto.start()
        stack.callback(imds.stop)
        imds.start()
        say(f"moto on {moto.endpoint}, instance metadata on {imds.endpoint}")
        yield moto, imds
        asked = {path: n for path, n in imds.requests().items() if "_sandbox" not in path}
        say(f"instance metadata requests (the agents' credentials): {asked}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20, help="changed objects fetched (x every host)")
    ap.add_argument("--polls", type=int, default=6, help="unchanged checks per host, at least")
    ap.add_argument("--update-rounds", type=int, default=5, help="fleet updates (x every host)")
    ap.add_argument("--size-mb", type=int, default=0, help="random padding of each version deployed")
    ap.add_argument("--workdir", type=Path, help="run under this new directory and keep it (logs)")
    args = ap.parse_args()
    # The agents inherit this environment: no keys of anyone's, the instance profile alone.
    for name in list(os.environ):
        if name.startswith("AWS_"):
            del os.environ[name]
    os.environ.update(AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent")
    started = time.monotonic()
    with bench_dir(args.workdir, "norm-bench-env-") as workdir, aws_parts(workdir) as (moto, imds):
        aws = Aws(moto.endpoint)
        bucket = f"norm-env-{secrets.token_hex(4)}"
        aws.s3.create_bucket(Bucket=bucket)
        aws.put_env(bucket, env_body(0))
        instances, group = aws.site(3)
        agent_env = dict(AGENT_ENV, AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.endpoint)
        with BenchFleet(workdir, size=3, agent_env=agent_env) as bf:
            eb = EnvBench(bf, aws, moto, imds, bucket, instances, group)
            eb.restart_agents(interval=3600)
            first = bf.new_version(args.size_mb, prefix="w")
            say(f"first deploy (through Norm) of {first}: the units start, nothing is measured")
            bf.deploy(first, timeout=ROUND_TIMEOUT)
            eb.wait_registered()
            say("every host serves and is registered in the target group")
            fetches = fetch_rounds(eb, args.rounds)
            cutovers = update_rounds(eb, args.update_rounds, args.size_mb)
            eb.restart_agents(interval=1)
            per_poll = unchanged_polls(eb, args.polls)
    say(f"whole run: {time.monotonic() - started:.0f}s")
    print(json.dumps({"fetch_apply_p50_ms": round(median(fetches), 1),
                      "unchanged_poll_body_bytes": round(per_poll, 1),
                      "lb_cutover_s": round(median(cutovers), 3)}), flush=True)


if __name__ == "__main__":
    main()
