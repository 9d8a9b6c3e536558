"""One stream's relay: the shell that pumps upstream events into the batcher and publisher.

    events ──reader task──▶ bounded queue ──pump──▶ Batcher ──▶ durable(batches) ──▶ StreamHandle

Nothing is broadcast before it is durable: when the caller passes `durable` (the
worker's write-ahead token log, worker/jobs/chunklog.py), each flush awaits it and only
then hands the batches to the publisher. So whatever any subscriber may have seen is
in the log, and a worker that dies leaves the log at or *ahead* of what was published,
never behind: its heir continues from the last durable offset with any model, and a
client that missed tokens reads them from the log.

The pump waits for the next event or the batcher's deadline, whichever is first (the
upstream iterator is read by its own task, so a timeout never cancels it mid-chunk).
The worker's upstream hands over one wake-up's events as a list
(`UpstreamClient.stream_batches`: one per window, not per network read); its tokens are
fed to the batcher with the time the oldest was read (`EventBatch.arrived_at`), so the
batching delay counts from the wire, not from the wake-up.

Outcome, documented once:
- `Finished` ⇒ pending tokens, then `llm-done`; returns `RelayResult(error=None)`.
- The iterator raises a `RelayError` (e.g. `UpstreamError`) ⇒ pending tokens, then
  `llm-error`; the error is **returned** in `RelayResult.error`, not raised (the caller
  decides whether to retry the job). Any other exception also publishes `llm-error`
  (type `internal`) and is then re-raised.
- A `Status("reset")` (a restarted generation) ⇒ `llm-error` with what was relayed:
  contract v1 cannot make a client discard shown text, so the relay never splices.
- The iterator ends without `Finished` ⇒ `llm-done` with `finish_reason` null.
- The last messages are not acked within `relay_drain_timeout_s` ⇒ `RelayResult.error`
  is a `PublishError`.
- `durable` raising (e.g. `LeaseLost`), or cancellation ⇒ the exception propagates;
  nothing more is published (another worker owns the stream, or the caller reports it).

Offsets are stream-wide and continue from `start_offset`; a worker that takes over a
crashed one passes the durable log's end, so `llm-done`'s checksums cover the whole
stream. `transcript` (optional, the caller's) holds exactly what was published.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loguru import logger

from worker.config import Settings
from worker.errors import ConfigError, PublishError, RelayError, UpstreamError, bounded
from worker.relay.batcher import Batch, Batcher
from worker.relay.publisher import Publisher, StreamHandle
from worker.relay.wire import EVENT_DONE, EVENT_ERROR, EVENT_STATUS, DoneMessage, text_checksum
from worker.transcript import StreamTranscript
from worker.upstream.buffer import EventBatch, ReadPace
from worker.upstream.events import (
    Finished,
    Refusal,
    Status,
    Token,
    ToolCallDelta,
    UpstreamEvent,
)

if TYPE_CHECKING:
    from loguru import Logger

PACING_REFRESH_S = 0.1  # how often a stream re-reads its fair share of the budget
READ_AHEAD = 1024  # upstream events buffered between the reader and the pump

# Awaited with each flush before the batches are broadcast; raising stops the relay.
Durable = Callable[[Sequence[Batch]], Awaitable[None]]
# When the relay ends early (a handover cancels it), how long writes in flight may
# take to land and be handed to the publisher.
STOP_WRITE_WAIT_S = 1.0


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


_Queued = UpstreamEvent | list[UpstreamEvent] | _End | _Raised
# What a relay reads: single events, or lists of them (`UpstreamClient.stream_batches`:
# one list per wake-up, an `EventBatch` when it carries the time it was read).
Events = AsyncIterator[UpstreamEvent] | AsyncIterator[list[UpstreamEvent]]


async def _read(events: Events, queue: asyncio.Queue[_Queued]) -> None:
    try:
        async for event in events:
            await queue.put(event)
    except Exception as exc:  # handed to the pump, which publishes llm-error
        await queue.put(_Raised(exc))
    else:
        await queue.put(_End())


def _refused_reset(event: Status) -> UpstreamError:
    return UpstreamError(
        "the upstream restarted a generation after tokens were relayed; the stream "
        "ends here instead of splicing two generations",
        type="server_error",
        provider=str(event.detail.get("provider", "")),
        retryable=False,
    )


class _Pump:
    """State of one relay; `relay_stream` drives it."""

    def __init__(
        self,
        handle: StreamHandle,
        settings: Settings,
        transcript: StreamTranscript,
        durable: Durable | None,
        pace: ReadPace | None,
    ) -> None:
        self.handle = handle
        self.pace = pace
        self.settings = settings
        self.batcher = Batcher(
            settings.relay_batch_size,
            settings.relay_max_batch_delay_ms / 1000,
            start_offset=transcript.next_offset,
            max_batch_bytes=settings.relay_max_message_bytes,
        )
        # Exactly what was published (durable first): tokens are added at publication.
        self.transcript = transcript
        self.durable = durable
        self._writes: deque[tuple[asyncio.Future[None], list[Batch]]] = deque()
        self.failure: BaseException | None = None
        self.stopped = False  # after an early end or a failed write: nothing more goes out
        self.result = RelayResult()
        self.raised: BaseException | None = None  # the failure the relay ends with
        self.pacing_at = float("-inf")

    def publish(self, batches: list[Batch]) -> None:
        """Start making `batches` durable; they are handed to the publisher, in order,
        as their writes land. The pump goes on meanwhile: a stream's throughput does
        not depend on the commit latency (the writer group-commits whatever is
        pending), only its latency does, by one commit."""
        if not batches:
            return
        if self.durable is None:
            self._hand_over(batches)
            return
        write = asyncio.ensure_future(self.durable(batches))
        self._writes.append((write, batches))
        write.add_done_callback(self._written)

    def _written(self, _: object = None) -> None:
        while self._writes and self._writes[0][0].done() and not self.stopped:
            write, batches = self._writes.popleft()
            error = asyncio.CancelledError() if write.cancelled() else write.exception()
            if error is not None:
                # Nothing after a failed write goes out: the order is the offsets'.
                self.failure = self.failure or error
                self.stopped = True
                return
            self._hand_over(batches)

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure

    async def settle(self) -> None:
        """Wait until every batch is durable and handed over; raise a failed write."""
        if self._writes:
            await asyncio.wait([write for write, _ in self._writes])
            self._written()
        self.raise_failure()

    async def stop(self, wait_s: float) -> None:
        """The relay ends early: hand over what lands within `wait_s`, drop the rest
        (never broadcast; if a write lands later it is durable, and the heir, which
        starts from the log, and the subscribers' catch-up reads still agree)."""
        if self._writes and not self.stopped:
            await asyncio.wait([write for write, _ in self._writes], timeout=wait_s)
            self._written()
        self.stopped = True
        for write, _ in self._writes:
            write.cancel()
        self._writes.clear()

    def _hand_over(self, batches: list[Batch]) -> None:
        t = self.transcript
        for batch in batches:
            self.result.batches += 1
            for text in batch.tokens:
                t.add_token(batch.kind, text)
            if batch.kind == "content":
                self.result.content_tokens += len(batch.tokens)
            else:
                self.result.reasoning_tokens += len(batch.tokens)
            self.handle.send_tokens(batch)
        t.next_seq = self.handle.next_seq + self.handle.unsent

    def on_token(self, token: Token, now: float) -> list[Batch]:
        self.handle.note_activity(now)
        if self.settings.relay_adaptive_batching and now - self.pacing_at >= PACING_REFRESH_S:
            self.pacing_at = now
            self.batcher.set_min_interval(self.handle.min_interval_s(now))
            if self.pace is not None:  # no wake-up for tokens the batcher would hold
                self.pace.window_s = max(self.batcher.max_delay_s, self.batcher.min_interval_s)
        return self.batcher.feed(token, now)

    async def on_other_event(self, item: _Queued, now: float, log: Logger) -> bool:
        """Handle one event that is not a token, in order after the tokens before it;
        True when the relay ends here (a failure to report is left in `raised`)."""
        if isinstance(item, _Raised | _End):
            self.publish(self.batcher.flush(now))
            await self.settle()
            if isinstance(item, _Raised):
                self.raised = item.exc
                self.send_error(item.exc)
            else:
                self.send_done()
            return True
        assert not isinstance(item, list)
        if not isinstance(item, ToolCallDelta | Refusal):
            self.publish(self.batcher.flush(now))  # tokens before the event
            await self.settle()  # ...are out before it
        if isinstance(item, Status) and item.kind == "reset":
            self.raised = _refused_reset(item)
            log.warning("refused a restart after {} tokens", self.transcript.next_offset)
            self.send_error(self.raised)
            return True
        if self.on_event(item):
            self.publish(self.batcher.flush(now))
            await self.settle()
            self.send_done()
            return True
        return False

    def feed_tokens(
        self, events: list[UpstreamEvent], now: float, rest: deque[UpstreamEvent]
    ) -> UpstreamEvent | None:
        """Feed the leading tokens of one wake-up's events to the batcher (read at
        `now`); the first other event is returned, and what follows it goes to `rest`."""
        for i, event in enumerate(events):
            if type(event) is Token:
                self.publish(self.on_token(event, now))
                continue
            rest.extend(events[i + 1 :])
            return event
        return None

    def on_event(self, event: UpstreamEvent) -> bool:
        """Account for one non-token event (after the flush of the tokens before it);
        True when the stream is finished."""
        if isinstance(event, ToolCallDelta | Refusal):
            self.transcript.feed(event)  # they go out in llm-done
            return False
        if isinstance(event, Status):
            self.result.statuses += 1
            self.handle.send_event(EVENT_STATUS, {"status": event.kind, "detail": event.detail})
            self.transcript.next_seq = self.handle.next_seq + self.handle.unsent
            return False
        assert isinstance(event, Finished)
        self.result.finish_reason = event.finish_reason
        self.result.usage = event.usage
        self.result.usage_estimated = event.usage_estimated
        return True

    def send_done(self) -> None:
        t = self.transcript
        done = DoneMessage(
            stream=self.handle.stream_id,
            seq=-1,  # fixed by the publisher at first transmission
            total_tokens=t.next_offset,
            finish_reason=self.result.finish_reason,
            content_sha256=text_checksum(t.content),
            reasoning_sha256=text_checksum(t.reasoning),
            usage=self.result.usage,
            usage_estimated=self.result.usage_estimated,
            tool_calls=t.tool_call_dicts(),
            refusal=t.refusal,
        )
        fields = done.to_payload()
        for key in ("v", "stream", "seq"):
            fields.pop(key)
        self.handle.send_event(EVENT_DONE, fields)

    def send_error(self, exc: BaseException) -> None:
        """`llm-error` after the pending tokens were published (see `publish`)."""
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
                "tokens_relayed": self.transcript.next_offset,
            },
        )

    def finish(self) -> RelayResult:
        t = self.transcript
        stats = self.handle.stats
        r = self.result
        r.content, r.reasoning, r.next_offset = t.content, t.reasoning, t.next_offset
        r.messages, r.retries, r.fallbacks = stats.messages, stats.retries, stats.fallbacks
        r.parked, r.rest_messages = stats.parked, stats.rest_messages
        r.refusal = t.refusal
        r.tool_calls = t.tool_call_dicts()
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
    events: Events,
    *,
    publisher: Publisher,
    topic: str,
    stream_id: str,
    settings: Settings,
    start_offset: int = 0,
    start_seq: int = 0,
    start_content: str = "",
    start_reasoning: str = "",
    durable: Durable | None = None,
    transcript: StreamTranscript | None = None,
    pace: ReadPace | None = None,
) -> RelayResult:
    """Relay one upstream stream to `topic` (sub-topic, e.g. `llm-token:<session>`).

    Args:
        events: the upstream events (tokens, status, finished), one by one or in lists;
            may raise RelayError.
        publisher: a started `Publisher`.
        topic, stream_id: where to publish, and the `stream` field of every payload.
        settings: batching, delays, drain timeout.
        start_offset, start_seq, start_content, start_reasoning: where a takeover
            continues (the durable log's end); zero / empty for a new stream. Ignored
            when `transcript` is given (it carries them).
        durable: awaited with each flush before the batches are broadcast (the
            write-ahead log); None publishes at once (no queue: `llm-relay once`).
        transcript: the caller's `StreamTranscript`, fed with what is published.
        pace: the upstream reader's window (`UpstreamClient.stream_batches(pace=)`),
            kept at the batcher's flush interval: under overload, fewer wake-ups.

    Returns:
        The `RelayResult`; upstream and drain errors are in `.error` (see module doc).

    Raises:
        Whatever `durable` raises; CancelledError; non-RelayError exceptions of the
        iterator (after publishing `llm-error`).
    """
    check_relay_settings(settings)
    if transcript is None:
        transcript = StreamTranscript.resume(
            content=start_content, reasoning=start_reasoning, next_offset=start_offset
        )
        transcript.next_seq = start_seq
    start_offset = transcript.next_offset
    handle = publisher.stream(topic, stream_id, start_seq=transcript.next_seq)
    pump = _Pump(handle, settings, transcript, durable, pace)
    log = logger.bind(event="relay.stream", stream=stream_id, topic=topic)
    log.info("relay started at offset {}", start_offset)
    queue: asyncio.Queue[_Queued] = asyncio.Queue(maxsize=READ_AHEAD)
    reader = asyncio.create_task(_read(events, queue), name=f"relay-read:{stream_id}")
    loop = asyncio.get_running_loop()
    try:
        pending: deque[UpstreamEvent] = deque()
        while True:
            now = loop.time()
            item: _Queued | None
            if pending:
                item = pending.popleft()
            else:
                item = await _next(queue, pump.batcher.deadline(), now)
                now = loop.time()
                if isinstance(item, list):
                    # Tokens count from when they were read, not from this wake-up.
                    fed_at = min(item.arrived_at, now) if isinstance(item, EventBatch) else now
                    item = pump.feed_tokens(item, fed_at, pending)
            pump.raise_failure()  # a failed write stops the relay (e.g. LeaseLost)
            if isinstance(item, Token):
                pump.publish(pump.on_token(item, now))
            elif item is not None and await pump.on_other_event(item, now, log):
                break
            pump.publish(pump.batcher.poll(now))
        try:
            await handle.drain(settings.relay_drain_timeout_s)
        except PublishError as exc:
            log.error("stream not fully acknowledged: {}", exc.message)
            pump.result.error = exc
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
        await pump.stop(STOP_WRITE_WAIT_S)
        handle.close()
    result = pump.finish()
    raised = pump.raised
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
