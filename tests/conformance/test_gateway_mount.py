"""`add_routes()` mounts the server on another aiohttp app (one port for every stand-in)."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from devstack.realtime import RealtimeServer

from .conftest import TEST_TIME_SCALE, TEST_TIMINGS
from .wsclient import RawClient

pytestmark = pytest.mark.integration


async def test_mounted_beside_other_routes(anon_key: str) -> None:
    realtime = RealtimeServer(time_scale=TEST_TIME_SCALE, timings=TEST_TIMINGS)
    app = web.Application()

    async def other(request: web.Request) -> web.Response:
        return web.Response(text="other stand-in")

    app.router.add_get("/rest/v1/ping", other)
    realtime.add_routes(app)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http, http.get(base + "/rest/v1/ping") as r:
            assert await r.text() == "other stand-in"
        client = await RawClient.connect(base, anon_key)
        _, reply = await client.join("room1")
        assert reply["payload"]["status"] == "ok"
        await client.close()
    finally:
        await runner.cleanup()  # on_shutdown closes the server's sockets and tasks
