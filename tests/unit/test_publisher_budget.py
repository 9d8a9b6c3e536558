"""The messages/s budget: pure token bucket, fan-out cost, fair share, penalty, FIFO gate."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.relay.budget import PACING_HEADROOM, MessageBudget, TokenBucket


def test_bucket_starts_full_then_refills_at_rate() -> None:
    b = TokenBucket(10.0, 5.0, now=0.0)
    assert b.wait_time(5, 0.0) == 0
    b.take(5, 0.0)
    assert b.wait_time(1, 0.0) == pytest.approx(0.1)
    assert b.wait_time(1, 0.1) == 0


def test_bucket_cost_above_burst_goes_negative() -> None:
    b = TokenBucket(10.0, 2.0, now=0.0)
    assert b.wait_time(4, 0.0) == 0  # waits only for a full bucket...
    b.take(4, 0.0)  # ...and then owes the rest
    assert b.wait_time(2, 0.0) == pytest.approx(0.4)


@given(
    rate=st.floats(1, 1000),
    costs=st.lists(st.integers(1, 5), min_size=1, max_size=300),
)
def test_bucket_never_exceeds_rate_times_time_plus_burst(rate: float, costs: list[int]) -> None:
    burst = max(rate * 0.25, 1.0)
    b = TokenBucket(rate, burst, now=0.0)
    now, spent = 0.0, 0
    for cost in costs:
        now += b.wait_time(cost, now)
        b.take(cost, now)
        spent += cost
    # Spending is bounded like Realtime needs it: burst + rate * elapsed (+ one cost).
    assert spent <= burst + rate * now + max(costs) + 1e-6


def test_fan_out_cost_and_fair_share() -> None:
    budget = MessageBudget(100, utilization=0.8, expected_subscribers=1, clock=lambda: 0.0)
    assert budget.cost_per_message == 2
    assert budget.messages_per_second() == pytest.approx(40)
    # 20 streams share 40 msg/s, with headroom: one flush every 20 / (40 * 0.9) s.
    assert budget.min_interval_s(20) == pytest.approx(20 / (40 * PACING_HEADROOM))
    assert budget.min_interval_s(1) < budget.min_interval_s(2)
    three = MessageBudget(100, utilization=0.8, expected_subscribers=3, clock=lambda: 0.0)
    assert three.messages_per_second() == pytest.approx(20)


def test_penalty_halves_then_recovers() -> None:
    now = [0.0]
    budget = MessageBudget(100, clock=lambda: now[0])
    budget.penalize()
    assert budget.rate() == pytest.approx(budget.full_rate / 2)
    now[0] = 30.0
    assert budget.full_rate / 2 < budget.rate() < budget.full_rate
    now[0] = 61.0
    assert budget.rate() == budget.full_rate


async def test_acquire_is_fifo_and_paced() -> None:
    # 20 units/s, 2 units per message: 10 msg/s; burst = 5 units.
    budget = MessageBudget(25, utilization=0.8, expected_subscribers=1)
    order: list[int] = []

    async def sender(i: int) -> None:
        await budget.acquire()
        order.append(i)

    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = [asyncio.create_task(sender(i)) for i in range(6)]
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    elapsed = loop.time() - start
    assert order == list(range(6))
    # 12 units with 5 in the bucket: at least 7 / 20 s of waiting.
    assert elapsed >= 0.3
    assert budget.waits >= 1
