"""`norm policy apply|show` against a real etcd: the policy file validated, what it changes shown,
the key written only over the value read, and the policy in effect shown as a file apply takes."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from norm.adapters.etcd import Etcd, KeyValue
from norm.app import cli
from norm.app.commands import policy as policy_cmd
from norm.app.settings import load
from norm.core.config import EtcdConfig
from norm.core.policy import FleetPolicy, parse_policy_toml, policy_key
from sandbox.etcd import EtcdMember

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "docs" / "examples" / "policy.toml"
KEY = policy_key("/norm")
SECRET = "Hunter2-secret"
T = TypeVar("T")
Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def etcd_conf(etcd: EtcdMember) -> EtcdConfig:
    return EtcdConfig(endpoints=(etcd.endpoint,), request_timeout=2.0, dial_timeout=3.0)


@pytest.fixture
def conf(etcd: EtcdMember, tmp_path: Path) -> Path:
    path = tmp_path / "norm.toml"
    path.write_text(f'[etcd]\nendpoints = ["{etcd.endpoint}"]\nrequest_timeout = 2.0\ndial_timeout = 3.0\n'
                    '[update]\nsteps = ["migrate"]\nroles = ["django"]\npull_timeout = 60\n')
    return path


@pytest.fixture
def run(conf: Path, capsys: pytest.CaptureFixture[str]) -> Run:
    """`norm policy ACTION --config conf ARGS` in this process: (exit status, stdout, stderr)."""

    def go(action: str, *args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli.main(["policy", action, "--config", str(conf), *args])
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return code, out, err

    return go


def in_etcd(config: EtcdConfig, go: Callable[[Etcd], Awaitable[T]]) -> T:
    async def run() -> T:
        async with Etcd(config) as etcd:
            return await go(etcd)

    return asyncio.run(run())


def stored(config: EtcdConfig) -> KeyValue | None:
    return in_etcd(config, lambda etcd: etcd.get(KEY))


def test_without_a_key_the_hosts_own_update_config_is_shown(run: Run) -> None:
    code, out, err = run("show")
    assert code == 0, err
    assert out.startswith(f"# no fleet policy: hosts use their [update] config; {KEY} is absent\n")
    shown = parse_policy_toml(out, "shown")  # the comments aside, a file apply takes
    assert shown.strategy == "recreate" and shown.roles == ("django",) and shown.pull_timeout == 60.0
    assert [(s.name, s.command, s.when) for s in shown.steps] == [("migrate", "migrate", "pre")]
    code, out, _ = run("show", "--json")
    data = json.loads(out)
    assert (code, data["source"], data["revision"], data["refused"]) == (0, "config", None, None)
    assert FleetPolicy.decode(json.dumps(data["policy"]).encode(), "json") == shown


def test_apply_writes_the_file_and_show_gives_it_back(run: Run, etcd_conf: EtcdConfig,
                                                      tmp_path: Path) -> None:
    code, out, err = run("apply", str(EXAMPLE))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"no fleet policy yet at {KEY}")
    # Against what this configuration's [update] makes: every field that differs, in order.
    assert lines[1:5] == ['  strategy: "recreate" -> "auto"', '  max_unavailable: "1" -> "25%"',
                          '  min_healthy: 0.0 -> 10.0', '  roles: ["django"] -> ["django", "celery"]']
    assert '  pull_timeout: 600.0 -> 600.0' not in lines and '  pull_timeout: 60.0 -> 600.0' in lines
    kv = stored(etcd_conf)
    assert kv is not None
    assert lines[-1] == f"written: fleet policy revision {kv.mod_revision}"
    expected = parse_policy_toml(EXAMPLE.read_text(), "example")
    assert FleetPolicy.decode(kv.value, KEY) == expected and kv.value == expected.encode()

    code, out, err = run("show")
    assert code == 0, err
    assert out.splitlines()[0] == f"# fleet policy from {KEY}, revision {kv.mod_revision}"
    assert parse_policy_toml(out, "shown") == expected
    data = json.loads(run("show", "--json")[1])
    assert (data["source"], data["revision"]) == ("etcd", kv.mod_revision)

    # What show prints is a file apply takes: applying it again changes nothing, and writes nothing.
    shown = tmp_path / "shown.toml"
    shown.write_text(out)
    code, out, err = run("apply", str(shown))
    assert (code, out.splitlines()[-1]) == (0, "nothing to change"), err
    assert stored(etcd_conf) == kv

    # A change shows only what changes.
    changed = tmp_path / "changed.toml"
    changed.write_text(EXAMPLE.read_text().replace('max_unavailable = "25%"', "max_unavailable = 2"))
    code, out, err = run("apply", str(changed))
    assert code == 0, err
    after = stored(etcd_conf)
    assert after is not None
    assert out.splitlines() == [f"fleet policy at {KEY}, revision {kv.mod_revision}:",
                                '  max_unavailable: "25%" -> "2"',
                                f"written: fleet policy revision {after.mod_revision}"]
    assert FleetPolicy.decode(after.value, KEY) == dataclasses.replace(expected, max_unavailable="2")


def test_a_dry_run_shows_the_changes_and_writes_nothing(run: Run, etcd_conf: EtcdConfig) -> None:
    code, out, err = run("apply", str(EXAMPLE), "--dry-run")
    assert code == 0, err
    assert '  max_unavailable: "1" -> "25%"' in out.splitlines()
    assert out.splitlines()[-1] == "dry run: nothing written"
    assert stored(etcd_conf) is None


@pytest.mark.parametrize(("text", "where"), [
    ("max_unavailable = '0%'", "max_unavailable"),
    (f"roles = ['{SECRET}!']", "roles[0]"),
    (f"[[steps]]\ncommand = 'migrate'\nwhen = '{SECRET}'", "steps[0].when"),
    (f"{SECRET} = 1", SECRET),  # an unknown key is named: it is the file's own text, not a value
    ("min_healthy = 600\n", "min_healthy"),
])
def test_a_bad_file_writes_nothing_and_names_the_key(run: Run, etcd_conf: EtcdConfig, tmp_path: Path,
                                                     text: str, where: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    code, out, err = run("apply", str(path))
    assert (code, out) == (2, ""), err
    assert err.startswith(f"norm: configuration error: {path}: {where}: "), err
    if where != SECRET:
        assert SECRET not in err
    assert stored(etcd_conf) is None


def test_a_missing_file_is_refused(run: Run, tmp_path: Path) -> None:
    code, out, err = run("apply", str(tmp_path / "absent.toml"))
    assert (code, out) == (2, "") and "no such file" in err


def test_a_value_the_hosts_refuse_is_shown_as_such_and_replaced_by_apply(
        run: Run, etcd_conf: EtcdConfig) -> None:
    bad = json.dumps({"max_unavailable": SECRET}).encode()
    revision = in_etcd(etcd_conf, lambda etcd: etcd.put(KEY, bad))
    code, out, err = run("show")
    assert (code, out) == (1, ""), err
    assert f"{KEY}, revision {revision}: not a fleet policy (max_unavailable: " in err and SECRET not in err
    code, out, err = run("show", "--json")
    data = json.loads(out)
    assert code == 1 and data["policy"] is None and data["refused"].startswith("not a fleet policy")
    assert SECRET not in out + err

    code, out, err = run("apply", str(EXAMPLE))
    assert code == 0, err
    assert "hosts refuse it" in err and SECRET not in out + err
    assert '  max_unavailable = "25%"' in out.splitlines()  # every field, as nothing is known before
    kv = stored(etcd_conf)
    assert kv is not None and FleetPolicy.decode(kv.value, KEY) == parse_policy_toml(EXAMPLE.read_text(), "x")


class Interloper(Etcd):
    """A connection after whose first read of the policy another operator writes the key."""

    interloped = False

    async def get(self, key: str) -> KeyValue | None:
        kv = await super().get(key)
        if key == KEY and not self.interloped:
            self.interloped = True
            await self.put(KEY, FleetPolicy(max_unavailable="5").encode())
        return kv


def test_a_policy_written_meanwhile_is_not_overwritten(conf: Path, etcd_conf: EtcdConfig,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    config = load(str(conf))
    wanted = parse_policy_toml(EXAMPLE.read_text(), "example")

    async def go() -> int:
        async with Interloper(etcd_conf) as etcd:
            return await policy_cmd.apply(etcd, config, wanted, dry_run=False)

    assert asyncio.run(go()) == 1
    assert "changed while this one was being applied; nothing written" in capsys.readouterr().err
    kv = stored(etcd_conf)
    assert kv is not None and FleetPolicy.decode(kv.value, KEY) == FleetPolicy(max_unavailable="5")


def test_etcd_out_of_reach(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sandbox.procs import free_port

    conf = tmp_path / "away.toml"
    conf.write_text(f'[etcd]\nendpoints = ["http://127.0.0.1:{free_port()}"]\nrequest_timeout = 0.5\n'
                    "dial_timeout = 0.5\n")
    for argv in (["show"], ["apply", str(EXAMPLE)]):
        assert cli.main(["policy", argv[0], "--config", str(conf), *argv[1:]]) == 4
        assert "Traceback" not in capsys.readouterr().err
