"""The grammar of the values Norm keeps in etcd, checked again on the way back in.

Anyone who can write under the prefix can write any bytes there, and what a host reads from the
rollout header ends up in every application unit's environment (the release file). So every value
read back is held to the grammar it was written with: a tag to the desired version's (norm.core.desired),
digests, machine ids and step names to theirs, free text (reasons, who asked) to a bound and to
printable characters. The checks raise ValueError or TypeError naming the field, never quoting the
value: the decoder (norm.core.wire) turns them into InvalidValue.
"""

from __future__ import annotations

import re

from norm.core.desired import is_tag

DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
MACHINE_ID = re.compile(r"[0-9a-f]{32}")
STEP = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
# What the host record and the CLI show of a release: tag@sha256:<first 12> (release.release_text).
RELEASE_TEXT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}(@sha256:[0-9a-f]{12})?")
INSTANCE_ID = re.compile(r"i-[0-9a-f]{8}([0-9a-f]{9})?")
# Control characters other than tab and newline (escape sequences would reach operators' terminals).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")

MAX_REASON = 300  # a host's report: its reason is cut to this many characters
MAX_TEXT = 262144  # the leader's reasons (they may list thousands of hosts), other free text


def string(v: object, name: str) -> str:
    if not isinstance(v, str):
        raise TypeError(f"{name}: expected a string")
    return v


def tag(v: object, name: str) -> str:
    s = string(v, name)
    if not is_tag(s):
        raise ValueError(f"{name}: not an image tag")
    return s


def digest(v: object, name: str) -> str:
    s = string(v, name)
    if not DIGEST.fullmatch(s):
        raise ValueError(f"{name}: not a sha256 digest")
    return s


def machine_id(v: object, name: str) -> str:
    s = string(v, name)
    if not MACHINE_ID.fullmatch(s):
        raise ValueError(f"{name}: not a machine id")
    return s


def step(v: object, name: str) -> str:
    s = string(v, name)
    if not STEP.fullmatch(s):
        raise ValueError(f"{name}: not a step name")
    return s


def text(v: object, name: str, limit: int = MAX_TEXT) -> str:
    """Free text shown to operators: at most `limit` characters, no control characters but tab and
    newline."""
    s = string(v, name)
    if len(s) > limit:
        raise ValueError(f"{name}: longer than {limit} characters")
    if _CONTROL.search(s):
        raise ValueError(f"{name}: holds control characters")
    return s


def matching(v: object, name: str, pattern: re.Pattern[str]) -> str:
    s = string(v, name)
    if not pattern.fullmatch(s):
        raise ValueError(f"{name}: not of the expected form")
    return s


def clean(reason: str, limit: int = MAX_REASON) -> str:
    """A reason as a writer puts it in etcd: cut to `limit`, control characters made "?" (as the CLI
    shows them), so that what Norm writes always passes `text` on the way back."""
    return _CONTROL.sub("?", reason[:limit])
