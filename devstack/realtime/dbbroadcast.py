"""The `realtime.send` path (ref §5 "Delivery"): committed broadcast rows become user
broadcasts with metadata `{"id": row id}`.

The real server follows logical replication; locally a trigger from the shim NOTIFYs the
row id on commit, and this listener reads the row and publishes it. Payload size and the
tenant's event limit apply: over either, the message is dropped (ref §5, §6).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import psycopg
from loguru import logger

from .protocol import UserBroadcast

log = logger.bind(event="realtime.db_broadcast")

CHANNEL = "devstack_realtime_broadcast"
RETRY_S = 1.0
_ROW = (
    "SELECT topic, event, payload, binary_payload, private FROM realtime.messages"
    " WHERE id = %s AND extension = 'broadcast'"
)

Publish = Callable[[str, bool, UserBroadcast], None]


def row_to_broadcast(
    row_id: str, event: str | None, payload: Any, binary: bytes | None
) -> UserBroadcast:
    meta = {"id": row_id}
    if binary is not None:
        return UserBroadcast(event or "", "binary", bytes(binary), meta)
    data = json.dumps(payload if payload is not None else {}, separators=(",", ":")).encode()
    return UserBroadcast(event or "", "json", data, meta)


async def listen(database_url: str, publish: Publish, ready: asyncio.Event) -> None:
    """LISTEN forever (reconnecting); each notified row is handed to `publish`."""
    while True:
        try:
            # notifies() holds its connection: rows are read on a second one.
            async with (
                await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn,
                await psycopg.AsyncConnection.connect(database_url, autocommit=True) as reader,
            ):
                await conn.execute(f"LISTEN {CHANNEL}")
                ready.set()
                async for notify in conn.notifies():
                    cur = await reader.execute(_ROW, (notify.payload,))
                    row = await cur.fetchone()
                    if row is None:
                        continue
                    topic, event, payload, binary, private = row
                    message = row_to_broadcast(notify.payload, event, payload, binary)
                    publish(str(topic), bool(private), message)
        except psycopg.Error as exc:
            log.warning("database broadcast listener failed, retrying: {}", exc)
            await asyncio.sleep(RETRY_S)


# ref §3 "Replay": limit clamped 1..25 (default 25); stored (realtime.send) private rows of
# the topic since `since` (epoch ms), oldest first. `inserted_at` is a local timestamp
# (DEFAULT now()), so `since` is converted in the session's time zone.
REPLAY_MAX = 25
_REPLAY = (
    "SELECT id, event, payload, binary_payload FROM ("
    " SELECT id, event, payload, binary_payload, inserted_at FROM realtime.messages"
    " WHERE topic = %s AND private IS TRUE AND extension = 'broadcast'"
    " AND inserted_at >= (to_timestamp(%s / 1000.0) AT TIME ZONE current_setting('TimeZone'))"
    " ORDER BY inserted_at DESC LIMIT %s) AS recent ORDER BY inserted_at"
)


def replay_limit(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        return REPLAY_MAX
    return max(1, min(REPLAY_MAX, value))


async def fetch_replay(
    database_url: str, sub: str, since_ms: int, limit: int
) -> list[UserBroadcast]:
    """Rows to replay to a joining private channel, as user broadcasts with
    `meta = {"id": id, "replayed": true}`."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(_REPLAY, (sub, since_ms, limit))
        rows = await cur.fetchall()
    replayed: list[UserBroadcast] = []
    for row_id, event, payload, binary in rows:
        message = row_to_broadcast(str(row_id), event, payload, binary)
        replayed.append(
            UserBroadcast(
                message.event, message.encoding, message.data, {"id": str(row_id), "replayed": True}
            )
        )
    return replayed
