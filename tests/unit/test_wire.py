"""The one decoder of what Norm reads from etcd: strict, driven by annotations, and never quoting a
value in its errors."""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field
from typing import Annotated, ClassVar, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from norm.core import wire
from norm.core.errors import InvalidValue
from norm.core.wire import DecodeError, Digest, MachineId, SchemaError, StepName

D = "sha256:" + "ab" * 32
MID = "0123456789abcdef0123456789abcdef"
SECRET = "Hunter2 secret!"


class Colour(enum.StrEnum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True)
class Leaf:
    name: StepName
    weight: float = 1.0


@dataclass(frozen=True)
class Tree:
    id: int
    digest: Digest
    hosts: tuple[MachineId, ...]
    colour: Colour
    kind: Literal["a", "b"]
    steps: tuple[Leaf, ...] = ()
    note: str | None = None
    flag: bool = False
    tags: list[str] = field(default_factory=list)
    first: Leaf | None = None


GOOD = {"id": 3, "digest": D, "hosts": [MID], "colour": "red", "kind": "a",
        "steps": [{"name": "migrate"}, {"name": "collectstatic", "weight": 2}], "note": None, "flag": True,
        "tags": ["x"], "first": {"name": "migrate", "weight": 0.5}}


def test_a_good_value_decodes_into_the_record() -> None:
    tree = wire.decode(Tree, GOOD)
    assert tree == Tree(3, D, (MID,), Colour.RED, "a", (Leaf("migrate"), Leaf("collectstatic", 2.0)), None,
                        True, ["x"], Leaf("migrate", 0.5))
    assert isinstance(tree.steps[1].weight, float) and tree.colour is Colour.RED


def test_missing_fields_take_their_defaults_and_required_ones_are_refused() -> None:
    tree = wire.decode(Tree, {"id": 3, "digest": D, "hosts": [], "colour": "blue", "kind": "b"})
    assert (tree.steps, tree.note, tree.flag, tree.tags, tree.first) == ((), None, False, [], None)
    with pytest.raises(DecodeError, match=r"^kind: missing$"):
        wire.decode(Tree, {"id": 3, "digest": D, "hosts": [], "colour": "blue"})


@pytest.mark.parametrize("path,bad", [
    ("id", SECRET), ("id", True), ("id", 1.0), ("id", None), ("digest", SECRET), ("digest", 7),
    ("hosts", SECRET), ("hosts[0]", SECRET), ("colour", SECRET), ("colour", 1), ("kind", SECRET),
    ("kind", True), ("steps", {"name": SECRET}), ("steps[1]", [SECRET]), ("steps[1].name", SECRET),
    ("steps[1].weight", SECRET), ("steps[1].weight", False), ("note", [SECRET]), ("flag", 1),
    ("flag", SECRET), ("tags[0]", 7), ("first", SECRET), ("first.name", "Bad " + SECRET),
])
def test_an_error_names_the_field_and_never_the_value(path: str, bad: object) -> None:
    data = json.loads(json.dumps(GOOD))
    *parents, last = path.replace("[", ".[").split(".")
    target = data
    for p in parents:
        target = target[int(p[1:-1])] if p.startswith("[") else target[p]
    if last.startswith("["):
        target[int(last[1:-1])] = bad
    else:
        target[last] = bad
    with pytest.raises(DecodeError) as info:
        wire.decode(Tree, data)
    assert str(info.value).startswith(path + ":")
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)


def test_read_says_where_and_what_never_the_value() -> None:
    raw = json.dumps({**GOOD, "steps": [{"name": "migrate"}, {"name": SECRET}]}).encode()
    with pytest.raises(InvalidValue) as info:
        wire.read(Tree, raw, "/norm/tree", "tree")
    assert info.value.where == "/norm/tree"
    assert info.value.reason == "not a tree (steps[1].name: not a step name)"
    assert SECRET not in str(info.value)
    for garbage in (b"", b"{", SECRET.encode(), b"\xff" + SECRET.encode(), b"[" * 100_000):
        with pytest.raises(InvalidValue) as info:
            wire.read(Tree, garbage, "/norm/tree", "tree")
        assert info.value.reason == "not a tree (not JSON)" and SECRET not in str(info.value)


def test_a_field_the_record_does_not_have_is_refused_without_naming_it() -> None:
    with pytest.raises(DecodeError) as info:
        wire.decode(Tree, {**GOOD, SECRET: 1})
    assert SECRET not in str(info.value)
    with pytest.raises(DecodeError, match=r"^first: "):
        wire.decode(Tree, {**GOOD, "first": {"name": "migrate", SECRET: 1}})


@dataclass(frozen=True)
class Open:
    wire_tolerant: ClassVar[bool] = True

    name: str


def test_a_tolerant_record_ignores_fields_it_does_not_know() -> None:
    assert wire.decode(Open, {"name": "x", "added_later": [1]}) == Open("x")


def test_bool_is_not_an_int_nor_a_float_and_an_int_is_a_float() -> None:
    for tp in (int, float):
        for b in (True, False):
            with pytest.raises(DecodeError):
                wire.decode(tp, b)
    assert wire.decode(float, 3) == 3.0 and isinstance(wire.decode(float, 3), float)
    with pytest.raises(DecodeError):
        wire.decode(int, 3.0)
    with pytest.raises(DecodeError):
        wire.decode(bool, 1)


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400", "-1e999", "9" * 400])
def test_a_float_is_finite_unless_the_field_takes_any_number(number: str) -> None:
    data = json.loads(number)
    with pytest.raises(DecodeError, match=r"out of range|finite"):
        wire.decode(float, data, "at")
    kept = wire.decode(wire.AnyNumber, data, "at")  # the host record's started_at, as it always was
    assert kept is data or (math.isnan(kept) and math.isnan(data))
    with pytest.raises(DecodeError):
        wire.decode(wire.AnyNumber, True, "at")


def test_literals_keep_their_json_type() -> None:
    assert wire.decode(Literal[1, "1"], 1) == 1
    with pytest.raises(DecodeError):
        wire.decode(Literal[1], True)
    with pytest.raises(DecodeError):
        wire.decode(Literal["a"], "b")


def _no_absolute_time(v: object) -> object:
    return None if isinstance(v, float) else v


def _even(v: int, name: str) -> int:
    if v % 2:
        raise ValueError(f"{name}: must be even")
    return v


@dataclass(frozen=True)
class Hooked:
    n: Annotated[int, wire.Check(_even)]
    leaf: Annotated[Leaf | None, wire.Before(_no_absolute_time)] = None


def test_hooks_map_the_raw_value_and_check_the_decoded_one() -> None:
    assert wire.decode(Hooked, {"n": 2, "leaf": 1.5}) == Hooked(2, None)
    assert wire.decode(Hooked, {"n": 2, "leaf": {"name": "m"}}) == Hooked(2, Leaf("m"))
    with pytest.raises(DecodeError, match=r"^n: must be even$"):
        wire.decode(Hooked, {"n": 3})
    with pytest.raises(DecodeError, match=r"^leaf: expected an object$"):
        wire.decode(Hooked, {"n": 2, "leaf": "soon"})


@dataclass(frozen=True)
class WithSet:
    names: frozenset[str]


@dataclass(frozen=True)
class WithUnion:
    v: int | str


@dataclass(frozen=True)
class WithDict:
    v: dict[str, int] = field(default_factory=dict)


@pytest.mark.parametrize("tp", [WithSet, WithUnion, WithDict, tuple[int, str], object, bytes,
                                Annotated[int, wire.ANY_NUMBER]])
def test_types_the_decoder_does_not_know_are_refused_up_front(tp: object) -> None:
    with pytest.raises(SchemaError):
        wire.decode(tp, {})  # type: ignore[call-overload]


def test_encode_sorts_keys_and_reads_back() -> None:
    tree = wire.decode(Tree, GOOD)
    raw = wire.encode(tree)
    assert raw == json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
    assert wire.read(Tree, raw, "k", "tree") == tree
    assert wire.encode({"b": 1, "a": [1]}, compact=False) == b'{"a": [1], "b": 1}'


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children,
                                                                      max_size=4),
    max_leaves=12)


@settings(deadline=None, max_examples=300)
@given(st.dictionaries(st.sampled_from([*GOOD, "other"]), json_values) | json_values)
def test_any_data_decodes_to_a_record_or_is_refused_naming_a_path(data: object) -> None:
    try:
        tree = wire.decode(Tree, data)
    except DecodeError:
        return
    assert isinstance(tree, Tree) and isinstance(tree.hosts, tuple) and type(tree.id) is int
