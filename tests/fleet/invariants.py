"""What every finished rollout must satisfy, checked from what etcd holds (rollout record, reports,
ledger), what the one-off steps recorded, what each engine pulled and what each unit serves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sandbox import updates
from sandbox.docker import DockerEngine
from sandbox.images import image_exists
from tests.fleet.conftest import UpdateFleet


def check_invariants(uf: UpdateFleet, revision: int, tag: str) -> dict[str, Any]:
    """Every invariant a finished rollout of `tag` must satisfy; returns its record."""
    fleet = uf.fleet
    record = updates.record(fleet, revision)
    assert record is not None and record["phase"] == "done", record
    digest = record["digest"]
    hosts = set(record["hosts"]) - {e["host"] for e in record["excluded"]}  # who took part to the end
    reports = updates.reports(fleet, revision)

    # 2. No host ran the version before every participant had pulled it, with the same digest.
    pulled = {r["name"]: r for r in reports.get("pulled", [])
              if r["value"].get("digest") and r["name"] in hosts}
    assert set(pulled) == hosts
    assert {r["value"].get("digest") for r in pulled.values()} == {digest}
    started = [r for r in reports.get("started", []) if r["name"] in hosts]
    assert {r["name"] for r in started} == hosts
    assert all(r["value"]["ok"] and r["value"]["digest"] == digest for r in started)
    assert max(r["mod_revision"] for r in pulled.values()) < min(r["mod_revision"] for r in started)
    stopped = [r for r in reports.get("stopped", []) if r["name"] in hosts]
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
    uf.serving(tag)  # hosts left out of the rollout catch up after it
    for h in uf.state["hosts"]:
        release = Path(h["dir"], "release.env").read_text()
        assert f"NORM_DIGEST={digest}\n" in release and f"NORM_RELEASE={tag}\n" in release
        assert f"@{digest}" in release
        engine = DockerEngine(h["name"], Path(h["docker_dir"]))
        assert image_exists(engine, f"{uf.registry.address}/djed/app@{digest}")
    return record
