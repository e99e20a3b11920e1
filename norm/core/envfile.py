"""Environment files: validation of what operators keep in S3, and the canonical file Norm writes.

Operators write `KEY=VALUE` lines in shell syntax (what `set -a; . FILE` reads). systemd's
`EnvironmentFile=` reads a different language that only looks alike: it ignores `export `, keeps a
trailing `# comment` and a quote in mid-word as part of the value, and never expands `$NAME`. So Norm
parses the operator's file with the shell's rules, refusing what it cannot evaluate without running
anything, and writes the values back in a form both read alike (`render`): one `NAME='value'` line
per variable (double quotes with escapes when the value holds a single quote).

Accepted:
- blank lines; comments: a line whose first non-blank character is `#`, or ` # ...` after a value;
- an optional `export ` before the assignment;
- a name of letters, digits and `_`, not starting with a digit, then `=` with no blank around it;
- a value of unquoted text, 'single-quoted' text (literal, may span lines) and "double-quoted" text
  (escapes \\\\ \\" \\$ \\` and line continuations; may span lines), juxtaposed as one word; in unquoted
  text a backslash escapes the next character and a backslash before a newline continues the line.

Refused, with the line number and a reason that never quotes a value (values are secrets):
- `$` outside single quotes unless it ends the word (expansions, `$(...)`, `$((...))`, `$'...'`),
  backticks outside single quotes (command substitution), an unquoted `~` (tilde expansion) and
  unquoted braces (`export A=x{1,2}` expands them);
- shell operators in unquoted text (| & ; < > ( )), and a second word after the value (`A=b c` runs c);
- anything that is not an assignment, a name defined twice, unterminated quotes, control characters
  other than tab and newline (so NUL and the CR of CRLF line endings), text that is not UTF-8, a
  byte order mark, and files over MAX_BYTES.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from norm.core.errors import InvalidValue
from norm.core.secret import Secret

MAX_BYTES = 1024 * 1024

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_EXPORT = re.compile(r"export[ \t]+(?=[A-Za-z_])")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_OPERATORS = frozenset("|&;<>()")
_BLANK = " \t"
_END_OF_WORD = ("", "\n", " ", "\t")


class EnvFileError(InvalidValue):
    """An environment file is not acceptable. `line` is where the offending assignment starts (1-based;
    0 for the file as a whole). The message never quotes the file's content beyond a variable name."""

    def __init__(self, source: str, line: int, reason: str) -> None:
        super().__init__(f"{source} line {line}" if line else source, reason)
        self.source = source
        self.line = line


@dataclass(frozen=True)
class EnvFile:
    """A valid environment file: its variables in file order. Values are Secrets: never shown."""

    variables: Mapping[str, Secret] = field(repr=False)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.variables)

    def __repr__(self) -> str:
        return f"EnvFile(names={list(self.names)!r})"


def parse_env_file(raw: bytes, source: str = "environment file") -> EnvFile:
    """Parse and validate `raw` with the shell's rules; raises EnvFileError."""
    if len(raw) > MAX_BYTES:
        raise EnvFileError(source, 0, f"{len(raw)} bytes long; at most {MAX_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EnvFileError(source, raw[:e.start].count(b"\n") + 1, "not UTF-8 text") from None
    if text.startswith("\ufeff"):
        raise EnvFileError(source, 1, "starts with a byte order mark")
    bad = _CONTROL.search(text)
    if bad is not None:
        what = ("a carriage return (CRLF line endings?)" if bad.group() == "\r"
                else "a NUL byte" if bad.group() == "\x00" else "a control character")
        raise EnvFileError(source, text.count("\n", 0, bad.start()) + 1, what)
    return _Parser(text, source).parse()


def secret_values(raw: bytes) -> frozenset[str]:
    """Every value `raw` may hand a process, to redact them from output: as the shell (and Norm's own
    files) read them, and as Docker's --env-file reads them (the text after the first `=`, quotes and
    all). Never fails: a file the shell grammar refuses still gives its Docker reading."""
    found: set[str] = set()
    for raw_line in raw.decode("utf-8", "replace").splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        _, sep, value = line.partition("=")
        if sep:
            found.update((value, value.strip("'\"")))
    with contextlib.suppress(EnvFileError):
        found.update(v.reveal() for v in parse_env_file(raw).variables.values())
    return frozenset(v for v in found if v)


def render(env: EnvFile, header: Sequence[str] = ()) -> bytes:
    """The file Norm writes: `# header` lines, then one assignment per variable, in a form that a shell
    and systemd's EnvironmentFile= read to the same values. parse_env_file(render(e)) == e."""
    lines = [f"# {h}" for h in header if "\n" not in h]
    for name, secret in env.variables.items():
        value = secret.reveal()
        if "'" not in value:
            lines.append(f"{name}='{value}'")
        else:
            escaped = re.sub(r'([\\"$`])', r"\\\1", value)
            lines.append(f'{name}="{escaped}"')
    return ("\n".join(lines) + "\n").encode() if lines else b""


def header_of(raw: bytes) -> list[str]:
    """The `# ` comment lines at the top of a file Norm wrote (without the `# `)."""
    out = []
    for line in raw.split(b"\n"):
        if not line.startswith(b"# "):
            break
        out.append(line[2:].decode("utf-8", "replace"))
    return out


class _Parser:
    def __init__(self, text: str, source: str) -> None:
        self.text = text
        self.source = source
        self.pos = 0
        self.line = 1

    def fail(self, reason: str, line: int | None = None) -> EnvFileError:
        return EnvFileError(self.source, self.line if line is None else line, reason)

    def peek(self, offset: int = 0) -> str:
        i = self.pos + offset
        return self.text[i] if i < len(self.text) else ""

    def advance(self) -> str:
        ch = self.text[self.pos]
        self.pos += 1
        if ch == "\n":
            self.line += 1
        return ch

    def skip_blanks(self) -> None:
        while self.peek() in (" ", "\t"):
            self.pos += 1

    def skip_comment(self) -> None:
        end = self.text.find("\n", self.pos)
        self.pos = len(self.text) if end < 0 else end

    def parse(self) -> EnvFile:
        variables: dict[str, Secret] = {}
        defined: dict[str, int] = {}
        while True:
            self.skip_blanks()
            ch = self.peek()
            if ch == "":
                return EnvFile(variables)
            if ch == "\n":
                self.advance()
                continue
            if ch == "#":
                self.skip_comment()
                continue
            start = self.line
            name, value = self.assignment()
            if name in defined:
                raise self.fail(f"{name} is defined again (first on line {defined[name]})", start)
            defined[name] = start
            variables[name] = Secret(value)
            self.end_of_line(start)

    def assignment(self) -> tuple[str, str]:
        m = _EXPORT.match(self.text, self.pos)
        if m is not None:
            self.pos = m.end()
        m = _NAME.match(self.text, self.pos)
        if m is None:
            raise self.fail("not an assignment: expected NAME=value (a name is letters, digits and _, "
                            "not starting with a digit)")
        name = m.group()
        self.pos = m.end()
        if self.peek() != "=":
            self.skip_blanks()
            if self.peek() == "=":
                raise self.fail(f"a blank between {name} and '=': write NAME=value")
            # Not named: a line that is not an assignment may be a value pasted on its own.
            raise self.fail("not an assignment: expected '=' right after the name")
        self.pos += 1
        return name, self.value(name)

    def value(self, name: str) -> str:
        out: list[str] = []
        while True:
            ch = self.peek()
            if ch in _END_OF_WORD:
                return "".join(out)
            if ch == "'":
                out.append(self.single_quoted(name))
            elif ch == '"':
                out.append(self.double_quoted(name))
            elif ch == "\\":
                out.append(self.unquoted_escape(name))
            elif ch == "$":
                if self.peek(1) not in _END_OF_WORD:
                    raise self.expansion(name)
                out.append(self.advance())
            elif (refused := self.unquoted_refusal(ch, name)) is not None:
                raise refused
            else:
                out.append(self.advance())

    def unquoted_escape(self, name: str) -> str:
        """A backslash outside quotes: the character after it, or nothing for a line continuation."""
        self.advance()
        nxt = self.peek()
        if nxt == "":
            raise self.fail(f"the value of {name} ends with a backslash")
        if nxt == "\n":  # a line continuation: both characters disappear
            self.advance()
            return ""
        return self.advance()

    def unquoted_refusal(self, ch: str, name: str) -> EnvFileError | None:
        """Why `ch` cannot stand unquoted in a value (a shell would act on it), or None."""
        if ch == "`":
            return self.fail(f"command substitution (`) in the value of {name}: quote the value with "
                             "single quotes")
        if ch == "~":
            return self.fail(f"an unquoted ~ in the value of {name} (a shell expands it): quote it")
        if ch in "{}":
            return self.fail(f"an unquoted brace in the value of {name} (`export` expands braces): "
                             "quote it")
        if ch in _OPERATORS:
            return self.fail(f"a shell operator in the value of {name}: quote the value")
        return None

    def expansion(self, name: str) -> EnvFileError:
        return self.fail(f"a $ outside single quotes in the value of {name} (expansion or substitution): "
                         "quote the value with single quotes")

    def single_quoted(self, name: str) -> str:
        start = self.line
        end = self.text.find("'", self.pos + 1)
        if end < 0:
            raise self.fail(f"unterminated single quote in the value of {name}", start)
        chunk = self.text[self.pos + 1:end]
        self.line += chunk.count("\n")
        self.pos = end + 1
        return chunk

    def double_quoted(self, name: str) -> str:
        start = self.line
        self.advance()
        out: list[str] = []
        while True:
            ch = self.peek()
            if ch == "":
                raise self.fail(f"unterminated double quote in the value of {name}", start)
            if ch == '"':
                self.advance()
                return "".join(out)
            if ch == "\\":
                out.append(self.quoted_escape(name, start))
            elif ch == "$":
                if self.peek(1) not in ('"', " ", "\t", "\n"):
                    raise self.expansion(name)
                out.append(self.advance())
            elif ch == "`":
                raise self.fail(f"command substitution (`) in the value of {name}: quote the value with "
                                "single quotes")
            else:
                out.append(self.advance())

    def quoted_escape(self, name: str, start: int) -> str:
        """A backslash inside double quotes: the character after it where it escapes one, nothing for
        a line continuation, and itself before any other character (which is read next)."""
        self.advance()
        nxt = self.peek()
        if nxt == "":
            raise self.fail(f"unterminated double quote in the value of {name}", start)
        if nxt == "\n":
            self.advance()
            return ""
        if nxt in '"\\$`':
            return self.advance()
        return "\\"  # a backslash before any other character stays

    def end_of_line(self, start: int) -> None:
        self.skip_blanks()
        ch = self.peek()
        if ch == "#":
            self.skip_comment()
            ch = self.peek()
        if ch == "\n":
            self.advance()
        elif ch != "":
            raise self.fail("more than one word after '=': quote the value (A=b c would run c)", start)


# ---------------------------------------------------------------------------------------------------
# Where the file comes from, and what the written file says about it

_SOURCE_PREFIX = "norm-source: "


@dataclass(frozen=True)
class Source:
    """The object a written environment file was made from, and that object's ETag."""

    bucket: str
    key: str
    etag: str

    def header(self) -> str:
        return _SOURCE_PREFIX + json.dumps({"bucket": self.bucket, "key": self.key, "etag": self.etag},
                                           sort_keys=True)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def object_key(template: str, environment: str) -> str:
    """The object key for `environment` (the value of keys.environment in etcd, already validated,
    or the host's environment while that key is absent)."""
    return template.replace("{environment}", environment)


def source_of(raw: bytes) -> Source | None:
    """The source recorded in the header of a file Norm wrote; None for any other file."""
    for line in header_of(raw):
        if line.startswith(_SOURCE_PREFIX):
            try:
                data = json.loads(line[len(_SOURCE_PREFIX):])
                if isinstance(data, dict) and all(isinstance(data.get(k), str) and data[k]
                                                  for k in ("bucket", "key", "etag")):
                    return Source(data["bucket"], data["key"], data["etag"])
            except (ValueError, RecursionError):
                return None
    return None
