"""Host identity and the record each agent keeps in etcd: round trips, and garbage refused."""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from norm.core.errors import InvalidValue
from norm.core.host import HostRecord, hosts_key, leader_key, parse_machine_id

MID = "0123456789abcdef0123456789abcdef"
WHERE = "/etc/machine-id"

# ---------------------------------------------------------------------------------------------------
# parse_machine_id


@pytest.mark.parametrize("text", [MID, MID + "\n", "f" * 32, "0" * 32])
def test_machine_id_accepted(text: str) -> None:
    assert parse_machine_id(text, WHERE) == text.strip()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n",
        MID[:-1],
        MID + "0",
        MID.upper(),
        MID[:-1] + "g",
        MID[:16] + "-" + MID[16:],
        "{" + MID + "}",
        MID + "\n" + MID,
        MID[:16] + " " + MID[16:],
        MID[:-1] + "\u0660",  # an Arabic-Indic digit is not a hex digit
        "00000000-0000-0000-0000-000000000000",
    ],
)
def test_machine_id_refused(text: str) -> None:
    with pytest.raises(InvalidValue) as info:
        parse_machine_id(text, WHERE)
    assert info.value.where == WHERE
    assert WHERE in str(info.value)
    assert "32 lowercase hex digits" in info.value.reason
    if len(text) > 3:
        assert text.strip() not in str(info.value)


@settings(deadline=None)
@given(st.text(alphabet="0123456789abcdef", min_size=32, max_size=32), st.sampled_from(["", "\n"]))
def test_any_machine_id_accepted(mid: str, end: str) -> None:
    assert parse_machine_id(mid + end, WHERE) == mid


@settings(deadline=None)
@given(st.text())
def test_machine_id_parse_is_exact(text: str) -> None:
    valid = len(text.strip()) == 32 and all(c in "0123456789abcdef" for c in text.strip())
    try:
        got = parse_machine_id(text, WHERE)
    except InvalidValue as e:
        assert not valid
        assert e.where == WHERE
    else:
        assert valid
        assert got == text.strip()


# ---------------------------------------------------------------------------------------------------
# HostRecord

RECORD = HostRecord(machine_id=MID, name="web-1", environment="prod", role="django",
                    agent_version="0.1.0", release="v2", http="10.0.0.1:9847", started_at=1700000000.5)


def test_encode_is_sorted_json_of_every_field() -> None:
    data = json.loads(RECORD.encode())
    assert list(data) == sorted(data)
    assert data == {"machine_id": MID, "name": "web-1", "environment": "prod", "role": "django",
                    "agent_version": "0.1.0", "release": "v2", "http": "10.0.0.1:9847",
                    "started_at": 1700000000.5, "instance_id": None, "env_etag": None}


def test_encode_is_deterministic() -> None:
    assert RECORD.encode() == HostRecord(**json.loads(RECORD.encode())).encode()


def test_round_trip() -> None:
    assert HostRecord.decode(RECORD.encode(), "k") == RECORD


def test_optional_fields_default_when_absent() -> None:
    raw = json.dumps({"machine_id": MID, "name": "n", "environment": "e", "role": "r",
                      "agent_version": "1"}).encode()
    record = HostRecord.decode(raw, "k")
    assert (record.release, record.http, record.started_at) == (None, None, 0.0)


def test_unknown_fields_are_ignored() -> None:
    # A newer agent may add fields; an older one still reads the record.
    data = json.loads(RECORD.encode()) | {"added_later": [1, 2, 3]}
    assert HostRecord.decode(json.dumps(data).encode(), "k") == RECORD


GARBAGE = [
    b"",
    b" ",
    b"null",
    b"true",
    b"42",
    b'"a string"',
    b"[]",
    b"[1, 2]",
    b"{}",
    b"{",
    b"{'machine_id': 1}",
    b"\xff\xfe\x00",
    b"\x00" * 10,
    b"not json at all",
    b'{"machine_id": "x"}',
]


@pytest.mark.parametrize("raw", GARBAGE)
def test_decode_refuses_garbage(raw: bytes) -> None:
    with pytest.raises(InvalidValue) as info:
        HostRecord.decode(raw, "/norm/hosts/abc")
    assert info.value.where == "/norm/hosts/abc"
    assert "not a host record" in info.value.reason


@pytest.mark.parametrize("name", ["machine_id", "name", "environment", "role", "agent_version"])
@pytest.mark.parametrize("bad", [None, 5, 1.5, True, [], {}])
def test_decode_refuses_required_field_of_wrong_type(name: str, bad: object) -> None:
    data = json.loads(RECORD.encode()) | {name: bad}
    with pytest.raises(InvalidValue):
        HostRecord.decode(json.dumps(data).encode(), "k")


@pytest.mark.parametrize("name", ["machine_id", "name", "environment", "role", "agent_version"])
def test_decode_refuses_missing_required_field(name: str) -> None:
    data = json.loads(RECORD.encode())
    del data[name]
    with pytest.raises(InvalidValue):
        HostRecord.decode(json.dumps(data).encode(), "k")


def test_decode_error_does_not_quote_the_value() -> None:
    raw = b'{"machine_id": "sekrit-looking-value", "name": 7}'
    with pytest.raises(InvalidValue) as info:
        HostRecord.decode(raw, "k")
    assert "sekrit" not in str(info.value)


@pytest.mark.parametrize("name, bad", [("release", 5), ("http", []), ("started_at", "yesterday")])
def test_decode_refuses_optional_field_of_wrong_type(name: str, bad: object) -> None:
    data = json.loads(RECORD.encode()) | {name: bad}
    with pytest.raises(InvalidValue):
        HostRecord.decode(json.dumps(data).encode(), "k")


def test_decode_refuses_deeply_nested_json() -> None:
    with pytest.raises(InvalidValue):
        HostRecord.decode(b"[" * 100_000, "k")


texts = st.text(st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="\u2028\u2029"),
                max_size=255)
labels = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", fullmatch=True)
records = st.builds(
    HostRecord,
    machine_id=st.from_regex(r"[0-9a-f]{32}", fullmatch=True),
    name=texts,
    environment=labels,
    role=labels,
    agent_version=texts,
    release=st.none() | st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}(@sha256:[0-9a-f]{12})?",
                                      fullmatch=True),
    http=st.none() | texts,
    started_at=st.floats(allow_nan=False),
)


@pytest.mark.parametrize("name, bad", [
    ("machine_id", "../../rollout"), ("machine_id", MID.upper()), ("environment", "prod\nrole=x"),
    ("role", ""), ("role", "web;reboot"), ("release", "v2\nNORM_IMAGE=x"), ("release", "v2@latest"),
    ("name", "web\x1b[2J"), ("name", "w" * 256), ("agent_version", "\x00"), ("http", "h" * 256),
    ("instance_id", "i-nope"), ("env_etag", "\x1b]0;title\x07"),
])
def test_decode_refuses_values_outside_their_grammar(name: str, bad: object) -> None:
    data = json.loads(RECORD.encode()) | {name: bad}
    with pytest.raises(InvalidValue) as info:
        HostRecord.decode(json.dumps(data).encode(), "k")
    assert "reboot" not in str(info.value) and "NORM_IMAGE" not in str(info.value)


@settings(deadline=None)
@given(records)
def test_any_record_round_trips(record: HostRecord) -> None:
    raw = record.encode()
    assert isinstance(raw, bytes)
    assert HostRecord.decode(raw, "k") == record


@settings(deadline=None)
@given(st.binary())
def test_decode_of_any_bytes_is_a_record_or_invalid_value(raw: bytes) -> None:
    try:
        record = HostRecord.decode(raw, "k")
    except InvalidValue as e:
        assert e.where == "k"
    else:
        assert isinstance(record, HostRecord)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children, max_size=3),
    max_leaves=10,
)


@settings(deadline=None)
@given(st.dictionaries(st.sampled_from([*HostRecord.__dataclass_fields__, "other"]), json_values))
def test_decode_of_any_object_is_a_valid_record_or_invalid_value(data: dict[str, object]) -> None:
    try:
        record = HostRecord.decode(json.dumps(data).encode(), "k")
    except InvalidValue:
        return
    for name in ("machine_id", "name", "environment", "role", "agent_version"):
        assert isinstance(getattr(record, name), str)


# ---------------------------------------------------------------------------------------------------
# Keys


def test_keys() -> None:
    assert hosts_key("/norm") == "/norm/hosts/"
    assert hosts_key("/norm", MID) == f"/norm/hosts/{MID}"
    assert leader_key("/norm") == "/norm/leader"


@settings(deadline=None)
@given(st.text(alphabet=string.ascii_letters + "/-_", min_size=1).map(lambda s: "/" + s.strip("/")),
       st.text(alphabet="0123456789abcdef", min_size=32, max_size=32))
def test_host_keys_live_under_the_hosts_prefix(prefix: str, mid: str) -> None:
    assert hosts_key(prefix, mid).startswith(hosts_key(prefix))
    assert not leader_key(prefix).startswith(hosts_key(prefix))


def test_host_metadata_config_wins_where_it_spoke() -> None:
    from norm.core.host import host_metadata

    configured = {"environment": "prod", "role": "app"}
    tags: dict[str, str | None] = {"environment": "stage", "Role": "celery"}
    assert host_metadata(configured, frozenset(), tags) == ({"environment": "stage", "role": "celery"}, [])
    assert host_metadata(configured, frozenset({"environment"}), tags)[0] == {
        "environment": "prod", "role": "celery"}
    assert host_metadata(configured, frozenset(), {})[0] == configured  # no tags: the defaults


def test_host_metadata_refuses_bad_tags_and_keeps_the_config() -> None:
    from norm.core.host import host_metadata

    values, refused = host_metadata({"environment": "prod", "role": "app"}, frozenset(),
                                    {"environment": "st age;rm", "role": "web"})
    assert values == {"environment": "prod", "role": "web"}
    assert len(refused) == 1 and "instance tag environment" in str(refused[0])
    assert "rm" not in str(refused[0])


def test_host_record_with_instance_and_env_etag_round_trips() -> None:
    from norm.core.host import HostRecord

    record = HostRecord("a" * 32, "h1", "stage", "web", "0.1.0", instance_id="i-0123456789abcdef0",
                        env_etag='"abc"')
    assert HostRecord.decode(record.encode(), "k") == record
    old = b'{"machine_id": "' + b"a" * 32 + b'", "name": "h", "environment": "e", "role": "r", ' \
          b'"agent_version": "1"}'
    assert HostRecord.decode(old, "k").env_etag is None
