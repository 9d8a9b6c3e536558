"""The real stream runner: upstream client -> relay_stream -> publisher.

One `RelayRunner` per worker process: one `Publisher` (one Realtime socket, the
messages/s budget shared by every stream) and one `UpstreamClient` (one HTTP pool,
the circuit breakers). Per request:

- A new stream relays `ctx.request` from offset 0.
- A taken-over stream (a worker died, or drained and released it) continues from
  the stored snapshot: offsets, message numbers and texts carry on, and the model
  is asked to continue the partial answer (the upstream client's `continue`
  recovery: the partial text as an assistant turn plus RELAY_CONTINUE_PROMPT),
  announced to the client with `llm-status` resuming (`reason: takeover`, `offset`).
  A model that continues exactly (the devstack's simulated upstream does) gives the
  client exactly the stored transcript, even for tokens the dead worker published
  after its last checkpoint. A real model may word the seam differently: the row's
  snapshot is then the authority (see the README's frontend notes).
- Checkpoints: relay_stream calls `on_checkpoint` about once a second and at the
  end; we hand each snapshot to the worker, which writes it (fenced by the lease).
- Aborts: a tap between the upstream and the relay watches `ctx.aborted`.
  `cancelled`: the upstream is closed at once, then `llm-status` cancelled and
  `llm-done` (finish_reason `cancelled`) go out. `shutdown`: the upstream is closed,
  `llm-status` resuming (`reason: handover`) flushes the batcher, and the relay is
  stopped; the snapshot is exactly what was handed to the publisher (which still
  delivers it), so the next worker continues at the right offset. `lease_lost`:
  the relay is stopped at once; the new owner publishes from now on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from loguru import logger

from worker.config import Settings
from worker.errors import PublishError, UpstreamError
from worker.jobs.models import Job, Snapshot
from worker.relay.publisher import Publisher
from worker.relay.stream import RelayResult, check_relay_settings, relay_stream
from worker.relay.stream import Snapshot as RelaySnapshot
from worker.relay.wire import EVENT_ERROR
from worker.service.context import Outcome, StreamContext, error_info
from worker.upstream.client import UpstreamClient
from worker.upstream.events import Finished, GenerationRequest, Status, Token, UpstreamEvent

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


class _Tap:
    """Between the upstream and the relay: counts what the relay was given, and stops
    the upstream the moment the worker aborts."""

    def __init__(self, ctx: StreamContext) -> None:
        self.ctx = ctx
        self.content = [ctx.start.content]
        self.reasoning = [ctx.start.reasoning]
        self.next_offset = ctx.start.next_offset
        self.events_given = 0  # upper bound of the messages they can become
        self.seq_seen = ctx.start.next_seq

    def snapshot(self) -> Snapshot:
        """Everything handed to the relay (after a flush: to the publisher)."""
        return Snapshot(
            content="".join(self.content),
            reasoning="".join(self.reasoning),
            next_offset=self.next_offset,
            # Never reuse a number the relay may have sent: one message at most per event.
            next_seq=self.seq_seen + self.events_given,
        )

    def _given(self, event: UpstreamEvent) -> UpstreamEvent:
        self.events_given += 1
        if isinstance(event, Token):
            (self.content if event.kind == "content" else self.reasoning).append(event.text)
            self.next_offset += 1
        return event

    async def events(self, upstream: AsyncIterator[UpstreamEvent]) -> AsyncIterator[UpstreamEvent]:
        ctx = self.ctx
        if ctx.resumed:
            yield self._given(
                Status(
                    "resuming",
                    {
                        "reason": "takeover",
                        "mode": "continue" if ctx.start.content else "restart",
                        "offset": ctx.start.next_offset,
                        "seam": True,
                    },
                )
            )
        aborted = asyncio.ensure_future(ctx.aborted.wait())
        step: asyncio.Future[UpstreamEvent] | None = None
        try:
            while True:
                step = asyncio.ensure_future(anext(upstream))
                await asyncio.wait({step, aborted}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    break
                try:
                    event = step.result()
                except StopAsyncIteration:
                    return
                yield self._given(event)
        finally:
            # Closing the upstream here is what aborts the HTTP request (within 1 s).
            aborted.cancel()
            if step is not None and not step.done():
                step.cancel()
                with contextlib.suppress(BaseException):
                    await step
            with contextlib.suppress(Exception):
                await upstream.aclose()  # type: ignore[attr-defined]
        async for event in self._after_abort():
            yield event

    async def _after_abort(self) -> AsyncIterator[UpstreamEvent]:
        if self.ctx.abort_reason == "cancelled":
            yield self._given(Status("cancelled", {"reason": "requested by the owner"}))
            yield self._given(Finished(finish_reason="cancelled"))
            return
        if self.ctx.abort_reason == "shutdown":
            yield self._given(Status("resuming", {"reason": "handover", "seam": False}))
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

    @property
    def behind(self) -> bool:
        """The relay lags more than `relay_max_lag_s`: new requests should wait in the queue."""
        return self.publisher.behind

    async def __call__(self, job: Job, ctx: StreamContext) -> Outcome:
        tap = _Tap(ctx)
        final: list[Snapshot] = []

        async def on_checkpoint(snapshot: RelaySnapshot) -> None:
            tap.seq_seen = max(tap.seq_seen, snapshot.next_seq)
            ours = Snapshot(
                snapshot.content, snapshot.reasoning, snapshot.next_offset, snapshot.next_seq
            )
            if snapshot.final:
                final.append(ours)
            await ctx.checkpoint(ours)

        request = continuation(ctx, self.settings.relay_continue_prompt)
        relay = asyncio.create_task(
            relay_stream(
                tap.events(self.upstream.stream(request)),
                publisher=self.publisher,
                topic=ctx.topic,
                stream_id=ctx.stream_id,
                settings=self.settings,
                start_offset=ctx.start.next_offset,
                start_seq=ctx.start.next_seq,
                start_content=ctx.start.content,
                start_reasoning=ctx.start.reasoning,
                on_checkpoint=on_checkpoint,
            ),
            name=f"relay-{job.id}",
        )
        try:
            return await self._outcome(relay, tap, ctx, final)
        finally:
            if not relay.done():
                relay.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await relay

    async def _outcome(
        self,
        relay: asyncio.Task[RelayResult],
        tap: _Tap,
        ctx: StreamContext,
        final: list[Snapshot],
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
            with contextlib.suppress(asyncio.CancelledError):
                await relay
            return Outcome("interrupted", tap.snapshot())
        result = await relay  # cancelled: the tap ends the stream with llm-done
        snapshot = final[-1] if final else tap.snapshot()
        return self._from_result(result, snapshot, ctx)

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
