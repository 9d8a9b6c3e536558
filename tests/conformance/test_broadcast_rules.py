"""§9 "Broadcast rules of §3: verbatim relay, self, ack semantics incl. silent drops,
payload limit, separate private namespace"."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from devstack.realtime import RealtimeLimits, RealtimeServer

from .conftest import TEST_TIME_SCALE, TEST_TIMINGS
from .policies import TopicPolicy
from .wsclient import RawClient

pytestmark = pytest.mark.integration

SILENCE_S = 0.2


def _msg(**extra: object) -> dict[str, object]:
    return {"type": "broadcast", "event": "tok", "payload": {"seq": 1}, **extra}


@pytest.fixture
async def small_server() -> AsyncIterator[RealtimeServer]:
    policy = TopicPolicy(readable={"room1"}, writable={"room1"})
    srv = RealtimeServer(
        time_scale=TEST_TIME_SCALE,
        limits=RealtimeLimits(max_payload_size_in_kb=1),
        authorizer=policy,
        timings=TEST_TIMINGS,
    )
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


async def test_relay_is_verbatim(server: RealtimeServer, anon_key: str) -> None:
    tx, rx = [await RawClient.connect(server.url, anon_key) for _ in range(2)]
    join_ref, _ = await tx.join("room1")
    await rx.join("room1")
    odd = {"event": "tok", "payload": [1, "two"], "nested": {"x": None}, "no_type": True}
    await tx.send("realtime:room1", "broadcast", odd, ref="1", join_ref=join_ref)
    assert (await rx.recv())["payload"] == odd


@pytest.mark.parametrize("self_", [False, True])
async def test_self(server: RealtimeServer, anon_key: str, self_: bool) -> None:
    client = await RawClient.connect(server.url, anon_key)
    join_ref, _ = await client.join("room1", self_=self_)
    await client.send("realtime:room1", "broadcast", _msg(), ref="1", join_ref=join_ref)
    if self_:
        assert (await client.recv())["payload"] == _msg()
    else:
        await client.expect_silence(SILENCE_S)


async def test_no_ack_means_no_reply(server: RealtimeServer, anon_key: str) -> None:
    tx, rx = [await RawClient.connect(server.url, anon_key) for _ in range(2)]
    join_ref, _ = await tx.join("room1", ack=False)
    await rx.join("room1")
    await tx.send("realtime:room1", "broadcast", _msg(), ref="1", join_ref=join_ref)
    assert (await rx.recv())["payload"] == _msg()
    await tx.expect_silence(SILENCE_S)


async def test_ack_is_ok_empty_object(server: RealtimeServer, anon_key: str) -> None:
    tx = await RawClient.connect(server.url, anon_key)
    join_ref, _ = await tx.join("room1", ack=True)
    await tx.send("realtime:room1", "broadcast", _msg(), ref="1", join_ref=join_ref)
    assert (await tx.recv())["payload"] == {"status": "ok", "response": {}}


async def test_ack_strings_are_booleans(server: RealtimeServer, anon_key: str) -> None:
    tx = await RawClient.connect(server.url, anon_key)
    await tx.send(
        "realtime:room1",
        "phx_join",
        {"config": {"broadcast": {"ack": "true"}}},
        ref="1",
        join_ref="1",
    )
    await tx.recv()
    await tx.send("realtime:room1", "broadcast", _msg(), ref="2", join_ref="1")
    assert (await tx.recv())["payload"] == {"status": "ok", "response": {}}


async def test_oversize_with_ack_is_payload_size_exceeded(
    small_server: RealtimeServer, anon_key: str
) -> None:
    tx, rx = [await RawClient.connect(small_server.url, anon_key) for _ in range(2)]
    join_ref, _ = await tx.join("room1", ack=True)
    await rx.join("room1")
    big = _msg(payload={"pad": "x" * 1600})  # > 1 KB * 1000 + 500
    await tx.send("realtime:room1", "broadcast", big, ref="1", join_ref=join_ref)
    assert (await tx.recv())["payload"] == {"status": "error", "response": "payload_size_exceeded"}
    await rx.expect_silence(SILENCE_S)
    fits = _msg(payload={"pad": "x" * 1400})
    await tx.send("realtime:room1", "broadcast", fits, ref="2", join_ref=join_ref)
    assert (await tx.recv())["payload"]["status"] == "ok"
    assert (await rx.recv())["payload"] == fits


async def test_oversize_without_ack_is_dropped(small_server: RealtimeServer, anon_key: str) -> None:
    tx, rx = [await RawClient.connect(small_server.url, anon_key) for _ in range(2)]
    join_ref, _ = await tx.join("room1")
    await rx.join("room1")
    big = _msg(payload={"pad": "x" * 1600})
    await tx.send("realtime:room1", "broadcast", big, ref="1", join_ref=join_ref)
    await tx.expect_silence(SILENCE_S)
    await rx.expect_silence(SILENCE_S)


async def test_private_and_public_namespaces_are_apart(
    small_server: RealtimeServer, anon_key: str
) -> None:
    private_tx, private_rx, public_rx = [
        await RawClient.connect(small_server.url, anon_key) for _ in range(3)
    ]
    join_ref, reply = await private_tx.join("room1", private=True, ack=True)
    assert reply["payload"]["status"] == "ok"
    await private_rx.join("room1", private=True)
    await public_rx.join("room1", private=False)
    await private_tx.send("realtime:room1", "broadcast", _msg(), ref="1", join_ref=join_ref)
    assert (await private_tx.recv())["payload"]["status"] == "ok"
    assert (await private_rx.recv())["payload"] == _msg()
    await public_rx.expect_silence(SILENCE_S)


async def test_unauthorized_private_send_is_dropped_even_with_ack(
    small_server: RealtimeServer, anon_key: str
) -> None:
    policy = small_server.authorizer
    assert isinstance(policy, TopicPolicy)
    policy.writable.clear()
    tx, rx = [await RawClient.connect(small_server.url, anon_key) for _ in range(2)]
    join_ref, _ = await tx.join("room1", private=True, ack=True)
    await rx.join("room1", private=True)
    for ref in ("1", "2", "3"):
        await tx.send("realtime:room1", "broadcast", _msg(), ref=ref, join_ref=join_ref)
    await tx.expect_silence(SILENCE_S)
    await rx.expect_silence(SILENCE_S)
    assert policy.writes == 1  # checked once, lazily, then cached
    assert small_server.stats.unauthorized_drops == 3
