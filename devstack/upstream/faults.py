"""Fault injection for the simulated upstream: one `Fault` per request, from a queue.

In-process: `upstream.faults.push(Fault.reset(after_tokens=3), Fault.rate_limit(...))`;
each incoming chat request takes the next fault (or none: a healthy stream).
Out of process: `POST /_control/faults` with `{"faults": [<Fault.to_dict()>...]}`,
`DELETE /_control/faults`, `GET /_control/faults`, `GET /_control/requests`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

FaultKind = Literal[
    "status",  # answer with an HTTP error (429 / 5xx / 401 / 400 / HTML 502)
    "reset",  # stream `after_tokens` tokens, then reset the TCP connection (RST)
    "hang_after_headers",  # send 200 + headers, then nothing
    "hang",  # stream `after_tokens` tokens, then nothing (connection stays open)
    "slow_first_token",  # wait `delay_s` after the headers, then stream normally
    "error_event",  # stream `after_tokens` tokens, then an error inside the 200 stream
    "malformed",  # stream `after_tokens` tokens, then a chunk that is not JSON
    "truncate",  # stream `after_tokens` tokens, then end the body cleanly, no [DONE]
    # --- a hostile or broken upstream (issue #12) ---
    "empty_data",  # a healthy stream with `data:` / `data: ` keep-alive events between tokens
    "endless_data",  # after `after_tokens`, `data:` lines that never reach a blank line
    "no_newline",  # after `after_tokens`, one line that never ends
    "gzip_bomb",  # Content-Encoding gzip: `size_bytes` of comment lines (or one line), ~1000:1
    "ignore_max_tokens",  # stream `size_bytes` tokens whatever max_tokens says
    "nul_token",  # after `after_tokens`, a token holding U+0000, then the rest
    "echo_key",  # an HTTP `status` error whose message quotes the Authorization header
    "inband_error",  # after `after_tokens`, an in-band error (`style`: groq | openrouter)
    #                  then `[DONE]`
]

GROQ_RATE_LIMIT_MESSAGE = (
    "Rate limit reached for model `{model}` in organization `org_devstack` service tier "
    "`on_demand` on tokens per minute (TPM): Limit 6000, Used 5034, Requested 1443. "
    "Please try again in {seconds}s. Need more tokens? Upgrade to Dev Tier today at "
    "https://console.groq.com/settings/billing"
)

HTML_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)


@dataclass
class Fault:
    kind: FaultKind
    after_tokens: int = 0
    status: int = 500
    body: str | None = None  # raw body for `status` (else an OpenAI-shaped error)
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # slow_first_token delay; hang duration cap
    error: dict[str, Any] | None = None  # the error object for `error_event`
    as_event: bool = False  # error_event: `event: error` instead of `data: {"error":...}`
    size_bytes: int = 0  # endless_data / no_newline / gzip_bomb: bytes; ignore_max_tokens: tokens
    style: str = ""  # inband_error: "groq" (x_groq.error) or "openrouter" (error + finish)

    # --- constructors for the common cases ---
    @classmethod
    def http(cls, status: int, message: str = "", error_type: str = "", code: str = "") -> Fault:
        return cls(
            "status",
            status=status,
            error={"message": message or f"HTTP {status}", "type": error_type, "code": code},
        )

    @classmethod
    def rate_limit(
        cls,
        *,
        retry_after_s: float | None = None,
        retry_after_ms: float | None = None,
        groq_message_s: float | None = None,
    ) -> Fault:
        headers: dict[str, str] = {}
        if retry_after_s is not None:
            headers["retry-after"] = f"{retry_after_s:g}"
        if retry_after_ms is not None:
            headers["retry-after-ms"] = f"{retry_after_ms:g}"
        message = "Rate limit reached for requests"
        if groq_message_s is not None:
            message = GROQ_RATE_LIMIT_MESSAGE.format(model="{model}", seconds=groq_message_s)
        return cls(
            "status",
            status=429,
            headers=headers,
            error={"message": message, "type": "tokens", "code": "rate_limit_exceeded"},
        )

    @classmethod
    def html_502(cls) -> Fault:
        return cls("status", status=502, body=HTML_502, content_type="text/html")

    @classmethod
    def reset(cls, after_tokens: int = 0) -> Fault:
        return cls("reset", after_tokens=after_tokens)

    @classmethod
    def hang(cls, after_tokens: int = 0, *, max_s: float = 3600.0) -> Fault:
        return cls("hang", after_tokens=after_tokens, delay_s=max_s)

    @classmethod
    def hang_after_headers(cls, *, max_s: float = 3600.0) -> Fault:
        return cls("hang_after_headers", delay_s=max_s)

    @classmethod
    def slow_first_token(cls, delay_s: float) -> Fault:
        return cls("slow_first_token", delay_s=delay_s)

    @classmethod
    def error_event(
        cls, after_tokens: int = 0, *, as_event: bool = False, error: dict[str, Any] | None = None
    ) -> Fault:
        default = {
            "message": "The server had an error while processing your request. Sorry about that!",
            "type": "server_error",
            "param": None,
            "code": None,
        }
        return cls(
            "error_event", after_tokens=after_tokens, as_event=as_event, error=error or default
        )

    @classmethod
    def malformed(cls, after_tokens: int = 0) -> Fault:
        return cls("malformed", after_tokens=after_tokens)

    @classmethod
    def truncate(cls, after_tokens: int = 0) -> Fault:
        return cls("truncate", after_tokens=after_tokens)

    # --- hostile modes ---
    @classmethod
    def empty_data(cls) -> Fault:
        return cls("empty_data")

    @classmethod
    def endless_data(cls, after_tokens: int = 0, *, size_bytes: int = 4 << 30) -> Fault:
        return cls("endless_data", after_tokens=after_tokens, size_bytes=size_bytes)

    @classmethod
    def no_newline(cls, after_tokens: int = 0, *, size_bytes: int = 4 << 30) -> Fault:
        return cls("no_newline", after_tokens=after_tokens, size_bytes=size_bytes)

    @classmethod
    def gzip_bomb(cls, *, size_bytes: int = 512 << 20, style: str = "lines") -> Fault:
        """`style`: "lines" (comment lines: only a decoded-body bound stops it) or
        "line" (`data: ` and one line of zeros that never ends)."""
        return cls("gzip_bomb", size_bytes=size_bytes, style=style)

    @classmethod
    def ignore_max_tokens(cls, *, tokens: int = 1_000_000) -> Fault:
        return cls("ignore_max_tokens", size_bytes=tokens)

    @classmethod
    def nul_token(cls, after_tokens: int = 0) -> Fault:
        return cls("nul_token", after_tokens=after_tokens)

    @classmethod
    def echo_key(cls, status: int = 401) -> Fault:
        return cls("echo_key", status=status)

    @classmethod
    def inband_error(
        cls, after_tokens: int = 0, *, style: str = "groq", code: int | str = 503
    ) -> Fault:
        error = {"message": "Service Unavailable: the model is over capacity", "code": code}
        return cls("inband_error", after_tokens=after_tokens, style=style, error=error)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fault:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class FaultQueue:
    """Faults for the next requests, in order; a request with none streams normally."""

    def __init__(self) -> None:
        self._queue: deque[Fault] = deque()

    def push(self, *faults: Fault) -> None:
        self._queue.extend(faults)

    def clear(self) -> None:
        self._queue.clear()

    def pending(self) -> list[Fault]:
        return list(self._queue)

    def take(self) -> Fault | None:
        return self._queue.popleft() if self._queue else None

    def __len__(self) -> int:
        return len(self._queue)
