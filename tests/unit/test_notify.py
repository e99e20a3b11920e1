"""Notifications of rollout events: the notices a record transition makes, which webhooks want them,
the bodies they get, the `[[webhooks]]` tables, and that a URL never shows but its scheme and host."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from norm.core import notify
from norm.core.errors import ConfigError, InvalidValue
from norm.core.notify import (
    EVENTS,
    SEVERITY,
    Notice,
    OutboxEntry,
    Webhook,
    matches,
    notices_between,
    outbox_key,
    parse_webhooks,
    payload,
    quarantine_notice,
    redact_url,
    webhooks_toml,
)
from norm.core.record import Phase, Rollout

A, B = "a" * 32, "b" * 32
DIGEST = "sha256:" + "1" * 64
SECRET_URL = "https://hooks.slack.com/services/T000/B000/canary-secret-token"


def record(phase: Phase = Phase.PULL, *, revision: int = 7, at: float = 1000.0, reason: str | None = None,
           outcome: Phase | None = None) -> Rollout:
    return Rollout(revision=revision, tag="v2", hosts=(A, B), phase=phase, started_at=900.0, updated_at=at,
                   digest=None if phase is Phase.RESOLVE else DIGEST, reason=reason, outcome=outcome)


@dataclasses.dataclass(frozen=True)
class Pausable:
    """A stand-in for the record once it has its `paused` field."""

    revision: int
    tag: str
    phase: Phase
    updated_at: float
    reason: str | None = None
    paused: bool = False

    @property
    def terminal(self) -> bool:
        return self.phase in (Phase.DONE, Phase.FAILED, Phase.HALTED, Phase.SUPERSEDED, Phase.ROLLED_BACK)


@dataclasses.dataclass(frozen=True)
class Held:
    """A stand-in for a record that says why it is paused (`pause`) rather than whether."""

    base: Pausable
    pause: str | None

    def __getattr__(self, name: str) -> object:
        return getattr(self.base, name)


def events(notices: tuple[Notice, ...]) -> list[str]:
    return [n.event for n in notices]


# ---------------------------------------------------------------------------------------------------
# What a transition makes


def test_a_new_rollout_is_started() -> None:
    new = record(Phase.RESOLVE)
    notices = notices_between(None, new, 1234.5)
    assert events(notices) == ["rollout_started"]
    n = notices[0]
    assert (n.severity, n.rollout, n.tag, n.phase, n.at) == ("info", 7, "v2", "resolve", 1234.5)
    # A record of another rollout before it is no record of this one.
    assert events(notices_between(record(Phase.DONE, revision=5), new, 1.0)) == ["rollout_started"]


def test_a_phase_change_and_the_terminal_phases() -> None:
    pull, stop = record(Phase.PULL, at=1.0), record(Phase.STOP, at=2.0)
    assert events(notices_between(pull, stop, 3.0)) == ["phase_changed"]
    assert notices_between(pull, stop, 3.0)[0].phase == "stop"
    assert notices_between(pull, dataclasses.replace(pull, updated_at=5.0), 3.0) == ()
    for phase, event, severity in ((Phase.DONE, "done", "info"), (Phase.FAILED, "failed", "warning"),
                                   (Phase.HALTED, "halted", "critical"),
                                   (Phase.SUPERSEDED, "superseded", "info"),
                                   (Phase.ROLLED_BACK, "rolled_back", "warning")):
        end = record(phase, at=9.0, reason="why\nnot")
        got = notices_between(stop, end, 10.0)
        assert events(got) == ["phase_changed", event], phase
        assert got[1].severity == severity and got[1].reason == "why\nnot" and got[1].phase == phase.value
        # Once ended, writing the record again (a trimmed copy, say) tells nothing more.
        assert notices_between(end, dataclasses.replace(end, updated_at=11.0), 12.0) == ()


def test_paused_and_resumed_come_from_the_records_paused_field() -> None:
    running = Pausable(7, "v2", Phase.ROLL, 1.0)
    paused = dataclasses.replace(running, paused=True, updated_at=2.0, reason="asked by alice")
    resumed = dataclasses.replace(paused, paused=False, updated_at=3.0)
    got = notices_between(running, paused, 2.5)  # type: ignore[arg-type]
    assert events(got) == ["paused"] and got[0].reason == "asked by alice" and got[0].phase == "roll"
    assert got[0].text() == "[info] rollout 7 (v2): paused in phase roll: asked by alice"
    assert events(notices_between(paused, resumed, 3.5)) == ["resumed"]  # type: ignore[arg-type]
    # Started paused.
    assert events(notices_between(None, paused, 2.5)) == ["rollout_started", "paused"]  # type: ignore[arg-type]
    # The other shape: a `pause` reason, None while not paused.
    held = dataclasses.replace(running, paused=False)
    by_reason = [Held(held, None), Held(held, "paused by alice: watching the error rate"), Held(held, None)]
    got = notices_between(by_reason[0], by_reason[1], 1.0)  # type: ignore[arg-type]
    assert events(got) == ["paused"] and got[0].reason == "paused by alice: watching the error rate"
    assert events(notices_between(by_reason[1], by_reason[2], 1.0)) == ["resumed"]  # type: ignore[arg-type]
    # Records without either field are never paused.
    assert events(notices_between(record(Phase.PULL), record(Phase.ROLL), 1.0)) == ["phase_changed"]


def test_ids_are_deterministic_distinct_and_ordered_within_a_transition() -> None:
    stop, done = record(Phase.STOP, at=2.0), record(Phase.DONE, at=3.25)
    first = notices_between(stop, done, 10.0)
    again = notices_between(stop, done, 99.0)  # written again, later: the same keys
    assert [n.id for n in first] == [n.id for n in again] == ["7-3250000-0-phase_changed-done",
                                                                   "7-3250000-1-done-done"]
    # A clock that does not move keeps apart the transitions of other phases.
    same = [notices_between(record(Phase.PULL, at=2.0), record(p, at=2.0), 1.0)[0].id
            for p in (Phase.STOP, Phase.MIGRATE, Phase.START)]
    assert len(set(same)) == 3
    later = notices_between(done, record(Phase.DONE, at=3.5), 1.0)
    assert later == ()
    other = notices_between(record(Phase.PULL, at=1.0), stop, 1.0)
    assert {n.id for n in other}.isdisjoint(n.id for n in first)
    assert sorted(n.id for n in first) == [n.id for n in first]


@given(st.lists(st.sampled_from(list(Phase)), min_size=2, max_size=8))
def test_a_rollouts_notices_never_share_an_id(phases: list[Phase]) -> None:
    seen: set[str] = set()
    old: Rollout | None = None
    for i, phase in enumerate(phases):
        new = record(phase, at=100.0 + i)
        for n in notices_between(old, new, 1.0):
            assert n.id not in seen
            seen.add(n.id)
            assert SEVERITY[n.event] == n.severity
        old = new


def test_quarantine_notice() -> None:
    n = quarantine_notice(A, "djed-web.service", "failed 5 times in 60s", 50.5, host="web-1")
    assert (n.event, n.severity, n.host, n.unit, n.rollout) == ("unit_quarantined", "critical", "web-1",
                                                                "djed-web.service", None)
    assert n.id == f"{A}-50500000-4cfae33e" == quarantine_notice(A, "djed-web.service", None, 50.5).id
    assert quarantine_notice(A, "djed-api.service", None, 50.5).id != n.id
    # A host name is shown cleaned, never refused.
    assert quarantine_notice(A, "u", None, 1.0, host="web\x1b-1").host == "web?-1"
    with pytest.raises(ValueError, match="machine_id"):
        quarantine_notice("nope", "u", None, 1.0)


# ---------------------------------------------------------------------------------------------------
# The wire


def test_a_notice_and_an_entry_travel_through_etcd_strictly() -> None:
    n = notices_between(record(Phase.STOP), record(Phase.HALTED, reason="no migrator"), 5.0)[-1]
    assert Notice.decode(n.encode(), "k") == n
    entry = OutboxEntry(n, ("ops", "slack"))
    assert OutboxEntry.decode(entry.encode(), "k") == entry
    data = json.loads(n.encode())
    for bad, field in (({**data, "event": "exploded"}, "event"), ({**data, "severity": 3}, "severity"),
                       ({**data, "id": "../x"}, "id"), ({**data, "extra": 1}, "does not have"),
                       ({**data, "reason": "x" * 5000}, "reason"), ({**data, "tag": "a\x1b[2J"}, "tag")):
        with pytest.raises(InvalidValue, match=field) as info:
            Notice.decode(json.dumps(bad).encode(), "/norm/outbox/rollouts/x")
        assert "exploded" not in str(info.value) and "\x1b" not in str(info.value)
    with pytest.raises(InvalidValue, match="delivered"):
        OutboxEntry.decode(json.dumps({"notice": data, "delivered": ["a b"]}).encode(), "k")
    with pytest.raises(ValueError, match="event"):
        Notice("x", "exploded", "info", 1.0)  # type: ignore[arg-type]


def test_outbox_keys() -> None:
    assert outbox_key("/norm", "rollouts", "7-1-0") == "/norm/outbox/rollouts/7-1-0"
    assert outbox_key("/norm", A, f"{A}-1-0") == f"/norm/outbox/{A}/{A}-1-0"
    for source, nid in (("other", "1"), (A, "../x"), (A, ""), (A, "a/b")):
        with pytest.raises(ValueError):
            outbox_key("/norm", source, nid)


# ---------------------------------------------------------------------------------------------------
# Webhooks


def test_matches_by_event_and_severity() -> None:
    started = notices_between(None, record(Phase.RESOLVE), 1.0)[0]
    halted = notices_between(record(Phase.STOP), record(Phase.HALTED), 1.0)[-1]
    failed = notices_between(record(Phase.STOP), record(Phase.FAILED), 1.0)[-1]
    every = Webhook("all", "/etc/norm/all.url")
    assert matches(every, started) and matches(every, halted)
    grave = Webhook("pager", "/etc/norm/pager.url", min_severity="critical")
    assert not matches(grave, started) and not matches(grave, failed) and matches(grave, halted)
    warn = Webhook("warn", "/etc/norm/w.url", min_severity="warning")
    assert matches(warn, failed) and matches(warn, halted) and not matches(warn, started)
    only = Webhook("starts", "/etc/norm/s.url", events=("rollout_started", "halted"), min_severity="info")
    assert matches(only, started) and matches(only, halted) and not matches(only, failed)


def test_a_webhook_made_in_code_is_checked() -> None:
    for kw, field in (({"name": "a b"}, "name"), ({"url_file": "relative/path"}, "url_file"),
                      ({"url_file": "/etc/../x"}, "url_file"), ({"events": ("nope",)}, "events"),
                      ({"events": ("done", "done")}, "events"), ({"format": "xml"}, "format"),
                      ({"min_severity": "high"}, "min_severity")):
        with pytest.raises(ValueError, match=field):
            Webhook(**{"name": "ops", "url_file": "/etc/norm/ops.url", **kw})  # type: ignore[arg-type]


def test_payloads() -> None:
    halted = notices_between(record(Phase.MIGRATE), record(Phase.HALTED, reason="migrate <ran> & died"),
                             1700000000.0)[-1]
    body = json.loads(payload(Webhook("ops", "/etc/norm/ops.url"), halted))
    assert body == {**dataclasses.asdict(halted), "text": halted.text()}
    assert body["text"] == "[critical] rollout 7 (v2): halted: migrate <ran> & died"
    slack = json.loads(payload(Webhook("chat", "/etc/norm/chat.url", format="slack"), halted))
    assert slack == {"text": "[critical] rollout 7 (v2): halted: migrate &lt;ran&gt; &amp; died"}
    q = quarantine_notice(A, "djed-web.service", "failed\nagain", 1.0, host="web-1")
    assert q.text() == "[critical] unit djed-web.service quarantined on host web-1: failed again"
    started = notices_between(None, record(Phase.RESOLVE), 1.0)[0]
    assert started.text() == "[info] rollout 7 (v2): started"
    phase = notices_between(record(Phase.PULL), record(Phase.STOP), 1.0)[0]
    assert phase.text() == "[info] rollout 7 (v2): now in phase stop"


SAMPLE = """
[[webhooks]]
name = "ops"
url_file = "/etc/norm/webhooks/ops.url"

[[webhooks]]
name = "pager"
url_file = "/etc/norm/webhooks/pager.url"
format = "slack"
events = ["halted", "unit_quarantined"]
min_severity = "critical"
"""


def test_parse_webhooks_and_render_them_back() -> None:
    hooks = parse_webhooks(tomllib.loads(SAMPLE)["webhooks"], "policy.toml")
    assert hooks == (Webhook("ops", "/etc/norm/webhooks/ops.url"),
                     Webhook("pager", "/etc/norm/webhooks/pager.url", "slack", ("halted", "unit_quarantined"),
                             "critical"))
    text = webhooks_toml(hooks)
    assert parse_webhooks(tomllib.loads(text)["webhooks"], "x") == hooks
    assert notify.parse_webhooks_toml(text, "x") == hooks
    assert webhooks_toml(()) == "" and notify.parse_webhooks_toml("", "x") == ()


@pytest.mark.parametrize(("toml", "key", "reason"), [
    ('[[webhooks]]\nurl_file = "/x"', "webhooks[0].name", "missing"),
    ('[[webhooks]]\nname = "a"', "webhooks[0].url_file", "missing"),
    ('[[webhooks]]\nname = "a"\nurl_file = "/x"\nurl = "https://secret.example/t0ken"', "webhooks[0].url",
     "unknown key"),
    ('[[webhooks]]\nname = "a"\nurl_file = "secret/relative"', "webhooks[0].url_file", "absolute"),
    ('[[webhooks]]\nname = "a"\nurl_file = "/x"\nformat = "secretxml"', "webhooks[0].format",
     "must be one of json, slack"),
    ('[[webhooks]]\nname = "a"\nurl_file = "/x"\nmin_severity = "secret"', "webhooks[0].min_severity",
     "must be one of info, warning, critical"),
    ('[[webhooks]]\nname = "a"\nurl_file = "/x"\nevents = ["done", "secret"]', "webhooks[0].events[1]",
     "not an event"),
    ('[[webhooks]]\nname = "a"\nurl_file = "/x"\nevents = "done"', "webhooks[0].events", "expected a list"),
    ('[[webhooks]]\nname = "a"\nurl_file = "/x"\n[[webhooks]]\nname = "a"\nurl_file = "/y"',
     "webhooks[1].name", "named twice"),
    ('webhooks = ["secret"]', "webhooks[0]", "expected a table"),
    ('webhooks = "secret"', "webhooks", "expected [[webhooks]] tables"),
])
def test_bad_webhooks_are_refused_naming_the_key_never_the_value(toml: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        notify.parse_webhooks_toml(toml, "policy.toml")
    e = info.value
    assert (e.key, e.source) == (key, "policy.toml"), str(e)
    assert reason in e.reason
    assert "secret" not in str(e)


def test_redact_url_shows_scheme_and_host_only() -> None:
    assert redact_url(SECRET_URL) == "https://hooks.slack.com"
    assert redact_url("http://user:pw@127.0.0.1:8080/hook?token=x") == "http://127.0.0.1:8080"
    assert redact_url("https://[::1]:9/x") == "https://[::1]:9"
    assert redact_url("not a url secret") == "(not a URL)"
    assert redact_url("http://h:99999999/secret") == "(not a URL)"


def test_check_url_never_quotes_it() -> None:
    assert notify.check_url(SECRET_URL + "\n", "ops") == SECRET_URL
    for bad in ("ftp://host/secret", "secret", "http:///secret", "http://h/se cret", "http://h:x/secret"):
        with pytest.raises(ValueError, match="ops") as info:
            notify.check_url(bad, "ops")
        assert "secret" not in str(info.value)


def test_webhook_text() -> None:
    assert notify.webhook_text(Webhook("ops", "/etc/norm/ops.url")) == \
        "ops (json, info+, every event): /etc/norm/ops.url"
    assert notify.webhook_text(Webhook("p", "/x", "slack", ("halted", "done"), "critical")) == \
        "p (slack, critical+, halted, done): /x"


def test_every_event_has_a_severity() -> None:
    assert set(SEVERITY) == set(EVENTS) and set(SEVERITY.values()) == {"info", "warning", "critical"}


def test_an_outbox_entry_must_be_where_its_writer_puts_it() -> None:
    started = notices_between(None, record(Phase.RESOLVE), 1.0)[0]
    quarantined = quarantine_notice(A, "djed-web.service", None, 1.0)
    notify.check_entry_key("/norm", outbox_key("/norm", "rollouts", started.id), started)
    notify.check_entry_key("/norm", outbox_key("/norm", A, quarantined.id), quarantined)
    for key, n in ((outbox_key("/norm", A, started.id), started),  # a host's notice of a rollout
                   (outbox_key("/norm", "rollouts", quarantined.id), quarantined),
                   (outbox_key("/norm", B, quarantined.id), quarantined),  # another host's quarantine
                   (outbox_key("/norm", "rollouts", "7-1-0"), started),  # not its id
                   ("/other/outbox/rollouts/" + started.id, started),
                   (f"/norm/outbox/rollouts/x/{started.id}", started)):
        with pytest.raises(ValueError):
            notify.check_entry_key("/norm", key, n)


def test_the_documented_webhooks_parse() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "notifications.md").read_text()
    block = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    hooks = notify.parse_webhooks_toml(block, "docs/notifications.md")
    assert [h.name for h in hooks] == ["ops", "pager"] and hooks[1].events == ("halted", "unit_quarantined")
    examples = [b.split("```", 1)[0] for b in doc.split("```json\n")[1:]]
    assert [json.loads(e)["event"] for e in examples[:2]] == ["halted", "unit_quarantined"]
    assert set(json.loads(examples[0])) == {f.name for f in dataclasses.fields(Notice)} | {"text"}
