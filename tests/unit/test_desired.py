"""Desired state from etcd: image tags and environment file names are refused unless exactly valid,
and a refusal never quotes the value."""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from norm.core.desired import Desired, parse_environment_name, parse_version
from norm.core.errors import InvalidValue

KEY = "/djed-version"
ENV_KEY = "/djed-environment"
TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
ENV_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]{0,254}")

# Every reason parse_version and parse_environment_name give, with the parts that vary left out: an
# input found inside one of these is part of the wording, not a quoted value.
STATIC_REASONS = " | ".join([
    "an image tag is ASCII",
    "empty; an image tag is 1 to 128 of A-Z a-z 0-9 _ . -",
    "bytes long; an image tag is at most 128",
    "not an image tag: 1 to 128 of A-Z a-z 0-9 _ . -, not starting with . or - (it ends with a newline)",
    "an environment file name is ASCII",
    "not an environment file name: up to 255 of A-Z a-z 0-9 _ . / -",
])


def refused(parse: object, raw: bytes, key: str) -> InvalidValue:
    with pytest.raises(InvalidValue) as info:
        parse(raw, key)  # type: ignore[operator]
    e = info.value
    assert e.where == key
    assert str(e) == f"{key}: {e.reason}"
    return e


def assert_not_quoted(raw: bytes, e: InvalidValue) -> None:
    text = raw.decode("latin-1")
    if len(text) > 3:
        assert text not in e.reason or text in STATIC_REASONS, e.reason
        assert text not in str(e).removeprefix(f"{e.where}: ") or text in STATIC_REASONS


# ---------------------------------------------------------------------------------------------------
# parse_version


@pytest.mark.parametrize(
    "tag",
    ["v2", "2", "_", "latest", "1.2.3", "v1.2.3-rc.1", "2024-01-01_build.7", "A" * 128, "a-", "a.",
     "a..b", "__init__", "0" * 128],
)
def test_valid_tags_accepted(tag: str) -> None:
    assert parse_version(tag.encode(), KEY) == tag


@pytest.mark.parametrize(
    "raw, why",
    [
        (b"", "empty"),
        (b"x" * (1 << 20), "1048576 bytes long"),
        (b"a" * 129, "129 bytes long"),
        (b"x;reboot", "not an image tag"),
        (b"v2; rm -rf /", "not an image tag"),
        (b"$(reboot)", "not an image tag"),
        (b".v2", "not starting with . or -"),
        (b"-v2", "not starting with . or -"),
        (b".", "not an image tag"),
        (b"v 2", "not an image tag"),
        (b" v2", "not an image tag"),
        (b"v2 ", "not an image tag"),
        (b"v2\r", "not an image tag"),
        (b"v2\r\n", "not an image tag"),
        (b"\nv2", "not an image tag"),
        (b"v2\n\n", "not an image tag"),
        (b"v2\x00", "not an image tag"),
        (b"repo:v2", "not an image tag"),
        (b"repo/img", "not an image tag"),
        (b"v2@sha256", "not an image tag"),
        ("vé".encode(), "ASCII"),
        ("v2\u00a0".encode(), "ASCII"),
        ("\u0662".encode(), "ASCII"),
        (b"\xff", "ASCII"),
        (b"\x80abc", "ASCII"),
    ],
)
def test_bad_tags_refused(raw: bytes, why: str) -> None:
    e = refused(parse_version, raw, KEY)
    assert why in e.reason
    assert_not_quoted(raw, e)


def test_one_megabyte_is_refused_quickly_and_briefly() -> None:
    e = refused(parse_version, b"v" * (1 << 20), KEY)
    assert len(str(e)) < 200


def test_newline_reason_says_so() -> None:
    e = refused(parse_version, b"v2\n\n", KEY)
    assert "ends with a newline" in e.reason


@pytest.mark.parametrize("raw", [b"v2\n", b"1.0.0\n", b"latest\n"])
def test_trailing_newline_refused(raw: bytes) -> None:
    e = refused(parse_version, raw, KEY)
    assert "ends with a newline" in e.reason


def check_version(raw: bytes) -> None:
    try:
        tag = parse_version(raw, KEY)
    except InvalidValue as e:
        assert e.where == KEY
        assert not TAG.fullmatch(raw.decode("latin-1"))
        assert_not_quoted(raw, e)
    else:
        assert TAG.fullmatch(tag), tag
        assert tag.encode() == raw


@settings(deadline=None)
@given(st.binary(max_size=300))
@example(b"x;reboot")
@example(b"v2\n\n")
@example(b".hidden")
def test_any_bytes_give_the_same_valid_tag_or_invalid_value(raw: bytes) -> None:
    check_version(raw)


@settings(deadline=None)
@given(st.text(alphabet=st.characters(codec="ascii"), max_size=200))
def test_any_ascii_text_gives_the_same_valid_tag_or_invalid_value(text: str) -> None:
    check_version(text.encode())


@settings(deadline=None)
@given(st.from_regex(TAG, fullmatch=True))
def test_every_valid_tag_is_accepted_unchanged(tag: str) -> None:
    assert parse_version(tag.encode(), KEY) == tag


@settings(deadline=None)
@given(st.integers(129, 5000))
def test_any_overlong_tag_is_refused(n: int) -> None:
    e = refused(parse_version, b"a" * n, KEY)
    assert f"{n} bytes long" in e.reason


# ---------------------------------------------------------------------------------------------------
# parse_environment_name


@pytest.mark.parametrize(
    "name",
    ["prod", "prod.env", "envs/prod.env", "a_b-c", "x" * 255, "stage/eu-west-1/app.env", "a/./b", "a.",
     "_x", "0", "a/", "a/.hidden"],
)
def test_valid_environment_names_accepted(name: str) -> None:
    assert parse_environment_name(name.encode(), ENV_KEY) == name


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"x" * 256,
        b"x" * (1 << 20),
        b"/etc/passwd",
        b"../etc/passwd",
        b"a/../b",
        b"a/..",
        b"..",
        b".hidden",
        b"-rf",
        b"x;reboot",
        b"a b",
        b"a\tb",
        b"a\\b",
        b"a:b",
        b"prod\n\n",
        b"prod\r",
        b"\x00",
        "prød".encode(),
        b"\xff",
    ],
)
def test_bad_environment_names_refused(raw: bytes) -> None:
    e = refused(parse_environment_name, raw, ENV_KEY)
    assert_not_quoted(raw, e)


def test_environment_name_with_trailing_newline_refused() -> None:
    refused(parse_environment_name, b"prod.env\n", ENV_KEY)


def check_environment_name(raw: bytes) -> None:
    try:
        name = parse_environment_name(raw, ENV_KEY)
    except InvalidValue as e:
        assert e.where == ENV_KEY
        assert_not_quoted(raw, e)
    else:
        assert ENV_NAME.fullmatch(name), name
        assert ".." not in name.split("/")
        assert name.encode() == raw


@settings(deadline=None)
@given(st.binary(max_size=300))
@example(b"a/../b")
@example(b"x" * 256)
def test_any_bytes_give_the_same_environment_name_or_invalid_value(raw: bytes) -> None:
    assume(not (raw.endswith(b"\n") and ENV_NAME.fullmatch(raw[:-1].decode("latin-1"))))
    check_environment_name(raw)


@settings(deadline=None)
@given(st.lists(st.sampled_from(["a", "prod", ".", "..", "x.env", "-", "_"]), min_size=1, max_size=6))
def test_dot_dot_components_are_always_refused(parts: list[str]) -> None:
    raw = "/".join(parts).encode()
    if ".." in parts:
        refused(parse_environment_name, raw, ENV_KEY)
    else:
        check_environment_name(raw)


# ---------------------------------------------------------------------------------------------------
# Desired


def test_desired_defaults_to_nothing() -> None:
    d = Desired()
    assert (d.version, d.version_revision, d.environment, d.environment_revision) == (None, 0, None, 0)


def test_desired_is_frozen() -> None:
    with pytest.raises(AttributeError):
        Desired().version = "v2"  # type: ignore[misc]
