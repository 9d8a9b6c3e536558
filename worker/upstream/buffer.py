"""Events decoded as bytes arrive, handed to their reader a window at a time.

    bytes ─(h1 Protocol.data_received, or httpx's reads)─▶ EventBuffer.on_data
          ─decode (body, SSE, chunks: synchronous)─▶ pending events ─wake─▶ reader

A paced stream sends one token per network read. Waking the reader for each one cost
a task step, a queue hand-off and a timer per token per stream; the relay batches
them anyway (20 tokens or 100 ms). So the buffer wakes its reader:
- at once for what must not wait: the first output of an attempt, any event that is
  not a token (status, finished), the end of the body, a failure, a full window
  (`max_events`), bytes that decoded to nothing (keep-alives: the idle deadline must
  see them);
- otherwise when the oldest pending event is `window_s` old, through `WakeWheel`,
  one timer for every stream of the worker.
The reader gets an `EventBatch`, which carries the loop time its oldest event was
read, so the relay's batching delay counts from there and the window adds nothing to
a token's latency beyond one timer tick.

The window is the reader's to set, through a `ReadPace` it shares with the buffer: the
relay sets it to its batcher's flush interval, which grows under overload, so that a
loaded worker is woken less often per stream rather than woken to wait (at 1,000
streams a wake-up per stream per 100 ms was most of the loop's work).

While a window is open the buffer also stops reading (`pause` on its source): what
the server sends meanwhile waits in the socket and is read in one go when the window
is due, just before the reader is woken. A paced stream then costs one network read
per window, not one per token (bench/RESULTS.md §7c: the read itself was about half
of a token's cost at 1,000 streams). The hold ends earlier when the stream's rate so
far says a full window (`max_events`) will be waiting sooner: reading resumes then,
so that a full batch still wakes the reader as it completes. What must not wait (the
end, a failure, a status) is then seen when it is read: at most one window late.

The buffer is bounded: past `max_pending` events it pauses the transport (TCP
back-pressure), and resumes when its reader has taken them.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import httpx

from worker.upstream.events import Token, UpstreamEvent

WHEEL_TICK_S = 0.005  # wake-ups due within one tick share the timer
MAX_PENDING_EVENTS = 4096


class EventBatch(list[UpstreamEvent]):
    """The events of one wake-up; `arrived_at`: loop time the oldest was read."""

    __slots__ = ("arrived_at",)

    def __init__(self, events: list[UpstreamEvent], arrived_at: float) -> None:
        super().__init__(events)
        self.arrived_at = arrived_at


@dataclass(slots=True)
class ReadPace:
    """How long a reader lets tokens gather before it is woken: its consumer's batching
    window (the relay raises it with its flush interval under overload)."""

    window_s: float


class WakeWheel:
    """One loop timer for many buffers' window deadlines (ticks of `tick_s`)."""

    def __init__(self, tick_s: float = WHEEL_TICK_S) -> None:
        self.tick_s = tick_s
        self._slots: dict[int, list[EventBuffer]] = {}
        self._ticks: list[int] = []  # heap of the keys of _slots
        self._timer: asyncio.TimerHandle | None = None
        self._timer_tick = math.inf

    def schedule(self, buffer: EventBuffer, at: float) -> None:
        tick = math.ceil(at / self.tick_s)
        slot = self._slots.get(tick)
        if slot is None:
            self._slots[tick] = slot = []
            heapq.heappush(self._ticks, tick)
        slot.append(buffer)
        if tick < self._timer_tick:
            self._arm(tick)

    def _arm(self, tick: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(tick * self.tick_s, self._fire)
        self._timer_tick = tick

    def _fire(self) -> None:
        self._timer, self._timer_tick = None, math.inf
        now_tick = math.floor(asyncio.get_running_loop().time() / self.tick_s)
        while self._ticks and self._ticks[0] <= now_tick:
            for buffer in self._slots.pop(heapq.heappop(self._ticks)):
                buffer.window_due()
        if self._ticks:
            self._arm(self._ticks[0])


class Pausable(Protocol):
    def pause(self) -> None: ...

    def resume(self) -> None: ...


class EventBuffer:
    """See the module docstring. `decode(bytes)` turns body bytes into events (it may
    raise; the failure reaches the reader after the events before it); `done()` says
    the decoder has seen the end of the stream (then nothing more is decoded)."""

    def __init__(
        self,
        decode: Callable[[bytes], list[UpstreamEvent]],
        done: Callable[[], bool],
        wheel: WakeWheel,
        *,
        window_s: float | ReadPace,
        max_events: int,
        max_pending: int = MAX_PENDING_EVENTS,
    ) -> None:
        self._decode = decode
        self._done = done
        self._wheel = wheel
        self.pace = window_s if isinstance(window_s, ReadPace) else ReadPace(window_s)
        self.max_events = max_events
        self._first = True  # no token reached the reader yet: the first goes at once
        self.max_pending = max_pending
        self._loop = asyncio.get_running_loop()
        self._events: list[UpstreamEvent] = []
        self._oldest_at = math.inf
        self._scheduled = False
        self._waiter: asyncio.Future[None] | None = None
        self._ready = False  # wake the reader (or let its next wait return at once)
        self._source: Pausable | None = None
        self._paused = False  # back-pressure: past max_pending until the reader takes
        self._held = False  # not reading until the open window is due
        self._window_at = math.inf  # when the open window is due
        self._tokens = 0  # read in this attempt, for the rate that bounds a hold
        self._first_token_at = math.inf
        self._reading = True  # what the source was last told
        self.ended = False
        self.error: BaseException | None = None  # a decode or transport failure
        self.last_data_at = self._loop.time()

    @property
    def window_s(self) -> float:
        return self.pace.window_s

    def attach(self, source: Pausable) -> None:
        self._source = source

    # --- the transport's side (synchronous) ---

    def on_data(self, data: bytes) -> None:
        if self.ended or self.error is not None:
            return
        now = self._loop.time()
        self.last_data_at = now
        try:
            events = self._decode(data)
        except Exception as exc:  # handed to the reader, after what came before
            self.error = exc
            self._wake()
            return
        if self._done():
            self.ended = True
        if not events:
            if self.ended or not self._events:
                self._wake()  # a keep-alive, or the end: the reader must see it
            return
        if not self._events:
            self._oldest_at = now
        if self._tokens == 0:
            self._first_token_at = now
        self._tokens += len(events)
        self._events.extend(events)
        if (
            self.ended
            or self._first
            or len(self._events) >= self.max_events
            or not all(type(e) is Token for e in events)
        ):
            self._wake()
        elif not self._scheduled:
            self._scheduled = True
            self._held = True
            self._window_at = self._oldest_at + self.pace.window_s
            self._wheel.schedule(self, min(self._window_at, self._full_at(now)))
        if len(self._events) >= self.max_pending:
            self._paused = True
            self._wake()  # a paused transport must not wait out a window
        self._apply_reading()

    def on_end(self, error: httpx.HTTPError | None) -> None:
        if self.ended or self.error is not None:
            return
        if error is not None:
            self.error = error
        self.ended = True
        self._wake()

    def _full_at(self, now: float) -> float:
        """When `max_events` should be pending, at this attempt's rate so far."""
        elapsed = now - self._first_token_at
        if self._tokens < 2 or elapsed <= 0:
            return math.inf
        rate = (self._tokens - 1) / elapsed
        return now + max(0, self.max_events - len(self._events)) / rate

    def window_due(self) -> None:
        if self._held:
            self._held = False
            self._apply_reading()
            if not (self.ended or self.error is not None):
                now = self._loop.time()
                tick = self._wheel.tick_s
                # Before the window: read as usual, a full batch wakes the reader. At
                # it: read what gathered in the socket first (reads are handled before
                # timers in a loop turn, so one tick later it is in `_events`).
                at = self._window_at if self._window_at > now + 2 * tick else now + tick
                self._wheel.schedule(self, at)
                return
        self._scheduled = False
        if self._events:
            self._wake()

    def _apply_reading(self) -> None:
        reading = not (self._held or self._paused)
        if reading == self._reading or self._source is None or self.ended:
            return
        self._reading = reading
        if reading:
            self._source.resume()
        else:
            self._source.pause()

    # --- the reader's side ---

    async def take(self) -> EventBatch | None:
        """The pending events (an empty batch after a keep-alive); None once the body
        ended and everything was taken. A failure is raised after its events."""
        if not self._ready:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self._ready = False
        if self._events:
            batch = EventBatch(self._events, self._oldest_at)
            self._first = False
            self._events = []
            self._oldest_at = math.inf
            if self._paused:
                self._paused = False
                self._apply_reading()
            if self.error is not None or self.ended:
                self._ready = True  # the next take raises or ends at once
            return batch
        if self.error is not None:
            raise self.error
        if self.ended:
            self._ready = True
            return None
        return EventBatch([], self.last_data_at)

    def _wake(self) -> None:
        self._ready = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class HttpxBody:
    """An httpx streamed response as a push source (tests' mock transports, proxies):
    one task reads it and feeds the buffer (this path keeps httpx's coroutine per read)."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._task: asyncio.Task[None] | None = None
        self._go = asyncio.Event()
        self._go.set()

    def attach(self, buffer: EventBuffer) -> None:
        buffer.attach(self)
        self._task = asyncio.create_task(self._pump(buffer), name="upstream-httpx-read")

    def pause(self) -> None:
        self._go.clear()

    def resume(self) -> None:
        self._go.set()

    async def _pump(self, buffer: EventBuffer) -> None:
        try:
            async for data in self.response.aiter_raw():
                buffer.on_data(data)
                if buffer.ended or buffer.error is not None:
                    return
                if not self._go.is_set():
                    await self._go.wait()
        except httpx.HTTPError as exc:
            buffer.on_end(exc)
        else:
            buffer.on_end(None)

    async def aclose(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
