"""`StreamTranscript`: the one accumulator of a generation's output, fed by events.

Pure: no I/O, no clock. The relay pump, the runner, the probe and the upstream
client's recovery each keep one, instead of five hand-written accumulators that
disagreed on details (which `id` of a tool call wins, whether a takeover's start
text counts). Content and reasoning share one offset space: `next_offset` is the
stream-wide index of the next token.

Tool calls are kept by index; the first non-empty `id` and `name` of an index win
(OpenAI sends them once, on the first delta) and arguments are concatenated *within
one attempt only*: a transcript is never fed two attempts' deltas (see `UpstreamClient`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from worker.upstream.events import Refusal, Token, ToolCallDelta, UpstreamEvent


@dataclass(frozen=True, slots=True)
class ToolCall:
    index: int
    id: str | None
    name: str | None
    arguments: str

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "id": self.id, "name": self.name, "arguments": self.arguments}


@dataclass
class StreamTranscript:
    """Content, reasoning, next offset, tool calls by index and refusal of one stream."""

    start_offset: int = 0
    next_offset: int = 0
    keep_tokens: bool = False  # also keep each token (the probe reports them)
    next_seq: int = 0  # the relay's next message number (kept by the relay)
    _content: list[str] = field(default_factory=list)
    _reasoning: list[str] = field(default_factory=list)
    _refusal: list[str] = field(default_factory=list)
    _calls: dict[int, list[Any]] = field(default_factory=dict)  # index -> [id, name, [args]]
    content_tokens: list[str] = field(default_factory=list)
    reasoning_tokens: list[str] = field(default_factory=list)

    @classmethod
    def resume(
        cls, *, content: str = "", reasoning: str = "", next_offset: int = 0, next_seq: int = 0
    ) -> StreamTranscript:
        """A transcript that continues a stored one (a takeover)."""
        t = cls(start_offset=next_offset, next_offset=next_offset, next_seq=next_seq)
        if content:
            t._content.append(content)
        if reasoning:
            t._reasoning.append(reasoning)
        return t

    # --- feeding ---

    def feed(self, event: UpstreamEvent) -> None:
        """Account for one event; events other than output are ignored."""
        if type(event) is Token:
            self.add_token(event.kind, event.text)
        elif isinstance(event, ToolCallDelta):
            call = self._calls.setdefault(event.index, [None, None, []])
            call[0] = call[0] or event.id or None
            call[1] = call[1] or event.name or None
            if event.arguments:
                call[2].append(event.arguments)
        elif isinstance(event, Refusal):
            self._refusal.append(event.text)

    def add_token(self, kind: str, text: str) -> None:
        if kind == "content":
            self._content.append(text)
            if self.keep_tokens:
                self.content_tokens.append(text)
        else:
            self._reasoning.append(text)
            if self.keep_tokens:
                self.reasoning_tokens.append(text)
        self.next_offset += 1

    # --- reading ---

    @property
    def tokens(self) -> int:
        """Tokens fed since the start (a takeover's stored tokens excluded)."""
        return self.next_offset - self.start_offset

    @property
    def content(self) -> str:
        return _compact(self._content)

    @property
    def reasoning(self) -> str:
        return _compact(self._reasoning)

    @property
    def refusal(self) -> str | None:
        return _compact(self._refusal) or None

    @property
    def has_tool_calls(self) -> bool:
        return bool(self._calls)

    @property
    def tool_calls(self) -> list[ToolCall]:
        return [ToolCall(i, c[0], c[1], _compact(c[2])) for i, c in sorted(self._calls.items())]

    def tool_call_dicts(self) -> list[dict[str, Any]]:
        return [call.to_dict() for call in self.tool_calls]


def _compact(parts: list[str]) -> str:
    """Join, and keep the join (the next read costs only what was added since)."""
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return ""
    joined = "".join(parts)
    parts[:] = [joined]
    return joined
