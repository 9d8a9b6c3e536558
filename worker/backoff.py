"""The one delay generator of the worker: exponential backoff with equal jitter.

Every retry loop (upstream requests before the first token, Realtime re-sends, the
publisher's reconnection supervisor) takes its delays from here, so they all back
off the same way and are tested once.
"""

from __future__ import annotations

import random
from collections.abc import Callable


def backoff_delay(
    attempt: int,
    *,
    base_s: float,
    cap_s: float,
    rand: Callable[[], float] = random.random,
) -> float:
    """Exponential backoff with "equal jitter": d/2 + U(0, d/2), d = min(cap, base * 2^(n-1)).

    Half the delay is kept so that retries really back off; the random half spreads
    the retries of many streams that failed together (one socket drop fails them all).
    """
    if attempt < 1:
        return 0.0
    ceiling = min(cap_s, base_s * 2.0 ** min(attempt - 1, 62))
    return float(ceiling / 2 + rand() * ceiling / 2)
