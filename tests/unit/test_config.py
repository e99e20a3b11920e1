"""The configuration tree: sources and their precedence, coercion, validation, the reference."""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from norm.core import config as cfg
from norm.core.config import Config, Raw
from norm.core.errors import ConfigError, InvalidValue
from norm.core.secret import Secret

FILE = "/etc/norm/test.toml"
MID = "0123456789abcdef0123456789abcdef"
PASSWORD = "pw-Zq8#unguessable"


def from_toml(text: str, source: str = FILE) -> Config:
    return cfg.build(cfg.raw_from_toml(tomllib.loads(text), source))


def from_env(**values: str) -> Config:
    return cfg.build(cfg.raw_from_env({f"NORM_{k}": v for k, v in values.items()}))


def from_flags(*items: str) -> Config:
    return cfg.build(cfg.raw_from_flags(list(items)))


def env_name(dotted: str) -> str:
    section, _, key = dotted.partition(".")
    return f"NORM_{section.upper()}__{key.upper()}"


def env_source(dotted: str) -> str:
    return f"environment variable {env_name(dotted)}"


def fails(build: typing.Callable[[], object], key: str, source: str, *reason: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        build()
    e = info.value
    assert isinstance(e, InvalidValue)
    assert e.key == key, str(e)
    assert e.source == source, str(e)
    assert e.where == f"{source}: {key}"
    assert str(e) == f"{source}: {key}: {e.reason}"
    for part in reason:
        assert part in e.reason, e.reason
    return e


def fields_of(section: str) -> list[dataclasses.Field[object]]:
    cls = typing.get_type_hints(Config)[section]
    return list(dataclasses.fields(cls))


ALL_KEYS = [f"{s.name}.{f.name}" for s in dataclasses.fields(Config) for f in fields_of(s.name)]


# ---------------------------------------------------------------------------------------------------
# Defaults


def test_defaults_build_from_nothing() -> None:
    config = cfg.build({})
    assert config == Config()


def test_default_values() -> None:
    c = Config()
    assert c.etcd.endpoints == ("http://127.0.0.1:2379",)
    assert c.etcd.password is None and c.etcd.username is None and c.etcd.password_file is None
    assert c.etcd.lease_ttl == 10
    assert c.keys.version == "/djed-version"
    assert c.keys.environment == "/djed-environment"
    assert c.keys.prefix == "/norm"
    assert c.host.machine_id_path == "/etc/machine-id"
    assert c.host.machine_id is None
    assert c.units.patterns == ("djed*.service",)
    assert c.docker.host == "unix:///var/run/docker.sock"
    assert c.http.listen == "127.0.0.1:9847"
    assert c.log.level == "info" and c.log.format == "auto"
    assert 0 < c.agent.shutdown_timeout <= 600


def test_empty_sections_build_defaults() -> None:
    tree: cfg.RawTree = {s.name: {} for s in dataclasses.fields(Config)}
    assert cfg.build(tree) == Config()


def test_config_is_frozen() -> None:
    c = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.etcd = c.etcd  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.etcd.lease_ttl = 3  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------------
# Sources


def test_raw_from_toml_keeps_values_and_names_the_file() -> None:
    tree = cfg.raw_from_toml({"etcd": {"lease_ttl": 20, "endpoints": ["http://a:1"]}}, FILE)
    assert tree == {"etcd": {"lease_ttl": Raw(20, FILE), "endpoints": Raw(["http://a:1"], FILE)}}


@pytest.mark.parametrize("body", [1, "x", ["a"], True, [{"a": 1}]])
def test_raw_from_toml_refuses_a_section_that_is_not_a_table(body: object) -> None:
    fails(lambda: cfg.raw_from_toml({"etcd": body}, FILE), "etcd", FILE, "expected a table")


def test_top_level_key_in_toml_is_an_error() -> None:
    fails(lambda: from_toml('lease_ttl = 3\n'), "lease_ttl", FILE, "table")


def test_array_of_tables_is_an_error() -> None:
    fails(lambda: from_toml('[[etcd]]\nlease_ttl = 3\n'), "etcd", FILE, "table")


def test_raw_from_env_picks_norm_variables_only() -> None:
    tree = cfg.raw_from_env({
        "NORM_ETCD__LEASE_TTL": "20",
        "NORM_Log__Level": "debug",
        "NORM_CONFIG": "/x.toml",      # no '__': not a setting
        "NORMAL__X": "1",              # not the prefix
        "norm_etcd__lease_ttl": "30",  # the prefix is upper case
        "PATH": "/bin",
    })
    assert tree == {
        "etcd": {"lease_ttl": Raw("20", "environment variable NORM_ETCD__LEASE_TTL")},
        "log": {"level": Raw("debug", "environment variable NORM_Log__Level")},
    }


def test_env_key_with_a_second_separator_is_an_unknown_key() -> None:
    env = {"NORM_ETCD__LEASE__TTL": "20"}
    fails(lambda: cfg.build(cfg.raw_from_env(env)), "etcd.lease__ttl",
          "environment variable NORM_ETCD__LEASE__TTL", "unknown key")


def test_raw_from_flags() -> None:
    tree = cfg.raw_from_flags(["etcd.lease_ttl=20", " keys.version =/a=b", "host.name="])
    assert tree == {
        "etcd": {"lease_ttl": Raw("20", "--set etcd.lease_ttl")},
        "keys": {"version": Raw("/a=b", "--set  keys.version ")},
        "host": {"name": Raw("", "--set host.name")},
    }


@pytest.mark.parametrize(
    "item, key",
    [("etcd", "-"), ("etcd.lease_ttl", "-"), ("lease_ttl=3", "-"),
     (".lease_ttl=3", "-"), ("etcd.=3", "-"), ("=3", "-"), ("", "-")],
)
def test_raw_from_flags_refuses_malformed_items(item: str, key: str) -> None:
    fails(lambda: cfg.raw_from_flags([item]), key, "--set", "expected section.key=value")


@pytest.mark.parametrize("item", [f"={PASSWORD}", f"etcd.password:{PASSWORD}", f"etcd.password {PASSWORD}"])
def test_malformed_flag_does_not_echo_a_password(item: str) -> None:
    with pytest.raises(ConfigError) as info:
        cfg.raw_from_flags([item])
    assert PASSWORD not in str(info.value)


def test_merge_later_wins_per_key_and_keeps_the_rest() -> None:
    a = {"etcd": {"lease_ttl": Raw(1, "a"), "dial_timeout": Raw(2, "a")}, "log": {"level": Raw("x", "a")}}
    b = {"etcd": {"lease_ttl": Raw(3, "b")}, "keys": {"prefix": Raw("/p", "b")}}
    merged = cfg.merge(a, b)
    assert merged == {
        "etcd": {"lease_ttl": Raw(3, "b"), "dial_timeout": Raw(2, "a")},
        "log": {"level": Raw("x", "a")},
        "keys": {"prefix": Raw("/p", "b")},
    }
    assert a["etcd"]["lease_ttl"] == Raw(1, "a")  # inputs untouched
    assert cfg.merge() == {}


def sources(toml: str | None = None, env: dict[str, str] | None = None,
            flags: list[str] | None = None) -> Config:
    return cfg.build(cfg.merge(
        cfg.raw_from_toml(tomllib.loads(toml or ""), FILE),
        cfg.raw_from_env(env or {}),
        cfg.raw_from_flags(flags or []),
    ))


def test_precedence_toml_then_env_then_flags() -> None:
    toml = "[etcd]\nlease_ttl = 20\ndial_timeout = 7\nkeepalive_time = 30\n[log]\nlevel = \"error\"\n"
    env = {"NORM_ETCD__LEASE_TTL": "30", "NORM_ETCD__DIAL_TIMEOUT": "8"}
    flags = ["etcd.lease_ttl=40"]
    assert sources(toml).etcd.lease_ttl == 20
    assert sources(toml, env).etcd.lease_ttl == 30
    c = sources(toml, env, flags)
    assert c.etcd.lease_ttl == 40           # flag over env over file
    assert c.etcd.dial_timeout == 8.0       # env over file
    assert c.etcd.keepalive_time == 30.0    # file alone
    assert c.log.level == "error"
    assert c.etcd.request_timeout == 5.0    # default
    assert sources(None, None, flags).etcd.lease_ttl == 40
    assert sources(toml, None, flags).etcd.lease_ttl == 40


def test_errors_name_the_source_that_won() -> None:
    toml = "[etcd]\nlease_ttl = 20\n"
    fails(lambda: sources(toml, {"NORM_ETCD__LEASE_TTL": "x"}), "etcd.lease_ttl",
          env_source("etcd.lease_ttl"), "whole number")
    fails(lambda: sources(toml, {"NORM_ETCD__LEASE_TTL": "x"}, ["etcd.lease_ttl=y"]), "etcd.lease_ttl",
          "--set etcd.lease_ttl", "whole number")
    # a bad value that a later source overrides is never looked at
    assert sources('[etcd]\nlease_ttl = "soon"\n', {"NORM_ETCD__LEASE_TTL": "12"}).etcd.lease_ttl == 12


@settings(deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["toml", "env", "flag"]), st.integers(3, 3600)),
                min_size=1, max_size=3, unique_by=lambda t: t[0]))
def test_precedence_property(layers: list[tuple[str, int]]) -> None:
    given_ = dict(layers)
    c = sources(
        f"[etcd]\nlease_ttl = {given_['toml']}\nrequest_timeout = 1\n" if "toml" in given_ else
        "[etcd]\nrequest_timeout = 1\n",
        {"NORM_ETCD__LEASE_TTL": str(given_["env"])} if "env" in given_ else None,
        [f"etcd.lease_ttl={given_['flag']}"] if "flag" in given_ else None,
    )
    winner = next(given_[k] for k in ("flag", "env", "toml") if k in given_)
    assert c.etcd.lease_ttl == winner


# ---------------------------------------------------------------------------------------------------
# Coercion


@pytest.mark.parametrize(
    "value, expected",
    [(True, True), (False, False), ("1", True), ("true", True), ("TRUE", True), ("Yes", True),
     ("on", True), ("0", False), ("false", False), ("No", False), ("OFF", False)],
)
def test_bool_coercion(value: object, expected: bool) -> None:
    assert cfg._coerce(bool, Raw(value, "src"), "s.k") is expected


@pytest.mark.parametrize("value", ["", "maybe", "2", "y", "t", " true", 1, 0, 1.0, None, [], {}])
def test_bool_coercion_refuses(value: object) -> None:
    fails(lambda: cfg._coerce(bool, Raw(value, "src"), "s.k"), "s.k", "src", "true or false")


def test_unsupported_schema_type_is_a_type_error_not_a_config_error() -> None:
    with pytest.raises(TypeError, match="unsupported config type"):
        cfg._coerce(dict, Raw({}, "src"), "s.k")


@pytest.mark.parametrize(
    "text, expected",
    [("20", 20), (" 20 ", 20), ("007", 7), ("3600", 3600)],
)
def test_int_from_text(text: str, expected: int) -> None:
    assert from_env(ETCD__LEASE_TTL=text, ETCD__REQUEST_TIMEOUT="1").etcd.lease_ttl == expected


@pytest.mark.parametrize("text", ["", "x", "20.0", "20.5", "1e2", "+20", "0x10", "2 0", "twenty", "20s"])
def test_int_from_bad_text(text: str) -> None:
    fails(lambda: from_env(ETCD__LEASE_TTL=text), "etcd.lease_ttl", env_source("etcd.lease_ttl"),
          "whole number")


@pytest.mark.parametrize("value", ["true", "20.0", "[20]", '"20x"', "{ a = 1 }"])
def test_int_from_bad_toml(value: str) -> None:
    fails(lambda: from_toml(f"[etcd]\nlease_ttl = {value}\n"), "etcd.lease_ttl", FILE, "whole number")


def test_int_from_toml_and_toml_string() -> None:
    assert from_toml("[etcd]\nlease_ttl = 30\n").etcd.lease_ttl == 30
    assert from_toml('[etcd]\nlease_ttl = "30"\n').etcd.lease_ttl == 30


def test_negative_int_is_coerced_then_refused_by_validation() -> None:
    fails(lambda: from_env(ETCD__LEASE_TTL="-5"), "etcd.lease_ttl", env_source("etcd.lease_ttl"),
          "from 3 to 3600")


@pytest.mark.parametrize("text, expected", [("7", 7.0), ("7.5", 7.5), (" 2.5 ", 2.5), ("1e1", 10.0),
                                            (".5", 0.5)])
def test_float_from_text(text: str, expected: float) -> None:
    assert from_env(ETCD__DIAL_TIMEOUT=text).etcd.dial_timeout == expected


@pytest.mark.parametrize("value, expected", [("7", 7.0), ("7.25", 7.25), ('"7.5"', 7.5)])
def test_float_from_toml(value: str, expected: float) -> None:
    c = from_toml(f"[etcd]\ndial_timeout = {value}\n")
    assert c.etcd.dial_timeout == expected
    assert isinstance(c.etcd.dial_timeout, float)


@pytest.mark.parametrize("text", ["", "x", "5s", "1,5", "--1", "0x10"])
def test_float_from_bad_text(text: str) -> None:
    fails(lambda: from_env(ETCD__DIAL_TIMEOUT=text), "etcd.dial_timeout", env_source("etcd.dial_timeout"),
          "expected a number")


@pytest.mark.parametrize("value", ["true", "[5]", '"five"', "{ a = 1 }"])
def test_float_from_bad_toml(value: str) -> None:
    fails(lambda: from_toml(f"[etcd]\ndial_timeout = {value}\n"), "etcd.dial_timeout", FILE,
          "expected a number")


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "infinity"])
@pytest.mark.parametrize("key", ["etcd.dial_timeout", "etcd.request_timeout", "etcd.keepalive_timeout",
                                 "etcd.keepalive_time", "agent.shutdown_timeout", "agent.resync_interval"])
def test_non_finite_numbers_are_refused(key: str, text: str) -> None:
    tree = cfg.raw_from_env({env_name(key): text})
    fails(lambda: cfg.build(tree), key, env_source(key))


def test_list_from_toml() -> None:
    c = from_toml('[etcd]\nendpoints = ["http://a:1", "http://b:2"]\n')
    assert c.etcd.endpoints == ("http://a:1", "http://b:2")


@pytest.mark.parametrize(
    "text, expected",
    [("http://a:1", ("http://a:1",)),
     ("http://a:1,http://b:2", ("http://a:1", "http://b:2")),
     (" http://a:1 , , http://b:2 ,", ("http://a:1", "http://b:2"))],
)
def test_list_from_text_is_comma_separated(text: str, expected: tuple[str, ...]) -> None:
    assert from_env(ETCD__ENDPOINTS=text).etcd.endpoints == expected
    assert from_flags(f"etcd.endpoints={text}").etcd.endpoints == expected


def test_list_coercion_directly() -> None:
    tp = tuple[int, ...]
    assert cfg._coerce(tp, Raw("1, 2,3", "s"), "k") == (1, 2, 3)
    assert cfg._coerce(tp, Raw([4, 5], "s"), "k") == (4, 5)
    assert cfg._coerce(tp, Raw((), "s"), "k") == ()
    fails(lambda: cfg._coerce(tp, Raw("1,x", "s"), "k"), "k", "s", "whole number")


@pytest.mark.parametrize("value", ["5", "true", "{ a = 1 }", "1.5"])
def test_list_from_bad_toml(value: str) -> None:
    fails(lambda: from_toml(f"[units]\npatterns = {value}\n"), "units.patterns", FILE, "expected a list")


def test_list_item_of_wrong_type() -> None:
    fails(lambda: from_toml('[units]\npatterns = ["a.service", 5]\n'), "units.patterns", FILE,
          "expected a string")


def test_empty_list_text_is_an_empty_list_then_refused() -> None:
    fails(lambda: from_env(ETCD__ENDPOINTS=""), "etcd.endpoints", env_source("etcd.endpoints"),
          "at least one")
    fails(lambda: from_env(UNITS__PATTERNS=" , "), "units.patterns", env_source("units.patterns"),
          "at least one")


@pytest.mark.parametrize("level", ["debug", "info", "warning", "error"])
def test_literal_accepts_its_choices(level: str) -> None:
    assert from_env(LOG__LEVEL=level).log.level == level
    assert from_toml(f'[log]\nlevel = "{level}"\n').log.level == level


@pytest.mark.parametrize("value", ["DEBUG", "Info", "verbose", "", " info", "critical"])
def test_literal_refuses_others(value: str) -> None:
    e = fails(lambda: from_env(LOG__LEVEL=value), "log.level", env_source("log.level"), "must be one of")
    assert "debug, info, warning, error" in e.reason


@pytest.mark.parametrize("value", ["1", "true", '["json"]'])
def test_literal_refuses_non_strings_from_toml(value: str) -> None:
    fails(lambda: from_toml(f"[log]\nformat = {value}\n"), "log.format", FILE, "auto, json, console")


def test_secret_from_text_and_toml() -> None:
    c = from_env(ETCD__USERNAME="root", ETCD__PASSWORD=PASSWORD)
    assert isinstance(c.etcd.password, Secret)
    assert c.etcd.password.reveal() == PASSWORD
    c = from_toml(f'[etcd]\nusername = "root"\npassword = "{PASSWORD}"\n')
    assert c.etcd.password == Secret(PASSWORD)


@pytest.mark.parametrize("value", ["1", "true", "[1]", '["pw"]'])
def test_secret_must_be_a_string(value: str) -> None:
    fails(lambda: from_toml(f'[etcd]\nusername = "root"\npassword = {value}\n'), "etcd.password", FILE,
          "expected a string")


def test_optional_given_and_empty() -> None:
    assert from_env(ETCD__CA_FILE="/ca.pem").etcd.ca_file == "/ca.pem"
    assert from_env(ETCD__CA_FILE="").etcd.ca_file is None       # empty text unsets
    assert from_toml('[etcd]\nca_file = ""\n').etcd.ca_file is None
    assert from_env(HOST__NAME="").host.name is None
    assert from_flags("systemd.bus_address=").systemd.bus_address is None
    assert from_flags("systemd.bus_address=unix:path=/run/bus").systemd.bus_address == "unix:path=/run/bus"


def test_empty_password_is_unset() -> None:
    c = from_env(ETCD__PASSWORD="")
    assert c.etcd.password is None


@pytest.mark.parametrize("value", ["1", "true", "[]", "1.5"])
def test_optional_string_of_wrong_type(value: str) -> None:
    fails(lambda: from_toml(f"[etcd]\nca_file = {value}\n"), "etcd.ca_file", FILE, "expected a string")


@pytest.mark.parametrize("value", ["1", "true", '["/norm"]'])
def test_string_of_wrong_type(value: str) -> None:
    fails(lambda: from_toml(f"[keys]\nprefix = {value}\n"), "keys.prefix", FILE, "expected a string")


def test_optional_coercion_directly() -> None:
    assert cfg._coerce(int | None, Raw(None, "s"), "k") is None
    assert cfg._coerce(int | None, Raw("", "s"), "k") is None
    assert cfg._coerce(typing.Optional[int], Raw("4", "s"), "k") == 4  # noqa: UP045
    fails(lambda: cfg._coerce(int | None, Raw("x", "s"), "k"), "k", "s", "whole number")


# ---------------------------------------------------------------------------------------------------
# Unknown sections and keys


def test_unknown_section_from_each_source() -> None:
    e = fails(lambda: from_toml("[etc]\nx = 1\n"), "etc", FILE, "unknown section")
    for section in ("etcd", "keys", "host", "units", "systemd", "docker", "http", "agent", "log"):
        assert section in e.reason
    fails(lambda: from_env(ETC__X="1"), "etc", "environment variable NORM_ETC__X", "unknown section")
    fails(lambda: from_flags("etc.x=1"), "etc", "--set etc.x", "unknown section")


def test_empty_unknown_section_names_the_file() -> None:
    fails(lambda: from_toml("[bogus]\n"), "bogus", FILE, "unknown section")


def test_unknown_key_from_each_source() -> None:
    e = fails(lambda: from_toml("[etcd]\nleese_ttl = 3\n"), "etcd.leese_ttl", FILE, "unknown key")
    assert "lease_ttl" in e.reason and "endpoints" in e.reason
    fails(lambda: from_env(ETCD__LEESE_TTL="3"), "etcd.leese_ttl",
          "environment variable NORM_ETCD__LEESE_TTL", "unknown key")
    fails(lambda: from_flags("etcd.leese_ttl=3"), "etcd.leese_ttl", "--set etcd.leese_ttl", "unknown key")


def test_nested_table_is_an_unknown_key() -> None:
    fails(lambda: from_toml("[etcd.tls]\nca = 1\n"), "etcd.tls", FILE, "unknown key")


def test_password_under_a_misspelt_key_is_not_shown() -> None:
    e = fails(lambda: from_env(ETCD__PASWORD=PASSWORD), "etcd.pasword",
              "environment variable NORM_ETCD__PASWORD", "unknown key")
    assert PASSWORD not in str(e)


@pytest.mark.parametrize("key", ALL_KEYS)
def test_every_key_is_known_in_every_section(key: str) -> None:
    # Each key of the schema is accepted by name from the environment (its value may be refused).
    try:
        cfg.build(cfg.raw_from_env({env_name(key): "x"}))
    except ConfigError as e:
        assert "unknown" not in e.reason


# ---------------------------------------------------------------------------------------------------
# Validation rules: each names the key and where it came from

RULES: list[tuple[dict[str, str], str, str, str]] = [
    # (environment, key that fails, source of that key or "default", part of the reason)
    ({"ETCD__ENDPOINTS": ","}, "etcd.endpoints", "env", "at least one endpoint"),
    ({"ETCD__ENDPOINTS": "ftp://h:1"}, "etcd.endpoints", "env", "http://host:port"),
    ({"ETCD__ENDPOINTS": "h:2379"}, "etcd.endpoints", "env", "http://host:port"),
    ({"ETCD__ENDPOINTS": "http://etcd0"}, "etcd.endpoints", "env", "http://host:port"),
    ({"ETCD__ENDPOINTS": "http://:2379"}, "etcd.endpoints", "env", "http://host:port"),
    ({"ETCD__ENDPOINTS": "unix:///run/etcd.sock"}, "etcd.endpoints", "env", "http://host:port"),
    ({"ETCD__ENDPOINTS": "http://h:1,ftp://h:2"}, "etcd.endpoints", "env", "http://host:port"),
    ({"ETCD__ENDPOINTS": "http://h:2379/v3"}, "etcd.endpoints", "env", "no path"),
    ({"ETCD__ENDPOINTS": "http://a:1,https://b:2"}, "etcd.endpoints", "env", "all be http or all https"),
    ({"ETCD__ENDPOINTS": "https://a:1", "ETCD__CERT_FILE": "/c.pem"}, "etcd.key_file", "default",
     "go together"),
    ({"ETCD__ENDPOINTS": "https://a:1", "ETCD__KEY_FILE": "/k.pem"}, "etcd.cert_file", "default",
     "go together"),
    ({"ETCD__CERT_FILE": "/c.pem", "ETCD__KEY_FILE": "/k.pem"}, "etcd.cert_file", "env", "need https"),
    ({"ETCD__USERNAME": "u", "ETCD__PASSWORD": PASSWORD, "ETCD__PASSWORD_FILE": "/pw"},
     "etcd.password_file", "env", "not both"),
    ({"ETCD__PASSWORD": PASSWORD}, "etcd.username", "default", "needs a username"),
    ({"ETCD__PASSWORD_FILE": "/pw"}, "etcd.username", "default", "needs a username"),
    ({"ETCD__USERNAME": "u"}, "etcd.password", "default", "needs password or password_file"),
    ({"ETCD__DIAL_TIMEOUT": "0"}, "etcd.dial_timeout", "env", "more than 0 and at most 300"),
    ({"ETCD__DIAL_TIMEOUT": "-1"}, "etcd.dial_timeout", "env", "more than 0 and at most 300"),
    ({"ETCD__DIAL_TIMEOUT": "300.5"}, "etcd.dial_timeout", "env", "more than 0 and at most 300"),
    ({"ETCD__REQUEST_TIMEOUT": "0"}, "etcd.request_timeout", "env", "more than 0 and at most 300"),
    ({"ETCD__REQUEST_TIMEOUT": "301", "ETCD__LEASE_TTL": "3600"}, "etcd.request_timeout", "env",
     "more than 0 and at most 300"),
    ({"ETCD__KEEPALIVE_TIMEOUT": "0"}, "etcd.keepalive_timeout", "env", "more than 0 and at most 300"),
    ({"ETCD__KEEPALIVE_TIMEOUT": "1000"}, "etcd.keepalive_timeout", "env", "more than 0 and at most 300"),
    ({"ETCD__KEEPALIVE_TIME": "4.9"}, "etcd.keepalive_time", "env", "from 5 to 3600"),
    ({"ETCD__KEEPALIVE_TIME": "3600.1"}, "etcd.keepalive_time", "env", "from 5 to 3600"),
    ({"ETCD__LEASE_TTL": "2", "ETCD__REQUEST_TIMEOUT": "1"}, "etcd.lease_ttl", "env", "from 3 to 3600"),
    ({"ETCD__LEASE_TTL": "3601"}, "etcd.lease_ttl", "env", "from 3 to 3600"),
    ({"ETCD__LEASE_TTL": "5"}, "etcd.request_timeout", "default", "shorter than etcd.lease_ttl"),
    ({"ETCD__REQUEST_TIMEOUT": "10"}, "etcd.request_timeout", "env", "shorter than etcd.lease_ttl"),
    ({"ETCD__FAILOVER_AFTER": "0"}, "etcd.failover_after", "env", "from 1 to 100"),
    ({"ETCD__FAILOVER_AFTER": "101"}, "etcd.failover_after", "env", "from 1 to 100"),
    ({"KEYS__VERSION": "djed-version"}, "keys.version", "env", "must start with /"),
    ({"KEYS__VERSION": ""}, "keys.version", "env", "must start with /"),
    ({"KEYS__VERSION": "/"}, "keys.version", "env", "not end with /"),
    ({"KEYS__VERSION": "/djed/"}, "keys.version", "env", "not end with /"),
    ({"KEYS__VERSION": "/djed version"}, "keys.version", "env", "without spaces"),
    ({"KEYS__VERSION": "/djed\tversion"}, "keys.version", "env", "printable ASCII"),
    ({"KEYS__VERSION": "/djed-versión"}, "keys.version", "env", "printable ASCII"),
    ({"KEYS__ENVIRONMENT": "env"}, "keys.environment", "env", "must start with /"),
    ({"KEYS__PREFIX": "/norm/"}, "keys.prefix", "env", "not end with /"),
    ({"KEYS__PREFIX": "norm"}, "keys.prefix", "env", "must start with /"),
    ({"KEYS__VERSION": "/norm/version"}, "keys.version", "env", "under keys.prefix"),
    ({"KEYS__ENVIRONMENT": "/norm/env"}, "keys.environment", "env", "under keys.prefix"),
    ({"HOST__MACHINE_ID": MID.upper()}, "host.machine_id", "env", "32 lowercase hex digits"),
    ({"HOST__MACHINE_ID": MID[:-1]}, "host.machine_id", "env", "32 lowercase hex digits"),
    ({"HOST__MACHINE_ID": MID + "0"}, "host.machine_id", "env", "32 lowercase hex digits"),
    ({"HOST__MACHINE_ID": " " + MID}, "host.machine_id", "env", "32 lowercase hex digits"),
    ({"HOST__ENVIRONMENT": ""}, "host.environment", "env", "1 to 63"),
    ({"HOST__ENVIRONMENT": "-prod"}, "host.environment", "env", "1 to 63"),
    ({"HOST__ENVIRONMENT": "pr od"}, "host.environment", "env", "1 to 63"),
    ({"HOST__ENVIRONMENT": "p" * 64}, "host.environment", "env", "1 to 63"),
    ({"HOST__ROLE": "web/1"}, "host.role", "env", "1 to 63"),
    ({"HOST__ROLE": ".web"}, "host.role", "env", "1 to 63"),
    ({"HOST__NAME": "web 1"}, "host.name", "env", "1 to 63"),
    ({"HOST__NAME": "w" * 64}, "host.name", "env", "1 to 63"),
    ({"UNITS__PATTERNS": ","}, "units.patterns", "env", "at least one pattern"),
    ({"UNITS__PATTERNS": "myapp"}, "units.patterns", "env", "systemd unit name"),
    ({"UNITS__PATTERNS": "djed.conf"}, "units.patterns", "env", "systemd unit name"),
    ({"UNITS__PATTERNS": "djed web.service"}, "units.patterns", "env", "systemd unit name"),
    ({"UNITS__PATTERNS": "djed/web.service"}, "units.patterns", "env", "systemd unit name"),
    ({"UNITS__PATTERNS": "a.service,bad"}, "units.patterns", "env", "systemd unit name"),
    ({"UNITS__PATTERNS": "x" * 248 + ".service"}, "units.patterns", "env", "systemd unit name"),
    ({"HTTP__LISTEN": "9847"}, "http.listen", "env", "host:port"),
    ({"HTTP__LISTEN": "127.0.0.1:"}, "http.listen", "env", "host:port"),
    ({"HTTP__LISTEN": "127.0.0.1:0"}, "http.listen", "env", "port from 1 to 65535"),
    ({"HTTP__LISTEN": "127.0.0.1:65536"}, "http.listen", "env", "port from 1 to 65535"),
    ({"HTTP__LISTEN": "127.0.0.1:-1"}, "http.listen", "env", "port from 1 to 65535"),
    ({"HTTP__LISTEN": ":9847"}, "http.listen", "env", "with a host"),
    ({"HTTP__LISTEN": "[]:9847"}, "http.listen", "env", "with a host"),
    ({"HTTP__LISTEN": "example.com:9847"}, "http.listen", "env", "an IP address or localhost"),
    ({"HTTP__LISTEN": "300.1.1.1:9847"}, "http.listen", "env", "an IP address or localhost"),
    ({"DOCKER__HOST": "/var/run/docker.sock"}, "docker.host", "env", "unix:///path"),
    ({"DOCKER__HOST": "ssh://me@h"}, "docker.host", "env", "unix:///path"),
    ({"DOCKER__HOST": "npipe:////./pipe/docker"}, "docker.host", "env", "unix:///path"),
    ({"AGENT__SHUTDOWN_TIMEOUT": "0"}, "agent.shutdown_timeout", "env", "more than 0 and at most 600"),
    ({"AGENT__SHUTDOWN_TIMEOUT": "600.5"}, "agent.shutdown_timeout", "env", "more than 0 and at most 600"),
    ({"AGENT__RESYNC_INTERVAL": "0.5"}, "agent.resync_interval", "env", "from 1 to 86400"),
    ({"AGENT__RESYNC_INTERVAL": "86401"}, "agent.resync_interval", "env", "from 1 to 86400"),
]


@pytest.mark.parametrize("env, key, source, reason", RULES,
                         ids=[f"{k}-{i}" for i, (_, k, _, _) in enumerate(RULES)])
def test_validation_rule(env: dict[str, str], key: str, source: str, reason: str | None) -> None:
    want_source = env_source(key) if source == "env" else "default"
    e = fails(lambda: from_env(**env), key, want_source, *([reason] if reason else []))
    assert PASSWORD not in str(e) and PASSWORD not in repr(e)


@pytest.mark.parametrize("env, key, source, reason", RULES,
                         ids=[f"{k}-{i}" for i, (_, k, _, _) in enumerate(RULES)])
def test_validation_rule_from_toml_names_the_file(env: dict[str, str], key: str, source: str,
                                                  reason: str | None) -> None:
    tree = cfg.raw_from_env({f"NORM_{k}": v for k, v in env.items()})
    as_toml = {section: {k: Raw(raw.value, FILE) for k, raw in body.items()}
               for section, body in tree.items()}
    fails(lambda: cfg.build(as_toml), key, FILE if source == "env" else "default")


def test_validation_error_does_not_quote_most_values() -> None:
    for env, key, _, _ in RULES:
        value = env.get(env_name(key).removeprefix("NORM_"))
        if not value or len(value) < 4 or key == "http.listen":
            continue
        with pytest.raises(ConfigError) as info:
            from_env(**env)
        assert value not in str(info.value), (key, str(info.value))


def test_http_listen_error_does_not_quote_the_value() -> None:
    with pytest.raises(ConfigError) as info:
        from_env(HTTP__LISTEN="example.com:9847")
    assert "example.com" not in str(info.value)


@pytest.mark.parametrize(
    "env",
    [
        {"ETCD__ENDPOINTS": "https://a:1,https://b:2", "ETCD__CERT_FILE": "/c", "ETCD__KEY_FILE": "/k",
         "ETCD__CA_FILE": "/ca", "ETCD__SERVER_NAME": "etcd.local"},
        {"ETCD__ENDPOINTS": "http://[::1]:2379"},
        {"ETCD__ENDPOINTS": "http://h:2379/"},
        {"ETCD__USERNAME": "u", "ETCD__PASSWORD": PASSWORD},
        {"ETCD__USERNAME": "u", "ETCD__PASSWORD_FILE": "/pw"},
        {"ETCD__DIAL_TIMEOUT": "300", "ETCD__KEEPALIVE_TIMEOUT": "0.001"},
        {"ETCD__REQUEST_TIMEOUT": "300", "ETCD__LEASE_TTL": "301"},
        {"ETCD__KEEPALIVE_TIME": "5"},
        {"ETCD__KEEPALIVE_TIME": "3600"},
        {"ETCD__LEASE_TTL": "3", "ETCD__REQUEST_TIMEOUT": "2.9"},
        {"ETCD__LEASE_TTL": "3600"},
        {"KEYS__VERSION": "/a/b", "KEYS__ENVIRONMENT": "/a/c", "KEYS__PREFIX": "/a/norm"},
        {"KEYS__VERSION": "/norm-version"},   # shares the prefix's text but not its tree
        {"KEYS__PREFIX": "/x/y/z", "KEYS__VERSION": "/~!@#$%^&*()"},
        {"HOST__MACHINE_ID": MID},
        {"HOST__ENVIRONMENT": "e" * 63, "HOST__ROLE": "r_.o-le", "HOST__NAME": "web-1.eu"},
        {"UNITS__PATTERNS": "djed-*.service,foo@bar.service,x.socket,[ab].timer,a?.target,m.path,m.mount"},
        {"UNITS__PATTERNS": "x" * 247 + ".service"},
        {"HTTP__LISTEN": "0.0.0.0:1"},
        {"HTTP__LISTEN": "localhost:65535"},
        {"HTTP__LISTEN": "[::1]:9847"},
        {"HTTP__LISTEN": "[::]:80"},
        {"DOCKER__HOST": "tcp://10.0.0.1:2375"},
        {"DOCKER__HOST": "https://docker.local:2376"},
        {"DOCKER__HOST": "http://docker.local"},
        {"AGENT__SHUTDOWN_TIMEOUT": "600", "AGENT__RESYNC_INTERVAL": "1"},
        {"AGENT__SHUTDOWN_TIMEOUT": "0.01", "AGENT__RESYNC_INTERVAL": "86400"},
    ],
)
def test_boundaries_accepted(env: dict[str, str]) -> None:
    from_env(**env)


# Known ways that text in a field escapes as something other than ConfigError.
ESCAPES = [
    ("etcd.endpoints", "http://[::1"),        # urlsplit: Invalid IPv6 URL
    ("etcd.endpoints", "http://h:99999"),     # .port: Port out of range
    ("etcd.endpoints", "http://h:port"),      # .port: could not be cast to integer
    ("docker.host", "tcp://[fe80::1"),        # urlsplit: Invalid IPv6 URL
    ("etcd.lease_ttl", "9" * 5000),          # int(): exceeds the digit limit
]


@pytest.mark.parametrize("key, value", ESCAPES)
def test_text_that_escapes_as_value_error(key: str, value: str) -> None:
    fails(lambda: cfg.build(cfg.raw_from_env({env_name(key): value})), key, env_source(key))


def test_huge_toml_integer_for_a_number() -> None:
    tree = cfg.raw_from_toml(tomllib.loads("[etcd]\ndial_timeout = 1" + "0" * 400 + "\n"), FILE)
    fails(lambda: cfg.build(tree), "etcd.dial_timeout", FILE)


@pytest.mark.parametrize(
    "key, value",
    [("host.machine_id", MID + "\n"), ("host.environment", "prod\n"), ("host.role", "web\n"),
     ("host.name", "web-1\n"), ("keys.version", "/djed-version\n"), ("keys.prefix", "/norm\n")],
)
def test_trailing_newline_refused(key: str, value: str) -> None:
    fails(lambda: cfg.build(cfg.raw_from_env({env_name(key): value})), key, env_source(key))


def test_unit_pattern_with_trailing_newline_refused() -> None:
    fails(lambda: from_toml('[units]\npatterns = ["djed.service\\n"]\n'), "units.patterns", FILE)


# ---------------------------------------------------------------------------------------------------
# parse_listen


@pytest.mark.parametrize(
    "value, expected",
    [("127.0.0.1:9847", ("127.0.0.1", 9847)), ("[::1]:80", ("::1", 80)), ("localhost:1", ("localhost", 1)),
     ("::1:80", ("::1", 80)), ("h:65535", ("h", 65535))],
)
def test_parse_listen(value: str, expected: tuple[str, int]) -> None:
    assert cfg.parse_listen(value) == expected


@pytest.mark.parametrize("value", ["", "80", ":80", "h:", "h:0", "h:65536", "h:x", "h:-1", "h: 80", "[]:1"])
def test_parse_listen_refuses(value: str) -> None:
    with pytest.raises(ValueError):
        cfg.parse_listen(value)


# ---------------------------------------------------------------------------------------------------
# Reference documentation


def test_reference_lists_every_field_of_every_section() -> None:
    text = cfg.reference_markdown()
    lines = text.splitlines()
    for section in dataclasses.fields(Config):
        heading = f"## [{section.name}]"
        assert heading in lines
        start = lines.index(heading)
        table = []
        for line in lines[start + 1:]:
            if line.startswith("## "):
                break
            if line.startswith("| `"):
                table.append(line)
        names = [f.name for f in fields_of(section.name)]
        assert [row.split("`")[1] for row in table] == names
        for f, row in zip(fields_of(section.name), table, strict=True):
            doc = f.metadata.get("doc")
            assert doc, f"{section.name}.{f.name} has no doc"
            assert doc in row


def test_reference_shows_types_and_defaults() -> None:
    text = cfg.reference_markdown()
    assert '| `endpoints` | list of string | `["http://127.0.0.1:2379"]` |' in text
    assert "| `password` | secret string or unset | `unset` |" in text
    assert '| `level` | "debug" | "info" | "warning" | "error" | `"info"` |' in text
    assert "| `lease_ttl` | integer | `10` |" in text
    assert "| `dial_timeout` | number | `5.0` |" in text
    assert '| `prefix` | string | `"/norm"` |' in text
    assert text.startswith("# Configuration reference\n")
    assert cfg.DEFAULT_PATH in text


def test_reference_is_stable() -> None:
    assert cfg.reference_markdown() == cfg.reference_markdown()


def test_type_names() -> None:
    assert cfg._type_name(bool) == "boolean"
    assert cfg._type_name(str | None) == "string or unset"
    assert cfg._type_name(tuple[int, ...]) == "list of integer"


# ---------------------------------------------------------------------------------------------------
# Properties: any text anywhere is a Config or a ConfigError; a password never shows


SOURCES = st.sampled_from(["toml", "env", "flag"])


def tree_of(values: dict[str, object], source: str) -> cfg.RawTree:
    tree: cfg.RawTree = {}
    for dotted, value in values.items():
        section, _, key = dotted.partition(".")
        where = {"toml": FILE, "env": env_source(dotted), "flag": f"--set {dotted}"}[source]
        tree.setdefault(section, {})[key] = Raw(value, where)
    return tree


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(ALL_KEYS), st.text(), min_size=1, max_size=4), SOURCES)
def test_any_text_in_any_field_is_a_config_or_a_config_error(values: dict[str, str], source: str) -> None:
    try:
        config = cfg.build(tree_of(values, source))
    except ConfigError as e:
        assert e.key.split(".")[0] in {s.name for s in dataclasses.fields(Config)}
        assert e.source != "config"
    else:
        assert isinstance(config, Config)


toml_scalars = (st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text()
                | st.lists(st.text() | st.integers(), max_size=3))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(ALL_KEYS), toml_scalars, min_size=1, max_size=4))
def test_any_toml_value_in_any_field_is_a_config_or_a_config_error(values: dict[str, object]) -> None:
    try:
        cfg.build(tree_of(values, "toml"))
    except ConfigError as e:
        assert e.source in (FILE, "default")


def _sealed(text: str) -> str:
    # Delimiters that appear in no key, source or reason, so the sealed text is found only if quoted.
    return f"\u27ea{text}\u27eb"


password_texts = st.text(min_size=1).map(_sealed)


@settings(max_examples=300, deadline=None)
@given(
    password_texts,
    st.dictionaries(st.sampled_from([k for k in ALL_KEYS if k != "etcd.password"]), st.text(), max_size=3),
    SOURCES,
    st.booleans(),
)
def test_password_never_shows(password: str, others: dict[str, str], source: str, with_user: bool) -> None:
    values: dict[str, object] = {**others, "etcd.password": password}
    if with_user:
        values.setdefault("etcd.username", "root")
    try:
        config = cfg.build(tree_of(values, source))
    except ConfigError as e:
        for shown in (str(e), repr(e), e.reason, e.key, e.source, e.where, repr(e.args)):
            assert password not in shown
    else:
        assert config.etcd.password == Secret(password)
        assert password not in repr(config)
        assert password not in str(config)
        assert password not in repr(config.etcd)


@settings(deadline=None)
@given(password_texts, st.sampled_from(ALL_KEYS))
def test_password_text_in_the_wrong_field_never_shows_in_the_error(password: str, key: str) -> None:
    # An operator who puts the password under the wrong key gets an error that does not repeat it.
    assume(key not in ("etcd.password", "etcd.username"))
    try:
        cfg.build(tree_of({key: password}, "env"))
    except ConfigError as e:
        assert password not in str(e)


@settings(deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_any_float_is_range_checked(value: float) -> None:
    try:
        c = cfg.build(tree_of({"agent.shutdown_timeout": value}, "toml"))
    except ConfigError as e:
        assert e.key == "agent.shutdown_timeout"
        assert not (0 < value <= 600)
    else:
        assert math.isfinite(c.agent.shutdown_timeout)
        assert 0 < c.agent.shutdown_timeout <= 600


TG = "arn:aws:elasticloadbalancing:eu-west-1:123456789012:targetgroup/djed-web/50dc6c495c0c9188"


def test_environment_files_and_presence_settings() -> None:
    c = from_flags("env.bucket=djed-env", "env.key=envs/{environment}.env", "env.owner=djed:djed",
                   f"lb.target_groups={TG}", "lb.instance_id=i-0123456789abcdef0",
                   "aws.region=eu-west-1", "aws.endpoint_url=http://127.0.0.1:5000")
    assert (c.env.bucket, c.env.key, c.env.owner, c.env.on_change) == (
        "djed-env", "envs/{environment}.env", "djed:djed", "restart")
    assert c.lb.target_groups == (TG,) and c.lb.instance_id == "i-0123456789abcdef0"
    assert c.aws.region == "eu-west-1" and c.aws.use_metadata is False


@pytest.mark.parametrize(("item", "key"), [
    ("env.bucket=Not_A_Bucket", "env.bucket"),
    ("env.key=/abs.env", "env.key"),
    ("env.key={role}.env", "env.key"),
    ("env.path=relative.env", "env.path"),
    ("env.owner=root:wheel:x", "env.owner"),
    ("env.interval=0", "env.interval"),
    ("env.on_change=later", "env.on_change"),
    ("lb.target_groups=djed-web", "lb.target_groups"),
    ("lb.instance_id=host1", "lb.instance_id"),
    ("lb.port=70000", "lb.port"),
    ("lb.recheck_interval=0.5", "lb.recheck_interval"),
    ("lb.health_timeout=0", "lb.health_timeout"),
    ("lb.health_give_up=1", "lb.health_give_up"),
    ("lb.recheck_interval=-1", "lb.recheck_interval"),
    ("lb.health_url=ftp://x/", "lb.health_url"),
    ("aws.region=Europe", "aws.region"),
    ("aws.metadata_url=169.254.169.254", "aws.metadata_url"),
])
def test_bad_environment_file_and_presence_settings(item: str, key: str) -> None:
    fails(lambda: from_flags(item), key, f"--set {key}")


def test_the_target_group_recheck_can_be_turned_off() -> None:
    assert from_flags().lb.recheck_interval == 60
    assert from_flags("lb.recheck_interval=0").lb.recheck_interval == 0
    assert from_flags("lb.recheck_interval=5").lb.recheck_interval == 5


def test_draining_must_fit_in_an_updates_stop() -> None:
    ok = from_flags(f"lb.target_groups={TG}", "update.image=registry.example.com/djed/app",
                    "lb.drain_timeout=60", "update.stop_timeout=120")
    assert ok.lb.drain_timeout == 60
    fails(lambda: from_flags(f"lb.target_groups={TG}", "update.image=registry.example.com/djed/app",
                             "lb.drain_timeout=120", "update.stop_timeout=120"),
          "lb.drain_timeout", "--set lb.drain_timeout", "update.stop_timeout")


def test_haproxy_presence_names_its_backends_server_and_socket() -> None:
    c = from_flags("lb.backend=haproxy", "lb.haproxy_backends=web,api", "lb.haproxy_server=host1",
                   "lb.haproxy_socket=/run/lb/admin.sock")
    assert (c.lb.backend, c.lb.haproxy_backends, c.lb.haproxy_server, c.lb.haproxy_socket) == (
        "haproxy", ("web", "api"), "host1", "/run/lb/admin.sock")
    assert c.lb.groups == ("web", "api") and c.lb.instance_id is None
    default = from_flags()
    assert (default.lb.backend, default.lb.groups, default.lb.haproxy_server) == ("elbv2", (), None)
    assert default.lb.haproxy_socket == "/run/haproxy/admin.sock"
    assert from_flags(f"lb.target_groups={TG}").lb.groups == (TG,)


@pytest.mark.parametrize("flags, key, says", [
    (("lb.backend=haproxy", "lb.haproxy_backends=web server"), "lb.haproxy_backends", "HAProxy backend name"),
    (("lb.backend=haproxy", "lb.haproxy_backends=web", "lb.haproxy_server=host/1"), "lb.haproxy_server",
     "HAProxy server name"),
    (("lb.backend=haproxy", "lb.haproxy_socket=admin.sock"), "lb.haproxy_socket", "absolute path"),
    (("lb.backend=haproxy", f"lb.target_groups={TG}"), "lb.target_groups", "lb.haproxy_backends"),
    (("lb.backend=nginx",), "lb.backend", "elbv2"),
])
def test_haproxy_settings_that_cannot_work_are_refused(flags: tuple[str, ...], key: str, says: str) -> None:
    fails(lambda: from_flags(*flags), key, f"--set {key}" if any(f.startswith(key + "=") for f in flags)
          else "--set lb.backend", says)


def test_draining_haproxy_backends_must_fit_in_an_updates_stop_too() -> None:
    fails(lambda: from_flags("lb.backend=haproxy", "lb.haproxy_backends=web",
                             "update.image=registry.example.com/djed/app",
                             "lb.drain_timeout=120", "update.stop_timeout=120"),
          "lb.drain_timeout", "--set lb.drain_timeout", "update.stop_timeout")


@pytest.mark.parametrize("key", ["aws.endpoint_url", "aws.metadata_url", "lb.health_url"])
@pytest.mark.parametrize("value", ["http://[", "http://[::1", "https://h]:80/"])
def test_a_url_that_cannot_be_split_is_a_config_error(key: str, value: str) -> None:
    fails(lambda: from_flags(f"{key}={value}"), key, f"--set {key}", "http:// or https:// URL")


# -- the update's health gate ------------------------------------------------------------------------

def test_health_checks_are_unit_url_pairs_and_lb_health_url_serves_its_unit() -> None:
    c = from_toml('[update]\nhealth_checks = ["djed-api.service=http://127.0.0.1:8001/healthz"]\n'
                  '[lb]\nhealth_url = "http://127.0.0.1:8000/healthz"\n')
    assert cfg.health_urls(c) == {"djed-api.service": "http://127.0.0.1:8001/healthz",
                                  "djed-web.service": "http://127.0.0.1:8000/healthz"}
    own = from_flags("update.health_checks=djed-web.service=http://127.0.0.1:9000/",
                     "lb.health_url=http://127.0.0.1:8000/healthz")
    assert cfg.health_urls(own) == {"djed-web.service": "http://127.0.0.1:9000/"}
    assert cfg.health_urls(from_flags()) == {}


def test_health_containers_override_the_derived_names() -> None:
    c = from_flags("update.health_containers=djed-web.service=web, djed-worker.service=")
    assert cfg.health_containers(c) == {"djed-web.service": "web", "djed-worker.service": None}
    assert cfg.health_containers(from_flags()) == {}


@pytest.mark.parametrize(("item", "key", "says"), [
    ("update.health_checks=djed-web.service", "update.health_checks", "UNIT=URL"),
    ("update.health_checks=djed web.service=http://h/", "update.health_checks", "systemd unit name"),
    ("update.health_checks=djed-web.service=ftp://h/", "update.health_checks", "http:// or https://"),
    ("update.health_checks=djed-web.service=http:///x", "update.health_checks", "with a host"),
    ("update.health_checks=a.service=http://h/,a.service=http://g/", "update.health_checks",
     "two different values"),
    ("update.health_containers=djed-web.service=djed web", "update.health_containers", "container name"),
    ("update.health_containers=djed-web=x", "update.health_containers", "systemd unit name"),
])
def test_bad_health_gate_settings(item: str, key: str, says: str) -> None:
    source = f"--set {item.partition('=')[0]}"
    fails(lambda: from_flags(item), key, source if item.startswith(key) else "default", says)


def test_health_gate_defaults() -> None:
    u = from_flags().update
    assert (u.health_checks, u.health_containers) == ((), ())
