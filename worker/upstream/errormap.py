"""The edge: foreign failures (httpx, HTTP statuses, error bodies) become `UpstreamError`.

Everything here is pure except `map_httpx_exceptions()`, which only re-raises.
Sources for the provider shapes this reads:

- OpenAI and Groq error bodies: `{"error": {"message", "type", "code", "param"}}`;
  Groq rate limits say `'type': 'tokens', 'code': 'rate_limit_exceeded'` and
  "Please try again in 50.597142857s" / "in 1m0.363142857s" / "in 4.77s"
  (quoted verbatim in danielmiessler/Fabric#364, OpenHands/OpenHands#4167,
  elizaOS/eliza#4040).
- Groq's `retry-after` header, in seconds, only on 429 (Groq rate-limit docs, as
  quoted in Pythagora-io/gpt-pilot#862); OpenAI's SDK also honours
  `retry-after-ms` (milliseconds) before `retry-after`.
- OpenAI's 429 with `code: insufficient_quota` is a billing state, not a rate:
  retrying never helps.
- Groq's custom 498 `capacity_exceeded` (flex tier full): "Add jittered backoff and
  retries" (console.groq.com/docs/flex-processing), so it is treated as a rate limit.
- Groq's 413 "Request too large ... on tokens per minute" comes with
  `code: rate_limit_exceeded`, but the same request can never fit the tier: a rate
  limit that is not retryable (the next provider of the chain may still take it).
- OpenRouter-style in-band errors carry the HTTP status as a numeric `code`.

Every message made here goes through one `Redactor` before it exists: the configured
keys (and any `Bearer ...` value, e.g. an error body that echoes the Authorization
header) are replaced by `[redacted]`, then the text is cut to RELAY_MAX_ERROR_CHARS.
An `auth` error says only that the credentials were refused: nothing of the body,
which is where a provider quotes the key it was sent.
"""

from __future__ import annotations

import contextlib
import email.utils
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import httpx
import orjson

from worker.errors import UpstreamError, UpstreamErrorType

# "try again in 1m0.36s", "try again in 4.77s", "try again in 300ms", "in 2h1m3s".
_TRY_AGAIN = re.compile(
    r"try again in\s+((?:\d+(?:\.\d+)?(?:h|ms|m|s))+)",
    re.IGNORECASE,
)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_MAX_MESSAGE = 500
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]{8,}")
REDACTED = "[redacted]"
AUTH_MESSAGE = "the provider refused the worker's credentials"
_SERVER_WORDS = ("server_error", "internal", "overloaded", "unavailable", "capacity")


class Redactor:
    """Makes a foreign error text safe to store, log and broadcast: configured keys
    and bearer tokens removed, length bounded. Pure.

    Args:
        secrets: the configured keys (`Settings.secret_values()`).
        max_chars: the bound (RELAY_MAX_ERROR_CHARS).
    """

    __slots__ = ("max_chars", "secrets")

    def __init__(self, secrets: Iterable[str] = (), max_chars: int = _MAX_MESSAGE) -> None:
        # Longest first, so a key that contains another is removed whole.
        self.secrets = tuple(sorted({s for s in secrets if s}, key=len, reverse=True))
        self.max_chars = max_chars

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        if "earer" in text or "EARER" in text:
            text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
        if len(text) > self.max_chars:
            text = text[: self.max_chars - 1] + "…"
        return text


PLAIN = Redactor()


def parse_duration_s(text: str) -> float | None:
    """A Go-style duration (`1m0.36s`, `4.77s`, `300ms`) in seconds."""
    parts = _DURATION_PART.findall(text)
    if not parts:
        return None
    return sum(float(number) * _UNIT_S[unit] for number, unit in parts)


def retry_after_from_message(message: str) -> float | None:
    match = _TRY_AGAIN.search(message)
    return parse_duration_s(match.group(1)) if match else None


def retry_after_from_headers(headers: Mapping[str, str], *, now: float) -> float | None:
    """`retry-after-ms` first (more precise), then `retry-after` (seconds or HTTP date)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    raw_ms = lowered.get("retry-after-ms")
    if raw_ms is not None:
        with contextlib.suppress(ValueError):
            return max(0.0, float(raw_ms) / 1000.0)
    raw = lowered.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    with contextlib.suppress(TypeError, ValueError, IndexError):
        when = email.utils.parsedate_to_datetime(raw)
        return max(0.0, when.timestamp() - now)
    return None


def _type_from_error_object(err: Mapping[str, Any]) -> tuple[UpstreamErrorType, bool | None]:
    """Classify by the provider's own `type` / `code` words; (type, retryable override)."""
    words = f"{err.get('type') or ''} {err.get('code') or ''}".lower()
    if "insufficient_quota" in words:
        return "rate_limit", False
    if (
        "rate_limit" in words
        or "capacity_exceeded" in words
        or words.split()[:1]
        in (
            ["tokens"],
            ["requests"],
        )
    ):
        return "rate_limit", None
    if any(w in words for w in ("invalid_api_key", "authentication", "permission", "unauth")):
        return "auth", None
    if any(w in words for w in ("server_error", "internal", "overloaded", "unavailable")):
        return "server_error", None
    if any(w in words for w in ("timeout", "timed_out")):
        return "timeout", None
    if any(w in words for w in ("invalid_request", "context_length", "not_found", "invalid")):
        return "bad_request", None
    return "upstream_error", None


def _type_from_status(status: int) -> UpstreamErrorType:
    if status in (401, 403):
        return "auth"
    if status in (429, 498):  # 498: Groq's flex tier at capacity (docs: retry with backoff)
        return "rate_limit"
    if status in (408, 504):
        return "timeout"
    if status >= 500 or status == 409:  # 409: OpenAI's SDK retries lock conflicts too
        return "server_error"
    if status in (400, 404, 405, 413, 415, 422):
        return "bad_request"
    return "upstream_error"


def _looks_like_html(text: str) -> bool:
    head = text.lstrip()[:200].lower()
    return head.startswith("<!doctype html") or head.startswith("<html") or "<body" in head


def _html_title(text: str) -> str:
    match = re.search(r"<title>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
    return " ".join(match.group(1).split())[:120] if match else ""


def error_object_of(body: Any) -> dict[str, Any] | None:
    """The `error` object of a decoded body, if it has one (dict or bare string)."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return err
        if isinstance(err, str) and err:
            return {"message": err}
    return None


def error_from_object(
    err: Mapping[str, Any],
    *,
    provider: str,
    status: int | None = None,
    tokens_received: int = 0,
    retry_after_s: float | None = None,
    in_band: bool = False,
    clean: Redactor = PLAIN,
) -> UpstreamError:
    """An `{"error": {...}}` object (from a status body or inside a 200 stream).

    `in_band`: the error came inside a stream that had begun; a numeric `code`
    (OpenRouter sends the HTTP status there) or server words in the message make it
    a retryable `server_error`, anything else unknown stays `upstream_error`."""
    message = str(err.get("message") or err.get("type") or "upstream error")
    kind, retryable = _type_from_error_object(err)
    if status in (401, 403):
        kind = "auth"  # whatever the body's words: the credentials were refused
    if kind == "upstream_error" and status is not None and status >= 400:
        kind = _type_from_status(status)
    if kind == "upstream_error":
        code = _numeric_code(err.get("code"))
        if code is not None:
            kind = _type_from_status(code)
        elif in_band and any(w in message.lower() for w in _SERVER_WORDS):
            kind = "server_error"
    if retry_after_s is None and kind == "rate_limit":
        retry_after_s = retry_after_from_message(message)
    return make_error(
        message,
        kind=kind,
        provider=provider,
        status=status,
        retry_after_s=retry_after_s,
        tokens_received=tokens_received,
        retryable=retryable,
        clean=clean,
    )


def _numeric_code(code: Any) -> int | None:
    if isinstance(code, str) and code.isdigit():
        code = int(code)
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code < 600:
        return code
    return None


def make_error(
    message: str,
    *,
    kind: UpstreamErrorType,
    provider: str,
    status: int | None = None,
    retry_after_s: float | None = None,
    tokens_received: int = 0,
    retryable: bool | None = None,
    clean: Redactor = PLAIN,
) -> UpstreamError:
    """The one constructor of a mapped provider failure: 413 is never retried, an
    `auth` error says only that, and every message is redacted and bounded."""
    if status == 413:
        retryable = False  # "request too large" for the tier: the same request never fits
    if kind == "auth":
        message = AUTH_MESSAGE + (f" (HTTP {status})" if status else "")
    return UpstreamError(
        clean(message),
        type=kind,
        provider=provider,
        status=status,
        retry_after_s=retry_after_s,
        tokens_received=tokens_received,
        retryable=retryable,
    )


def error_from_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    provider: str,
    now: float,
    clean: Redactor = PLAIN,
) -> UpstreamError:
    """A non-2xx response: JSON error body, an HTML page from a proxy, or anything."""
    retry_after = retry_after_from_headers(headers, now=now)
    text = body.decode("utf-8", "replace")
    decoded: Any = None
    with contextlib.suppress(orjson.JSONDecodeError):
        decoded = orjson.loads(body) if body else None
    err = error_object_of(decoded)
    if err is not None:
        error = error_from_object(
            err, provider=provider, status=status, retry_after_s=retry_after, clean=clean
        )
        # The status is the stronger signal when the body's words are unknown.
        if error.type == "upstream_error":
            error = _with_type(error, _type_from_status(status), clean)
        return error
    kind = _type_from_status(status)
    if _looks_like_html(text):
        title = _html_title(text)
        message = f"HTTP {status}: HTML error page from a proxy" + (f" ({title})" if title else "")
    else:
        message = f"HTTP {status}: {' '.join(text.split())[:200] or 'empty body'}"
    if retry_after is None and kind == "rate_limit":
        retry_after = retry_after_from_message(text)
    return make_error(
        message,
        kind=kind,
        provider=provider,
        status=status,
        retry_after_s=retry_after,
        clean=clean,
    )


def _with_type(error: UpstreamError, kind: UpstreamErrorType, clean: Redactor) -> UpstreamError:
    return make_error(
        error.message,
        kind=kind,
        provider=error.provider,
        status=error.status,
        retry_after_s=error.retry_after_s,
        tokens_received=error.tokens_received,
        clean=clean,
    )


def error_from_httpx(
    exc: httpx.HTTPError, provider: str, *, tokens_received: int = 0, clean: Redactor = PLAIN
) -> UpstreamError:
    """One httpx failure as an `UpstreamError` (the caller raises it `from exc`)."""
    if isinstance(exc, httpx.TimeoutException):
        # ConnectTimeout / ReadTimeout / WriteTimeout / PoolTimeout
        return make_error(
            f"{type(exc).__name__}: {str(exc) or 'timed out'}",
            kind="timeout",
            provider=provider,
            tokens_received=tokens_received,
            clean=clean,
        )
    # ConnectError, ReadError (connection reset), RemoteProtocolError (peer closed
    # mid-body, incomplete chunked read), WriteError, ProxyError, decoding errors...
    return make_error(
        f"{type(exc).__name__}: {str(exc) or 'connection reset or closed by the peer'}",
        kind="connection_lost",
        provider=provider,
        tokens_received=tokens_received,
        clean=clean,
    )


@contextlib.contextmanager
def map_httpx_exceptions(
    provider: str, *, tokens_received: int = 0, clean: Redactor = PLAIN
) -> Iterator[None]:
    """Translate httpx failures, once, at the edge (httpx's own `map_*_exceptions` pattern)."""
    try:
        yield
    except httpx.HTTPError as exc:
        raise error_from_httpx(exc, provider, tokens_received=tokens_received, clean=clean) from exc
