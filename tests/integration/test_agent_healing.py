"""A real `norm agent` healing the units of a real systemd manager, seen the way an operator sees
it: /metrics, `norm units`, `norm units stop/start`, `norm heal lift`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable

import pytest

from sandbox.etcd import EtcdMember
from sandbox.procs import wait_for
from sandbox.systemd import SystemdManager
from tests.plugins.agent import AgentProc

SLEEPER = "[Unit]\nStartLimitIntervalSec=0\n[Service]\nExecStart=/bin/sleep infinity\n"
FAILS_WHEN_STOPPED = ("[Unit]\nStartLimitIntervalSec=0\n[Service]\n"
                      "ExecStart=/bin/sh -c 'trap \"exit 3\" TERM; while :; do sleep 0.1; done'\n")
CRASHER = "[Unit]\nStartLimitIntervalSec=0\n[Service]\nExecStart=/bin/false\n"
FAST_HEALING = ("[healing]\nbudget = 2\nbackoff_initial = 0.05\nbackoff_max = 0.1\nwindow = 60\n"
                "cooldown = 3600\n")


def metric(agent: AgentProc, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"{agent.url}/metrics", timeout=5) as r:
        text = r.read().decode()
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name + (f"{{{wanted}}}" if wanted else "")) + r" ([0-9.e+-]+)$"
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else 0.0


def norm(agent: AgentProc, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "norm", *args, "--config", str(agent.config_path)],
                          capture_output=True, text=True, timeout=timeout, check=False)


def units_table(agent: AgentProc) -> dict[str, list[str]]:
    r = norm(agent, "units")
    assert r.returncode == 0, r.stderr
    return {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:]}


@pytest.fixture
def healing_agent(etcd: EtcdMember, systemd_manager: SystemdManager,
                  agents: Callable[..., AgentProc]) -> AgentProc:
    for name, text in (("djed-web.service", SLEEPER), ("djed-api.service", SLEEPER),
                       ("djed-crash.service", CRASHER)):
        systemd_manager.write_unit(name, text)
    systemd_manager.systemctl("start", "djed-web.service", "djed-api.service")
    agent = agents([etcd.endpoint], systemd_bus=systemd_manager.bus_address, extra_toml=FAST_HEALING)
    agent.wait_notify("READY=1")
    return agent


def test_a_killed_unit_is_healed_and_the_metrics_and_cli_say_so(
        healing_agent: AgentProc, systemd_manager: SystemdManager) -> None:
    agent = healing_agent
    assert metric(agent, "norm_unit_active", unit="djed-web.service") == 1
    pid = int(systemd_manager.unit_property("djed-web.service", "MainPID"))
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: metric(agent, "norm_heal_attempts_total", unit="djed-web.service", result="started") == 1
             and metric(agent, "norm_unit_active", unit="djed-web.service") == 1,
             timeout=15, what="djed-web healed")
    assert int(systemd_manager.unit_property("djed-web.service", "MainPID")) not in (0, pid)
    assert metric(agent, "norm_heal_seconds_count") == 1
    wait_for(lambda: units_table(agent).get("djed-web.service", [""])[1:2] == ["active/running"],
             timeout=10, what="the summary in etcd updated")
    row = units_table(agent)["djed-web.service"]
    assert row[3] == "ok"


def test_an_operator_hold_stops_the_unit_and_keeps_it_from_healing(
        healing_agent: AgentProc, systemd_manager: SystemdManager) -> None:
    agent = healing_agent
    r = norm(agent, "units", "stop", "djed-api.service")
    assert r.returncode == 0, r.stderr
    assert "held and stopped" in r.stdout
    assert systemd_manager.unit_property("djed-api.service", "ActiveState") == "inactive"
    assert units_table(agent)["djed-api.service"][3] == "held(operator)"  # who holds it
    r = norm(agent, "units", "start", "djed-api.service")
    assert r.returncode == 0, r.stderr
    assert systemd_manager.unit_property("djed-api.service", "ActiveState") == "active"
    assert metric(agent, "norm_heal_attempts_total", unit="djed-api.service", result="started") == 0


def test_a_unit_the_operator_starts_again_is_started_by_the_request_never_by_healing(
        healing_agent: AgentProc, systemd_manager: SystemdManager) -> None:
    # Like `docker run` in a unit, it exits non-zero when stopped: held, the unit is failed. The hold
    # ends only once the unit is started: until then the healer, which sees a failed unit, leaves it
    # alone (or the two would race to start it). Several rounds, as the race is a close one.
    agent, unit = healing_agent, "djed-worker.service"
    systemd_manager.write_unit(unit, FAILS_WHEN_STOPPED)
    systemd_manager.systemctl("start", unit)
    for _ in range(6):
        assert norm(agent, "units", "stop", unit).returncode == 0
        assert systemd_manager.unit_property(unit, "ActiveState") == "failed"
        assert norm(agent, "units", "start", unit).returncode == 0
        assert systemd_manager.unit_property(unit, "ActiveState") == "active"
    assert metric(agent, "norm_heal_attempts_total", unit=unit, result="started") == 0
    assert '"event": "heal.start"' not in agent.logs()


def test_a_crash_loop_is_quarantined_and_lifted_by_the_operator(
        healing_agent: AgentProc, systemd_manager: SystemdManager) -> None:
    agent = healing_agent
    systemd_manager.systemctl("start", "djed-crash.service", check=False)
    wait_for(lambda: metric(agent, "norm_units_quarantined") == 1, timeout=20, what="quarantine")
    assert metric(agent, "norm_heal_attempts_total", unit="djed-crash.service", result="started") == 2
    wait_for(lambda: units_table(agent).get("djed-crash.service", ["", "", "", ""])[3] == "quarantined",
             timeout=10, what="the quarantine published")
    r = norm(agent, "heal", "lift", "djed-crash.service")
    assert r.returncode == 0, r.stderr
    assert "quarantine lifted" in r.stdout
    wait_for(lambda: metric(agent, "norm_heal_attempts_total", unit="djed-crash.service",
                            result="started") > 2, timeout=20, what="healing resumed")
    assert agent.logs().count('"event": "heal.quarantined"') >= 1


def test_a_request_for_a_unit_norm_does_not_manage_is_refused(healing_agent: AgentProc) -> None:
    r = norm(healing_agent, "units", "stop", "not a unit")
    assert r.returncode == 2
    assert "unit" in r.stderr and "Traceback" not in r.stderr


def test_unit_patterns_outside_systemds_grammar_stop_the_agent_at_start(
        etcd: EtcdMember, systemd_manager: SystemdManager, agents: Callable[..., AgentProc]) -> None:
    agent = agents([etcd.endpoint], systemd_bus=systemd_manager.bus_address,
                   extra_toml='[units]\npatterns = ["djed web.service"]\n')
    assert agent.wait_exit(timeout=15) == 2
    assert "units.patterns" in agent.logs() and str(agent.config_path) in agent.logs()
    assert "Traceback" not in agent.logs()


def test_a_quarantine_and_the_spent_budget_outlive_a_restart_of_the_agent(
        healing_agent: AgentProc, systemd_manager: SystemdManager) -> None:
    agent = healing_agent

    def crash_row() -> dict[str, object]:
        r = norm(agent, "units", "--json")
        assert r.returncode == 0, r.stderr
        return next(u for u in json.loads(r.stdout) if u["unit"] == "djed-crash.service")

    systemd_manager.systemctl("start", "djed-crash.service", check=False)
    wait_for(lambda: metric(agent, "norm_units_quarantined") == 1, timeout=30, what="quarantine")
    wait_for(lambda: crash_row()["heal"] == "quarantined", timeout=10, what="the quarantine published")
    ends = crash_row()["quarantined_until"]
    assert isinstance(ends, int | float)
    agent.stop()
    agent.start()
    agent.wait_notify("READY=1", timeout=60)
    # The new agent publishes its own summary: the unit is still quarantined, and no attempt was made.
    wait_for(lambda: crash_row()["heal"] == "quarantined" and metric(agent, "norm_units_quarantined") == 1,
             timeout=30, what="the quarantine taken up by the restarted agent")
    assert metric(agent, "norm_heal_attempts_total", unit="djed-crash.service", result="started") == 0
    assert abs(float(crash_row()["quarantined_until"]) - ends) <= 2  # type: ignore[arg-type]
    assert crash_row()["attempts"] == 2
    assert systemd_manager.unit_property("djed-crash.service", "ActiveState") == "failed"
    assert '"event": "heal.state_loaded"' in agent.logs()


def summary_row(agent: AgentProc, unit: str) -> dict[str, object]:
    r = norm(agent, "units", "--json")
    assert r.returncode == 0, r.stderr
    return next(u for u in json.loads(r.stdout) if u["unit"] == unit)


def test_a_start_that_fails_is_retried_and_reported_until_it_is_done(
        healing_agent: AgentProc, systemd_manager: SystemdManager) -> None:
    agent, unit = healing_agent, "djed-api.service"
    assert norm(agent, "units", "stop", unit).returncode == 0
    # The bus goes away (its socket and daemon; the manager stays): every systemd call fails at once.
    systemd_manager.systemctl("stop", "dbus.socket")
    try:
        r = norm(agent, "units", "start", unit, "--timeout", "5")
        assert r.returncode == 1 and "stays in etcd" in r.stderr, r.stderr

        def failing() -> bool:
            requests = summary_row(agent, unit)["requests"]
            return isinstance(requests, list) and any(q["action"] == "start" and q["error"] for q in requests)

        wait_for(failing, timeout=30, what="the failing start reported in the unit summary")
        assert metric(agent, "norm_control_pending") == 1
        assert '"event": "control.action_failed"' in agent.logs()
        assert "start requested, not done yet; failed" in norm(agent, "units").stdout
    finally:
        systemd_manager.systemctl("start", "dbus.socket")
    wait_for(lambda: systemd_manager.unit_property(unit, "ActiveState") == "active", timeout=60,
             what="the unit started once the bus is back")
    wait_for(lambda: summary_row(agent, unit)["requests"] == [] and summary_row(agent, unit)["heal"] == "ok",
             timeout=30, what="the request done in the summary")
    assert metric(agent, "norm_control_pending") == 0
    assert '"event": "control.action_done"' in agent.logs()


def test_a_start_asked_while_the_agent_is_down_is_carried_out_when_it_is_back(
        healing_agent: AgentProc, systemd_manager: SystemdManager) -> None:
    agent, unit = healing_agent, "djed-api.service"
    assert norm(agent, "units", "stop", unit).returncode == 0
    agent.stop()
    r = norm(agent, "units", "start", unit, "--timeout", "1")
    assert r.returncode == 1 and "stays in etcd" in r.stderr, r.stderr
    assert systemd_manager.unit_property(unit, "ActiveState") == "inactive"
    agent.start()
    agent.wait_notify("READY=1", timeout=60)
    wait_for(lambda: systemd_manager.unit_property(unit, "ActiveState") == "active", timeout=30,
             what="the unit started by the agent back")
    wait_for(lambda: summary_row(agent, unit)["heal"] == "ok" and summary_row(agent, unit)["requests"] == [],
             timeout=30, what="the request done in the summary")
