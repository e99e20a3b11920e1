"""The fleet's update policy: its file, its strict decoding from etcd, its validation, the policy of a
fleet without one, and how many hosts a batch takes."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from norm.core import values
from norm.core.config import UpdateConfig
from norm.core.errors import ConfigError, InvalidValue
from norm.core.policy import (
    DEFAULT_STEPS,
    FleetPolicy,
    StepPolicy,
    changes,
    parse_policy_toml,
    policy_from_update_config,
    policy_key,
    policy_toml,
    toml_value,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "policy.toml"
SECRET = "Hunter2-secret"
D1 = "sha256:" + "1" * 64


def test_the_key_lives_under_the_prefix() -> None:
    assert policy_key("/norm") == "/norm/policy"


def test_the_defaults() -> None:
    p = FleetPolicy()
    assert (p.strategy, p.max_unavailable, p.on_trouble, p.auto_rollback) == ("auto", "1", "exclude", True)
    assert p.steps == (StepPolicy("migrate", "migrate", "pre"),
                       StepPolicy("collectstatic", "collectstatic", "pre"))
    assert (p.pull_timeout, p.stop_timeout, p.start_timeout, p.migration_timeout) == (600, 120, 300, 1800)


# ---------------------------------------------------------------------------------------------------
# batch_size


@pytest.mark.parametrize(("max_unavailable", "hosts", "batch"), [
    ("1", 0, 1), ("1", 1, 1), ("1", 10, 1),
    ("3", 1, 1), ("3", 2, 2), ("3", 3, 3), ("3", 10, 3),
    ("25%", 0, 1), ("25%", 1, 1), ("25%", 3, 1), ("25%", 4, 1), ("25%", 7, 1), ("25%", 8, 2),
    ("25%", 10, 2), ("25%", 100, 25),
    ("50%", 3, 1), ("50%", 5, 2),
    ("100%", 1, 1), ("100%", 7, 7),
    ("1%", 99, 1), ("1%", 250, 2),
    ("999999", 5, 5),
])
def test_batch_size(max_unavailable: str, hosts: int, batch: int) -> None:
    assert FleetPolicy(max_unavailable=max_unavailable).batch_size(hosts) == batch


@given(st.one_of(st.integers(1, 999999).map(str), st.integers(1, 100).map(lambda n: f"{n}%")),
       st.integers(0, 5000))
def test_a_batch_is_at_least_one_host_and_never_more_than_asked(max_unavailable: str, hosts: int) -> None:
    n = FleetPolicy(max_unavailable=max_unavailable).batch_size(hosts)
    assert 1 <= n <= max(1, hosts)
    if max_unavailable.endswith("%") and n > 1:  # rounded down: never more than the percentage says
        assert n * 100 <= hosts * int(max_unavailable[:-1])


def test_batch_size_of_a_negative_fleet_is_refused() -> None:
    with pytest.raises(ValueError, match="hosts"):
        FleetPolicy().batch_size(-1)


# ---------------------------------------------------------------------------------------------------
# Validation, when made in code


@pytest.mark.parametrize(("change", "field"), [
    ({"max_unavailable": "0"}, "max_unavailable"),
    ({"max_unavailable": "0%"}, "max_unavailable"),
    ({"max_unavailable": "101%"}, "max_unavailable"),
    ({"max_unavailable": "2.5%"}, "max_unavailable"),
    ({"max_unavailable": "-1"}, "max_unavailable"),
    ({"max_unavailable": " 1"}, "max_unavailable"),
    ({"max_unavailable": "1234567"}, "max_unavailable"),
    ({"pull_timeout": 0.0}, "pull_timeout"),
    ({"stop_timeout": -1.0}, "stop_timeout"),
    ({"start_timeout": 86401.0}, "start_timeout"),
    ({"migration_timeout": float("inf")}, "migration_timeout"),
    ({"healthy_deadline": float("nan")}, "healthy_deadline"),
    ({"min_healthy": -1.0}, "min_healthy"),
    ({"min_healthy": 300.0}, "min_healthy"),  # not less than healthy_deadline
    ({"healthy_deadline": 600.0}, "healthy_deadline"),  # not less than progress_deadline
    ({"roles": ("django", "django")}, "roles"),
    ({"roles": ("-x",)}, "roles[0]"),
    ({"roles": ("a" * 64,)}, "roles[0]"),
    ({"compatible": ("v1", "not a tag")}, "compatible[1]"),
    ({"compatible": ("sha256:12",)}, "compatible[0]"),
    ({"steps": (StepPolicy("a", "x"), StepPolicy("a", "y"))}, "steps"),
    ({"strategy": "blue-green"}, "strategy"),
    ({"on_trouble": "ignore"}, "on_trouble"),
    ({"max_unavailable": 2}, "max_unavailable"),
    ({"roles": (5,)}, "roles[0]"),
    ({"compatible": ("v1", None)}, "compatible[1]"),
    ({"pull_timeout": "600"}, "pull_timeout"),
    ({"auto_rollback": 1}, "auto_rollback"),
    ({"roles": ["django"]}, "roles"),
    ({"steps": ("migrate",)}, "steps[0]"),
])
def test_a_policy_out_of_its_grammar_cannot_be_made(change: dict[str, object], field: str) -> None:
    with pytest.raises((ValueError, TypeError), match="^" + re.escape(f"{field}: ")):
        FleetPolicy(**change)  # type: ignore[arg-type]


@pytest.mark.parametrize(("step", "field"), [
    (("Migrate", "migrate"), "name"),
    (("", "migrate"), "name"),
    (("a" * 64, "migrate"), "name"),
    (("m", ""), "command"),
    (("m", "   "), "command"),
    (("m", "migrate 'unclosed"), "command"),
    (("m", "migrate \\"), "command"),
    (("m", "migrate\x1b[2J"), "command"),
    (("m", "x" * 4097), "command"),
])
def test_a_step_out_of_its_grammar_cannot_be_made(step: tuple[str, str], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: "):
        StepPolicy(*step)
    with pytest.raises(ValueError, match=r"^when: "):
        StepPolicy("m", "migrate", "during")  # type: ignore[arg-type]


def test_the_edges_of_the_grammar_are_accepted() -> None:
    FleetPolicy(max_unavailable="100%", min_healthy=0.0, healthy_deadline=0.5, progress_deadline=86400.0,
                roles=("a" * 63, "x.y_z-1"), compatible=("v1", D1), steps=(),
                pull_timeout=86400.0)
    StepPolicy("a" * 63, "x" * 4096, "post")
    StepPolicy("m", "sh -c 'migrate && touch /tmp/done'\tand\nmore")


# ---------------------------------------------------------------------------------------------------
# On the wire


texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), min_size=1, max_size=30)
words = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,20}", fullmatch=True)
tags = st.from_regex(r"v[0-9]{1,3}(\.[0-9]{1,3}){0,2}", fullmatch=True)
durations = st.floats(min_value=0.001, max_value=86400.0, allow_nan=False)


@st.composite
def step_policies(draw: st.DrawFn) -> tuple[StepPolicy, ...]:
    names = draw(st.lists(words, max_size=5, unique=True))
    return tuple(StepPolicy(n, draw(texts.map(lambda t, n=n: f"{n} {t}").filter(_splits)),
                            draw(st.sampled_from(("pre", "post")))) for n in names)


def _splits(command: str) -> bool:
    try:
        shlex.split(command)
    except ValueError:
        return False
    return True


@st.composite
def policies(draw: st.DrawFn) -> FleetPolicy:
    healthy = draw(st.floats(min_value=1.0, max_value=80000.0))
    return FleetPolicy(
        strategy=draw(st.sampled_from(("auto", "rolling", "recreate"))),
        max_unavailable=draw(st.one_of(st.integers(1, 999999).map(str),
                                       st.integers(1, 100).map(lambda n: f"{n}%"))),
        min_healthy=draw(st.floats(min_value=0.0, max_value=healthy, exclude_max=True)),
        healthy_deadline=healthy,
        progress_deadline=draw(st.floats(min_value=healthy, max_value=86400.0, exclude_min=True)),
        auto_rollback=draw(st.booleans()),
        roles=tuple(draw(st.lists(st.from_regex(values.LABEL, fullmatch=True), max_size=4, unique=True))),
        steps=draw(step_policies()),
        compatible=tuple(draw(st.lists(st.one_of(tags, st.just(D1)), max_size=4))),
        pull_timeout=draw(durations), stop_timeout=draw(durations), start_timeout=draw(durations),
        migration_timeout=draw(durations),
        on_trouble=draw(st.sampled_from(("exclude", "abort"))))


@settings(deadline=None, max_examples=200)
@given(policies())
def test_encode_then_decode_is_the_same_policy(p: FleetPolicy) -> None:
    raw = p.encode()
    assert FleetPolicy.decode(raw, "/norm/policy") == p
    assert FleetPolicy.decode(raw, "/norm/policy").encode() == raw


@settings(deadline=None, max_examples=200)
@given(policies())
def test_the_file_shown_reads_back_as_the_same_policy(p: FleetPolicy) -> None:
    assert parse_policy_toml(policy_toml(p), "shown") == p
    assert changes(p, p) == ()


def _decoding(data: object) -> str:
    with pytest.raises(InvalidValue) as info:
        FleetPolicy.decode(json.dumps(data).encode(), "/norm/policy")
    assert info.value.where == "/norm/policy"
    assert SECRET not in str(info.value)
    return info.value.reason


def _good() -> dict[str, object]:
    return json.loads(FleetPolicy().encode())  # type: ignore[no-any-return]


@pytest.mark.parametrize(("change", "field"), [
    ({"max_unavailable": 1}, "max_unavailable"),
    ({"max_unavailable": SECRET}, "max_unavailable"),
    ({"min_healthy": "10"}, "min_healthy"),
    ({"auto_rollback": 1}, "auto_rollback"),
    ({"pull_timeout": 1e400}, "pull_timeout"),
    ({"strategy": SECRET}, "strategy"),
    ({"roles": SECRET}, "roles"),
    ({"roles": ["ok", SECRET + " x"]}, "roles[1]"),
    ({"compatible": [SECRET + "!"]}, "compatible[0]"),
    ({"steps": [{"name": "m", "command": "x", "when": SECRET}]}, "steps[0].when"),
    ({"steps": [{"name": "m", "command": "x"}, {"name": SECRET, "command": "y"}]}, "steps[1].name"),
    ({"steps": [{"command": "x"}]}, "steps[0].name"),
    ({"steps": [{"name": "m", "command": SECRET + " '"}]}, "steps[0].command"),
    ({"steps": [{"name": "m", "command": "x"}, {"name": "m", "command": SECRET}]}, "steps"),
    ({"min_healthy": 500.0}, "min_healthy"),
    ({"steps": [{"name": "m", "command": "x \ud800"}]}, "steps[0].command"),
])
def test_a_bad_value_in_etcd_is_refused_naming_the_field_never_the_value(
        change: dict[str, object], field: str) -> None:
    reason = _decoding({**_good(), **change})
    assert f"({field}: " in reason, reason


def test_what_is_not_a_policy_at_all_is_refused() -> None:
    for raw in (b"", b"not json", b"[]", b"null", b'{"unknown": 1}', b"\xff"):
        with pytest.raises(InvalidValue, match=r"^/norm/policy: not"):
            FleetPolicy.decode(raw, "/norm/policy")


def test_a_field_left_out_takes_its_default() -> None:
    assert FleetPolicy.decode(b"{}", "k") == FleetPolicy()
    assert FleetPolicy.decode(b'{"max_unavailable": "2"}', "k") == FleetPolicy(max_unavailable="2")


# ---------------------------------------------------------------------------------------------------
# The file


def test_the_example_file_parses() -> None:
    p = parse_policy_toml(EXAMPLE.read_text(), str(EXAMPLE))
    assert p.max_unavailable == "25%" and p.roles == ("django", "celery") and p.compatible == ("v41",)
    assert [(s.name, s.when) for s in p.steps] == [("migrate", "pre"), ("collectstatic", "pre"),
                                                   ("python-manage-py-migrate_contract", "post")]
    assert p.steps[0].command == "python manage.py migrate --no-input"
    assert p.min_healthy == 10.0 and isinstance(p.min_healthy, float)


def test_an_empty_file_is_the_default_policy() -> None:
    assert parse_policy_toml("", "f") == FleetPolicy()
    assert parse_policy_toml("steps = []", "f").steps == ()


def test_a_count_may_be_written_as_a_number() -> None:
    assert parse_policy_toml("max_unavailable = 3", "f").max_unavailable == "3"


def _refused(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_policy_toml(text, "policy.toml")
    assert info.value.source == "policy.toml"
    assert SECRET not in str(info.value)
    return info.value


@pytest.mark.parametrize(("text", "key", "reason"), [
    ("bogus = 1", "bogus", "unknown key"),
    ("[update]\nsteps = []", "update", "unknown key"),
    ("strategy = 'Hunter2-secret'", "strategy", "must be one of auto, rolling, recreate"),
    ("on_trouble = 'x'", "on_trouble", "must be one of exclude, abort"),
    ("max_unavailable = 0", "max_unavailable", "a count of hosts"),
    ("max_unavailable = 'Hunter2-secret'", "max_unavailable", "a count of hosts"),
    ("max_unavailable = true", "max_unavailable", "expected a string"),
    ("pull_timeout = 'ten'", "pull_timeout", "expected a number"),
    ("pull_timeout = 0", "pull_timeout", "more than 0"),
    ("stop_timeout = nan", "stop_timeout", "finite"),
    ("min_healthy = 300\nhealthy_deadline = 300", "min_healthy", "less than healthy_deadline"),
    ("healthy_deadline = 900", "healthy_deadline", "less than progress_deadline"),
    ("auto_rollback = 'yes'", "auto_rollback", "true or false"),
    ("roles = 'django'", "roles", "expected a list"),
    ("roles = ['django', 'Hunter2-secret!']", "roles[1]", "letters, digits"),
    ("compatible = ['Hunter2 secret']", "compatible[0]", "tag or a sha256 digest"),
    ("steps = 'migrate'", "steps", "[[steps]] tables"),
    ("steps = ['migrate']", "steps[0]", "a table"),
    ("[[steps]]\ncommand = 'x'\nwhen = 'later'", "steps[0].when", "must be one of pre, post"),
    ("[[steps]]\ncommand = 'x'\nrun = 'y'", "steps[0].run", "unknown key"),
    ("[[steps]]\nname = 'm'", "steps[0].command", "missing"),
    ("[[steps]]\nwhen = 'pre'", "steps[0].command", "missing"),
    ("[[steps]]\ncommand = 5", "steps[0].command", "expected a string"),
    ("[[steps]]\ncommand = '!!!'", "steps[0].name", "cannot be derived"),
    ("[[steps]]\ncommand = 'x'\nname = 'Hunter2-secret'", "steps[0].name", "not a step name"),
    ("[[steps]]\ncommand = \"Hunter2-secret 'x\"", "steps[0].command", "not a command line"),
    ("[[steps]]\ncommand = 'migrate'\n[[steps]]\ncommand = 'Migrate'", "steps", "distinct"),
    ("strategy = ", "-", "not valid TOML"),
    ("pull_timeout = 1e400", "pull_timeout", "finite"),
    ("pull_timeout = 99999999999999999999999", "pull_timeout", "more than 0 and at most"),
])
def test_a_bad_file_is_refused_naming_the_key(text: str, key: str, reason: str) -> None:
    e = _refused(text)
    assert e.key == key, e
    assert reason in e.reason, e


# ---------------------------------------------------------------------------------------------------
# A fleet without a policy key


def test_without_a_policy_key_the_fleet_does_as_the_update_section_says() -> None:
    p = policy_from_update_config(UpdateConfig())
    assert p.strategy == "recreate"
    assert p.steps == DEFAULT_STEPS
    update = UpdateConfig(roles=("django", "celery", "django"),
                          steps=("python manage.py migrate", "flush cache"),
                          compatible=("v1", D1, "not a tag!"), pull_timeout=60.0, stop_timeout=30.0,
                          start_timeout=45.0, migration_timeout=900.0, on_trouble="abort")
    p = policy_from_update_config(update)
    assert p == dataclasses.replace(
        FleetPolicy(), strategy="recreate", min_healthy=0.0, roles=("django", "celery"),
        compatible=("v1", D1),
        steps=(StepPolicy("python-manage-py-migrate", "python manage.py migrate", "pre"),
               StepPolicy("flush-cache", "flush cache", "pre")),
        pull_timeout=60.0, stop_timeout=30.0, start_timeout=45.0, migration_timeout=900.0, on_trouble="abort")


def test_a_step_no_policy_accepts_in_the_update_section_is_named() -> None:
    with pytest.raises(InvalidValue) as info:
        policy_from_update_config(UpdateConfig(steps=("migrate", "collect 'static")))
    assert info.value.where == "update.steps[1]"
    assert "static" not in str(info.value)


# ---------------------------------------------------------------------------------------------------
# What changes


def test_changes_name_each_field_that_differs_in_order() -> None:
    before = FleetPolicy()
    after = dataclasses.replace(before, max_unavailable="25%", roles=("web",), auto_rollback=False,
                                steps=(StepPolicy("migrate", "migrate", "post"),))
    assert [(c.field, c.before, c.after) for c in changes(before, after)] == [
        ("max_unavailable", '"1"', '"25%"'),
        ("auto_rollback", "true", "false"),
        ("roles", "[]", '["web"]'),
        ("steps", '[migrate (pre): "migrate", collectstatic (pre): "collectstatic"]',
         '[migrate (post): "migrate"]'),
    ]


# ---------------------------------------------------------------------------------------------------
# The documentation says what the code does

DOC = Path(__file__).resolve().parents[2] / "docs" / "policy.md"


def _rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| `") and len(cells) > 2:
            rows.setdefault(cells[0].strip("`"), cells)
    return rows


def test_the_docs_list_every_field_with_its_default() -> None:
    rows = _rows(DOC.read_text())
    default = FleetPolicy()
    for name in (f.name for f in dataclasses.fields(FleetPolicy)):
        assert name in rows, name
        if name != "steps":
            assert rows[name][2] == f"`{toml_value(getattr(default, name))}`", name
    for name in (f.name for f in dataclasses.fields(StepPolicy)):
        assert name in rows, name
    assert rows["when"][2] == '`"pre"`'


def test_the_docs_batch_table_is_what_batch_size_gives() -> None:
    text = DOC.read_text()
    table = text[text.index("| `max_unavailable` | 1 host"):].split("\n\n")[0].splitlines()
    hosts = [int(c.split()[0]) for c in table[0].strip("|").split(" | ")[1:]]
    checked = 0
    for line in table[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        p = FleetPolicy(max_unavailable=cells[0].strip('`"'))
        assert [p.batch_size(h) for h in hosts] == [int(c) for c in cells[1:]], line
        checked += 1
    assert checked == 5
