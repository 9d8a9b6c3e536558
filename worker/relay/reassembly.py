"""The client rule, in Python: rebuild a stream from `llm-token` messages by offset.

Pure (no I/O), shared by `llm-relay watch` and by every test that checks delivery.

- Tokens are applied in stream-wide offset order; each goes to its kind's text.
- What lies below the next expected offset is a duplicate (a retry or a fallback
  piece of something already applied) and is dropped, token by token: a message
  that straddles the expected offset contributes only its new tail.
- A message above the expected offset opens a gap: it is held until the gap fills.
- `llm-done` tells the total; the stream is complete when the next expected offset
  reaches it, and the checksums then say whether the text is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from worker.relay.wire import (
    DoneMessage,
    ErrorMessage,
    StatusMessage,
    TokenMessage,
    WireMessage,
    text_checksum,
)


@dataclass
class StreamReassembly:
    """One stream's reassembly state (start from a snapshot with `start_*`)."""

    stream: str
    next_offset: int = 0
    content: str = ""
    reasoning: str = ""
    duplicate_tokens: int = 0
    duplicate_messages: int = 0
    gaps: int = 0
    messages: int = 0
    done: DoneMessage | None = None
    error: ErrorMessage | None = None
    statuses: list[StatusMessage] = field(default_factory=list)
    _held: dict[int, list[TokenMessage]] = field(default_factory=dict, repr=False)
    _content_parts: list[str] = field(default_factory=list, repr=False)
    _reasoning_parts: list[str] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._content_parts = [self.content] if self.content else []
        self._reasoning_parts = [self.reasoning] if self.reasoning else []

    # --- reading ---

    @property
    def held_messages(self) -> int:
        return sum(len(v) for v in self._held.values())

    @property
    def complete(self) -> bool:
        return self.done is not None and self.next_offset >= self.done.total_tokens

    def text(self) -> tuple[str, str]:
        """(content, reasoning) as applied so far."""
        self.content = "".join(self._content_parts)
        self.reasoning = "".join(self._reasoning_parts)
        self._content_parts = [self.content] if self.content else []
        self._reasoning_parts = [self.reasoning] if self.reasoning else []
        return self.content, self.reasoning

    def checksums_match(self) -> bool:
        """True when complete and both texts hash to what `llm-done` announced."""
        if not self.complete or self.done is None:
            return False
        content, reasoning = self.text()
        return (
            text_checksum(content) == self.done.content_sha256
            and text_checksum(reasoning) == self.done.reasoning_sha256
        )

    # --- applying ---

    def apply(self, message: WireMessage) -> list[tuple[str, str]]:
        """Apply one message; return the (kind, text) pieces newly in order."""
        self.messages += 1
        if isinstance(message, TokenMessage):
            return self._apply_tokens(message)
        if isinstance(message, DoneMessage):
            self.done = message
        elif isinstance(message, ErrorMessage):
            self.error = message
        else:
            self.statuses.append(message)
        return []

    def _apply_tokens(self, message: TokenMessage) -> list[tuple[str, str]]:
        if message.end_offset <= self.next_offset:
            self.duplicate_messages += 1
            self.duplicate_tokens += len(message.tokens)
            return []
        if message.offset > self.next_offset:
            self.gaps += 1
            self._held.setdefault(message.offset, []).append(message)
            return []
        out = self._take(message)
        out.extend(self._drain_held())
        return out

    def _take(self, message: TokenMessage) -> list[tuple[str, str]]:
        skip = self.next_offset - message.offset
        self.duplicate_tokens += skip
        fresh = message.tokens[skip:]
        text = "".join(fresh)
        (self._content_parts if message.kind == "content" else self._reasoning_parts).append(text)
        self.next_offset = message.end_offset
        return [(message.kind, text)] if text else []

    def _drain_held(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        while self._held:
            ready = [off for off in self._held if off <= self.next_offset]
            if not ready:
                break
            for off in sorted(ready):
                for message in self._held.pop(off):
                    if message.end_offset <= self.next_offset:
                        self.duplicate_messages += 1
                        self.duplicate_tokens += len(message.tokens)
                    else:
                        out.extend(self._take(message))
        return out


@dataclass
class TopicReassembly:
    """Every stream seen on one topic, by stream id."""

    streams: dict[str, StreamReassembly] = field(default_factory=dict)

    def apply(self, message: WireMessage) -> list[tuple[str, str]]:
        state = self.streams.get(message.stream)
        if state is None:
            state = self.streams[message.stream] = StreamReassembly(message.stream)
        return state.apply(message)
