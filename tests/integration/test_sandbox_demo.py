"""`python -m sandbox demo`: the fleet owns its registry and image engine (started, reused, stopped with
it), and the demo tells the whole story (v1, the flip to v2, a rolling deploy of v3 under load through
HAProxy, a broken v4 rolled back, the steps' record, the fleet table, a heal) twice in a row on the
same fleet."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from sandbox.fleet import Fleet, ProcState, State, owned
from sandbox.procs import pid_alive

REPO = Path(__file__).resolve().parents[2]
ANSWER = r"djed-(?:web|api) +\$ (?:curl -s|GET) http://127\.0\.0\.1:\d+/version +-> +{}\n"


def sandbox_cli(run_dir: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sandbox", "--run-dir", str(run_dir), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout, check=False)


def recorded(state: State) -> list[ProcState]:
    procs = [m["proc"] for m in state["etcd"]]
    for h in state["hosts"]:
        procs += [p for p in (h["systemd"], h["docker"], h["agent"]) if p is not None]
    reg, images = state.get("registry"), state.get("image_engine")
    if reg is not None:
        procs.append(reg["proc"])
    if images is not None and images["proc"] is not None:
        procs.append(images["proc"])
    return procs


@pytest.mark.slow
def test_the_registry_and_image_engine_belong_to_the_fleet(tmp_path: Path) -> None:
    run_dir = tmp_path / "f"
    plain = Fleet(run_dir, size=1, agents=False)
    plain.up()
    try:
        before = plain.load_state()
        assert before is not None and before.get("registry") is None

        # Asked for a registry, a healthy fleet without one is started again, with one.
        fleet = Fleet(run_dir, size=1, agents=False, registry=True)
        assert fleet.up() == "started"
        state = fleet.load_state()
        assert state is not None
        assert not any(pid_alive(p["pid"]) for p in recorded(before))
        reg, images = state.get("registry"), state.get("image_engine")
        assert reg is not None and images is not None and images["proc"] is not None
        assert owned(reg["proc"]) and owned(images["proc"])
        assert fleet.problems() == []
        config = tomllib.loads(Path(state["hosts"][0]["config"]).read_text())
        assert config["update"]["image"] == f"{reg['address']}/djed/app"

        # Reused while healthy, also by a fleet that does not ask for a registry.
        assert Fleet(run_dir, size=1, agents=False, registry=True).up() == "reused"
        assert Fleet(run_dir, size=1, agents=False).up() == "reused"
        status = sandbox_cli(run_dir, "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert f"registry: {reg['address']}/djed/app" in status.stdout

        # A dead registry makes the fleet unhealthy.
        (Path(reg["dir"]) / "storage" / "marker").write_text("kept\n")
        subprocess.run(["kill", "-9", str(reg["proc"]["pid"])], check=True)
        assert any("registry" in p for p in fleet.problems())
    finally:
        said = Fleet(run_dir).down()
    assert any("stopped dockerd-images" in s for s in said)
    assert not any(pid_alive(p["pid"]) for p in recorded(state))
    # The images stay for the next fleet; its registry serves them again.
    assert (Path(reg["dir"]) / "storage" / "marker").exists()


@pytest.mark.slow
def failed_demo(run: subprocess.CompletedProcess[str]) -> str:
    """What a demo that went wrong said of it, wherever in its output (then the output's end)."""
    marks = ("NOT as it should be", "a failed request", "<- expected", "exited with status", "Error")
    lines = run.stdout.splitlines() + run.stderr.splitlines()
    said = [line for line in lines if any(m in line for m in marks)]
    return "\n".join(said[:40]) + "\n--- the end:\n" + run.stdout[-3000:] + run.stderr[-2000:]


def test_the_demo_tells_the_whole_story_twice_on_one_fleet(tmp_path: Path) -> None:
    run_dir = tmp_path / "f"
    try:
        first = sandbox_cli(run_dir, "demo", timeout=280)
        assert first.returncode == 0, failed_demo(first)
        out = first.stdout
        assert "3 hosts registered" in out
        assert out.count("(built and pushed in") == 6
        assert len(re.findall(ANSWER.format("v1"), out)) == 6
        assert len(re.findall(ANSWER.format("v2"), out)) == 6
        # After its deploy, after v4's and v5's rollbacks, and after `norm undo` from v6.
        assert len(re.findall(ANSWER.format("v3"), out)) == 24
        assert len(re.findall(ANSWER.format("v6"), out)) == 6
        assert re.search(r"rollout \d+ v2@sha256:[0-9a-f]{12}: done", out)
        assert re.search(r"rollout \d+ v3@sha256:[0-9a-f]{12}: done", out)
        assert re.search(r"rollout \d+ v4@sha256:[0-9a-f]{12}: rolled_back", out)
        # The canary of v5 fails its error-rate analysis and is put back; v6's passes; undo goes to v3.
        assert re.search(r"rollout \d+ v5@sha256:[0-9a-f]{12}: rolled_back: the canary \(host\d\) failed "
                         r"its analysis: error-rate: ", out)
        assert re.search(r"rollout \d+ v6@sha256:[0-9a-f]{12}: done", out)
        assert re.search(r"undoing to v3@sha256:[0-9a-f]{12}, the release rollout \d+ deployed", out)
        assert re.search(r"rollout \d+ v3@sha256:[0-9a-f]{12}: done", out.split("$ norm undo --wait")[1])
        assert len(re.findall(r"\d+ requests, 0 failed; servers in service: at least 2 of 3", out)) == 3
        failed = r"\d+ requests, [1-9]\d* failed; servers in service: at least 2 of 3"
        assert len(re.findall(failed, out)) == 1  # v5's canary's own errors
        record = (run_dir / "data" / "record.log").read_text().split("\n")
        steps = [line.split()[:2] for line in record if line]
        assert steps == [["v1", "migrate"], ["v1", "collectstatic"], ["v2", "migrate"],
                         ["v2", "collectstatic"], ["v3", "migrate"], ["v3", "collectstatic"],
                         ["v4", "migrate"], ["v5", "migrate"], ["v5", "collectstatic"], ["v6", "migrate"],
                         ["v6", "collectstatic"]]
        assert len(re.findall(r"\nhost\d +sandbox +web +v3@sha256:[0-9a-f]{12} +2 ok", out)) == 3
        assert "Norm healed it" in out
        assert "djed-web.service  active/running" in out

        state = Fleet(run_dir).load_state()
        assert state is not None

        second = sandbox_cli(run_dir, "demo", timeout=280)
        assert second.returncode == 0, failed_demo(second)
        out = second.stdout
        assert "reusing it" in out
        assert out.count("(already in the registry;") == 6
        assert "an earlier demo left the fleet at v3" in out
        assert "step migrate: done before (skipped)" in out
        assert "Norm healed it" in out
        # The same fleet, and no step ran again.
        again = Fleet(run_dir).load_state()
        assert again is not None
        assert [p["pid"] for p in recorded(state)] == [p["pid"] for p in recorded(again)]
        assert (run_dir / "data" / "record.log").read_text().split("\n") == record
    finally:
        down = sandbox_cli(run_dir, "down")
    assert down.returncode == 0, down.stderr
    assert not any(pid_alive(p["pid"]) for p in recorded(state))
