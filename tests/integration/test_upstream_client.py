"""The upstream client against the simulated upstream over real sockets: every failure class."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from devstack.upstream import Fault, SimulatedUpstream, tokenize
from worker.config import Settings
from worker.errors import UpstreamError
from worker.upstream.client import StreamStats, UpstreamClient
from worker.upstream.events import (
    Finished,
    GenerationRequest,
    Status,
    Token,
    ToolCallDelta,
    UpstreamEvent,
)
from worker.upstream.retry import BreakerState

pytestmark = pytest.mark.integration

TEXT = "Once upon a time, a crab 🦀 met 世界 — and wrote 42 lines.\nThe end."
KEY = "sk-devstack"
SHORT = 0.4  # a deadline the faults below overrun on purpose


@pytest.fixture
async def openai_up() -> AsyncIterator[SimulatedUpstream]:
    async with SimulatedUpstream(text=TEXT, api_key=KEY) as upstream:
        yield upstream


@pytest.fixture
async def groq_up() -> AsyncIterator[SimulatedUpstream]:
    async with SimulatedUpstream(
        provider="groq", text=TEXT, reasoning_text="Let me think.", api_key=KEY
    ) as upstream:
        yield upstream


def settings_for(
    openai: SimulatedUpstream | None = None, groq: SimulatedUpstream | None = None, **kw: Any
) -> Settings:
    values: dict[str, Any] = {
        "openai_api_key": KEY,
        "groq_api_key": KEY,
        "relay_upstream_retry_base_s": 0.01,
        "relay_upstream_retry_cap_s": 5.0,
        "relay_first_token_timeout_s": 10.0,
        "relay_idle_timeout_s": 10.0,
        "relay_total_timeout_s": 30.0,
    }
    if openai is not None:
        values["openai_base_url"] = openai.base_url
    if groq is not None:
        values["groq_base_url"] = groq.base_url
    values.update(kw)
    return Settings(_env_file=None, **values)


class SleepRecorder:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0)


async def collect(
    client: UpstreamClient, request: GenerationRequest, stats: StreamStats | None = None
) -> list[UpstreamEvent]:
    events: list[UpstreamEvent] = []
    async with asyncio.timeout(20):
        async for event in client.stream(request, stats=stats):
            events.append(event)
    return events


def text_of(events: list[UpstreamEvent], kind: str = "content") -> str:
    return "".join(e.text for e in events if isinstance(e, Token) and e.kind == kind)


def statuses(events: list[UpstreamEvent]) -> list[str]:
    return [e.kind for e in events if isinstance(e, Status)]


REQUEST = GenerationRequest(messages=[{"role": "user", "content": "Tell me a story"}])
GROQ_REQUEST = GenerationRequest(messages=REQUEST.messages, provider="groq")


async def test_openai_stream_is_exact(openai_up: SimulatedUpstream) -> None:
    async with UpstreamClient(settings_for(openai_up)) as client:
        stats = StreamStats()
        events = await collect(client, REQUEST, stats)
    tokens = [e.text for e in events if isinstance(e, Token)]
    assert tokens == tokenize(TEXT)
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.finish_reason == "stop"
    assert finished.usage is not None and not finished.usage_estimated
    assert finished.usage["completion_tokens"] == len(tokens)
    assert (stats.attempts, stats.http_status) == (1, 200)
    body = openai_up.requests[0].body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


async def test_groq_reasoning_and_x_groq_usage(groq_up: SimulatedUpstream) -> None:
    async with UpstreamClient(settings_for(groq=groq_up)) as client:
        events = await collect(client, GROQ_REQUEST)
    assert text_of(events, "reasoning") == "Let me think."
    assert text_of(events) == TEXT
    first_content = next(
        i for i, e in enumerate(events) if isinstance(e, Token) and e.kind == "content"
    )
    assert all(e.kind == "reasoning" for e in events[:first_content] if isinstance(e, Token))
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.usage is not None
    assert "queue_time" in finished.usage and not finished.usage_estimated


async def test_tool_call_stream() -> None:
    args = '{"city": "Oslo", "unit": "celsius"}'
    async with SimulatedUpstream(api_key=KEY, tool_call=("get_weather", args)) as up:
        request = GenerationRequest(
            messages=REQUEST.messages, extra={"tools": [{"type": "function"}]}
        )
        async with UpstreamClient(settings_for(up)) as client:
            events = await collect(client, request)
    calls = [e for e in events if isinstance(e, ToolCallDelta)]
    assert calls[0].name == "get_weather" and calls[0].id is not None
    assert "".join(c.arguments for c in calls) == args
    assert isinstance(events[-1], Finished) and events[-1].finish_reason == "tool_calls"


# --- failures before the first token: retried transparently ---


@pytest.mark.parametrize(
    "fault",
    [
        Fault.reset(after_tokens=0),
        Fault.http(500, "boom", "server_error"),
        Fault.http(503, "overloaded", "service_unavailable"),
        Fault.html_502(),
        Fault.error_event(after_tokens=0),
        Fault.error_event(after_tokens=0, as_event=True),
        Fault.truncate(after_tokens=0),
    ],
    ids=["reset", "500", "503", "html502", "error-data", "error-event", "truncate"],
)
async def test_retryable_before_first_token(openai_up: SimulatedUpstream, fault: Fault) -> None:
    openai_up.faults.push(fault)
    sleep = SleepRecorder()
    stats = StreamStats()
    async with UpstreamClient(settings_for(openai_up), sleep=sleep) as client:
        events = await collect(client, REQUEST, stats)
    assert text_of(events) == TEXT
    assert statuses(events) == ["retrying"]
    assert stats.attempts == 2 and len(sleep.delays) == 1


async def test_hang_after_headers_hits_first_token_deadline(openai_up: SimulatedUpstream) -> None:
    openai_up.faults.push(Fault.hang_after_headers())
    settings = settings_for(openai_up, relay_first_token_timeout_s=SHORT)
    async with UpstreamClient(settings, sleep=SleepRecorder()) as client:
        events = await collect(client, REQUEST)
    retry = next(e for e in events if isinstance(e, Status))
    assert retry.detail["reason"] == "timeout"
    assert text_of(events) == TEXT


async def test_slow_first_token_within_deadline_is_fine(openai_up: SimulatedUpstream) -> None:
    openai_up.faults.push(Fault.slow_first_token(0.2))
    stats = StreamStats()
    async with UpstreamClient(settings_for(openai_up, relay_first_token_timeout_s=5.0)) as client:
        events = await collect(client, REQUEST, stats)
    assert text_of(events) == TEXT and stats.attempts == 1
    assert stats.first_token_s is not None and stats.first_token_s >= 0.2


async def test_slow_first_token_past_deadline_is_retried(openai_up: SimulatedUpstream) -> None:
    openai_up.faults.push(Fault.slow_first_token(5.0))
    settings = settings_for(openai_up, relay_first_token_timeout_s=SHORT)
    stats = StreamStats()
    async with UpstreamClient(settings, sleep=SleepRecorder()) as client:
        events = await collect(client, REQUEST, stats)
    assert text_of(events) == TEXT and stats.attempts == 2


@pytest.mark.parametrize(
    ("fault", "expected_delay"),
    [
        (Fault.rate_limit(retry_after_s=2), 2.0),
        (Fault.rate_limit(retry_after_ms=1500, retry_after_s=9), 1.5),
        (Fault.rate_limit(groq_message_s=1.25), 1.25),
    ],
    ids=["retry-after", "retry-after-ms", "groq-message"],
)
async def test_429_honours_provider_delay(
    openai_up: SimulatedUpstream, fault: Fault, expected_delay: float
) -> None:
    openai_up.faults.push(fault)
    sleep = SleepRecorder()
    async with UpstreamClient(settings_for(openai_up), sleep=sleep, rng=lambda: 0.0) as client:
        events = await collect(client, REQUEST)
    assert sleep.delays == [pytest.approx(expected_delay)]
    status = next(e for e in events if isinstance(e, Status))
    assert status.detail["reason"] == "rate_limit" and status.detail["status"] == 429
    assert text_of(events) == TEXT


async def test_429_longer_than_cap_is_not_waited(openai_up: SimulatedUpstream) -> None:
    openai_up.faults.push(Fault.rate_limit(retry_after_s=120))
    sleep = SleepRecorder()
    async with UpstreamClient(settings_for(openai_up), sleep=sleep) as client:
        with pytest.raises(UpstreamError) as info:
            await collect(client, REQUEST)
    assert info.value.type == "rate_limit" and info.value.retry_after_s == 120
    assert sleep.delays == [] and len(openai_up.requests) == 1


@pytest.mark.parametrize(
    ("fault", "kind"),
    [
        (Fault.http(400, "bad", "invalid_request_error"), "bad_request"),
        (
            Fault.http(
                404, "The model `x` does not exist", "invalid_request_error", "model_not_found"
            ),
            "bad_request",
        ),
    ],
)
async def test_not_retryable(openai_up: SimulatedUpstream, fault: Fault, kind: str) -> None:
    openai_up.faults.push(fault)
    async with UpstreamClient(settings_for(openai_up), sleep=SleepRecorder()) as client:
        with pytest.raises(UpstreamError) as info:
            await collect(client, REQUEST)
    assert info.value.type == kind and not info.value.retryable
    assert len(openai_up.requests) == 1


async def test_wrong_key_is_auth(openai_up: SimulatedUpstream) -> None:
    settings = settings_for(openai_up, openai_api_key="sk-wrong")
    async with UpstreamClient(settings, sleep=SleepRecorder()) as client:
        with pytest.raises(UpstreamError) as info:
            await collect(client, REQUEST)
    assert (info.value.type, info.value.status, info.value.retryable) == ("auth", 401, False)


async def test_retries_exhausted(openai_up: SimulatedUpstream) -> None:
    openai_up.faults.push(*[Fault.http(500, "down", "server_error")] * 4)
    sleep = SleepRecorder()
    stats = StreamStats()
    settings = settings_for(openai_up, relay_upstream_retries=2)
    async with UpstreamClient(settings, sleep=sleep, rng=lambda: 1.0) as client:
        with pytest.raises(UpstreamError) as info:
            await collect(client, REQUEST, stats)
    assert info.value.type == "server_error" and stats.attempts == 3
    assert sleep.delays == [pytest.approx(0.01), pytest.approx(0.02)]  # exponential


# --- failures after tokens reached the consumer ---


@pytest.mark.parametrize(
    ("fault", "kind"),
    [
        (Fault.reset(after_tokens=3), "connection_lost"),
        (Fault.truncate(after_tokens=3), "connection_lost"),
        (Fault.error_event(after_tokens=3), "server_error"),
        (Fault.error_event(after_tokens=3, as_event=True), "server_error"),
        (Fault.malformed(after_tokens=3), "malformed"),
    ],
    ids=["reset", "truncate", "error-data", "error-event", "malformed"],
)
async def test_midstream_stop_is_honest(
    openai_up: SimulatedUpstream, fault: Fault, kind: str
) -> None:
    openai_up.faults.push(fault)
    events: list[UpstreamEvent] = []
    async with UpstreamClient(settings_for(openai_up)) as client:
        with pytest.raises(UpstreamError) as info:
            async for event in client.stream(REQUEST):
                events.append(event)
    error = info.value
    assert error.type == kind and error.tokens_received == 3
    assert [e.text for e in events if isinstance(e, Token)] == tokenize(TEXT)[:3]
    assert error.usage is not None and error.usage_estimated
    assert error.usage["completion_tokens"] == 3
    assert len(openai_up.requests) == 1  # nothing was retried behind the client's back


async def test_midstream_idle_gap_is_a_timeout(openai_up: SimulatedUpstream) -> None:
    openai_up.faults.push(Fault.hang(after_tokens=2))
    settings = settings_for(openai_up, relay_idle_timeout_s=SHORT)
    async with UpstreamClient(settings) as client:
        with pytest.raises(UpstreamError) as info:
            await collect(client, REQUEST)
    assert info.value.type == "timeout" and info.value.tokens_received == 2
    assert "idle" in info.value.message


async def test_total_deadline(openai_up: SimulatedUpstream) -> None:
    openai_up.tokens_per_second = 20
    settings = settings_for(openai_up, relay_total_timeout_s=0.3)
    async with UpstreamClient(settings) as client:
        with pytest.raises(UpstreamError) as info:
            await collect(client, REQUEST)
    assert info.value.type == "timeout" and info.value.tokens_received > 0


async def test_midstream_restart_emits_reset(openai_up: SimulatedUpstream) -> None:
    openai_up.faults.push(Fault.reset(after_tokens=4))
    settings = settings_for(openai_up, relay_midstream_recovery="restart")
    async with UpstreamClient(settings) as client:
        events = await collect(client, REQUEST)
    reset_at = next(i for i, e in enumerate(events) if isinstance(e, Status))
    reset = events[reset_at]
    assert isinstance(reset, Status) and reset.kind == "reset"
    assert reset.detail["tokens_discarded"] == 4
    assert text_of(events[reset_at:]) == TEXT  # after the reset: a whole answer
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.usage_estimated  # 1st attempt estimated
    assert openai_up.requests[1].body["messages"] == REQUEST.messages


async def test_midstream_continue_resumes_after_seam(openai_up: SimulatedUpstream) -> None:
    openai_up.faults.push(Fault.reset(after_tokens=5))
    settings = settings_for(openai_up, relay_midstream_recovery="continue")
    async with UpstreamClient(settings) as client:
        events = await collect(client, REQUEST)
    assert statuses(events) == ["resuming"]
    assert text_of(events) == TEXT  # the cooperative simulator continues exactly
    second = openai_up.requests[1].body["messages"]
    assert second[-2] == {"role": "assistant", "content": "".join(tokenize(TEXT)[:5])}
    assert second[-1]["role"] == "user"


async def test_continue_never_used_for_tool_calls() -> None:
    args = '{"a": "' + "x" * 40 + '"}'
    async with SimulatedUpstream(api_key=KEY, tool_call=("f", args)) as up:
        up.faults.push(Fault.reset(after_tokens=3))  # dies in the middle of the arguments
        request = GenerationRequest(
            messages=REQUEST.messages, extra={"tools": [{"type": "function"}]}
        )
        settings = settings_for(up, relay_midstream_recovery="continue")
        async with UpstreamClient(settings) as client:
            with pytest.raises(UpstreamError) as info:
                await collect(client, request)
    # Neither continued nor restarted (a restart would splice two attempts' arguments):
    # an honest end with what was received.
    assert info.value.type == "connection_lost"
    assert len(up.requests) == 1


async def test_max_recoveries_then_stop(openai_up: SimulatedUpstream) -> None:
    openai_up.faults.push(Fault.reset(after_tokens=2), Fault.reset(after_tokens=2))
    settings = settings_for(openai_up, relay_midstream_recovery="restart")
    async with UpstreamClient(settings) as client:
        with pytest.raises(UpstreamError) as info:
            await collect(client, REQUEST)
    assert info.value.type == "connection_lost" and info.value.tokens_received == 2


# --- fallback and circuit breaker ---


async def test_fallback_groq_to_openai(
    openai_up: SimulatedUpstream, groq_up: SimulatedUpstream
) -> None:
    groq_up.faults.push(*[Fault.http(503, "over capacity", "service_unavailable")] * 2)
    settings = settings_for(
        openai_up,
        groq_up,
        relay_upstream_retries=1,
        relay_fallback_providers="openai",
        relay_fallback_models="openai:gpt-4.1-mini",
    )
    async with UpstreamClient(settings, sleep=SleepRecorder()) as client:
        events = await collect(client, GROQ_REQUEST)
    assert statuses(events) == ["retrying", "fallback"]
    fallback = [e for e in events if isinstance(e, Status)][1]
    assert fallback.detail == {
        "from": "groq",
        "to": "openai",
        "model": "gpt-4.1-mini",
        "reason": "server_error",
    }
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.provider == "openai"
    assert finished.model == "gpt-4.1-mini" and text_of(events) == TEXT


async def test_circuit_breaker_skips_a_failing_provider(
    openai_up: SimulatedUpstream, groq_up: SimulatedUpstream
) -> None:
    groq_up.faults.push(*[Fault.http(500, "down", "server_error")] * 2)
    settings = settings_for(
        openai_up,
        groq_up,
        relay_upstream_retries=1,
        relay_breaker_failures=2,
        relay_fallback_providers="openai",
    )
    async with UpstreamClient(settings, sleep=SleepRecorder()) as client:
        await collect(client, GROQ_REQUEST)
        assert len(groq_up.requests) == 2
        events = await collect(client, GROQ_REQUEST)  # breaker open: straight to openai
    assert len(groq_up.requests) == 2
    assert statuses(events) == ["fallback"] and text_of(events) == TEXT


async def test_a_provider_answering_most_concurrent_requests_is_not_cut_off(
    openai_up: SimulatedUpstream,
) -> None:
    # Requests start 150 ms apart (room for each refusal or first token to arrive
    # before the next starts); two of every three are refused at once while the third
    # streams for seconds. Counted at the end of a stream, its success came too
    # late: the refusals were "consecutive" and opened the breaker (threshold 3)
    # against a provider that was answering.
    openai_up.tokens_per_second = 20
    refused = Fault.http(500, "down", "server_error")
    answered = Fault.slow_first_token(0)  # streams as usual
    openai_up.faults.push(*[refused, refused, answered] * 4)
    settings = settings_for(openai_up, relay_upstream_retries=0, relay_breaker_failures=3)
    async with UpstreamClient(settings) as client:

        async def one(k: int) -> str:
            await asyncio.sleep(0.15 * k)
            try:
                return text_of(await collect(client, REQUEST))
            except UpstreamError as error:
                return error.message

        results = await asyncio.gather(*(one(k) for k in range(12)))
        state = client.breakers["openai"].state
    assert results.count(TEXT) == 4, results
    assert not any("circuit breaker" in r for r in results), results
    assert state is BreakerState.CLOSED


async def test_bad_request_does_not_fall_back(
    openai_up: SimulatedUpstream, groq_up: SimulatedUpstream
) -> None:
    groq_up.faults.push(Fault.http(400, "bad", "invalid_request_error"))
    settings = settings_for(openai_up, groq_up, relay_fallback_providers="openai")
    async with UpstreamClient(settings) as client:
        with pytest.raises(UpstreamError) as info:
            await collect(client, GROQ_REQUEST)
    assert info.value.type == "bad_request" and openai_up.requests == []


# --- the control endpoint, for out-of-process use ---


async def test_control_endpoint_queues_faults(openai_up: SimulatedUpstream) -> None:
    control = f"http://{openai_up.host}:{openai_up.port}/_control"
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{control}/faults", json={"faults": [Fault.http(401, "nope").to_dict()]}
        )
        assert response.json() == {"queued": 1}
        assert len((await http.get(f"{control}/faults")).json()["faults"]) == 1
    async with UpstreamClient(settings_for(openai_up)) as client:
        with pytest.raises(UpstreamError) as info:
            await collect(client, REQUEST)
    assert info.value.type == "auth"
    async with httpx.AsyncClient() as http:
        requests = (await http.get(f"{control}/requests")).json()["requests"]
    assert requests[0]["body"]["messages"] == REQUEST.messages
