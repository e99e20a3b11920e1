"""Validation of the desired state operators write to etcd. Bad values are refused with a reason
that never quotes them; nothing downstream sees a value that did not pass here."""

from __future__ import annotations

import re
from dataclasses import dataclass

from norm.core.errors import InvalidValue

# Docker's tag grammar: [\w][\w.-]{0,127}
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_ENV_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]{0,254}")


def is_tag(text: str) -> bool:
    """Whether `text` is an image tag as parse_version accepts it."""
    return _TAG.fullmatch(text) is not None


def parse_version(raw: bytes, key: str) -> str:
    """The desired image tag. A trailing newline (from `echo v2 | etcdctl put`) is refused, not
    trimmed: a value that differs from what the operator meant must not roll out."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidValue(key, "an image tag is ASCII") from None
    if not text:
        raise InvalidValue(key, "empty; an image tag is 1 to 128 of A-Z a-z 0-9 _ . -")
    if len(text) > 128:
        raise InvalidValue(key, f"{len(text)} bytes long; an image tag is at most 128")
    if not is_tag(text):
        raise InvalidValue(key, "not an image tag: 1 to 128 of A-Z a-z 0-9 _ . -, not starting with . or -"
                           + (" (it ends with a newline)" if text.endswith("\n") else ""))
    return text


def parse_environment_name(raw: bytes, key: str) -> str:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidValue(key, "an environment file name is ASCII") from None
    if not _ENV_NAME.fullmatch(text) or ".." in text.split("/"):
        raise InvalidValue(key, "not an environment file name: up to 255 of A-Z a-z 0-9 _ . / -")
    return text


@dataclass(frozen=True)
class Desired:
    """What the fleet is asked to run. `None` where the key is absent or its value was refused."""

    version: str | None = None
    version_revision: int = 0
    version_refused: str | None = None  # why the value written at version_revision was refused
    environment: str | None = None
    environment_revision: int = 0
