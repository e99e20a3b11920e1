"""What the agent exposes on /metrics, checked by Prometheus's own linter (`promtool check metrics`,
Debian's prometheus package), and the metrics that carry labels rather than numbers."""

from __future__ import annotations

import shutil
import subprocess

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from norm.core.record import Phase, Release
from norm.services.metrics import PHASES, Metrics

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
V1, V2 = Release("v1", "sha256:" + "1" * 64), Release("v2", "sha256:" + "2" * 64)


def samples(m: Metrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = generate_latest(m.registry).decode()
    return {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == name}


def test_every_family_passes_promtool_check_metrics() -> None:
    m = Metrics()
    # A sample in every labelled family, so that each is linted with its labels.
    m.show_phase(Phase.PULL)
    m.show_release(V1)
    m.watch_events.labels("/djed-version").inc()
    m.watch_resyncs.labels("/djed-version").inc()
    m.rejected_values.labels("rollout").inc()
    m.unit_active.labels("djed-web.service").set(1)
    m.heal_attempts.labels("djed-web.service", "ok").inc()
    m.rollout_phase_seconds.labels("pull").observe(1.0)
    m.barrier_hosts.labels("pulled").set(3)
    m.rollout_batch.labels("total").set(3)
    m.migrations.labels("ok").inc()
    m.rollouts.labels("done").inc()
    m.lb_registered.labels("web").set(1)
    m.update_gate.labels("passed").inc()
    m.env_fetches.labels("changed").inc()
    m.env_restarts.labels("djed-web.service", "ok").inc()
    m.webhook_deliveries.labels("ops", "ok").inc()
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=generate_latest(m.registry), capture_output=True,
                       timeout=60, check=False)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()


def test_the_rollout_phase_is_a_label_one_at_a_time() -> None:
    m = Metrics()
    before = samples(m, "norm_rollout_phase")
    assert before == {(("phase", p),): (1.0 if p == "none" else 0.0) for p in PHASES}
    m.show_phase(Phase.ROLL)
    got = samples(m, "norm_rollout_phase")
    assert got[(("phase", "roll"),)] == 1 and sum(got.values()) == 1 and len(got) == len(PHASES)


def test_the_release_info_names_the_release_this_host_runs_alone() -> None:
    m = Metrics()
    assert samples(m, "norm_release_info") == {}
    m.show_release(V1)
    m.show_release(V2)
    assert samples(m, "norm_release_info") == {(("digest", V2.digest), ("tag", "v2")): 1.0}
    m.show_release(None)
    assert samples(m, "norm_release_info") == {}
