"""The one retry policy: backoff bounds, then split, then park; nothing is ever dropped."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.backoff import backoff_delay
from worker.relay.retry import Action, RetryPolicy


def test_backoff_doubles_with_equal_jitter_and_caps() -> None:
    assert backoff_delay(0, base_s=0.1, cap_s=15) == 0
    assert backoff_delay(1, base_s=0.1, cap_s=15, rand=lambda: 0.0) == pytest.approx(0.05)
    assert backoff_delay(1, base_s=0.1, cap_s=15, rand=lambda: 1.0) == pytest.approx(0.1)
    assert backoff_delay(3, base_s=0.1, cap_s=15, rand=lambda: 1.0) == pytest.approx(0.4)
    assert backoff_delay(50, base_s=0.1, cap_s=15, rand=lambda: 1.0) == pytest.approx(15)
    assert backoff_delay(10_000, base_s=0.1, cap_s=15, rand=lambda: 0.5) <= 15


@given(attempt=st.integers(1, 200), r=st.floats(0, 1))
def test_backoff_is_within_half_and_full_ceiling(attempt: int, r: float) -> None:
    ceiling = min(15.0, 0.1 * 2.0 ** min(attempt - 1, 62))
    d = backoff_delay(attempt, base_s=0.1, cap_s=15.0, rand=lambda: r)
    assert ceiling / 2 - 1e-9 <= d <= ceiling + 1e-9


def test_three_retries_then_split_then_park() -> None:
    policy = RetryPolicy(max_retries=3, base_s=0.1, cap_s=15)
    actions = [policy.on_failure(n, splittable=True, is_piece=False).action for n in (1, 2, 3, 4)]
    assert actions == [Action.RETRY, Action.RETRY, Action.RETRY, Action.SPLIT]
    # A one-token batch or a control event cannot split: it is parked (kept), not dropped.
    assert policy.on_failure(4, splittable=False, is_piece=False).action is Action.PARK
    # Pieces of the fallback are parked at their first failure, with a capped delay.
    piece = policy.on_failure(1, splittable=False, is_piece=True)
    assert piece.action is Action.PARK and 0 < piece.delay_s <= 0.1
    assert policy.on_failure(100, splittable=False, is_piece=True).delay_s <= 15


def test_zero_retries_goes_straight_to_the_fallback() -> None:
    policy = RetryPolicy(max_retries=0, base_s=0.1, cap_s=15)
    assert policy.on_failure(1, splittable=True, is_piece=False).action is Action.SPLIT
