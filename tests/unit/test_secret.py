"""Secret: the value is only ever given by reveal(); every way of showing it is masked."""

# Every spelling of formatting is tried on purpose, the old ones included.
# ruff: noqa: UP031, UP032, PLW0108, SIM202, SIM300

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from norm.core.secret import MASK, MIN_REDACTED, REDACTED, Secret, redact

VALUE = "hunter2-correct-horse"


def test_reveal_gives_the_value() -> None:
    assert Secret(VALUE).reveal() == VALUE


def test_mask_is_not_empty_and_says_nothing() -> None:
    assert MASK
    assert set(MASK) == {"*"}


@pytest.mark.parametrize(
    "show",
    [
        str,
        repr,
        ascii,
        lambda s: f"{s}",
        lambda s: f"{s!r}",
        lambda s: f"{s!s}",
        lambda s: f"{s!a}",
        lambda s: f"{s=}",
        lambda s: format(s),
        lambda s: format(s, ""),
        lambda s: "{}".format(s),
        lambda s: "{!r}".format(s),
        lambda s: "%s" % s,
        lambda s: "%r" % (s,),
        lambda s: "%a" % (s,),
        lambda s: repr([s]),
        lambda s: repr((s,)),
        lambda s: repr({"password": s}),
        lambda s: repr({s}),
        lambda s: str(ValueError(s)),
        lambda s: repr(ValueError(s)),
    ],
)
def test_every_way_of_showing_is_masked(show: object) -> None:
    text = show(Secret(VALUE))  # type: ignore[operator]
    assert VALUE not in text
    assert "hunter" not in text
    assert MASK in text


def test_repr_and_str_exact() -> None:
    assert str(Secret(VALUE)) == MASK
    assert repr(Secret(VALUE)) == f"Secret({MASK})"


def test_format_spec_never_shows_the_value() -> None:
    # A format spec on an object without __format__ is refused; either way the value does not show.
    for spec in (">30", "s", "^40", "!<20"):
        try:
            text = format(Secret(VALUE), spec)
        except (TypeError, ValueError) as e:
            assert VALUE not in str(e)
        else:
            assert VALUE not in text


def test_inside_a_dataclass_repr_is_masked() -> None:
    @dataclass(frozen=True)
    class Holder:
        user: str
        password: Secret

    text = repr(Holder("root", Secret(VALUE)))
    assert VALUE not in text
    assert "root" in text


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_not_picklable(protocol: int) -> None:
    with pytest.raises(TypeError) as info:
        pickle.dumps(Secret(VALUE), protocol=protocol)
    assert VALUE not in str(info.value)


def test_not_picklable_inside_a_container() -> None:
    with pytest.raises(TypeError):
        pickle.dumps({"etcd": [Secret(VALUE)]})


def test_not_copyable_by_serialisation() -> None:
    # copy goes through __reduce_ex__, the same door as pickle
    with pytest.raises(TypeError):
        copy.deepcopy(Secret(VALUE))


def test_no_instance_dict() -> None:
    s = Secret(VALUE)
    with pytest.raises(TypeError):
        vars(s)
    with pytest.raises(AttributeError):
        s.other = 1  # type: ignore[attr-defined]


def test_equality_and_hash() -> None:
    a, b, c = Secret(VALUE), Secret(VALUE), Secret(VALUE + "x")
    assert a == b
    assert not (a != b)
    assert hash(a) == hash(b)
    assert a != c
    assert len({a, b, c}) == 2


def test_not_equal_to_the_plain_string() -> None:
    assert Secret(VALUE) != VALUE
    assert VALUE != Secret(VALUE)
    assert Secret(VALUE) != None  # noqa: E711
    assert Secret("") != ""


def test_empty_secret_is_still_masked() -> None:
    assert str(Secret("")) == MASK
    assert Secret("").reveal() == ""


@settings(deadline=None)
@given(st.text())
def test_any_value_is_masked(value: str) -> None:
    s = Secret(value)
    assert s.reveal() == value
    for text in (str(s), repr(s), f"{s}", f"{s!r}", "%s" % s, repr([s])):
        assume(value not in f"[Secret({MASK})]")  # a value that is part of the mask proves nothing
        assert value not in text


@settings(deadline=None)
@given(st.text(), st.text())
def test_equality_follows_the_value(a: str, b: str) -> None:
    assert (Secret(a) == Secret(b)) == (a == b)
    if a == b:
        assert hash(Secret(a)) == hash(Secret(b))


# ---------------------------------------------------------------------------------------------------
# Redaction of output that may quote secrets


def test_redact_masks_every_occurrence_and_overlaps_as_one() -> None:
    out = redact("key=hunter22 again hunter22; abcdefgh", ["hunter22", "abcd", "cdefgh", "1"])
    assert out == f"key={REDACTED} again {REDACTED}; {REDACTED}"
    assert redact("line-one-secret\nmore", ["line-one-secret\nline-two-secret"]) == f"{REDACTED}\nmore"
    assert redact("exit code 1", ["1", "yes"]) == "exit code 1"  # too short to be secrets
    assert redact("nothing here", []) == "nothing here"


@settings(deadline=None)
@given(st.text(), st.lists(st.text(min_size=MIN_REDACTED), max_size=4), st.text(), st.text())
def test_no_secret_survives_redaction(text: str, secrets: list[str], before: str, after: str) -> None:
    out = redact(before + "".join(s + text for s in secrets) + after, secrets)
    for secret in secrets:
        # A secret inside the marker, or one with its brackets (made up by the marker and what
        # surrounds it), proves nothing.
        assume(secret not in REDACTED and "[" not in secret and "]" not in secret)
        assert secret not in out
