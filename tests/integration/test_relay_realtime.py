"""relay_stream + Publisher against the local Realtime server, each checked by an
independent realtime-py subscriber applying the client rule (exact reassembly)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest
from prometheus_client import REGISTRY

from devstack.jwt import api_key
from devstack.realtime import RealtimeServer
from tests.integration.relay_harness import (
    Subscriber,
    publisher_sockets,
    relay_settings,
    token_source,
    words,
)
from worker.relay.batcher import Batch
from worker.relay.publisher import Publisher, PublisherState
from worker.relay.stream import relay_stream
from worker.relay.wire import text_checksum
from worker.upstream.events import Status

pytestmark = [
    pytest.mark.integration,
]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def assert_exact(sub: Subscriber, topic: str, stream: str, content: str, reasoning: str) -> None:
    state = sub.stream(topic, stream)
    assert state.complete and state.held_messages == 0
    assert state.text() == (content, reasoning)
    assert state.checksums_match()


async def test_one_stream_arrives_exactly(server: RealtimeServer, subscriber: Subscriber) -> None:
    topic, stream = "llm-token:s1", "st-1"
    await subscriber.join(topic)
    settings = relay_settings(server)
    durable: list[Batch] = []

    async def write_ahead(batches: Sequence[Batch]) -> None:
        durable.extend(batches)

    content, reasoning = words(300), words(40, prefix="r")
    async with Publisher(settings, api_key=api_key("service_role")) as pub:
        await pub.wait_connected(5)
        result = await relay_stream(
            token_source(
                content,
                reasoning=reasoning,
                per_token_s=0.001,
                statuses={100: Status("retrying", {"attempt": 1})},
            ),
            publisher=pub,
            topic=topic,
            stream_id=stream,
            settings=settings,
            durable=write_ahead,
        )
        await subscriber.wait_complete(topic, stream)
    assert result.error is None and result.finish_reason == "stop"
    assert result.content == "".join(content) and result.reasoning == "".join(reasoning)
    assert result.next_offset == 340 and result.retries == 0
    assert_exact(subscriber, topic, stream, "".join(content), "".join(reasoning))
    state = subscriber.stream(topic, stream)
    # Pipelined, yet every message arrived in order: no gap was ever held, no duplicate.
    assert state.duplicate_tokens == 0 and state.gaps == 0
    assert [s.status for s in state.statuses] == ["retrying"]
    assert state.done is not None and state.done.content_sha256 == text_checksum("".join(content))
    # every token went through the write-ahead hook, once, in offset order
    assert [b.offset for b in durable] == sorted(b.offset for b in durable)
    assert sum(len(b.tokens) for b in durable) == 340 and len(durable) >= 2
    assert "".join(t for b in durable if b.kind == "content" for t in b.tokens) == "".join(content)


async def test_pipelined_pushes_keep_their_order(
    server: RealtimeServer, subscriber: Subscriber
) -> None:
    topic, stream = "llm-token:p1", "p-1"
    await subscriber.join(topic)
    settings = relay_settings(server, relay_ack_timeout_s=1.0, relay_max_in_flight=8)
    server.faults.ack_delay_s = 0.15  # every ack comes late, but within our timeout
    server.faults.ack_shares(delay=1.0)
    content = words(600)
    async with Publisher(settings, api_key=api_key("service_role")) as pub:
        await pub.wait_connected(5)
        result = await relay_stream(
            token_source(content, per_token_s=0.001),
            publisher=pub,
            topic=topic,
            stream_id=stream,
            settings=settings,
        )
        await subscriber.wait_complete(topic, stream)
        assert 1 < pub.max_in_flight_seen <= 8
    assert result.retries == 0
    assert_exact(subscriber, topic, stream, "".join(content), "")
    assert subscriber.stream(topic, stream).gaps == 0


async def test_forced_socket_close_mid_stream(
    server: RealtimeServer, subscriber: Subscriber
) -> None:
    topic, stream = "llm-token:s2", "st-2"
    await subscriber.join(topic)
    settings = relay_settings(server)
    content = words(400)
    async with Publisher(settings, api_key=api_key("service_role")) as pub:
        await pub.wait_connected(5)
        task = asyncio.create_task(
            relay_stream(
                token_source(content, per_token_s=0.002),
                publisher=pub,
                topic=topic,
                stream_id=stream,
                settings=settings,
            )
        )
        for code in (1011, 1000, 1012):
            await asyncio.sleep(0.25)
            socks = publisher_sockets(server)
            assert socks, "the publisher should be connected again"
            for sock in socks:
                sock.close(code, "test")
        result = await asyncio.wait_for(task, 30)
        await subscriber.wait_complete(topic, stream)
        assert pub.reconnections >= 3
    assert result.error is None
    assert_exact(subscriber, topic, stream, "".join(content), "")


async def test_ack_errors_retry_then_token_fallback(
    server: RealtimeServer, subscriber: Subscriber
) -> None:
    topic, stream = "llm-token:s3", "st-3"
    fallbacks_before = metric("relay_fallbacks_total")
    retries_before = metric("relay_retries_total")
    errors_before = metric("relay_flush_failures_total", reason="error")
    await subscriber.join(topic)
    settings = relay_settings(server)
    content = words(6)
    # One message in flight at a time: token 0 (first, alone) is acked; then a batch of
    # five and llm-done go out together; the batch is rejected 4 times (1 + 3 retries).
    server.faults.script_acks("ok", "reject", "ok", "reject", "reject", "reject")
    async with Publisher(settings, api_key=api_key("service_role")) as pub:
        await pub.wait_connected(5)
        result = await relay_stream(
            token_source(content, pause_at={1: 0.3}),
            publisher=pub,
            topic=topic,
            stream_id=stream,
            settings=settings,
        )
        await subscriber.wait_complete(topic, stream)
    assert (result.retries, result.fallbacks) == (3, 1)
    assert metric("relay_fallbacks_total") >= fallbacks_before + 1
    assert metric("relay_retries_total") >= retries_before + 3
    assert metric("relay_flush_failures_total", reason="error") >= errors_before + 4
    assert_exact(subscriber, topic, stream, "".join(content), "")
    # Five one-token pieces replaced the batch: 1 + 1 + 5 messages.
    assert server.stats.replies.get("error") == 4


async def test_random_ack_errors_and_timeouts(
    server: RealtimeServer, subscriber: Subscriber
) -> None:
    topic, stream = "llm-token:s4", "st-4"
    await subscriber.join(topic)
    settings = relay_settings(server, relay_ack_timeout_s=0.3, relay_batch_size=10)
    server.faults.ack_delay_s = 0.6  # later than our ack timeout: delivered twice
    server.faults.ack_shares(reject=0.25, drop=0.15, lose_reply=0.1, delay=0.1, seed=7)
    content, reasoning = words(500), words(100, prefix="r")
    async with Publisher(settings, api_key=api_key("service_role")) as pub:
        await pub.wait_connected(5)
        result = await relay_stream(
            token_source(content, reasoning=reasoning, per_token_s=0.001),
            publisher=pub,
            topic=topic,
            stream_id=stream,
            settings=settings,
        )
        await subscriber.wait_complete(topic, stream, timeout_s=30)
    assert result.error is None
    assert result.retries > 0
    assert_exact(subscriber, topic, stream, "".join(content), "".join(reasoning))
    # lose_reply and late acks mean some tokens arrived more than once: dropped by offset.
    assert subscriber.stream(topic, stream).duplicate_tokens > 0


async def test_too_many_messages_shutdown_rejoins_and_completes(
    server: RealtimeServer, subscriber: Subscriber
) -> None:
    topic, stream = "llm-token:s5", "st-5"
    await subscriber.join(topic)
    settings = relay_settings(server)
    content = words(300)
    async with Publisher(settings, api_key=api_key("service_role")) as pub:
        await pub.wait_connected(5)
        task = asyncio.create_task(
            relay_stream(
                token_source(content, per_token_s=0.002),
                publisher=pub,
                topic=topic,
                stream_id=stream,
                settings=settings,
            )
        )
        await asyncio.sleep(0.2)
        # The server shuts the worker's channel like a tenant over its rate (ref §6).
        for sock in publisher_sockets(server):
            for channel in list(sock.channels.values()):
                sock.shutdown_channel(channel, "Too many messages per second")
        rate_before = pub.budget.rate()
        result = await asyncio.wait_for(task, 30)
        await subscriber.wait_complete(topic, stream)
        assert pub.budget.rate() < pub.budget.full_rate or rate_before < pub.budget.full_rate
        assert any(sock.channels for sock in publisher_sockets(server)), "rejoined"
    assert result.error is None
    assert_exact(subscriber, topic, stream, "".join(content), "")


async def test_rest_fallback_while_the_socket_is_down(
    server: RealtimeServer, subscriber: Subscriber
) -> None:
    topic, stream = "llm-token:s6", "st-6"
    rest_ok_before = metric("relay_rest_sends_total", outcome="ok")
    reconnect_errors_before = metric("relay_reconnections_total", outcome="error")
    await subscriber.join(topic)
    settings = relay_settings(server)
    content = words(300)
    async with Publisher(settings, api_key=api_key("service_role")) as pub:
        await pub.wait_connected(5)
        task = asyncio.create_task(
            relay_stream(
                token_source(content, per_token_s=0.003),
                publisher=pub,
                topic=topic,
                stream_id=stream,
                settings=settings,
            )
        )
        await asyncio.sleep(0.2)
        server.faults.refuse_upgrades = -1
        for sock in publisher_sockets(server):
            sock.close(1011, "test")
        await asyncio.sleep(0.6)
        assert pub.state is not PublisherState.CONNECTED
        server.faults.refuse_upgrades = 0
        try:
            result = await asyncio.wait_for(task, 30)
        except TimeoutError:
            print(pub.describe())
            raise
        await subscriber.wait_complete(topic, stream)
    assert result.error is None
    assert result.rest_messages > 0 and server.stats.rest_messages > 0
    assert metric("relay_rest_sends_total", outcome="ok") >= rest_ok_before + result.rest_messages
    assert metric("relay_reconnections_total", outcome="error") > reconnect_errors_before
    assert_exact(subscriber, topic, stream, "".join(content), "")


async def test_dropped_acks_retry_on_the_same_socket(
    server: RealtimeServer, subscriber: Subscriber
) -> None:
    topic, stream = "llm-token:s7", "st-7"
    await subscriber.join(topic)
    settings = relay_settings(server, relay_ack_timeout_s=0.3)
    content = words(300)
    async with Publisher(settings, api_key=api_key("service_role")) as pub:
        await pub.wait_connected(5)
        task = asyncio.create_task(
            relay_stream(
                token_source(content, per_token_s=0.003),
                publisher=pub,
                topic=topic,
                stream_id=stream,
                settings=settings,
            )
        )
        await asyncio.sleep(0.2)
        # The server swallows every push but answers pings and heartbeats: the socket is
        # alive, only those messages are lost, and they go again on the same socket.
        server.faults.ack_shares(drop=1.0)
        await asyncio.sleep(1.5)
        server.faults.clear()
        result = await asyncio.wait_for(task, 30)
        await subscriber.wait_complete(topic, stream)
        assert pub.clients_created == 1 and pub.reconnections == 1
    assert result.error is None and result.retries > 0
    assert_exact(subscriber, topic, stream, "".join(content), "")


async def test_a_busy_loop_is_not_a_dead_socket(
    server: RealtimeServer, subscriber: Subscriber
) -> None:
    """Acks that are late only because our own loop was blocked are not failures."""
    topic, stream = "llm-token:s8", "st-8"
    await subscriber.join(topic)
    settings = relay_settings(server, relay_ack_timeout_s=0.3, relay_max_batch_delay_ms=5.0)
    content = words(400)
    async with Publisher(settings, api_key=api_key("service_role")) as pub:
        await pub.wait_connected(5)
        task = asyncio.create_task(
            relay_stream(
                token_source(content, per_token_s=0.002),
                publisher=pub,
                topic=topic,
                stream_id=stream,
                settings=settings,
            )
        )
        for _ in range(3):
            await asyncio.sleep(0.15)
            time.sleep(1.0)  # noqa: ASYNC251 - the loop blocked with pushes in flight (overload)
        result = await asyncio.wait_for(task, 30)
        await subscriber.wait_complete(topic, stream)
        assert pub.clients_created == 1 and pub.reconnections == 1
        assert pub.lag_s > 0  # the delay was measured
    assert result.error is None and result.retries == 0
    assert_exact(subscriber, topic, stream, "".join(content), "")
