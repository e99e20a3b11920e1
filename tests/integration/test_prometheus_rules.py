"""The Prometheus files shipped in deploy/prometheus/, checked by Prometheus's own tool (Debian's
`promtool`): the scrape config and the rules are valid, and the rules' unit tests pass, every alert
with a case where it fires and the healthy fleet's case where none does."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def promtool(*args: str) -> str:
    r = subprocess.run([PROMTOOL, *args], cwd=DIR, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_the_scrape_config_and_the_rules_are_valid() -> None:
    assert "SUCCESS" in promtool("check", "config", "scrape.yml")
    assert "SUCCESS" in promtool("check", "rules", "norm-rules.yml")


def test_the_rules_unit_tests_pass() -> None:
    assert "SUCCESS" in promtool("test", "rules", "norm-rules.test.yml")


def test_every_alert_is_tested_firing_and_quiet() -> None:
    rules = yaml.safe_load((DIR / "norm-rules.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((DIR / "norm-rules.test.yml").read_text())["tests"]
    cases = [c for t in tests for c in t.get("alert_rule_test", [])]
    firing = {c["alertname"] for c in cases if c["exp_alerts"]}
    quiet = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert firing == alerts, alerts ^ firing
    assert quiet == alerts, alerts ^ quiet
