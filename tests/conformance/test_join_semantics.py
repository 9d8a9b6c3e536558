"""§9 "Join semantics and reason strings of §2; duplicate join ⇒ old phx_close then new
join; phx_leave ⇒ ok + phx_close; "unmatched topic" for unjoined topics; accept stale
join_ref"."""

from __future__ import annotations

import asyncio
import time

import pytest

from devstack.jwt import sign
from devstack.realtime import RealtimeLimits, RealtimeServer
from devstack.realtime.limits import Timings

from .conftest import TEST_TIME_SCALE
from .wsclient import RawClient

pytestmark = pytest.mark.integration

NOW = int(time.time())


async def _reason(client: RawClient, sub: str, **kwargs: object) -> str:
    _, reply = await client.join(sub, **kwargs)  # type: ignore[arg-type]
    assert reply["event"] == "phx_reply" and reply["payload"]["status"] == "error", reply
    return str(reply["payload"]["response"]["reason"])


async def test_unmatched_topic(server: RealtimeServer, anon_key: str) -> None:
    client = await RawClient.connect(server.url, anon_key)
    await client.send("realtime:nowhere", "broadcast", {}, ref="1", join_ref="1")
    assert await client.recv() == {
        "topic": "realtime:nowhere",
        "event": "phx_reply",
        "payload": {"status": "error", "response": {"reason": "unmatched topic"}},
        "ref": "1",
    }
    await client.send("room1", "phx_join", {}, ref="2")
    reply = await client.recv()
    assert reply["payload"] == {"status": "error", "response": {"reason": "unmatched topic"}}


async def test_bare_prefix_needs_a_topic_name(server: RealtimeServer, anon_key: str) -> None:
    client = await RawClient.connect(server.url, anon_key)
    assert await _reason(client, "") == "TopicNameRequired: You must provide a topic name"


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (sign({"role": "anon", "exp": NOW - 30}), "InvalidJWTToken: Token has expired "),
        (sign({"role": "anon"}), "InvalidJWTToken: Fields `role` and `exp` are required in JWT"),
        ("eyJub3Q.a.jwt", "MalformedJWT: The token provided is not a valid JWT"),
        (
            sign({"role": "anon", "exp": NOW + 60}, "y" * 40),
            "JwtSignatureError: Failed to validate JWT signature",
        ),
    ],
)
async def test_join_token_reasons(
    server: RealtimeServer, anon_key: str, token: str, reason: str
) -> None:
    client = await RawClient.connect(server.url, anon_key)
    got = await _reason(client, "room1", access_token=token)
    assert got.startswith(reason)
    if "expired" in reason:
        assert got.endswith(" seconds ago")
        assert int(got.split()[-3]) >= 30


async def test_join_error_comes_after_the_channel_backoff(
    server: RealtimeServer, anon_key: str
) -> None:
    client = await RawClient.connect(server.url, anon_key)
    started = time.monotonic()
    await _reason(client, "")
    assert time.monotonic() - started >= 5.0 * TEST_TIME_SCALE * 0.9


async def test_duplicate_join_closes_the_old_channel_first(
    server: RealtimeServer, anon_key: str
) -> None:
    client = await RawClient.connect(server.url, anon_key)
    first_ref, _ = await client.join("room1")
    second_ref, close = await client.join("room1")
    assert close == {
        "topic": "realtime:room1",
        "event": "phx_close",
        "payload": {},
        "ref": first_ref,
    }
    reply = await client.recv()
    assert reply["event"] == "phx_reply" and reply["ref"] == second_ref
    assert reply["payload"]["status"] == "ok"


async def test_leave_replies_ok_then_closes(server: RealtimeServer, anon_key: str) -> None:
    client = await RawClient.connect(server.url, anon_key)
    join_ref, _ = await client.join("room1")
    await client.send("realtime:room1", "phx_leave", {}, ref="9", join_ref=join_ref)
    assert await client.recv() == {
        "topic": "realtime:room1",
        "event": "phx_reply",
        "payload": {"status": "ok", "response": {}},
        "ref": "9",
    }
    assert await client.recv() == {
        "topic": "realtime:room1",
        "event": "phx_close",
        "payload": {},
        "ref": join_ref,
    }
    await client.send("realtime:room1", "broadcast", {}, ref="10", join_ref=join_ref)
    assert (await client.recv())["payload"]["response"] == {"reason": "unmatched topic"}


@pytest.mark.parametrize("join_ref", ["stale-99", None])
async def test_stale_or_missing_join_ref_is_accepted(
    server: RealtimeServer, anon_key: str, join_ref: str | None
) -> None:
    client = await RawClient.connect(server.url, anon_key)
    await client.join("room1", ack=True)
    await client.send("realtime:room1", "broadcast", {"event": "e"}, ref="5", join_ref=join_ref)
    assert (await client.recv())["payload"] == {"status": "ok", "response": {}}


async def _limited(**limits: int | bool) -> RealtimeServer:
    srv = RealtimeServer(
        time_scale=TEST_TIME_SCALE,
        limits=RealtimeLimits(**limits),  # type: ignore[arg-type]
        timings=Timings(rate_tick_s=10_000, idle_timeout_s=600.0),  # ticks by hand
    )
    await srv.start()
    return srv


async def test_channel_cap_per_socket(anon_key: str) -> None:
    srv = await _limited(max_channels_per_client=2)
    try:
        client = await RawClient.connect(srv.url, anon_key)
        await client.join("a")
        await client.join("b")
        assert await _reason(client, "c") == "ChannelRateLimitReached: Too many channels"
        await client.send("phoenix", "heartbeat", {}, ref="h")
        assert (await client.recv())["ref"] == "h"  # the socket stays
    finally:
        await srv.stop()


async def test_join_rate_reason_then_close_1001(anon_key: str) -> None:
    srv = await _limited(max_joins_per_second=1)
    try:
        client = await RawClient.connect(srv.url, anon_key)
        for i in range(5):
            await client.join(f"r{i}")
        srv.tick()  # 5 joins / 1 bucket / 5 s = 1.0/s >= 1
        reason = await _reason(client, "late")
        assert reason == "ClientJoinRateLimitReached: Too many joins per second"
        await asyncio.wait_for(client.ws.wait_closed(), 5)
        assert client.ws.close_code == 1001
        # ...and the upgrade itself is refused while the rate stays high.
        with pytest.raises(Exception) as refused:
            await RawClient.connect(srv.url, anon_key)
        assert "429" in str(refused.value)
    finally:
        await srv.stop()


async def test_concurrent_users_cap(anon_key: str) -> None:
    srv = await _limited(max_concurrent_users=1)
    try:
        first = await RawClient.connect(srv.url, anon_key)
        second = await RawClient.connect(srv.url, anon_key)  # no channel yet: not a user
        await first.join("room1")
        reason = await _reason(second, "room1")
        assert reason == "ConnectionRateLimitReached: Too many connected users"
        await second.send("phoenix", "heartbeat", {}, ref="h")
        assert (await second.recv())["ref"] == "h"  # the socket stays
        with pytest.raises(Exception) as refused:
            await RawClient.connect(srv.url, anon_key)
        assert "429" in str(refused.value)
    finally:
        await srv.stop()


async def test_private_only_tenant(anon_key: str) -> None:
    srv = await _limited(private_only=True)
    try:
        client = await RawClient.connect(srv.url, anon_key)
        reason = await _reason(client, "room1")
        assert reason == "PrivateOnly: This project only allows private channels"
    finally:
        await srv.stop()


async def test_replay_is_refused_on_public_channels(server: RealtimeServer, anon_key: str) -> None:
    client = await RawClient.connect(server.url, anon_key)
    reason = await _reason(
        client, "room1", extra_config={"broadcast": {"replay": {"since": 0, "limit": 5}}}
    )
    assert reason == "UnableToReplayMessages: Replay is not allowed for public channels"


async def test_client_leaving_mid_join_leaves_nothing_behind(
    server: RealtimeServer, anon_key: str
) -> None:
    client = await RawClient.connect(server.url, anon_key)
    await client.send("realtime:secret", "phx_join", {"config": {"private": True}}, ref="1")
    await client.close()
    for _ in range(200):
        if not server.tenant().sockets and not server.tenant().subscribers:
            break
        await asyncio.sleep(0.02)
    assert not server.tenant().sockets and not server.tenant().subscribers
    other = await RawClient.connect(server.url, anon_key)
    _, reply = await other.join("room1")
    assert reply["payload"]["status"] == "ok"
