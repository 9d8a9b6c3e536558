"""The token batcher: a pure core, no awaits, `now` passed in (like httpx's `LineDecoder`).

The shell (`worker.relay.stream`) feeds tokens, polls at `deadline()`, and flushes at
the end of the stream. Every returned `Batch` holds tokens of one kind, with the
stream-wide offset of its first token.

Flush rules, in order of precedence:
- the first token of a stream goes out at once (time to first token matters most);
- a kind switch (reasoning <-> content) closes the current batch, whatever its size;
- a batch whose UTF-8 size reaches `max_batch_bytes` goes out (payload limits);
- `batch_size` tokens, or the oldest token waiting `max_delay_s`, flush the batch —
  but never sooner than `min_interval_s` after the previous flush. That interval is
  the budget hook: when the messages/s budget is short, the shell raises it and
  batches grow (more tokens per message) instead of adding messages;
- `flush(now)` at the end of the stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from worker.upstream.events import Token, TokenKind

FlushReason = Literal["first", "size", "delay", "kind", "bytes", "end"]

# Free plan payloads are capped at 256 KB; JSON may escape a control byte into six,
# so 32 KB of raw token text always fits.
DEFAULT_MAX_BATCH_BYTES = 32_000


@dataclass(frozen=True, slots=True)
class Batch:
    """Consecutive tokens of one kind; `offset` is the stream-wide index of the first."""

    kind: TokenKind
    offset: int
    tokens: tuple[str, ...]
    reason: FlushReason

    @property
    def end_offset(self) -> int:
        return self.offset + len(self.tokens)


class Batcher:
    """Group tokens into batches by size, delay, kind and budget (see module docstring)."""

    def __init__(
        self,
        batch_size: int,
        max_delay_s: float,
        *,
        start_offset: int = 0,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        first_token_at_once: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if max_delay_s <= 0:
            raise ValueError("max_delay_s must be > 0")
        self.batch_size = batch_size
        self.max_delay_s = max_delay_s
        self.max_batch_bytes = max_batch_bytes
        self.min_interval_s = 0.0
        self._next_offset = start_offset
        self._first_sent = not first_token_at_once
        self._kind: TokenKind | None = None
        self._tokens: list[str] = []
        self._bytes = 0
        self._oldest_at: float | None = None
        self._last_flush_at: float | None = None

    # --- the budget hook ---

    def set_min_interval(self, min_interval_s: float) -> None:
        """Shortest time between two size/delay flushes (0: no pacing)."""
        self.min_interval_s = max(0.0, min_interval_s)

    # --- state ---

    @property
    def next_offset(self) -> int:
        """Offset the next fed token will get."""
        return self._next_offset

    @property
    def pending(self) -> int:
        return len(self._tokens)

    def deadline(self) -> float | None:
        """When the shell should call `poll` next (None: nothing pending)."""
        if self._oldest_at is None:
            return None
        due = (
            self._oldest_at + self.max_delay_s
            if len(self._tokens) < self.batch_size
            else self._oldest_at
        )
        return max(due, self._paced_from())

    # --- events ---

    def feed(self, token: Token, now: float) -> list[Batch]:
        """Add one token; return the batches that are complete because of it."""
        out: list[Batch] = []
        if self._kind is not None and token.kind != self._kind:
            out.append(self._take("kind", now))
        if not self._tokens:
            self._kind = token.kind
            self._oldest_at = now
        self._tokens.append(token.text)
        self._bytes += len(token.text.encode("utf-8"))
        self._next_offset += 1
        if not self._first_sent:
            self._first_sent = True
            out.append(self._take("first", now))
        elif self._bytes >= self.max_batch_bytes:
            out.append(self._take("bytes", now))
        else:
            out.extend(self.poll(now))
        return out

    def poll(self, now: float) -> list[Batch]:
        """Flush the pending batch if its size or delay says so and pacing allows."""
        deadline = self.deadline()
        if deadline is None or now < deadline:
            return []
        reason: FlushReason = "size" if len(self._tokens) >= self.batch_size else "delay"
        return [self._take(reason, now)]

    def flush(self, now: float) -> list[Batch]:
        """End of stream (or before a status/done event): everything pending, now."""
        if not self._tokens:
            return []
        return [self._take("end", now)]

    # --- internals ---

    def _paced_from(self) -> float:
        if self._last_flush_at is None:
            return float("-inf")
        return self._last_flush_at + self.min_interval_s

    def _take(self, reason: FlushReason, now: float) -> Batch:
        assert self._kind is not None and self._tokens
        batch = Batch(
            kind=self._kind,
            offset=self._next_offset - len(self._tokens),
            tokens=tuple(self._tokens),
            reason=reason,
        )
        self._tokens = []
        self._bytes = 0
        self._kind = None
        self._oldest_at = None
        self._last_flush_at = now
        return batch
