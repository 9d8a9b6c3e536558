"""A handover (SIGTERM drain) releases exactly what subscribers were sent (issue 14).

The released snapshot is where the next worker starts. It used to count every event
handed to the relay, including tokens still waiting in the relay's queue or batcher;
when the relay could not flush them within its short handover window (here: the
upstream connection is slow to close, so the handover status comes late), they were
dropped but counted, and the next worker started past them: a gap for every
subscriber. Real sockets: the real runner and publisher, local Realtime, a realtime-py
subscriber applying the client rule.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest

from devstack.jwt import api_key
from devstack.realtime import RealtimeServer
from tests.integration.relay_harness import Subscriber, relay_settings, words
from worker.jobs.models import Job, Snapshot
from worker.relay.publisher import Publisher
from worker.service.context import StreamContext
from worker.service.runner import RelayRunner
from worker.upstream.client import UpstreamClient
from worker.upstream.events import GenerationRequest, Token, UpstreamEvent

pytestmark = [pytest.mark.integration]

HELLO = [{"role": "user", "content": "hello"}]
TOKENS = words(50)


class SlowToCloseUpstream:
    """Streams 50 tokens at once, then waits; closing its connection takes a second."""

    def __init__(self) -> None:
        self.given = 0

    async def stream_batches(
        self, request: GenerationRequest, pace: object = None
    ) -> AsyncIterator[list[UpstreamEvent]]:
        try:
            for text in TOKENS:
                self.given += 1
                yield [Token("content", text)]
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(1.0)  # a congested TLS close, say

    async def aclose(self) -> None:
        pass


async def test_a_handover_releases_exactly_what_was_published(
    server: RealtimeServer, subscriber: Subscriber
) -> None:
    topic, stream_id = "llm-token:handover", "00000000-0000-4000-8000-00000000a001"
    await subscriber.join(topic)
    # Big, slow batches: after the first token, the rest waits in the batcher.
    settings = relay_settings(server, relay_batch_size=1000, relay_max_batch_delay_ms=5000.0)
    upstream = SlowToCloseUpstream()
    job = Job(stream_id, "s", "u", None, None, HELLO, {}, 1, Snapshot())
    ctx = StreamContext(job, GenerationRequest(HELLO), topic=topic)
    async with Publisher(settings, api_key=api_key("service_role")) as publisher:
        await publisher.wait_connected(5)
        async with RelayRunner(
            settings, publisher=publisher, upstream=cast(UpstreamClient, cast(Any, upstream))
        ) as runner:
            run = asyncio.create_task(runner(job, ctx))
            async with asyncio.timeout(10):
                while True:
                    if upstream.given == len(TOKENS):
                        break
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # the relay took them all in
            ctx.abort("shutdown", within_s=1.5)
            outcome = await asyncio.wait_for(run, 10)
        await asyncio.sleep(0.3)  # what was handed to the publisher is delivered by now
    assert outcome.kind == "interrupted"
    released = outcome.snapshot
    state = subscriber.stream(topic, stream_id)
    # The next worker starts at `released.next_offset`: exactly where the subscriber is.
    assert state.held_messages == 0
    assert released.next_offset == state.next_offset
    assert released.content == state.text()[0] == "".join(TOKENS[: released.next_offset])
