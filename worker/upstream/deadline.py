"""A read deadline that costs one float per read instead of one timer per read.

`asyncio.timeout()` around every read schedules and cancels a timer handle per
chunk, a few µs each, at hundreds of chunks per second per stream. `ReadWatchdog`
keeps one handle per stream: each read only moves `deadline` forward; when the
handle fires early (the deadline moved) it re-arms itself once. It cancels the
task only while the task is suspended in a read (`reading`), never while the
consumer of our events runs (the async generator yields outside any read), and
`uncancel()`s what it caused, so a real cancellation is never swallowed.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


class ReadTimeout(Exception):
    """The read deadline passed (the caller turns it into an `UpstreamError`)."""


class ReadWatchdog:
    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - always called inside a task
            raise RuntimeError("ReadWatchdog needs a running task")
        self._task = task
        self._deadline = math.inf
        self._reading = False
        self._fired = False
        self._handle: asyncio.TimerHandle | None = None
        self._handle_at = math.inf

    def arm(self, deadline: float) -> None:
        """Before a read (the hot path's API: no coroutine per read): the read that
        follows may be cancelled at `deadline`. Raises `ReadTimeout` if it has passed.
        Pair with `disarm()` in a `finally`, and pass a `CancelledError` to `timed_out()`."""
        if self._loop.time() >= deadline:
            raise ReadTimeout
        self._deadline = deadline
        if self._handle is None or self._handle_at > deadline:
            self._arm(deadline)
        self._reading = True

    def disarm(self) -> None:
        self._reading = False

    def timed_out(self) -> bool:
        """After a `CancelledError` in the read: True if we caused it (then it is undone)."""
        if not self._fired:
            return False
        self._fired = False
        self._task.uncancel()
        return True

    async def read(self, awaitable: Awaitable[T], deadline: float) -> T:
        """Await `awaitable`; raise `ReadTimeout` if `deadline` (loop time) passes first."""
        if self._loop.time() >= deadline:
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            raise ReadTimeout
        self._deadline = deadline
        if self._handle is None or self._handle_at > deadline:
            self._arm(deadline)
        self._reading = True
        try:
            return await awaitable
        except asyncio.CancelledError:
            if self._fired:
                self._fired = False
                self._task.uncancel()
                raise ReadTimeout from None
            raise
        finally:
            self._reading = False

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._loop.call_at(when, self._check)
        self._handle_at = when

    def _check(self) -> None:
        self._handle = None
        self._handle_at = math.inf
        if not self._reading:
            return  # the next read re-arms
        if self._loop.time() >= self._deadline:
            self._fired = True
            self._task.cancel()
        else:
            self._arm(self._deadline)
