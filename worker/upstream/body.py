"""Response bodies, decompressed in bounded pieces. Pure: `feed(raw)` yields bytes.

httpx's own decoders inflate each network read whole: a gzip bomb (0.5 MB on the
wire) became one 881 MB `bytes` before our SSE bounds could look at it. Here every
read is inflated at most `piece_bytes` at a time (zlib's `max_length`), so the SSE
decoder sees, and refuses, a runaway line after about one bound's worth of bytes;
and the whole decoded body is bounded by `max_bytes` (RELAY_MAX_BODY_BYTES).

We ask for `gzip, deflate` only (`ACCEPT_ENCODING`); a server that answers with
another encoding gets a clear error instead of bytes we cannot bound.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

ACCEPT_ENCODING = "gzip, deflate"
PIECE_BYTES = 64 * 1024  # httpcore's READ_NUM_BYTES: one read's worth


class BodyLimitError(Exception):
    """The decoded body passed its bound, or its encoding cannot be decoded."""


class BodyDecoder:
    """Args:
    encoding: the response's `content-encoding` (`identity`, `gzip`, `deflate`).
    max_bytes: the most decoded bytes the body may have.
    piece_bytes: the most decoded bytes one yielded piece may have.

    Raises `BodyLimitError` from the constructor (unknown encoding) and from `feed`.
    """

    __slots__ = (
        "_inflate",
        "_raw_deflate",
        "decoded_bytes",
        "identity",
        "max_bytes",
        "piece_bytes",
    )

    def __init__(self, encoding: str, max_bytes: int, *, piece_bytes: int = PIECE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.piece_bytes = piece_bytes
        self.decoded_bytes = 0
        self._raw_deflate = False
        codings = [c.strip().lower() for c in encoding.split(",") if c.strip()]
        codings = [c for c in codings if c != "identity"]
        self._inflate: zlib._Decompress | None = None
        self.identity = not codings  # then `count()` each read, no `feed()` generator
        if codings in (["gzip"], ["x-gzip"]):
            self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif codings == ["deflate"]:
            # "deflate" is zlib-wrapped by the RFC, raw in some servers: decided on the
            # first byte (a zlib header's low nibble is 8, the deflate method).
            self._raw_deflate = True
        elif codings:
            raise BodyLimitError(f"unsupported content-encoding {encoding!r}")

    def feed(self, raw: bytes) -> Iterator[bytes]:
        """The decoded bytes of one network read, in pieces of at most `piece_bytes`."""
        if self._raw_deflate:
            self._raw_deflate = False
            wbits = zlib.MAX_WBITS if raw[:1] and raw[0] & 0x0F == 8 else -zlib.MAX_WBITS
            self._inflate = zlib.decompressobj(wbits)
        inflate = self._inflate
        if inflate is None:
            yield self.count(raw)
            return
        data = raw
        while data:
            try:
                piece = inflate.decompress(data, self.piece_bytes)
            except zlib.error as exc:
                raise BodyLimitError(f"the compressed body is corrupt: {exc}") from exc
            if piece:
                yield self.count(piece)
            data = inflate.unconsumed_tail
            if inflate.eof:
                break

    def count(self, piece: bytes) -> bytes:
        """An identity body's read, counted against `max_bytes` (returned as is)."""
        self.decoded_bytes += len(piece)
        if self.decoded_bytes > self.max_bytes:
            raise BodyLimitError(
                f"the response body passed {self.max_bytes} bytes once decoded "
                "(RELAY_MAX_BODY_BYTES)"
            )
        return piece
