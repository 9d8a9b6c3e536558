"""More concurrent streams than httpx's default pool (100) all get a connection."""

from __future__ import annotations

import asyncio

import pytest

from devstack.upstream import SimulatedUpstream
from worker.config import Settings
from worker.upstream.client import UpstreamClient
from worker.upstream.events import Finished, GenerationRequest, Token

pytestmark = pytest.mark.integration
STREAMS = 120  # > 100, httpx's default max_connections
TEXT = "one two three four five six seven eight nine ten eleven twelve"


async def test_streams_beyond_httpx_default_pool_all_complete() -> None:
    # Each stream lasts ~1.2 s (12 tokens at 10/s), far longer than the 0.3 s a request
    # may wait for a pool slot: with a 100-connection pool, streams 101-120 would fail.
    async with SimulatedUpstream(text=TEXT, tokens_per_second=10, api_key="k") as upstream:
        settings = Settings(
            openai_base_url=upstream.base_url,
            openai_api_key="k",
            relay_concurrency=STREAMS,
            relay_connect_timeout_s=0.3,
            relay_upstream_retries=0,
        )
        async with UpstreamClient(settings) as client:

            async def one() -> str:
                request = GenerationRequest(messages=[{"role": "user", "content": "go"}])
                text, finished = [], False
                async for event in client.stream(request):
                    if isinstance(event, Token):
                        text.append(event.text)
                    finished = finished or isinstance(event, Finished)
                assert finished
                return "".join(text)

            async with asyncio.timeout(60):
                texts = await asyncio.gather(*(one() for _ in range(STREAMS)))
    assert texts == [TEXT] * STREAMS
