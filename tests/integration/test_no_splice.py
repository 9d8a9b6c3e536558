"""No splice, ever: a mid-stream recovery that would change what a client already has
ends the stream honestly instead (issue 14).

With RELAY_MIDSTREAM_RECOVERY=continue, a stream that fails after relaying tool-call
deltas, or only reasoning, cannot be continued by asking the model (arguments cannot
be resumed; there is no partial answer to append). Before, it silently became a
*restart*: `llm-status reset` (which no client handles) and an `llm-done` carrying the
tool-call arguments of both attempts concatenated. Real sockets: simulated upstream
-> the real `UpstreamClient` -> the real pump -> local Realtime -> a realtime-py
subscriber applying the client rule.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from devstack.jwt import api_key
from devstack.realtime import RealtimeServer
from devstack.upstream import Fault, SimulatedUpstream, tokenize
from tests.integration.relay_harness import Subscriber, relay_settings
from worker.relay.publisher import Publisher
from worker.relay.reassembly import StreamReassembly
from worker.relay.stream import relay_stream
from worker.upstream.client import UpstreamClient
from worker.upstream.events import GenerationRequest

pytestmark = [pytest.mark.integration]

KEY = "sk-devstack"
ARGUMENTS = json.dumps({"city": "Paris", "notes": "x" * 40})
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]


@pytest.fixture
async def upstream() -> AsyncIterator[SimulatedUpstream]:
    async with SimulatedUpstream(
        text="Sunny.",
        reasoning_text="Let me think about the weather in Paris before answering.",
        tool_call=("get_weather", ARGUMENTS),
        api_key=KEY,
        tokens_per_second=400,
    ) as up:
        yield up


async def relay_with_a_reset(
    server: RealtimeServer,
    subscriber: Subscriber,
    upstream: SimulatedUpstream,
    stream_id: str,
    *,
    tools: bool,
    after_tokens: int,
) -> StreamReassembly:
    topic = f"llm-token:{stream_id}"
    await subscriber.join(topic)
    upstream.faults.push(Fault("reset", after_tokens=after_tokens))
    settings = relay_settings(
        server,
        openai_base_url=upstream.base_url,
        openai_api_key=KEY,
        relay_midstream_recovery="continue",
        relay_midstream_max_recoveries=1,
        relay_upstream_retry_base_s=0.01,
    )
    extra = {"tools": TOOLS} if tools else {}
    request = GenerationRequest(messages=[{"role": "user", "content": "go"}], extra=extra)
    async with (
        Publisher(settings, api_key=api_key("service_role")) as publisher,
        UpstreamClient(settings) as client,
    ):
        await publisher.wait_connected(5)
        await relay_stream(
            client.stream(request),
            publisher=publisher,
            topic=topic,
            stream_id=stream_id,
            settings=settings,
        )

    def ended() -> bool:
        state = subscriber.topics[topic].streams.get(stream_id)
        return state is not None and (state.done is not None or state.error is not None)

    await subscriber.wait_until(ended, 10)
    await asyncio.sleep(0.1)  # anything published after the end would arrive by now
    return subscriber.stream(topic, stream_id)


async def test_a_broken_tool_call_stream_ends_honestly_and_never_concatenates_arguments(
    server: RealtimeServer, subscriber: Subscriber, upstream: SimulatedUpstream
) -> None:
    reasoning_tokens = len(tokenize(upstream.reasoning_text))  # the reset hits inside the
    state = await relay_with_a_reset(
        server, subscriber, upstream, "tool-1", tools=True, after_tokens=reasoning_tokens + 3
    )  # tool-call deltas, after the reasoning
    assert "reset" not in [s.status for s in state.statuses]
    if state.done is not None:  # any llm-done must carry well-formed arguments
        for call in state.done.tool_calls:
            json.loads(call["arguments"])
    assert state.done is None
    assert state.error is not None and state.error.type == "connection_lost"
    assert state.error.tokens_relayed == state.next_offset
    assert len(upstream.requests) == 1  # no second generation was asked for


async def test_a_broken_reasoning_only_stream_ends_honestly_instead_of_restarting(
    server: RealtimeServer, subscriber: Subscriber, upstream: SimulatedUpstream
) -> None:
    state = await relay_with_a_reset(
        server, subscriber, upstream, "reason-1", tools=False, after_tokens=5
    )
    assert "reset" not in [s.status for s in state.statuses]
    shown = state.text()[1]
    # what was shown is a prefix of one generation's reasoning, not two spliced
    assert upstream.reasoning_text.startswith(shown) and state.next_offset == 5
    assert state.error is not None and state.error.tokens_relayed == 5
    assert len(upstream.requests) == 1
