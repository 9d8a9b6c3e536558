"""The client rule: exact text from duplicated, reordered and split messages."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from worker.relay.reassembly import StreamReassembly, TopicReassembly
from worker.relay.wire import DoneMessage, StatusMessage, TokenMessage, text_checksum


def tm(offset: int, *tokens: str, kind: str = "content", seq: int = 0) -> TokenMessage:
    return TokenMessage("s", seq, offset, kind, tokens)  # type: ignore[arg-type]


def test_in_order() -> None:
    r = StreamReassembly("s")
    assert r.apply(tm(0, "a", "b")) == [("content", "ab")]
    assert r.apply(tm(2, "c", kind="reasoning")) == [("reasoning", "c")]
    assert r.text() == ("ab", "c")
    assert r.next_offset == 3


def test_duplicates_are_dropped_and_counted() -> None:
    r = StreamReassembly("s")
    r.apply(tm(0, "a", "b"))
    assert r.apply(tm(0, "a", "b")) == []
    assert r.apply(tm(1, "b")) == []
    assert (r.duplicate_messages, r.duplicate_tokens) == (2, 3)
    # A straddling message contributes only its new tail.
    assert r.apply(tm(1, "b", "c")) == [("content", "c")]
    assert r.duplicate_tokens == 4
    assert r.text() == ("abc", "")


def test_gaps_are_held_until_filled() -> None:
    r = StreamReassembly("s")
    assert r.apply(tm(3, "d")) == []
    assert r.apply(tm(1, "b", "c")) == []
    assert r.gaps == 2 and r.held_messages == 2
    assert r.apply(tm(0, "a")) == [("content", "a"), ("content", "bc"), ("content", "d")]
    assert r.held_messages == 0 and r.text() == ("abcd", "")


def test_completion_and_checksum() -> None:
    r = StreamReassembly("s")
    r.apply(tm(0, "x", "y"))
    done = DoneMessage("s", 2, 3, "stop", text_checksum("xyz"), text_checksum(""))
    r.apply(done)
    assert not r.complete
    r.apply(tm(2, "z"))
    assert r.complete and r.checksums_match()
    r2 = StreamReassembly("s")
    r2.apply(tm(0, "x", "y", "Z"))
    r2.apply(done)
    assert r2.complete and not r2.checksums_match()


def test_resume_from_snapshot() -> None:
    r = StreamReassembly("s", next_offset=2, content="ab")
    r.apply(tm(0, "a", "b", "c"))
    assert r.text() == ("abc", "")


def test_topic_splits_streams() -> None:
    t = TopicReassembly()
    t.apply(TokenMessage("one", 0, 0, "content", ("1",)))
    t.apply(TokenMessage("two", 0, 0, "content", ("2",)))
    t.apply(StatusMessage("two", 1, "retrying"))
    assert t.streams["one"].text() == ("1", "")
    assert t.streams["two"].statuses[0].status == "retrying"


@given(
    tokens=st.lists(
        st.tuples(st.sampled_from(["content", "reasoning"]), st.text(min_size=1, max_size=3)),
        min_size=1,
        max_size=80,
    ),
    seed=st.integers(0, 2**32),
)
def test_any_delivery_order_with_duplicates_and_pieces_reassembles_exactly(
    tokens: list[tuple[str, str]], seed: int
) -> None:
    rng = random.Random(seed)
    # Cut into one-kind batches, as the batcher does.
    batches: list[TokenMessage] = []
    i = 0
    while i < len(tokens):
        j = i + 1
        while j < len(tokens) and j - i < rng.randint(1, 6) and tokens[j][0] == tokens[i][0]:
            j += 1
        batches.append(tm(i, *(t for _, t in tokens[i:j]), kind=tokens[i][0]))
        i = j
    # Deliver: every batch at least once, some twice, some as one-token pieces too.
    wire: list[TokenMessage] = []
    for b in batches:
        wire.append(b)
        if rng.random() < 0.3:
            wire.append(b)
        if rng.random() < 0.3:
            wire.extend(tm(b.offset + k, t, kind=b.kind) for k, t in enumerate(b.tokens))
    rng.shuffle(wire)
    r = StreamReassembly("s")
    for m in wire:
        r.apply(m)
    expected_content = "".join(t for k, t in tokens if k == "content")
    expected_reasoning = "".join(t for k, t in tokens if k == "reasoning")
    assert r.text() == (expected_content, expected_reasoning)
    assert r.next_offset == len(tokens) and r.held_messages == 0
