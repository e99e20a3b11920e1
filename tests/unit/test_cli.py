"""The `norm` command as operators run it: a real process, its exit status and what it prints."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import norm
from norm.core import config as cfg

REPO = Path(__file__).resolve().parents[2]
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
PASSWORD = "pw-Zq8#unguessable"


def norm_cmd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("NORM_")}
    return subprocess.run([PYTHON, "-m", "norm", *args], cwd=REPO, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=60, check=False)


def assert_usage_error(proc: subprocess.CompletedProcess[str], *parts: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    for part in parts:
        assert part in proc.stderr, proc.stderr


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "norm.toml"
    path.write_text('[etcd]\nendpoints = ["http://10.0.0.1:2379"]\nlease_ttl = 15\n[host]\nrole = "web"\n')
    return path


def test_version() -> None:
    proc = norm_cmd("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"norm {norm.__version__}"


def test_no_command_is_a_usage_error() -> None:
    proc = norm_cmd()
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


def test_check_good_file(good: Path) -> None:
    proc = norm_cmd("config", "check", str(good))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{good}: OK"
    assert proc.stderr == ""


def test_check_bad_value(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[etcd]\nlease_ttl = "soon"\n')
    assert_usage_error(norm_cmd("config", "check", str(path)), "etcd.lease_ttl", str(path), "whole number")


def test_check_failed_rule(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[etcd]\nusername = "root"\n')
    assert_usage_error(norm_cmd("config", "check", str(path)), "etcd.password", "needs password")


def test_check_unknown_key(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text("[etcd]\nleese_ttl = 3\n")
    assert_usage_error(norm_cmd("config", "check", str(path)), "etcd.leese_ttl", str(path), "unknown key")


def test_check_unknown_section(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text("[etc]\nx = 3\n")
    assert_usage_error(norm_cmd("config", "check", str(path)), "etc", str(path), "unknown section")


def test_check_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    assert_usage_error(norm_cmd("config", "check", str(path)), str(path), "no such file")


def test_check_bad_toml(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[etcd\n")
    assert_usage_error(norm_cmd("config", "check", str(path)), str(path), "not valid TOML")


def test_check_ignores_the_environment(good: Path) -> None:
    proc = norm_cmd("config", "check", str(good), env={"NORM_ETCD__LEASE_TTL": "not-a-number"})
    assert proc.returncode == 0, proc.stderr


def test_check_with_a_bad_set_flag(good: Path) -> None:
    assert_usage_error(norm_cmd("config", "check", str(good), "--set", "etcd.lease_ttl=x"),
                       "--set etcd.lease_ttl", "etcd.lease_ttl")
    assert_usage_error(norm_cmd("config", "check", str(good), "--set", "nonsense"),
                       "--set", "section.key=value")


def test_check_reads_the_password_file(tmp_path: Path) -> None:
    path = tmp_path / "norm.toml"
    path.write_text(f'[etcd]\nusername = "root"\npassword_file = "{tmp_path / "absent"}"\n')
    assert_usage_error(norm_cmd("config", "check", str(path)), "etcd.password_file", "cannot read")
    (tmp_path / "absent").write_text(PASSWORD + "\n")
    proc = norm_cmd("config", "check", str(path))
    assert proc.returncode == 0, proc.stderr
    assert PASSWORD not in proc.stdout + proc.stderr


def test_check_path_through_a_file(good: Path) -> None:
    path = f"{good}/norm.toml"
    assert_usage_error(norm_cmd("config", "check", path), path)


def test_reference_matches_the_docs() -> None:
    proc = norm_cmd("config", "reference", "--check", "docs/configuration.md")
    assert proc.returncode == 0, proc.stderr


def test_reference_prints_the_markdown() -> None:
    proc = norm_cmd("config", "reference")
    assert proc.returncode == 0
    assert proc.stdout.rstrip("\n") == cfg.reference_markdown().rstrip("\n")


def test_reference_check_of_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text("# Configuration reference\n")
    proc = norm_cmd("config", "reference", "--check", str(stale))
    assert proc.returncode == 1
    assert str(stale) in proc.stderr and "out of date" in proc.stderr
    proc = norm_cmd("config", "reference", "--check", str(tmp_path / "absent.md"))
    assert proc.returncode == 1


def test_show_masks_the_password(good: Path) -> None:
    proc = norm_cmd("config", "show", "--config", str(good),
                    env={"NORM_ETCD__USERNAME": "root", "NORM_ETCD__PASSWORD": PASSWORD})
    assert proc.returncode == 0, proc.stderr
    assert PASSWORD not in proc.stdout + proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["etcd"]["password"] == "********"
    assert shown["etcd"]["username"] == "root"
    assert shown["etcd"]["lease_ttl"] == 15
    assert shown["etcd"]["endpoints"] == ["http://10.0.0.1:2379"]
    assert shown["host"]["role"] == "web"
    assert set(shown) == {f.name for f in dataclasses.fields(cfg.Config)}


def test_show_with_set_and_norm_config(good: Path) -> None:
    proc = norm_cmd("config", "show", "--set", "log.level=debug", env={"NORM_CONFIG": str(good)})
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["log"]["level"] == "debug"
    assert shown["etcd"]["lease_ttl"] == 15


def test_show_bad_environment_is_a_usage_error(good: Path) -> None:
    proc = norm_cmd("config", "show", "--config", str(good), env={"NORM_ETCD__LEASE_TTL": "x"})
    assert_usage_error(proc, "environment variable NORM_ETCD__LEASE_TTL", "etcd.lease_ttl")


def test_show_password_in_a_failing_config_is_not_printed(good: Path) -> None:
    proc = norm_cmd("config", "show", "--config", str(good), env={"NORM_ETCD__PASSWORD": PASSWORD})
    assert_usage_error(proc, "etcd.username")
    assert PASSWORD not in proc.stderr
