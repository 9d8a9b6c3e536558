"""§9 "Per-socket strict ordering; a join blocks later frames until replied (error delay
configurable, real 5 s)"."""

from __future__ import annotations

import time

import pytest

from devstack.realtime import RealtimeServer

from .conftest import TEST_TIME_SCALE
from .wsclient import RawClient

pytestmark = pytest.mark.integration


async def test_one_sockets_sends_arrive_in_order(server: RealtimeServer, anon_key: str) -> None:
    tx = await RawClient.connect(server.url, anon_key)
    rx = await RawClient.connect(server.url, anon_key)
    join_ref, _ = await tx.join("room1")
    await rx.join("room1")
    for seq in range(200):
        payload = {"type": "broadcast", "event": "tok", "payload": {"seq": seq}}
        await tx.send("realtime:room1", "broadcast", payload, ref=str(seq), join_ref=join_ref)
    seqs = [(await rx.recv())["payload"]["payload"]["seq"] for _ in range(200)]
    assert seqs == list(range(200))


async def test_failed_join_blocks_the_socket_for_the_backoff(
    server: RealtimeServer, anon_key: str
) -> None:
    client = await RawClient.connect(server.url, anon_key)
    started = time.monotonic()
    # Private join without a database: refused after CHANNEL_ERROR_BACKOFF.
    await client.send(
        "realtime:secret",
        "phx_join",
        {"config": {"private": True}},
        ref="1",
        join_ref="1",
    )
    await client.send("phoenix", "heartbeat", {}, ref="2")
    first = await client.recv()
    elapsed = time.monotonic() - started
    second = await client.recv()
    assert first["ref"] == "1" and first["payload"]["status"] == "error"
    assert second == {
        "topic": "phoenix",
        "event": "phx_reply",
        "payload": {"status": "ok", "response": {}},
        "ref": "2",
    }
    assert elapsed >= 5.0 * TEST_TIME_SCALE * 0.9


async def test_pushes_from_others_wait_for_the_join_reply(
    server: RealtimeServer, anon_key: str
) -> None:
    rx = await RawClient.connect(server.url, anon_key)
    tx = await RawClient.connect(server.url, anon_key)
    await rx.join("room1")
    join_ref, _ = await tx.join("room1", ack=True)
    await rx.send("realtime:secret", "phx_join", {"config": {"private": True}}, ref="5")
    payload = {"type": "broadcast", "event": "tok", "payload": {}}
    await tx.send("realtime:room1", "broadcast", payload, ref="3", join_ref=join_ref)
    await tx.recv()  # the ack: the message is queued to rx, which is stalled in its join
    first = await rx.recv()
    second = await rx.recv()
    assert (first["event"], first["ref"]) == ("phx_reply", "5")
    assert second["event"] == "broadcast"
