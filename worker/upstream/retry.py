"""Retry policy before the first token, and a circuit breaker per provider. Pure.

One classifier (`RetryPolicy.delay_for`), the delay generator (`worker.backoff`), and the
one loop lives in `client.py` (websockets' `process_exception` + `backoff` split).
Time is passed in (`now`), randomness injected (`rng`), so tests need no clock.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from loguru import logger

from worker.backoff import backoff_delay
from worker.errors import UpstreamError

RETRY_AFTER_JITTER = 0.1  # up to +10 %, so clients told the same Retry-After spread out


@dataclass(frozen=True)
class RetryPolicy:
    retries: int
    base_s: float
    cap_s: float
    rng: Callable[[], float] = field(default=random.random)

    def delay_for(self, error: UpstreamError, attempt: int) -> float | None:
        """Seconds to wait before retry number `attempt + 1`, or None: do not retry here.

        A provider that asks us to wait longer than the cap is not retried: the
        caller moves on to the fallback provider (or fails) with `retry_after_s` set.
        """
        if not error.retryable or attempt >= self.retries:
            return None
        if error.retry_after_s is not None:
            if error.retry_after_s > self.cap_s:
                return None
            return error.retry_after_s * (1 + RETRY_AFTER_JITTER * self.rng())
        return backoff_delay(attempt + 1, base_s=self.base_s, cap_s=self.cap_s, rand=self.rng)


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Consecutive retryable failures open it; after `reset_s` one trial may pass.

    Two kinds are counted apart. Refusals (no output) stop being consecutive once the
    provider answers any request (`record_answered`, at a first output): counted only
    when streams ended, a few quick refusals among many streams started together
    opened it against a provider that was serving them. Breaks (a failure after
    output) stop only when a stream completes (`record_success`), so a provider that
    answers and then drops every stream still opens it.

    While the trial runs (half-open) other requests skip the provider; only a
    completed stream closes it; a trial that never reports back (its consumer went
    away) is replaced after another `reset_s`.
    """

    def __init__(self, provider: str, *, failures: int, reset_s: float) -> None:
        self.provider = provider
        self.threshold = failures
        self.reset_s = reset_s
        self.refusals = 0
        self.breaks = 0
        self.opened_at = 0.0
        self.trial_at = 0.0
        self._state = BreakerState.CLOSED

    @property
    def state(self) -> BreakerState:
        return self._state

    def _set_state(self, state: BreakerState) -> None:
        if state is not self._state:
            logger.bind(event="breaker", provider=self.provider).info(
                "circuit breaker {} -> {}", self._state.value, state.value
            )
            self._state = state

    def allow(self, now: float) -> bool:
        if self._state is BreakerState.CLOSED:
            return True
        since = self.opened_at if self._state is BreakerState.OPEN else self.trial_at
        if now - since >= self.reset_s:
            self._set_state(BreakerState.HALF_OPEN)
            self.trial_at = now
            return True  # the one trial
        return False

    @property
    def failures(self) -> int:
        return max(self.refusals, self.breaks)

    def record_answered(self) -> None:
        self.refusals = 0

    def record_success(self) -> None:
        self.refusals = self.breaks = 0
        self._set_state(BreakerState.CLOSED)

    def record_failure(self, error: UpstreamError, now: float, *, after_output: bool) -> None:
        # Only failures that say something about the provider's health count:
        # a bad request or a bad key is ours, not the provider's.
        if not error.retryable and error.type != "rate_limit":
            return
        if after_output:
            self.breaks += 1
        else:
            self.refusals += 1
        if self._state is BreakerState.HALF_OPEN or self.failures >= self.threshold:
            self.opened_at = now
            self._set_state(BreakerState.OPEN)
