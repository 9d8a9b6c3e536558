"""What the upstream side hands to the relay: a typed stream of events.

The contract between `worker.upstream` (producer) and `worker.relay` (consumer).
Tokens are the provider's non-empty deltas, in order, byte-exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

TokenKind = Literal["content", "reasoning"]
StatusKind = Literal["retrying", "resuming", "reset", "fallback", "cancelled"]


@dataclass(frozen=True, slots=True)
class Token:
    """One non-empty content or reasoning delta."""

    kind: TokenKind
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class Refusal:
    text: str


@dataclass(frozen=True, slots=True)
class Status:
    """Recovery news for the client (`llm-status`): retrying, resuming, fallback..."""

    kind: StatusKind
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Finished:
    """The provider ended the stream (`[DONE]` or a final chunk with finish_reason)."""

    finish_reason: str | None
    usage: dict[str, Any] | None = None
    usage_estimated: bool = False
    provider: str = ""
    model: str = ""


UpstreamEvent = Token | ToolCallDelta | Refusal | Status | Finished


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One chat completion to stream."""

    messages: list[dict[str, Any]]
    provider: Literal["openai", "groq"] = "openai"
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
