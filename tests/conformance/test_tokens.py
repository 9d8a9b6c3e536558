"""§9 "Tokens: access_token (no reply), expiry timer ⇒ system error + phx_close"."""

from __future__ import annotations

import time

import pytest

from devstack.jwt import sign, user_token
from devstack.realtime import RealtimeServer

from .wsclient import RawClient

pytestmark = pytest.mark.integration


async def _heartbeat_is_next(client: RawClient) -> None:
    await client.send("phoenix", "heartbeat", {}, ref="hb")
    frame = await client.recv()
    assert (frame["topic"], frame["ref"]) == ("phoenix", "hb"), frame


@pytest.mark.parametrize("token", ["fresh", None, "sb_publishable_xyz", "same"])
async def test_access_token_gets_no_reply(
    server: RealtimeServer, anon_key: str, token: str | None
) -> None:
    client = await RawClient.connect(server.url, anon_key)
    join_ref, _ = await client.join("room1", access_token=anon_key)
    value = {"fresh": user_token("u1"), "same": anon_key}.get(token or "", token)
    await client.send(
        "realtime:room1", "access_token", {"access_token": value}, ref="5", join_ref=join_ref
    )
    await _heartbeat_is_next(client)
    assert [list(s.channels) for s in server.tenant().sockets] == [["realtime:room1"]]


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (sign({"role": "anon", "exp": int(time.time()) - 5}), "Token has expired "),
        (sign({"role": "anon"}), "Fields `role` and `exp` are required in JWT"),
    ],
)
async def test_bad_access_token_shuts_the_channel(
    server: RealtimeServer, anon_key: str, token: str, message: str
) -> None:
    client = await RawClient.connect(server.url, anon_key)
    join_ref, _ = await client.join("room1")
    await client.send(
        "realtime:room1", "access_token", {"access_token": token}, ref="5", join_ref=join_ref
    )
    system = await client.recv()
    assert system["event"] == "system" and system["ref"] is None
    assert system["payload"]["status"] == "error"
    assert system["payload"]["extension"] == "system"
    assert system["payload"]["channel"] == "room1"
    assert system["payload"]["message"].startswith(message)
    assert await client.recv() == {
        "topic": "realtime:room1",
        "event": "phx_close",
        "payload": {},
        "ref": join_ref,
    }
    await _heartbeat_is_next(client)  # the socket stays


async def test_token_expiry_timer_shuts_the_channel(anon_key: str) -> None:
    # Token expiry is wall-clock; a 6 s idle close (scale 0.1) outlives the 1 s token.
    server = RealtimeServer(time_scale=0.1)
    await server.start()
    try:
        await _expires(server, anon_key)
    finally:
        await server.stop()


async def _expires(server: RealtimeServer, anon_key: str) -> None:
    client = await RawClient.connect(server.url, anon_key)
    short = sign({"role": "authenticated", "sub": "u1", "exp": int(time.time()) + 1})
    _, reply = await client.join("room1", access_token=short)
    assert reply["payload"]["status"] == "ok"
    system = await client.recv(wait_s=5)
    assert system["event"] == "system"
    assert system["payload"]["status"] == "error"
    assert system["payload"]["message"].startswith("Token has expired ")
    assert system["payload"]["message"].endswith(" seconds ago")
    assert (await client.recv())["event"] == "phx_close"
