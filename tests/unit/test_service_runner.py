"""The pieces of RelayRunner that need no network: continuation requests and the tap."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from worker.jobs.models import Job, Snapshot
from worker.service.context import StreamContext
from worker.service.runner import _Tap, continuation
from worker.upstream.events import Finished, GenerationRequest, Status, Token, UpstreamEvent

HELLO = [{"role": "user", "content": "hello"}]
CONTINUE = "Continue exactly."


def context(start: Snapshot, max_tokens: int | None = 100) -> StreamContext:
    job = Job("j", "s", "u", None, None, HELLO, {}, 2, start)
    request = GenerationRequest(HELLO, model="m", max_tokens=max_tokens, temperature=0.3)
    return StreamContext(job, request, topic="llm-token:s")


def test_a_new_stream_asks_for_the_request_as_it_is() -> None:
    request = continuation(context(Snapshot()), CONTINUE)
    assert request.messages == HELLO and request.max_tokens == 100


def test_a_taken_over_stream_asks_to_continue_the_partial_answer() -> None:
    ctx = context(Snapshot(content="Hello wor", next_offset=3, next_seq=2))
    request = continuation(ctx, CONTINUE)
    assert request.messages == [
        *HELLO,
        {"role": "assistant", "content": "Hello wor"},
        {"role": "user", "content": CONTINUE},
    ]
    assert (request.max_tokens, request.model, request.temperature) == (97, "m", 0.3)
    assert continuation(context(Snapshot(next_offset=5), None), CONTINUE).max_tokens is None


class Upstream:
    """A scripted upstream that records whether it was closed (the HTTP request aborted)."""

    def __init__(self, events: list[UpstreamEvent], *, then_hang: bool = False) -> None:
        self.events = events
        self.then_hang = then_hang
        self.closed_at: float | None = None

    async def stream(self) -> AsyncIterator[list[UpstreamEvent]]:
        """One list per event, as `UpstreamClient.stream_batches` yields at one token a read."""
        try:
            for event in self.events:
                yield [event]
            if self.then_hang:
                await asyncio.Event().wait()
        finally:
            self.closed_at = time.monotonic()


async def collect(events: AsyncIterator[list[UpstreamEvent]], n: int) -> list[UpstreamEvent]:
    out: list[UpstreamEvent] = []
    async for batch in events:
        out.extend(batch)
        if len(out) >= n:
            break
    return out


async def test_the_tap_passes_events_through() -> None:
    ctx = context(Snapshot())
    tap = _Tap(ctx)
    events: list[UpstreamEvent] = [
        Token("reasoning", "hm"),
        Token("content", "Hi"),
        Finished("stop"),
    ]
    got = [e async for batch in tap.events(Upstream(events).stream()) for e in batch]
    assert got == events


async def test_a_takeover_is_announced_with_its_offset() -> None:
    ctx = context(Snapshot(content="ab", next_offset=2, next_seq=1))
    tap = _Tap(ctx)
    got = [e async for b in tap.events(Upstream([Token("content", "c")]).stream()) for e in b]
    assert got[0] == Status(
        "resuming", {"reason": "takeover", "mode": "continue", "offset": 2, "seam": True}
    )
    assert got[1:] == [Token("content", "c")]


async def test_a_cancel_closes_the_upstream_at_once_and_ends_the_stream() -> None:
    ctx = context(Snapshot())
    tap = _Tap(ctx)
    upstream = Upstream([Token("content", "a")], then_hang=True)
    events = tap.events(upstream.stream())
    assert await anext(events) == [Token("content", "a")]
    pending = asyncio.ensure_future(collect(events, 2))
    await asyncio.sleep(0.01)
    asked = time.monotonic()
    ctx.abort("cancelled")
    rest = await asyncio.wait_for(pending, 1.0)
    assert upstream.closed_at is not None and upstream.closed_at - asked < 0.5
    assert rest == [
        Status("cancelled", {"reason": "requested by the owner"}),
        Finished("cancelled"),
    ]


async def test_a_shutdown_flushes_with_a_handover_status_and_sends_no_done() -> None:
    ctx = context(Snapshot())
    tap = _Tap(ctx)
    upstream = Upstream([Token("content", "a")], then_hang=True)
    events = tap.events(upstream.stream())
    assert await anext(events) == [Token("content", "a")]
    ctx.abort("shutdown", within_s=0.5)
    assert await asyncio.wait_for(anext(events), 1.0) == [
        Status("resuming", {"reason": "handover", "seam": False})
    ]
    assert upstream.closed_at is not None
    tail = asyncio.ensure_future(anext(events))
    await asyncio.sleep(0.05)
    assert not tail.done()  # nothing more: no llm-done; the runner stops the relay
    tail.cancel()
    await asyncio.gather(tail, return_exceptions=True)
