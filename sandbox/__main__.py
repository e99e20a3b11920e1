"""`python -m sandbox up|down|status|demo`: a whole Norm fleet on this machine.

    up [--hosts N]   start a 3-member etcd cluster, a local image registry with the Docker engine that
                     builds its images, and N simulated hosts (or reuse a healthy fleet); with
                     --haproxy, also HAProxy in front of the hosts' web units, kept by the agents;
                     with --prometheus, a Prometheus scraping them, which the agents ask
    down             stop everything the fleet started, by pid (harmless when nothing runs)
    status           what runs, where its logs are; exit 0 healthy, 1 degraded, 3 not running
    demo             the whole story: up (with HAProxy in front of the web units), the demo app's
                     versions in the registry, its units on every host, the fleet's policy, `norm
                     deploy v1`, the flip to v2 shown live (a recreate: v2 does not declare its
                     migrations), a rolling deploy of v3 under steady load through HAProxy with no
                     failed request, a broken release (v4, whose /healthz answers 500) rolled back
                     automatically; then, with Prometheus scraping the hosts and the policy asking
                     for a canary, a release serving 5 % errors (v5) failing its canary's analysis
                     and put back, a good one (v6) passing it and rolling on, and `norm undo` taking
                     the fleet back to v3; the record the migration and static-files commands left,
                     the fleet table; then an app container killed on one host and Norm healing it
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sandbox.fleet import APP_REPOSITORY, DEFAULT_RUN_DIR, REPO, Fleet, State, owned
from sandbox.procs import SandboxError, venv_python, wait_for
from sandbox.systemd import SystemdManager

VERSIONS = ("v1", "v2", "v3", "v4", "v5", "v6")
BROKEN = "v4"  # its /healthz answers 500: the rolling deploy of it is rolled back
ERRORS = "v5"  # one request to / in twenty answers 500: its canary fails the error-rate analysis
GOOD = "v6"  # serves its metrics, no errors: its canary passes, then `norm undo` goes back to v3
FLEET_RELEASE = "v3"  # what the fleet runs at the end of the demo
LOAD_RATE = 50.0  # requests per second through HAProxy while v3 and v4 roll out
# While v5 and v6 roll out: their builds serve /metrics from the demo app's own small server, a shell per
# request, which a busy machine must keep up with; a third of it is plenty for the canary's analysis.
CANARY_LOAD_RATE = 20.0
# The fleet's policy the demo applies (`norm policy apply`): rolling where the image allows it, one host
# at a time, each healthy for 3 s (10 s by default) before the next; `migrate` before the batches
# (expand), `collectstatic` after (contract). The demo deploys v1 to v6 on every run; on a fleet an
# earlier run left at v3, going back to v1 or v2 goes below v3's contract step (the rollback floor),
# which Norm refuses unless the tag is declared compatible, as here.
_ROLLING = """strategy = "auto"
max_unavailable = "1"
min_healthy = 3
healthy_deadline = 15
progress_deadline = 60
compatible = ["v1", "v2"]
"""


def _steps(collectstatic: str) -> str:
    """`migrate` before the batches, `collectstatic` when told (the policy's [[steps]] tables)."""
    return "".join(f'\n[[steps]]\nname = "{name}"\ncommand = "{name}"\nwhen = "{when}"\n'
                   for name, when in (("migrate", "pre"), ("collectstatic", collectstatic)))


POLICY = _ROLLING + _steps("post")
# The policy from v5 on: one host first (the canary), watched for its error rate in Prometheus (two
# measurements over 1 % fail it), the rest only once it passes. Both steps run before the batches
# (expand only): no contract step makes v6 a rollback floor, so `norm undo` may take the fleet back.
CANARY_POLICY = _ROLLING + 'canary = "1"\n' + _steps("pre") + """
[[analysis]]
name = "error-rate"
query = '''
sum(rate(djed_http_requests_total{code="500",host=~"$CANARY"}[10s]))
  / sum(rate(djed_http_requests_total{host=~"$CANARY"}[10s]))
'''
interval = 2
count = 5
success = "result < 0.01"
failure_limit = 1
inconclusive_limit = 4
"""


def _say(msg: str) -> None:
    print(msg, flush=True)


def _fleet(args: argparse.Namespace) -> Fleet:
    docker = not getattr(args, "no_docker", False)
    return Fleet(run_dir=args.run_dir, size=getattr(args, "hosts", 3), docker=docker,
                 agents=not getattr(args, "no_agents", False), registry=docker,
                 haproxy=getattr(args, "haproxy", False) or args.command == "demo",
                 prometheus=getattr(args, "prometheus", False) or args.command == "demo", say=_say)


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
    t0 = time.monotonic()
    fleet = _fleet(args)
    if not fleet.docker:
        raise SandboxError("the demo needs Docker engines: drop --no-docker")
    _title("1. the fleet: a 3-member etcd cluster, a registry, and hosts with systemd, Docker and Norm")
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
    config = state["hosts"][0]["config"]
    _step_time(t0)

    t = time.monotonic()
    _title("2. the demo application: images v1 to v4 in the registry, its units on every host, the "
           "fleet's policy")
    _demo_images(state)
    ports = _install_units(state)
    print()
    _apply_policy(fleet.run_dir / "policy.toml", POLICY, config)
    _step_time(t)

    ok = True
    t = time.monotonic()
    _title("3. deploy v1")
    running = _desired(fleet)
    if running not in (None, "v1"):
        print(f"(an earlier demo left the fleet at {running}: v1 and v2 are declared compatible in the "
              f"fleet's policy, so going back to them runs no migration)")
    if not _norm_deploy(config, "v1", args.deploy_timeout):
        _print_footer(fleet)
        return 1
    ok &= _show_versions(state, ports, "v1")
    _step_time(t)

    t = time.monotonic()
    _title("4. flip to v2: it does not declare its migrations, so the fleet recreates: every host pulls "
           "it, then the fleet stops, migrates once and starts v2")
    if not _norm_deploy(config, "v2", args.deploy_timeout):
        _print_footer(fleet)
        return 1
    ok &= _show_versions(state, ports, "v2")
    _step_time(t)

    t = time.monotonic()
    _title(f"5. v3 declares expand migrations: a rolling deploy, one host at a time, under "
           f"{LOAD_RATE:g} requests/s through HAProxy")
    ok &= _under_load(state, lambda: _norm_deploy(config, "v3", args.deploy_timeout), want_ok=True)
    ok &= _show_versions(state, ports, "v3")
    _step_time(t)

    t = time.monotonic()
    _title(f"6. {BROKEN} is broken (its /healthz answers 500): the first host fails its health gate "
           "and is put back on v3")
    ok &= _put_back(state, ports, config, BROKEN, args.deploy_timeout)
    _step_time(t)

    t = time.monotonic()
    _title(f"7. a canary: the policy now sends a release to one host first and asks Prometheus its "
           f"error rate; {ERRORS} answers 500 to one request in twenty")
    _apply_policy(fleet.run_dir / "policy-canary.toml", CANARY_POLICY, config)
    ok &= _put_back(state, ports, config, ERRORS, args.deploy_timeout, path="/", errors_expected=True,
                    rate=CANARY_LOAD_RATE)
    _step_time(t)

    t = time.monotonic()
    _title(f"8. {GOOD} passes its canary's analysis and rolls on; then `norm undo` takes the fleet back "
           f"to the release before it, by digest, running no step")
    ok &= _under_load(state, lambda: _norm_deploy(config, GOOD, args.deploy_timeout), want_ok=True, path="/",
                      rate=CANARY_LOAD_RATE)
    ok &= _show_versions(state, ports, GOOD)
    ok &= _norm_undo(config, args.deploy_timeout)
    ok &= _show_versions(state, ports, "v3")
    _step_time(t)

    _title("9. what the migration and static-files commands recorded (one line per run, any host)")
    record = fleet.data_dir / "record.log"
    print(f"$ cat {_rel(record)}")
    print(record.read_text().rstrip() if record.exists() else "(no record yet)")
    ok &= _check_record(record)

    _title("10. the fleet")
    _wait_unheld(config)
    print("$ norm status")
    print(_norm(config, "status"))
    print("\n$ norm history --limit 6")
    print(_norm(config, "history", "--limit", "6"))

    t = time.monotonic()
    _title("11. healing: the web app's container dies on one host")
    ok &= _demo_healing(state, ports)
    _step_time(t)
    _print_footer(fleet)
    print(f"\ndemo {'done' if ok else 'done, with the problems shown above'} in {time.monotonic() - t0:.0f}s")
    return 0 if ok else 1


def _title(text: str) -> None:
    print(f"\n== {text}\n", flush=True)


def _step_time(t: float) -> None:
    print(f"({time.monotonic() - t:.1f}s)", flush=True)


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _norm(config: str, *args: str) -> str:
    r = subprocess.run([venv_python(), "-m", "norm", *args, "--config", config], capture_output=True,
                       text=True, cwd=REPO, timeout=60, check=False)
    return (r.stdout.rstrip() + ("\n" + r.stderr.rstrip() if r.stderr.strip() else "")).strip()


def _norm_deploy(config: str, version: str, timeout: float) -> bool:
    """`norm deploy VERSION --wait`, its live view going straight to our output."""
    print(f"$ norm deploy {version} --wait", flush=True)
    argv = [venv_python(), "-m", "norm", "deploy", version, "--wait", "--timeout", f"{timeout:g}",
            "--config", config]
    r = subprocess.run(argv, cwd=REPO, timeout=timeout + 60, check=False)
    if r.returncode != 0:
        print(f"norm deploy {version} exited with status {r.returncode}; the agents' logs say more",
              file=sys.stderr)
    return r.returncode == 0


def _put_back(state: State, ports: dict[str, tuple[int, int]], config: str, tag: str, timeout: float,
              **load: Any) -> bool:
    """A release that must not stay, deployed under load: rolled back, every host serving v3 again,
    and the history's word on it."""
    ok = _under_load(state, lambda: _norm_deploy(config, tag, timeout), want_ok=False, **load)
    ok &= _show_versions(state, ports, "v3")
    print(f"\n$ norm history --limit 1\n{_norm(config, 'history', '--limit', '1')}")
    return ok


def _apply_policy(path: Path, text: str, config: str) -> None:
    """Write a policy file and `norm policy apply` it, showing both."""
    path.write_text(text)
    print(f"$ cat {_rel(path)}\n{text.rstrip()}\n\n$ norm policy apply {_rel(path)}")
    print(_norm(config, "policy", "apply", str(path)))


def _norm_undo(config: str, timeout: float) -> bool:
    """`norm undo --wait`, as an operator runs it."""
    print("\n$ norm undo --wait", flush=True)
    argv = [venv_python(), "-m", "norm", "undo", "--wait", "--timeout", f"{timeout:g}", "--config", config]
    r = subprocess.run(argv, cwd=REPO, timeout=timeout + 60, check=False)
    if r.returncode != 0:
        print(f"norm undo exited with status {r.returncode}; the agents' logs say more", file=sys.stderr)
    return r.returncode == 0


def _check_record(path: Path) -> bool:
    """Say whether every version's steps ran exactly once, as the record shows."""
    import collections

    lines = path.read_text().splitlines() if path.exists() else []
    runs = collections.Counter(tuple(line.split()[:2]) for line in lines if len(line.split()) >= 2)
    wanted = {(v, step): 1 for v in VERSIONS for step in ("migrate", "collectstatic")}
    wanted[BROKEN, "collectstatic"] = 0  # after the batches: never, the release was rolled back
    wrong = [f"{v} {step} ran {runs[(v, step)]} times" for (v, step), n in wanted.items()
             if runs[(v, step)] != n]
    if wrong:
        print(f"NOT as it should be: {'; '.join(wrong)}")
        return False
    print("each version's migrate and collectstatic ran exactly once, in the new image: v1 and v2's "
          "between the fleet's stop and its start; v3's migrate before its first batch and collectstatic "
          f"after its last; {BROKEN}'s migrate only (it was rolled back before its contract step); "
          f"{ERRORS}'s and {GOOD}'s both before their canary (the canary policy runs no contract step)")
    return True


def _under_load(state: State, deploy: Callable[[], bool], want_ok: bool, path: str = "/version",
                errors_expected: bool = False, rate: float = LOAD_RATE) -> bool:
    """`deploy()` while steady load goes to `path` through HAProxy; the requests, the failures and the
    fewest servers in service shown; whether the deploy ended as wanted and no request failed (or, with
    `errors_expected`, some did: the release's own errors)."""
    from sandbox import load
    from sandbox.haproxy import HaproxyServer

    lb = state.get("haproxy")
    assert lb is not None
    runtime = HaproxyServer(Path(lb["dir"]), port=lb["port"])

    def serving() -> int:
        return sum(1 for admin in runtime.admin_states(lb["backend"]).values() if admin == "ready")

    with load.running(f"{lb['url']}{path}", rate, serving) as (result, servers):
        ok = deploy()
    print(f"\nload through HAProxy ({lb['url']}): {result.requests} requests, {result.failed} failed; "
          f"servers in service: at least {servers.min_serving} of {len(state['hosts'])} throughout")
    for _, reason in result.failures[:1 if errors_expected else 5]:
        print(f"  a failed request: {reason}" + (" (the canary's own errors)" if errors_expected else ""))
    if ok != want_ok:
        print(f"NOT as it should be: the deploy {'failed' if want_ok else 'succeeded'}")
    else:
        print("norm deploy --wait exited non-zero, as it must for a rolled back release" if not want_ok
              else "")
    return ok == want_ok and (result.failed > 0 if errors_expected else result.failed == 0)


def _wait_unheld(config: str, timeout: float = 15.0) -> None:
    """Wait until no host's unit summary shows units held by the update that has ended: each agent
    publishes its summary at most once a second, so it lags the rollout's end a little."""
    import json

    def settled() -> bool:
        r = subprocess.run([venv_python(), "-m", "norm", "status", "--json", "--config", config],
                           capture_output=True, text=True, cwd=REPO, timeout=60, check=True)
        return not any("held" in str(h.get("heal")) for h in json.loads(r.stdout)["hosts"])

    try:
        wait_for(settled, timeout=timeout, what="the unit summaries after the rollout", interval=0.5)
    except SandboxError as e:
        print(f"({e}: the table below still shows units held)")


def _desired(fleet: Fleet) -> str | None:
    from sandbox import updates

    kvs = updates.get_kvs(fleet, updates.VERSION_KEY)
    return kvs[0]["value"].decode(errors="replace") if kvs else None


def _demo_images(state: State) -> None:
    """Build and push the demo app's versions on the fleet's image engine, unless already pushed."""
    from sandbox import images
    from sandbox.docker import DockerEngine
    from sandbox.registry import Registry

    reg_state, engine_state = state.get("registry"), state.get("image_engine")
    if reg_state is None or engine_state is None:
        raise SandboxError("this fleet has no registry: `make sandbox-down` and run the demo again")
    registry = Registry(Path(reg_state["dir"]), port=int(reg_state["address"].rsplit(":", 1)[1]))
    engine = DockerEngine(engine_state["name"], Path(engine_state["dir"]))
    present = set(registry.tags(APP_REPOSITORY))
    options = {"v3": images.DemoOptions(migrations="expand"),
               BROKEN: images.DemoOptions(migrations="expand", healthz_status=500),
               ERRORS: images.DemoOptions(migrations="expand", error_rate=0.05),
               GOOD: images.DemoOptions(migrations="expand", metrics=True)}
    for version in VERSIONS:
        ref = f"{registry.address}/{APP_REPOSITORY}:{version}"
        if version in present:
            how = "already in the registry"
        else:
            t = time.monotonic()
            images.demo_app_image(engine, registry, version,
                                  options=options.get(version, images.DemoOptions()))
            how = f"built and pushed in {time.monotonic() - t:.1f}s"
        label = options[version].migrations if version in options else None
        print(f"{ref}  {registry.digest(APP_REPOSITORY, version)}  ({how}; migrations: "
              f"{label or 'undeclared'})", flush=True)
    print("one image: `serve` answers its version over HTTP; `migrate` and `collectstatic` append a "
          "line to /data/record.log; v3 to v6 carry the label org.norm.migrations=expand; v5 and v6 "
          "serve /metrics (requests by status), v5 answering 500 to one request to / in twenty")


def _install_units(state: State) -> dict[str, tuple[int, int]]:
    from sandbox import app

    ports = app.install_app(state)
    print("\nunits on every host (not started here: Norm starts them when it deploys), from the same "
          "image with different settings:")
    for h in state["hosts"]:
        web, api = ports[h["name"]]
        print(f"  {h['name']}  djed-web.service  PORT={web} NORM_DEMO_ROLE=web    "
              f"djed-api.service  PORT={api} NORM_DEMO_ROLE=api")
    print(f"  both run ${{NORM_IMAGE}} from the release file Norm owns: "
          f"{_rel(Path(state['hosts'][0]['dir']) / app.RELEASE_FILE)}")
    return ports


def _get(port: int) -> str:
    """GET /version as the operator would, with curl if there is one."""
    from sandbox import app

    url = f"http://127.0.0.1:{port}/version"
    if shutil.which("curl"):
        r = subprocess.run(["curl", "-s", "-m", "2", url], capture_output=True, text=True, timeout=10,
                           check=False)
        if r.returncode != 0:
            raise OSError(f"curl exited {r.returncode}")
        return r.stdout.strip()
    return app.fetch(port)


def _show_versions(state: State, ports: dict[str, tuple[int, int]], want: str) -> bool:
    """What every host's web and api units answer; whether all answer `want`."""
    tool = "curl -s" if shutil.which("curl") else "GET"
    print()
    ok = True
    for h in state["hosts"]:
        for unit, port in zip(("djed-web", "djed-api"), ports[h["name"]], strict=True):
            seen = {"answer": ""}

            def answers(port: int = port, seen: dict[str, str] = seen) -> bool:
                try:
                    seen["answer"] = _get(port)
                except OSError as e:
                    seen["answer"] = f"(no answer: {e})"
                return seen["answer"] == want

            try:  # the units are serving when the rollout ends; the wait only covers a slow answer
                wait_for(answers, timeout=10, what=f"{h['name']} {unit} answering {want}", interval=0.2)
            except SandboxError:
                ok = False
            mark = "" if seen["answer"] == want else f"   <- expected {want}"
            print(f"  {h['name']}  {unit:<8}  $ {tool} http://127.0.0.1:{port}/version  ->  "
                  f"{seen['answer']}{mark}", flush=True)
    return ok


def _norm_units(config: str) -> str:
    return _norm(config, "units")


def _least_healed(state: State, unit: str) -> Any:
    """The host whose `unit` Norm has healed least lately (the last host when none has been): a demo
    run again and again spreads its kills over the hosts, within the healing budget of each."""
    import json

    def attempts(host: Any) -> int:
        try:
            summary = json.loads(_norm(host["config"], "units", "--json"))
            return min(int(u["attempts"]) for u in summary if u.get("unit") == unit)
        except (ValueError, KeyError, TypeError):
            return 0

    return min(reversed(state["hosts"]), key=attempts)


def _demo_healing(state: State, ports: dict[str, tuple[int, int]]) -> bool:
    """SIGKILL the web app's container process on one host and show Norm healing its unit."""
    from sandbox.docker import DockerEngine

    unit = "djed-web.service"
    host = _least_healed(state, unit)
    web = ports[host["name"]][0]
    mgr = SystemdManager(host["name"], Path(host["systemd_dir"]))
    engine = DockerEngine(host["name"], Path(host["docker_dir"]))
    old_main = int(mgr.unit_property(unit, "MainPID"))
    pid = int(engine.docker("inspect", "--format", "{{.State.Pid}}", "djed-web").strip())
    print(f"{host['name']}: {unit} (main pid {old_main}) serves {_get(web)} from a container whose "
          f"process is pid {pid}; kill -9 {pid}", flush=True)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)

    def healed() -> bool:
        main = int(mgr.unit_property(unit, "MainPID"))
        if main in (0, old_main) or mgr.unit_property(unit, "ActiveState") != "active":
            return False
        return _get(web) == FLEET_RELEASE

    try:
        wait_for(healed, timeout=60, what=f"{unit} healed", interval=0.1)
    except SandboxError as e:
        print(f"{e}; see {host['dir']}/agent.log", file=sys.stderr)
        return False
    took = time.monotonic() - killed
    new_main = int(mgr.unit_property(unit, "MainPID"))
    print(f"{host['name']}: the unit failed; Norm healed it (stop, reset-failed, start): "
          f"main pid {new_main}, serving {_get(web)} again {took:.1f}s after the kill\n")

    def summarised() -> bool:  # the unit summary in etcd follows within a second of the change
        rows = [line.split() for line in _norm_units(host["config"]).splitlines()]
        return any(row[:2] == [unit, "active/running"] and row[3] == "ok" for row in rows[1:])

    try:
        wait_for(summarised, timeout=10, what="the unit summary")
    except SandboxError as e:
        print(e, file=sys.stderr)
    print(f"$ norm units   (on {host['name']})")
    print(_norm_units(host["config"]))
    return True


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
    reg, images = state.get("registry"), state.get("image_engine")
    if reg is not None:
        print(f"  registry: {reg['address']}/{APP_REPOSITORY}")
        print(f"    registry {_status_word(reg['proc']):<22} log {reg['proc']['log']}")
    if images is not None:
        print(f"    builder  {_status_word(images['proc']):<22} {images['docker_host']}")
    lb = state.get("haproxy")
    if lb is not None:
        print(f"  haproxy: {lb['url']} (backend {lb['backend']}, Runtime API {lb['socket']})")
        print(f"    haproxy  {_status_word(lb['proc']):<22} log {lb['proc']['log']}")
    prom = state.get("prometheus")
    if prom is not None:
        print(f"  prometheus: {prom['url']} (scraping the hosts' web units)")
        print(f"    prometheus  {_status_word(prom['proc']):<19} log {prom['proc']['log']}")
    for h in state["hosts"]:
        print(f"  {h['name']}  machine-id {h['machine_id']}")
        print(f"    systemd  {_status_word(h['systemd']):<22} bus {h['bus_address']}")
        docker = h["docker_host"] if h["docker"] is not None else "(no engine)"
        print(f"    docker   {_status_word(h['docker']):<22} {docker}")
        agent = f"config {h['config']}" if h["agent"] is not None else "(not started)"
        print(f"    agent    {_status_word(h['agent']):<22} {agent}")


def _print_footer(fleet: Fleet) -> None:
    print(f"\nlogs: {fleet.run_dir}/etcd/*.log, {fleet.run_dir}/hosts/<host>/"
          f"{{agent.log,djed-web.log,djed-api.log,systemd/systemd.log,docker/}}, {fleet.run_dir}/registry/")
    print(f"etcdctl: ETCDCTL_API=3 etcdctl --endpoints {','.join(_endpoints(fleet))} get --prefix /norm/")
    state = fleet.load_state()
    prom = state.get("prometheus") if state is not None else None
    if prom is not None:
        print(f"prometheus: {prom['url']} (the agents' and the web units' metrics, Norm's rules: "
              f"deploy/prometheus/norm-rules.yml); its alerts: {prom['url']}/alerts")
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
        p.add_argument("--haproxy", action="store_true",
                       help="HAProxy in front of the web units; the agents keep their servers in it")
        p.add_argument("--prometheus", action="store_true",
                       help="Prometheus scraping the web units; the agents ask it canaries' analyses")
        if name == "up":
            p.add_argument("--no-agents", action="store_true", help="do not start the norm agents")
        else:
            p.add_argument("--register-timeout", type=float, default=60.0,
                           help="seconds to wait for every agent to register in etcd")
            p.add_argument("--deploy-timeout", type=float, default=300.0,
                           help="seconds each `norm deploy --wait` may take")
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
