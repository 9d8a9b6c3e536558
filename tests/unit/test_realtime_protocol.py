"""Pure protocol core of the local Realtime server (ref §1)."""

from __future__ import annotations

import json

import pytest

from devstack.realtime.protocol import (
    Frame,
    MapBroadcast,
    ProtocolError,
    UserBroadcast,
    UserPayload,
    Version,
    close_frame,
    decode_binary,
    decode_text,
    decode_user_broadcast,
    encode_broadcast,
    encode_message,
    encode_user_broadcast,
    encode_user_broadcast_push,
    negotiate_version,
    payload_too_large,
    reply_frame,
    system_frame,
)


@pytest.mark.parametrize(
    ("vsn", "version"),
    [
        (None, Version.V1),
        ("1.0.0", Version.V1),
        ("1.0.3", Version.V1),
        ("2.0.0", Version.V2),
        ("2.0.1", Version.V2),
        ("2.1.0", None),
        ("3.0.0", None),
        ("", None),
    ],
)
def test_negotiate_version(vsn: str | None, version: Version | None) -> None:
    assert negotiate_version(vsn) is version


def test_decode_v1_object() -> None:
    frame = decode_text(
        Version.V1,
        '{"topic":"realtime:a","event":"phx_join","payload":{},"ref":"1","join_ref":"1"}',
    )
    assert frame == Frame("realtime:a", "phx_join", {}, "1", "1")


def test_decode_v2_array() -> None:
    frame = decode_text(Version.V2, '[null,"3","phoenix","heartbeat",{}]')
    assert frame == Frame("phoenix", "heartbeat", {}, "3", None)


@pytest.mark.parametrize(
    ("version", "text"),
    [
        (Version.V1, "[1,2,3,4,5]"),
        (Version.V1, "not json"),
        (Version.V2, '{"topic":"t","event":"e"}'),
        (Version.V2, '["1","2","t"]'),
        (Version.V1, '{"topic":1,"event":"e","payload":{}}'),
    ],
)
def test_bad_text_frames(version: Version, text: str) -> None:
    with pytest.raises(ProtocolError):
        decode_text(version, text)


def test_kind3_round_trip() -> None:
    raw = encode_user_broadcast_push("1", "2", "realtime:a", "tok", b'{"x":1}', metadata={"m": 1})
    assert raw[:7] == bytes([3, 1, 1, 10, 3, 7, 1])
    frame = decode_binary(Version.V2, raw)
    assert frame == Frame(
        "realtime:a", "broadcast", UserPayload("tok", "json", b'{"x":1}', {"m": 1}), "2", "1"
    )


def test_kind3_binary_encoding_and_truncation() -> None:
    raw = encode_user_broadcast_push("1", "2", "t", "e", b"\x00", encoding="binary")
    assert decode_binary(Version.V2, raw).payload.encoding == "binary"
    with pytest.raises(ProtocolError):
        decode_binary(Version.V2, raw[:9])
    with pytest.raises(ProtocolError):
        decode_binary(Version.V1, raw)
    with pytest.raises(ProtocolError):
        decode_binary(Version.V2, bytes([4, 0, 0, 0, 0]))


def test_kind4_layout() -> None:
    raw = encode_user_broadcast("realtime:a", UserBroadcast("tok", "json", b"{}", {"id": "u"}))
    assert raw[:5] == bytes([4, 10, 3, 10, 1])
    assert decode_user_broadcast(raw) == ("realtime:a", "tok", {"id": "u"}, "json", b"{}")
    bare = encode_user_broadcast("t", UserBroadcast("e", "binary", b"\x01"))
    assert bare == bytes([4, 1, 1, 0, 0]) + b"te\x01"


def test_fields_longer_than_255_bytes_are_refused() -> None:
    with pytest.raises(ProtocolError):
        encode_user_broadcast("t" * 256, UserBroadcast("e", "json", b"{}"))


def test_v1_messages_have_exactly_four_keys() -> None:
    text = encode_message(Version.V1, reply_frame("realtime:a", "5", "1", "ok", {}))
    assert json.loads(text) == {
        "topic": "realtime:a",
        "event": "phx_reply",
        "payload": {"status": "ok", "response": {}},
        "ref": "5",
    }


def test_v2_messages_are_arrays() -> None:
    assert json.loads(encode_message(Version.V2, close_frame("realtime:a", "1"))) == [
        "1",
        "1",
        "realtime:a",
        "phx_close",
        {},
    ]


def test_system_frame_names_the_sub_topic() -> None:
    frame = system_frame("realtime:llm-token:s", "1", "error", "Too many messages per second")
    assert frame.payload == {
        "message": "Too many messages per second",
        "status": "error",
        "extension": "system",
        "channel": "llm-token:s",
    }
    assert frame.ref is None


def test_broadcast_encodings_per_version() -> None:
    m = MapBroadcast({"type": "broadcast", "event": "e", "payload": {}})
    assert json.loads(str(encode_broadcast(Version.V2, "realtime:a", m))) == [
        None,
        None,
        "realtime:a",
        "broadcast",
        m.payload,
    ]
    user = UserBroadcast("e", "json", b'{"a":1}', {"id": "x"})
    assert json.loads(str(encode_broadcast(Version.V1, "realtime:a", user)))["payload"] == {
        "event": "e",
        "payload": {"a": 1},
        "type": "broadcast",
        "meta": {"id": "x"},
    }
    assert isinstance(encode_broadcast(Version.V2, "realtime:a", user), bytes)
    assert encode_broadcast(Version.V1, "realtime:a", UserBroadcast("e", "binary", b"")) is None


def test_payload_limit_is_kb_times_1000_plus_500() -> None:
    def sized(n: int) -> dict[str, str]:
        return {"p": "x" * (n - len('{"p":""}'))}

    assert not payload_too_large(sized(1500), 1)
    assert payload_too_large(sized(1501), 1)
