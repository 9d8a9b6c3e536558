"""Tenant rate counter, the pure core of Realtime's `RateCounter` (ref §6 "Mechanics").

A `GenCounter` is bumped as events happen; every tick (5 s) the pending count becomes a
bucket, the last 12 buckets (≤ 60 s) are kept, and `avg = sum / buckets / 5`. The limit
is triggered at `avg >= limit` and cleared below it, re-evaluated only at ticks, so the
first tick already averages over only 5 s.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

TICK_S = 5.0  # seconds of protocol time per bucket (ref §6)
MAX_BUCKETS = 12  # 12 x 5 s = the 60 s window (ref §6)


@dataclass
class RateCounter:
    limit: float
    tick_s: float = TICK_S
    max_buckets: int = MAX_BUCKETS
    pending: int = 0
    buckets: deque[int] = field(default_factory=deque)
    triggered: bool = False
    total: int = 0
    times_triggered: int = 0

    def add(self, n: int = 1) -> None:
        self.pending += n
        self.total += n

    def tick(self) -> bool:
        """Close the current bucket; returns whether the limit is now triggered."""
        self.buckets.append(self.pending)
        self.pending = 0
        while len(self.buckets) > self.max_buckets:
            self.buckets.popleft()
        was = self.triggered
        self.triggered = self.avg >= self.limit
        if self.triggered and not was:
            self.times_triggered += 1
        return self.triggered

    @property
    def avg(self) -> float:
        if not self.buckets:
            return 0.0
        return sum(self.buckets) / len(self.buckets) / self.tick_s
