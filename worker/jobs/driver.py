"""The Postgres driver under `PostgresJobRepository`: psycopg 3 async, a few
connections, LISTEN on its own connection, and the one place psycopg's
exceptions are translated into ours.

Queue statements are single short statements in autocommit mode, so a small
fixed set of connections shared through a queue is all the pooling needed. A
connection that broke is dropped and replaced on next use.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import psycopg
from loguru import logger
from psycopg import sql
from psycopg.rows import DictRow, dict_row

from worker.errors import QueueError

Connection = psycopg.AsyncConnection[DictRow]

CONNECT_TIMEOUT_S = 10
# A LISTEN connection that heard nothing for this long is pinged: a half-open TCP
# connection would otherwise wait forever (polling still covers the gap).
LISTEN_PING_INTERVAL_S = 30.0
LISTEN_RETRY_INITIAL_S = 0.5
LISTEN_RETRY_CAP_S = 15.0


@contextmanager
def wrap_exceptions(job_id: str | None = None) -> Iterator[None]:
    """Translate psycopg errors into `QueueError`, once, at the edge."""
    try:
        yield
    except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
        raise QueueError(f"queue database unavailable: {exc}", job_id=job_id) from exc
    except psycopg.Error as exc:
        error = QueueError(f"queue query failed ({exc.sqlstate}): {exc}", job_id=job_id)
        error.retryable = False
        raise error from exc


class PsycopgDriver:
    """A fixed set of autocommit connections to one database, plus LISTEN."""

    def __init__(self, url: str, *, pool_size: int = 4) -> None:
        self._url = url
        self._idle: asyncio.Queue[Connection | None] = asyncio.Queue()
        for _ in range(pool_size):
            self._idle.put_nowait(None)  # connected lazily
        self._all: set[Connection] = set()
        self._closed = False

    async def _connect(self) -> Connection:
        conn = await psycopg.AsyncConnection.connect(
            self._url, autocommit=True, row_factory=dict_row, connect_timeout=CONNECT_TIMEOUT_S
        )
        self._all.add(conn)
        return conn

    async def check(self) -> None:
        """Fail fast at start-up when the database cannot be reached."""
        await self.fetch_one("SELECT 1 AS ok", {})

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """Borrow a connection (autocommit; use `conn.transaction()` for more)."""
        if self._closed:
            raise QueueError("queue driver is closed")
        conn = await self._idle.get()
        try:
            with wrap_exceptions():
                if conn is None or conn.closed:
                    conn = await self._connect()
                yield conn
        finally:
            if conn is not None and (conn.closed or conn.broken):
                self._all.discard(conn)
                await conn.close()
                conn = None
            self._idle.put_nowait(conn)

    async def fetch_all(self, query: str, params: dict[str, Any]) -> list[DictRow]:
        async with self.connection() as conn:
            cursor = await conn.execute(query.encode(), params)
            return await cursor.fetchall()

    async def fetch_one(self, query: str, params: dict[str, Any]) -> DictRow | None:
        async with self.connection() as conn:
            cursor = await conn.execute(query.encode(), params)
            return await cursor.fetchone()

    async def listen(
        self,
        channel: str,
        on_payload: Callable[[str], None],
        on_ready: Callable[[bool], None] | None = None,
    ) -> None:
        """LISTEN on `channel` until cancelled, reconnecting with backoff."""
        log = logger.bind(event="queue_listen", channel=channel)
        delay = LISTEN_RETRY_INITIAL_S
        while True:
            try:
                await self._listen_once(channel, on_payload, on_ready)
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                if on_ready:
                    on_ready(False)
                log.warning("LISTEN connection lost ({}); retrying in {:.1f}s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, LISTEN_RETRY_CAP_S)

    async def _listen_once(
        self,
        channel: str,
        on_payload: Callable[[str], None],
        on_ready: Callable[[bool], None] | None,
    ) -> None:
        async with await psycopg.AsyncConnection.connect(
            self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S
        ) as conn:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            if on_ready:
                on_ready(True)
            logger.bind(event="queue_listen", channel=channel).debug("listening")
            while True:
                async for notify in conn.notifies(timeout=LISTEN_PING_INTERVAL_S):
                    on_payload(notify.payload)
                await conn.execute("SELECT 1")

    async def close(self) -> None:
        self._closed = True
        for conn in list(self._all):
            await conn.close()
        self._all.clear()
