"""The messages/s budget: a weighted token bucket (pure) behind a FIFO async gate.

Why not `asyncio-throttle`: its `Throttler` counts one per `acquire` (a broadcast
costs 1 + subscribers), wakes every waiter every 10 ms to race for the slot (no
fairness: a stream with a deep queue can starve one with a single message), and
reads `time.monotonic` itself (no pure core to test). Here:

- `TokenBucket` is pure (`now` passed in), refills at `rate` units/s up to `burst`.
  Realtime averages its counter over 5 s ticks and closes channels at avg >= limit;
  the first tick averages over only 5 s, so a burst B adds B/5 to that average.
  The rate is `limit * utilization` and the burst a small fraction of a second, so
  even the first tick stays below the limit.
- `MessageBudget.acquire(cost)` waits in strict FIFO order (one `asyncio.Lock`, which
  is FIFO). Each topic's sender asks for one message at a time, so FIFO order is
  round-robin across topics: no stream starves.
- Fair share: `min_interval_s(n)` tells a stream how often it may flush when n
  streams are active, so that demand matches the budget and batches grow (more
  tokens per message) instead of queuing.
- `penalize(now)` halves the rate for a while after Realtime says "Too many messages
  per second" (someone else spends the quota too), then it recovers linearly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from worker.relay import metrics

PENALTY_FACTOR = 0.5  # rate multiplier right after a rate-limit signal
PENALTY_RECOVERY_S = 60.0  # back to the full rate this long after the last signal
BURST_S = 0.25  # bucket capacity, in seconds of rate
PACING_HEADROOM = 0.9  # flush pacing aims a bit below the rate, so queues do not build


class TokenBucket:
    """Weighted token bucket; pure. Costs may exceed the burst (the wait just grows)."""

    def __init__(self, rate_per_s: float, burst: float, now: float) -> None:
        if rate_per_s <= 0 or burst <= 0:
            raise ValueError("rate and burst must be > 0")
        self.rate = rate_per_s
        self.burst = burst
        self._level = burst
        self._at = now

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._level = min(self.burst, self._level + (now - self._at) * self.rate)
            self._at = now

    def wait_time(self, cost: float, now: float) -> float:
        """Seconds until `cost` units are available (0: now)."""
        self._refill(now)
        missing = min(cost, self.burst) - self._level
        return 0.0 if missing <= 0 else missing / self.rate

    def take(self, cost: float, now: float) -> None:
        """Spend `cost` units (the level may go negative for costs above the burst)."""
        self._refill(now)
        self._level -= cost

    def set_rate(self, rate_per_s: float, now: float) -> None:
        self._refill(now)
        self.rate = rate_per_s


class MessageBudget:
    """Shared messages/s budget of one worker process; counts fan-out per message."""

    def __init__(
        self,
        messages_per_second: float,
        *,
        utilization: float = 0.8,
        expected_subscribers: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = messages_per_second
        self.utilization = utilization
        self.cost_per_message = 1 + expected_subscribers
        self._clock = clock
        self.full_rate = messages_per_second * utilization
        self._bucket = TokenBucket(self.full_rate, max(self.full_rate * BURST_S, 1.0), clock())
        self._penalized_at: float | None = None
        self._lock = asyncio.Lock()
        self.waits = 0

    # --- fair share ---

    def rate(self, now: float | None = None) -> float:
        """Current spendable units/s (lower for a while after a rate-limit signal)."""
        now = self._clock() if now is None else now
        if self._penalized_at is None:
            return self.full_rate
        recovered = min(1.0, (now - self._penalized_at) / PENALTY_RECOVERY_S)
        if recovered >= 1.0:
            self._penalized_at = None
            return self.full_rate
        factor = PENALTY_FACTOR + (1 - PENALTY_FACTOR) * recovered
        return self.full_rate * factor

    def messages_per_second(self, now: float | None = None) -> float:
        """Messages/s this worker may send, fan-out counted."""
        return self.rate(now) / self.cost_per_message

    def min_interval_s(self, active_streams: int, now: float | None = None) -> float:
        """Shortest flush interval for one of `active_streams` streams sharing the budget."""
        per_stream = self.messages_per_second(now) * PACING_HEADROOM / max(1, active_streams)
        return 1.0 / per_stream

    def penalize(self, now: float | None = None) -> None:
        """Realtime said we (or others) exceed the quota: slow down for a while."""
        now = self._clock() if now is None else now
        self._penalized_at = now
        self._bucket.set_rate(self.rate(now), now)

    # --- spending ---

    async def acquire(self, messages: int = 1) -> float:
        """Wait (FIFO) until `messages` messages may be sent; return the time waited."""
        cost = messages * self.cost_per_message
        start = self._clock()
        # Yield once, so that a caller that loops on acquire() cannot drain the burst
        # before the other callers have even queued (FIFO needs them in the queue).
        await asyncio.sleep(0)
        async with self._lock:
            while True:
                now = self._clock()
                self._bucket.set_rate(self.rate(now), now)
                wait = self._bucket.wait_time(cost, now)
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            self._bucket.take(cost, self._clock())
        waited = self._clock() - start
        if waited > 0.001:
            self.waits += 1
            metrics.BUDGET_WAITS.inc()
            metrics.BUDGET_WAIT_SECONDS.observe(waited)
        return waited
