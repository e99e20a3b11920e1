"""A value that must never be shown: its repr and str are masked."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

MASK: Final = "********"
REDACTED: Final = "[redacted]"
MIN_REDACTED: Final = 4  # shorter values (0, 1, yes) are not secrets, and would mask most of a text


class Secret:
    """Wraps a secret string. Only `reveal()` gives the value, for the one call that needs it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({MASK})"

    def __str__(self) -> str:
        return MASK

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Secret is not to be serialised")


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every occurrence of each secret (and of each line of a secret spanning lines) of
    MIN_REDACTED characters or more replaced by REDACTED. Overlapping occurrences are masked as one."""
    pieces = set()
    for secret in secrets:
        for piece in (secret, *secret.splitlines(), *(line.strip() for line in secret.splitlines())):
            if len(piece) >= MIN_REDACTED:
                pieces.add(piece)
    spans: list[tuple[int, int]] = []
    for piece in pieces:
        start = text.find(piece)
        while start != -1:
            spans.append((start, start + len(piece)))
            start = text.find(piece, start + 1)
    if not spans:
        return text
    spans.sort()
    out: list[str] = []
    pos = 0
    end = -1
    for a, b in spans:
        if a > end:
            if end >= 0:
                out.append(REDACTED)
            out.append(text[pos:a])
            end = b
        else:
            end = max(end, b)
        pos = end
    out.append(REDACTED)
    out.append(text[pos:])
    return "".join(out)
