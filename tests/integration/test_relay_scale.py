"""More streams than one Realtime socket carries, with the stand-in's real limits on
(100 channels per socket, 100 joins/s, 200 connected users, real join-error delays);
only the message quota is raised, as a large plan has it (issue 16)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from devstack.jwt import api_key
from devstack.realtime import RealtimeLimits, RealtimeServer
from tests.integration.relay_harness import Subscriber, publisher_sockets, relay_settings, words
from worker.relay.publisher import Publisher
from worker.relay.stream import RelayResult, relay_stream
from worker.upstream.events import Finished, Token, UpstreamEvent

pytestmark = [pytest.mark.integration]

STREAMS = 130  # > 100: one socket cannot hold them all
TOKENS = 40
SUBSCRIBER_CHANNELS = 50  # per subscriber socket, under the same limit
BOUND_S = 50.0


@pytest.fixture
async def real_limits() -> AsyncIterator[RealtimeServer]:
    srv = RealtimeServer(limits=RealtimeLimits(max_events_per_second=1_000_000))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


async def paced(content: list[str], per_token_s: float) -> AsyncIterator[UpstreamEvent]:
    for text in content:
        yield Token("content", text)
        await asyncio.sleep(per_token_s)
    yield Finished("stop")


async def test_130_streams_spread_over_sockets_all_exact(real_limits: RealtimeServer) -> None:
    server = real_limits
    topics = [f"llm-token:scale-{i}" for i in range(STREAMS)]
    subs = [Subscriber(server, api_key("anon")) for _ in range(0, STREAMS, SUBSCRIBER_CHANNELS)]
    settings = relay_settings(server, relay_ack_timeout_s=2.0, relay_joins_per_second=80)
    content = words(TOKENS)
    peak_channels = 0
    try:
        for i, topic in enumerate(topics):
            await subs[i // SUBSCRIBER_CHANNELS].join(topic)
        async with Publisher(settings, api_key=api_key("service_role")) as pub:
            await pub.wait_connected(10)

            async def one(i: int) -> RelayResult:
                return await relay_stream(
                    paced(content, 0.01),
                    publisher=pub,
                    topic=topics[i],
                    stream_id=f"sc-{i}",
                    settings=settings,
                )

            async with asyncio.timeout(BOUND_S):
                tasks = [asyncio.create_task(one(i)) for i in range(STREAMS)]
                while not all(t.done() for t in tasks):
                    channels = [len(s.channels) for s in publisher_sockets(server)]
                    peak_channels = max(peak_channels, *channels, 0)
                    await asyncio.sleep(0.05)
                results = [t.result() for t in tasks]
                for i, topic in enumerate(topics):
                    await subs[i // SUBSCRIBER_CHANNELS].wait_complete(topic, f"sc-{i}")
            assert all(r.error is None and r.next_offset == TOKENS for r in results)
            assert pub.links >= 2 and peak_channels <= 100
            # Liveness by the server: no socket was judged dead and replaced.
            assert pub.clients_created == pub.links
            # Channels of finished streams are left at once.
            deadline = time.monotonic() + 10
            while any(s.channels for s in publisher_sockets(server)):
                assert time.monotonic() < deadline, "channels of finished streams linger"
                await asyncio.sleep(0.05)
            assert not pub.topics
    finally:
        for sub in subs:
            await sub.close()
    for i, topic in enumerate(topics):
        state = subs[i // SUBSCRIBER_CHANNELS].stream(topic, f"sc-{i}")
        assert state.complete and state.checksums_match()
        assert state.text() == ("".join(content), "")
