"""HTTP statuses, error bodies, HTML pages and retry hints -> UpstreamError."""

from __future__ import annotations

import email.utils

import httpx
import orjson
import pytest

from worker.errors import UpstreamError
from worker.upstream.errormap import (
    error_from_response,
    map_httpx_exceptions,
    parse_duration_s,
    retry_after_from_headers,
    retry_after_from_message,
)

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("4.77s", 4.77), ("1m0.363142857s", 60.363142857), ("300ms", 0.3), ("2h1m", 7260.0)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration_s(text) == pytest.approx(seconds)


def test_groq_message_hint() -> None:
    message = (
        "Rate limit reached for model `llama3-70b-8192` in organization `org_x` on tokens "
        "per minute (TPM): Limit 7000, Used 0, Requested ~12903. Please try again in "
        "50.597142857s. Visit https://console.groq.com/docs/rate-limits for more information."
    )
    assert retry_after_from_message(message) == pytest.approx(50.597142857)
    assert retry_after_from_message("no hint here") is None


def test_retry_after_headers() -> None:
    assert retry_after_from_headers({"Retry-After-Ms": "1500", "retry-after": "9"}, now=NOW) == 1.5
    assert retry_after_from_headers({"retry-after": "2"}, now=NOW) == 2.0
    date = email.utils.formatdate(NOW + 30, usegmt=True)
    assert retry_after_from_headers({"retry-after": date}, now=NOW) == pytest.approx(30.0)
    assert retry_after_from_headers({"retry-after": "soon"}, now=NOW) is None
    assert retry_after_from_headers({}, now=NOW) is None


def body(message: str, type_: str | None = None, code: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "code": code}})


@pytest.mark.parametrize(
    ("status", "payload", "kind", "retryable"),
    [
        (401, body("Incorrect API key", "invalid_request_error", "invalid_api_key"), "auth", False),
        (400, body("bad param", "invalid_request_error"), "bad_request", False),
        (429, body("slow down", "requests", "rate_limit_exceeded"), "rate_limit", True),
        (429, body("quota", "insufficient_quota", "insufficient_quota"), "rate_limit", False),
        (500, body("oops", "server_error"), "server_error", True),
        (503, body("x", "weird"), "server_error", True),
        (418, b"teapot", "upstream_error", False),
        (504, b"", "timeout", True),
        (498, body("flex at capacity", "capacity_exceeded"), "rate_limit", True),
        (498, b"", "rate_limit", True),
    ],
)
def test_status_mapping(status: int, payload: bytes, kind: str, retryable: bool) -> None:
    error = error_from_response(status, {}, payload, provider="openai", now=NOW)
    assert (error.type, error.retryable, error.status) == (kind, retryable, status)


def test_html_502_from_proxy() -> None:
    page = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
    error = error_from_response(502, {"content-type": "text/html"}, page, provider="groq", now=NOW)
    assert error.type == "server_error" and error.retryable
    assert "HTML error page" in error.message and "502 Bad Gateway" in error.message


def test_429_retry_after_precedence() -> None:
    groq = body("Please try again in 1.5s.", "tokens", "rate_limit_exceeded")
    assert error_from_response(429, {}, groq, provider="groq", now=NOW).retry_after_s == 1.5
    headed = error_from_response(429, {"retry-after": "3"}, groq, provider="groq", now=NOW)
    assert headed.retry_after_s == 3.0


async def test_map_httpx_exceptions() -> None:
    request = httpx.Request("POST", "http://x")
    cases: list[tuple[Exception, str]] = [
        (httpx.ReadError("reset", request=request), "connection_lost"),
        (httpx.RemoteProtocolError("peer closed", request=request), "connection_lost"),
        (httpx.ConnectError("refused", request=request), "connection_lost"),
        (httpx.ReadTimeout("slow", request=request), "timeout"),
        (httpx.ConnectTimeout("slow", request=request), "timeout"),
    ]
    for exc, kind in cases:
        with pytest.raises(UpstreamError) as info, map_httpx_exceptions("groq", tokens_received=4):
            raise exc
        assert info.value.type == kind and info.value.retryable
        assert info.value.tokens_received == 4 and info.value.__cause__ is exc
