"""Publisher internals without I/O: the lane's retry/split/park decisions, coalescing,
channel-state reactions (rate limits), and error-reason parsing."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from realtime import RealtimeSubscribeStates

from worker.config import Settings
from worker.relay.batcher import Batch
from worker.relay.publisher import Publisher, StreamHandle, _Lane, _reason_of, _TopicState
from worker.relay.wire import EVENT_TOKEN


def make(**overrides: Any) -> tuple[Publisher, _Lane, StreamHandle]:
    settings = Settings(
        supabase_service_role_key="k",
        relay_retry_base_ms=10,
        relay_retry_cap_s=1,
        relay_rate_limit_rejoin_s=30,
        **overrides,
    )
    pub = Publisher(settings)
    topic = "llm-token:t"
    lane = _Lane(pub, topic)
    pub._lanes[topic] = lane
    pub._topics[topic] = _TopicState()
    handle = StreamHandle(pub, topic, "s", 0)
    return pub, lane, handle


def enqueue(pub: Publisher, lane: _Lane, handle: StreamHandle, batch: Batch) -> None:
    from worker.relay.publisher import _Item
    from worker.relay.wire import TokenMessage

    handle.outstanding += 1
    token = TokenMessage("s", -1, batch.offset, batch.kind, batch.tokens)
    lane.add(
        _Item(order=lane.next_order(), handle=handle, event=EVENT_TOKEN, fields={}, token=token)
    )


async def test_three_retries_then_pieces_in_order_then_parked() -> None:
    pub, lane, handle = make()
    enqueue(pub, lane, handle, Batch("content", 0, ("a", "b", "c"), "size"))
    enqueue(pub, lane, handle, Batch("content", 3, ("d",), "size"))
    item = lane.pending.pop(0)
    lane._freeze(item)
    for _ in range(3):
        lane._failed(item, "timeout")
        assert lane.pending[0] is item and item.not_before > 0
        lane.pending.remove(item)
    assert handle.stats.retries == 3
    lane._failed(item, "timeout")  # the 4th failure: token-by-token fallback
    assert handle.stats.fallbacks == 1
    pieces = lane.pending[:3]
    assert [p.token.offset for p in pieces if p.token] == [0, 1, 2]
    assert all(p.is_piece and p.payload is None for p in pieces)
    assert lane.pending[3].token is not None and lane.pending[3].token.offset == 3
    assert handle.outstanding == 4  # 3 pieces + the next batch: nothing dropped
    piece = lane.pending.pop(0)
    lane._failed(piece, "error")
    assert piece.parked and piece in lane.pending and handle.stats.parked == 1
    lane.channel_up()
    assert piece.not_before == 0.0


async def test_payload_is_frozen_at_first_transmission() -> None:
    pub, lane, handle = make()
    enqueue(pub, lane, handle, Batch("reasoning", 5, ("x", "y"), "first"))
    item = lane.pending[0]
    payload = lane._freeze(item)
    assert payload == {
        "v": 1,
        "stream": "s",
        "seq": 0,
        "offset": 5,
        "kind": "reasoning",
        "tokens": ["x", "y"],
    }
    assert lane._freeze(item) is payload and handle.next_seq == 1


async def test_coalescing_merges_only_contiguous_unsent_same_kind() -> None:
    pub, lane, handle = make(relay_max_message_bytes=64)
    enqueue(pub, lane, handle, Batch("content", 0, ("a",), "first"))
    enqueue(pub, lane, handle, Batch("content", 1, ("b", "c"), "size"))
    enqueue(pub, lane, handle, Batch("reasoning", 3, ("r",), "kind"))
    enqueue(pub, lane, handle, Batch("content", 4, ("d",), "kind"))
    merged = lane._coalesce(lane.pending[0])
    assert merged.token is not None and merged.token.tokens == ("a", "b", "c")
    assert [it.token.kind for it in lane.pending if it.token] == ["content", "reasoning", "content"]
    assert handle.outstanding == 3 and handle.stats.coalesced == 1
    # A message already transmitted is never merged (it may have been delivered).
    lane._freeze(merged)
    assert lane._coalesce(merged) is merged and merged.token.tokens == ("a", "b", "c")


async def test_coalescing_respects_the_byte_cap_and_the_switch() -> None:
    pub, lane, handle = make(relay_max_message_bytes=64)
    enqueue(pub, lane, handle, Batch("content", 0, ("x" * 40,), "size"))
    enqueue(pub, lane, handle, Batch("content", 1, ("y" * 40,), "size"))
    assert lane._coalesce(lane.pending[0]).token.tokens == ("x" * 40,)  # type: ignore[union-attr]
    pub2, lane2, handle2 = make(relay_adaptive_batching=False)
    enqueue(pub2, lane2, handle2, Batch("content", 0, ("a",), "size"))
    enqueue(pub2, lane2, handle2, Batch("content", 1, ("b",), "size"))
    assert lane2._coalesce(lane2.pending[0]).token.tokens == ("a",)  # type: ignore[union-attr]


class FakeChannel:
    topic = "realtime:llm-token:t"


async def test_too_many_messages_holds_the_topic_and_slows_the_budget() -> None:
    pub, _, _ = make()
    channel: Any = FakeChannel()
    pub._topics["llm-token:t"].channel = channel
    err = Exception(
        json.dumps(
            {
                "channel": "llm-token:t",
                "extension": "system",
                "message": "Too many messages per second",
                "status": "error",
            }
        )
    )
    before = time.monotonic()
    pub._on_channel_state("llm-token:t", channel, RealtimeSubscribeStates.CHANNEL_ERROR, err)
    state = pub._topics["llm-token:t"]
    assert state.hold_until >= before + 30 and state.rejoin_not_before == state.hold_until
    assert pub.budget.rate() < pub.budget.full_rate
    assert pub._route("llm-token:t") == "hold"


async def test_join_rate_limit_error_delays_the_reconnect() -> None:
    pub, _, _ = make()
    channel: Any = FakeChannel()
    pub._topics["llm-token:t"].channel = channel
    err = Exception(json.dumps({"reason": "ClientJoinRateLimitReached: Too many joins per second"}))
    pub._on_channel_state("llm-token:t", channel, RealtimeSubscribeStates.CHANNEL_ERROR, err)
    assert pub._join_hold_until >= time.monotonic() + 29


async def test_events_of_a_replaced_channel_are_ignored() -> None:
    pub, _, _ = make()
    old: Any = FakeChannel()
    pub._topics["llm-token:t"].channel = FakeChannel()  # type: ignore[assignment]
    err = Exception(json.dumps({"message": "Too many messages per second"}))
    pub._on_channel_state("llm-token:t", old, RealtimeSubscribeStates.CHANNEL_ERROR, err)
    assert pub._topics["llm-token:t"].hold_until == 0.0


@pytest.mark.parametrize(
    ("err", "reason"),
    [
        (None, ""),
        (Exception('{"reason": "Unauthorized: nope"}'), "Unauthorized: nope"),
        (Exception('{"message": "Too many messages per second"}'), "Too many messages per second"),
        (Exception("received 1011 (internal error)"), "received 1011 (internal error)"),
    ],
)
def test_reason_of(err: Exception | None, reason: str) -> None:
    assert _reason_of(err) == reason


def test_publisher_needs_a_key() -> None:
    from worker.errors import ConfigError

    with pytest.raises(ConfigError):
        Publisher(Settings(supabase_service_role_key=None))


async def test_path_failures_do_not_count_towards_the_fallback() -> None:
    pub, lane, handle = make()
    enqueue(pub, lane, handle, Batch("content", 0, ("a", "b"), "size"))
    item = lane.pending.pop(0)
    for _ in range(10):
        lane._failed(item, "disconnected")
        assert lane.pending == [item] and item.not_before == 0.0
        lane.pending.remove(item)
    assert item.failures == 0 and handle.stats.fallbacks == 0 and handle.stats.retries == 0
