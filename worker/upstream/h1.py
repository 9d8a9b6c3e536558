"""A streaming HTTP/1.1 response read by an `asyncio.Protocol`: no coroutine per read.

httpx reads a streamed body through five async-generator layers (httpx, httpcore, h11,
anyio) per network read, and our consumer then woke once per read: at 100 tok/s per
stream most of the worker's CPU went to that, not to the tokens (bench/RESULTS.md §7).
Here the bytes of a chat-completions stream arrive in `data_received`, are de-chunked
there and handed synchronously to a `BodySink` (the upstream's `EventBuffer`, which
decodes SSE and chunks in the same call and wakes its reader only when there is
something worth waking for).

What it does, and only that: one `POST` per connection (`Connection: close`, so the
body ends when the server closes or the framing says so), TCP or TLS (the SSL context
is httpx's, so `SSL_CERT_FILE` and certifi work as they do for httpx), status line and
headers (bounded), then `Transfer-Encoding: chunked`, `Content-Length` or
close-delimited bodies. Proxies, HTTP/2 and custom transports stay with httpx (the
client chooses; see `UpstreamClient`). Failures are raised as httpx's exception
classes (`ConnectError`, `ConnectTimeout`, `ReadError`, `RemoteProtocolError`), so
the one error map of the upstream (`errormap.error_from_httpx`) classifies both paths.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from typing import Protocol
from urllib.parse import urlsplit

import httpx

MAX_HEAD_BYTES = 64 * 1024  # status line + headers
MAX_CHUNK_LINE_BYTES = 4096  # a chunk-size line with its extensions
USER_AGENT = "llm-token-relay"


class BodySink(Protocol):
    """Where the decoded body goes, synchronously, as it arrives."""

    def on_data(self, data: bytes) -> None: ...

    def on_end(self, error: httpx.HTTPError | None) -> None: ...


class _Chunked:
    """Pure `Transfer-Encoding: chunked` decoder: `feed(bytes) -> body pieces`."""

    __slots__ = ("_buf", "_left", "_state", "done")

    def __init__(self) -> None:
        self._buf = b""
        self._left = 0  # bytes of the current chunk still to come
        self._state = 0  # 0: size line, 1: data, 2: CRLF after data, 3: trailers
        self.done = False

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        buf = self._buf + data if self._buf else data
        pos, n = 0, len(buf)
        while pos < n and not self.done:
            if self._state == 1:
                take = min(self._left, n - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self._left -= take
                if self._left == 0:
                    self._state = 2
                continue
            step = self._size_line(buf, pos) if self._state == 0 else self._after(buf, pos)
            if step < 0:
                break  # needs more bytes
            pos = step
        self._buf = buf[pos:] if pos < n and not self.done else b""
        return out

    def _size_line(self, buf: bytes, pos: int) -> int:
        end = buf.find(b"\r\n", pos)
        if end < 0:
            if len(buf) - pos > MAX_CHUNK_LINE_BYTES:
                raise httpx.RemoteProtocolError("chunk size line too long")
            return -1
        line = buf[pos:end].split(b";", 1)[0].strip()
        try:
            size = int(line, 16)
        except ValueError:
            raise httpx.RemoteProtocolError(f"bad chunk size {line[:40]!r}") from None
        if size < 0:
            raise httpx.RemoteProtocolError("negative chunk size")
        if size == 0:
            self._state = 3
        else:
            self._left, self._state = size, 1
        return end + 2

    def _after(self, buf: bytes, pos: int) -> int:
        """The CRLF after a chunk's data (state 2), or one trailer line (state 3)."""
        if self._state == 2:
            if len(buf) - pos < 2:
                return -1
            if buf[pos : pos + 2] != b"\r\n":
                raise httpx.RemoteProtocolError("missing CRLF after a chunk")
            self._state = 0
            return pos + 2
        end = buf.find(b"\r\n", pos)
        if end < 0:
            if len(buf) - pos > MAX_HEAD_BYTES:
                raise httpx.RemoteProtocolError("chunked trailers too long")
            return -1
        if end == pos:
            self.done = True  # the empty line after the trailers
        return end + 2


class _H1Protocol(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.transport: asyncio.Transport | None = None
        self.head: asyncio.Future[tuple[int, httpx.Headers]] = loop.create_future()
        self._head_buf = b""
        self._in_body = False
        self._chunked: _Chunked | None = None
        self._left: int | None = None  # Content-Length still to come
        self._early: list[bytes] = []  # body read before a sink was attached
        self._sink: BodySink | None = None
        self._ended = False
        self._end_error: httpx.HTTPError | None = None

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self._ended:
            return
        try:
            if not self._in_body:
                data = self._read_head(data)
                if not data:
                    return
            self._body(data)
        except httpx.HTTPError as exc:
            self._end(exc)

    def eof_received(self) -> bool | None:
        self._closed(None)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed(exc)

    # --- the consumer's side ---

    def attach(self, sink: BodySink) -> None:
        """Start handing the body to `sink` (what arrived before goes first)."""
        self._sink = sink
        early, self._early = self._early, []
        for piece in early:
            sink.on_data(piece)
        if self._ended:
            sink.on_end(self._end_error)

    def pause(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    # --- internals ---

    def _read_head(self, data: bytes) -> bytes:
        buf = self._head_buf + data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    raise httpx.RemoteProtocolError("response head too long")
                self._head_buf = buf
                return b""
            status, headers = _parse_head(buf[:end])
            buf = buf[end + 4 :]
            if 100 <= status < 200:
                continue  # an interim response (we never ask for one, but servers may)
            break
        self._head_buf = b""
        self._in_body = True
        encoding = headers.get("transfer-encoding", "").lower()
        if "chunked" in encoding:
            self._chunked = _Chunked()
        elif "content-length" in headers:
            try:
                self._left = int(headers["content-length"])
            except ValueError:
                raise httpx.RemoteProtocolError("bad Content-Length") from None
        if not self.head.done():
            self.head.set_result((status, headers))
        return buf

    def _body(self, data: bytes) -> None:
        if self._chunked is not None:
            pieces = self._chunked.feed(data)
            for piece in pieces:
                self._deliver(piece)
            if self._chunked.done:
                self._end(None)
            return
        if self._left is not None:
            data = data[: self._left]
            self._left -= len(data)
            self._deliver(data)
            if self._left == 0:
                self._end(None)
            return
        self._deliver(data)

    def _deliver(self, piece: bytes) -> None:
        if not piece:
            return
        if self._sink is None:
            self._early.append(piece)
        else:
            self._sink.on_data(piece)

    def _closed(self, exc: Exception | None) -> None:
        if self._ended:
            return
        if not self._in_body:
            error: httpx.HTTPError = httpx.RemoteProtocolError(
                "server disconnected without sending a response"
                if exc is None
                else f"connection lost before the response: {exc}"
            )
            if not self.head.done():
                self.head.set_exception(error)
            self._end(error)
            return
        if exc is not None:
            self._end(httpx.ReadError(str(exc) or type(exc).__name__))
        elif self._chunked is not None or (self._left is not None and self._left > 0):
            self._end(
                httpx.RemoteProtocolError(
                    "peer closed connection without sending complete message body"
                )
            )
        else:
            self._end(None)  # a close-delimited body ends with the connection

    def _end(self, error: httpx.HTTPError | None) -> None:
        if self._ended:
            return
        self._ended = True
        self._end_error = error
        if not self.head.done():
            self.head.set_exception(error or httpx.RemoteProtocolError("no response head"))
        if self.transport is not None:
            self.transport.close()
        if self._sink is not None:
            self._sink.on_end(error)


def _parse_head(head: bytes) -> tuple[int, httpx.Headers]:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise httpx.RemoteProtocolError(f"not an HTTP/1.x response: {lines[0][:60]!r}")
    try:
        status = int(parts[1])
    except ValueError:
        raise httpx.RemoteProtocolError(f"bad status line {lines[0][:60]!r}") from None
    fields: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise httpx.RemoteProtocolError(f"bad header line {line[:60]!r}")
        fields.append((name, value.strip()))
    return status, httpx.Headers(fields)


class H1Response:
    """One streamed response: `status_code`, `headers`, then its body, pushed to a sink
    (`attach`) or pulled (`aiter_raw`, for the short error bodies)."""

    def __init__(self, protocol: _H1Protocol, status: int, headers: httpx.Headers) -> None:
        self._protocol = protocol
        self.status_code = status
        self.headers = headers

    def attach(self, sink: BodySink) -> None:
        self._protocol.attach(sink)

    def pause(self) -> None:
        self._protocol.pause()

    def resume(self) -> None:
        self._protocol.resume()

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[bytes | httpx.HTTPError | None] = asyncio.Queue()

        class _Pull:
            def on_data(self, data: bytes) -> None:
                queue.put_nowait(data)

            def on_end(self, error: httpx.HTTPError | None) -> None:
                queue.put_nowait(error)

        self._protocol.attach(_Pull())
        while True:
            item = await queue.get()
            if item is None:
                return
            if isinstance(item, httpx.HTTPError):
                raise item
            yield item

    async def aclose(self) -> None:
        transport = self._protocol.transport
        if transport is not None:
            transport.close()


def _request_head(url: httpx.URL, headers: dict[str, str], body_len: int) -> bytes:
    host = url.host if url.port is None else f"{url.host}:{url.port}"
    target = url.raw_path.decode("ascii")
    lines = [
        f"POST {target} HTTP/1.1",
        f"Host: {host}",
        f"User-Agent: {USER_AGENT}",
        "Content-Type: application/json",
        f"Content-Length: {body_len}",
        "Connection: close",
    ]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    for line in lines:
        if "\r" in line or "\n" in line:
            raise httpx.LocalProtocolError("a header holds a line break")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def post_stream(
    url: str,
    headers: dict[str, str],
    body: bytes,
    *,
    connect_timeout_s: float,
    ssl_context: ssl.SSLContext | None = None,
) -> H1Response:
    """Send one POST and return once the response head is in (the body follows).

    Raises:
        httpx.ConnectTimeout: no connection within `connect_timeout_s`.
        httpx.ConnectError: refused, unresolvable, TLS failure.
        httpx.RemoteProtocolError / ReadError: no valid response head.
    The caller bounds the wait for the head (the first-token deadline).
    """
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https"):
        raise httpx.UnsupportedProtocol(f"unsupported URL scheme {parsed.scheme!r}")
    tls = parsed.scheme == "https"
    port = parsed.port or (443 if tls else 80)
    head = _request_head(parsed, headers, len(body))  # refused before any connection
    loop = asyncio.get_running_loop()
    context = (ssl_context or httpx.create_ssl_context()) if tls else None
    try:
        async with asyncio.timeout(connect_timeout_s):
            _, protocol = await loop.create_connection(
                lambda: _H1Protocol(loop),
                parsed.host,
                port,
                ssl=context,
                server_hostname=parsed.host if tls else None,
            )
    except TimeoutError:
        raise httpx.ConnectTimeout(f"no connection to {urlsplit(url).netloc} in time") from None
    except (OSError, ssl.SSLError) as exc:
        raise httpx.ConnectError(str(exc) or type(exc).__name__) from None
    assert protocol.transport is not None
    protocol.transport.write(head + body)
    try:
        status, response_headers = await protocol.head
    except BaseException:
        protocol.transport.close()
        raise
    return H1Response(protocol, status, response_headers)
