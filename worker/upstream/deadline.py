"""The upstream read path's one deadline mechanism: which deadline bounds the next
read (`ReadDeadlines`, pure) and a watchdog that enforces it (`ReadWatchdog`).

Four deadlines, per provider (`Settings.deadlines_for`): connect (httpx's connect
timeout, per request), first token (from the request to the first output; it covers
the response headers too), idle (the gap between two reads once output flows) and
total (the whole generation). Every wait of the read path (headers, error body, each
chunk) goes through `ReadDeadlines.next()` and the watchdog, so a timeout always
names the deadline that fired and the setting it came from.

`asyncio.timeout()` around every read schedules and cancels a timer handle per
chunk, a few µs each, at hundreds of chunks per second per stream. `ReadWatchdog`
keeps one handle per stream: each read only moves `deadline` forward; when the
handle fires early (the deadline moved) it re-arms itself once. It cancels the
task only while it is suspended in a read (`reading`), never while the consumer of
our events runs (the async generator yields outside any read), and `uncancel()`s
what it caused, so a real cancellation is never swallowed.

The task to cancel is the one that armed the read, taken at each `arm()`: the
consumer may drive the stream from a new task per event (the worker's runner does:
each `__anext__` runs in its own task), and a task captured once at creation would
be a finished one by the second event, so nothing would ever fire.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable
from typing import Literal, TypeVar

from worker.config import UpstreamDeadlines

T = TypeVar("T")
Phase = Literal["connect", "first_token", "idle", "total"]

_WHAT: dict[str, str] = {
    "connect": "no connection within {s:g} s",
    "first_token": "no output within {s:g} s of the request",
    "idle": "no chunk for {s:g} s",
    "total": "the generation took more than {s:g} s",
}


class ReadTimeout(Exception):
    """A read deadline passed (the caller turns it into an `UpstreamError`)."""

    def __init__(self, phase: str = "") -> None:
        super().__init__(phase)
        self.phase = phase


class ReadDeadlines:
    """Which deadline bounds the next read of one stream. Pure: `now` is passed in.

    Args:
        limits: the provider's deadlines (`Settings.deadlines_for`).
        total_at: loop time at which the whole generation must be over.
    """

    __slots__ = ("limits", "total_at")

    def __init__(self, limits: UpstreamDeadlines, total_at: float) -> None:
        self.limits = limits
        self.total_at = total_at

    @classmethod
    def starting(cls, limits: UpstreamDeadlines, now: float) -> ReadDeadlines:
        return cls(limits, now + limits.total_s)

    def first_token_at(self, request_sent: float) -> tuple[float, Phase]:
        """The deadline of an attempt's headers and first output."""
        return self._earliest(request_sent + self.limits.first_token_s, "first_token")

    def next(self, now: float, produced: bool, sent_at: float) -> tuple[float, Phase]:
        """The deadline of the next read of an attempt sent at `sent_at`: first token
        until output flowed, then idle; the total deadline whenever it comes first."""
        if produced:
            return self._earliest(now + self.limits.idle_s, "idle")
        return self.first_token_at(sent_at)

    def _earliest(self, at: float, phase: Phase) -> tuple[float, Phase]:
        if self.total_at <= at:
            return self.total_at, "total"
        return at, phase

    def message(self, phase: str) -> str:
        """What to tell the operator: which deadline, how long, which setting."""
        seconds = {
            "connect": self.limits.connect_s,
            "first_token": self.limits.first_token_s,
            "idle": self.limits.idle_s,
            "total": self.limits.total_s,
        }.get(phase, 0.0)
        setting = self.limits.names.get(phase, "")
        what = _WHAT.get(phase, "deadline").format(s=seconds)
        label = phase.replace("_", "-")
        return f"{label} deadline passed: {what}" + (f" ({setting})" if setting else "")


class ReadWatchdog:
    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[object] | None = None
        self._fired_task: asyncio.Task[object] | None = None
        self._deadline = math.inf
        self._phase = ""
        self._reading = False
        self._handle: asyncio.TimerHandle | None = None
        self._handle_at = math.inf

    @property
    def phase(self) -> str:
        """The phase of the last armed read (the one that timed out, after a timeout)."""
        return self._phase

    def arm(self, deadline: float, phase: str = "") -> None:
        """Before a read (the hot path's API: no coroutine per read): the read that
        follows may be cancelled at `deadline`. Raises `ReadTimeout` if it has passed.
        Pair with `disarm()` in a `finally`, and pass a `CancelledError` to `timed_out()`."""
        self._phase = phase
        if self._loop.time() >= deadline:
            raise ReadTimeout(phase)
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - always called inside a task
            raise RuntimeError("ReadWatchdog needs a running task")
        self._task = task
        self._deadline = deadline
        if self._handle is None or self._handle_at > deadline:
            self._arm(deadline)
        self._reading = True

    def disarm(self) -> None:
        self._reading = False

    def timed_out(self) -> bool:
        """After a `CancelledError` in the read: True if we caused it (then it is undone)."""
        current = asyncio.current_task()
        if current is None or self._fired_task is not current:
            return False
        self._fired_task = None
        current.uncancel()
        return True

    async def read(self, awaitable: Awaitable[T], deadline: float, phase: str = "") -> T:
        """Await `awaitable`; raise `ReadTimeout` if `deadline` (loop time) passes first."""
        try:
            self.arm(deadline, phase)
        except ReadTimeout:
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            raise
        try:
            return await awaitable
        except asyncio.CancelledError:
            if self.timed_out():
                raise ReadTimeout(phase) from None
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
        if not self._reading or self._task is None:
            return  # the next read re-arms
        if self._loop.time() >= self._deadline:
            self._fired_task = self._task
            self._task.cancel()
        else:
            self._arm(self._deadline)
