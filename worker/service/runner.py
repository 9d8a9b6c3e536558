"""The real stream runner: upstream client -> relay_stream (durable first) -> publisher.

One `RelayRunner` per worker process: one `Publisher` (one Realtime socket, the
messages/s budget shared by every stream) and one `UpstreamClient` (one HTTP pool,
the circuit breakers). Per request:

- A new stream relays `ctx.request` from offset 0.
- Nothing is broadcast before it is durable: each flush of the relay is written to
  the worker's token log (`ctx.chunk_log`, group-committed with every other stream)
  and only then handed to the publisher. One `StreamTranscript` holds exactly what
  was published; the worker reads it (`ctx.track`) for the final row.
- A taken-over stream (a worker died, or drained and released it) continues from
  `ctx.start`, which the worker rebuilt from the log: exactly the last durable
  offset, so whatever any subscriber may have seen is the stored text, whichever
  words the model chooses next. The model is asked to continue the partial answer
  (the partial text as an assistant turn plus RELAY_CONTINUE_PROMPT), announced with
  `llm-status` resuming (`reason: takeover`, `offset`, `seam: true`). A stream that
  relayed only reasoning cannot be continued that way (the request would be asked
  again and its reasoning restarted after what was shown): it ends with `llm-error`
  carrying what was relayed, never a splice.
- Aborts: a tap between the upstream and the relay watches `ctx.aborted`.
  `cancelled`: the upstream is closed at once, then `llm-status` cancelled and
  `llm-done` (finish_reason `cancelled`) go out. `shutdown`: the upstream is closed,
  `llm-status` resuming (`reason: handover`) flushes the batcher, and the relay is
  stopped; the released snapshot is the transcript of what was published (never
  what still sat in the relay's queue), so the next worker starts where subscribers
  are. `lease_lost`: the relay is stopped at once; the new owner publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

from loguru import logger

from worker.config import Settings
from worker.errors import LeaseLost, PublishError, UpstreamError
from worker.jobs.chunklog import ChunkLog
from worker.jobs.models import ChunkRun, Job, Snapshot
from worker.relay.batcher import Batch
from worker.relay.publisher import Publisher
from worker.relay.stream import Durable, RelayResult, check_relay_settings, relay_stream
from worker.relay.wire import EVENT_ERROR
from worker.service.context import Outcome, StreamContext, error_info
from worker.transcript import StreamTranscript
from worker.upstream.buffer import ReadPace
from worker.upstream.client import UpstreamClient
from worker.upstream.events import Finished, GenerationRequest, Status, UpstreamEvent

# After a handover status, how long the relay may take to hand its last batch to the
# publisher before it is stopped (it only has to drain an in-memory queue).
HANDOVER_FLUSH_S = 0.25
REJECT_DRAIN_S = 5.0


def continuation(ctx: StreamContext, continue_prompt: str) -> GenerationRequest:
    """The request for a stream that continues from `ctx.start`."""
    request = ctx.request
    start = ctx.start
    max_tokens = request.max_tokens
    if max_tokens is not None:
        max_tokens = max(max_tokens - start.next_offset, 1)
    messages = request.messages
    if start.content:
        messages = [
            *messages,
            {"role": "assistant", "content": start.content},
            {"role": "user", "content": continue_prompt},
        ]
    return GenerationRequest(
        messages=messages,
        provider=request.provider,
        model=request.model,
        max_tokens=max_tokens,
        temperature=request.temperature,
        extra=request.extra,
    )


def snapshot_of(transcript: StreamTranscript) -> Snapshot:
    return Snapshot(
        transcript.content, transcript.reasoning, transcript.next_offset, transcript.next_seq
    )


def runs_of(job_id: str, batches: Sequence[Batch]) -> list[ChunkRun]:
    # One run per batch, its token tuple shared: nothing is built per token.
    return [ChunkRun(job_id, batch.offset, batch.kind, batch.tokens) for batch in batches]


def durable_writer(chunk_log: ChunkLog, ctx: StreamContext) -> Durable:
    """The relay's `durable` hook: the batches' tokens in the log, fenced by the lease."""
    job_id = ctx.stream_id

    async def durable(batches: Sequence[Batch]) -> None:
        try:
            await chunk_log.append(job_id, runs_of(job_id, batches))
        except LeaseLost:
            ctx.abort("lease_lost")
            raise

    return durable


class _Tap:
    """Between the upstream and the relay: announces a takeover, and stops the
    upstream the moment the worker aborts."""

    def __init__(self, ctx: StreamContext) -> None:
        self.ctx = ctx

    async def events(
        self, upstream: AsyncIterator[list[UpstreamEvent]]
    ) -> AsyncIterator[list[UpstreamEvent]]:
        """The upstream's wake-ups, passed on as they are (one task step per wake-up,
        not per token)."""
        ctx = self.ctx
        if ctx.resumed:
            yield [
                Status(
                    "resuming",
                    {
                        "reason": "takeover",
                        "mode": "continue" if ctx.start.content else "restart",
                        "offset": ctx.start.next_offset,
                        "seam": True,
                    },
                )
            ]
        aborted = asyncio.ensure_future(ctx.aborted.wait())
        step: asyncio.Future[list[UpstreamEvent]] | None = None
        try:
            while True:
                step = asyncio.ensure_future(anext(upstream))
                await asyncio.wait({step, aborted}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    break
                try:
                    batch = step.result()
                except StopAsyncIteration:
                    return
                yield batch
        finally:
            # Closing the upstream here is what aborts the HTTP request (within 1 s).
            aborted.cancel()
            if step is not None and not step.done():
                step.cancel()
                with contextlib.suppress(BaseException):
                    await step
            with contextlib.suppress(Exception):
                await upstream.aclose()  # type: ignore[attr-defined]
        async for batch in self._after_abort():
            yield batch

    async def _after_abort(self) -> AsyncIterator[list[UpstreamEvent]]:
        if self.ctx.abort_reason == "cancelled":
            yield [
                Status("cancelled", {"reason": "requested by the owner"}),
                Finished(finish_reason="cancelled"),
            ]
            return
        if self.ctx.abort_reason == "shutdown":
            yield [Status("resuming", {"reason": "handover", "seam": False})]
        await asyncio.Event().wait()  # the runner stops the relay


class RelayRunner:
    """The worker's stream runner. `async with RelayRunner(settings) as runner:`."""

    def __init__(
        self,
        settings: Settings,
        *,
        publisher: Publisher | None = None,
        upstream: UpstreamClient | None = None,
    ) -> None:
        self.settings = settings
        self._owned = publisher is None, upstream is None
        self.publisher = publisher or Publisher(settings)
        self.upstream = upstream or UpstreamClient(settings)

    async def __aenter__(self) -> RelayRunner:
        if self._owned[0]:
            await self.publisher.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._owned[0]:
            await self.publisher.close()
        if self._owned[1]:
            await self.upstream.aclose()

    def side_tasks(self) -> list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]]:
        """Supervised by the worker: the publisher's supervisor (a publisher that no
        longer delivers stops the worker loudly instead of queueing into it)."""
        return [("publisher", self.publisher.supervised)]

    def ready(self) -> bool:
        """Part of the worker's /readyz: the publisher can deliver."""
        return self.publisher.ready()

    @property
    def behind(self) -> bool:
        """The relay lags more than `relay_max_lag_s`: new requests should wait in the queue."""
        return self.publisher.behind

    async def __call__(self, job: Job, ctx: StreamContext) -> Outcome:
        start = ctx.start
        transcript = StreamTranscript.resume(
            content=start.content,
            reasoning=start.reasoning,
            next_offset=start.next_offset,
            next_seq=start.next_seq,
        )
        ctx.track(lambda: snapshot_of(transcript))
        if ctx.resumed and start.reasoning and not start.content:
            return await self._cannot_continue(job, ctx, transcript)
        durable = None if ctx.chunk_log is None else durable_writer(ctx.chunk_log, ctx)
        tap = _Tap(ctx)
        request = continuation(ctx, self.settings.relay_continue_prompt)
        pace = ReadPace(self.settings.relay_max_batch_delay_ms / 1000)
        relay = asyncio.create_task(
            relay_stream(
                tap.events(self.upstream.stream_batches(request, pace=pace)),
                publisher=self.publisher,
                topic=ctx.topic,
                stream_id=ctx.stream_id,
                settings=self.settings,
                durable=durable,
                transcript=transcript,
                pace=pace,
            ),
            name=f"relay-{job.id}",
        )
        try:
            return await self._outcome(relay, transcript, ctx)
        finally:
            if not relay.done():
                relay.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await relay

    async def _outcome(
        self, relay: asyncio.Task[RelayResult], transcript: StreamTranscript, ctx: StreamContext
    ) -> Outcome:
        aborted = asyncio.ensure_future(ctx.aborted.wait())
        try:
            await asyncio.wait({relay, aborted}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            aborted.cancel()
        if not relay.done() and ctx.abort_reason in ("shutdown", "lease_lost"):
            if ctx.abort_reason == "shutdown":
                await asyncio.wait({relay}, timeout=HANDOVER_FLUSH_S)
            relay.cancel()
            with contextlib.suppress(asyncio.CancelledError, LeaseLost):
                await relay
            # Exactly what was published: the next worker starts where subscribers are.
            return Outcome("interrupted", snapshot_of(transcript))
        result = await relay  # cancelled: the tap ends the stream with llm-done
        return self._from_result(result, snapshot_of(transcript), ctx)

    async def _cannot_continue(
        self, job: Job, ctx: StreamContext, transcript: StreamTranscript
    ) -> Outcome:
        """A takeover of a stream that relayed only reasoning: an honest end."""
        message = (
            "the stream was interrupted after relaying only reasoning; it cannot be "
            "continued without restarting what was shown"
        )
        handle = self.publisher.stream(ctx.topic, ctx.stream_id, start_seq=transcript.next_seq)
        try:
            handle.send_event(
                EVENT_ERROR,
                {
                    "type": "interrupted",
                    "message": message,
                    "retryable": False,
                    "tokens_relayed": transcript.next_offset,
                },
            )
            with contextlib.suppress(PublishError):
                await handle.drain(self.settings.relay_drain_timeout_s)
        finally:
            handle.close()
        error = {"type": "interrupted", "message": message, "retryable": False}
        return Outcome("failed", snapshot_of(transcript), error=error, retry=False)

    @staticmethod
    def _from_result(result: RelayResult, snapshot: Snapshot, ctx: StreamContext) -> Outcome:
        if isinstance(result.error, UpstreamError):
            # relay_stream told the client (llm-error): the attempt is over for good.
            return Outcome(
                "failed", snapshot, usage=result.usage, error=error_info(result.error), retry=False
            )
        if isinstance(result.error, PublishError):
            # Generated in full, not every message acknowledged: the row has the text.
            logger.bind(event="job", job=ctx.stream_id).warning(
                "stream ended with unacknowledged messages: {}", result.error.message
            )
        if ctx.abort_reason == "cancelled":
            return Outcome("cancelled", snapshot, finish_reason="cancelled", usage=result.usage)
        return Outcome("done", snapshot, finish_reason=result.finish_reason, usage=result.usage)

    async def on_rejected(self, job: Job, topic: str, error: dict[str, Any]) -> None:
        """Tell a subscriber why its request will never stream (`llm-error`)."""
        handle = self.publisher.stream(topic, job.id)
        try:
            fields = {
                "type": error.get("type", "bad_request"),
                "message": error.get("message", ""),
                "retryable": False,
                "tokens_relayed": 0,
            }
            handle.send_event(EVENT_ERROR, fields)
            await handle.drain(REJECT_DRAIN_S)
        finally:
            handle.close()


def build_runner(settings: Settings, **options: str) -> RelayRunner:
    """The default `--runner` of `llm-relay run` (no options)."""
    if options:
        raise ValueError(f"the relay runner takes no options, got {sorted(options)}")
    check_relay_settings(settings)  # at start-up, not on the first request
    return RelayRunner(settings)
