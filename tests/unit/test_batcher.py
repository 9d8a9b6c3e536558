"""The batcher's flush rules, one by one, then as properties over random streams."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from worker.relay.batcher import Batch, Batcher
from worker.upstream.events import Token, TokenKind


def c(text: str) -> Token:
    return Token("content", text)


def r(text: str) -> Token:
    return Token("reasoning", text)


def test_first_token_goes_out_at_once() -> None:
    b = Batcher(20, 0.1)
    out = b.feed(c("Hel"), now=0.0)
    assert out == [Batch("content", 0, ("Hel",), "first")]
    assert b.feed(c("lo"), now=0.0) == []
    assert b.pending == 1


def test_flush_at_batch_size() -> None:
    b = Batcher(3, 10.0)
    b.feed(c("a"), 0.0)
    assert b.feed(c("b"), 0.1) == []
    assert b.feed(c("c"), 0.2) == []
    out = b.feed(c("d"), 0.3)
    assert out == [Batch("content", 1, ("b", "c", "d"), "size")]
    assert b.deadline() is None


def test_flush_at_max_delay_via_poll() -> None:
    b = Batcher(20, 0.1)
    b.feed(c("a"), 0.0)
    b.feed(c("b"), 1.0)
    assert b.deadline() == 1.1
    assert b.poll(1.05) == []
    assert b.poll(1.1) == [Batch("content", 1, ("b",), "delay")]


def test_kind_switch_closes_the_batch() -> None:
    b = Batcher(20, 1.0)
    b.feed(r("think"), 0.0)
    b.feed(r("ing"), 0.0)
    out = b.feed(c("Answer"), 0.01)
    assert out == [Batch("reasoning", 1, ("ing",), "kind")]
    assert b.flush(0.02) == [Batch("content", 2, ("Answer",), "end")]


def test_end_flush_and_empty_flush() -> None:
    b = Batcher(20, 1.0, start_offset=40)
    assert b.flush(0.0) == []
    b.feed(c("x"), 0.0)
    b.feed(c("y"), 0.0)
    assert b.flush(0.0) == [Batch("content", 41, ("y",), "end")]
    assert b.next_offset == 42


def test_byte_cap_forces_a_flush() -> None:
    b = Batcher(1000, 10.0, max_batch_bytes=10)
    b.feed(c("first"), 0.0)
    assert b.feed(c("12345"), 0.0) == []
    out = b.feed(c("é" * 3), 0.0)  # 6 bytes: 11 >= 10
    assert [x.reason for x in out] == ["bytes"]


def test_budget_hook_makes_batches_grow() -> None:
    b = Batcher(2, 0.05)
    b.set_min_interval(1.0)
    b.feed(c("t0"), 0.0)  # first, at once
    outs: list[Batch] = []
    for i in range(1, 40):
        outs += b.feed(c(f"t{i}"), i * 0.05)
        outs += b.poll(i * 0.05)
    # 0.05 s per token for ~2 s: without pacing ~19 batches of 2; paced, one per second.
    assert len(outs) == 1
    assert outs[0].offset == 1 and len(outs[0].tokens) == 20
    assert b.deadline() == 2.0


def test_without_first_token_rule() -> None:
    b = Batcher(2, 1.0, first_token_at_once=False)
    assert b.feed(c("a"), 0.0) == []
    assert b.feed(c("b"), 0.0) == [Batch("content", 0, ("a", "b"), "size")]


tokens_st = st.lists(
    st.tuples(st.sampled_from(["content", "reasoning"]), st.text(min_size=1, max_size=4)),
    max_size=200,
)
steps_st = st.lists(st.floats(min_value=0, max_value=0.2), min_size=200, max_size=200)


@settings(max_examples=60, deadline=None)
@given(
    tokens=tokens_st,
    steps=steps_st,
    size=st.integers(1, 25),
    delay=st.floats(0.01, 0.5),
    interval=st.floats(0, 1),
)
def test_batches_cover_the_stream_exactly(
    tokens: list[tuple[TokenKind, str]],
    steps: list[float],
    size: int,
    delay: float,
    interval: float,
) -> None:
    b = Batcher(size, delay, start_offset=7)
    b.set_min_interval(interval)
    now = 0.0
    out: list[Batch] = []
    for (kind, text), step in zip(tokens, steps, strict=False):
        now += step
        out += b.poll(now)
        out += b.feed(Token(kind, text), now)
    out += b.flush(now + 1)
    # Offsets are contiguous from start_offset, each batch holds one kind, nothing lost.
    offset = 7
    for batch in out:
        assert batch.offset == offset and batch.tokens
        offset = batch.end_offset
    flat = [(batch.kind, t) for batch in out for t in batch.tokens]
    assert flat == list(tokens)
    assert b.pending == 0 and b.deadline() is None
    # Only first/kind/end/bytes flushes may be smaller than size... and size flushes are
    # never smaller than size.
    assert all(len(x.tokens) >= size for x in out if x.reason == "size")
