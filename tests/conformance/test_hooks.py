"""§9 "Test hooks: time scaling; forced close codes 1000/1001/1011/1012; stalls (no
heartbeat reply, no pong) to exercise realtime-py's give-up-after-5 and lost-send paths",
plus the acked-push faults and "Server requested disconnect" (§2)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
import websockets
from realtime import AsyncRealtimeClient

from devstack.realtime import AckOutcome, RealtimeServer

from .conftest import TEST_TIME_SCALE
from .wsclient import RawClient

pytestmark = pytest.mark.integration

MSG = {"type": "broadcast", "event": "tok", "payload": {}}
SILENCE_S = 0.2


@pytest.mark.parametrize("code", [1000, 1001, 1011, 1012])
async def test_forced_close_codes(server: RealtimeServer, anon_key: str, code: int) -> None:
    client = await RawClient.connect(server.url, anon_key)
    await client.join("room1")
    assert await server.faults.close_sockets(code) == 1
    await asyncio.wait_for(client.ws.wait_closed(), 5)
    assert client.ws.close_code == code


async def test_server_requested_disconnect(server: RealtimeServer, anon_key: str) -> None:
    client = await RawClient.connect(server.url, anon_key)
    await client.join("a")
    await client.join("b")
    await server.faults.server_requested_disconnect()
    seen = [await client.recv(), await client.recv()]
    for frame, topic in zip(seen, ["realtime:a", "realtime:b"], strict=True):
        assert frame == {
            "topic": topic,
            "event": "system",
            "payload": {
                "extension": "system",
                "status": "ok",
                "message": "Server requested disconnect",
            },
            "ref": None,
        }
    await asyncio.wait_for(client.ws.wait_closed(), 5)
    assert client.ws.close_code == 1012


async def test_stall_heartbeat(server: RealtimeServer, anon_key: str) -> None:
    client = await RawClient.connect(server.url, anon_key)
    join_ref, _ = await client.join("room1", ack=True)
    server.faults.stall_heartbeat = True
    await client.send("phoenix", "heartbeat", {}, ref="hb")
    await client.send("realtime:room1", "broadcast", MSG, ref="b", join_ref=join_ref)
    assert (await client.recv())["ref"] == "b"  # the channel still works
    await client.expect_silence(SILENCE_S)
    server.faults.clear()
    await client.send("phoenix", "heartbeat", {}, ref="hb2")
    assert (await client.recv())["ref"] == "hb2"


async def test_stall_pong_gets_the_client_to_close_1011(
    server: RealtimeServer, anon_key: str
) -> None:
    server.faults.stall_pong = True
    client = await RawClient.connect(server.url, anon_key, ping_interval=0.1, ping_timeout=0.2)
    await asyncio.wait_for(client.ws.wait_closed(), 5)
    # websockets' keepalive gives up and fails the connection with 1011 (§8).
    assert client.ws.protocol.close_sent is not None
    assert client.ws.protocol.close_sent.code == 1011


async def test_pong_is_answered_normally(server: RealtimeServer, anon_key: str) -> None:
    client = await RawClient.connect(server.url, anon_key)
    latency = await asyncio.wait_for(await client.ws.ping(), 5)
    assert latency >= 0


async def _acked_pair(server: RealtimeServer, key: str) -> tuple[RawClient, str, RawClient]:
    tx = await RawClient.connect(server.url, key)
    rx = await RawClient.connect(server.url, key)
    join_ref, _ = await tx.join("room1", ack=True)
    await rx.join("room1")
    return tx, join_ref, rx


async def test_scripted_ack_outcomes(server: RealtimeServer, anon_key: str) -> None:
    tx, join_ref, rx = await _acked_pair(server, anon_key)
    server.faults.ack_delay_s = 1.0
    server.faults.script_acks("reject", "drop", "lose_reply", AckOutcome.DELAY, "ok")

    async def send(seq: int) -> None:
        payload = {**MSG, "payload": {"seq": seq}}
        await tx.send("realtime:room1", "broadcast", payload, ref=str(seq), join_ref=join_ref)

    await send(0)  # reject: error reply, not delivered
    reply = await tx.recv()
    assert reply["payload"] == {"status": "error", "response": server.faults.reject_response}
    await send(1)  # drop: nothing at all
    await send(2)  # lose_reply: delivered, no reply
    assert (await rx.recv())["payload"]["payload"] == {"seq": 2}
    started = time.monotonic()
    await send(3)  # delay: delivered now, replied later
    assert (await rx.recv())["payload"]["payload"] == {"seq": 3}
    await send(4)  # ok
    assert (await rx.recv())["payload"]["payload"] == {"seq": 4}
    first, second = await tx.recv(), await tx.recv()
    assert (first["ref"], second["ref"]) == ("4", "3")
    assert time.monotonic() - started >= 0.9
    await rx.expect_silence(SILENCE_S)
    assert server.faults.outcomes_applied[AckOutcome.DROP] == 1


async def test_ack_shares_are_seeded(server: RealtimeServer) -> None:
    server.faults.ack_shares(reject=0.25, drop=0.25, seed=7)
    outcomes = [server.faults.next_ack_outcome() for _ in range(400)]
    rejects = outcomes.count(AckOutcome.REJECT)
    drops = outcomes.count(AckOutcome.DROP)
    assert 60 < rejects < 140 and 60 < drops < 140
    server.faults.ack_shares(reject=0.25, drop=0.25, seed=7)
    assert [server.faults.next_ack_outcome() for _ in range(400)] == outcomes
    with pytest.raises(ValueError):
        server.faults.ack_shares(reject=0.7, drop=0.7)


async def test_faults_do_not_touch_unacked_channels(server: RealtimeServer, anon_key: str) -> None:
    tx = await RawClient.connect(server.url, anon_key)
    rx = await RawClient.connect(server.url, anon_key)
    join_ref, _ = await tx.join("room1", ack=False)
    await rx.join("room1")
    server.faults.script_acks("drop")
    await tx.send("realtime:room1", "broadcast", MSG, ref="1", join_ref=join_ref)
    assert (await rx.recv())["payload"] == MSG


async def test_refused_upgrades_make_realtime_py_give_up(
    server: RealtimeServer, anon_key: str
) -> None:
    server.faults.refuse_upgrades = -1
    client = AsyncRealtimeClient(
        server.url + "/realtime/v1", token=anon_key, max_retries=3, initial_backoff=0.01
    )
    with pytest.raises(websockets.exceptions.InvalidStatus):
        await asyncio.wait_for(client.connect(), 10)
    assert server.stats.upgrades_refused[500] == 3
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{server.url}/realtime/v1/websocket?apikey={anon_key}") as response,
    ):
        assert response.status == 500
        assert await response.json() == {"error": "Error connecting to Realtime"}
    server.faults.refuse_upgrades = 1
    with pytest.raises(websockets.exceptions.InvalidStatus):
        await RawClient.connect(server.url, anon_key)
    await (await RawClient.connect(server.url, anon_key)).close()  # only one was refused


# realtime-py 2.34.1 reads ConnectionClosed.code/.reason on abnormal closes, which
# websockets 15 deprecates; under `filterwarnings = error` its reconnect task dies silently.
async def test_realtime_py_reconnects_and_rejoins_after_1012(anon_key: str) -> None:
    server = RealtimeServer()  # real time: no idle close during the test
    await server.start()
    client = AsyncRealtimeClient(server.url + "/realtime/v1", token=anon_key, initial_backoff=0.05)
    try:
        channel = client.channel("room1")
        await channel.subscribe()  # bounded by realtime-py's own 10 s join timeout
        await server.faults.close_sockets(1012)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            if server.stats.joins == 2 and channel.is_joined:
                break
        assert server.stats.joins == 2 and channel.is_joined
    finally:
        await client.close()
        await server.stop()


def test_time_scale_scales_every_delay() -> None:
    srv = RealtimeServer(time_scale=TEST_TIME_SCALE)
    t = srv.timings
    assert (t.connect_error_backoff_s, t.channel_error_backoff_s) == pytest.approx((0.02, 0.05))
    assert (t.idle_timeout_s, t.rate_tick_s) == pytest.approx((0.6, 0.05))


async def test_exceed_message_rate(server: RealtimeServer, anon_key: str) -> None:
    tx = await RawClient.connect(server.url, anon_key)
    rx = await RawClient.connect(server.url, anon_key)
    join_ref, _ = await tx.join("room1")
    await rx.join("room1")
    server.faults.exceed_message_rate()
    assert server.tenant().events.triggered
    await tx.send("realtime:room1", "broadcast", MSG, ref="1", join_ref=join_ref)
    assert (await rx.recv())["event"] == "broadcast"
    assert (await rx.recv())["payload"]["message"] == "Too many messages per second"
    assert (await rx.recv())["event"] == "phx_close"
    async with (
        aiohttp.ClientSession(headers={"apikey": anon_key}) as http,
        http.post(server.url + "/api/broadcast/room1/events/e", json={}) as response,
    ):
        assert response.status == 429


async def test_shutdown_channels(server: RealtimeServer, anon_key: str) -> None:
    client = await RawClient.connect(server.url, anon_key)
    a_ref, _ = await client.join("a")
    await client.join("b")
    assert server.faults.shutdown_channels("Token has expired 1 seconds ago", sub_topic="a") == 1
    system = await client.recv()
    assert system["topic"] == "realtime:a"
    assert system["payload"]["message"] == "Token has expired 1 seconds ago"
    assert await client.recv() == {
        "topic": "realtime:a",
        "event": "phx_close",
        "payload": {},
        "ref": a_ref,
    }
    assert [list(s.channels) for s in server.tenant().sockets] == [["realtime:b"]]
