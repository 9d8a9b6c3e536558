"""`llm-relay once --session S "prompt"`: relay one generation directly, no queue.

The thinnest whole path: upstream client → relay_stream (batcher + acked
publisher) → Realtime topic of the session. Prints a JSON summary on stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from typing import Any

import orjson

from worker.cli import Command
from worker.config import Provider, Settings
from worker.relay.publisher import Publisher
from worker.relay.stream import RelayResult, relay_stream
from worker.upstream.client import UpstreamClient
from worker.upstream.events import GenerationRequest


async def relay_once(
    settings: Settings,
    *,
    session_id: str,
    prompt: str,
    stream_id: str | None = None,
    provider: Provider | None = None,
    model: str | None = None,
    max_tokens: int | None = None,
) -> tuple[str, RelayResult]:
    """Relay one generation to the session's topic; return (stream id, result)."""
    stream_id = stream_id or uuid.uuid4().hex
    request = GenerationRequest(
        messages=[{"role": "user", "content": prompt}],
        provider=provider or settings.relay_provider,
        model=model,
        max_tokens=max_tokens,
    )
    async with Publisher(settings) as publisher, UpstreamClient(settings) as upstream:
        result = await relay_stream(
            upstream.stream(request),
            publisher=publisher,
            topic=settings.topic_for(session_id),
            stream_id=stream_id,
            settings=settings,
        )
    return stream_id, result


def summary(stream_id: str, result: RelayResult, elapsed_s: float) -> dict[str, Any]:
    tokens = result.content_tokens + result.reasoning_tokens
    return {
        "stream": stream_id,
        "tokens": tokens,
        "content_tokens": result.content_tokens,
        "reasoning_tokens": result.reasoning_tokens,
        "messages": result.messages,
        "batches": result.batches,
        "tokens_per_message": round(tokens / result.messages, 2) if result.messages else None,
        "retries": result.retries,
        "fallbacks": result.fallbacks,
        "rest_messages": result.rest_messages,
        "finish_reason": result.finish_reason,
        "usage": result.usage,
        "usage_estimated": result.usage_estimated,
        "error": None
        if result.error is None
        else {"type": type(result.error).__name__, "message": result.error.message},
        "seconds": round(elapsed_s, 3),
    }


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the user message")
    parser.add_argument("--session", required=True, help="session id (selects the topic)")
    parser.add_argument("--stream", default=None, help="stream id (default: random)")
    parser.add_argument("--provider", choices=["openai", "groq"], default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-tokens", type=int, default=None)


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    started = time.monotonic()
    stream_id, result = await relay_once(
        settings,
        session_id=args.session,
        prompt=args.prompt,
        stream_id=args.stream,
        provider=args.provider,
        model=args.model,
        max_tokens=args.max_tokens,
    )
    sys.stdout.write(
        orjson.dumps(summary(stream_id, result, time.monotonic() - started)).decode() + "\n"
    )
    return 0 if result.error is None else 1


COMMAND = Command(
    "once", "Relay one generation directly to a session (no queue)", _add_arguments, _run
)
