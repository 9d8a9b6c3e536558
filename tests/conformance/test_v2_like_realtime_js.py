"""Protocol 2.0.0 exactly as realtime-js 2.112.2 speaks it (§1, §7): text arrays with string
refs, every broadcast push with a string event as binary kind 3 (JSON, encoding 1), and
only kind 4 decoded on the way in. The browser tests run the real supabase-js; these pin
the frames down byte by byte."""

from __future__ import annotations

import json
import struct

import pytest

from devstack.realtime import RealtimeServer

from .wsclient import RawClient

pytestmark = pytest.mark.integration


def kind3(join_ref: str, ref: str, topic: str, event: str, payload: object) -> bytes:
    """Built by hand here (not with the server's encoder) from §1's byte layout."""
    body = json.dumps(payload).encode()
    fields = [join_ref.encode(), ref.encode(), topic.encode(), event.encode(), b""]
    header = struct.pack("!7B", 3, *(len(f) for f in fields), 1)
    return header + b"".join(fields) + body


def parse_kind4(frame: bytes) -> tuple[str, str, bytes, int, bytes]:
    kind, tl, el, ml, enc = struct.unpack("!5B", frame[:5])
    assert kind == 4
    pos = 5
    topic = frame[pos : pos + tl].decode()
    pos += tl
    event = frame[pos : pos + el].decode()
    pos += el
    meta = frame[pos : pos + ml]
    pos += ml
    return topic, event, meta, enc, frame[pos:]


JOIN_PAYLOAD = {
    "config": {
        "broadcast": {"ack": True, "self": False},
        "presence": {"key": "", "enabled": False},
        "postgres_changes": [],
        "private": False,
    }
}


async def _js(server: RealtimeServer, key: str, topic: str, join_ref: str) -> RawClient:
    client = await RawClient.connect(server.url, key, vsn="2.0.0")
    await client.ws.send(
        json.dumps([join_ref, join_ref, topic, "phx_join", {**JOIN_PAYLOAD, "access_token": key}])
    )
    assert json.loads(await client.recv_raw()) == [
        join_ref,
        join_ref,
        topic,
        "phx_reply",
        {"status": "ok", "response": {"postgres_changes": []}},
    ]
    return client


async def test_js_style_send_with_ack_and_receive(server: RealtimeServer, anon_key: str) -> None:
    topic = "realtime:llm-token:s1"
    sender = await _js(server, anon_key, topic, "1")
    receiver = await _js(server, anon_key, topic, "4")
    payload = {"v": 1, "stream": "s1", "seq": 0, "tokens": ["Hel", "lo"]}
    await sender.ws.send(kind3("1", "2", topic, "llm-token", payload))
    reply = json.loads(await sender.recv_raw())
    assert reply == ["1", "2", topic, "phx_reply", {"status": "ok", "response": {}}]
    frame = await receiver.recv_raw()
    assert isinstance(frame, bytes)
    got_topic, event, meta, enc, body = parse_kind4(frame)
    assert (got_topic, event, meta, enc) == (topic, "llm-token", b"", 1)
    assert json.loads(body) == payload


async def test_js_style_heartbeat_and_leave(server: RealtimeServer, anon_key: str) -> None:
    client = await _js(server, anon_key, "realtime:room1", "1")
    await client.ws.send(json.dumps([None, "2", "phoenix", "heartbeat", {}]))
    assert json.loads(await client.recv_raw()) == [
        None,
        "2",
        "phoenix",
        "phx_reply",
        {"status": "ok", "response": {}},
    ]
    await client.ws.send(json.dumps(["1", "3", "realtime:room1", "phx_leave", {}]))
    assert json.loads(await client.recv_raw()) == [
        "1",
        "3",
        "realtime:room1",
        "phx_reply",
        {"status": "ok", "response": {}},
    ]
    assert json.loads(await client.recv_raw()) == ["1", "1", "realtime:room1", "phx_close", {}]


async def test_js_style_json_push_reaches_v2_as_text(server: RealtimeServer, anon_key: str) -> None:
    # realtime-js sends a broadcast whose event is not a string as a JSON text push.
    sender = await _js(server, anon_key, "realtime:room1", "1")
    receiver = await _js(server, anon_key, "realtime:room1", "7")
    push = {"type": "broadcast", "event": "e", "payload": {"x": 1}}
    await sender.ws.send(json.dumps(["1", "2", "realtime:room1", "broadcast", push]))
    assert json.loads(await sender.recv_raw())[4] == {"status": "ok", "response": {}}
    assert json.loads(await receiver.recv_raw()) == [
        None,
        None,
        "realtime:room1",
        "broadcast",
        push,
    ]


async def test_v2_system_and_close_carry_the_join_ref(
    server: RealtimeServer, anon_key: str
) -> None:
    client = await _js(server, anon_key, "realtime:room1", "9")
    await client.ws.send(
        json.dumps(["9", "10", "realtime:room1", "access_token", {"access_token": "garbage"}])
    )
    system = json.loads(await client.recv_raw())
    assert system[:4] == ["9", None, "realtime:room1", "system"]
    assert system[4] == {
        "message": "The token provided is not a valid JWT",
        "status": "error",
        "extension": "system",
        "channel": "room1",
    }
    assert json.loads(await client.recv_raw()) == ["9", "9", "realtime:room1", "phx_close", {}]


async def test_v2_unmatched_topic(server: RealtimeServer, anon_key: str) -> None:
    client = await RawClient.connect(server.url, anon_key, vsn="2.0.0")
    await client.ws.send(kind3("1", "2", "realtime:nowhere", "e", {}))
    assert json.loads(await client.recv_raw()) == [
        "1",
        "2",
        "realtime:nowhere",
        "phx_reply",
        {"status": "error", "response": {"reason": "unmatched topic"}},
    ]
