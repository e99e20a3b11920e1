"""How Norm's records travel through etcd: JSON out, and back in strictly, driven by the records' own
annotations.

Anyone who can write under the prefix can write any bytes there, so a value read back is held to the
shape of the frozen dataclass it is read as, and nothing else is accepted:

    str, int, float, bool          exactly those JSON types: a bool is not an int, an int is a float;
                                   a float is finite (JSON's NaN and Infinity, and integers past a
                                   float's range, are refused) unless the field is `AnyNumber`
    X | None                       null, or an X
    tuple[X, ...], list[X]         a JSON list of X
    a StrEnum                      one of its values
    Literal["a", "b"]              one of those values, of the same JSON type
    a frozen dataclass             a JSON object: its fields by name, each decoded in turn; a missing
                                   field takes its default or is refused; a field it does not declare
                                   is refused (or ignored, for a record whose class sets
                                   `wire_tolerant: ClassVar[bool] = True`: one newer agents extend)
    Annotated[X, Check(f)]         an X that the grammar check `f(value, path)` also accepts (the
                                   validators of norm.core.values, mostly: `Digest`, `MachineId`, ...)
    Annotated[X, Before(f)]        `f` maps the raw JSON value first (what an older version wrote)

Any other type in an annotation is a bug, refused when the type is first read (`SchemaError`). An
error names the field's path (`steps[2]`, `progress[0].host`), never its value: values may be secrets,
or hostile.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeAlias, TypeVar, Union, get_args, get_origin

from norm.core import values
from norm.core.errors import InvalidValue

T = TypeVar("T")
Decoder = Callable[[object, str], Any]


class SchemaError(Exception):
    """A record's annotation that the decoder does not know: a bug in Norm, not in the input."""


class DecodeError(ValueError):
    """A value that is not of its field's type or grammar. The message names the field's path, never
    the value."""


@dataclass(frozen=True)
class Check:
    """A grammar the decoded value must also satisfy: `fn(value, path)` returns the value, or raises
    ValueError or TypeError with a message that names `path` and never quotes the value."""

    fn: Callable[[Any, str], object]


@dataclass(frozen=True)
class Before:
    """Maps the raw JSON value before it is decoded: the form an earlier version wrote, read as what
    it means now."""

    fn: Callable[[object], object]


class _AnyNumber:
    """Marks a float field that takes any JSON number as it was read, NaN, infinities and integers past
    a float's range included."""

    def __repr__(self) -> str:
        return "AnyNumber"


ANY_NUMBER = _AnyNumber()
AnyNumber: TypeAlias = Annotated[float, ANY_NUMBER]


def matching(pattern: re.Pattern[str]) -> Check:
    """A string that `pattern` matches whole."""
    return Check(functools.partial(values.matching, pattern=pattern))


def text(limit: int) -> Check:
    """Free text of at most `limit` characters (see values.text)."""
    return Check(functools.partial(values.text, limit=limit))


Digest: TypeAlias = Annotated[str, Check(values.digest)]
MachineId: TypeAlias = Annotated[str, Check(values.machine_id)]
Tag: TypeAlias = Annotated[str, Check(values.tag)]
StepName: TypeAlias = Annotated[str, Check(values.step)]
Text: TypeAlias = Annotated[str, Check(values.text)]  # free text, up to values.MAX_TEXT
Reason: TypeAlias = Annotated[str, text(values.MAX_REASON)]  # what a host's report says


# ---------------------------------------------------------------------------------------------------
# Out


def encode(value: object, *, compact: bool = True) -> bytes:
    """A record (a dataclass, as its fields) or plain data as JSON, keys sorted: the same value always
    gives the same bytes. `compact`: without spaces after separators."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    separators = (",", ":") if compact else None
    return json.dumps(value, sort_keys=True, separators=separators).encode()


# ---------------------------------------------------------------------------------------------------
# In


def _loads(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # nested past the parser's depth: refused all the same
        raise DecodeError("not JSON") from None


def parse(raw: bytes, where: str) -> object:
    """JSON text as plain data; InvalidValue (`where`, "not JSON") for anything else."""
    try:
        return _loads(raw)
    except DecodeError as e:
        raise InvalidValue(where, str(e)) from None


def decode(tp: type[T], data: object, path: str = "") -> T:
    """`data` (plain JSON data) as a `tp`. Raises DecodeError naming the path of what is wrong."""
    result: T = _decoder(tp)(data, path)
    return result


def read(tp: type[T], raw: bytes, where: str, what: str,
         check: Callable[[T], object] | None = None) -> T:
    """The `tp` that the JSON `raw` read from `where` holds, and that `check` (a record's own rules
    across fields: ValueError naming fields, never values) accepts. Raises InvalidValue (`where`,
    "not a `what` (...)") naming the field at fault, never quoting the value."""
    decoder = _decoder(tp)
    try:
        result: T = decoder(_loads(raw), "")
        if check is not None:
            check(result)
    except (ValueError, TypeError) as e:
        raise InvalidValue(where, f"not a {what} ({e})") from None
    return result


def _at(path: str, problem: str) -> DecodeError:
    return DecodeError(f"{path}: {problem}" if path else problem)


def _str(v: object, path: str) -> str:
    if not isinstance(v, str):
        raise _at(path, "expected a string")
    return v


def _bool(v: object, path: str) -> bool:
    if not isinstance(v, bool):
        raise _at(path, "expected true or false")
    return v


def _int(v: object, path: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _at(path, "expected an integer")
    return v


def _float(v: object, path: str) -> float:
    """A time or a duration: a finite float."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _at(path, "expected a number")
    try:
        f = float(v)
    except OverflowError:
        raise _at(path, "a number out of range") from None
    if not math.isfinite(f):
        raise _at(path, "expected a finite number")
    return f


def _any_number(v: object, path: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _at(path, "expected a number")
    return v


_SCALARS: dict[object, Decoder] = {str: _str, bool: _bool, int: _int, float: _float}


def _decoder(tp: Any) -> Decoder:
    """The decoder of `tp`, made once per type (types are hashable; Annotated ones with their
    metadata)."""
    return _compile(tp)


@functools.cache
def _compile(tp: Any) -> Decoder:
    if tp in _SCALARS:
        return _SCALARS[tp]
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return _annotated(args[0], getattr(tp, "__metadata__", ()))
    if origin in (Union, types.UnionType):
        return _optional(tp, args)
    if origin in (tuple, list):
        return _sequence(tp, origin, args)
    if origin is Literal:
        return _literal(args)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _enum(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _record(tp)
    raise SchemaError(f"cannot decode {tp!r}")


def _annotated(base: object, metadata: tuple[object, ...]) -> Decoder:
    befores = [m.fn for m in metadata if isinstance(m, Before)]
    checks = [m.fn for m in metadata if isinstance(m, Check)]
    if ANY_NUMBER in metadata:
        if base is not float:
            raise SchemaError("AnyNumber marks a float")
        inner: Decoder = _any_number
    else:
        inner = _compile(base)

    def annotated(v: object, path: str) -> Any:
        for before in befores:
            v = before(v)
        value = inner(v, path)
        for check in checks:
            try:
                check(value, path)
            except (ValueError, TypeError) as e:  # the checks' messages name the path, not the value
                raise DecodeError(str(e)) from None
        return value

    return annotated


def _optional(tp: object, args: tuple[object, ...]) -> Decoder:
    others = [a for a in args if a is not type(None)]
    if len(others) != 1 or len(args) != 2:
        raise SchemaError(f"cannot decode {tp!r}: only X | None")
    inner = _compile(others[0])

    def optional(v: object, path: str) -> Any:
        return None if v is None else inner(v, path)

    return optional


def _sequence(tp: object, origin: object, args: tuple[object, ...]) -> Decoder:
    if origin is tuple and (len(args) != 2 or args[1] is not Ellipsis):
        raise SchemaError(f"cannot decode {tp!r}: only tuple[X, ...]")
    if not args:
        raise SchemaError(f"cannot decode {tp!r}: no item type")
    item = _compile(args[0])
    make: Callable[[Any], Any] = tuple if origin is tuple else list

    def sequence(v: object, path: str) -> Any:
        if not isinstance(v, list):
            raise _at(path, "expected a list")
        return make(item(x, f"{path}[{i}]") for i, x in enumerate(v))

    return sequence


def _literal(args: tuple[object, ...]) -> Decoder:
    if not all(isinstance(a, str | int | bool) or a is None for a in args):
        raise SchemaError(f"cannot decode Literal{list(args)!r}")

    def literal(v: object, path: str) -> Any:
        for a in args:
            if type(v) is type(a) and v == a:
                return a
        raise _at(path, "not one of the values allowed")

    return literal


def _enum(tp: type[enum.Enum]) -> Decoder:
    members = {m.value: m for m in tp}
    if not all(isinstance(k, str) for k in members):
        raise SchemaError(f"cannot decode {tp!r}: only enums of strings")

    def member(v: object, path: str) -> Any:
        if not isinstance(v, str) or v not in members:
            raise _at(path, "not a value Norm knows")
        return members[v]

    return member


def _record(cls: type[Any]) -> Decoder:
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = [(f.name, _compile(hints[f.name]),
               f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
              for f in dataclasses.fields(cls) if f.init]
    names = frozenset(name for name, _, _ in fields)
    tolerant = getattr(cls, "wire_tolerant", False) is True

    def record(v: object, path: str) -> Any:
        if not isinstance(v, dict):
            raise _at(path, "expected an object")
        if not tolerant and not names.issuperset(v):
            raise _at(path, f"a field {cls.__name__} does not have")
        kwargs: dict[str, Any] = {}
        for name, field, required in fields:
            where = f"{path}.{name}" if path else name
            if name in v:
                kwargs[name] = field(v[name], where)
            elif required:
                raise _at(where, "missing")
        return cls(**kwargs)

    return record
