"""Who this host is, and what it tells the fleet about itself: pure data and its validation."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

from norm.core import values
from norm.core.errors import InvalidValue

_MACHINE_ID = re.compile(r"[0-9a-f]{32}")


def parse_machine_id(text: str, where: str) -> str:
    """The content of /etc/machine-id: 32 lowercase hex digits and an optional newline."""
    value = text.strip()
    if not _MACHINE_ID.fullmatch(value):
        raise InvalidValue(where, "a machine id is 32 lowercase hex digits")
    return value


_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
METADATA_TAGS = {"environment": ("environment", "Environment"), "role": ("role", "Role")}


def parse_label(text: str, where: str) -> str:
    """An environment or role name: 1 to 63 letters, digits, '_', '.' or '-'."""
    if not _LABEL.fullmatch(text):
        raise InvalidValue(where, "must be 1 to 63 letters, digits, '_', '.' or '-'")
    return text


def host_metadata(configured: dict[str, str], given: frozenset[str],
                  tags: dict[str, str | None]) -> tuple[dict[str, str], list[InvalidValue]]:
    """Environment and role: the configuration's where it was given, else the instance's tag (first of
    METADATA_TAGS[name] found), else the configuration's default. Returns the values and the tags
    refused (which change nothing)."""
    out = dict(configured)
    refused: list[InvalidValue] = []
    for name in configured:
        if name in given:
            continue
        for tag in METADATA_TAGS.get(name, ()):
            value = tags.get(tag)
            if value is None:
                continue
            try:
                out[name] = parse_label(value, f"instance tag {tag}")
            except InvalidValue as e:
                refused.append(e)
            break
    return out, refused


@dataclass(frozen=True)
class HostRecord:
    """What `<prefix>/hosts/<machine-id>` holds while the host's agent is alive."""

    machine_id: str
    name: str
    environment: str
    role: str
    agent_version: str
    release: str | None = None
    http: str | None = None
    started_at: float = 0.0
    instance_id: str | None = None  # from instance metadata, when read
    env_etag: str | None = None  # the ETag of the object the running environment file was made from

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes, where: str) -> HostRecord:
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise TypeError("not an object")
            fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
            record = cls(**fields)
            values.machine_id(record.machine_id, "machine_id")
            values.matching(record.environment, "environment", values.LABEL)
            values.matching(record.role, "role", values.LABEL)
            for name in ("name", "agent_version"):
                values.text(getattr(record, name), name, 255)
            for name, pattern in (("release", values.RELEASE_TEXT), ("instance_id", values.INSTANCE_ID)):
                if getattr(record, name) is not None:
                    values.matching(getattr(record, name), name, pattern)
            for name in ("http", "env_etag"):
                if getattr(record, name) is not None:
                    values.text(getattr(record, name), name, 255)
            if isinstance(record.started_at, bool) or not isinstance(record.started_at, int | float):
                raise TypeError("started_at")
            return record
        except (ValueError, TypeError, KeyError, RecursionError) as e:
            raise InvalidValue(where, f"not a host record ({type(e).__name__})") from None


def hosts_key(prefix: str, machine_id: str = "") -> str:
    return f"{prefix}/hosts/{machine_id}"


def leader_key(prefix: str) -> str:
    return f"{prefix}/leader"


def units_key(prefix: str, machine_id: str) -> str:
    """The host's unit summary, published by its healer on the agent's lease."""
    return f"{prefix}/units/{machine_id}"


def control_prefix(prefix: str, machine_id: str) -> str:
    """Where operators' requests for the host live (norm.services.control)."""
    return f"{prefix}/control/{machine_id}/"
