"""Values as a TOML file writes them: what `norm policy show` prints and `norm policy apply` reads back
as the same values (the policy, its steps, analysis queries and webhooks)."""

from __future__ import annotations


def toml_string(s: str) -> str:
    """A basic string: quotes and backslashes escaped, control characters as \\n, \\t or \\uXXXX."""
    out = []
    for c in s:
        if c in '"\\':
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def toml_value(v: object) -> str:
    """A boolean, a string, a number (as a float) or a tuple of those."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, int | float):
        return repr(float(v))
    if isinstance(v, tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {type(v).__name__}")
