"""A hostile upstream over real sockets (devstack/upstream's hostile modes): every
violation ends the stream with a clear error naming its bound, nothing leaks a key, and
the read deadlines fire however the stream is consumed (issue #12, #13, #17)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from devstack.upstream import Fault, SimulatedUpstream
from tests.conftest import env_without_ours
from tests.integration.test_upstream_client import REQUEST, TEXT, collect, settings_for, text_of
from worker.errors import UpstreamError
from worker.upstream.client import UpstreamClient
from worker.upstream.events import Finished, GenerationRequest, Token, UpstreamEvent

pytestmark = pytest.mark.integration

KEY = "sk-devstack-hostile-0123456789"
MIB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]  # the subprocess runs this tree's worker


@pytest.fixture
async def up() -> AsyncIterator[SimulatedUpstream]:
    async with SimulatedUpstream(text=TEXT, api_key=KEY) as upstream:
        yield upstream


@pytest.fixture
async def groq() -> AsyncIterator[SimulatedUpstream]:
    async with SimulatedUpstream(provider="groq", text=TEXT, api_key=KEY) as upstream:
        yield upstream


def hostile_settings(up: SimulatedUpstream, **kw: Any) -> Any:
    values: dict[str, Any] = {
        "openai_api_key": KEY,
        "groq_api_key": KEY,
        "relay_upstream_retries": 0,
        "relay_max_sse_line_bytes": 64 * 1024,
        "relay_max_sse_event_bytes": 64 * 1024,
        "relay_max_body_bytes": MIB,
    }
    values.update(kw)
    return settings_for(up, **values)


async def failure(up: SimulatedUpstream, request: GenerationRequest = REQUEST, **kw: Any) -> Any:
    async with UpstreamClient(hostile_settings(up, **kw)) as client:
        with pytest.raises(UpstreamError) as info:
            await collect(client, request)
    return info.value


async def test_empty_data_keepalives_are_skipped(up: SimulatedUpstream) -> None:
    up.faults.push(Fault.empty_data())
    async with UpstreamClient(hostile_settings(up)) as client:
        events = await collect(client, REQUEST)
    assert text_of(events) == TEXT
    assert isinstance(events[-1], Finished) and events[-1].finish_reason == "stop"


async def test_endless_data_lines_are_malformed(up: SimulatedUpstream) -> None:
    up.faults.push(Fault.endless_data(after_tokens=3, size_bytes=32 * MIB))
    error = await failure(up)
    assert error.type == "malformed" and "RELAY_MAX_SSE_EVENT_BYTES" in error.message
    assert error.tokens_received == 3


async def test_a_line_without_newline_is_malformed(up: SimulatedUpstream) -> None:
    up.faults.push(Fault.no_newline(after_tokens=2, size_bytes=16 * MIB))
    error = await failure(up)
    assert error.type == "malformed" and "RELAY_MAX_SSE_LINE_BYTES" in error.message


async def test_gzip_bomb_is_malformed(up: SimulatedUpstream) -> None:
    up.faults.push(Fault.gzip_bomb(size_bytes=64 * MIB))
    error = await failure(up)
    assert error.type == "malformed" and "RELAY_MAX_BODY_BYTES" in error.message


async def test_a_provider_ignoring_max_tokens_is_cut_with_length(up: SimulatedUpstream) -> None:
    up.faults.push(Fault.ignore_max_tokens(tokens=20_000))
    request = GenerationRequest(messages=REQUEST.messages, model="m", max_tokens=10)
    settings = hostile_settings(up, relay_max_tokens_slack_tokens=0)
    async with UpstreamClient(settings) as client:
        events = await collect(client, request)
    assert len([e for e in events if isinstance(e, Token)]) == 10
    assert isinstance(events[-1], Finished) and events[-1].finish_reason == "length"


async def test_nul_token_is_made_storable(up: SimulatedUpstream) -> None:
    up.faults.push(Fault.nul_token(after_tokens=2))
    async with UpstreamClient(hostile_settings(up)) as client:
        events = await collect(client, REQUEST)
    text = text_of(events)
    assert "\x00" not in text and "nul:\ufffd:" in text


async def test_an_echoed_key_is_redacted(up: SimulatedUpstream) -> None:
    up.faults.push(Fault.echo_key(status=500))
    error = await failure(up)
    assert error.type == "server_error"
    assert KEY not in error.message and "[redacted]" in error.message
    assert KEY not in repr(error)


async def test_an_auth_error_says_only_its_type(up: SimulatedUpstream) -> None:
    up.faults.push(Fault.echo_key(status=401))
    error = await failure(up)
    assert error.type == "auth"
    assert error.message == "the provider refused the worker's credentials (HTTP 401)"


@pytest.mark.parametrize("style", ["groq", "openrouter"])
async def test_in_band_error_after_content_is_a_failure_despite_done(
    groq: SimulatedUpstream, style: str
) -> None:
    groq.faults.push(Fault.inband_error(after_tokens=4, style=style, code=503))
    request = GenerationRequest(messages=REQUEST.messages, provider="groq", model="m")
    settings = hostile_settings(groq, groq_base_url=groq.base_url)
    async with UpstreamClient(settings) as client:
        with pytest.raises(UpstreamError) as info:
            await collect(client, request)
    assert info.value.type == "server_error" and info.value.retryable
    assert info.value.tokens_received == 4


async def test_groq_413_is_not_retried(groq: SimulatedUpstream) -> None:
    groq.faults.push(
        Fault.http(
            413,
            "Request too large for model on tokens per minute (TPM)",
            "tokens",
            "rate_limit_exceeded",
        ),
    )
    request = GenerationRequest(messages=REQUEST.messages, provider="groq", model="m")
    settings = hostile_settings(groq, groq_base_url=groq.base_url, relay_upstream_retries=3)
    async with UpstreamClient(settings) as client:
        with pytest.raises(UpstreamError) as info:
            await collect(client, request)
    assert info.value.status == 413 and not info.value.retryable
    assert len(groq.requests) == 1


# --- #13 / #17: the read deadlines, consumed the way the worker's runner consumes ---


async def runner_style(stream: AsyncIterator[UpstreamEvent]) -> list[UpstreamEvent]:
    """Each `__anext__` in its own task, as worker/service/runner.py's tap does."""
    events: list[UpstreamEvent] = []
    async with asyncio.timeout(10):
        while True:
            step = asyncio.ensure_future(anext(stream))
            await asyncio.wait({step})
            try:
                events.append(step.result())
            except StopAsyncIteration:
                return events


async def silent_after_20(up: SimulatedUpstream, **kw: Any) -> UpstreamError:
    up.text = "word " * 40
    up.faults.push(Fault.hang(after_tokens=20))
    async with UpstreamClient(hostile_settings(up, **kw)) as client:
        with pytest.raises(UpstreamError) as info:
            await runner_style(client.stream(REQUEST))
    return info.value


async def test_idle_deadline_fires_under_a_task_per_event(up: SimulatedUpstream) -> None:
    error = await silent_after_20(up, relay_idle_timeout_s=0.3)
    assert error.type == "timeout" and error.tokens_received == 20
    assert error.message.startswith("idle deadline") and "RELAY_IDLE_TIMEOUT_S" in error.message


async def test_total_deadline_fires_under_a_task_per_event(up: SimulatedUpstream) -> None:
    error = await silent_after_20(up, relay_idle_timeout_s=30.0, relay_total_timeout_s=0.6)
    assert error.type == "timeout" and error.tokens_received == 20
    assert error.message.startswith("total deadline") and "RELAY_TOTAL_TIMEOUT_S" in error.message


async def test_per_provider_idle_deadline_wins(up: SimulatedUpstream) -> None:
    error = await silent_after_20(up, relay_idle_timeout_s=30.0, relay_openai_idle_timeout_s=0.3)
    assert error.type == "timeout" and "RELAY_OPENAI_IDLE_TIMEOUT_S" in error.message


async def test_probe_honours_a_per_provider_first_token_deadline(
    up: SimulatedUpstream, tmp_path: Path
) -> None:
    """`llm-relay probe` as a subprocess: the global deadline is long, the provider's short."""
    up.faults.push(Fault.hang_after_headers())
    env = env_without_ours()
    env.update(
        PYTHONPATH=str(ROOT),
        OPENAI_API_KEY=KEY,
        OPENAI_BASE_URL=up.base_url,
        RELAY_FIRST_TOKEN_TIMEOUT_S="60",
        RELAY_OPENAI_FIRST_TOKEN_TIMEOUT_S="0.5",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "probe",
        "--json",
        "--retries",
        "0",
        env=env,
        cwd=tmp_path,  # no stray .env
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    report = json.loads(out)
    assert report["error"]["type"] == "timeout"
    assert "RELAY_OPENAI_FIRST_TOKEN_TIMEOUT_S" in report["error"]["message"]
