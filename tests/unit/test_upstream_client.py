"""The client against scripted byte streams (httpx.MockTransport): framing and edges."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from worker.config import Settings
from worker.errors import UpstreamError
from worker.upstream.client import UpstreamClient
from worker.upstream.events import Finished, GenerationRequest, Token, UpstreamEvent

REQUEST = GenerationRequest(messages=[{"role": "user", "content": "hi"}], model="m")


def settings(**kw: Any) -> Settings:
    values: dict[str, Any] = {
        "openai_api_key": "sk-test",
        "openai_base_url": "http://upstream.test/v1",
        "relay_upstream_retries": 0,
    }
    values.update(kw)
    return Settings(_env_file=None, **values)


class Chunks(httpx.AsyncByteStream):
    """Bytes delivered in exactly the given reads."""

    def __init__(self, reads: list[bytes]) -> None:
        self.reads = reads
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for read in self.reads:
            await asyncio.sleep(0)
            yield read

    async def aclose(self) -> None:
        self.closed = True


def transport(
    reads: list[bytes], status: int = 200, content_type: str = "text/event-stream"
) -> tuple[httpx.MockTransport, list[httpx.Request], Chunks]:
    seen: list[httpx.Request] = []
    stream = Chunks(reads)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, headers={"content-type": content_type}, stream=stream)

    return httpx.MockTransport(handler), seen, stream


async def run(mock: httpx.MockTransport, **kw: Any) -> list[UpstreamEvent]:
    async with UpstreamClient(settings(**kw), transport=mock) as client:
        return [event async for event in client.stream(REQUEST)]


def chunk(content: str | None = None, finish: str | None = None) -> bytes:
    delta = {} if content is None else {"content": content}
    body = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}], "model": "m"}
    return b"data: " + orjson.dumps(body) + b"\n\n"


async def test_reads_split_anywhere_give_the_same_tokens() -> None:
    wire = (
        chunk("Hé")
        + chunk("llo 🦀")
        + b": keep-alive\r\n\r\n"
        + chunk(None, "stop")
        + (b"data: [DONE]\n\n")
    )
    for cut in range(1, len(wire), 7):
        mock, _, _ = transport([wire[:cut], wire[cut:]])
        events = await run(mock)
        assert [e.text for e in events if isinstance(e, Token)] == ["Hé", "llo 🦀"]
        assert isinstance(events[-1], Finished) and events[-1].usage_estimated


async def test_request_shape() -> None:
    mock, seen, _ = transport([chunk("a"), chunk(None, "stop"), b"data: [DONE]\n\n"])
    request = GenerationRequest(
        messages=REQUEST.messages, model="m", max_tokens=5, temperature=0.2, extra={"seed": 1}
    )
    async with UpstreamClient(settings(), transport=mock) as client:
        [e async for e in client.stream(request)]
    sent = seen[0]
    assert sent.url == "http://upstream.test/v1/chat/completions"
    assert sent.headers["authorization"] == "Bearer sk-test"
    body = orjson.loads(sent.content)
    assert body == {
        "model": "m",
        "messages": REQUEST.messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_completion_tokens": 5,
        "temperature": 0.2,
        "seed": 1,
    }


@pytest.mark.parametrize(
    ("body", "content_type", "kind"),
    [
        (b"<html><title>Gateway</title></html>", "text/html", "malformed"),
        (
            b'{"error": {"message": "overloaded", "type": "server_error"}}',
            "application/json",
            "server_error",
        ),
    ],
)
async def test_200_that_is_not_a_stream(body: bytes, content_type: str, kind: str) -> None:
    mock, _, _ = transport([body], content_type=content_type)
    with pytest.raises(UpstreamError) as info:
        await run(mock)
    assert info.value.type == kind


async def test_consumer_stopping_early_closes_the_response() -> None:
    mock, _, stream = transport([chunk("a"), chunk("b"), chunk(None, "stop")])
    async with UpstreamClient(settings(), transport=mock) as client:
        events = client.stream(REQUEST)
        assert await anext(events) == Token("content", "a")
        await events.aclose()
    assert stream.closed


async def test_cancellation_propagates_and_closes() -> None:
    gate = asyncio.Event()

    class Slow(Chunks):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield chunk("a")
            await gate.wait()
            yield chunk("never")

    stream = Slow([])
    mock = httpx.MockTransport(
        lambda r: httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=stream)
    )
    got: list[UpstreamEvent] = []
    first = asyncio.Event()

    async def consume(client: UpstreamClient) -> None:
        async for event in client.stream(REQUEST):
            got.append(event)
            first.set()

    async with UpstreamClient(settings(), transport=mock) as client:
        task = asyncio.create_task(consume(client))
        await asyncio.wait_for(first.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert got == [Token("content", "a")] and stream.closed
