"""Loading the configuration from real files, the environment and flags; the host's identity; the
etcd password file."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from norm.app import settings
from norm.core import config as cfg
from norm.core.config import Config
from norm.core.errors import ConfigError
from norm.core.secret import Secret

MID = "0123456789abcdef0123456789abcdef"
PASSWORD = "pw-Zq8#unguessable"


def write(path: Path, text: str | bytes) -> str:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


def config_error(call: object, key: str, source: str, *reason: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        call()  # type: ignore[operator]
    e = info.value
    assert (e.key, e.source) == (key, source), str(e)
    assert source in str(e)
    for part in reason:
        assert part in e.reason, e.reason
    return e


@pytest.fixture
def toml(tmp_path: Path) -> str:
    return write(tmp_path / "norm.toml", """
[etcd]
endpoints = ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
lease_ttl = 20

[host]
environment = "stage"
role = "celery"

[log]
level = "debug"
""")


# ---------------------------------------------------------------------------------------------------
# load


def test_load_reads_the_file(toml: str) -> None:
    c = settings.load(toml, environ={})
    assert c.etcd.endpoints == ("http://10.0.0.1:2379", "http://10.0.0.2:2379")
    assert c.etcd.lease_ttl == 20
    assert (c.host.environment, c.host.role) == ("stage", "celery")
    assert c.log.level == "debug"
    assert c.keys == Config().keys


def test_load_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert settings.load(write(tmp_path / "e.toml", ""), environ={}) == Config()


def test_environment_overrides_the_file_and_flags_override_both(toml: str) -> None:
    env = {"NORM_ETCD__LEASE_TTL": "30", "NORM_HOST__ROLE": "django", "UNRELATED": "x"}
    c = settings.load(toml, environ=env)
    assert (c.etcd.lease_ttl, c.host.role, c.host.environment) == (30, "django", "stage")
    c = settings.load(toml, environ=env, flags=["etcd.lease_ttl=40", "log.level=error"])
    assert (c.etcd.lease_ttl, c.host.role, c.log.level) == (40, "django", "error")


def test_load_uses_the_process_environment_by_default(toml: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("NORM_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("NORM_HOST__ROLE", "worker")
    assert settings.load(toml).host.role == "worker"


def test_norm_config_names_the_file(toml: str) -> None:
    assert settings.load(None, environ={"NORM_CONFIG": toml}).etcd.lease_ttl == 20


def test_explicit_path_wins_over_norm_config(toml: str, tmp_path: Path) -> None:
    other = write(tmp_path / "other.toml", "[etcd]\nlease_ttl = 50\n")
    assert settings.load(other, environ={"NORM_CONFIG": toml}).etcd.lease_ttl == 50


def test_absent_default_file_is_fine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cfg, "DEFAULT_PATH", str(tmp_path / "absent.toml"))
    assert settings.load(None, environ={}) == Config()
    c = settings.load(None, environ={"NORM_ETCD__LEASE_TTL": "12"}, flags=["host.role=web"])
    assert (c.etcd.lease_ttl, c.host.role) == (12, "web")


def test_present_default_file_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cfg, "DEFAULT_PATH", write(tmp_path / "d.toml", "[etcd]\nlease_ttl = 44\n"))
    assert settings.load(None, environ={}).etcd.lease_ttl == 44


def test_missing_explicit_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    e = config_error(lambda: settings.load(path, environ={}), "-", path, "no such file")
    assert path in str(e)


def test_missing_file_named_by_norm_config(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    config_error(lambda: settings.load(None, environ={"NORM_CONFIG": path}), "-", path, "no such file")


@pytest.mark.parametrize("text", ["[etcd\n", "lease_ttl = \n", "[etcd]\nlease_ttl = 1\nlease_ttl = 2\n",
                                  "= 3\n", "[a]\nb = 'unterminated\n"])
def test_bad_toml(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "bad.toml", text)
    e = config_error(lambda: settings.load(path, environ={}), "-", path, "not valid TOML")
    assert path in str(e)


def test_bad_toml_error_does_not_quote_a_password(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.toml", f'[etcd]\nusername = "u"\npassword = "{PASSWORD}\n')
    e = config_error(lambda: settings.load(path, environ={}), "-", path, "not valid TOML")
    assert PASSWORD not in str(e)


def test_directory(tmp_path: Path) -> None:
    config_error(lambda: settings.load(str(tmp_path), environ={}), "-", str(tmp_path), "is a directory")


def test_not_utf8(tmp_path: Path) -> None:
    path = write(tmp_path / "latin1.toml", '[host]\nrole = "caf\xe9"\n'.encode("latin-1"))
    config_error(lambda: settings.load(path, environ={}), "-", path, "UTF-8")


def test_unreadable(tmp_path: Path) -> None:
    path = write(tmp_path / "secret.toml", "")
    os.chmod(path, 0)
    # Root reads any file, so the load runs in a child that has become nobody.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            try:
                settings.load(path, environ={})
                message = "loaded"
            except ConfigError as e:
                message = f"{e.key}|{e.source}|{e.reason}"
            os.write(w, message.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        message = f.read()
    os.waitpid(pid, 0)
    assert message == f"-|{path}|permission denied"


def test_error_in_the_file_names_the_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path / "n.toml", '[etcd]\nlease_ttl = "soon"\n')
    config_error(lambda: settings.load(path, environ={}), "etcd.lease_ttl", path, "whole number")
    path = write(tmp_path / "u.toml", "[etcd]\nbogus = 1\n")
    config_error(lambda: settings.load(path, environ={}), "etcd.bogus", path, "unknown key")


def test_error_in_the_environment_names_the_variable(toml: str) -> None:
    config_error(lambda: settings.load(toml, environ={"NORM_ETCD__LEASE_TTL": "x"}), "etcd.lease_ttl",
                 "environment variable NORM_ETCD__LEASE_TTL", "whole number")


def test_error_in_a_flag_names_the_flag(toml: str) -> None:
    config_error(lambda: settings.load(toml, environ={}, flags=["etcd.lease_ttl=x"]), "etcd.lease_ttl",
                 "--set etcd.lease_ttl", "whole number")
    config_error(lambda: settings.load(toml, environ={}, flags=["lease_ttl"]), "-", "--set")


@pytest.mark.parametrize("name", ["file-as-dir", "too-long"])
def test_other_os_errors_are_config_errors(tmp_path: Path, name: str) -> None:
    plain = write(tmp_path / "plain.toml", "")
    path = {"file-as-dir": plain + "/norm.toml", "too-long": str(tmp_path / ("n" * 300))}[name]
    config_error(lambda: settings.load(path, environ={}), "-", path)


def test_huge_integer_in_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "big.toml", "[etcd]\nlease_ttl = " + "9" * 5000 + "\n")
    config_error(lambda: settings.load(path, environ={}), "-", path)


# ---------------------------------------------------------------------------------------------------
# identity


def with_host(**host: str) -> Config:
    return cfg.build({"host": {k: cfg.Raw(v, "test") for k, v in host.items()}})


def test_identity_from_the_machine_id_file(tmp_path: Path) -> None:
    path = write(tmp_path / "machine-id", MID + "\n")
    ident = settings.identity(with_host(machine_id_path=path, name="web-1"))
    assert ident == settings.Identity(MID, "web-1")


def test_identity_from_config_does_not_read_the_file(tmp_path: Path) -> None:
    ident = settings.identity(with_host(machine_id=MID, machine_id_path=str(tmp_path / "absent")))
    assert ident.machine_id == MID


def test_identity_name_defaults_to_the_short_hostname() -> None:
    ident = settings.identity(with_host(machine_id=MID))
    assert ident.name == socket.gethostname().split(".")[0]
    assert "." not in ident.name


@pytest.mark.parametrize("content", ["", "\n", MID.upper(), MID[:-1], "not an id", MID + MID,
                                     "uninitialized\n"])
def test_identity_bad_machine_id_file(tmp_path: Path, content: str) -> None:
    path = write(tmp_path / "machine-id", content)
    e = config_error(lambda: settings.identity(with_host(machine_id_path=path)), "host.machine_id_path",
                     path, "32 lowercase hex digits")
    if len(content.strip()) > 3:
        assert content.strip() not in str(e)


def test_identity_missing_machine_id_file(tmp_path: Path) -> None:
    path = str(tmp_path / "absent")
    e = config_error(lambda: settings.identity(with_host(machine_id_path=path)), "host.machine_id_path",
                     path, "cannot read the machine id")
    assert "No such file" in e.reason


def test_identity_machine_id_path_is_a_directory(tmp_path: Path) -> None:
    config_error(lambda: settings.identity(with_host(machine_id_path=str(tmp_path))),
                 "host.machine_id_path", str(tmp_path), "cannot read the machine id")


def test_identity_machine_id_file_not_utf8(tmp_path: Path) -> None:
    path = write(tmp_path / "machine-id", b"\xff\xfe" + MID.encode())
    config_error(lambda: settings.identity(with_host(machine_id_path=path)), "host.machine_id_path", path)


# ---------------------------------------------------------------------------------------------------
# etcd_password


def with_etcd(**etcd: str) -> Config:
    return cfg.build({"etcd": {k: cfg.Raw(v, "test") for k, v in etcd.items()}})


def test_no_password() -> None:
    assert settings.etcd_password(Config()) is None


def test_password_from_config() -> None:
    assert settings.etcd_password(with_etcd(username="u", password=PASSWORD)) == Secret(PASSWORD)


@pytest.mark.parametrize("content", [PASSWORD, PASSWORD + "\n", PASSWORD + "\r\n",
                                     PASSWORD + "\nsecond line\n"])
def test_password_from_file_is_its_first_line(tmp_path: Path, content: str) -> None:
    path = write(tmp_path / "pw", content)
    secret = settings.etcd_password(with_etcd(username="u", password_file=path))
    assert isinstance(secret, Secret)
    assert secret.reveal() == PASSWORD


def test_password_file_keeps_inner_spaces(tmp_path: Path) -> None:
    path = write(tmp_path / "pw", " a b \n")
    secret = settings.etcd_password(with_etcd(username="u", password_file=path))
    assert secret is not None and secret.reveal() == " a b "


@pytest.mark.parametrize("content", ["", "\n", "\nsecond-line-password\n"])
def test_password_file_with_empty_first_line(tmp_path: Path, content: str) -> None:
    path = write(tmp_path / "pw", content)
    e = config_error(lambda: settings.etcd_password(with_etcd(username="u", password_file=path)),
                     "etcd.password_file", path, "first line is empty")
    assert "second-line-password" not in str(e)


def test_missing_password_file(tmp_path: Path) -> None:
    path = str(tmp_path / "absent")
    e = config_error(lambda: settings.etcd_password(with_etcd(username="u", password_file=path)),
                     "etcd.password_file", path, "cannot read the password")
    assert "No such file" in e.reason


def test_password_file_is_a_directory(tmp_path: Path) -> None:
    config_error(lambda: settings.etcd_password(with_etcd(username="u", password_file=str(tmp_path))),
                 "etcd.password_file", str(tmp_path), "cannot read the password")


def test_password_file_not_utf8(tmp_path: Path) -> None:
    path = write(tmp_path / "pw", b"caf\xe9-password\n")
    config_error(lambda: settings.etcd_password(with_etcd(username="u", password_file=path)),
                 "etcd.password_file", path)
