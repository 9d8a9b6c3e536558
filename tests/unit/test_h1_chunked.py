"""The chunked-body decoder of the Protocol reader (worker/upstream/h1.py)."""

from __future__ import annotations

import httpx
import pytest

from worker.upstream.h1 import MAX_CHUNK_LINE_BYTES, _Chunked

BODY = b'data: {"a": 1}\n\n' * 3 + "🦀 世界\r\n".encode() * 5


def encoded(body: bytes, sizes: list[int]) -> bytes:
    out, pos = b"", 0
    for size in sizes:
        piece = body[pos : pos + size]
        pos += size
        out += f"{len(piece):x};ext=1\r\n".encode() + piece + b"\r\n"
    return out + b"0\r\nX-Trailer: t\r\n\r\n"


@pytest.mark.parametrize("split", [1, 2, 3, 7, 64, 10_000])
def test_any_split_of_the_wire_gives_the_same_body(split: int) -> None:
    wire = encoded(BODY, [5, 1, 40, 17, len(BODY)])
    decoder = _Chunked()
    got = b"".join(b"".join(decoder.feed(wire[i : i + split])) for i in range(0, len(wire), split))
    assert got == BODY
    assert decoder.done


def test_bytes_after_the_last_chunk_are_not_body() -> None:
    decoder = _Chunked()
    assert b"".join(decoder.feed(b"3\r\nabc\r\n0\r\n\r\nGARBAGE")) == b"abc"
    assert decoder.done
    assert decoder.feed(b"more") == []


@pytest.mark.parametrize(
    "wire",
    [b"zz\r\nabc\r\n", b"3\r\nabcXY", b"-3\r\nabc\r\n", b"f" * (MAX_CHUNK_LINE_BYTES + 1)],
)
def test_a_broken_framing_is_a_protocol_error(wire: bytes) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        _Chunked().feed(wire)
