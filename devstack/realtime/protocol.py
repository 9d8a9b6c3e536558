"""Pure protocol core of the local Realtime server: frames in, frames out, no I/O.

Everything here is traceable to `shared/reference/supabase-realtime-protocol.md`
("ref §n" below). The asyncio shell in `server.py` only pumps bytes through it,
the way websockets' `Connection.data_received` pumps through its sans-I/O core.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

# ref §1: `vsn` absent => 1.0.0; `~>1.0.0` => Phoenix V1 JSON, `~>2.0.0` => V2 serializer.
DEFAULT_VSN = "1.0.0"
_VSN_1 = re.compile(r"^1\.0\.\d+$")
_VSN_2 = re.compile(r"^2\.0\.\d+$")

# ref §1 (V2 binary frames): the first byte is the kind.
KIND_PUSH = 0
KIND_REPLY = 1
KIND_BROADCAST = 2
KIND_USER_BROADCAST_PUSH = 3
KIND_USER_BROADCAST = 4
MAX_FIELD_LEN = 255

# ref §2: the sub-topic of a channel is its topic minus this prefix.
TOPIC_PREFIX = "realtime:"


class Version(Enum):
    V1 = "1.0.0"
    V2 = "2.0.0"


class ProtocolError(ValueError):
    """A frame the serializer cannot decode (Phoenix raises and the socket dies)."""


Encoding = Literal["json", "binary"]


@dataclass(frozen=True)
class UserPayload:
    """A kind-3 push's body (ref §1): the user event, its encoding and raw payload."""

    event: str
    encoding: Encoding
    data: bytes
    metadata: dict[str, Any]


@dataclass(frozen=True)
class Frame:
    """One Phoenix message. `payload` is a JSON object, or a `UserPayload` from kind 3."""

    topic: str
    event: str
    payload: Any
    ref: str | None = None
    join_ref: str | None = None


@dataclass(frozen=True)
class MapBroadcast:
    """A broadcast whose payload is the pushed map itself (JSON pushes, REST batch; ref §1)."""

    payload: dict[str, Any]


@dataclass(frozen=True)
class UserBroadcast:
    """A "user broadcast" (kind-3 pushes, REST single, DB `realtime.send`; ref §1)."""

    event: str
    encoding: Encoding
    data: bytes
    meta: dict[str, Any] | None = None


Broadcast = MapBroadcast | UserBroadcast


def negotiate_version(vsn: str | None) -> Version | None:
    """The serializer for a `vsn` query parameter, or None to refuse the upgrade (ref §1)."""
    value = DEFAULT_VSN if vsn is None else vsn
    if _VSN_1.match(value):
        return Version.V1
    if _VSN_2.match(value):
        return Version.V2
    return None


def sub_topic(topic: str) -> str:
    return topic[len(TOPIC_PREFIX) :] if topic.startswith(TOPIC_PREFIX) else topic


def _opt_str(value: Any) -> str | None:
    # Phoenix keeps refs as given; clients send strings (or null).
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value)


# ---------------------------------------------------------------- decoding


def decode_text(version: Version, text: str) -> Frame:
    """Decode a text frame: a V1 object or a V2 array (ref §1)."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ProtocolError(f"not JSON: {exc}") from exc
    if version is Version.V1:
        if not isinstance(data, dict):
            raise ProtocolError("expected a V1 JSON object")
        topic, event = data.get("topic"), data.get("event")
        payload = data.get("payload")
        ref, join_ref = data.get("ref"), data.get("join_ref")
    else:
        if not isinstance(data, list) or len(data) < 5:
            raise ProtocolError("expected V2 array")
        join_ref, ref, topic, event, payload = data[:5]
    if not isinstance(topic, str) or not isinstance(event, str):
        raise ProtocolError("topic and event must be strings")
    return Frame(topic, event, payload, _opt_str(ref), _opt_str(join_ref))


def decode_binary(version: Version, data: bytes) -> Frame:
    """Decode a V2 binary frame; only kind 3 (user broadcast push) carries client data."""
    if version is Version.V1:
        raise ProtocolError("V1 has no binary frames")
    if not data:
        raise ProtocolError("empty binary frame")
    if data[0] == KIND_USER_BROADCAST_PUSH:
        return _decode_user_broadcast_push(data)
    if data[0] == KIND_PUSH:
        return _decode_push(data)
    raise ProtocolError(f"unexpected binary kind {data[0]}")


def _take(data: bytes, pos: int, size: int) -> tuple[bytes, int]:
    if pos + size > len(data):
        raise ProtocolError("binary frame shorter than its header says")
    return data[pos : pos + size], pos + size


def _decode_user_broadcast_push(data: bytes) -> Frame:
    # ref §1 kind 3: 3, join_ref_len, ref_len, topic_len, event_len, meta_len, encoding,
    # then join_ref, ref, topic, event, metadata JSON, payload.
    if len(data) < 7:
        raise ProtocolError("kind 3 header too short")
    jl, rl, tl, el, ml, enc = data[1:7]
    pos = 7
    join_ref, pos = _take(data, pos, jl)
    ref, pos = _take(data, pos, rl)
    topic, pos = _take(data, pos, tl)
    event, pos = _take(data, pos, el)
    meta_raw, pos = _take(data, pos, ml)
    try:
        metadata = json.loads(meta_raw) if ml else {}
    except ValueError as exc:
        raise ProtocolError("kind 3 metadata is not JSON") from exc
    body = UserPayload(
        event.decode(), "binary" if enc == 0 else "json", bytes(data[pos:]), metadata
    )
    return Frame(topic.decode(), "broadcast", body, ref.decode() or None, join_ref.decode() or None)


def _decode_push(data: bytes) -> Frame:
    # Phoenix V2 kind 0: 0, join_ref_len, ref_len, topic_len, event_len, then the fields and
    # the binary payload. Realtime handles no event with a binary payload; decoded for parity.
    if len(data) < 5:
        raise ProtocolError("kind 0 header too short")
    jl, rl, tl, el = data[1:5]
    pos = 5
    join_ref, pos = _take(data, pos, jl)
    ref, pos = _take(data, pos, rl)
    topic, pos = _take(data, pos, tl)
    event, pos = _take(data, pos, el)
    return Frame(
        topic.decode(), event.decode(), bytes(data[pos:]), ref.decode() or None, join_ref.decode()
    )


# ---------------------------------------------------------------- encoding

_COMPACT = (",", ":")


def encode_message(version: Version, frame: Frame) -> str:
    """A server push or reply. V1 has exactly topic,event,payload,ref (ref §1)."""
    if version is Version.V1:
        obj = {"topic": frame.topic, "event": frame.event, "payload": frame.payload}
        obj["ref"] = frame.ref
        return json.dumps(obj, separators=_COMPACT)
    return json.dumps(
        [frame.join_ref, frame.ref, frame.topic, frame.event, frame.payload], separators=_COMPACT
    )


def reply_frame(
    topic: str, ref: str | None, join_ref: str | None, status: str, response: Any
) -> Frame:
    """`phx_reply` `{"status", "response"}` echoing the push's ref (ref §2)."""
    return Frame(topic, "phx_reply", {"status": status, "response": response}, ref, join_ref)


def close_frame(topic: str, join_ref: str | None) -> Frame:
    """`phx_close` `{}` with ref = join_ref (ref §2)."""
    return Frame(topic, "phx_close", {}, join_ref, join_ref)


def system_frame(
    topic: str, join_ref: str | None, status: str, message: str, *, extension: str = "system"
) -> Frame:
    """A channel `system` push; `channel` is the sub-topic (ref §2)."""
    payload = {
        "message": message,
        "status": status,
        "extension": extension,
        "channel": sub_topic(topic),
    }
    return Frame(topic, "system", payload, None, join_ref)


def encode_broadcast(version: Version, topic: str, message: Broadcast) -> str | bytes | None:
    """How one broadcast reaches a subscriber of `version`; None when it must be skipped.

    ref §1: map broadcasts are text (`[null,null,topic,"broadcast",map]` on V2); user
    broadcasts are kind 4 on V2 and `{event,payload,type,meta?}` on V1, where binary
    payloads are skipped.
    """
    if isinstance(message, MapBroadcast):
        if version is Version.V1:
            return encode_message(version, Frame(topic, "broadcast", message.payload))
        return json.dumps([None, None, topic, "broadcast", message.payload], separators=_COMPACT)
    if version is Version.V2:
        return encode_user_broadcast(topic, message)
    if message.encoding == "binary":
        return None
    try:
        user_payload = json.loads(message.data)
    except ValueError:
        return None  # rt: convert_to_json_broadcast fails => nothing sent to V1
    payload: dict[str, Any] = {"event": message.event, "payload": user_payload, "type": "broadcast"}
    if message.meta:
        payload["meta"] = message.meta
    return encode_message(version, Frame(topic, "broadcast", payload))


def _field(value: bytes, name: str) -> bytes:
    if len(value) > MAX_FIELD_LEN:
        raise ProtocolError(f"{name} longer than {MAX_FIELD_LEN} bytes")
    return value


def encode_user_broadcast(topic: str, message: UserBroadcast) -> bytes:
    # ref §1 kind 4: 4, topic_len, event_len, meta_len, encoding, topic, event, meta, payload.
    t = _field(topic.encode(), "topic")
    e = _field(message.event.encode(), "event")
    m = _field(
        json.dumps(message.meta, separators=_COMPACT).encode() if message.meta else b"", "meta"
    )
    enc = 1 if message.encoding == "json" else 0
    return bytes([KIND_USER_BROADCAST, len(t), len(e), len(m), enc]) + t + e + m + message.data


def encode_user_broadcast_push(
    join_ref: str | None,
    ref: str | None,
    topic: str,
    event: str,
    data: bytes,
    *,
    encoding: Encoding = "json",
    metadata: dict[str, Any] | None = None,
) -> bytes:
    """Client side of kind 3 (what realtime-js sends); used by tests and tools."""
    j = _field((join_ref or "").encode(), "join_ref")
    r = _field((ref or "").encode(), "ref")
    t = _field(topic.encode(), "topic")
    e = _field(event.encode(), "event")
    m = _field(json.dumps(metadata, separators=_COMPACT).encode() if metadata else b"", "meta")
    enc = 1 if encoding == "json" else 0
    header = bytes([KIND_USER_BROADCAST_PUSH, len(j), len(r), len(t), len(e), len(m), enc])
    return header + j + r + t + e + m + data


def decode_user_broadcast(data: bytes) -> tuple[str, str, dict[str, Any] | None, Encoding, bytes]:
    """Client side of kind 4: (topic, event, meta, encoding, payload). For tests and tools."""
    if len(data) < 5 or data[0] != KIND_USER_BROADCAST:
        raise ProtocolError("not a kind 4 frame")
    tl, el, ml, enc = data[1:5]
    pos = 5
    topic, pos = _take(data, pos, tl)
    event, pos = _take(data, pos, el)
    meta, pos = _take(data, pos, ml)
    return (
        topic.decode(),
        event.decode(),
        json.loads(meta) if ml else None,
        "json" if enc == 1 else "binary",
        bytes(data[pos:]),
    )


# ---------------------------------------------------------------- payload size


def payload_size(payload: dict[str, Any] | UserPayload) -> int:
    """Approximates `:erlang.external_size` by the JSON length of the pushed map (ref §6)."""
    if isinstance(payload, UserPayload):
        return len(payload.data) + len(payload.event)
    return len(json.dumps(payload, separators=_COMPACT).encode())


def payload_too_large(payload: dict[str, Any] | UserPayload, max_kb: int) -> bool:
    # ref §6: `external_size(map) > kb*1000 + 500`.
    return payload_size(payload) > max_kb * 1000 + 500
