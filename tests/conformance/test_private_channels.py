"""§9 "Private channels: pluggable policy standing in for RLS (read at join/access_token,
write lazily on first send, cached)" — here with the real thing: the project's RLS
policies on `realtime.messages` in a real Postgres decide (§5)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import psycopg
import pytest
from realtime import AsyncRealtimeClient, RealtimeSubscribeStates
from realtime.types import RealtimeAcknowledgementStatus as Ack

from devstack.jwt import user_token
from devstack.realtime import RealtimeServer

from .conftest import TEST_TIME_SCALE, TEST_TIMINGS
from .wsclient import RawClient

pytestmark = pytest.mark.integration

WRITER = "00000000-0000-4000-8000-00000000000a"
READER = "00000000-0000-4000-8000-00000000000b"
ROOM = "rtconf-room"
SILENCE_S = 0.3

POLICIES = f"""
CREATE POLICY rtconf_read ON realtime.messages FOR SELECT TO authenticated
  USING ((SELECT realtime.topic()) = '{ROOM}' AND extension = 'broadcast');
CREATE POLICY rtconf_write ON realtime.messages FOR INSERT TO authenticated
  WITH CHECK ((SELECT realtime.topic()) = '{ROOM}' AND extension = 'broadcast'
              AND auth.uid() = '{WRITER}'::uuid);
"""

MSG = {"type": "broadcast", "event": "tok", "payload": {"n": 1}}


def _sql(url: str, statement: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statement)


@pytest.fixture
async def rls_server(database_url: str) -> AsyncIterator[RealtimeServer]:
    _sql(database_url, POLICIES)
    srv = RealtimeServer(
        time_scale=TEST_TIME_SCALE, timings=TEST_TIMINGS, database_url=database_url
    )
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


async def _joined(
    srv: RealtimeServer, key: str, user: str, sub: str = ROOM
) -> tuple[RawClient, str]:
    client = await RawClient.connect(srv.url, key)
    join_ref, reply = await client.join(sub, private=True, ack=True, access_token=user_token(user))
    assert reply["payload"]["status"] == "ok", reply
    return client, join_ref


async def test_join_is_decided_by_the_select_policy(
    rls_server: RealtimeServer, anon_key: str
) -> None:
    await _joined(rls_server, anon_key, READER)
    client = await RawClient.connect(rls_server.url, anon_key)
    _, reply = await client.join("rtconf-secret", private=True, access_token=user_token(READER))
    assert reply["payload"] == {
        "status": "error",
        "response": {
            "reason": "Unauthorized: You do not have permissions to read from this Channel"
            " topic: rtconf-secret"
        },
    }
    anon = await RawClient.connect(rls_server.url, anon_key)
    _, reply = await anon.join(ROOM, private=True)  # the anon role has no policy
    assert reply["payload"]["status"] == "error"
    assert reply["payload"]["response"]["reason"].startswith("Unauthorized: ")


async def test_probe_rows_never_persist(
    rls_server: RealtimeServer, anon_key: str, database_url: str
) -> None:
    writer, join_ref = await _joined(rls_server, anon_key, WRITER)
    await writer.send(f"realtime:{ROOM}", "broadcast", MSG, ref="1", join_ref=join_ref)
    await writer.recv()
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM realtime.messages").fetchone()
    assert row == (0,)


async def test_write_policy_decides_sends(rls_server: RealtimeServer, anon_key: str) -> None:
    writer, w_ref = await _joined(rls_server, anon_key, WRITER)
    reader, r_ref = await _joined(rls_server, anon_key, READER)
    await writer.send(f"realtime:{ROOM}", "broadcast", MSG, ref="1", join_ref=w_ref)
    assert (await writer.recv())["payload"] == {"status": "ok", "response": {}}
    assert (await reader.recv())["payload"] == MSG
    await reader.send(f"realtime:{ROOM}", "broadcast", MSG, ref="2", join_ref=r_ref)
    await reader.expect_silence(SILENCE_S)  # no reply even with ack (§3)
    await writer.expect_silence(SILENCE_S)  # and not delivered
    assert rls_server.stats.unauthorized_drops == 1


async def test_write_check_is_cached_until_access_token_refresh(
    rls_server: RealtimeServer, anon_key: str, database_url: str
) -> None:
    writer, w_ref = await _joined(rls_server, anon_key, WRITER)
    topic = f"realtime:{ROOM}"
    await writer.send(topic, "broadcast", MSG, ref="1", join_ref=w_ref)
    assert (await writer.recv())["payload"]["status"] == "ok"
    _sql(database_url, "DROP POLICY rtconf_write ON realtime.messages")
    await writer.send(topic, "broadcast", MSG, ref="2", join_ref=w_ref)
    assert (await writer.recv())["payload"]["status"] == "ok"  # cached
    fresh = user_token(WRITER, ttl_s=7200)
    await writer.send(topic, "access_token", {"access_token": fresh}, ref="3", join_ref=w_ref)
    await writer.send(topic, "broadcast", MSG, ref="4", join_ref=w_ref)
    await writer.expect_silence(SILENCE_S)  # re-checked after the refresh: denied


async def test_access_token_refresh_rechecks_read(
    rls_server: RealtimeServer, anon_key: str, database_url: str
) -> None:
    reader, r_ref = await _joined(rls_server, anon_key, READER)
    _sql(database_url, "DROP POLICY rtconf_read ON realtime.messages")
    fresh = user_token(READER, ttl_s=7200)
    await reader.send(
        f"realtime:{ROOM}", "access_token", {"access_token": fresh}, ref="3", join_ref=r_ref
    )
    system = await reader.recv()
    assert system["payload"] == {
        "message": f"You no longer have permission to read from this Channel topic: {ROOM}",
        "status": "error",
        "extension": "system",
        "channel": ROOM,
    }
    assert (await reader.recv())["event"] == "phx_close"


async def test_rest_private_uses_the_write_policy(
    rls_server: RealtimeServer, anon_key: str
) -> None:
    reader, _ = await _joined(rls_server, anon_key, READER)
    url = f"{rls_server.url}/api/broadcast/{ROOM}/events/tok?private=true"
    async with aiohttp.ClientSession() as http:
        denied = await http.post(
            url,
            json={},
            headers={"apikey": anon_key, "Authorization": f"Bearer {user_token(READER)}"},
        )
        allowed = await http.post(
            url,
            json={"n": 2},
            headers={"apikey": anon_key, "Authorization": f"Bearer {user_token(WRITER)}"},
        )
    assert (denied.status, allowed.status) == (403, 202)
    got = await reader.recv()
    assert got["payload"] == {"event": "tok", "payload": {"n": 2}, "type": "broadcast"}


async def test_realtime_py_private_channel_with_ack(
    rls_server: RealtimeServer, anon_key: str
) -> None:
    params: Any = {
        "config": {
            "broadcast": {"ack": True, "self": False},
            "presence": {"key": "", "enabled": False},
            "private": True,
        }
    }
    sender = AsyncRealtimeClient(rls_server.url + "/realtime/v1", token=anon_key)
    receiver = AsyncRealtimeClient(rls_server.url + "/realtime/v1", token=anon_key)
    try:
        await sender.set_auth(user_token(WRITER))
        await receiver.set_auth(user_token(READER))
        got: asyncio.Queue[Any] = asyncio.Queue()
        rx = receiver.channel(ROOM, params).on_broadcast("tok", got.put_nowait)
        states: list[RealtimeSubscribeStates] = []
        await rx.subscribe(lambda s, e: states.append(s))
        tx = sender.channel(ROOM, params)
        await tx.subscribe(lambda s, e: states.append(s))
        assert states == [RealtimeSubscribeStates.SUBSCRIBED] * 2
        acked: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        push = await tx.push("broadcast", MSG)
        push.receive(Ack.Ok, acked.set_result)
        await asyncio.wait_for(acked, 5)
        message = await asyncio.wait_for(got.get(), 5)
        assert message["payload"] == {"n": 1}
        # The reader may not write: its acked push is dropped silently and times out.
        timed_out: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        denied = await rx.push("broadcast", MSG, timeout=1)
        denied.receive(Ack.Timeout, lambda: timed_out.set_result(None))
        denied.receive(Ack.Ok, lambda r: timed_out.set_exception(AssertionError("acked")))
        await asyncio.wait_for(timed_out, 5)
    finally:
        await sender.close()
        await receiver.close()


def _backends(url: str) -> set[int]:
    """The authorizer's backends (the real pool's application_name)."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'realtime_connect'"
            " AND datname = current_database()"
        ).fetchall()
    return {int(r[0]) for r in rows}


async def test_checks_share_one_connection_and_survive_its_loss(
    rls_server: RealtimeServer, anon_key: str, database_url: str
) -> None:
    # rt: the `realtime_connect` pool has `db_pool` (1) connections: checks queue for
    # one long-lived backend instead of forking a backend each.
    clients = [(await _joined(rls_server, anon_key, READER))[0] for _ in range(5)]
    opened = _backends(database_url)
    assert len(opened) == 1, opened
    # Its backend dies (a restart, an admin): the next check fails cleanly, the one
    # after reconnects.
    _sql(database_url, f"SELECT pg_terminate_backend({opened.pop()})")
    client = await RawClient.connect(rls_server.url, anon_key)
    _, reply = await client.join(ROOM, private=True, access_token=user_token(READER))
    assert reply["payload"]["status"] == "error", reply
    assert "UnableToConnectToProject" in reply["payload"]["response"]["reason"]
    clients.append((await _joined(rls_server, anon_key, READER))[0])
    assert len(_backends(database_url) - opened) == 1
    for c in [*clients, client]:
        await c.close()
