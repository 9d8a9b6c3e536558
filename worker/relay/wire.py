"""The frontend contract, version 1: broadcast events and their payloads.

Every payload carries `v` (1), `stream` (the stream id) and `seq`. `seq` numbers the
messages of a stream 0, 1, 2, ... in the order they are first transmitted; a retry
re-sends the identical payload (same seq), and the token-by-token fallback sends
each token of a failed batch as a new message (new seq, its own offset). Clients
must not rely on seq for correctness: offsets are the truth.

- `llm-token`  `{"v":1,"stream","seq","offset","kind","tokens":[...]}`: `offset` is the
  stream-wide index of the first token; a message holds one kind.
- `llm-done`   totals, finish reason, usage, tool calls, refusal, and checksums:
  `total_tokens` is the offset after the last token (the client is complete when its
  next expected offset reaches it) and `checksum` holds the SHA-256 hex digests of
  the UTF-8 encodings of the full content and reasoning texts.
- `llm-error`  `{"type","message","retryable","tokens_relayed"}`: tokens_relayed is the
  stream-wide count of tokens handed to Realtime so far (= next offset).
- `llm-status` `{"status": retrying|resuming|reset|fallback|cancelled, "detail": {...}}`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Final, cast

from worker.errors import BadInputError
from worker.upstream.events import TokenKind

WIRE_VERSION: Final = 1
EVENT_TOKEN: Final = "llm-token"
EVENT_DONE: Final = "llm-done"
EVENT_ERROR: Final = "llm-error"
EVENT_STATUS: Final = "llm-status"
EVENTS: Final = (EVENT_TOKEN, EVENT_DONE, EVENT_ERROR, EVENT_STATUS)
CHECKSUM_ALGORITHM: Final = "sha256"

Payload = dict[str, Any]


def text_checksum(text: str) -> str:
    """SHA-256 hex digest of the UTF-8 encoding of `text` (the `llm-done` checksum)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class TokenMessage:
    stream: str
    seq: int
    offset: int
    kind: TokenKind
    tokens: tuple[str, ...]

    @property
    def end_offset(self) -> int:
        return self.offset + len(self.tokens)

    def to_payload(self) -> Payload:
        return {
            "v": WIRE_VERSION,
            "stream": self.stream,
            "seq": self.seq,
            "offset": self.offset,
            "kind": self.kind,
            "tokens": list(self.tokens),
        }


@dataclass(frozen=True, slots=True)
class DoneMessage:
    stream: str
    seq: int
    total_tokens: int
    finish_reason: str | None
    content_sha256: str
    reasoning_sha256: str
    usage: dict[str, Any] | None = None
    usage_estimated: bool = False
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    refusal: str | None = None

    def to_payload(self) -> Payload:
        return {
            "v": WIRE_VERSION,
            "stream": self.stream,
            "seq": self.seq,
            "total_tokens": self.total_tokens,
            "finish_reason": self.finish_reason,
            "usage": self.usage,
            "usage_estimated": self.usage_estimated,
            "tool_calls": self.tool_calls,
            "refusal": self.refusal,
            "checksum": {
                "algorithm": CHECKSUM_ALGORITHM,
                "content": self.content_sha256,
                "reasoning": self.reasoning_sha256,
            },
        }


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    stream: str
    seq: int
    type: str
    message: str
    retryable: bool
    tokens_relayed: int

    def to_payload(self) -> Payload:
        return {
            "v": WIRE_VERSION,
            "stream": self.stream,
            "seq": self.seq,
            "type": self.type,
            "message": self.message,
            "retryable": self.retryable,
            "tokens_relayed": self.tokens_relayed,
        }


@dataclass(frozen=True, slots=True)
class StatusMessage:
    stream: str
    seq: int
    status: str
    detail: dict[str, Any] = field(default_factory=dict)

    def to_payload(self) -> Payload:
        return {
            "v": WIRE_VERSION,
            "stream": self.stream,
            "seq": self.seq,
            "status": self.status,
            "detail": self.detail,
        }


WireMessage = TokenMessage | DoneMessage | ErrorMessage | StatusMessage


# --- parsing (for `watch`, the tests, and anyone checking a stream) ---


def _get(payload: Payload, key: str, typ: type | tuple[type, ...]) -> Any:
    value = payload.get(key)
    # bool is an int in Python; never accept it where a number is meant.
    if not isinstance(value, typ) or (isinstance(value, bool) and bool not in _as_tuple(typ)):
        raise BadInputError(f"wire payload: {key!r} missing or not {typ}", field=key)
    return value


def _as_tuple(typ: type | tuple[type, ...]) -> tuple[type, ...]:
    return typ if isinstance(typ, tuple) else (typ,)


def _parse_token(payload: Payload, stream: str, seq: int) -> TokenMessage:
    kind = _get(payload, "kind", str)
    if kind not in ("content", "reasoning"):
        raise BadInputError(f"wire payload: unknown kind {kind!r}", field="kind")
    offset = _get(payload, "offset", int)
    tokens = _get(payload, "tokens", list)
    if offset < 0 or not all(isinstance(t, str) for t in tokens):
        raise BadInputError("wire payload: bad offset or tokens", field="tokens")
    return TokenMessage(stream, seq, offset, cast(TokenKind, kind), tuple(tokens))


def _parse_done(payload: Payload, stream: str, seq: int) -> DoneMessage:
    checksum = _get(payload, "checksum", dict)
    return DoneMessage(
        stream=stream,
        seq=seq,
        total_tokens=_get(payload, "total_tokens", int),
        finish_reason=payload.get("finish_reason"),
        content_sha256=str(checksum.get("content", "")),
        reasoning_sha256=str(checksum.get("reasoning", "")),
        usage=payload.get("usage"),
        usage_estimated=bool(payload.get("usage_estimated", False)),
        tool_calls=list(payload.get("tool_calls") or []),
        refusal=payload.get("refusal"),
    )


def parse_message(event: str, payload: Payload) -> WireMessage:
    """Validate one received broadcast; raise `BadInputError` when it is not ours."""
    if not isinstance(payload, dict) or payload.get("v") != WIRE_VERSION:
        raise BadInputError("wire payload: not a version 1 payload", field="v")
    stream = _get(payload, "stream", str)
    seq = _get(payload, "seq", int)
    if event == EVENT_TOKEN:
        return _parse_token(payload, stream, seq)
    if event == EVENT_DONE:
        return _parse_done(payload, stream, seq)
    if event == EVENT_ERROR:
        return ErrorMessage(
            stream=stream,
            seq=seq,
            type=_get(payload, "type", str),
            message=_get(payload, "message", str),
            retryable=_get(payload, "retryable", bool),
            tokens_relayed=_get(payload, "tokens_relayed", int),
        )
    if event == EVENT_STATUS:
        return StatusMessage(stream, seq, _get(payload, "status", str), payload.get("detail") or {})
    raise BadInputError(f"wire: unknown event {event!r}", field="event")


def token_pieces(message: TokenMessage, first_seq: int) -> list[TokenMessage]:
    """The token-by-token fallback of one batch: one message per token, seq from first_seq."""
    return [
        TokenMessage(message.stream, first_seq + i, message.offset + i, message.kind, (tok,))
        for i, tok in enumerate(message.tokens)
    ]
