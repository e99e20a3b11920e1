"""Who this host is, and what it tells the fleet about itself: pure data and its validation."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

from norm.core.errors import InvalidValue

_MACHINE_ID = re.compile(r"[0-9a-f]{32}")


def parse_machine_id(text: str, where: str) -> str:
    """The content of /etc/machine-id: 32 lowercase hex digits and an optional newline."""
    value = text.strip()
    if not _MACHINE_ID.fullmatch(value):
        raise InvalidValue(where, "a machine id is 32 lowercase hex digits")
    return value


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
            for name in ("machine_id", "name", "environment", "role", "agent_version"):
                if not isinstance(getattr(record, name), str):
                    raise TypeError(name)
            for name in ("release", "http"):
                if not isinstance(getattr(record, name), str | None):
                    raise TypeError(name)
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
