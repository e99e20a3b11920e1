"""Whole fleet updates on real components: 3 hosts, each with its own systemd manager, Docker engine
and agent, on a 3-member etcd cluster. After each, the invariants are checked from what etcd holds
(rollout record, reports, ledger), what the migrations recorded, what each engine pulled and what
each unit serves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sandbox import updates
from sandbox.images import image_exists
from tests.fleet.conftest import UpdateFleet


def check_invariants(uf: UpdateFleet, revision: int, tag: str) -> dict[str, Any]:
    """Every invariant a finished rollout of `tag` must satisfy; returns its record."""
    fleet = uf.fleet
    record = updates.record(fleet, revision)
    assert record is not None and record["phase"] == "done", record
    digest = record["digest"]
    hosts = record["hosts"]
    reports = updates.reports(fleet, revision)

    # 2. No host ran the version before every participant had pulled it, with the same digest.
    pulled = {r["name"]: r for r in reports.get("pulled", [])}
    assert set(pulled) == set(hosts)
    assert {r["value"].get("digest") for r in pulled.values()} == {digest}
    started = reports.get("started", [])
    assert {r["name"] for r in started} == set(hosts)
    assert all(r["value"]["ok"] and r["value"]["digest"] == digest for r in started)
    assert max(r["mod_revision"] for r in pulled.values()) < min(r["mod_revision"] for r in started)
    stopped = reports.get("stopped", [])
    assert max(r["mod_revision"] for r in stopped) < min(r["mod_revision"] for r in started)

    # 1. Each step ran exactly once for this version, and never overlapping (one after the other).
    lines = [line.split() for line in uf.record_lines()]
    assert [ln[1] for ln in lines if ln[0] == tag] == ["migrate", "collectstatic"], lines
    entries = sorted((e for e in updates.ledger(fleet) if e["revision"] == revision), key=lambda e: e["at"])
    assert [(e["step"], e["ok"], e["digest"]) for e in entries] == [
        ("migrate", True, digest), ("collectstatic", True, digest)]
    migrated = {r["name"]: r["value"] for r in reports.get("migrated", [])}
    assert set(migrated) == {"migrate", "collectstatic"} and all(v["ok"] for v in migrated.values())

    # What each host runs: the release file pinned by digest, the image in its engine, the units.
    for h in uf.state["hosts"]:
        release = Path(h["dir"], "release.env").read_text()
        assert f"NORM_DIGEST={digest}\n" in release and f"NORM_RELEASE={tag}\n" in release
        assert f"@{digest}" in release
        from sandbox.docker import DockerEngine

        engine = DockerEngine(h["name"], Path(h["docker_dir"]))
        assert image_exists(engine, f"{uf.registry.address}/djed/app@{digest}")
        assert uf.served(h["name"]) == (tag, tag)
    return record


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
    # History keeps the finished record.
    assert any(r["revision"] == revision and r["phase"] == "done" for r in updates.history(fleet.fleet))
