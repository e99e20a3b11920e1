"""The update's health gate as pure decisions, and an image's declared migrations."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from norm.core.gate import (
    MIGRATIONS_LABEL,
    ContainerCheck,
    Failed,
    GateSpec,
    HttpCheck,
    Observation,
    Passed,
    Pending,
    cleaned,
    declared_migrations,
    healthy,
    migrations_of,
    observe,
    observe_all,
    output_of,
    secrets_of_url,
    start,
    verdict,
)

WEB, API, WORKER = "djed-web.service", "djed-api.service", "djed-worker.service"
SPEC = GateSpec(units=(WEB, API, WORKER), min_healthy=3.0, healthy_deadline=10.0,
                with_url=frozenset({WEB, API}), with_container=frozenset({WEB, API}))
RUNNING = ContainerCheck(found=True, running=True)


def ok(unit: str, inv: str = "i1", *, http: int | None = 200,
       container: ContainerCheck | None = RUNNING) -> Observation:
    return Observation(unit, active=True, invocation=inv, state="active",
                       http=None if http is None else HttpCheck(http), container=container)


def down(unit: str, state: str = "failed (exit-code)") -> Observation:
    return Observation(unit, active=False, invocation=None, state=state)


def all_ok(inv: str = "i1") -> list[Observation]:
    return [ok(WEB, inv), ok(API, inv), ok(WORKER, inv, http=None, container=None)]


def test_passes_only_after_every_unit_was_healthy_min_healthy_seconds() -> None:
    s = start(SPEC, 100.0)
    assert isinstance(verdict(SPEC, s, 100.0), Pending)
    s = observe_all(SPEC, s, all_ok(), 100.5)
    v = verdict(SPEC, s, 100.5)
    assert v == Pending(pass_at=103.5)
    s = observe_all(SPEC, s, all_ok(), 103.0)
    assert isinstance(verdict(SPEC, s, 103.0), Pending)
    s = observe_all(SPEC, s, all_ok(), 103.5)
    assert verdict(SPEC, s, 103.5) == Passed(seconds=3.5)


def test_a_unit_without_url_or_container_only_needs_to_be_active() -> None:
    spec = GateSpec(units=(WORKER,), min_healthy=1.0, healthy_deadline=5.0)
    s = observe(spec, start(spec, 0.0), Observation(WORKER, True, "i1", "active"), 0.0)
    s = observe(spec, s, Observation(WORKER, True, "i1", "active"), 1.0)
    assert verdict(spec, s, 1.0) == Passed(seconds=1.0)


def test_min_healthy_zero_passes_at_the_first_healthy_round() -> None:
    spec = GateSpec(units=(WEB,), min_healthy=0.0, healthy_deadline=5.0, with_url=frozenset({WEB}))
    s = observe(spec, start(spec, 0.0), ok(WEB), 0.2)
    assert verdict(spec, s, 0.2) == Passed(seconds=0.2)


@pytest.mark.parametrize("obs", [
    ok(WEB, http=500), ok(WEB, http=None), ok(WEB, http=301),
    Observation(WEB, True, "i1", "active", HttpCheck(None, "timeout"), RUNNING),
    ok(WEB, container=ContainerCheck(found=False)),
    ok(WEB, container=ContainerCheck(found=True, running=False)),
    ok(WEB, container=ContainerCheck(found=True, running=True, health="starting")),
    ok(WEB, container=ContainerCheck(found=True, running=True, health="unhealthy", output="boom")),
    ok(WEB, container=None),
    down(WEB), Observation(WEB, active=True, invocation=None),
])
def test_what_is_not_healthy(obs: Observation) -> None:
    assert not healthy(SPEC, obs)


def test_docker_healthy_and_no_healthcheck_are_healthy() -> None:
    assert healthy(SPEC, ok(WEB, container=ContainerCheck(found=True, running=True, health="healthy")))
    assert healthy(SPEC, ok(WEB, container=ContainerCheck(found=True, running=True, health="none")))


def test_a_failure_resets_the_units_clock() -> None:
    s = observe_all(SPEC, start(SPEC, 0.0), all_ok(), 0.0)
    s = observe(SPEC, s, ok(WEB, http=503), 2.0)
    assert s.clock(WEB).healthy_since is None and s.clock(API).healthy_since == 0.0
    s = observe_all(SPEC, s, all_ok(), 2.5)
    assert verdict(SPEC, s, 2.5) == Pending(pass_at=5.5)
    s = observe_all(SPEC, s, all_ok(), 5.5)
    assert verdict(SPEC, s, 5.5) == Passed(seconds=5.5)


def test_a_restart_between_rounds_resets_the_clock() -> None:
    s = observe_all(SPEC, start(SPEC, 0.0), all_ok("i1"), 0.0)
    s = observe(SPEC, s, ok(API, "i2"), 2.9)  # healthy, but a new run: it restarted meanwhile
    assert s.clock(API).healthy_since == 2.9
    s = observe_all(SPEC, s, [ok(WEB), ok(WORKER, http=None, container=None)], 3.0)
    assert verdict(SPEC, s, 3.0) == Pending(pass_at=5.9)


def test_fails_at_the_deadline_naming_the_unit_and_its_output() -> None:
    s = start(SPEC, 0.0)
    t = 0.0
    while True:
        s = observe_all(SPEC, s, [ok(WEB, http=500), ok(API), ok(WORKER, http=None, container=None)], t)
        v = verdict(SPEC, s, t)
        if not isinstance(v, Pending):
            break
        t += 0.5
    assert isinstance(v, Failed)
    # Failure is certain once less than min_healthy is left before the deadline.
    assert t == pytest.approx(SPEC.healthy_deadline - SPEC.min_healthy + 0.5)
    assert v.unit == WEB and v.output == "HTTP 500"
    assert v.reason == f"{WEB} not healthy within 10s: HTTP 500"


def test_without_any_observation_it_fails_once_the_deadline_has_passed() -> None:
    spec = GateSpec(units=(WEB,), min_healthy=0.0, healthy_deadline=5.0)
    s = start(spec, 0.0)
    assert isinstance(verdict(spec, s, 5.0), Pending)
    v = verdict(spec, s, 5.1)
    assert isinstance(v, Failed) and v.unit == WEB and v.output == "not observed yet"


def test_healthy_long_enough_only_past_the_deadline_is_too_late() -> None:
    spec = GateSpec(units=(WEB,), min_healthy=1.0, healthy_deadline=3.0, with_url=frozenset({WEB}))
    s = observe(spec, start(spec, 0.0), ok(WEB), 2.0)
    assert verdict(spec, s, 2.0) == Pending(pass_at=3.0)
    s = observe(spec, s, ok(WEB), 4.0)  # a slow round: it ended past the deadline
    assert verdict(spec, s, 4.0) == Failed(seconds=4.0, unit=WEB, output="HTTP 200",
                                           reason=f"{WEB} seen healthy for 1s only after 3s")


def test_a_flapping_unit_fails_with_its_last_failure() -> None:
    s = start(SPEC, 0.0)
    t, v = 0.0, verdict(SPEC, s, 0.0)
    n = 0
    while isinstance(v, Pending):
        web = ok(WEB, f"i{n // 4}")  # a new run every 2 s: never 3 s healthy
        s = observe_all(SPEC, s, [web, ok(API), ok(WORKER, http=None, container=None)], t)
        v = verdict(SPEC, s, t)
        t, n = t + 0.5, n + 1
    assert isinstance(v, Failed) and v.unit == WEB
    assert "without a break" in v.reason


def test_docker_health_output_is_cleaned_cut_and_redacted() -> None:
    secret = "s3cr3t-token"
    box = ContainerCheck(found=True, running=True, health="unhealthy", exit_code=1,
                         output=f"GET /healthz?token={secret}\x1b[31m failed\n" + "x" * 1000)
    spec = GateSpec(units=(WEB,), min_healthy=1.0, healthy_deadline=2.0, with_container=frozenset({WEB}))
    s = observe(spec, start(spec, 0.0), ok(WEB, container=box), 1.5)
    v = verdict(spec, s, 1.5, secrets=[secret])
    assert isinstance(v, Failed)
    assert secret not in v.output and secret not in v.reason and "\x1b" not in v.output
    assert v.output.startswith("docker health unhealthy (exit 1): GET /healthz?token=[redacted]?[31m failed")
    assert len(v.output) <= 300 and len(v.reason) <= 300


def test_what_each_check_says() -> None:
    assert HttpCheck(503).text == "HTTP 503" and HttpCheck(None, "timeout").text == "no answer: timeout"
    assert ContainerCheck(found=False).text == "no container"
    assert ContainerCheck(found=False, error="DockerUnavailable").text == "docker: DockerUnavailable"
    assert not ContainerCheck(found=True, running=True, error="x").ok
    assert ContainerCheck(found=True, running=False).text == "container not running"
    assert ContainerCheck(found=True, running=True, health="starting").text == "docker health starting"
    box = ContainerCheck(found=True, running=True, health="unhealthy", output=" bad \n", exit_code=2)
    obs = Observation(WEB, True, "i1", "active", HttpCheck(200), box)
    assert output_of(SPEC, obs) == "docker health unhealthy (exit 2): bad"
    assert output_of(SPEC, ok(WEB)) == "HTTP 200; container running"
    assert output_of(SPEC, ok(WORKER, http=None, container=None)) == "unit active"
    assert output_of(SPEC, down(WEB)) == "unit failed (exit-code)"
    assert output_of(SPEC, Observation(WEB, True, "i1", "active")) == (
        "health URL not asked yet; container not inspected yet")


def test_url_secrets() -> None:
    assert secrets_of_url("http://u:pw@h:1/x?token=abc#f") == ("http://u:pw@h:1/x?token=abc#f", "u:pw",
                                                              "token=abc")
    assert secrets_of_url("http://h/healthz") == ("http://h/healthz",)
    assert cleaned("see http://h/x?token=abcd", ["token=abcd"]) == "see http://h/x?[redacted]"


def test_spec_is_checked() -> None:
    with pytest.raises(ValueError):
        GateSpec(units=(), min_healthy=1, healthy_deadline=2)
    with pytest.raises(ValueError):
        GateSpec(units=(WEB, WEB), min_healthy=1, healthy_deadline=2)
    with pytest.raises(ValueError):
        GateSpec(units=(WEB,), min_healthy=3, healthy_deadline=2)
    with pytest.raises(ValueError):
        observe(SPEC, start(SPEC, 0), ok("other.service"), 0)


# -- properties: against a model that keeps every observation --------------------------------------

round_ = st.tuples(
    st.floats(min_value=0.01, max_value=2.0),  # time since the round before
    st.lists(st.tuples(st.booleans(), st.integers(0, 2)), min_size=2, max_size=2),  # (healthy, run)
)


@given(st.floats(0, 5), st.floats(0, 10), st.lists(round_, max_size=40))
def test_the_verdict_matches_a_model_of_every_round(
        min_healthy: float, extra: float, rounds: list[tuple[float, list[tuple[bool, int]]]]) -> None:
    spec = GateSpec(units=(WEB, API), min_healthy=min_healthy, healthy_deadline=min_healthy + extra,
                    with_url=frozenset({WEB, API}))
    s = start(spec, 0.0)
    t = 0.0
    history: dict[str, list[tuple[float, bool, int]]] = {WEB: [], API: []}
    for gap, obs in rounds:
        t += gap
        for unit, (good, run) in zip((WEB, API), obs, strict=True):
            history[unit].append((t, good, run))
            s = observe(spec, s, ok(unit, f"i{run}", http=200 if good else 500), t)
        v = verdict(spec, s, t)

        def streak_start(unit: str) -> float | None:
            # The model: the first moment of the last run of healthy observations in one invocation.
            since = None
            last_run = None
            for at, good, run in history[unit]:
                if not good:
                    since, last_run = None, None
                elif since is None or run != last_run:
                    since, last_run = at, run
            return since

        starts = {u: streak_start(u) for u in (WEB, API)}
        passed = t <= spec.healthy_deadline and all(x is not None and t - x >= min_healthy
                                                    for x in starts.values())
        if passed:
            assert v == Passed(seconds=t)
            return
        earliest = max((x if x is not None else t) + min_healthy for x in starts.values())
        if earliest <= spec.healthy_deadline and t <= spec.healthy_deadline:
            assert v == Pending(pass_at=earliest)
        else:
            assert isinstance(v, Failed)
            assert v.unit in (WEB, API)
            # The unit named was not healthy long enough, unless every one was, but too late.
            start_of = starts[v.unit]
            assert t > spec.healthy_deadline or start_of is None or t - start_of < min_healthy
            return


# -- an image's declared migrations ----------------------------------------------------------------

@pytest.mark.parametrize(("value", "kind"), [
    ("none", "none"), ("expand", "expand"), ("breaking", "breaking"), (" Breaking\n", "breaking"),
])
def test_the_migrations_label(value: str, kind: str) -> None:
    assert migrations_of({MIGRATIONS_LABEL: value, "other": "x"}) == kind
    assert declared_migrations({MIGRATIONS_LABEL: value}).problem is None


def test_no_label_is_undeclared() -> None:
    assert migrations_of({}) is None and migrations_of(None) is None
    assert declared_migrations({"org.opencontainers.image.version": "v1"}).problem is None


@given(st.text(max_size=200))
def test_anything_else_is_undeclared_with_a_reason(value: str) -> None:
    d = declared_migrations({MIGRATIONS_LABEL: value})
    if value.strip().lower() in ("none", "expand", "breaking"):
        assert d.kind == value.strip().lower() and d.problem is None
    else:
        assert d.kind is None and d.problem is not None
        assert MIGRATIONS_LABEL in d.problem and len(d.problem) < 200
        assert not any(0 < ord(c) < 32 and c not in "\t\n" for c in d.problem)
