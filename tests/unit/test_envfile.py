"""Environment files: shell-syntax parsing, refusals that name the line but never the value, and the
canonical rendering Norm writes. A shell (bash) is the oracle for what the syntax means."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from norm.core import envfile as envfile_module
from norm.core.envfile import EnvFile, EnvFileError, header_of, parse_env_file, render, secret_values
from norm.core.secret import Secret


def values(env: EnvFile) -> dict[str, str]:
    return {k: v.reveal() for k, v in env.variables.items()}


def bash_reads(text: str, names: list[str]) -> dict[str, str]:
    """What `set -a; . FILE` defines, for `names`, in a clean environment."""
    with tempfile.NamedTemporaryFile("w", suffix=".env", delete=False) as f:
        f.write(text)
    try:
        script = f'set -a; . "{f.name}" || exit 3; for n in {" ".join(names)}; do ' \
                 'if [ -n "${!n+x}" ]; then printf "%s\\0%s\\0" "$n" "${!n}"; fi; done'
        r = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], capture_output=True,
                           env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, timeout=10, check=True)
    finally:
        os.unlink(f.name)
    parts = r.stdout.decode().split("\0")[:-1]
    return dict(zip(parts[::2], parts[1::2], strict=True))


# ---------------------------------------------------------------------------------------------------
# Accepted syntax


def test_plain_file_with_comments_blank_lines_and_export() -> None:
    text = b"""# the stage environment

DJANGO_DEBUG=0
export DATABASE_URL=postgres://db/app   # inline comment
  INDENTED=yes
EMPTY=
HASH=#not-a-comment
PATHS=/a:/b:/c
"""
    env = parse_env_file(text)
    assert values(env) == {"DJANGO_DEBUG": "0", "DATABASE_URL": "postgres://db/app", "INDENTED": "yes",
                           "EMPTY": "", "HASH": "#not-a-comment", "PATHS": "/a:/b:/c"}
    assert env.names == ("DJANGO_DEBUG", "DATABASE_URL", "INDENTED", "EMPTY", "HASH", "PATHS")


def test_quotes_escapes_and_continuations() -> None:
    text = (b"SQ='a b $HOME `x` \\n'\n"
            b'DQ="a \\"b\\" \\$x \\\\ \\n \\`"\n'
            b"MIXED='a'\"b\"c\n"
            b"ML='line1\nline2'\n"
            b'CONT="a\\\nb"\n'
            b"UQ=a\\ b\\$\n"
            b"DOLLAR_END=x$\n"
            b'DQ_DOLLAR="cost: 5$"\n')
    env = parse_env_file(text)
    expected = {"SQ": "a b $HOME `x` \\n", "DQ": 'a "b" $x \\ \\n `', "MIXED": "abc", "ML": "line1\nline2",
                "CONT": "ab", "UQ": "a b$", "DOLLAR_END": "x$", "DQ_DOLLAR": "cost: 5$"}
    assert values(env) == expected
    assert bash_reads(text.decode(), list(expected)) == expected


def test_a_value_with_blank_after_equals_is_empty_then_a_comment() -> None:
    assert values(parse_env_file(b"A= # nothing\n")) == {"A": ""}


def test_repr_of_a_parsed_file_shows_names_only() -> None:
    env = parse_env_file(b"PASSWORD=hunter2-canary\n")
    assert "hunter2-canary" not in repr(env) and "hunter2-canary" not in str(env)
    assert "PASSWORD" in repr(env)


# ---------------------------------------------------------------------------------------------------
# Refusals: the line, the reason, never the value

REFUSED = [
    (b"A=1\nB=$(cat /etc/shadow)\n", 2, "$ outside single quotes"),
    (b"A=`id`\n", 1, "command substitution"),
    (b'A="x `id` y"\n', 1, "command substitution"),
    (b'A="${HOME}"\n', 1, "$ outside single quotes"),
    (b"A=$HOME\n", 1, "$ outside single quotes"),
    (b"A=$'\\x41'\n", 1, "$ outside single quotes"),
    (b"A=$((1+2))\n", 1, "$ outside single quotes"),
    (b"A=~/x\n", 1, "~"),
    (b"export A=x{1,2}\n", 1, "brace"),
    (b"A=b c\n", 1, "more than one word"),
    (b"A=b;reboot\n", 1, "shell operator"),
    (b"A=x|y\n", 1, "shell operator"),
    (b"A=(1 2)\n", 1, "shell operator"),
    (b"A = 1\n", 1, "blank between A and '='"),
    (b"\n\njust words\n", 3, "not an assignment"),
    (b"1A=x\n", 1, "not an assignment"),
    (b"export A\n", 1, "not an assignment"),
    (b"A='open\nB=2\n", 1, "unterminated single quote"),
    (b'A=1\nB="open\n\n', 2, "unterminated double quote"),
    (b"A=1\nB=2\nA=3\n", 3, "A is defined again (first on line 1)"),
    (b"A=1\r\nB=2\r\n", 1, "carriage return"),
    (b"A=1\nB=x\x00y\n", 2, "NUL"),
    (b"A=1\nB=x\x1by\n", 2, "control character"),
    (b"A=1\nB=\xff\xfe\n", 2, "not UTF-8"),
    (b"\xef\xbb\xbfA=1\n", 1, "byte order mark"),
    (b"A=x\\", 1, "ends with a backslash"),
]


@pytest.mark.parametrize(("raw", "line", "reason"), REFUSED)
def test_refused_with_the_line_and_the_reason(raw: bytes, line: int, reason: str) -> None:
    with pytest.raises(EnvFileError) as info:
        parse_env_file(raw, "s3://bucket/stage.env")
    assert info.value.line == line
    assert reason in info.value.reason
    assert str(info.value).startswith(f"s3://bucket/stage.env line {line}: ")


def test_oversized_file_is_refused_as_a_whole() -> None:
    with pytest.raises(EnvFileError) as info:
        parse_env_file(b"A='" + b"x" * (1024 * 1024) + b"'\n")
    assert info.value.line == 0 and "at most" in info.value.reason


# A generated secret carries a marker the parser's own words never contain at least every fifth
# character, so no six-character piece of it can show in a message without the marker showing.
_MARK = "\u00a4"
_secret_text = st.lists(
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"], exclude_characters=_MARK),
            min_size=1, max_size=4),
    min_size=2, max_size=10).map(lambda chunks: _MARK.join(chunks) + _MARK)


def test_the_marker_is_not_a_parser_word() -> None:
    assert _MARK not in Path(envfile_module.__file__).read_text()


@given(secret=_secret_text,
       wrap=st.sampled_from(["A=1\nB={s} extra\n", "A=1\nB=$({s})\n", "B=`{s}`\n", "B='{s}\n",
                             'B="{s}\n', "B={s}\nB={s}\n", "B={s};x\n", "B=\"{s}`\"\n", "B=x\r{s}\n",
                             "B={s}\x00\n", "B=$'{s}'\n", "{s}\n"]))
@example(secret="00t\u00a4file\u00a4", wrap="{s}\n")
@example(secret="envi\u00a4ronm\u00a4", wrap="B='{s}\n")
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_no_refusal_quotes_the_value(secret: str, wrap: str) -> None:
    raw = wrap.replace("{s}", secret).encode()
    try:
        parse_env_file(raw)
    except EnvFileError as e:
        message = f"{e} {e.reason} {e.where} {e!r}"
        assert secret not in message and _MARK not in message


# ---------------------------------------------------------------------------------------------------
# Differential: what the parser accepts means what bash makes of it

_names = st.from_regex(r"[A-Z_][A-Z0-9_]{0,8}", fullmatch=True).filter(
    lambda n: n not in ("PATH", "PWD", "SHLVL", "_", "OLDPWD", "IFS", "PS4", "OPTIND", "PPID", "UID",
                        "EUID", "BASH", "HOME", "SHELL") and not n.startswith("BASH"))
_plain = st.text(alphabet="abcXYZ019_-./:,=+@%^!*?[]#", min_size=1, max_size=6)
_anything = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"],
                                           exclude_characters="\x00\r"), max_size=8).filter(
    lambda s: not any((0 < ord(c) < 32 and c not in "\t\n") or c == "\x7f" for c in s))


@st.composite
def _word(draw: st.DrawFn) -> str:
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["plain", "single", "double", "escaped"]))
        if kind == "plain":
            parts.append(draw(_plain))
        elif kind == "single":
            parts.append("'" + draw(_anything).replace("'", "") + "'")
        elif kind == "double":
            body = draw(_anything)
            parts.append('"' + body.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
                         .replace("`", "\\`") + '"')
        else:
            parts.append("\\" + draw(st.sampled_from(list(" $`'\"\\|;&()<>~#a{}*"))))
    return "".join(parts)


@given(st.lists(st.tuples(_names, _word(), st.booleans(), st.booleans()), min_size=1, max_size=6,
                unique_by=lambda t: t[0]))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_accepted_files_mean_what_bash_makes_of_them(entries: list[tuple[str, str, bool, bool]]) -> None:
    lines = []
    for name, word, export, comment in entries:
        lines.append(("export " if export else "") + f"{name}={word}" + (" # note" if comment else ""))
    text = "# generated\n" + "\n".join(lines) + "\n"
    env = parse_env_file(text.encode())
    assert bash_reads(text, [n for n, *_ in entries]) == values(env)


@given(st.dictionaries(_names, _anything.filter(lambda s: "\x00" not in s), min_size=1, max_size=6))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_rendering_reads_back_the_same_values_in_norm_and_bash(variables: dict[str, str]) -> None:
    env = EnvFile({k: Secret(v) for k, v in variables.items()})
    raw = render(env, ["source: s3://b/k", 'etag: "abc"'])
    assert values(parse_env_file(raw)) == variables
    assert bash_reads(raw.decode(), list(variables)) == variables
    assert header_of(raw) == ["source: s3://b/k", 'etag: "abc"']


# ---------------------------------------------------------------------------------------------------
# Source of a written file


def test_the_written_file_names_its_source_and_reads_back() -> None:
    from norm.core.envfile import Source, object_key, source_of

    source = Source("djed-env", object_key("envs/{environment}.env", "stage"), '"0123abcd"')
    assert source.key == "envs/stage.env" and source.url == "s3://djed-env/envs/stage.env"
    raw = render(EnvFile({"A": Secret("1")}), [source.header()])
    assert source_of(raw) == source
    assert values(parse_env_file(raw)) == {"A": "1"}
    assert source_of(b"A=1\n") is None
    assert source_of(b"# norm-source: {not json\nA=1\n") is None
    assert source_of(b'# norm-source: {"bucket": "b", "key": "k"}\n') is None


def test_secret_values_read_both_ways() -> None:
    # Norm's own file (shell quoting) and a Docker --env-file (the text after '=' as it stands).
    assert secret_values(b"A='s3cret one'\nB=\"it's\"\n# C=comment\n") >= {"s3cret one", "it's"}
    assert secret_values(b"TOKEN=abc$(x) def\nEMPTY=\n") == {"abc$(x) def"}  # refused by the shell grammar
    assert secret_values(b"PASSWORD='pw'\n") >= {"'pw'", "pw"}
