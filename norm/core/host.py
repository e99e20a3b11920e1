"""Who this host is, and what it tells the fleet about itself: pure data and its validation."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, ClassVar

from norm.core import values, wire
from norm.core.errors import InvalidValue
from norm.core.wire import MachineId

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


_Text = Annotated[str, wire.text(255)]
_Label = Annotated[str, wire.matching(values.LABEL)]


@dataclass(frozen=True)
class HostRecord:
    """What `<prefix>/hosts/<machine-id>` holds while the host's agent is alive."""

    # A newer agent may add fields; an older one still reads the record.
    wire_tolerant: ClassVar[bool] = True

    machine_id: MachineId
    name: _Text
    environment: _Label
    role: _Label
    agent_version: _Text
    release: Annotated[str, wire.matching(values.RELEASE_TEXT)] | None = None
    http: _Text | None = None
    started_at: wire.AnyNumber = 0.0  # any number: what the record has always taken
    instance_id: Annotated[str, wire.matching(values.INSTANCE_ID)] | None = None  # from instance metadata
    env_etag: _Text | None = None  # the ETag of the object the running environment file was made from

    def encode(self) -> bytes:
        return wire.encode(self, compact=False)

    @classmethod
    def decode(cls, raw: bytes, where: str) -> HostRecord:
        """The record `raw` holds, strictly; InvalidValue naming the field at fault, never its value."""
        return wire.read(cls, raw, where, "host record")


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
