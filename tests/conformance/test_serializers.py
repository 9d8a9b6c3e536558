"""§9 "V1: objects with exactly topic,event,payload,ref; never binary; drop binary payloads
for V1 subscribers. V2: arrays, decode kind 3, emit kind 4 for user broadcasts, text for
map broadcasts"."""

from __future__ import annotations

import json

import aiohttp
import pytest

from devstack.realtime import RealtimeServer
from devstack.realtime.protocol import decode_user_broadcast, encode_user_broadcast_push

from .wsclient import RawClient

pytestmark = pytest.mark.integration

MAP = {"type": "broadcast", "event": "tok", "payload": {"seq": 1}, "extra": True}


async def _pair(server: RealtimeServer, key: str, vsn_tx: str, vsn_rx: str):
    tx = await RawClient.connect(server.url, key, vsn=vsn_tx)
    rx = await RawClient.connect(server.url, key, vsn=vsn_rx)
    tx_join, _ = await tx.join("room1", ack=True)
    await rx.join("room1")
    return tx, tx_join, rx


async def test_v1_frames_have_exactly_four_keys(server: RealtimeServer, anon_key: str) -> None:
    tx, join_ref, rx = await _pair(server, anon_key, "1.0.0", "1.0.0")
    await tx.send("realtime:room1", "broadcast", MAP, ref="9", join_ref=join_ref)
    reply = await tx.recv()
    assert reply == {
        "topic": "realtime:room1",
        "event": "phx_reply",
        "payload": {"status": "ok", "response": {}},
        "ref": "9",
    }
    got = await rx.recv()
    assert got == {"topic": "realtime:room1", "event": "broadcast", "payload": MAP, "ref": None}


async def test_v2_map_broadcast_is_a_text_array(server: RealtimeServer, anon_key: str) -> None:
    tx, join_ref, rx = await _pair(server, anon_key, "1.0.0", "2.0.0")
    await tx.send("realtime:room1", "broadcast", MAP, ref="9", join_ref=join_ref)
    raw = await rx.recv_raw()
    assert isinstance(raw, str)
    assert json.loads(raw) == [None, None, "realtime:room1", "broadcast", MAP]


async def test_v2_kind3_in_kind4_out(server: RealtimeServer, anon_key: str) -> None:
    tx, join_ref, rx = await _pair(server, anon_key, "2.0.0", "2.0.0")
    frame = encode_user_broadcast_push(
        join_ref, "7", "realtime:room1", "tok", b'{"seq":1}', metadata={"ignored": 1}
    )
    await tx.ws.send(frame)
    assert await tx.recv() == [
        join_ref,
        "7",
        "realtime:room1",
        "phx_reply",
        {"status": "ok", "response": {}},
    ]
    raw = await rx.recv_raw()
    assert isinstance(raw, bytes)
    # The server ignores client metadata (broadcast_handler builds UserBroadcast without it).
    assert decode_user_broadcast(raw) == ("realtime:room1", "tok", None, "json", b'{"seq":1}')


async def test_v1_subscriber_gets_user_broadcast_as_json(
    server: RealtimeServer, anon_key: str
) -> None:
    tx, join_ref, rx = await _pair(server, anon_key, "2.0.0", "1.0.0")
    await tx.ws.send(
        encode_user_broadcast_push(join_ref, "7", "realtime:room1", "tok", b'{"seq":1}')
    )
    got = await rx.recv()
    assert got == {
        "topic": "realtime:room1",
        "event": "broadcast",
        "payload": {"event": "tok", "payload": {"seq": 1}, "type": "broadcast"},
        "ref": None,
    }


async def test_v1_subscriber_skips_binary_payloads(server: RealtimeServer, anon_key: str) -> None:
    tx, join_ref, rx = await _pair(server, anon_key, "2.0.0", "1.0.0")
    rx2 = await RawClient.connect(server.url, anon_key, vsn="2.0.0")
    await rx2.send("realtime:room1", "phx_join", {"config": {}}, ref="1", join_ref="1")
    await rx2.recv()
    await tx.ws.send(
        encode_user_broadcast_push(
            join_ref, "7", "realtime:room1", "bin", b"\x00\xff", encoding="binary"
        )
    )
    raw = await rx2.recv_raw()
    assert isinstance(raw, bytes)
    assert decode_user_broadcast(raw)[3:] == ("binary", b"\x00\xff")
    await rx.expect_silence(0.2)
    assert server.stats.v1_binary_skips == 1


async def test_rest_single_is_kind4_and_batch_is_text(
    server: RealtimeServer, anon_key: str
) -> None:
    rx = await RawClient.connect(server.url, anon_key, vsn="2.0.0")
    await rx.send("realtime:room1", "phx_join", {"config": {}}, ref="1", join_ref="1")
    await rx.recv()
    async with aiohttp.ClientSession(headers={"apikey": anon_key}) as http:
        await http.post(server.url + "/api/broadcast/room1/events/tok", json={"n": 1})
        await http.post(
            server.url + "/api/broadcast",
            json={"messages": [{"topic": "room1", "event": "tok", "payload": {"n": 2}, "id": "x"}]},
        )
    single = await rx.recv_raw()
    assert isinstance(single, bytes)
    assert decode_user_broadcast(single) == ("realtime:room1", "tok", None, "json", b'{"n": 1}')
    batch = await rx.recv()
    assert batch == [
        None,
        None,
        "realtime:room1",
        "broadcast",
        {"type": "broadcast", "event": "tok", "payload": {"n": 2}, "meta": {"id": "x"}},
    ]


async def test_v1_never_sends_binary(server: RealtimeServer, anon_key: str) -> None:
    client = await RawClient.connect(server.url, anon_key, vsn="1.0.0")
    await client.ws.send(b"\x03\x00\x00\x00\x00\x00\x01")
    # A binary frame cannot be decoded by the V1 serializer: the socket process dies.
    await client.ws.wait_closed()
    assert client.ws.close_code == 1011


async def test_kind3_with_invalid_json_is_skipped_for_v1_only(
    server: RealtimeServer, anon_key: str
) -> None:
    tx, join_ref, rx_v1 = await _pair(server, anon_key, "2.0.0", "1.0.0")
    rx_v2 = await RawClient.connect(server.url, anon_key, vsn="2.0.0")
    await rx_v2.send("realtime:room1", "phx_join", {"config": {}}, ref="1", join_ref="1")
    await rx_v2.recv()
    await tx.ws.send(encode_user_broadcast_push(join_ref, "7", "realtime:room1", "tok", b"{oops"))
    assert (await tx.recv())[4] == {"status": "ok", "response": {}}
    raw = await rx_v2.recv_raw()
    assert isinstance(raw, bytes) and raw.endswith(b"{oops")
    await rx_v1.expect_silence(0.2)
    await tx.send("phoenix", "heartbeat", {}, ref="hb")
    assert (await tx.recv())[1] == "hb"  # the sender's socket is fine
