"""relay_stream's outcomes: upstream error, takeover offsets, cancellation, checkpoint failure."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

import pytest

from devstack.jwt import api_key
from devstack.realtime import RealtimeServer
from tests.integration.relay_harness import Subscriber, relay_settings, token_source, words
from worker.errors import QueueError, UpstreamError
from worker.relay.batcher import Batch
from worker.relay.publisher import Publisher
from worker.relay.reassembly import StreamReassembly
from worker.relay.stream import relay_stream
from worker.relay.wire import TokenMessage
from worker.transcript import StreamTranscript
from worker.upstream.events import Token, UpstreamEvent

pytestmark = [
    pytest.mark.integration,
]


async def failing_source(n: int) -> AsyncIterator[UpstreamEvent]:
    for i in range(n):
        yield Token("content", f"x{i} ")
    raise UpstreamError("provider went away", type="connection_lost", provider="openai")


async def test_upstream_error_is_published_and_returned(
    server: RealtimeServer, subscriber: Subscriber
) -> None:
    topic, stream = "llm-token:e1", "e-1"
    await subscriber.join(topic)
    settings = relay_settings(server)
    async with Publisher(settings, api_key=api_key("service_role")) as pub:
        result = await relay_stream(
            failing_source(45), publisher=pub, topic=topic, stream_id=stream, settings=settings
        )

        def errored() -> bool:
            st = subscriber.topics[topic].streams.get(stream)
            return st is not None and st.error is not None and st.next_offset == 45

        await subscriber.wait_until(errored, 10)
    assert isinstance(result.error, UpstreamError) and result.error.type == "connection_lost"
    state = subscriber.stream(topic, stream)
    assert state.error is not None
    assert (state.error.type, state.error.retryable, state.error.tokens_relayed) == (
        "connection_lost",
        True,
        45,
    )
    assert state.text()[0] == "".join(f"x{i} " for i in range(45))
    assert state.done is None


async def test_takeover_continues_offsets_and_checksums_cover_the_whole_text(
    server: RealtimeServer, subscriber: Subscriber
) -> None:
    topic, stream = "llm-token:e2", "e-2"
    await subscriber.join(topic)
    settings = relay_settings(server)
    first, second = words(30, prefix="a"), words(50, prefix="b")
    async with Publisher(settings, api_key=api_key("service_role")) as pub:
        snap = StreamTranscript()

        # The first worker relays 30 tokens and "crashes" (its iterator just stops).
        await relay_stream(
            token_source(first, finish=False),
            publisher=pub,
            topic="llm-token:e2-old",
            stream_id=stream,
            settings=settings,
            transcript=snap,
        )
        assert (snap.next_offset, snap.content) == (30, "".join(first))
        # The new worker continues from the snapshot.
        result = await relay_stream(
            token_source(second),
            publisher=pub,
            topic=topic,
            stream_id=stream,
            settings=settings,
            start_offset=snap.next_offset,
            start_seq=snap.next_seq,
            start_content=snap.content,
        )

        # This subscriber never saw offsets 0..29 (another topic): it holds 30..79.
        def held_all() -> bool:
            st = subscriber.topics[topic].streams.get(stream)
            return st is not None and st.done is not None and _held_tokens(st) == 50

        await subscriber.wait_until(held_all, 10)
        state = subscriber.stream(topic, stream)
    assert result.content == "".join(first + second) and result.next_offset == 80
    assert state.next_offset == 0 and not state.complete
    assert state.done is not None and state.done.total_tokens == 80
    # A late subscriber starts from the snapshot and applies the live messages.
    late = StreamReassembly(stream, next_offset=snap.next_offset, content=snap.content)
    for seq_msgs in _token_messages(subscriber, topic, stream):
        late.apply(seq_msgs)
    late.apply(state.done)
    assert late.complete and late.checksums_match()
    assert late.text() == ("".join(first + second), "")


def _held_tokens(state: StreamReassembly) -> int:
    return sum(len(m.tokens) for msgs in state._held.values() for m in msgs)


def _token_messages(sub: Subscriber, topic: str, stream: str) -> list[TokenMessage]:
    # What the subscriber held (offset 30 onwards, waiting for 0..29): replay it.
    held = sub.stream(topic, stream)._held
    return [m for off in sorted(held) for m in held[off]]


async def test_cancellation_stops_the_relay(server: RealtimeServer) -> None:
    settings = relay_settings(server)
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[UpstreamEvent]:
        try:
            i = 0
            while True:
                yield Token("content", f"{i} ")
                i += 1
                await asyncio.sleep(0.001)
        finally:
            closed.set()

    async with Publisher(settings, api_key=api_key("service_role")) as pub:
        task = asyncio.create_task(
            relay_stream(
                endless(), publisher=pub, topic="llm-token:c", stream_id="c", settings=settings
            )
        )
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(closed.wait(), 5)
        assert pub.active_streams(time.monotonic()) == 0  # no longer counts for the share


async def test_checkpoint_failure_propagates(server: RealtimeServer) -> None:
    settings = relay_settings(server)

    async def lost_lease(_: Sequence[Batch]) -> None:
        raise QueueError("lease lost", job_id="j1")

    async with Publisher(settings, api_key=api_key("service_role")) as pub:
        with pytest.raises(QueueError):
            await asyncio.wait_for(
                relay_stream(
                    token_source(words(2000), per_token_s=0.001),
                    publisher=pub,
                    topic="llm-token:q",
                    stream_id="q",
                    settings=settings,
                    durable=lost_lease,
                ),
                20,
            )


async def test_idle_topics_leave_their_channel(server: RealtimeServer) -> None:
    """Every session has its own topic and Realtime allows 100 channels per socket."""
    settings = relay_settings(server)
    async with Publisher(settings, api_key=api_key("service_role")) as pub:
        pub.topic_linger_s = 0.2
        await pub.wait_connected(5)
        for i in range(3):
            await relay_stream(
                token_source(words(30)),
                publisher=pub,
                topic=f"llm-token:idle-{i}",
                stream_id=f"i-{i}",
                settings=settings,
            )

        def server_channels() -> int:
            return sum(
                len(sock.channels)
                for tenant in server.tenants.values()
                for sock in tenant.sockets
                if sock.apikey_claims.get("role") == "service_role"
            )

        async with asyncio.timeout(5):
            while True:
                if not pub.topics and not server_channels():
                    break
                await asyncio.sleep(0.05)
        assert pub.state.value == "connected"
        # A new stream on a retired topic joins again and is delivered.
        result = await relay_stream(
            token_source(words(5)),
            publisher=pub,
            topic="llm-token:idle-0",
            stream_id="i-again",
            settings=settings,
        )
        assert result.error is None and result.messages >= 2
