"""Wire payloads: shape of each event, round trip through the parser, bad input."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.errors import BadInputError
from worker.relay.wire import (
    EVENT_DONE,
    EVENT_ERROR,
    EVENT_STATUS,
    EVENT_TOKEN,
    DoneMessage,
    ErrorMessage,
    StatusMessage,
    TokenMessage,
    parse_message,
    text_checksum,
    token_pieces,
)


def test_token_payload_is_the_contract() -> None:
    msg = TokenMessage("s1", 3, 40, "content", ("a", "b"))
    assert msg.to_payload() == {
        "v": 1,
        "stream": "s1",
        "seq": 3,
        "offset": 40,
        "kind": "content",
        "tokens": ["a", "b"],
    }


def test_checksum_is_sha256_of_utf8() -> None:
    assert text_checksum("héllo") == hashlib.sha256("héllo".encode()).hexdigest()


def test_done_error_status_round_trip() -> None:
    done = DoneMessage(
        "s",
        9,
        total_tokens=120,
        finish_reason="stop",
        content_sha256=text_checksum("x"),
        reasoning_sha256=text_checksum(""),
        usage={"completion_tokens": 120},
    )
    payload = json.loads(json.dumps(done.to_payload()))
    assert payload["checksum"]["algorithm"] == "sha256"
    assert parse_message(EVENT_DONE, payload) == done
    err = ErrorMessage("s", 2, "timeout", "upstream idle", True, 17)
    assert parse_message(EVENT_ERROR, err.to_payload()) == err
    st_ = StatusMessage("s", 1, "retrying", {"attempt": 2})
    assert parse_message(EVENT_STATUS, st_.to_payload()) == st_


@given(
    offset=st.integers(0, 10**9),
    tokens=st.lists(st.text(min_size=1), min_size=1, max_size=30),
    kind=st.sampled_from(["content", "reasoning"]),
)
def test_token_round_trip(offset: int, tokens: list[str], kind: str) -> None:
    msg = TokenMessage("id", 0, offset, kind, tuple(tokens))  # type: ignore[arg-type]
    assert parse_message(EVENT_TOKEN, json.loads(json.dumps(msg.to_payload()))) == msg


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"v": 2, "stream": "s", "seq": 0, "offset": 0, "kind": "content", "tokens": []},
        {"v": 1, "stream": "s", "seq": 0, "offset": -1, "kind": "content", "tokens": []},
        {"v": 1, "stream": "s", "seq": 0, "offset": 0, "kind": "tool", "tokens": []},
        {"v": 1, "stream": "s", "seq": 0, "offset": 0, "kind": "content", "tokens": [1]},
        {"v": 1, "stream": "s", "seq": True, "offset": 0, "kind": "content", "tokens": []},
        {"v": 1, "stream": 5, "seq": 0, "offset": 0, "kind": "content", "tokens": []},
    ],
)
def test_bad_token_payloads_are_rejected(payload: dict[str, object]) -> None:
    with pytest.raises(BadInputError):
        parse_message(EVENT_TOKEN, payload)


def test_unknown_event_is_rejected() -> None:
    with pytest.raises(BadInputError):
        parse_message("other", {"v": 1, "stream": "s", "seq": 0})


def test_token_pieces_one_token_each() -> None:
    pieces = token_pieces(TokenMessage("s", 4, 10, "reasoning", ("a", "b", "c")), first_seq=7)
    assert [(p.seq, p.offset, p.tokens) for p in pieces] == [
        (7, 10, ("a",)),
        (8, 11, ("b",)),
        (9, 12, ("c",)),
    ]
