"""The etcd adapter's pure decisions: the order a host tries the endpoints in, and which failures
tell against a member."""

from __future__ import annotations

from collections import Counter

import aetcd.exceptions as aex
import pytest
from hypothesis import given
from hypothesis import strategies as st

from norm.adapters.etcd import _member_trouble, endpoint_order

ENDPOINTS = ("http://e1:2379", "http://e2:2379", "http://e3:2379")


@given(seed=st.text(min_size=1, max_size=40))
def test_a_host_always_gets_the_same_order_of_the_same_endpoints(seed: str) -> None:
    order = endpoint_order(ENDPOINTS, seed)
    assert order == endpoint_order(ENDPOINTS, seed)
    assert sorted(order) == sorted(ENDPOINTS)


def test_a_fleet_spreads_over_the_members() -> None:
    firsts = Counter(endpoint_order(ENDPOINTS, f"{i:032x}")[0] for i in range(300))
    assert set(firsts) == set(ENDPOINTS)
    assert min(firsts.values()) > 60, firsts  # about 100 each


def test_without_a_seed_the_order_is_random() -> None:
    assert len({endpoint_order(ENDPOINTS, None) for _ in range(200)}) > 1


@pytest.mark.parametrize("error, against_the_member", [
    (TimeoutError(), True),
    (aex.ConnectionFailedError("etcdserver: no leader"), True),
    (aex.ConnectionTimeoutError("deadline exceeded"), True),
    (aex.WatchTimeoutError(), True),
    (aex.ClientError("etcdserver: requested lease not found"), False),
    (aex.PreconditionFailedError("failed precondition"), False),
    (ValueError("no"), False),
])
def test_only_failures_that_tell_against_the_member_count_towards_leaving_it(
        error: BaseException, against_the_member: bool) -> None:
    assert _member_trouble(error) is against_the_member
