"""§9 "Heartbeat echo (null ref too); idle close 1000 after 60 s without inbound frames;
1009 above 5,000,000-byte frames"."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
import websockets

from devstack.realtime import RealtimeServer

from .wsclient import RawClient

pytestmark = pytest.mark.integration

IDLE_SCALE = 0.02  # idle close after 1.2 s: room for a loaded machine between pings


@pytest.mark.parametrize("ref", ["42", None])
async def test_heartbeat_is_echoed(server: RealtimeServer, anon_key: str, ref: str | None) -> None:
    client = await RawClient.connect(server.url, anon_key)
    await client.send("phoenix", "heartbeat", {}, ref=ref)
    assert await client.recv() == {
        "topic": "phoenix",
        "event": "phx_reply",
        "payload": {"status": "ok", "response": {}},
        "ref": ref,
    }


@pytest.fixture
async def idle_server() -> AsyncIterator[RealtimeServer]:
    srv = RealtimeServer(time_scale=IDLE_SCALE)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


async def test_idle_socket_is_closed_1000(idle_server: RealtimeServer, anon_key: str) -> None:
    server = idle_server
    idle_s = 60.0 * IDLE_SCALE
    client = await RawClient.connect(server.url, anon_key, ping_interval=None)
    started = time.monotonic()
    await asyncio.wait_for(client.ws.wait_closed(), idle_s * 10)
    assert client.ws.close_code == 1000
    assert time.monotonic() - started >= idle_s * 0.9


async def test_any_inbound_frame_resets_idle(idle_server: RealtimeServer, anon_key: str) -> None:
    server = idle_server
    idle_s = 60.0 * IDLE_SCALE
    client = await RawClient.connect(server.url, anon_key, ping_interval=None)
    for _ in range(6):
        await asyncio.sleep(idle_s / 4)
        await client.ws.ping()  # a WS ping is an inbound frame too (§2)
    assert client.ws.close_code is None
    await client.expect_silence(idle_s / 3)


async def test_frames_above_5mb_close_1009(server: RealtimeServer, anon_key: str) -> None:
    client = await RawClient.connect(server.url, anon_key)
    # Uncompressed (the server agrees no permessage-deflate), the frame is 5 MB on the
    # wire: the server may close while it is still being written.
    with contextlib.suppress(websockets.ConnectionClosed):
        await client.ws.send("x" * 5_000_001)
    await asyncio.wait_for(client.ws.wait_closed(), 10)
    assert client.ws.close_code == 1009


async def test_frames_at_5mb_are_read(server: RealtimeServer, anon_key: str) -> None:
    client = await RawClient.connect(server.url, anon_key)
    pad = "x" * (5_000_000 - 200)
    await client.send("phoenix", "heartbeat", {"pad": pad}, ref="1")
    reply = await client.recv()
    assert reply["ref"] == "1"
