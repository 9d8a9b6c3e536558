"""§9 "Tenant-wide rate counters with Free defaults, 5 s ticks/60 s window, counting sends,
per-subscriber deliveries, REST and DB messages; the exact reactions of §6"."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from devstack.realtime import RealtimeLimits, RealtimeServer
from devstack.realtime.limits import Timings

from .conftest import TEST_TIME_SCALE
from .wsclient import RawClient

pytestmark = pytest.mark.integration

MSG = {"type": "broadcast", "event": "tok", "payload": {}}


@pytest.fixture
async def manual() -> AsyncIterator[RealtimeServer]:
    """A server whose rate counters tick only when the test says so."""
    srv = RealtimeServer(
        time_scale=TEST_TIME_SCALE,
        limits=RealtimeLimits(max_events_per_second=2),
        timings=Timings(rate_tick_s=10_000, idle_timeout_s=600.0),
    )
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


def test_free_plan_defaults() -> None:
    limits = RealtimeLimits()
    assert limits.max_events_per_second == 100
    assert limits.max_joins_per_second == 100
    assert limits.max_channels_per_client == 100
    assert limits.max_concurrent_users == 200
    assert limits.max_payload_size_in_kb == 256


async def test_one_send_to_n_subscribers_costs_1_plus_n(
    manual: RealtimeServer, anon_key: str
) -> None:
    tx = await RawClient.connect(manual.url, anon_key)
    rxs = [await RawClient.connect(manual.url, anon_key) for _ in range(3)]
    join_ref, _ = await tx.join("room1", ack=True)
    for rx in rxs:
        await rx.join("room1")
    await tx.send("realtime:room1", "broadcast", MSG, ref="1", join_ref=join_ref)
    await tx.recv()
    for rx in rxs:
        await rx.recv()
    assert manual.tenant().events.total == 4
    async with aiohttp.ClientSession(headers={"apikey": anon_key}) as http:
        await http.post(
            manual.url + "/api/broadcast",
            json={"messages": [{"topic": "room1", "event": "e", "payload": {}}]},
        )
    for rx in [*rxs, tx]:  # a REST message has no sender to exclude
        await rx.recv()
    assert manual.tenant().events.total == 4 + 1 + 4
    assert manual.stats.client_broadcasts == 1
    assert manual.stats.rest_messages == 1
    assert manual.stats.deliveries == 3 + 4


async def test_over_the_rate_receivers_get_system_error_and_close(
    manual: RealtimeServer, anon_key: str
) -> None:
    tx = await RawClient.connect(manual.url, anon_key)
    rx = await RawClient.connect(manual.url, anon_key)
    join_ref, _ = await tx.join("room1", ack=True)
    rx_join, _ = await rx.join("room1")
    for i in range(5):  # 5 sends + 5 deliveries = 10 events
        await tx.send("realtime:room1", "broadcast", MSG, ref=str(i), join_ref=join_ref)
        await tx.recv()
        await rx.recv()
    manual.tick()  # avg = 10 / 1 bucket / 5 s = 2.0 >= 2
    counter = manual.tenant().events
    assert counter.triggered and counter.avg == 2.0
    await tx.send("realtime:room1", "broadcast", MSG, ref="x", join_ref=join_ref)
    assert (await tx.recv())["payload"]["status"] == "ok"  # acceptance, not delivery
    # The frame is fastlaned to the socket; the channel then counts it and shuts down.
    assert (await rx.recv())["payload"] == MSG
    system = await rx.recv()
    assert system["event"] == "system"
    assert system["payload"] == {
        "message": "Too many messages per second",
        "status": "error",
        "extension": "system",
        "channel": "room1",
    }
    assert await rx.recv() == {
        "topic": "realtime:room1",
        "event": "phx_close",
        "payload": {},
        "ref": rx_join,
    }
    await rx.send("phoenix", "heartbeat", {}, ref="hb")
    assert (await rx.recv())["ref"] == "hb"  # the socket stays up
    assert manual.stats.rate_limit_shutdowns == 1
    assert counter.times_triggered == 1


def _counter_after(buckets: list[int], limit: float = 2) -> tuple[float, bool]:
    srv = RealtimeServer(limits=RealtimeLimits(max_events_per_second=int(limit)))
    counter = srv.tenant().events
    for n in buckets:
        counter.add(n)
        srv.tick()
    return counter.avg, counter.triggered


def test_window_is_twelve_five_second_buckets() -> None:
    assert _counter_after([10]) == (2.0, True)
    assert _counter_after([10, 0]) == (1.0, False)  # cleared below the limit
    avg, _ = _counter_after([60] + [0] * 11)
    assert avg == 1.0
    assert _counter_after([60] + [0] * 12) == (0.0, False)  # the 13th tick drops bucket 1


async def test_ticks_follow_time_scale(anon_key: str) -> None:
    srv = RealtimeServer(time_scale=TEST_TIME_SCALE, limits=RealtimeLimits(max_events_per_second=1))
    await srv.start()
    try:
        client = await RawClient.connect(srv.url, anon_key)
        join_ref, _ = await client.join("room1", ack=True)
        for i in range(10):
            await client.send("realtime:room1", "broadcast", MSG, ref=str(i), join_ref=join_ref)
            await client.recv()
        counter = srv.tenant().events
        for _ in range(100):
            if counter.buckets:
                break
            await asyncio.sleep(5.0 * TEST_TIME_SCALE)
        assert counter.buckets, "the ticker never ran"
    finally:
        await srv.stop()
