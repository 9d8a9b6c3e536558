"""The Protocol reader's HTTP/1.1 framing against a raw socket server: what a server
may legally send, and the broken responses it must refuse with a clear error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from worker.upstream.h1 import post_stream

pytestmark = pytest.mark.integration


class Sink:
    def __init__(self) -> None:
        self.data = b""
        self.ended = asyncio.Event()
        self.error: httpx.HTTPError | None = None

    def on_data(self, data: bytes) -> None:
        self.data += data

    def on_end(self, error: httpx.HTTPError | None) -> None:
        self.error = error
        self.ended.set()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[bytes], str]]:
    servers: list[asyncio.Server] = []
    requests: list[bytes] = []

    async def start(reply: bytes) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            requests.append(await reader.readuntil(b"\r\n\r\n"))
            for i in range(0, len(reply), 7):  # in small reads
                writer.write(reply[i : i + 7])
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1/chat/completions"

    yield start  # type: ignore[misc]
    for server in servers:
        server.close()


async def read(url: str) -> tuple[int, Sink]:
    response = await post_stream(url, {"Accept": "text/event-stream"}, b"{}", connect_timeout_s=2)
    sink = Sink()
    response.attach(sink)
    await asyncio.wait_for(sink.ended.wait(), 5)
    return response.status_code, sink


HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"


async def test_content_length_body(serve: Callable[..., object]) -> None:
    url = await serve(HEAD + b"Content-Length: 5\r\n\r\nhelloEXTRA")  # type: ignore[misc]
    status, sink = await read(url)
    assert (status, sink.data, sink.error) == (200, b"hello", None)


async def test_close_delimited_body_after_an_interim_response(serve: Callable[..., object]) -> None:
    url = await serve(b"HTTP/1.1 100 Continue\r\n\r\n" + HEAD + b"\r\ndata: x\n\n")  # type: ignore[misc]
    status, sink = await read(url)
    assert (status, sink.data, sink.error) == (200, b"data: x\n\n", None)


async def test_a_chunked_body_cut_short_is_a_protocol_error(serve: Callable[..., object]) -> None:
    url = await serve(HEAD + b"Transfer-Encoding: chunked\r\n\r\n9\r\ndata: x\n\n\r\n5\r\nda")  # type: ignore[misc]
    _, sink = await read(url)
    assert sink.data == b"data: x\n\nda"
    assert isinstance(sink.error, httpx.RemoteProtocolError)


@pytest.mark.parametrize(
    "reply",
    [b"", b"garbage\r\n\r\n", b"HTTP/1.1 abc OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n"],
)
async def test_no_valid_head_is_an_error(serve: Callable[..., object], reply: bytes) -> None:
    url = await serve(reply)  # type: ignore[misc]
    with pytest.raises(httpx.RemoteProtocolError):
        await post_stream(url, {}, b"{}", connect_timeout_s=2)


async def test_a_refused_connection_is_a_connect_error() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(httpx.ConnectError):
        await post_stream(f"http://127.0.0.1:{port}/x", {}, b"{}", connect_timeout_s=2)


async def test_a_header_with_a_line_break_is_refused_before_sending(
    serve: Callable[..., object],
) -> None:
    url = await serve(HEAD + b"\r\n")  # type: ignore[misc]
    with pytest.raises(httpx.LocalProtocolError):
        await post_stream(url, {"X-Evil": "a\r\nInjected: 1"}, b"{}", connect_timeout_s=2)
