"""The simulated upstream's wire format, read raw over a real socket (no parser of ours
except the SSE decoder, itself tested byte by byte)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from devstack.upstream import Fault, SimulatedUpstream, tokenize
from worker.upstream.sse import SSEDecoder

pytestmark = pytest.mark.integration

KEY = "sk-devstack"
TEXT = "Hi there, 世界 🦀!"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


async def raw_stream(
    http: httpx.AsyncClient, up: SimulatedUpstream, body: dict[str, Any]
) -> tuple[httpx.Response, list[str]]:
    payload = {"messages": [{"role": "user", "content": "hello"}], "stream": True, **body}
    decoder = SSEDecoder()
    data: list[str] = []
    async with http.stream(
        "POST", up.base_url + "/chat/completions", json=payload, headers=AUTH
    ) as response:
        async for read in response.aiter_bytes():
            data.extend(event.data for event in decoder.feed(read))
    data.extend(event.data for event in decoder.flush())
    return response, data


async def test_openai_wire_format(http: httpx.AsyncClient) -> None:
    async with SimulatedUpstream(text=TEXT, api_key=KEY) as up:
        body = {"model": "gpt-4o-mini", "stream_options": {"include_usage": True}}
        response, data = await raw_stream(http, up, body)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert data[-1] == "[DONE]"
    chunks = [orjson.loads(d) for d in data[:-1]]
    first, *middle, last, usage = chunks
    assert list(first) == [
        "id",
        "object",
        "created",
        "model",
        "service_tier",
        "system_fingerprint",
        "choices",
        "usage",
    ]
    assert first["object"] == "chat.completion.chunk" and first["id"].startswith("chatcmpl-")
    assert first["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": "", "refusal": None},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    assert all(c["usage"] is None for c in [first, *middle, last])  # include_usage rule
    assert "".join(c["choices"][0]["delta"]["content"] for c in middle) == TEXT
    assert [c["choices"][0]["delta"]["content"] for c in middle] == tokenize(TEXT)
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "stop"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(middle)
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1


async def test_openai_without_include_usage_has_no_usage(http: httpx.AsyncClient) -> None:
    async with SimulatedUpstream(text=TEXT, api_key=KEY) as up:
        _, data = await raw_stream(http, up, {})
    chunks = [orjson.loads(d) for d in data[:-1]]
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_groq_wire_format(http: httpx.AsyncClient) -> None:
    async with SimulatedUpstream(
        provider="groq", text=TEXT, reasoning_text="Hmm.", api_key=KEY
    ) as up:
        _, data = await raw_stream(http, up, {"model": "qwen/qwen3-32b"})
    assert data[-1] == "[DONE]"
    chunks = [orjson.loads(d) for d in data[:-1]]
    first, last = chunks[0], chunks[-1]
    assert first["x_groq"]["id"].startswith("req_") and "usage" not in first["x_groq"]
    assert "service_tier" not in first
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"] for c in chunks[1:-1]]
    assert "".join(d.get("reasoning", "") for d in deltas) == "Hmm."
    assert "".join(d.get("content", "") for d in deltas) == TEXT
    reasoning_last = max(i for i, d in enumerate(deltas) if "reasoning" in d)
    assert reasoning_last < min(i for i, d in enumerate(deltas) if "content" in d)
    assert all("x_groq" not in c for c in chunks[1:-1])
    assert last["x_groq"]["id"] == first["x_groq"]["id"]
    usage = last["x_groq"]["usage"]
    assert set(usage) == {
        "queue_time",
        "prompt_tokens",
        "prompt_time",
        "completion_tokens",
        "completion_time",
        "total_tokens",
        "total_time",
    }
    assert usage["completion_tokens"] == len(deltas)
    assert "usage" not in last  # top-level usage only with include_usage (newer Groq)


async def test_max_tokens_gives_length(http: httpx.AsyncClient) -> None:
    async with SimulatedUpstream(text=TEXT, api_key=KEY) as up:
        _, data = await raw_stream(http, up, {"max_completion_tokens": 3})
    chunks = [orjson.loads(d) for d in data[:-1]]
    contents = [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]]
    assert contents == tokenize(TEXT)[:3]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_auth_and_bad_json(http: httpx.AsyncClient) -> None:
    async with SimulatedUpstream(api_key=KEY) as up:
        url = up.base_url + "/chat/completions"
        wrong = await http.post(url, json={"messages": [], "stream": True})
        assert wrong.status_code == 401
        assert wrong.json()["error"]["code"] == "invalid_api_key"
        bad = await http.post(url, content=b"{nope", headers=AUTH)
        assert bad.status_code == 400 and "error" in bad.json()


async def test_status_faults_carry_headers_and_bodies(http: httpx.AsyncClient) -> None:
    async with SimulatedUpstream(api_key=KEY, model="llama-3.1-8b-instant") as up:
        up.faults.push(Fault.rate_limit(retry_after_s=2, groq_message_s=1.5), Fault.html_502())
        url = up.base_url + "/chat/completions"
        body = {"messages": [], "stream": True}
        limited = await http.post(url, json=body, headers=AUTH)
        assert limited.status_code == 429 and limited.headers["retry-after"] == "2"
        message = limited.json()["error"]["message"]
        assert "llama-3.1-8b-instant" in message and "Please try again in 1.5s" in message
        page = await http.post(url, json=body, headers=AUTH)
        assert page.status_code == 502 and page.text.startswith("<html>")
        assert len(up.faults) == 0 and [r.fault is not None for r in up.requests] == [True, True]


async def test_token_rate(http: httpx.AsyncClient) -> None:
    async with SimulatedUpstream(
        text="a b c d e f g h i j", api_key=KEY, tokens_per_second=50
    ) as up:
        start = time.monotonic()
        await raw_stream(http, up, {})
        elapsed = time.monotonic() - start
    assert elapsed >= 10 / 50 * 0.8  # 10 tokens at 50/s; the upper bound is not ours to test


@pytest.mark.parametrize(
    "text",
    [
        "",
        "plain words and more words",
        "  leading and trailing spaces  ",
        "tabs\tand\r\nCRLF\rCR",
        "numbers 1234567890 and 3.14159",
        "emoji 👨‍👩‍👧 ❤️ 🦀🦀 and CJK 日本語のテキスト, Ελληνικά, עברית",
        "punctuation!?…—“quotes” (parens) [brackets] {braces} <tags/>",
        "don't won't it's we're I'll they've",
        "supercalifragilisticexpialidocious",
    ],
)
def test_tokenize_is_lossless_and_token_like(text: str) -> None:
    tokens = tokenize(text)
    assert "".join(tokens) == text
    assert all(tokens)  # never an empty token
    if "words" in text:
        assert " words" in tokens  # a word carries its leading space
