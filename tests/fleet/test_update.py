"""Whole fleet updates on real components: 3 hosts, each with its own systemd manager, Docker engine
and agent, on a 3-member etcd cluster. After each, the invariants are checked from what etcd holds
(rollout record, reports, ledger), what the migrations recorded, what each engine pulled and what
each unit serves."""

from __future__ import annotations

import json

from sandbox import updates
from tests.fleet.conftest import UpdateFleet
from tests.fleet.invariants import check_invariants


def test_a_whole_update_of_three_hosts(fleet: UpdateFleet) -> None:
    tag = fleet.new_version()
    before = len(fleet.record_lines())
    revision = updates.set_version(fleet.fleet, tag)
    h = updates.wait_phase(fleet.fleet, revision, timeout=120)
    assert h["phase"] == "done", h
    record = check_invariants(fleet, revision, tag)
    assert len(record["hosts"]) == 3 and record["excluded"] == []
    assert len(fleet.record_lines()) == before + 2
    # The hosts show the release they run.
    hosts = {kv["key"]: json.loads(kv["value"]) for kv in updates.get_kvs(fleet.fleet, "/norm/hosts/", True)}
    assert all(v["release"].startswith(f"{tag}@sha256:") for v in hosts.values())
    # And on /metrics: norm_release_info names it, by digest, and no other; the phase is a label.
    for name in fleet.names():
        info = [ln for ln in fleet.metrics(name).splitlines() if ln.startswith("norm_release_info{")]
        assert info == [f'norm_release_info{{digest="{record["digest"]}",tag="{tag}"}} 1.0'], info
    leader = fleet.leader()
    assert leader is not None
    assert fleet.metric(leader, 'norm_rollout_phase{phase="done"}') == 1
    # History keeps the finished record.
    kept = [r for r in updates.history(fleet.fleet) if r["revision"] == revision]
    assert [(r["phase"], r["tag"], r["digest"]) for r in kept] == [("done", tag, record["digest"])]
    assert kept[0]["progress"] == [] and kept[0]["ledger"] == []  # small: those have keys of their own
