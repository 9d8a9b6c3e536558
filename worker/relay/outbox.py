"""The publisher's pure core: one topic's messages, their states and every decision.

No awaits, no clock, no sockets (`now` is passed in), like websockets' protocol.py: the
shells (`worker.relay.publisher`, `.link`, `.rest`) only ask what to send next, send it,
and report what came back.

    enqueue ──▶ QUEUED ──take()──▶ IN_FLIGHT ──ack──▶ (delivered, gone)
                  ▲  ▲                 │
                  │  └── retry / path failure (at once) ◀──┤ failure
                  │                                         │
                PARKED ◀── pieces and events that keep failing

- Messages leave in `order` (enqueue order; the pieces of a split batch keep their
  parent's place). `take()` returns the first ready one.
- Coalescing: a never-sent `llm-token` batch absorbs the never-sent batches of the
  same stream and kind queued right behind it (contiguous offsets, up to the byte
  cap). Tokens that waited are sent together, so messages per token *fall* when the
  sender falls behind.
- The payload is frozen (seq fixed) at the first transmission: a retry re-sends it
  byte for byte; a reply to an older transmission is ignored (`attempt`).
- Failures go through `RetryPolicy`: a failure of the path (socket or channel gone)
  re-queues at once and does not count; others retry with backoff, then split into
  one-token messages, then park until the channel is back (or the backoff elapsed).
  Nothing is dropped.
"""

from __future__ import annotations

import bisect
import enum
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from worker.relay.retry import Action, Decision, RetryPolicy
from worker.relay.wire import EVENT_TOKEN, WIRE_VERSION, TokenMessage

# Failures of the path, not of the message: they never count towards the fallback.
PATH_FAILURES = frozenset({"disconnected", "channel_closed", "channel_error"})


class MessageState(enum.Enum):
    QUEUED = "queued"
    IN_FLIGHT = "in_flight"
    PARKED = "parked"
    DELIVERED = "delivered"


@dataclass
class StreamStats:
    messages: int = 0  # first transmissions
    retries: int = 0
    fallbacks: int = 0
    parked: int = 0
    rest_messages: int = 0
    coalesced: int = 0


@dataclass(eq=False)
class StreamLedger:
    """One stream's numbering and counts (what `StreamHandle` reports)."""

    stream_id: str
    next_seq: int = 0
    outstanding: int = 0  # messages queued, in flight or parked
    stats: StreamStats = field(default_factory=StreamStats)

    def take_seq(self) -> int:
        seq = self.next_seq
        self.next_seq += 1
        self.stats.messages += 1
        return seq


@dataclass(eq=False)
class Message:
    """One message to deliver; `payload` is frozen at its first transmission."""

    order: tuple[int, ...]
    ledger: StreamLedger
    event: str
    fields: dict[str, Any]
    token: TokenMessage | None = None  # llm-token messages, before their seq is fixed
    queued_at: float = 0.0
    payload: dict[str, Any] | None = None
    state: MessageState = MessageState.QUEUED
    failures: int = 0
    is_piece: bool = False
    not_before: float = 0.0
    attempt: int = 0  # transmissions so far; replies of older ones are ignored
    sent_at: float = 0.0
    ever_parked: bool = False

    @property
    def splittable(self) -> bool:
        return self.token is not None and len(self.token.tokens) > 1

    @property
    def mergeable(self) -> bool:
        """A never-sent whole batch (a sent one may have been delivered)."""
        return self.token is not None and self.payload is None and not self.is_piece


@dataclass(frozen=True, slots=True)
class Failure:
    """What the outbox decided about one failed transmission (the shell logs/counts it)."""

    message: Message
    reason: str
    decision: Decision | None  # None: a path failure, re-queued at once


def _size(tokens: tuple[str, ...] | list[str]) -> int:
    return sum(len(t.encode("utf-8")) for t in tokens)


class Outbox:
    """One topic's ordered messages (see module docstring); pure."""

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        max_message_bytes: int,
        coalesce: bool = True,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.policy = policy
        self.max_message_bytes = max_message_bytes
        self.coalesce = coalesce
        self._rand = rand
        self._pending: list[Message] = []  # QUEUED or PARKED, sorted by order
        self._in_flight: set[Message] = set()
        self._counter = 0

    # --- queue ---

    def enqueue(
        self,
        ledger: StreamLedger,
        event: str,
        fields: dict[str, Any],
        token: TokenMessage | None,
        now: float,
    ) -> Message:
        self._counter += 1
        msg = Message((self._counter, 0), ledger, event, fields, token, queued_at=now)
        ledger.outstanding += 1
        self._insert(msg)
        return msg

    def _insert(self, msg: Message) -> None:
        bisect.insort(self._pending, msg, key=lambda m: m.order)

    @property
    def empty(self) -> bool:
        return not self._pending and not self._in_flight

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def parked(self) -> int:
        return sum(1 for m in self._pending if m.state is MessageState.PARKED)

    def unsent(self, ledger: StreamLedger) -> int:
        """Messages of `ledger` whose seq is not fixed yet."""
        return sum(1 for m in self._pending if m.ledger is ledger and m.payload is None)

    def ready(self, now: float) -> Message | None:
        for msg in self._pending:
            if msg.not_before <= now:
                return msg
        return None

    def next_ready_in(self, now: float) -> float | None:
        """Seconds until a pending message is ready (None: nothing pending)."""
        if not self._pending:
            return None
        return max(0.0, min(m.not_before for m in self._pending) - now)

    def oldest_unsent_age(self, now: float) -> float:
        """How long the oldest never-sent message has waited (0: none)."""
        ages = [now - m.queued_at for m in self._pending if m.payload is None]
        return max(ages, default=0.0)

    # --- sending ---

    def take(self, now: float) -> Message | None:
        """The next message to transmit, coalesced and frozen; now IN_FLIGHT."""
        msg = self.ready(now)
        if msg is None:
            return None
        if self.coalesce and msg.mergeable:
            self._merge_behind(msg)
        self._pending.remove(msg)
        self._freeze(msg)
        msg.attempt += 1
        msg.sent_at = now
        msg.state = MessageState.IN_FLIGHT
        self._in_flight.add(msg)
        return msg

    def _merge_behind(self, first: Message) -> None:
        assert first.token is not None
        start = self._pending.index(first)
        tokens = list(first.token.tokens)
        size = _size(tokens)
        end = first.token.end_offset
        merged: list[Message] = []
        for nxt in self._pending[start + 1 :]:
            tok = nxt.token
            if (
                tok is None
                or not nxt.mergeable
                or nxt.ledger is not first.ledger
                or tok.kind != first.token.kind
                or tok.offset != end
            ):
                break
            extra = _size(tok.tokens)
            if size + extra > self.max_message_bytes:
                break
            tokens.extend(tok.tokens)
            size += extra
            end = tok.end_offset
            merged.append(nxt)
        if not merged:
            return
        for nxt in merged:
            self._pending.remove(nxt)
            nxt.state = MessageState.DELIVERED  # its tokens travel in `first`
            first.ledger.outstanding -= 1
            first.ledger.stats.coalesced += 1
        first.token = TokenMessage(
            first.token.stream, -1, first.token.offset, first.token.kind, tuple(tokens)
        )

    @staticmethod
    def _freeze(msg: Message) -> None:
        if msg.payload is not None:
            return
        seq = msg.ledger.take_seq()
        if msg.token is not None:
            tok = msg.token
            msg.token = TokenMessage(tok.stream, seq, tok.offset, tok.kind, tok.tokens)
            msg.payload = msg.token.to_payload()
        else:
            msg.payload = {"v": WIRE_VERSION, "stream": msg.ledger.stream_id, "seq": seq}
            msg.payload.update(msg.fields)

    # --- outcomes ---

    def acked(self, msg: Message, attempt: int) -> bool:
        """The server accepted transmission `attempt` of `msg`; False if stale."""
        if msg.state is not MessageState.IN_FLIGHT or msg.attempt != attempt:
            return False
        self._in_flight.discard(msg)
        msg.state = MessageState.DELIVERED
        msg.ledger.outstanding -= 1
        return True

    def failed(self, msg: Message, attempt: int, reason: str, now: float) -> Failure | None:
        """Transmission `attempt` of `msg` failed; None if stale (already settled)."""
        if msg.state is not MessageState.IN_FLIGHT or msg.attempt != attempt:
            return None
        self._in_flight.discard(msg)
        if reason in PATH_FAILURES:
            # Nothing is wrong with the message: it goes again at once, by whatever
            # route is open, and does not count towards the fallback.
            msg.state = MessageState.QUEUED
            msg.not_before = 0.0
            self._insert(msg)
            return Failure(msg, reason, None)
        msg.failures += 1
        decision = self.policy.on_failure(
            msg.failures, splittable=msg.splittable, is_piece=msg.is_piece, rand=self._rand
        )
        stats = msg.ledger.stats
        if decision.action is Action.SPLIT:
            stats.fallbacks += 1
            self._split(msg)
            return Failure(msg, reason, decision)
        msg.not_before = now + decision.delay_s
        if decision.action is Action.RETRY:
            stats.retries += 1
            msg.state = MessageState.QUEUED
        else:
            if not msg.ever_parked:
                msg.ever_parked = True
                stats.parked += 1
            msg.state = MessageState.PARKED
        self._insert(msg)
        return Failure(msg, reason, decision)

    def _split(self, msg: Message) -> None:
        tok = msg.token
        assert tok is not None
        msg.state = MessageState.DELIVERED  # replaced by its pieces
        for i, text in enumerate(tok.tokens):
            piece = Message(
                order=(*msg.order, i),
                ledger=msg.ledger,
                event=EVENT_TOKEN,
                fields={},
                token=TokenMessage(tok.stream, -1, tok.offset + i, tok.kind, (text,)),
                queued_at=msg.queued_at,
                is_piece=True,
            )
            self._insert(piece)
        msg.ledger.outstanding += len(tok.tokens) - 1

    def fail_in_flight(self, reason: str, now: float) -> list[Failure]:
        """The socket or channel went away: no reply can come for what is in flight."""
        out = []
        for msg in sorted(self._in_flight, key=lambda m: m.order):
            failure = self.failed(msg, msg.attempt, reason, now)
            if failure is not None:
                out.append(failure)
        return out

    def abandon_in_flight(self) -> list[Message]:
        """At close: forget what is in flight (it stays counted as outstanding)."""
        out = list(self._in_flight)
        self._in_flight.clear()
        for msg in out:
            msg.state = MessageState.QUEUED
        return out

    def channel_up(self) -> None:
        """The channel is (re)joined: parked messages go out again, in order, now."""
        for msg in self._pending:
            if msg.state is MessageState.PARKED:
                msg.not_before = 0.0
