"""make bench-agent: what an idle agent costs, and what the adapter adds to watch latency.

- idle_rss_mb, idle_cpu_pct: a real `norm agent` process, every section of its config set and
  healing a unit of a real systemd manager over D-Bus, after READY=1, over --idle-seconds of
  idleness (CPU as a percentage of one core).
- idle_etcd_rpm: requests the etcd server handled for that agent per minute while it was idle, read
  from etcd's own /metrics (gRPC calls and streams started), not from the client's bookkeeping.
- watch_p50_ms, watch_p99_ms: put (by another client) to the event through Norm's watch adapter.
- raw_watch_p50_ms: the same through bare aetcd, interleaved in the same run.
- watch_overhead_ratio: watch_p50_ms / raw_watch_p50_ms.
The last line printed is one JSON object with these fields.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import aetcd

from bench.common import percentile, start_agent
from norm.adapters.etcd import Etcd, Event
from norm.core.config import EtcdConfig
from sandbox.etcd import EtcdMember
from sandbox.systemd import SystemdManager

CLK_TCK = os.sysconf("SC_CLK_TCK")


def etcd_requests(member: EtcdMember) -> int:
    with urllib.request.urlopen(f"{member.endpoint}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0
    for line in text.splitlines():
        if line.startswith("grpc_server_started_total{"):
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_mb(pid: int) -> float:
    m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    assert m
    return int(m.group(1)) / 1024


async def watch_latencies(member: EtcdMember, rounds: int) -> tuple[list[float], list[float]]:
    config = EtcdConfig(endpoints=(member.endpoint,))
    ours: list[float] = []
    raw: list[float] = []
    loop = asyncio.get_running_loop()
    async with Etcd(config) as writer, Etcd(config) as reader, \
            aetcd.Client(host="127.0.0.1", port=member.client_port) as bare:
        async with reader.watch("/bench/ours") as w:
            await anext(w)  # the initial listing
            raw_watch = await bare.watch(b"/bench/raw")
            raw_iter = raw_watch.__aiter__()
            try:
                for i in range(rounds):
                    # Interleave so that both see the same machine at the same moment.
                    t0 = loop.time()
                    await writer.put("/bench/ours", str(i).encode())
                    while True:
                        item = await anext(w)
                        if isinstance(item, Event) and item.kv.value == str(i).encode():
                            break
                    ours.append((loop.time() - t0) * 1000)
                    t0 = loop.time()
                    await writer.put("/bench/raw", str(i).encode())
                    while (await anext(raw_iter)).kv.value != str(i).encode():
                        pass
                    raw.append((loop.time() - t0) * 1000)
            finally:
                await raw_watch.cancel()
    return ours, raw


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--idle-seconds", type=float, default=60.0)
    ap.add_argument("--rounds", type=int, default=1000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="norm-bench-") as tmp:
        workdir = Path(tmp)
        member = EtcdMember("etcd", workdir / "etcd")
        member.start()
        manager = SystemdManager("bench", workdir / "systemd")
        manager.write_unit("djed-web.service", "[Service]\nExecStart=/bin/sleep infinity\n")
        manager.start()
        manager.systemctl("start", "djed-web.service")
        try:
            proc, notify = start_agent(workdir, member, manager.bus_address)
            try:
                assert proc.pid is not None
                time.sleep(2)  # let start-up work (imports, first renewals) settle before measuring
                cpu0, req0, t0 = proc_cpu_seconds(proc.pid), etcd_requests(member), time.monotonic()
                time.sleep(args.idle_seconds)  # the measurement window itself: idleness is the point
                cpu1, req1, t1 = proc_cpu_seconds(proc.pid), etcd_requests(member), time.monotonic()
                rss = proc_rss_mb(proc.pid)
            finally:
                proc.stop()
                notify.close()
            # etcd's own scrape of /metrics is HTTP, not gRPC, so it does not count.
            idle_rpm = (req1 - req0) / ((t1 - t0) / 60)
            ours, raw = asyncio.run(watch_latencies(member, args.rounds))
        finally:
            manager.stop()
            member.stop()
    figures = {
        "idle_rss_mb": round(rss, 1),
        "idle_cpu_pct": round((cpu1 - cpu0) / (t1 - t0) * 100, 3),
        "idle_etcd_rpm": round(idle_rpm, 1),
        "watch_p50_ms": round(statistics.median(ours), 3),
        "watch_p99_ms": round(percentile(ours, 99), 3),
        "raw_watch_p50_ms": round(statistics.median(raw), 3),
        "watch_overhead_ratio": round(statistics.median(ours) / statistics.median(raw), 3),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
