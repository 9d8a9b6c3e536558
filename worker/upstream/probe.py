"""`llm-relay probe`: stream one completion from one provider and report everything.

The scriptable contract (design.md, "Diagnostics"):

    llm-relay probe [--provider openai|groq] [--base-url URL] [--model M] [--prompt TEXT]
                    [--retries N] [--idle-timeout S] [--first-token-timeout S]
                    [--max-tokens N] [--json]

Flags override the settings for this one call; `--retries 0` makes exactly one
request. The probe looks at one provider alone: no fallback provider, and a
mid-stream failure is reported as it happened (recovery `stop`).

With `--json`: one JSON object on stdout, logs on stderr, exit 0 whenever a report
could be written (success or not). Without it: the text as it streams, then a
summary; exit 0 when the outcome is `ok`, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from worker.cli import Command
from worker.config import Provider, Settings
from worker.errors import UpstreamError
from worker.transcript import StreamTranscript
from worker.upstream.client import StreamStats, UpstreamClient
from worker.upstream.events import (
    Finished,
    GenerationRequest,
    Status,
    Token,
    UpstreamEvent,
)

DEFAULT_PROMPT = "Say hello in five words."
Outcome = Literal["ok", "truncated", "upstream_error"]
# Failures of a stream that had begun (HTTP 200), rather than a refusal by the provider.
_TRUNCATION_TYPES = frozenset({"connection_lost", "timeout", "malformed"})


@dataclass
class ProbeReport:
    provider: str
    model: str
    http_status: int | None = None
    outcome: Outcome = "ok"
    finish_reason: str | None = None
    transcript: StreamTranscript = field(default_factory=lambda: StreamTranscript(keep_tokens=True))
    usage: dict[str, Any] | None = None
    usage_estimated: bool = False
    error: dict[str, Any] | None = None
    statuses: list[dict[str, Any]] = field(default_factory=list)
    attempts: int = 0
    timings: dict[str, float | None] = field(default_factory=dict)

    @property
    def content_tokens(self) -> list[str]:
        return self.transcript.content_tokens

    @property
    def reasoning_tokens(self) -> list[str]:
        return self.transcript.reasoning_tokens

    def add(self, event: UpstreamEvent) -> None:
        self.transcript.feed(event)
        if isinstance(event, Status):
            self.statuses.append({"kind": event.kind, **event.detail})
        elif isinstance(event, Finished):
            self.finish_reason = event.finish_reason
            self.usage, self.usage_estimated = event.usage, event.usage_estimated
            self.provider, self.model = event.provider or self.provider, event.model or self.model

    def fail(self, error: UpstreamError) -> None:
        began = self.http_status == 200
        self.outcome = (
            "truncated" if began and error.type in _TRUNCATION_TYPES else "upstream_error"
        )
        self.usage, self.usage_estimated = error.usage, error.usage_estimated
        self.error = {
            "type": error.type,
            "retryable": error.retryable,
            "message": error.message,
            "retry_after_s": error.retry_after_s,
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "model": self.model,
            "http_status": self.http_status,
            "outcome": self.outcome,
            "finish_reason": self.finish_reason,
            "content": self.transcript.content,
            "reasoning": self.transcript.reasoning,
            "refusal": self.transcript.refusal,
            "content_tokens": self.content_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "tool_calls": self.transcript.tool_call_dicts(),
            "usage": self.usage,
            "usage_estimated": self.usage_estimated,
            "error": self.error,
            "attempts": self.attempts,
            "statuses": self.statuses,
            "timings": self.timings,
        }


def probe_settings(args: argparse.Namespace, settings: Settings) -> Settings:
    """This call's settings: the flags win; one provider, no fallback, honest stop."""
    provider = args.provider or settings.relay_provider
    update: dict[str, Any] = {
        "relay_fallback_providers": "",
        "relay_midstream_recovery": "stop",
    }
    if args.base_url:
        update["openai_base_url" if provider == "openai" else "groq_base_url"] = args.base_url
    if args.retries is not None:
        update["relay_upstream_retries"] = args.retries
    # A flag wins over both the global deadline and the provider's own one.
    if args.idle_timeout is not None:
        update["relay_idle_timeout_s"] = args.idle_timeout
        update[f"relay_{provider}_idle_timeout_s"] = args.idle_timeout
    if args.first_token_timeout is not None:
        update["relay_first_token_timeout_s"] = args.first_token_timeout
        update[f"relay_{provider}_first_token_timeout_s"] = args.first_token_timeout
    return settings.model_copy(update=update)


async def run_probe(args: argparse.Namespace, settings: Settings) -> ProbeReport:
    settings = probe_settings(args, settings)
    provider: Provider = args.provider or settings.relay_provider
    model = args.model or settings.model_for(provider)
    request = GenerationRequest(
        messages=[{"role": "user", "content": args.prompt}],
        provider=provider,
        model=model,
        max_tokens=args.max_tokens,
    )
    report = ProbeReport(provider=provider, model=model)
    stats = StreamStats()
    live = not args.json
    async with UpstreamClient(settings) as client:
        try:
            async for event in client.stream(request, stats=stats):
                report.add(event)
                if live and isinstance(event, Token) and event.kind == "content":
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
        except UpstreamError as error:
            report.http_status = stats.http_status
            report.fail(error)
    report.http_status = stats.http_status
    report.attempts = stats.attempts
    report.timings = {
        "headers_s": _round(stats.headers_s),
        "first_token_s": _round(stats.first_token_s),
        "end_s": _round(stats.end_s),
    }
    return report


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--provider", choices=["openai", "groq"], default=None)
    parser.add_argument("--base-url", default=None, help="override the provider's base URL")
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--retries", type=int, default=None, help="0: exactly one request")
    parser.add_argument("--idle-timeout", type=float, default=None, metavar="S")
    parser.add_argument("--first-token-timeout", type=float, default=None, metavar="S")
    parser.add_argument(
        "--max-tokens", type=int, default=None, metavar="N", help="cap the completion"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.retries is not None and args.retries < 0:
        print("llm-relay probe: --retries must be >= 0", file=sys.stderr)
        return 2
    report = await run_probe(args, settings)
    if args.json:
        sys.stdout.write(orjson.dumps(report.as_dict()).decode() + "\n")
        sys.stdout.flush()
        return 0
    summary = report.as_dict()
    print()
    print(
        f"-- {summary['outcome']}: provider={summary['provider']} model={summary['model']} "
        f"http={summary['http_status']} finish={summary['finish_reason']} "
        f"attempts={summary['attempts']} tokens={len(report.content_tokens)}",
        file=sys.stderr,
    )
    if report.error is not None:
        print(f"-- error: {report.error}", file=sys.stderr)
    print(f"-- usage: {summary['usage']} estimated={summary['usage_estimated']}", file=sys.stderr)
    print(f"-- timings: {summary['timings']}", file=sys.stderr)
    return 0 if report.outcome == "ok" else 1


COMMAND = Command("probe", "Stream one completion and print a JSON summary", _add_arguments, _run)
