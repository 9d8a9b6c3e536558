"""The SSE decoder: spec cases, and every stream split at every byte boundary."""

from __future__ import annotations

import pytest

from worker.upstream.sse import SSEDecoder, SSEEvent


def decode(*reads: bytes) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for read in reads:
        events.extend(decoder.feed(read))
    events.extend(decoder.flush())
    return events


# (wire bytes, expected events). Each is also replayed split at every boundary.
CASES: list[tuple[bytes, list[SSEEvent]]] = [
    (b'data: {"a":1}\n\n', [SSEEvent('{"a":1}')]),
    (b"data: one\r\n\r\ndata: two\r\r", [SSEEvent("one"), SSEEvent("two")]),
    (b"data: x\r\ndata: y\r\n\r\n", [SSEEvent("x\ny")]),
    (b"data: mixed\r\rdata: ends\n\n", [SSEEvent("mixed"), SSEEvent("ends")]),
    (b": keep-alive\n\n: ping\ndata: after\n\n", [SSEEvent("after")]),
    (b"data:no-space\n\n", [SSEEvent("no-space")]),
    (b"data:  two spaces\n\n", [SSEEvent(" two spaces")]),
    (b"data\n\n", [SSEEvent("")]),
    (b"data:\ndata:\n\n", [SSEEvent("\n")]),
    (b"event: error\ndata: {}\n\n", [SSEEvent("{}", "error")]),
    (b"event: ping\n\n", []),  # no data line: nothing to dispatch
    (
        b"id: 7\nretry: 1500\ndata: a\n\ndata: b\n\n",
        [
            SSEEvent("a", "message", "7", 1500),
            SSEEvent("b", "message", "7", 1500),
        ],
    ),
    (b"id: a\x00b\ndata: x\n\n", [SSEEvent("x")]),  # NUL in id: ignored
    (b"retry: 12x\ndata: x\n\n", [SSEEvent("x")]),  # non-digit retry ignored
    (b"unknown: field\ndata: x\n\n", [SSEEvent("x")]),
    (b"\xef\xbb\xbfdata: bom\n\n", [SSEEvent("bom")]),
    ("data: héllo 🦀 世界\n\n".encode(), [SSEEvent("héllo 🦀 世界")]),
    (b"data: [DONE]\n\n", [SSEEvent("[DONE]")]),
    (b"data: [DONE]\n", [SSEEvent("[DONE]")]),  # flush: blank line missing only
    (b"data: whole\n\ndata: cut mid-li", [SSEEvent("whole")]),  # partial line dropped
    (b"data:  \t trailing \t\n\n", [SSEEvent(" \t trailing \t")]),  # byte-exact
]


@pytest.mark.parametrize(("wire", "expected"), CASES)
def test_whole(wire: bytes, expected: list[SSEEvent]) -> None:
    assert decode(wire) == expected


@pytest.mark.parametrize(("wire", "expected"), CASES)
def test_split_at_every_byte_boundary(wire: bytes, expected: list[SSEEvent]) -> None:
    for cut in range(1, len(wire)):
        assert decode(wire[:cut], wire[cut:]) == expected, f"cut at {cut}"
    for cut in range(1, len(wire) - 1):
        cut2 = cut + 1
        assert decode(wire[:cut], b"", wire[cut:cut2], wire[cut2:]) == expected


@pytest.mark.parametrize(("wire", "expected"), CASES)
def test_one_byte_at_a_time(wire: bytes, expected: list[SSEEvent]) -> None:
    assert decode(*[wire[i : i + 1] for i in range(len(wire))]) == expected


def test_crlf_split_between_reads_is_one_line_ending() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    # If the LF were a second line ending, "a" would be dispatched here.
    assert decoder.feed(b"\ndata: b\r") == []
    assert decoder.feed(b"\n\r\n") == [SSEEvent("a\nb")]


def test_bom_only_at_start() -> None:
    assert decode(b"data: x\n\n\xef\xbb\xbfdata: y\n\n") == [SSEEvent("x")]
    # A BOM in the middle makes the field name "\ufeffdata", which is unknown.


def test_invalid_utf8_becomes_replacement_char() -> None:
    assert decode(b"data: \xff\xfe ok\n\n") == [SSEEvent("\ufffd\ufffd ok")]


def test_multibyte_split_across_reads_is_exact() -> None:
    text = "🦀世界é"
    raw = f"data: {text}\n\n".encode()
    # Cut inside every multi-byte sequence.
    for cut in range(7, len(raw) - 2):
        assert decode(raw[:cut], raw[cut:]) == [SSEEvent(text)]


def test_comments_counted_and_discarded_bytes_reported() -> None:
    decoder = SSEDecoder()
    decoder.feed(b': one\n:two\r\ndata: x\n\ndata: {"partial')
    assert decoder.comments == 2
    assert decoder.flush() == []
    assert decoder.discarded_bytes == len(b'data: {"partial')


def test_last_event_id_persists() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"id: 1\ndata: a\n\n")
    assert decoder.last_event_id == "1"
    assert decoder.feed(b"data: b\n\n") == [SSEEvent("b", "message", "1")]
    assert decoder.feed(b"id\ndata: c\n\n") == [SSEEvent("c", "message", "")]


def test_empty_feed_and_empty_stream() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"") == []
    assert decoder.flush() == []


def test_fast_path_keeps_pending_fields() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"id: 9\nevent: error\n") == []
    assert decoder.feed(b'data: {"x": 1}\n\n') == [SSEEvent('{"x": 1}', "error", "9")]
    assert decoder.feed(b"data: next\n\n") == [SSEEvent("next", "message", "9")]
    # A bare CR ends a line: "b" becomes an unknown field, ignored.
    assert decoder.feed(b"data: a\rb\n\n") == [SSEEvent("a", "message", "9")]
