"""The order a host tries the etcd endpoints in."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from norm.adapters.etcd import endpoint_order

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
