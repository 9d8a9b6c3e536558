"""The whole provider path, end to end, over real sockets: simulated upstream (with
faults) -> UpstreamClient -> relay_stream -> local Realtime server -> an independent
realtime-py subscriber applying the client rule. What the browser would see."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from devstack.jwt import api_key
from devstack.realtime import RealtimeServer
from devstack.upstream import Fault, SimulatedUpstream, tokenize
from tests.integration.relay_harness import Subscriber, relay_settings
from worker.errors import UpstreamError
from worker.relay.publisher import Publisher
from worker.relay.reassembly import StreamReassembly
from worker.relay.stream import RelayResult, relay_stream
from worker.upstream.client import UpstreamClient
from worker.upstream.events import GenerationRequest

pytestmark = [
    pytest.mark.integration,
]

TEXT = "Relayed end to end: every token, exactly once — 🦀 世界 included.\n"
KEY = "sk-devstack"


@pytest.fixture
async def upstream() -> AsyncIterator[SimulatedUpstream]:
    async with SimulatedUpstream(text=TEXT, api_key=KEY, tokens_per_second=400) as up:
        yield up


async def relay(
    server: RealtimeServer,
    subscriber: Subscriber,
    upstream: SimulatedUpstream,
    stream_id: str,
    **overrides: Any,
) -> RelayResult:
    topic = f"llm-token:{stream_id}"
    await subscriber.join(topic)
    values: dict[str, Any] = {
        "openai_base_url": upstream.base_url,
        "openai_api_key": KEY,
        "relay_upstream_retry_base_s": 0.01,
        "relay_first_token_timeout_s": 5.0,
    }
    values.update(overrides)
    settings = relay_settings(server, **values)
    request = GenerationRequest(messages=[{"role": "user", "content": "go"}])
    async with (
        Publisher(settings, api_key=api_key("service_role")) as publisher,
        UpstreamClient(settings) as client,
    ):
        await publisher.wait_connected(5)
        result = await relay_stream(
            client.stream(request),
            publisher=publisher,
            topic=topic,
            stream_id=stream_id,
            settings=settings,
        )
    return result


async def wait_error(subscriber: Subscriber, stream_id: str) -> StreamReassembly:
    """The llm-error follows the last ack; give its delivery to the subscriber a moment."""
    async with asyncio.timeout(10):
        while True:
            state = subscriber.topics[f"llm-token:{stream_id}"].streams.get(stream_id)
            if state is not None and state.error is not None:
                return state
            await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    "fault",
    [
        Fault.reset(after_tokens=0),
        Fault.rate_limit(retry_after_ms=50),
        Fault.html_502(),
        Fault.error_event(after_tokens=0, as_event=True),
        Fault.truncate(after_tokens=0),
    ],
    ids=["reset", "429", "html502", "error-event", "truncate"],
)
async def test_failures_before_the_first_token_are_invisible_but_announced(
    server: RealtimeServer, subscriber: Subscriber, upstream: SimulatedUpstream, fault: Fault
) -> None:
    upstream.faults.push(fault)
    result = await relay(server, subscriber, upstream, "pre")
    await subscriber.wait_complete("llm-token:pre", "pre")
    state = subscriber.stream("llm-token:pre", "pre")
    assert result.error is None and state.text() == (TEXT, "")
    assert state.checksums_match() and state.duplicate_tokens == 0
    assert [s.status for s in state.statuses] == ["retrying"]
    assert state.done is not None and state.done.usage_estimated is False
    assert state.done.total_tokens == len(tokenize(TEXT))


async def test_midstream_reset_stops_honestly(
    server: RealtimeServer, subscriber: Subscriber, upstream: SimulatedUpstream
) -> None:
    upstream.faults.push(Fault.reset(after_tokens=6))
    result = await relay(server, subscriber, upstream, "mid")
    assert isinstance(result.error, UpstreamError)
    assert result.error.type == "connection_lost" and result.error.tokens_received == 6
    assert result.content == "".join(tokenize(TEXT)[:6])
    state = await wait_error(subscriber, "mid")
    assert state.error is not None and state.error.tokens_relayed == 6
    assert state.error.type == "connection_lost"
    assert state.text()[0] == result.content  # the client shows what the transcript holds


async def test_midstream_continue_tells_the_client(
    server: RealtimeServer, subscriber: Subscriber, upstream: SimulatedUpstream
) -> None:
    upstream.faults.push(Fault.reset(after_tokens=6))
    result = await relay(server, subscriber, upstream, "cont", relay_midstream_recovery="continue")
    await subscriber.wait_complete("llm-token:cont", "cont")
    state = subscriber.stream("llm-token:cont", "cont")
    assert result.error is None and state.text() == (TEXT, "") == (result.content, "")
    assert [s.status for s in state.statuses] == ["resuming"]
    assert state.done is not None and state.done.usage_estimated is True  # 1st part estimated


async def test_idle_hang_mid_stream_becomes_an_error(
    server: RealtimeServer, subscriber: Subscriber, upstream: SimulatedUpstream
) -> None:
    upstream.faults.push(Fault.hang(after_tokens=4))
    result = await relay(server, subscriber, upstream, "hang", relay_idle_timeout_s=0.3)
    assert isinstance(result.error, UpstreamError) and result.error.type == "timeout"
    state = await wait_error(subscriber, "hang")
    assert state.error is not None and state.error.tokens_relayed == 4
