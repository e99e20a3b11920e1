"""`python -m sandbox up|down|status|demo`: a whole Norm fleet on this machine.

    up [--hosts N]   start a 3-member etcd cluster and N simulated hosts (or reuse a healthy one)
    down             stop everything the fleet started, by pid (harmless when nothing runs)
    status           what runs, where its logs are; exit 0 healthy, 1 degraded, 3 not running
    demo             up, wait until every agent has registered in etcd, print the hosts, then kill a
                     unit on one host and show Norm healing it
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from sandbox.fleet import DEFAULT_RUN_DIR, REPO, Fleet, State, owned, venv_python
from sandbox.procs import SandboxError, wait_for
from sandbox.systemd import SystemdManager


def _say(msg: str) -> None:
    print(msg, flush=True)


def _fleet(args: argparse.Namespace) -> Fleet:
    return Fleet(run_dir=args.run_dir, size=getattr(args, "hosts", 3),
                 docker=not getattr(args, "no_docker", False),
                 agents=not getattr(args, "no_agents", False), say=_say)


def cmd_up(args: argparse.Namespace) -> int:
    fleet = _fleet(args)
    fleet.up(ready_timeout=args.timeout)
    state = fleet.load_state()
    assert state is not None
    _print_state(state)
    _print_footer(fleet)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    fleet = _fleet(args)
    said = fleet.down()
    if not said or said[0].startswith("no sandbox fleet"):
        if said:
            print(said[0])
    else:
        print("sandbox fleet stopped")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    fleet = _fleet(args)
    state = fleet.load_state()
    if state is None:
        print(f"no sandbox fleet recorded in {fleet.run_dir}")
        return 3
    _print_state(state)
    problems = fleet.problems(state)
    if problems:
        print("\nproblems:")
        for p in problems:
            print(f"  - {p}")
        return 1
    print("\nhealthy")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    fleet = _fleet(args)
    fleet.up(ready_timeout=args.timeout)
    state = fleet.load_state()
    assert state is not None
    _print_state(state)
    print(f"\nwaiting for the {len(state['hosts'])} agents to register in etcd ...", flush=True)
    try:
        registered = fleet.wait_registered(timeout=args.register_timeout)
    except SandboxError as e:
        print(f"\n{e}", file=sys.stderr)
        _print_footer(fleet)
        return 1
    print()
    _print_hosts(state, registered)
    _demo_healing(state)
    _print_footer(fleet)
    return 0


DEMO_UNIT = "djed-web.service"
DEMO_UNIT_TEXT = ("[Unit]\nDescription=Demo web unit\nStartLimitIntervalSec=0\n"
                  "[Service]\nExecStart=/bin/sleep infinity\n")


def _norm_units(config: str) -> str:
    r = subprocess.run([venv_python(), "-m", "norm", "units", "--config", config], capture_output=True,
                       text=True, cwd=REPO, timeout=60, check=False)
    return r.stdout.rstrip() or r.stderr.rstrip()


def _demo_healing(state: State) -> None:
    """Give every host a unit, kill it on the first host with SIGKILL, and show Norm healing it."""
    managers = [SystemdManager(h["name"], Path(h["systemd_dir"])) for h in state["hosts"]]
    for mgr in managers:
        mgr.write_unit(DEMO_UNIT, DEMO_UNIT_TEXT)
        mgr.systemctl("start", DEMO_UNIT)
    host, mgr = state["hosts"][0], managers[0]
    pid = int(mgr.unit_property(DEMO_UNIT, "MainPID"))
    print(f"\n{host['name']}: {DEMO_UNIT} runs as pid {pid}; killing it with SIGKILL ...", flush=True)
    os.kill(pid, signal.SIGKILL)

    def healed() -> bool:
        new = int(mgr.unit_property(DEMO_UNIT, "MainPID"))
        return new not in (0, pid) and mgr.unit_property(DEMO_UNIT, "ActiveState") == "active"

    try:
        wait_for(healed, timeout=30, what=f"{DEMO_UNIT} healed")
    except SandboxError as e:
        print(f"{e}; see {host['dir']}/agent.log", file=sys.stderr)
        return
    new_pid = int(mgr.unit_property(DEMO_UNIT, "MainPID"))
    print(f"{host['name']}: Norm healed it (stop, reset-failed, start): now pid {new_pid}\n")
    # The unit summary in etcd follows within a second of the change.
    def summarised() -> bool:
        rows = [line.split() for line in _norm_units(host["config"]).splitlines()]
        return any(row[:2] == [DEMO_UNIT, "active/running"] and row[3] == "ok" for row in rows[1:])

    wait_for(summarised, timeout=10, what="the unit summary")
    print(f"$ norm units   (on {host['name']})")
    print(_norm_units(host["config"]))


def _print_hosts(state: State, registered: dict[str, dict[str, Any]]) -> None:
    """The hosts as `norm hosts` shows them; from etcd directly if that command cannot run here."""
    config = state["hosts"][0]["config"]
    r = subprocess.run([venv_python(), "-m", "norm", "hosts", "--config", config], capture_output=True,
                       text=True, cwd=REPO, timeout=60, check=False)
    if r.returncode == 0 and r.stdout.strip():
        print(r.stdout.rstrip())
        return
    why = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
    print(f"(`norm hosts` did not answer: {why}; the same hosts as etcd holds them:)")
    print(format_hosts_table(registered))


def format_hosts_table(registered: dict[str, dict[str, Any]]) -> str:
    columns = ["machine_id", "name", "environment", "role", "agent_version", "release"]
    rows = [[str(v.get(c) if v.get(c) not in (None, "") else "-") for c in columns]
            for v in sorted(registered.values(), key=lambda v: str(v.get("name", "")))]
    heads = [c.upper().replace("_", " ") for c in columns]
    widths = [max(len(x) for x in col) for col in zip(heads, *rows, strict=False)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)).rstrip()
                     for row in [heads, *rows])


def _status_word(rec: Any) -> str:
    if rec is None:
        return "-"
    return f"pid {rec['pid']} " + ("running" if owned(rec) else "GONE")


def _print_state(state: State) -> None:
    print(f"\nsandbox fleet in {state['run_dir']}")
    print(f"  etcd: {', '.join(state['endpoints']) or '(starting)'}")
    for m in state["etcd"]:
        print(f"    {m['name']:<8} {_status_word(m['proc']):<22} log {m['proc']['log']}")
    for h in state["hosts"]:
        print(f"  {h['name']}  machine-id {h['machine_id']}")
        print(f"    systemd  {_status_word(h['systemd']):<22} bus {h['bus_address']}")
        docker = h["docker_host"] if h["docker"] is not None else "(no engine)"
        print(f"    docker   {_status_word(h['docker']):<22} {docker}")
        agent = f"config {h['config']}" if h["agent"] is not None else "(not started)"
        print(f"    agent    {_status_word(h['agent']):<22} {agent}")


def _print_footer(fleet: Fleet) -> None:
    print(f"\nlogs: {fleet.run_dir}/etcd/*.log, {fleet.run_dir}/hosts/<host>/"
          f"{{agent.log,systemd/systemd.log,docker/}}")
    print(f"etcdctl: ETCDCTL_API=3 etcdctl --endpoints {','.join(_endpoints(fleet))} get --prefix /norm/")
    print("stop it: make sandbox-down  (or: .venv/bin/python -m sandbox down)")


def _endpoints(fleet: Fleet) -> list[str]:
    state = fleet.load_state()
    return state["endpoints"] if state is not None else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR,
                        help=f"where the fleet keeps its state, data and logs (default {DEFAULT_RUN_DIR})")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in (("up", cmd_up), ("demo", cmd_demo)):
        p = sub.add_parser(name)
        p.set_defaults(fn=fn)
        p.add_argument("--hosts", type=int, default=3, help="simulated hosts (default 3)")
        p.add_argument("--no-docker", action="store_true", help="no Docker engine on the hosts")
        p.add_argument("--timeout", type=float, default=60.0, help="seconds each component may take to start")
        if name == "up":
            p.add_argument("--no-agents", action="store_true", help="do not start the norm agents")
        else:
            p.add_argument("--register-timeout", type=float, default=60.0,
                           help="seconds to wait for every agent to register in etcd")
    sub.add_parser("down").set_defaults(fn=cmd_down)
    sub.add_parser("status").set_defaults(fn=cmd_status)
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args))
    except SandboxError as e:
        print(f"sandbox: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
