"""OpenAI / Groq chunks -> events: content, reasoning, tools, refusal, usage, errors."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from worker.errors import UpstreamError
from worker.upstream.chunks import ChunkParser
from worker.upstream.events import Finished, Refusal, Token, ToolCallDelta, UpstreamEvent
from worker.upstream.sse import SSEDecoder, SSEEvent


def sse(*chunks: Any) -> bytes:
    out = b""
    for chunk in chunks:
        data = chunk if isinstance(chunk, str) else orjson.dumps(chunk).decode()
        out += f"data: {data}\n\n".encode()
    return out


def run(provider: str, wire: bytes) -> tuple[list[UpstreamEvent], ChunkParser]:
    decoder, parser = SSEDecoder(), ChunkParser(provider)
    events: list[UpstreamEvent] = []
    for event in decoder.feed(wire) + decoder.flush():
        events.extend(parser.feed(event))
    if not parser.done:
        events.append(parser.end_of_stream())
    return events, parser


BASE = {
    "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
    "object": "chat.completion.chunk",
    "created": 1741570283,
    "model": "gpt-4o-2024-08-06",
    "service_tier": "default",
    "system_fingerprint": "fp_eb9dce56a8",
}


def oa(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        **BASE,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        **extra,
    }


def test_openai_content_usage_done() -> None:
    usage = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    wire = sse(
        oa({"role": "assistant", "content": "", "refusal": None}, usage=None),
        oa({"content": "Hello"}, usage=None),
        oa({"content": " wörld 🦀"}, usage=None),
        oa({"content": "  \n"}, usage=None),
        oa({}, "stop", usage=None),
        {**BASE, "choices": [], "usage": usage},
        "[DONE]",
    )
    events, parser = run("openai", wire)
    assert events == [
        Token("content", "Hello"),
        Token("content", " wörld 🦀"),
        Token("content", "  \n"),  # whitespace-only deltas are tokens, byte-exact
        Finished("stop", usage, False, "openai", "gpt-4o-2024-08-06"),
    ]
    assert parser.content_tokens == 3


def test_groq_reasoning_then_content_and_x_groq_usage() -> None:
    groq_usage = {
        "queue_time": 0.061,
        "prompt_tokens": 18,
        "prompt_time": 0.0002,
        "completion_tokens": 4,
        "completion_time": 0.79,
        "total_tokens": 22,
        "total_time": 0.79,
    }
    first = oa({"role": "assistant", "content": ""}, x_groq={"id": "req_01jadadp0f"})
    last = oa({}, "stop", x_groq={"id": "req_01jadadp0f", "usage": groq_usage})
    wire = sse(
        first,
        oa({"reasoning": "Think"}),
        oa({"reasoning": "ing…"}),
        oa({"content": "答"}),
        oa({"content": "え"}),
        last,
        "[DONE]",
    )
    events, parser = run("groq", wire)
    assert events[:4] == [
        Token("reasoning", "Think"),
        Token("reasoning", "ing…"),
        Token("content", "答"),
        Token("content", "え"),
    ]
    assert events[4] == Finished("stop", groq_usage, False, "groq", "gpt-4o-2024-08-06")
    assert parser.x_groq_id == "req_01jadadp0f"
    assert (parser.reasoning_tokens, parser.content_tokens) == (2, 2)


def test_top_level_usage_wins_over_x_groq() -> None:
    top = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    wire = sse(oa({}, "stop", usage=top, x_groq={"id": "r", "usage": {"total_tokens": 99}}))
    events, _ = run("groq", wire + b"data: [DONE]\n\n")
    assert isinstance(events[-1], Finished) and events[-1].usage == top


def test_reasoning_content_field() -> None:
    events, _ = run("openai", sse(oa({"reasoning_content": "hmm", "content": "ok"}), "[DONE]"))
    assert events[:2] == [Token("reasoning", "hmm"), Token("content", "ok")]


def test_tool_calls_and_refusal() -> None:
    wire = sse(
        oa(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ],
            }
        ),
        oa({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}),
        oa({"tool_calls": [{"index": 0, "function": {"arguments": 'ty":"Oslo"}'}}]}),
        oa({"refusal": "I can't"}),
        oa({}, "tool_calls"),
        "[DONE]",
    )
    events, parser = run("openai", wire)
    assert events == [
        ToolCallDelta(0, "call_1", "get_weather", ""),
        ToolCallDelta(0, None, None, '{"ci'),
        ToolCallDelta(0, None, None, 'ty":"Oslo"}'),
        Refusal("I can't"),
        Finished("tool_calls", None, False, "openai", "gpt-4o-2024-08-06"),
    ]
    assert parser.tool_call_indexes == {0}


@pytest.mark.parametrize("done", ["[DONE]", " [DONE] ", "[DONE]\n"])
def test_done_variants_and_nothing_after_done(done: str) -> None:
    events, _ = run("openai", sse(oa({"content": "a"}), oa({}, "stop"), done, oa({"content": "z"})))
    assert [type(e) for e in events] == [Token, Finished]


def test_finish_reason_without_done_is_accepted() -> None:
    events, _ = run("openai", sse(oa({"content": "a"}), oa({}, "length")))
    assert events[-1] == Finished("length", None, False, "openai", "gpt-4o-2024-08-06")


def test_truncated_stream_raises_connection_lost_with_tokens() -> None:
    with pytest.raises(UpstreamError) as info:
        run("openai", sse(oa({"content": "a"}), oa({"content": "b"})) + b'data: {"id"')
    assert info.value.type == "connection_lost"
    assert info.value.retryable
    assert info.value.tokens_received == 2


def test_error_object_inside_200_stream() -> None:
    error = {"error": {"message": "The server had an error", "type": "server_error"}}
    with pytest.raises(UpstreamError) as info:
        run("openai", sse(oa({"content": "a"}), error))
    assert (info.value.type, info.value.status, info.value.retryable) == ("server_error", 200, True)
    assert info.value.tokens_received == 1


def test_error_event_inside_200_stream() -> None:
    parser = ChunkParser("groq")
    body = orjson.dumps(
        {
            "error": {
                "message": "Rate limit reached ... Please try again in 1m0.5s.",
                "type": "tokens",
                "code": "rate_limit_exceeded",
            }
        }
    ).decode()
    with pytest.raises(UpstreamError) as info:
        parser.feed(SSEEvent(body, "error"))
    assert info.value.type == "rate_limit"
    assert info.value.retry_after_s == pytest.approx(60.5)


def test_error_event_with_plain_text_data() -> None:
    with pytest.raises(UpstreamError) as info:
        ChunkParser("openai").feed(SSEEvent("overloaded, try later", "error"))
    assert info.value.message == "overloaded, try later"


@pytest.mark.parametrize("data", ['{"choices": [', "[1, 2]", '{"choices": 5}'])
def test_malformed_chunks(data: str) -> None:
    with pytest.raises(UpstreamError) as info:
        ChunkParser("openai").feed(SSEEvent(data))
    assert info.value.type == "malformed"
    assert not info.value.retryable


def test_only_first_choice_is_relayed() -> None:
    chunk = {
        **BASE,
        "choices": [
            {"index": 1, "delta": {"content": "other"}, "finish_reason": None},
            {"index": 0, "delta": {"content": "mine"}, "finish_reason": None},
        ],
    }
    events, _ = run("openai", sse(chunk, "[DONE]"))
    assert events[0] == Token("content", "mine")
