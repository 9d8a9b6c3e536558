"""§9 "Upgrade auth per §1 (JWT with role+exp; exact statuses and {"error"} bodies;
configurable delay, real 2 s); vsn negotiation (default 1.0.0)"."""

from __future__ import annotations

import json
import time

import aiohttp
import pytest

from devstack.jwt import api_key, sign
from devstack.realtime import RealtimeServer
from devstack.realtime.limits import Timings

from .conftest import TEST_TIME_SCALE
from .wsclient import RawClient

pytestmark = pytest.mark.integration

NOW = int(time.time())
BAD_KEYS = [
    (None, "API key is missing"),
    (sign({"role": "anon", "exp": NOW - 10}), "Token has expired"),
    (sign({"role": "anon"}), "Fields `role` and `exp` are required in JWT"),
    (sign({"exp": NOW + 600}), "Fields `role` and `exp` are required in JWT"),
    ("not-a-jwt", "The token provided is not a valid JWT"),
    (sign({"role": "anon", "exp": NOW + 600}, "x" * 40), "Failed to validate JWT signature"),
]


@pytest.mark.parametrize(("key", "message"), BAD_KEYS)
async def test_refused_upgrade_is_401_with_error_body_after_backoff(
    server: RealtimeServer, key: str | None, message: str
) -> None:
    url = server.url + "/realtime/v1/websocket?vsn=1.0.0"
    if key is not None:
        url += "&apikey=" + key
    started = time.monotonic()
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 401
        assert json.loads(await response.text()) == {"error": message}
    assert time.monotonic() - started >= 2.0 * TEST_TIME_SCALE * 0.9


def test_real_backoffs_are_the_defaults() -> None:
    assert RealtimeServer().timings == Timings()
    assert Timings().connect_error_backoff_s == 2.0
    assert Timings().channel_error_backoff_s == 5.0
    assert RealtimeServer(time_scale=0.5).timings.connect_error_backoff_s == 1.0


async def test_x_api_key_header_wins_over_query(server: RealtimeServer) -> None:
    url = server.url + "/realtime/v1/websocket?vsn=1.0.0&apikey=not-a-jwt"
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(url, headers={"x-api-key": api_key("anon")})
        await ws.close()
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(url, headers={"x-api-key": "garbage"})
    assert refused.value.status == 401


async def test_vsn_absent_means_v1(server: RealtimeServer, anon_key: str) -> None:
    client = await RawClient.connect(server.url, anon_key, vsn=None)
    _, reply = await client.join("room1")
    assert set(reply) == {"topic", "event", "payload", "ref"}
    await client.close()


async def test_vsn_2_speaks_arrays(server: RealtimeServer, anon_key: str) -> None:
    client = await RawClient.connect(server.url, anon_key, vsn="2.0.0")
    await client.send("realtime:room1", "phx_join", {"config": {}}, ref="1", join_ref="1")
    assert await client.recv() == [
        "1",
        "1",
        "realtime:room1",
        "phx_reply",
        {"status": "ok", "response": {"postgres_changes": []}},
    ]
    await client.close()


@pytest.mark.parametrize("vsn", ["3.0.0", "1.1.0", "banana"])
async def test_other_vsn_refuses_upgrade(server: RealtimeServer, anon_key: str, vsn: str) -> None:
    url = f"{server.url}/realtime/v1/websocket?apikey={anon_key}&vsn={vsn}"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 403
