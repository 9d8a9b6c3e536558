"""§9 "realtime.send stand-in (private default true, payload.id, meta.id); optional
replay" (§5, §3)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from devstack.jwt import user_token
from devstack.realtime import RealtimeServer
from devstack.realtime.protocol import UserBroadcast, decode_user_broadcast

from .conftest import TEST_TIME_SCALE, TEST_TIMINGS
from .policies import TopicPolicy
from .wsclient import RawClient

pytestmark = pytest.mark.integration


@pytest.fixture
async def db_server(database_url: str) -> AsyncIterator[RealtimeServer]:
    srv = RealtimeServer(
        time_scale=TEST_TIME_SCALE,
        timings=TEST_TIMINGS,
        database_url=database_url,
        authorizer=TopicPolicy(readable={"room1"}, writable={"room1"}),
    )
    await srv.start()
    await asyncio.wait_for(srv.db_listener_ready.wait(), 10)
    try:
        yield srv
    finally:
        await srv.stop()


def _send(url: str, payload: dict[str, object], topic: str, *private: bool) -> None:
    args = ", %s" if private else ""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            f"SELECT realtime.send(%s::jsonb, 'tok', %s{args})",
            (json.dumps(payload), topic, *private),
        )


async def test_public_send_reaches_v1_and_v2_with_meta_id(
    db_server: RealtimeServer, anon_key: str, database_url: str
) -> None:
    v1 = await RawClient.connect(db_server.url, anon_key)
    v2 = await RawClient.connect(db_server.url, anon_key, vsn="2.0.0")
    await v1.join("room1")
    await v2.send("realtime:room1", "phx_join", {"config": {}}, ref="1", join_ref="1")
    await v2.recv()
    _send(database_url, {"n": 1}, "room1", False)
    got = await v1.recv()
    payload = got["payload"]
    row_id = payload["meta"]["id"]
    assert payload == {
        "event": "tok",
        "payload": {"n": 1, "id": row_id},  # realtime.send adds the id to the payload
        "type": "broadcast",
        "meta": {"id": row_id},
    }
    raw = await v2.recv_raw()
    assert isinstance(raw, bytes)
    topic, event, meta, encoding, data = decode_user_broadcast(raw)
    assert (topic, event, meta, encoding) == ("realtime:room1", "tok", {"id": row_id}, "json")
    assert json.loads(data) == {"n": 1, "id": row_id}
    assert db_server.stats.db_messages == 1


async def test_private_is_the_default(
    db_server: RealtimeServer, anon_key: str, database_url: str
) -> None:
    public = await RawClient.connect(db_server.url, anon_key)
    private = await RawClient.connect(db_server.url, anon_key)
    await public.join("room1")
    _, reply = await private.join("room1", private=True, access_token=user_token("u"))
    assert reply["payload"]["status"] == "ok"
    _send(database_url, {"n": 2, "id": "mine"}, "room1")
    got = await private.recv()
    assert got["payload"]["payload"] == {"n": 2, "id": "mine"}
    await public.expect_silence(0.3)


async def test_rolled_back_rows_are_never_sent(
    db_server: RealtimeServer, anon_key: str, database_url: str
) -> None:
    client = await RawClient.connect(db_server.url, anon_key)
    await client.join("room1")
    with psycopg.connect(database_url) as conn:
        conn.execute("SELECT realtime.send('{}'::jsonb, 'tok', 'room1', false)")
        conn.rollback()
    await client.expect_silence(0.3)


async def _join_with_replay(srv: RealtimeServer, key: str, replay: object) -> tuple[RawClient, Any]:
    client = await RawClient.connect(srv.url, key)
    _, reply = await client.join(
        "room1",
        private=True,
        access_token=user_token("u"),
        extra_config={"broadcast": {"ack": False, "self": False, "replay": replay}},
    )
    return client, reply


async def test_replay_pushes_stored_rows_oldest_first_after_the_reply(
    db_server: RealtimeServer, anon_key: str, database_url: str
) -> None:
    since = int(time.time() * 1000) - 60_000
    for n in (1, 2, 3):
        _send(database_url, {"n": n}, "room1")
    _send(database_url, {"n": 99}, "room1", False)  # public rows are not replayable
    client, reply = await _join_with_replay(db_server, anon_key, {"since": since, "limit": 2})
    assert reply["payload"]["status"] == "ok"
    first, second = await client.recv(), await client.recv()
    assert [first["payload"]["payload"]["n"], second["payload"]["payload"]["n"]] == [2, 3]
    assert first["payload"]["meta"]["replayed"] is True
    await client.expect_silence(0.2)
    # A live copy of a replayed message is suppressed (ref §3).
    replayed_id = second["payload"]["meta"]["id"]
    db_server.publish_db("room1", True, UserBroadcast("tok", "json", b"{}", {"id": replayed_id}))
    await client.expect_silence(0.2)
    db_server.publish_db("room1", True, UserBroadcast("tok", "json", b"{}", {"id": "new"}))
    assert (await client.recv())["payload"]["meta"] == {"id": "new"}


async def test_replay_since_in_the_future_replays_nothing(
    db_server: RealtimeServer, anon_key: str, database_url: str
) -> None:
    _send(database_url, {"n": 1}, "room1")
    future = int(time.time() * 1000) + 3_600_000
    client, reply = await _join_with_replay(db_server, anon_key, {"since": future})
    assert reply["payload"]["status"] == "ok"
    await client.expect_silence(0.2)


async def test_replay_params_must_be_valid(db_server: RealtimeServer, anon_key: str) -> None:
    _, reply = await _join_with_replay(db_server, anon_key, {"since": "yesterday"})
    assert reply["payload"]["response"] == {
        "reason": "UnableToReplayMessages: Replay params are not valid"
    }
