"""Hostile input at the pure layers: SSE bounds, bounded decompression, storable tokens,
provider quirks, redacted and bounded error messages, the one "configured" rule and the
per-provider deadlines (issue #12, #17)."""

from __future__ import annotations

import zlib
from typing import Any

import httpx
import orjson
import pytest

from worker.config import Settings
from worker.errors import UpstreamError
from worker.upstream.body import BodyDecoder, BodyLimitError
from worker.upstream.chunks import ChunkParser
from worker.upstream.client import UpstreamClient
from worker.upstream.deadline import ReadDeadlines
from worker.upstream.errormap import AUTH_MESSAGE, Redactor, error_from_response
from worker.upstream.events import GenerationRequest, Token
from worker.upstream.sse import SSEDecoder, SSEEvent, SSELimitError

KIB = 1024


def settings(**kw: Any) -> Settings:
    return Settings(_env_file=None, **kw)


# --- SSE decoder bounds ---


def test_line_without_newline_is_refused_past_the_bound() -> None:
    decoder = SSEDecoder(max_line_bytes=64 * KIB)
    decoder.feed(b"data: ok\n\n")
    with pytest.raises(SSELimitError) as info:
        for _ in range(1000):  # 64 MB if nothing stopped it
            decoder.feed(b"z" * 65536)
    assert "RELAY_MAX_SSE_LINE_BYTES" in info.value.message


def test_one_huge_read_without_newline_is_refused_at_once() -> None:
    with pytest.raises(SSELimitError):
        SSEDecoder(max_line_bytes=64 * KIB).feed(b"data: " + b"z" * (1 << 20))


def test_data_lines_that_never_reach_a_blank_line_are_refused() -> None:
    decoder = SSEDecoder(max_event_bytes=64 * KIB)
    with pytest.raises(SSELimitError) as info:
        for _ in range(10_000):
            decoder.feed(b"data: " + b"x" * 1000 + b"\n")
    assert "RELAY_MAX_SSE_EVENT_BYTES" in info.value.message


def test_events_before_the_violation_are_kept() -> None:
    decoder = SSEDecoder(max_line_bytes=4 * KIB)
    with pytest.raises(SSELimitError) as info:
        decoder.feed(b"data: a\n\ndata: b\n\n" + b"data: " + b"q" * 8192)
    assert info.value.events == [SSEEvent("a"), SSEEvent("b")]


def test_a_long_line_over_many_reads_is_exact_at_any_line_ending() -> None:
    """The piece list (linear) gives what one read would give, for LF, CRLF and CR,
    with the line end at the start, middle or end of a read."""
    body = b"w" * 300_000
    for end in (b"\n\n", b"\r\n\r\n", b"\r\r"):
        wire = b"data: " + body + end + b"data: next" + end
        for step in (1000, 4096, 65536, 299_999):
            decoder = SSEDecoder()
            events: list[SSEEvent] = []
            for start in range(0, len(wire), step):
                events.extend(decoder.feed(wire[start : start + step]))
            events.extend(decoder.flush())
            assert events == [SSEEvent(body.decode()), SSEEvent("next")], (end, step)


# --- bounded decompression ---


def test_gzip_bomb_is_inflated_in_bounded_pieces_and_refused() -> None:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    bomb = compressor.compress(b"\0" * (64 << 20)) + compressor.flush()
    assert len(bomb) < 100 * KIB
    decoder = BodyDecoder("gzip", max_bytes=4 << 20)
    biggest = 0
    with pytest.raises(BodyLimitError) as info:
        for piece in decoder.feed(bomb):
            biggest = max(biggest, len(piece))
    assert "RELAY_MAX_BODY_BYTES" in str(info.value)
    assert biggest <= 64 * KIB


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "identity", ""])
def test_encodings_round_trip(encoding: str) -> None:
    text = b"data: hello\n\n" * 1000
    if encoding == "gzip":
        c = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        wire = c.compress(text) + c.flush()
    elif encoding == "deflate":
        wire = zlib.compress(text)
    else:
        wire = text
    decoder = BodyDecoder(encoding, max_bytes=1 << 20)
    out = b"".join(p for i in range(0, len(wire), 7) for p in decoder.feed(wire[i : i + 7]))
    assert out == text


def test_unknown_encoding_is_refused() -> None:
    with pytest.raises(BodyLimitError):
        BodyDecoder("br", max_bytes=1 << 20)


# --- the chunk parser: storable tokens, quirks ---


def chunk(**fields: Any) -> SSEEvent:
    return SSEEvent(orjson.dumps(fields).decode())


def content(text: str) -> SSEEvent:
    return chunk(choices=[{"index": 0, "delta": {"content": text}, "finish_reason": None}])


def test_nul_becomes_replacement_char_where_tokens_are_made() -> None:
    parser = ChunkParser("openai")
    [token] = parser.feed(content("a\u0000b"))
    assert token == Token("content", "a\ufffdb")
    [reasoning] = parser.feed(
        chunk(choices=[{"index": 0, "delta": {"reasoning_content": "\u0000"}}])
    )
    assert reasoning == Token("reasoning", "\ufffd")


def test_lone_surrogate_is_storable_not_malformed() -> None:
    data = '{"choices":[{"index":0,"delta":{"content":"half \\ud83d"}}]}'
    [token] = ChunkParser("openai").feed(SSEEvent(data))
    assert token == Token("content", "half \ufffd")
    token.text.encode("utf-8")  # Postgres (and UTF-8) can take it


@pytest.mark.parametrize("data", ["", " ", "  "])
def test_empty_data_events_are_keepalives(data: str) -> None:
    parser = ChunkParser("openai")
    assert parser.feed(SSEEvent(data)) == []
    assert parser.feed(content("x")) == [Token("content", "x")]


def test_x_groq_error_after_content_fails_even_before_done() -> None:
    parser = ChunkParser("groq")
    parser.feed(content("hello"))
    with pytest.raises(UpstreamError) as info:
        parser.feed(chunk(choices=[], x_groq={"id": "req_1", "error": "Internal Server Error"}))
    assert info.value.type == "server_error" and info.value.retryable
    assert info.value.tokens_received == 1


def test_openrouter_error_with_finish_reason_error() -> None:
    parser = ChunkParser("openai")
    parser.feed(content("hello"))
    with pytest.raises(UpstreamError) as info:
        parser.feed(
            chunk(
                error={"code": 502, "message": "Provider returned error"},
                choices=[{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
            )
        )
    assert info.value.type == "server_error" and info.value.retryable


def test_finish_reason_error_alone_is_a_failure() -> None:
    parser = ChunkParser("openai")
    with pytest.raises(UpstreamError):
        parser.feed(chunk(choices=[{"index": 0, "delta": {}, "finish_reason": "error"}]))


# --- error messages: 413, redaction, auth, bounds ---


def groq_body(message: str, code: str = "rate_limit_exceeded") -> bytes:
    return orjson.dumps({"error": {"message": message, "type": "tokens", "code": code}})


def test_groq_413_is_not_retryable() -> None:
    body = groq_body("Request too large for model `llama` on tokens per minute (TPM)")
    error = error_from_response(413, {}, body, provider="groq", now=0.0)
    assert error.retryable is False and error.status == 413


def test_keys_are_redacted_from_error_messages() -> None:
    key = "gsk_live_0123456789abcdef"
    clean = Redactor([key])
    body = orjson.dumps({"error": {"message": f"bad header: Bearer {key}; key={key}"}})
    error = error_from_response(500, {}, body, provider="groq", now=0.0, clean=clean)
    assert key not in error.message and "[redacted]" in error.message
    # Any bearer value, configured or not (a proxy may echo another header).
    other = Redactor()("Authorization: Bearer sk-someone-elses-key-123")
    assert "sk-someone" not in other


def test_auth_error_says_only_its_type() -> None:
    body = orjson.dumps(
        {"error": {"message": "Incorrect API key provided: sk-live-abcd1234", "code": "x"}}
    )
    error = error_from_response(401, {}, body, provider="openai", now=0.0)
    assert error.type == "auth"
    assert error.message == f"{AUTH_MESSAGE} (HTTP 401)"


def test_error_messages_are_bounded() -> None:
    body = orjson.dumps({"error": {"message": "m" * 100_000, "type": "server_error"}})
    clean = Redactor(max_chars=300)
    error = error_from_response(500, {}, body, provider="openai", now=0.0, clean=clean)
    assert len(error.message) <= 300


def test_a_key_cut_by_the_bound_is_still_redacted() -> None:
    key = "sk-live-" + "k" * 40
    message = "x" * 280 + key
    out = Redactor([key], max_chars=300)(message)
    assert "kkkk" not in out


# --- which providers are configured; per-provider deadlines ---


def test_configured_means_a_key_or_an_explicit_base_url() -> None:
    assert not settings().provider_configured("groq")
    assert settings(groq_api_key="gsk_x").provider_configured("groq")
    assert settings(groq_base_url="http://127.0.0.1:8090/openai/v1").provider_configured("groq")
    # The public address without a key (what a copy of .env.example says) would be sent
    # unauthenticated: not configured (Settings.provider_configured, the one rule).
    assert not settings(groq_base_url="https://api.groq.com/openai/v1").provider_configured("groq")


async def test_unconfigured_provider_is_refused_before_any_request() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(500)

    request = GenerationRequest(messages=[{"role": "user", "content": "hi"}], provider="groq")
    async with UpstreamClient(settings(), transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(UpstreamError) as info:
            [e async for e in client.stream(request)]
    assert info.value.message == "provider groq is not configured on this worker"
    assert info.value.type == "bad_request" and not info.value.retryable
    assert seen == []


def test_per_provider_deadline_wins_over_the_global_one() -> None:
    s = settings(relay_idle_timeout_s=30.0, relay_groq_idle_timeout_s=2.5)
    groq, openai = s.deadlines_for("groq"), s.deadlines_for("openai")
    assert (groq.idle_s, groq.names["idle"]) == (2.5, "RELAY_GROQ_IDLE_TIMEOUT_S")
    assert (openai.idle_s, openai.names["idle"]) == (30.0, "RELAY_IDLE_TIMEOUT_S")
    assert groq.first_token_s == s.relay_first_token_timeout_s


def test_read_deadlines_name_the_one_that_comes_first() -> None:
    limits = settings(relay_first_token_timeout_s=5, relay_idle_timeout_s=2).deadlines_for("openai")
    deadlines = ReadDeadlines(limits, total_at=100.0)
    assert deadlines.next(now=10.0, produced=False, sent_at=10.0) == (15.0, "first_token")
    assert deadlines.next(now=50.0, produced=True, sent_at=10.0) == (52.0, "idle")
    assert deadlines.next(now=99.0, produced=True, sent_at=10.0) == (100.0, "total")
    assert deadlines.next(now=98.0, produced=False, sent_at=97.0) == (100.0, "total")
    assert "RELAY_TOTAL_TIMEOUT_S" in deadlines.message("total")
    assert deadlines.message("idle").startswith("idle deadline passed")


def test_model_name_and_usage_from_chunks_are_bounded() -> None:
    """Both reach llm-done and the row: a provider cannot make them huge."""
    parser = ChunkParser("openai")
    usage: dict[str, Any] = {f"k{i}": i for i in range(1000)}
    usage["prompt_tokens"] = 3
    usage["junk"] = "x" * 10_000
    usage["completion_tokens_details"] = {"reasoning_tokens": 1, "deep": {"a": 1}}
    parser.feed(chunk(model="m" * 100_000, choices=[], usage=usage))
    finished = parser.end_of_stream() if parser.finish_reason else parser.cut("stop")
    assert len(finished.model) <= 200
    assert finished.usage is not None and len(finished.usage) <= 32
    assert "junk" not in finished.usage


async def test_connect_timeout_names_the_connect_deadline_and_its_setting() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        raise httpx.ConnectTimeout("timed out", request=request)

    s = settings(
        groq_api_key="gsk_test_0123456789",
        relay_upstream_retries=0,
        relay_groq_connect_timeout_s=1.5,
    )
    request = GenerationRequest(messages=[{"role": "user", "content": "hi"}], provider="groq")
    async with UpstreamClient(s, transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(UpstreamError) as info:
            [e async for e in client.stream(request)]
    assert info.value.type == "timeout"
    assert info.value.message.startswith("connect deadline passed: no connection within 1.5 s")
    assert "RELAY_GROQ_CONNECT_TIMEOUT_S" in info.value.message
    # The provider's own connect deadline is the one the request carried.
    assert seen[0].extensions["timeout"]["connect"] == 1.5
