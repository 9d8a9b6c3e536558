"""The soak's verdict on one subscriber's copy of a stream (pure): exact only when
complete, in order, equal to the upstream text and to llm-done's checksums."""

from __future__ import annotations

from typing import Any

from bench.soak import _check, _reorderings
from worker.relay.reassembly import StreamReassembly
from worker.relay.wire import DoneMessage, TokenMessage, text_checksum

TOKENS = ("a ", "b ", "c ", "d ")
TEXT = "".join(TOKENS)


def _done(total: int = 4, text: str = TEXT) -> DoneMessage:
    return DoneMessage("s", 9, total, "stop", text_checksum(text), text_checksum(""))


def _tokens(offset: int, tokens: tuple[str, ...]) -> TokenMessage:
    return TokenMessage("s", offset, offset, "content", tokens)


def test_in_order_with_duplicates_is_exact() -> None:
    state = StreamReassembly("s")
    for message in (_tokens(0, TOKENS[:2]), _tokens(0, TOKENS[:2]), _tokens(2, TOKENS[2:])):
        state.apply(message)
    state.apply(_done())
    assert _check(state, TEXT) is None
    assert state.duplicate_tokens == 2


def test_a_missing_token_is_not_exact() -> None:
    state = StreamReassembly("s")
    state.apply(_tokens(0, TOKENS[:2]))
    state.apply(_tokens(3, TOKENS[3:]))
    state.apply(_done())
    assert _check(state, TEXT) == "incomplete at offset 2"


def test_wrong_text_or_missing_stream_is_not_exact() -> None:
    state = StreamReassembly("s")
    state.apply(_tokens(0, ("a ", "b ", "X ", "d ")))
    state.apply(_done(text="a b X d "))
    assert _check(state, TEXT) is not None and "text differs" in str(_check(state, TEXT))
    assert _check(None, TEXT) == "never seen"


def test_reorderings_count_arrivals_below_an_offset_already_seen() -> None:
    recorded: list[tuple[str, dict[str, Any]]] = [
        ("llm-token", {"stream": "s", "offset": 0}),
        ("llm-token", {"stream": "s", "offset": 20}),
        ("llm-token", {"stream": "t", "offset": 0}),
        ("llm-token", {"stream": "s", "offset": 10}),
        ("llm-done", {"stream": "s"}),
    ]
    assert _reorderings(recorded) == 1
