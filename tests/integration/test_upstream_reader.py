"""The streamed read without a coroutine per network read (issue 16): events decoded in
the transport's callback and handed over a window at a time, over real sockets, with
both readers (`protocol`, the default, and `httpx`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from devstack.upstream import Fault, SimulatedUpstream
from devstack.upstream.tokens import tokenize
from tests.integration.test_upstream_client import KEY, REQUEST, settings_for
from worker.errors import UpstreamError
from worker.upstream.buffer import EventBatch
from worker.upstream.client import UpstreamClient
from worker.upstream.events import Finished, Token, UpstreamEvent

pytestmark = pytest.mark.integration

LONG = " ".join(f"word{i} 🦀 世界" for i in range(120))
READERS = ["protocol", "httpx"]


@pytest.fixture
async def paced() -> AsyncIterator[SimulatedUpstream]:
    async with SimulatedUpstream(text=LONG, api_key=KEY, tokens_per_second=400) as upstream:
        yield upstream


async def batches_of(
    client: UpstreamClient, *, pause_s: float = 0.0, within_s: float = 30.0
) -> list[list[UpstreamEvent]]:
    """Every wake-up's events; `pause_s` makes the consumer slow (a relay waiting for
    its commits), so events pile up in the buffer between two takes."""
    out: list[list[UpstreamEvent]] = []
    async with asyncio.timeout(within_s):
        async for batch in client.stream_batches(REQUEST):
            out.append(list(batch))
            if pause_s:
                await asyncio.sleep(pause_s)
    return out


def tokens_of(batches: list[list[UpstreamEvent]]) -> list[str]:
    return [e.text for batch in batches for e in batch if isinstance(e, Token)]


@pytest.mark.parametrize("reader", READERS)
async def test_a_slow_consumer_still_gets_every_token_before_the_end(
    paced: SimulatedUpstream, reader: str
) -> None:
    """The end of the body (and `[DONE]`) arrived while the consumer was away: the
    tokens read before it are still yielded, then `Finished` (they were dropped once)."""
    async with UpstreamClient(settings_for(paced, relay_upstream_reader=reader)) as client:
        batches = await batches_of(client, pause_s=0.15)
    assert tokens_of(batches) == tokenize(LONG)
    last = batches[-1][-1]
    assert isinstance(last, Finished) and last.finish_reason == "stop"


@pytest.mark.parametrize("reader", READERS)
async def test_tokens_read_before_a_failure_come_before_the_error(
    paced: SimulatedUpstream, reader: str
) -> None:
    paced.faults.push(Fault.malformed(after_tokens=50))
    got: list[str] = []
    settings = settings_for(paced, relay_upstream_reader=reader, relay_upstream_retries=0)
    async with UpstreamClient(settings) as client:
        with pytest.raises(UpstreamError) as info:
            async with asyncio.timeout(30):
                async for batch in client.stream_batches(REQUEST):
                    got += [e.text for e in batch if isinstance(e, Token)]
                    await asyncio.sleep(0.2)  # the failure arrives while we are away
    assert info.value.type == "malformed"
    assert got == tokenize(LONG)[:50]


async def test_reads_are_handed_over_a_window_at_a_time(paced: SimulatedUpstream) -> None:
    """At 400 tok/s one token a read, a 50 ms window hands over ~20 tokens per wake-up,
    the first token alone and at once; each batch says when its oldest event was read."""
    settings = settings_for(paced, relay_max_batch_delay_ms=50.0, relay_batch_size=1000)
    async with UpstreamClient(settings) as client:
        started = time.monotonic()
        first_at: float | None = None
        batches: list[EventBatch] = []
        async with asyncio.timeout(30):
            async for batch in client.stream_batches(REQUEST):
                if first_at is None:
                    first_at = time.monotonic()
                assert isinstance(batch, EventBatch)
                assert batch.arrived_at <= asyncio.get_running_loop().time()
                batches.append(batch)
    tokens = sum(1 for b in batches for e in b if isinstance(e, Token))
    assert tokens == len(tokenize(LONG))
    assert [e for e in batches[0] if isinstance(e, Token)] == [Token("content", tokenize(LONG)[0])]
    assert first_at is not None and first_at - started < 2.0
    # Per-read hand-over would give one batch per token (~720); a window gives ~tokens/20.
    assert len(batches) < tokens / 5, (len(batches), tokens)


async def test_the_window_is_cut_short_by_a_full_batch(paced: SimulatedUpstream) -> None:
    settings = settings_for(paced, relay_max_batch_delay_ms=5000.0, relay_batch_size=10)
    async with UpstreamClient(settings) as client:
        batches = await batches_of(client)
    sizes = [sum(1 for e in b if isinstance(e, Token)) for b in batches]
    assert sum(sizes) == len(tokenize(LONG))
    assert max(sizes) <= 20  # a full batch wakes the reader (a read may add one more)
    assert len(batches) > len(tokenize(LONG)) / 20


async def test_an_idle_stream_is_timed_out_with_the_protocol_reader(
    paced: SimulatedUpstream,
) -> None:
    paced.faults.push(Fault.hang(after_tokens=5))
    settings: Any = settings_for(paced, relay_idle_timeout_s=0.5, relay_upstream_retries=0)
    async with UpstreamClient(settings) as client:
        started = time.monotonic()
        with pytest.raises(UpstreamError) as info:
            await batches_of(client, within_s=10)
    assert info.value.type == "timeout" and "idle" in info.value.message
    assert time.monotonic() - started < 5.0
    assert info.value.tokens_received == 5
