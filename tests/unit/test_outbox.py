"""The publisher's pure core: message states, coalescing, ack and failure decisions
(no I/O, no clock: `now` is passed in)."""

from __future__ import annotations

import pytest

from worker.relay.outbox import MessageState, Outbox, StreamLedger
from worker.relay.retry import Action, RetryPolicy
from worker.relay.wire import EVENT_DONE, EVENT_TOKEN, TokenMessage

POLICY = RetryPolicy(max_retries=3, base_s=0.01, cap_s=1.0)


def make(max_bytes: int = 32_000, coalesce: bool = True) -> tuple[Outbox, StreamLedger]:
    return Outbox(POLICY, max_message_bytes=max_bytes, coalesce=coalesce, rand=lambda: 0.5), (
        StreamLedger("s")
    )


def tokens(
    outbox: Outbox, ledger: StreamLedger, offset: int, *texts: str, kind: str = "content"
) -> None:
    token = TokenMessage("s", -1, offset, kind, texts)  # type: ignore[arg-type]
    outbox.enqueue(ledger, EVENT_TOKEN, {}, token, now=0.0)


def test_payload_is_frozen_at_first_transmission_and_acks_settle() -> None:
    outbox, ledger = make()
    tokens(outbox, ledger, 5, "x", "y", kind="reasoning")
    outbox.enqueue(ledger, EVENT_DONE, {"total_tokens": 7}, None, now=0.0)
    assert ledger.outstanding == 2 and outbox.unsent(ledger) == 2
    msg = outbox.take(now=1.0)
    assert msg is not None and msg.state is MessageState.IN_FLIGHT
    assert msg.payload == {
        "v": 1,
        "stream": "s",
        "seq": 0,
        "offset": 5,
        "kind": "reasoning",
        "tokens": ["x", "y"],
    }
    done = outbox.take(now=1.0)
    assert done is not None and done.payload == {"v": 1, "stream": "s", "seq": 1, "total_tokens": 7}
    assert outbox.in_flight == 2 and outbox.take(now=1.0) is None
    assert outbox.acked(msg, attempt=1)
    assert msg.state.value == "delivered"
    assert not outbox.acked(msg, attempt=1)  # a duplicate reply changes nothing
    assert ledger.outstanding == 1 and not outbox.empty
    assert outbox.acked(done, attempt=1) and outbox.empty and ledger.outstanding == 0


def test_three_retries_then_pieces_in_order_then_parked_until_the_channel_is_back() -> None:
    outbox, ledger = make()
    tokens(outbox, ledger, 0, "a", "b", "c")
    tokens(outbox, ledger, 3, "d")
    msg = outbox.take(now=0.0)  # coalesced with "d": one message of 4 tokens
    assert msg is not None and msg.token is not None and msg.token.tokens == ("a", "b", "c", "d")
    payload = msg.payload
    for n in range(1, 4):
        failure = outbox.failed(msg, msg.attempt, "timeout", now=10.0)
        assert failure is not None and failure.decision is not None
        assert failure.decision.action is Action.RETRY and msg.state is MessageState.QUEUED
        assert outbox.ready(now=10.0) is None  # backoff: not before 10 + delay
        again = outbox.take(now=100.0)
        assert again is msg and msg.payload is payload and msg.attempt == n + 1  # same bytes
    assert ledger.stats.retries == 3
    failure = outbox.failed(msg, msg.attempt, "timeout", now=100.0)
    assert failure is not None and failure.decision is not None
    assert failure.decision.action is Action.SPLIT and ledger.stats.fallbacks == 1
    assert ledger.outstanding == 4  # one message per token: nothing dropped
    pieces = [outbox.take(now=100.0) for _ in range(4)]
    assert [p.token.offset for p in pieces if p and p.token] == [0, 1, 2, 3]
    assert [p.payload["seq"] for p in pieces if p and p.payload] == [1, 2, 3, 4]
    first = pieces[0]
    assert first is not None
    failure = outbox.failed(first, first.attempt, "error", now=100.0)
    assert failure is not None and failure.decision is not None
    assert failure.decision.action is Action.PARK and first.state is MessageState.PARKED
    assert outbox.parked == 1 and ledger.stats.parked == 1 and outbox.ready(100.0) is None
    outbox.channel_up()
    assert outbox.ready(100.0) is first


def test_path_failures_requeue_at_once_and_do_not_count() -> None:
    outbox, ledger = make()
    tokens(outbox, ledger, 0, "a", "b")
    first = outbox.ready(now=0.0)
    assert first is not None
    for _ in range(10):
        msg = outbox.take(now=0.0)
        assert msg is not None and msg is first
        failure = outbox.failed(msg, msg.attempt, "disconnected", now=0.0)
        assert failure is not None and failure.decision is None
    assert first.failures == 0 and ledger.stats.retries == 0 and ledger.stats.fallbacks == 0
    assert outbox.ready(now=0.0) is first


def test_a_reply_to_an_older_transmission_is_ignored() -> None:
    outbox, ledger = make()
    tokens(outbox, ledger, 0, "a")
    msg = outbox.take(now=0.0)
    assert msg is not None
    outbox.failed(msg, 1, "timeout", now=0.0)
    again = outbox.take(now=50.0)
    assert again is msg and msg.attempt == 2
    assert outbox.failed(msg, 1, "error", now=50.0) is None  # late error of attempt 1
    assert not outbox.acked(msg, 1)  # late ok of attempt 1: attempt 2 still in flight
    assert msg.state is MessageState.IN_FLIGHT and outbox.acked(msg, 2)


def test_coalescing_merges_only_contiguous_unsent_same_stream_and_kind() -> None:
    outbox, ledger = make()
    other = StreamLedger("o")
    tokens(outbox, ledger, 0, "a")
    tokens(outbox, ledger, 1, "b", "c")
    tokens(outbox, ledger, 3, "r", kind="reasoning")
    tokens(outbox, ledger, 4, "d")
    outbox.enqueue(other, EVENT_TOKEN, {}, TokenMessage("o", -1, 5, "content", ("z",)), 0.0)
    first = outbox.take(now=0.0)
    assert first is not None and first.token is not None and first.token.tokens == ("a", "b", "c")
    assert ledger.outstanding == 3 and ledger.stats.coalesced == 1
    rest = [outbox.take(now=0.0) for _ in range(3)]
    assert [m.token.tokens for m in rest if m and m.token] == [("r",), ("d",), ("z",)]


def test_a_sent_batch_never_absorbs_later_ones() -> None:
    outbox, ledger = make()
    tokens(outbox, ledger, 0, "a")
    msg = outbox.take(now=0.0)
    assert msg is not None
    tokens(outbox, ledger, 1, "b")
    outbox.failed(msg, msg.attempt, "disconnected", now=0.0)
    again = outbox.take(now=0.0)
    assert again is msg and msg.token is not None and msg.token.tokens == ("a",)


@pytest.mark.parametrize("coalesce", [True, False])
def test_coalescing_respects_the_byte_cap_and_the_switch(coalesce: bool) -> None:
    outbox, ledger = make(max_bytes=100, coalesce=coalesce)
    tokens(outbox, ledger, 0, "x" * 40)
    tokens(outbox, ledger, 1, "y" * 40)
    tokens(outbox, ledger, 2, "z" * 40)
    msg = outbox.take(now=0.0)
    assert msg is not None and msg.token is not None
    assert msg.token.tokens == (("x" * 40, "y" * 40) if coalesce else ("x" * 40,))


def test_more_waiting_means_fewer_messages_per_token() -> None:
    """The overload rule: tokens that waited leave together."""
    outbox, ledger = make()
    offset = 0
    for step in range(10):
        for _ in range(step + 1):  # the sender falls further behind every round
            tokens(outbox, ledger, offset, f"t{offset}")
            offset += 1
        msg = outbox.take(now=float(step))
        assert msg is not None and msg.token is not None
        assert len(msg.token.tokens) == step + 1
        assert outbox.acked(msg, msg.attempt)
    assert outbox.empty and ledger.stats.messages == 10 and ledger.outstanding == 0


def test_in_flight_fails_together_when_the_path_goes_and_lag_is_measured() -> None:
    outbox, ledger = make(coalesce=False)
    for i in range(3):
        tokens(outbox, ledger, i, f"t{i}")
    a, b = outbox.take(now=1.0), outbox.take(now=1.0)
    assert a is not None and b is not None
    assert outbox.oldest_unsent_age(now=4.0) == 4.0  # the third waited since 0.0
    failures = outbox.fail_in_flight("channel_closed", now=2.0)
    assert [f.message for f in failures] == [a, b] and outbox.in_flight == 0
    assert [m.token.offset for m in (outbox.take(2.0), outbox.take(2.0)) if m and m.token] == [0, 1]
    assert outbox.abandon_in_flight() and outbox.in_flight == 0 and ledger.outstanding == 3
