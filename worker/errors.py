"""The one exception tree of the worker.

    RelayError                      base; carries `retryable` and data
    ├── UpstreamError               the provider side (HTTP, SSE, chunks)
    │     type: connection_lost | timeout | rate_limit | server_error   (retryable)
    │           auth | bad_request | malformed | upstream_error          (not retryable
    │                                                                     unless said)
    ├── PublishError                the Realtime side (ack error/timeout, socket down)
    ├── QueueError                  Postgres queue / lease trouble (retryable)
    │     └── LeaseLost             another worker reclaimed the request (stop writing)
    ├── BadInputError               a malformed request, an oversized payload (never retried)
    └── ConfigError                 settings that cannot work (fatal at start-up)

Translate foreign exceptions once, at the edge (`raise UpstreamError(...) from exc`);
everything inside speaks only these types. Programmer errors stay Python's own.
"""

from __future__ import annotations

from typing import Any, Literal

UpstreamErrorType = Literal[
    "connection_lost",
    "timeout",
    "rate_limit",
    "server_error",
    "auth",
    "bad_request",
    "malformed",
    "upstream_error",
]

RETRYABLE_UPSTREAM_TYPES: frozenset[str] = frozenset(
    {"connection_lost", "timeout", "rate_limit", "server_error"}
)


# Longest error message stored on a row, broadcast in `llm-error` or logged: a
# hostile value (a 1 MB provider name) must not become a 1 MB line or payload.
MAX_ERROR_MESSAGE_CHARS = 500


def bounded(text: str, limit: int = MAX_ERROR_MESSAGE_CHARS) -> str:
    """`text` cut to `limit` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def preview(value: object, limit: int = 60) -> str:
    """A short, bounded `repr` of an untrusted value, for an error message."""
    try:
        text = repr(value)
    except RecursionError:  # pragma: no cover - decoding bounds the depth first
        text = f"<{type(value).__name__}>"
    return bounded(text, limit)


class RelayError(Exception):
    """Base of every error the worker raises on purpose."""

    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retryable is not None:
            self.retryable = retryable


class UpstreamError(RelayError):
    """The provider failed: before the stream, or inside it."""

    def __init__(
        self,
        message: str,
        *,
        type: UpstreamErrorType,
        provider: str = "",
        status: int | None = None,
        retry_after_s: float | None = None,
        tokens_received: int = 0,
        retryable: bool | None = None,
        usage: dict[str, Any] | None = None,
        usage_estimated: bool = False,
    ) -> None:
        super().__init__(
            message,
            retryable=type in RETRYABLE_UPSTREAM_TYPES if retryable is None else retryable,
        )
        self.type: UpstreamErrorType = type
        self.provider = provider
        self.status = status
        self.retry_after_s = retry_after_s
        self.tokens_received = tokens_received
        # What the failed generation consumed so far (provider's, or our estimate).
        self.usage = usage
        self.usage_estimated = usage_estimated

    def __repr__(self) -> str:
        return (
            f"UpstreamError(type={self.type!r}, provider={self.provider!r}, "
            f"status={self.status!r}, retryable={self.retryable}, message={self.message!r})"
        )


class PublishError(RelayError):
    """A broadcast was not acknowledged (error reply, timeout, socket down)."""

    retryable = True

    def __init__(self, message: str, *, topic: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.topic = topic
        self.reason = reason


class QueueError(RelayError):
    """The request queue could not be reached or a lease was lost."""

    retryable = True

    def __init__(self, message: str, *, job_id: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id


class LeaseLost(QueueError):
    """The lease on a request expired and was reclaimed: its writes are fenced off."""

    retryable = False


class BadInputError(RelayError):
    """Input that can never succeed: fail it clearly, lose nothing else, go on."""

    retryable = False

    def __init__(self, message: str, *, field: str | None = None, value: str | None = None) -> None:
        super().__init__(bounded(message))
        self.field = field
        self.value = None if value is None else bounded(value, 120)  # a preview, never whole


class ConfigError(RelayError):
    """Settings that cannot work; raised at start-up."""
