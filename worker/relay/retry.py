"""One delay generator and one classifier for every re-send of the publisher (pure).

The publisher's sender loop is the one retry loop: a failed message comes back
here, and the decision says when and how it goes out again. Nothing is ever
dropped; the last stage ("park") waits for the channel to come back, or for the
capped backoff, whichever is first.

    failure n of a whole message, n <= max_retries  -> RETRY after backoff(n)
    failure max_retries + 1, splittable llm-token   -> SPLIT into one-token messages
    anything else (a piece, an unsplittable event)  -> PARK until the channel is
                                                       back or backoff(n) elapsed
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from worker.backoff import backoff_delay


class Action(Enum):
    RETRY = "retry"
    SPLIT = "split"
    PARK = "park"


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    delay_s: float


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_retries: int
    base_s: float
    cap_s: float

    def on_failure(
        self,
        failures: int,
        *,
        splittable: bool,
        is_piece: bool,
        rand: Callable[[], float] = random.random,
    ) -> Decision:
        """What to do after the `failures`-th failure of one message (1-based)."""
        delay = backoff_delay(failures, base_s=self.base_s, cap_s=self.cap_s, rand=rand)
        if not is_piece and failures <= self.max_retries:
            return Decision(Action.RETRY, delay)
        if not is_piece and splittable:
            return Decision(Action.SPLIT, 0.0)
        return Decision(Action.PARK, delay)
