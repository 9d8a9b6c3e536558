"""EventBuffer and WakeWheel (worker/upstream/buffer.py): when the reader is woken, what
it gets, in which order, and the back-pressure bound."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from worker.upstream.buffer import EventBuffer, ReadPace, WakeWheel
from worker.upstream.events import Finished, Token, UpstreamEvent


class Source:
    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0
        self.reading = asyncio.Event()  # set at each resume

    def pause(self) -> None:
        self.paused += 1
        self.reading.clear()

    def resume(self) -> None:
        self.resumed += 1
        self.reading.set()


def tokens_decoder(state: dict[str, bool]) -> object:
    def decode(data: bytes) -> list[UpstreamEvent]:
        out: list[UpstreamEvent] = []
        for part in data.split(b"|"):
            if part == b"END":
                state["done"] = True
                out.append(Finished("stop"))
            elif part == b"BAD":
                raise ValueError("broken chunk")
            elif part:
                out.append(Token("content", part.decode()))
        return out

    return decode


def buffer(window_s: float = 0.05, max_events: int = 20, max_pending: int = 4096) -> EventBuffer:
    state = {"done": False}
    return EventBuffer(
        tokens_decoder(state),  # type: ignore[arg-type]
        lambda: state["done"],
        WakeWheel(),
        window_s=window_s,
        max_events=max_events,
        max_pending=max_pending,
    )


async def take(buf: EventBuffer, within_s: float = 1.0) -> list[UpstreamEvent] | None:
    batch = await asyncio.wait_for(buf.take(), within_s)
    return None if batch is None else list(batch)


async def test_the_first_token_wakes_at_once_later_ones_wait_for_the_window() -> None:
    buf = buffer(window_s=0.2)
    buf.on_data(b"a")
    assert await take(buf, 0.05) == [Token("content", "a")]
    buf.on_data(b"b")
    buf.on_data(b"c")
    pending = asyncio.ensure_future(buf.take())
    await asyncio.sleep(0.05)
    assert not pending.done()  # inside the window: no wake-up per read
    batch = await asyncio.wait_for(pending, 1.0)
    assert batch == [Token("content", "b"), Token("content", "c")]
    assert batch is not None and batch.arrived_at <= asyncio.get_running_loop().time() - 0.15


async def test_a_full_batch_and_the_end_do_not_wait() -> None:
    buf = buffer(window_s=10.0, max_events=3)
    buf.on_data(b"a")
    await take(buf)
    buf.on_data(b"b|c|d")
    assert await take(buf, 0.05) == [Token("content", x) for x in "bcd"]
    buf.on_data(b"e|END")
    assert await take(buf, 0.05) == [Token("content", "e"), Finished("stop")]
    assert await take(buf, 0.05) is None
    buf.on_data(b"late")  # after the end nothing more is decoded
    assert await take(buf, 0.05) is None


async def test_a_failure_comes_after_the_events_before_it() -> None:
    buf = buffer(window_s=10.0)
    buf.on_data(b"a")
    await take(buf)
    buf.on_data(b"b")
    buf.on_data(b"BAD")
    assert await take(buf, 0.05) == [Token("content", "b")]
    with pytest.raises(ValueError, match="broken chunk"):
        await take(buf, 0.05)


async def test_a_transport_error_after_events() -> None:
    buf = buffer(window_s=10.0)
    buf.on_data(b"a")
    await take(buf)
    buf.on_data(b"b")
    buf.on_end(httpx.ReadError("reset"))
    assert await take(buf, 0.05) == [Token("content", "b")]
    with pytest.raises(httpx.ReadError):
        await take(buf, 0.05)


async def test_bytes_without_events_wake_the_reader_empty_handed() -> None:
    """A keep-alive comment: the reader re-arms its idle deadline from it."""
    buf = buffer(window_s=10.0)
    buf.on_data(b"")  # decodes to nothing
    assert await take(buf, 0.05) == []


async def test_past_the_bound_the_transport_is_paused_until_taken() -> None:
    buf = buffer(window_s=0.3, max_events=10_000, max_pending=5)
    source = Source()
    buf.attach(source)
    buf.on_data(b"a")
    await take(buf)
    await asyncio.sleep(0.2)  # ~5 tokens/s: a full batch is far off, the hold is the window
    buf.on_data(b"b|c|d|e|f")
    assert source.paused == 1 and source.resumed == 0
    got = await take(buf, 0.05)  # a paused transport wakes the reader (no window)
    assert got is not None and len(got) == 5
    # Taken: no longer back-pressured, but still held until the window is due.
    assert source.resumed == 0
    await asyncio.wait_for(source.reading.wait(), 1)
    assert source.resumed == 1


async def test_reading_stops_while_a_window_is_open_and_resumes_before_the_wake_up() -> None:
    buf = buffer(window_s=0.1)
    source = Source()
    buf.attach(source)
    buf.on_data(b"a")
    assert await take(buf) == [Token("content", "a")]  # the first: at once, still reading
    assert source.paused == 0
    await asyncio.sleep(0.05)  # 20 tokens/s: 20 would take a second, longer than the window
    buf.on_data(b"b")  # opens a window: the socket is not read until it is due
    assert (source.paused, source.resumed) == (1, 0)
    pending = asyncio.ensure_future(buf.take())
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(source.reading.wait(), 1)
    assert not pending.done()  # resumed first; the reader waits one tick more
    buf.on_data(b"c|d")  # what gathered in the socket meanwhile, read at the resume
    at = loop.time()
    batch = await asyncio.wait_for(pending, 1.0)
    assert batch == [Token("content", x) for x in "bcd"]  # one wake-up for all three
    assert loop.time() - at < 0.05
    assert source.paused == 1  # reading again: the next token opens the next window
    buf.on_data(b"e")
    assert (source.paused, source.resumed) == (2, 1)


async def test_a_fast_stream_is_held_only_until_a_full_batch_should_be_waiting() -> None:
    buf = buffer(window_s=5.0, max_events=10)
    source = Source()
    buf.attach(source)
    loop = asyncio.get_running_loop()
    buf.on_data(b"a")
    await take(buf)
    await asyncio.sleep(0.01)
    buf.on_data(b"b")  # ~100 tokens/s: 9 more in ~90 ms, long before the 5 s window
    assert source.paused == 1
    pending = asyncio.ensure_future(buf.take())
    at = loop.time()
    await asyncio.wait_for(source.reading.wait(), 1)
    assert loop.time() - at < 2.0  # reading again long before the window is due
    buf.on_data(b"|".join(b"%d" % k for k in range(9)))  # what the socket held: full
    batch = await asyncio.wait_for(pending, 0.1)  # a full batch wakes the reader at once
    assert batch is not None and len(batch) == 10


async def test_an_ended_stream_is_not_resumed() -> None:
    buf = buffer(window_s=0.05)
    source = Source()
    buf.attach(source)
    buf.on_data(b"a")
    await take(buf)
    buf.on_data(b"b")
    buf.on_end(None)
    assert await take(buf) == [Token("content", "b")]
    await asyncio.sleep(0.1)
    assert (source.paused, source.resumed) == (1, 0)


async def test_one_timer_serves_many_buffers() -> None:
    wheel = WakeWheel(tick_s=0.01)
    state = {"done": False}
    bufs = [
        EventBuffer(
            tokens_decoder(state),  # type: ignore[arg-type]
            lambda: False,
            wheel,
            window_s=0.05,
            max_events=100,
        )
        for _ in range(50)
    ]
    for b in bufs:
        b.on_data(b"first")
        await take(b)
        b.on_data(b"x")
    armed = [h for h in asyncio.get_running_loop()._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
    assert len(armed) <= 2  # one wheel timer (plus at most the loop's own)
    got = await asyncio.wait_for(asyncio.gather(*(b.take() for b in bufs)), 1.0)
    assert all(g == [Token("content", "x")] for g in got)


async def test_the_window_is_the_readers_pace_read_at_each_wake_up() -> None:
    # The relay raises the pace with its flush interval under overload: tokens the
    # batcher would hold anyway no longer wake the reader.
    state = {"done": False}
    pace = ReadPace(0.05)
    buf = EventBuffer(
        tokens_decoder(state),  # type: ignore[arg-type]
        lambda: state["done"],
        WakeWheel(),
        window_s=pace,
        max_events=20,
    )
    buf.on_data(b"a")
    assert await take(buf) == [Token("content", "a")]  # the first: at once
    buf.on_data(b"b")
    assert await take(buf, within_s=0.5) == [Token("content", "b")]  # a 50 ms window
    pace.window_s = 0.4
    loop = asyncio.get_running_loop()
    buf.on_data(b"c")
    at = loop.time()
    assert await take(buf, within_s=2.0) == [Token("content", "c")]
    assert loop.time() - at >= 0.35  # the raised window
    assert buf.window_s == 0.4
