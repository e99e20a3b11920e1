"""Notifications of rollout events: what a record transition tells the outside (`Notice`), which
webhooks want it (`Webhook`, `matches`), the body each gets (`payload`), and where the notices wait in
etcd until the leader delivered them (`outbox_key`, `OutboxEntry`).

A notice is made where the event happens and in the same etcd transaction: the leader's notices
(`notices_between`) go with the record write that makes the transition, a host's (a unit quarantined,
`quarantine_notice`) with its own put. A new leader therefore never makes a notice again: it finds the
ones not yet delivered in the outbox. Each notice has an id that is the same whenever the same event
is written again (`<revision>-<micros>-<i>-<event>-<phase>` for a rollout's, `<machine id>-<micros>-<unit
hash>` for a host's), which every delivery carries as its Idempotency-Key (docs/notifications.md).

A webhook's URL often carries a secret (Slack's do), so the fleet's policy in etcd never holds it:
a webhook names the file, on every leader-eligible host, that holds the URL (`url_file`). Logs,
errors and metrics name a webhook by its `name`, and show at most `redact_url(url)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import tomllib
import types
import typing
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias

from norm.core import values, wire
from norm.core.errors import ConfigError
from norm.core.tomltext import toml_value

if TYPE_CHECKING:
    from norm.core.record import Rollout

Severity = Literal["info", "warning", "critical"]
Format = Literal["json", "slack"]
EventName = Literal["rollout_started", "phase_changed", "paused", "resumed", "rolled_back", "halted",
                    "failed", "done", "superseded", "unit_quarantined"]

# Each event and how grave it is.
SEVERITY: dict[str, Severity] = {
    "rollout_started": "info",
    "phase_changed": "info",
    "paused": "info",
    "resumed": "info",
    "rolled_back": "warning",
    "halted": "critical",
    "failed": "warning",
    "done": "info",
    "superseded": "info",
    "unit_quarantined": "critical",
}
EVENTS: tuple[str, ...] = typing.get_args(EventName)
SEVERITIES: tuple[str, ...] = typing.get_args(Severity)
FORMATS: tuple[str, ...] = typing.get_args(Format)
_RANK = {s: i for i, s in enumerate(SEVERITIES)}

# The event a rollout's terminal phase makes, besides phase_changed.
_TERMINAL_EVENTS: dict[str, str] = {
    "done": "done", "failed": "failed", "halted": "halted", "superseded": "superseded",
    "rolled_back": "rolled_back"}

ROLLOUTS_SOURCE = "rollouts"  # the outbox range of the leader's notices; a host's is its machine id
MAX_PATH = 4096
MAX_NOTICE_REASON = 2000  # a notice's reason is cut to this many characters
NOTICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
SOURCE = re.compile(r"rollouts|[0-9a-f]{32}")


def outbox_prefix(prefix: str) -> str:
    """Where every notice waits for the leader to deliver it."""
    return f"{prefix}/outbox/"


def source_prefix(prefix: str, source: str) -> str:
    """The outbox range of one writer: `rollouts` (the leader's) or a host's machine id."""
    return f"{outbox_prefix(prefix)}{_source(source, 'source')}/"


def outbox_key(prefix: str, source: str, notice_id: str) -> str:
    """`<prefix>/outbox/<source>/<notice id>`."""
    return source_prefix(prefix, source) + _notice_id(notice_id, "notice id")


# ---------------------------------------------------------------------------------------------------
# The grammar of each field: `check(value, name)` returns the value or raises naming `name`, never
# quoting the value


def _label(v: str, name: str) -> str:
    if not values.LABEL.fullmatch(values.string(v, name)):
        raise ValueError(f"{name}: must be 1 to 63 letters, digits, '_', '.' or '-'")
    return v


def _absolute_path(v: str, name: str) -> str:
    values.text(v, name, limit=MAX_PATH)
    if not v.startswith("/") or "\n" in v or "\t" in v:
        raise ValueError(f"{name}: must be an absolute path")
    if any(part == ".." for part in v.split("/")):
        raise ValueError(f"{name}: must not hold '..'")
    return v


def _event(v: str, name: str) -> str:
    if values.string(v, name) not in EVENTS:
        raise ValueError(f"{name}: not an event ({', '.join(EVENTS)})")
    return v


def _notice_id(v: str, name: str) -> str:
    if not NOTICE_ID.fullmatch(values.string(v, name)):
        raise ValueError(f"{name}: not a notice id")
    return v


def _source(v: str, name: str) -> str:
    if not SOURCE.fullmatch(values.string(v, name)):
        raise ValueError(f"{name}: must be 'rollouts' or a machine id")
    return v


Label: TypeAlias = Annotated[str, wire.Check(_label)]
AbsolutePath: TypeAlias = Annotated[str, wire.Check(_absolute_path)]
Event: TypeAlias = Annotated[str, wire.Check(_event)]
NoticeId: TypeAlias = Annotated[str, wire.Check(_notice_id)]
Note: TypeAlias = Annotated[str, wire.text(MAX_NOTICE_REASON)]
Short: TypeAlias = Annotated[str, wire.text(255)]


_CHECKS: dict[type[Any], tuple[tuple[str, bool, tuple[wire.Check, ...]], ...]] = {}


def _checked(obj: object) -> None:
    """The grammar checks the fields' annotations declare, run on a value made in code (on each item
    of a tuple), as the decoder runs them on what it reads."""
    cls = type(obj)
    if cls not in _CHECKS:
        hints = typing.get_type_hints(cls, include_extras=True)
        out = []
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            tp = hints[f.name]
            each = typing.get_origin(tp) is tuple
            if each:
                tp = typing.get_args(tp)[0]
            if typing.get_origin(tp) in (typing.Union, types.UnionType):
                tp = next(a for a in typing.get_args(tp) if a is not type(None))
            out.append((f.name, each, tuple(m for m in getattr(tp, "__metadata__", ())
                                            if isinstance(m, wire.Check))))
        _CHECKS[cls] = tuple(out)
    for name, each, checks in _CHECKS[cls]:
        value = getattr(obj, name)
        if value is None:
            continue
        if each and not isinstance(value, tuple):
            raise TypeError(f"{name}: expected a tuple")
        items = [(f"{name}[{i}]", v) for i, v in enumerate(value)] if each else [(name, value)]
        for path, v in items:
            for check in checks:
                check.fn(v, path)


def _one_of(v: object, allowed: tuple[str, ...], name: str) -> None:
    if not isinstance(v, str) or v not in allowed:
        raise ValueError(f"{name}: must be one of {', '.join(allowed)}")


# ---------------------------------------------------------------------------------------------------
# Webhooks


@dataclass(frozen=True)
class Webhook:
    """Where notices go: the URL is read from `url_file` on the leader when delivering, never kept in
    etcd. `events`: the events it wants (every one when empty); `min_severity`: the least grave it
    wants."""

    name: Label
    url_file: AbsolutePath
    format: Format = "json"
    events: tuple[Event, ...] = ()
    min_severity: Severity = "info"

    def __post_init__(self) -> None:
        _checked(self)
        _one_of(self.format, FORMATS, "format")
        _one_of(self.min_severity, SEVERITIES, "min_severity")
        if len(set(self.events)) != len(self.events):
            raise ValueError("events: an event is named twice")


WEBHOOK_FIELDS = tuple(f.name for f in dataclasses.fields(Webhook))


def matches(webhook: Webhook, notice: Notice) -> bool:
    """Whether `webhook` wants `notice`: one of its events (any, when it names none), and at least as
    grave as its `min_severity`."""
    if webhook.events and notice.event not in webhook.events:
        return False
    return _RANK[notice.severity] >= _RANK[webhook.min_severity]


def webhook_text(hook: Webhook) -> str:
    """One line for a webhook, as `norm policy` shows it: `name (format, severity+, events): url_file`."""
    events = ", ".join(hook.events) if hook.events else "every event"
    return f"{hook.name} ({hook.format}, {hook.min_severity}+, {events}): {hook.url_file}"


def parse_webhooks(tables: object, source: str) -> tuple[Webhook, ...]:
    """The webhooks of a TOML `[[webhooks]]` array (as tomllib reads it). Raises ConfigError naming
    `webhooks[i].key` and `source`, never quoting a value."""
    if not isinstance(tables, list):
        raise ConfigError("webhooks", source, "expected [[webhooks]] tables")
    out: list[Webhook] = []
    for i, table in enumerate(tables):
        where = f"webhooks[{i}]"
        if not isinstance(table, dict):
            raise ConfigError(where, source, "expected a table with name and url_file")
        for key in table:
            if key not in WEBHOOK_FIELDS:
                raise ConfigError(f"{where}.{key}", source,
                                  f"unknown key (known: {', '.join(WEBHOOK_FIELDS)})")
        try:
            hook = wire.decode(Webhook, table, where)
        except (ValueError, TypeError) as e:
            key, sep, reason = str(e).partition(": ")
            if not sep:
                raise ConfigError(where, source, str(e)) from None
            field = re.sub(r"\[[0-9]+\]$", "", key.rpartition(".")[2])
            allowed = {"format": FORMATS, "min_severity": SEVERITIES}.get(field)
            if allowed is not None and reason == "not one of the values allowed":
                reason = f"must be one of {', '.join(allowed)}"
            raise ConfigError(key if key.startswith(where) else f"{where}.{key}", source, reason) from None
        if any(h.name == hook.name for h in out):
            raise ConfigError(f"{where}.name", source, "a webhook is named twice")
        out.append(hook)
    return tuple(out)


def parse_webhooks_toml(text: str, source: str) -> tuple[Webhook, ...]:
    """The webhooks of a TOML file's `[[webhooks]]` array (none when it has none)."""
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError):
        raise ConfigError("-", source, "not valid TOML") from None
    return parse_webhooks(data.get("webhooks", []), source)


def webhooks_toml(hooks: tuple[Webhook, ...]) -> str:
    """The webhooks as `[[webhooks]]` tables that `parse_webhooks` reads back as the same ("" for
    none: the tables go after every top-level key of a file)."""
    lines: list[str] = []
    for h in hooks:
        lines += ["", "[[webhooks]]"] if lines else ["[[webhooks]]"]
        lines += [f"{name} = {toml_value(getattr(h, name))}" for name in WEBHOOK_FIELDS]
    return "\n".join(lines) + "\n" if lines else ""


def redact_url(url: str) -> str:
    """What may be shown of a URL: `scheme://host[:port]`, never its user, path or query (where the
    secrets are)."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "(not a URL)"
    if not parts.scheme or not host:
        return "(not a URL)"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


def check_url(url: str, where: str) -> str:
    """A webhook URL as read from its file (stripped): http or https with a host. Raises ValueError
    naming `where` (the webhook), never quoting the URL."""
    url = url.strip()
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port
    except ValueError:
        raise ValueError(f"{where}: not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{where}: not an http or https URL")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise ValueError(f"{where}: holds spaces or control characters")
    return url


# ---------------------------------------------------------------------------------------------------
# Notices


@dataclass(frozen=True)
class Notice:
    """One event, as it is delivered. `at` is the wall clock of the writer when it happened."""

    id: NoticeId
    event: EventName
    severity: Severity
    at: float
    rollout: int | None = None  # the rollout's revision
    tag: Short | None = None
    phase: Short | None = None
    reason: Note | None = None
    host: Short | None = None
    unit: Short | None = None

    def __post_init__(self) -> None:
        _checked(self)
        _one_of(self.event, EVENTS, "event")
        _one_of(self.severity, SEVERITIES, "severity")

    def encode(self) -> bytes:
        return wire.encode(self)

    @classmethod
    def decode(cls, raw: bytes, where: str) -> Notice:
        """The notice `raw` holds, strictly; InvalidValue naming the field at fault, never its value."""
        return wire.read(cls, raw, where, "notice")

    def text(self) -> str:
        """One line for people."""
        head = f"[{self.severity}]"
        if self.event == "unit_quarantined":
            line = f"{head} unit {self.unit or '?'} quarantined on host {self.host or '?'}"
        else:
            what = {"rollout_started": "started", "phase_changed": f"now in phase {self.phase}",
                    "paused": "paused", "resumed": "resumed"}.get(self.event, self.event.replace("_", " "))
            tag = f" ({self.tag})" if self.tag else ""
            line = f"{head} rollout {self.rollout}{tag}: {what}"
            if self.event in ("paused", "resumed") and self.phase:
                line += f" in phase {self.phase}"
        if self.reason:
            line += f": {self.reason}"
        return values.clean(line, MAX_NOTICE_REASON + 200).replace("\n", " ").replace("\t", " ")


@dataclass(frozen=True)
class OutboxEntry:
    """What an outbox key holds: the notice, and the webhooks it was delivered to (or refused by) so far,
    so that a new leader does not deliver it to them again."""

    notice: Notice
    delivered: tuple[Label, ...] = ()

    def encode(self) -> bytes:
        return wire.encode(self)

    @classmethod
    def decode(cls, raw: bytes, where: str) -> OutboxEntry:
        return wire.read(cls, raw, where, "outbox entry")


def _micros(t: float) -> int:
    return max(0, round(t * 1_000_000))


def _notice(nid: str, event: str, at: float, **fields: Any) -> Notice:
    return Notice(id=nid, event=event, severity=SEVERITY[event], at=at, **fields)  # type: ignore[arg-type]


def _reason(reason: str | None) -> str | None:
    return None if reason is None else values.clean(reason, MAX_NOTICE_REASON)


def _paused(r: Rollout) -> bool:
    """Whether an operator (or an analysis) holds the rollout: the record's `paused` flag, or a
    `pause` reason (the two shapes the record is given); a record with neither is never paused."""
    return bool(getattr(r, "paused", False)) or getattr(r, "pause", None) is not None


def _pause_reason(r: Rollout) -> str | None:
    why = getattr(r, "pause", None)
    return _reason(why) if isinstance(why, str) else _reason(r.reason)


def notices_between(old: Rollout | None, new: Rollout, now: float) -> tuple[Notice, ...]:
    """The notices a record transition from `old` (None, or a record of another rollout: none of this
    one yet) to `new` makes, in the order they happened. `old` is the record as etcd holds it.

    Ids are `<revision>-<micros of new.updated_at>-<i>-<event>-<phase>`: the same transition written
    again makes the same keys (the notices go in the transaction that writes `new`), and each
    transition its own as long as the record's `updated_at` moves (the event and the phase keep them
    apart if it does not). `now` (the writer's wall clock) is each notice's `at`."""
    base = f"{new.revision}-{_micros(new.updated_at)}"
    common: dict[str, Any] = {"rollout": new.revision, "tag": new.tag or None}
    events: list[tuple[str, dict[str, Any]]] = []
    now_at = {"phase": new.phase.value, "reason": _reason(new.reason)}
    if old is None or old.revision != new.revision:
        events.append(("rollout_started", {"phase": new.phase.value}))
        was_terminal = was_paused = False
    else:
        if old.phase is not new.phase:
            events.append(("phase_changed", now_at))
        was_terminal, was_paused = old.terminal, _paused(old)
    if new.terminal and not was_terminal:
        events.append((_TERMINAL_EVENTS[new.phase.value], now_at))
    paused = _paused(new)
    if paused != was_paused:
        events.append(("paused" if paused else "resumed", {"phase": new.phase.value,
                                                           "reason": _pause_reason(new)}))
    return tuple(_notice(f"{base}-{i}-{event}-{new.phase.value}", event, now, **{**common, **extra})
                 for i, (event, extra) in enumerate(events))


def quarantine_notice(machine_id: str, unit: str, reason: str | None, at: float,
                      host: str | None = None) -> Notice:
    """The notice of a unit the healer stopped trying to heal on host `machine_id` (shown as `host`,
    its name, when given). Its id is `<machine id>-<micros of at>-<first 8 hex digits of the unit's
    sha256>`: the same quarantine written again makes the same key."""
    values.machine_id(machine_id, "machine_id")
    unit_hash = hashlib.sha256(unit.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return _notice(f"{machine_id}-{_micros(at)}-{unit_hash}", "unit_quarantined", at,
                   host=values.clean(host or machine_id, 255), unit=values.clean(unit, 255),
                   reason=_reason(reason))


def check_entry_key(prefix: str, key: str, notice: Notice) -> None:
    """That an outbox entry is where its writer puts it: under its source, named by its id; a host's
    (under its machine id) only a quarantine of its own, the leader's (under `rollouts`) a rollout's.
    Raises ValueError naming what is wrong, never quoting it."""
    source, sep, nid = key.removeprefix(outbox_prefix(prefix)).partition("/")
    if not key.startswith(outbox_prefix(prefix)) or not sep or not SOURCE.fullmatch(source) \
            or nid != notice.id:
        raise ValueError("key: not the outbox key of the notice it holds")
    if (source == ROLLOUTS_SOURCE) == (notice.event == "unit_quarantined"):
        raise ValueError("event: not one its writer makes")
    if source != ROLLOUTS_SOURCE and not notice.id.startswith(f"{source}-"):
        raise ValueError("id: not one its writer makes")


# ---------------------------------------------------------------------------------------------------
# Payloads


def _slack_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def payload(webhook: Webhook, notice: Notice) -> bytes:
    """The body POSTed to `webhook`: the notice's fields and `text` (one line) as JSON, or for Slack
    a message of that line alone (`{"text": ...}`)."""
    if webhook.format == "slack":
        return wire.encode({"text": _slack_escape(notice.text())})
    return wire.encode({**dataclasses.asdict(notice), "text": notice.text()})
