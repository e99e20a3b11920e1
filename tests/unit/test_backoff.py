"""Backoff: delays grow by the factor, stop at the cap, and jitter stays within its fraction."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from norm.core.backoff import Backoff, renewal_retry

NAN = float("nan")


def test_defaults() -> None:
    b = Backoff()
    assert (b.first, b.factor, b.cap, b.jitter) == (0.1, 2.0, 5.0, 0.5)


def test_without_jitter_the_sequence_doubles_then_stays_at_the_cap() -> None:
    b = Backoff(first=0.1, factor=2.0, cap=5.0, jitter=0.0)
    delays = [b.delay(n, rand=0.7) for n in range(9)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0])


def test_default_rand_is_the_middle_of_the_jitter() -> None:
    b = Backoff(first=1.0, factor=2.0, cap=100.0, jitter=0.5)
    assert b.delay(0) == pytest.approx(0.75)
    assert b.delay(3) == pytest.approx(6.0)


def test_jitter_spans_from_one_minus_jitter_to_the_full_delay() -> None:
    b = Backoff(first=1.0, factor=3.0, cap=1000.0, jitter=0.25)
    assert b.delay(2, rand=0.0) == pytest.approx(9 * 0.75)
    assert b.delay(2, rand=0.999999) == pytest.approx(9.0, rel=1e-5)
    assert b.delay(2, rand=0.0) < b.delay(2, rand=0.5) < b.delay(2, rand=0.99)


def test_full_jitter_can_be_zero() -> None:
    assert Backoff(jitter=1.0).delay(5, rand=0.0) == 0.0


def test_factor_one_is_constant() -> None:
    b = Backoff(first=2.0, factor=1.0, cap=2.0, jitter=0.0)
    assert {b.delay(n) for n in range(100)} == {2.0}


def test_huge_attempts_stay_at_the_cap() -> None:
    b = Backoff(jitter=0.0)
    for n in (64, 65, 1000, 10**9, 10**30):
        assert b.delay(n) == b.cap


def test_zero_first_is_always_zero() -> None:
    b = Backoff(first=0.0, cap=0.0)
    assert [b.delay(n) for n in range(5)] == [0.0] * 5


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Backoff().cap = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"first": -0.1},
        {"factor": 0.99},
        {"factor": 0.0},
        {"factor": -2.0},
        {"first": 5.0, "cap": 4.9},
        {"jitter": -0.01},
        {"jitter": 1.01},
        {"jitter": NAN},
    ],
)
def test_invalid_parameters_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="backoff needs"):
        Backoff(**kwargs)


@pytest.mark.parametrize("attempt", [-1, -100])
def test_negative_attempt_refused(attempt: int) -> None:
    with pytest.raises(ValueError, match="attempt"):
        Backoff().delay(attempt)


@pytest.mark.parametrize("name", ["first", "factor", "cap"])
def test_nan_parameters_refused(name: str) -> None:
    with pytest.raises(ValueError):
        Backoff(**{name: NAN})


def test_large_factor_is_capped_not_overflowing() -> None:
    b = Backoff(first=0.1, factor=1e10, cap=5.0, jitter=0.0)
    assert b.delay(64) == 5.0


# ---------------------------------------------------------------------------------------------------
# Properties

valid = st.builds(
    lambda first, factor, extra, jitter: Backoff(first=first, factor=factor, cap=first + extra,
                                                 jitter=jitter),
    first=st.floats(0, 100),
    factor=st.floats(1, 10),
    extra=st.floats(0, 10_000),
    jitter=st.floats(0, 1),
)
rands = st.floats(0, 1, exclude_max=True)
attempts = st.integers(0, 10**6)


def le(a: float, b: float) -> bool:
    """a <= b up to rounding (relative, and absolute for subnormal numbers)."""
    return a <= b + abs(b) * 1e-12 + 1e-300


@settings(deadline=None)
@given(valid, attempts, rands)
def test_delay_is_within_the_jitter_band_and_the_cap(b: Backoff, attempt: int, rand: float) -> None:
    d = b.delay(attempt, rand)
    assert math.isfinite(d)
    base = min(b.cap, b.first * b.factor ** min(attempt, 64))
    assert d >= 0
    assert le(d, b.cap)
    assert le(base * (1 - b.jitter), d)
    assert le(d, base)


@settings(deadline=None)
@given(valid, st.integers(0, 200), rands)
def test_delays_never_shrink_as_attempts_grow(b: Backoff, attempt: int, rand: float) -> None:
    assert le(b.delay(attempt, rand), b.delay(attempt + 1, rand))


@settings(deadline=None)
@given(valid, attempts, rands, rands)
def test_delay_grows_with_rand(b: Backoff, attempt: int, r1: float, r2: float) -> None:
    lo, hi = sorted((r1, r2))
    assert le(b.delay(attempt, lo), b.delay(attempt, hi))


@settings(deadline=None)
@given(valid, st.integers(0, 64))
def test_without_jitter_delay_is_the_capped_exponential(b: Backoff, attempt: int) -> None:
    b = dataclasses.replace(b, jitter=0.0)
    assert b.delay(attempt, 0.3) == pytest.approx(min(b.cap, b.first * b.factor**attempt))


@settings(deadline=None)
@given(valid, st.integers(100, 10**9), rands)
def test_eventually_reaches_the_cap_when_growing(b: Backoff, attempt: int, rand: float) -> None:
    if b.first >= 1e-3 and b.factor >= 2:
        b0 = dataclasses.replace(b, jitter=0.0)
        assert b0.delay(attempt, rand) == b0.cap


@settings(deadline=None)
@given(
    st.one_of(
        st.builds(dict, first=st.floats(max_value=0, exclude_max=True, allow_nan=False)),
        st.builds(dict, factor=st.floats(max_value=1, exclude_max=True, allow_nan=False)),
        st.builds(dict, jitter=st.floats(min_value=1, exclude_min=True, allow_nan=False)),
        st.builds(dict, jitter=st.floats(max_value=0, exclude_max=True, allow_nan=False)),
        st.floats(0, 1000).flatmap(
            lambda first: st.builds(dict, first=st.just(first),
                                    cap=st.floats(max_value=first, exclude_max=True, allow_nan=False))),
    )
)
def test_any_invalid_parameter_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)


@settings(deadline=None)
@given(st.integers(max_value=-1))
def test_any_negative_attempt_is_refused(attempt: int) -> None:
    with pytest.raises(ValueError):
        Backoff().delay(attempt)


@given(ttl=st.integers(min_value=1, max_value=3600), attempt=st.integers(min_value=0, max_value=1000),
       rand=st.floats(min_value=0, max_value=1, exclude_max=True))
def test_a_lease_renewal_retry_waits_at_most_a_sixth_of_the_ttl_and_never_over_a_second(
        ttl: int, attempt: int, rand: float) -> None:
    delay = renewal_retry(ttl).delay(attempt, rand)
    assert 0 < delay <= min(1.0, ttl / 6)


def test_lease_renewal_retries_are_spread_at_random() -> None:
    retry = renewal_retry(10)
    assert retry.delay(5, 0.0) <= 0.25 and retry.delay(5, 0.999) > 0.99
