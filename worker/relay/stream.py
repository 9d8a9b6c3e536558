"""One stream's relay: the shell that pumps upstream events into the batcher and publisher.

    events ──reader task──▶ bounded queue ──pump──▶ Batcher ──▶ StreamHandle (publisher)
                                              └──▶ checkpoints (Snapshot) every interval

The pump waits for the next event or the batcher's deadline, whichever is first (the
upstream iterator is read by its own task, so a timeout never cancels it mid-chunk).

Outcome, documented once:
- `Finished` ⇒ pending tokens, then `llm-done`; returns `RelayResult(error=None)`.
- The iterator raises a `RelayError` (e.g. `UpstreamError`) ⇒ pending tokens, then
  `llm-error`; the error is **returned** in `RelayResult.error`, not raised (the caller
  decides whether to retry the job). Any other exception also publishes `llm-error`
  (type `internal`) and is then re-raised.
- The iterator ends without `Finished` ⇒ `llm-done` with `finish_reason` null.
- The last messages are not acked within `relay_drain_timeout_s` ⇒ `RelayResult.error`
  is a `PublishError` (the final snapshot is persisted anyway).
- `on_checkpoint` raising, or cancellation ⇒ the exception propagates; nothing more
  is published (another worker owns the stream, or the caller reports the cancel).

Offsets are stream-wide and continue from `start_offset`; a worker that takes over a
crashed one passes the snapshot's `next_offset`, `next_seq` and texts, so `llm-done`'s
checksums and every `Snapshot` cover the whole stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from worker.config import Settings
from worker.errors import ConfigError, PublishError, RelayError, bounded
from worker.relay.batcher import Batch, Batcher
from worker.relay.publisher import Publisher, StreamHandle
from worker.relay.wire import EVENT_DONE, EVENT_ERROR, EVENT_STATUS, DoneMessage, text_checksum
from worker.upstream.events import (
    Finished,
    Refusal,
    Status,
    Token,
    ToolCallDelta,
    UpstreamEvent,
)

PACING_REFRESH_S = 0.1  # how often a stream re-reads its fair share of the budget
READ_AHEAD = 1024  # upstream events buffered between the reader and the pump


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a checkpoint persists: the text so far and where the stream continues."""

    content: str
    reasoning: str
    next_offset: int
    next_seq: int
    final: bool = False


@dataclass
class RelayResult:
    """The outcome of one `relay_stream` call (texts cover the whole stream)."""

    content: str = ""
    reasoning: str = ""
    content_tokens: int = 0  # relayed by this call
    reasoning_tokens: int = 0
    next_offset: int = 0
    messages: int = 0  # first transmissions of this call
    batches: int = 0
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    usage_estimated: bool = False
    error: RelayError | None = None
    retries: int = 0
    fallbacks: int = 0
    parked: int = 0
    rest_messages: int = 0
    statuses: int = 0
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _End:
    pass


@dataclass(frozen=True, slots=True)
class _Raised:
    exc: BaseException


_Queued = UpstreamEvent | _End | _Raised


async def _read(events: AsyncIterator[UpstreamEvent], queue: asyncio.Queue[_Queued]) -> None:
    try:
        async for event in events:
            await queue.put(event)
    except Exception as exc:  # handed to the pump, which publishes llm-error
        await queue.put(_Raised(exc))
    else:
        await queue.put(_End())


class _Pump:
    """State of one relay; `relay_stream` drives it."""

    def __init__(
        self,
        handle: StreamHandle,
        settings: Settings,
        start_offset: int,
        start_content: str,
        start_reasoning: str,
    ) -> None:
        self.handle = handle
        self.settings = settings
        self.batcher = Batcher(
            settings.relay_batch_size,
            settings.relay_max_batch_delay_ms / 1000,
            start_offset=start_offset,
            max_batch_bytes=settings.relay_max_message_bytes,
        )
        self.content: list[str] = [start_content] if start_content else []
        self.reasoning: list[str] = [start_reasoning] if start_reasoning else []
        self.result = RelayResult()
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.refusal: list[str] = []
        self.pacing_at = float("-inf")

    def text(self) -> tuple[str, str]:
        content, reasoning = "".join(self.content), "".join(self.reasoning)
        self.content, self.reasoning = [content], [reasoning]
        return content, reasoning

    def snapshot(self, final: bool = False) -> Snapshot:
        content, reasoning = self.text()
        return Snapshot(
            content,
            reasoning,
            self.batcher.next_offset,
            self.handle.next_seq + self.handle.unsent,
            final,
        )

    def send(self, batches: list[Batch]) -> None:
        for batch in batches:
            self.result.batches += 1
            self.handle.send_tokens(batch)

    def on_token(self, token: Token, now: float) -> None:
        (self.content if token.kind == "content" else self.reasoning).append(token.text)
        if token.kind == "content":
            self.result.content_tokens += 1
        else:
            self.result.reasoning_tokens += 1
        self.handle.note_activity(now)
        if self.settings.relay_adaptive_batching and now - self.pacing_at >= PACING_REFRESH_S:
            self.pacing_at = now
            self.batcher.set_min_interval(self.handle.min_interval_s(now))
        self.send(self.batcher.feed(token, now))

    def on_event(self, event: UpstreamEvent, now: float) -> bool:
        """Handle one non-token event; True when the stream is finished."""
        if isinstance(event, ToolCallDelta):
            call = self.tool_calls.setdefault(
                event.index, {"index": event.index, "id": None, "name": None, "arguments": ""}
            )
            call["id"] = event.id or call["id"]
            call["name"] = event.name or call["name"]
            call["arguments"] += event.arguments
            return False
        if isinstance(event, Refusal):
            self.refusal.append(event.text)
            return False
        self.send(self.batcher.flush(now))  # tokens before the event that follows them
        if isinstance(event, Status):
            self.result.statuses += 1
            self.handle.send_event(EVENT_STATUS, {"status": event.kind, "detail": event.detail})
            return False
        assert isinstance(event, Finished)
        self.result.finish_reason = event.finish_reason
        self.result.usage = event.usage
        self.result.usage_estimated = event.usage_estimated
        return True

    def send_done(self) -> None:
        content, reasoning = self.text()
        done = DoneMessage(
            stream=self.handle.stream_id,
            seq=-1,  # fixed by the publisher at first transmission
            total_tokens=self.batcher.next_offset,
            finish_reason=self.result.finish_reason,
            content_sha256=text_checksum(content),
            reasoning_sha256=text_checksum(reasoning),
            usage=self.result.usage,
            usage_estimated=self.result.usage_estimated,
            tool_calls=[self.tool_calls[i] for i in sorted(self.tool_calls)],
            refusal="".join(self.refusal) or None,
        )
        fields = done.to_payload()
        for key in ("v", "stream", "seq"):
            fields.pop(key)
        self.handle.send_event(EVENT_DONE, fields)

    def send_error(self, exc: BaseException) -> None:
        self.send(self.batcher.flush(0.0))
        if isinstance(exc, RelayError):
            err_type = str(getattr(exc, "type", type(exc).__name__))
            message, retryable = bounded(exc.message), exc.retryable
        else:
            err_type, message, retryable = "internal", "internal error in the relay", False
        self.handle.send_event(
            EVENT_ERROR,
            {
                "type": err_type,
                "message": message,
                "retryable": retryable,
                "tokens_relayed": self.batcher.next_offset,
            },
        )

    def finish(self) -> RelayResult:
        content, reasoning = self.text()
        stats = self.handle.stats
        r = self.result
        r.content, r.reasoning, r.next_offset = content, reasoning, self.batcher.next_offset
        r.messages, r.retries, r.fallbacks = stats.messages, stats.retries, stats.fallbacks
        r.parked, r.rest_messages = stats.parked, stats.rest_messages
        r.refusal = "".join(self.refusal) or None
        r.tool_calls = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        return r


def check_relay_settings(settings: Settings) -> None:
    """Refuse settings the relay cannot honour with frontend contract v1.

    `RELAY_MIDSTREAM_RECOVERY=restart` makes the upstream emit `Status("reset")` and
    generate again from offset 0 of its text; contract v1 has no message that tells a
    client to discard what it showed, so clients would splice two generations.
    (`UpstreamClient` still offers `restart` to callers that own their client side.)
    """
    if settings.relay_midstream_recovery == "restart":
        raise ConfigError(
            "RELAY_MIDSTREAM_RECOVERY=restart is not supported by the relay: frontend "
            "contract v1 cannot tell clients to discard shown text; use stop or continue"
        )


async def relay_stream(
    events: AsyncIterator[UpstreamEvent],
    *,
    publisher: Publisher,
    topic: str,
    stream_id: str,
    settings: Settings,
    start_offset: int = 0,
    start_seq: int = 0,
    on_checkpoint: Callable[[Snapshot], Awaitable[None]] | None = None,
    start_content: str = "",
    start_reasoning: str = "",
) -> RelayResult:
    """Relay one upstream stream to `topic` (sub-topic, e.g. `llm-token:<session>`).

    Args:
        events: the upstream events (tokens, status, finished); may raise RelayError.
        publisher: a started `Publisher`.
        topic, stream_id: where to publish, and the `stream` field of every payload.
        settings: batching, delays, checkpoint interval, drain timeout.
        start_offset, start_seq, start_content, start_reasoning: where a takeover
            continues (a previous `Snapshot`); zero / empty for a new stream.
        on_checkpoint: persists a `Snapshot` about every `relay_checkpoint_interval_s`
            (one at a time; skipped while the previous one runs) and once at the end
            (`final=True`, awaited before the last acks are awaited).

    Returns:
        The `RelayResult`; upstream and drain errors are in `.error` (see module doc).

    Raises:
        Whatever `on_checkpoint` raises; CancelledError; non-RelayError exceptions of
        the iterator (after publishing `llm-error`).
    """
    check_relay_settings(settings)
    handle = publisher.stream(topic, stream_id, start_seq=start_seq)
    pump = _Pump(handle, settings, start_offset, start_content, start_reasoning)
    log = logger.bind(event="relay.stream", stream=stream_id, topic=topic)
    log.info("relay started at offset {}", start_offset)
    queue: asyncio.Queue[_Queued] = asyncio.Queue(maxsize=READ_AHEAD)
    reader = asyncio.create_task(_read(events, queue), name=f"relay-read:{stream_id}")
    checkpoints = _Checkpoints(on_checkpoint, settings.relay_checkpoint_interval_s)
    loop = asyncio.get_running_loop()
    raised: BaseException | None = None
    try:
        while True:
            now = loop.time()
            checkpoints.maybe_start(pump, now)
            item = await _next(queue, _earliest(pump.batcher.deadline(), checkpoints.due), now)
            now = loop.time()
            if isinstance(item, Token):
                pump.on_token(item, now)
            elif isinstance(item, _Raised):
                raised = item.exc
                pump.send_error(item.exc)
                break
            elif isinstance(item, _End) or (item is not None and pump.on_event(item, now)):
                pump.send(pump.batcher.flush(now))
                pump.send_done()
                break
            pump.send(pump.batcher.poll(now))
        await checkpoints.final(pump)
        try:
            await handle.drain(settings.relay_drain_timeout_s)
        except PublishError as exc:
            log.error("stream not fully acknowledged: {}", exc.message)
            pump.result.error = exc
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
        checkpoints.cancel()
        handle.close()
    result = pump.finish()
    if raised is not None:
        if not isinstance(raised, RelayError):
            raise raised
        result.error = raised
    log.info(
        "relay ended: {} tokens, {} messages, {} retries, {} fallbacks, error={}",
        result.next_offset - start_offset,
        result.messages,
        result.retries,
        result.fallbacks,
        type(result.error).__name__ if result.error else None,
    )
    return result


def _earliest(*times: float | None) -> float | None:
    present = [t for t in times if t is not None]
    return min(present) if present else None


async def _next(
    queue: asyncio.Queue[_Queued], deadline: float | None, now: float
) -> _Queued | None:
    """The next queued event, or None when `deadline` passes first."""
    if not queue.empty():
        # Under load most events are already queued: no timer to arm and cancel (the
        # loop's heap of cancelled timers cost ~14 % of a relay's CPU, bench/RESULTS.md).
        return queue.get_nowait()
    if deadline is not None and deadline <= now:
        return None
    try:
        async with asyncio.timeout(None if deadline is None else deadline - now):
            return await queue.get()
    except TimeoutError:
        return None


class _Checkpoints:
    """Periodic snapshots, one at a time; a failure surfaces on the next tick."""

    def __init__(
        self, callback: Callable[[Snapshot], Awaitable[None]] | None, interval_s: float
    ) -> None:
        self.callback = callback
        self.interval_s = interval_s
        self.task: asyncio.Task[None] | None = None
        self.due: float | None = None

    def maybe_start(self, pump: _Pump, now: float) -> None:
        if self.callback is None:
            return
        if self.task is not None and self.task.done():
            self.task.result()  # re-raises a failed checkpoint
            self.task = None
        if self.due is None:
            self.due = now + self.interval_s
        if now >= self.due:
            self.due = now + self.interval_s  # a slow checkpoint skips a beat, never queues
            if self.task is None:
                self.task = asyncio.create_task(self._run(pump.snapshot()))

    async def _run(self, snapshot: Snapshot) -> None:
        assert self.callback is not None
        await self.callback(snapshot)

    async def final(self, pump: _Pump) -> None:
        if self.callback is None:
            return
        if self.task is not None:
            await self.task
            self.task = None
        await self.callback(pump.snapshot(final=True))

    def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
