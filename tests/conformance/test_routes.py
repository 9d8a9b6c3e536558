"""§9 "Routes of §1 and §4 under both /realtime/v1/… and bare paths; CORS *; no Origin
check; tenant from Host"."""

from __future__ import annotations

import aiohttp
import pytest

from devstack.jwt import api_key
from devstack.realtime import RealtimeServer

from .conftest import TEST_TIME_SCALE
from .wsclient import RawClient

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("path", ["/realtime/v1/websocket", "/socket/websocket"])
async def test_websocket_on_both_paths(server: RealtimeServer, anon_key: str, path: str) -> None:
    client = await RawClient.connect(server.url, anon_key, path=path)
    _, reply = await client.join("room1")
    assert reply["payload"] == {"status": "ok", "response": {"postgres_changes": []}}
    await client.close()


@pytest.mark.parametrize("prefix", ["", "/realtime/v1"])
async def test_rest_on_both_paths_with_cors(
    server: RealtimeServer, anon_key: str, prefix: str
) -> None:
    headers = {"apikey": anon_key, "Origin": "https://elsewhere.example"}
    async with aiohttp.ClientSession() as http:
        batch = await http.post(
            server.url + prefix + "/api/broadcast",
            json={"messages": [{"topic": "t", "event": "e", "payload": {"a": 1}}]},
            headers=headers,
        )
        single = await http.post(
            server.url + prefix + "/api/broadcast/t/events/e", json={"a": 1}, headers=headers
        )
        preflight = await http.options(server.url + prefix + "/api/broadcast", headers=headers)
    assert batch.status == 202 and single.status == 202
    for response in (batch, single, preflight):
        assert response.headers["Access-Control-Allow-Origin"] == "*"
    async with aiohttp.ClientSession() as http:
        asked = await http.options(
            server.url + prefix + "/api/broadcast/t/events/e",
            headers={
                "Origin": "http://localhost:5173",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "apikey,authorization,content-type,x-client-info",
            },
        )
    assert asked.status == 204
    assert asked.headers["Access-Control-Allow-Headers"] == (
        "apikey,authorization,content-type,x-client-info"
    )


async def test_no_origin_check(server: RealtimeServer, anon_key: str) -> None:
    client = await RawClient.connect(
        server.url,
        anon_key,
        origin="https://evil.example",
    )
    _, reply = await client.join("room1")
    assert reply["payload"]["status"] == "ok"
    await client.close()


async def test_tenant_is_the_first_label_of_host() -> None:
    srv = RealtimeServer(time_scale=TEST_TIME_SCALE, tenant_ids={"proj"})
    await srv.start()
    try:
        key = api_key("anon")
        ws_url = f"{srv.url}/realtime/v1/websocket?apikey={key}&vsn=1.0.0"
        async with aiohttp.ClientSession() as http:
            known = await http.get(
                ws_url,
                headers={
                    "Host": "proj.supabase.co",
                    "Connection": "Upgrade",
                    "Upgrade": "websocket",
                    "Sec-WebSocket-Version": "13",
                    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                },
            )
            assert known.status == 101
            known.close()
            unknown = await http.get(ws_url, headers={"Host": "other.supabase.co"})
            assert unknown.status == 404
            assert await unknown.json() == {"error": "Tenant not found"}
            rest = await http.post(
                srv.url + "/api/broadcast",
                json={"messages": []},
                headers={"Host": "other.supabase.co", "apikey": key},
            )
            assert rest.status == 401
            assert await rest.json() == {"message": "Tenant not found in database"}
        assert set(srv.tenants) == {"proj"}
    finally:
        await srv.stop()


async def test_without_tenant_ids_every_host_is_the_local_tenant(
    server: RealtimeServer, anon_key: str
) -> None:
    """Like a local Supabase stack, whose gateway sends every client to realtime-dev."""
    by_ip = await RawClient.connect(server.url, anon_key)
    by_name = await RawClient.connect(server.url.replace("127.0.0.1", "localhost"), anon_key)
    join_ref, _ = await by_ip.join("room1")
    await by_name.join("room1")
    payload = {"type": "broadcast", "event": "e", "payload": {}}
    await by_ip.send("realtime:room1", "broadcast", payload, ref="1", join_ref=join_ref)
    assert (await by_name.recv())["payload"] == payload
    assert set(server.tenants) == {"realtime-dev"}


async def test_no_per_message_compression(server: RealtimeServer, anon_key: str) -> None:
    # Realtime leaves Phoenix's websocket `compress` at false: a client's offer of
    # permessage-deflate (websockets and browsers offer it) is never accepted.
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(server.websocket_url + f"?apikey={anon_key}&vsn=1.0.0", compress=15) as ws,
    ):
        assert ws.compress == 0  # the response agreed no extension
