"""20 fast streams under a 100 msg/s budget (the issue's load test, shortened).

The full 60 s run is `python -m bench.bench_budget` (bench/RESULTS-budget.md). Here the
server runs with its real 5 s rate ticks for ~8 s, which covers its first tick (the
one that averages over only 5 s, the easiest to trip)."""

from __future__ import annotations

import pytest

from bench.bench_budget import run_load

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:ConnectionClosed.* is deprecated:DeprecationWarning"),
]


async def test_twenty_fast_streams_stay_under_the_budget_and_arrive_complete() -> None:
    report = await run_load(streams=20, tokens_per_s=500, seconds=7, budget=100, grace_s=15)
    print()
    print(report.line())
    print(f"messages/s (sends + deliveries): {report.messages_per_s:.1f}")
    print(f"p99 token latency: {report.p99_latency_s * 1000:.0f} ms")
    assert report.tokens == 20 * 3500
    assert report.complete_streams == 20 and report.undelivered_tokens == 0
    assert report.rate_limit_triggered == 0 and report.rate_limit_shutdowns == 0
    assert report.messages_per_s < 100
    # Demand (20 x 25 msg/s at batches of 20) is 10x the budget: batches had to grow.
    assert report.messages_per_token < 1 / 20 / 4
