"""The constraints each configuration field declares, and the rules across fields: every bound refuses
the value just outside it and takes the value on it, with the reason the reference shows."""

from __future__ import annotations

import dataclasses
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from norm.core import config as cfg
from norm.core.config import Between, Config, Each, Matches, NonEmpty
from norm.core.errors import ConfigError

TG = "arn:aws:elasticloadbalancing:eu-west-1:123456789012:targetgroup/djed-web/50dc6c495c0c9188"
IMAGE = "registry.example.com/djed/app"


def all_fields() -> list[tuple[str, dataclasses.Field[typing.Any], typing.Any]]:
    sections = typing.get_type_hints(Config)
    out = []
    for s in dataclasses.fields(Config):
        hints = typing.get_type_hints(sections[s.name])
        out += [(f"{s.name}.{f.name}", f, hints[f.name]) for f in dataclasses.fields(sections[s.name])]
    return out


FIELDS = {dotted: (f, tp) for dotted, f, tp in all_fields()}
BOUNDED = [(dotted, c) for dotted, (f, _) in FIELDS.items() for c in cfg.constraints_of(f)
           if isinstance(c, Between)]
NUMBERS = [dotted for dotted, (_, tp) in FIELDS.items()
           if set(typing.get_args(tp) or (tp,)) - {type(None)} <= {int, float}]
RULE_KEYS = {r.key for r in cfg.RULES}


def build(values: dict[str, str]) -> Config:
    return cfg.build(cfg.raw_from_flags([f"{k}={v}" for k, v in values.items()]))


def refused(values: dict[str, str]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        build(values)
    return info.value


def text(dotted: str, value: float) -> str:
    return str(int(value)) if FIELDS[dotted][1] in (int, int | None) else repr(float(value))


def companions(dotted: str, value: float) -> dict[str, str]:
    """Other keys set so that the rules across fields hold whatever `value` the key under test takes."""
    if dotted == "etcd.request_timeout":
        return {"etcd.lease_ttl": "3600"}
    if dotted == "etcd.lease_ttl":
        return {"etcd.request_timeout": "1"}
    if dotted == "healing.window":
        return {"healing.cooldown": repr(float(cfg.WEEK))}
    if dotted == "healing.cooldown" and 0 < value <= cfg.WEEK:
        return {"healing.window": repr(float(value))}
    return {}


def step(dotted: str) -> float:
    return 1 if FIELDS[dotted][1] in (int, int | None) else 0.001


# ---------------------------------------------------------------------------------------------------
# The declarations


def test_every_number_has_bounds_declared_or_a_rule() -> None:
    declared = {dotted for dotted, _ in BOUNDED}
    assert NUMBERS and declared
    # Bounded by a rule that relates them: backoff_initial <= backoff_max <= 86400,
    # lb.health_timeout <= health_give_up <= 86400.
    by_rule = {"healing.backoff_initial", "healing.backoff_max", "lb.health_give_up"}
    assert set(NUMBERS) - declared == by_rule
    assert by_rule - {"healing.backoff_max"} <= RULE_KEYS


def test_constraints_are_declared_on_fields_of_their_kind() -> None:
    for dotted, (f, tp) in FIELDS.items():
        kinds = set(typing.get_args(tp) or (tp,)) - {type(None)}
        for c in cfg.constraints_of(f):
            if isinstance(c, Between):
                assert kinds <= {int, float}, dotted
            if isinstance(c, Matches):
                assert kinds == {str}, dotted
            if isinstance(c, NonEmpty | Each):
                assert typing.get_origin(tp) is tuple, dotted


def test_every_rule_names_real_keys() -> None:
    names = [r.name for r in cfg.RULES]
    assert len(set(names)) == len(names)
    order = list(FIELDS)
    for rule in cfg.RULES:
        assert rule.key in FIELDS and rule.after in FIELDS, rule.name
        # a rule runs once the key it names has passed its own constraints
        assert order.index(rule.after) >= order.index(rule.key), rule.name


def test_the_defaults_meet_every_constraint_and_rule() -> None:
    assert cfg._first_problem(Config()) is None


@pytest.mark.parametrize(
    "bound, says",
    [(Between(1, 100, unit=""), "must be from 1 to 100"),
     (Between(3, 3600), "must be from 3 to 3600 seconds"),
     (Between(0, 300, above=True), "must be more than 0 and at most 300 seconds"),
     (Between(5, 3600, note="etcd refuses faster pings"),
      "must be from 5 to 3600 seconds (etcd refuses faster pings)"),
     (Between(1, 86400, off=0), "must be 0 (off) or from 1 to 86400 seconds"),
     (Between(1, 1000, unit="attempts"), "must be from 1 to 1000 attempts"),
     (Between(1, 65535, wording="must be a port from 1 to 65535"), "must be a port from 1 to 65535")],
)
def test_bounds_say_what_they_hold(bound: Between, says: str) -> None:
    assert bound.says == says
    assert bound.problem(bound.hi) is None
    assert bound.problem(bound.hi + 1) == says
    assert (bound.problem(bound.lo) is None) is not bound.above
    assert bound.problem(bound.lo - 1) == (None if bound.off == bound.lo - 1 else says)


def test_an_off_value_is_the_only_one_outside_the_bounds() -> None:
    b = Between(1, 86400, off=0)
    assert b.admits(0) and b.admits(1) and b.admits(86400)
    assert not b.admits(0.5) and not b.admits(-1) and not b.admits(86401)


# ---------------------------------------------------------------------------------------------------
# Every declared bound, through build()


@pytest.mark.parametrize("dotted, bound", BOUNDED, ids=[d for d, _ in BOUNDED])
def test_a_bound_takes_the_values_on_it(dotted: str, bound: Between) -> None:
    lo = bound.lo + step(dotted) if bound.above else bound.lo
    for value in (lo, bound.hi, *([] if bound.off is None else [bound.off])):
        config = build({dotted: text(dotted, value), **companions(dotted, value)})
        section, _, key = dotted.partition(".")
        assert getattr(getattr(config, section), key) == value


@pytest.mark.parametrize("dotted, bound", BOUNDED, ids=[d for d, _ in BOUNDED])
def test_a_bound_refuses_the_values_just_outside_it(dotted: str, bound: Between) -> None:
    below = bound.lo if bound.above else bound.lo - step(dotted)
    if bound.off is not None and below == bound.off:
        below = (bound.off + bound.lo) / 2
    for value in (below, bound.hi + step(dotted)):
        e = refused({dotted: text(dotted, value), **companions(dotted, value)})
        assert (e.key, e.source, e.reason) == (dotted, f"--set {dotted}", bound.says)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_number_is_taken_exactly_when_its_bounds_admit_it(data: st.DataObject) -> None:
    dotted, bound = data.draw(st.sampled_from(BOUNDED))
    span = bound.hi - bound.lo
    if FIELDS[dotted][1] in (int, int | None):
        value: float = data.draw(st.integers(int(bound.lo - span), int(bound.hi + span)))
    else:
        value = data.draw(st.floats(bound.lo - span, bound.hi + span) | st.sampled_from([bound.lo, bound.hi]))
    values = {dotted: text(dotted, value), **companions(dotted, value)}
    if bound.admits(value):
        build(values)
    else:
        e = refused(values)
        assert (e.key, e.reason) == (dotted, bound.says)


# ---------------------------------------------------------------------------------------------------
# Grammars and per-item checks


# A value each grammar takes, for the fields without one as default.
GOOD = {
    "host.machine_id": "0123456789abcdef0123456789abcdef", "host.name": "web-1",
    "update.image": IMAGE, "aws.region": "eu-west-1", "env.bucket": "djed-env", "env.owner": "djed:djed",
    "lb.instance_id": "i-0123456789abcdef0", "lb.haproxy_server": "host1",
}
MATCHED = [(dotted, c) for dotted, (f, _) in FIELDS.items() for c in cfg.constraints_of(f)
           if isinstance(c, Matches)]


@pytest.mark.parametrize("dotted, grammar", MATCHED, ids=[d for d, _ in MATCHED])
def test_a_grammar_matches_the_whole_text(dotted: str, grammar: Matches) -> None:
    section, _, key = dotted.partition(".")
    good = GOOD.get(dotted) or getattr(getattr(Config(), section), key)
    assert build({dotted: good})
    for bad in (good + "\n", " " + good, good + " x"):
        e = refused({dotted: bad})
        assert (e.key, e.reason) == (dotted, grammar.says)


# A good item of each list whose items are checked one by one, and a bad one.
ITEMS = {
    "etcd.endpoints": ("http://127.0.0.1:2379", "http://h:2379/v3"),
    "units.patterns": ("djed-web.service", "djed-web"),
    "update.roles": ("web", "-web"),
    "update.steps_mounts": ("/srv:/data", "srv:/data"),
    "env.units": ("djed-web.service", "djed web.service"),
    "lb.target_groups": (TG, "djed-web"),
    "lb.haproxy_backends": ("web", "web/1"),
    "update.health_checks": ("djed-web.service=http://127.0.0.1:8000/healthz", "djed-web=http://h/"),
    "update.health_containers": ("djed-web.service=djed-web", "djed-web.service=djed web"),
}


def test_every_list_with_item_checks_is_tried() -> None:
    each = {dotted for dotted, (f, _) in FIELDS.items()
            if any(isinstance(c, Each) for c in cfg.constraints_of(f))}
    assert each == set(ITEMS)


@pytest.mark.parametrize("dotted", sorted(ITEMS))
def test_each_item_of_a_list_is_checked_not_only_the_first(dotted: str) -> None:
    good, bad = ITEMS[dotted]
    assert build({dotted: f"{good},{good}"})
    for items in (f"{bad},{good}", f"{good},{bad}"):
        e = refused({dotted: items})
        assert e.key == dotted and e.source == f"--set {dotted}"
        assert bad not in e.reason


# ---------------------------------------------------------------------------------------------------
# The rules across fields: each names its key, and only fires on its own condition


BREAKS = {
    "tls-key-with-cert": {"etcd.endpoints": "https://a:1", "etcd.cert_file": "/c.pem"},
    "tls-cert-with-key": {"etcd.endpoints": "https://a:1", "etcd.key_file": "/k.pem"},
    "client-cert-needs-https": {"etcd.cert_file": "/c.pem", "etcd.key_file": "/k.pem"},
    "one-password": {"etcd.username": "u", "etcd.password": "pw", "etcd.password_file": "/pw"},
    "password-needs-username": {"etcd.password_file": "/pw"},
    "username-needs-password": {"etcd.username": "u"},
    "request-within-lease": {"etcd.request_timeout": "10", "etcd.lease_ttl": "10"},
    "version-outside-prefix": {"keys.version": "/norm/version"},
    "environment-outside-prefix": {"keys.environment": "/norm/environment"},
    "backoff-within-max": {"healing.backoff_initial": "61"},
    "cooldown-covers-window": {"healing.cooldown": "599"},
    "give-up-after-a-try": {"lb.health_timeout": "10", "lb.health_give_up": "9"},
    "target-groups-are-elbv2": {"lb.backend": "haproxy", "lb.target_groups": TG},
    "drain-within-stop": {"lb.target_groups": TG, "update.image": IMAGE, "lb.drain_timeout": "120",
                          "update.stop_timeout": "120"},
}


def test_every_rule_is_tried() -> None:
    assert set(BREAKS) == {r.name for r in cfg.RULES}


@pytest.mark.parametrize("rule", cfg.RULES, ids=[r.name for r in cfg.RULES])
def test_a_rule_names_its_key_and_the_source(rule: cfg.Rule) -> None:
    values = BREAKS[rule.name]
    e = refused(values)
    assert (e.key, e.reason) == (rule.key, rule.says)
    assert e.source == (f"--set {rule.key}" if rule.key in values else "default")


def test_the_draining_is_free_outside_update_mode() -> None:
    assert build({"lb.target_groups": TG, "lb.drain_timeout": "600", "update.stop_timeout": "120"})
    assert build({"update.image": IMAGE, "lb.drain_timeout": "600", "update.stop_timeout": "120"})


def test_the_backoff_rule_holds_the_maximum_too() -> None:
    e = refused({"healing.backoff_max": "86401"})
    assert e.key == "healing.backoff_initial" and "healing.backoff_max" in e.reason
    assert build({"healing.backoff_initial": "86400", "healing.backoff_max": "86400"})


# ---------------------------------------------------------------------------------------------------
# The reference shows the constraints


def test_the_reference_shows_each_fields_bounds() -> None:
    text = cfg.reference_markdown()
    assert "| `lease_ttl` | integer | `10` | must be from 3 to 3600 seconds |" in text
    assert ("| `dial_timeout` | number | `5.0` | must be more than 0 and at most 300 seconds |") in text
    assert "| `recheck_interval` | number | `60.0` | must be 0 (off) or from 1 to 86400 seconds |" in text
    assert "| `port` | integer or unset | `unset` | must be a port from 1 to 65535 |" in text
    # a rule shows on the row of the key it names
    assert "must be more than 0 and at most 300 seconds; must be shorter than etcd.lease_ttl |" in text
    for dotted, bound in BOUNDED:
        assert bound.says in text, dotted
