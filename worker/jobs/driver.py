"""The Postgres driver under `PostgresJobRepository`: psycopg 3 async through a
psycopg_pool pool, LISTEN on its own connection, and the one place psycopg's
exceptions are translated into ours.

Every call has a deadline (`call_timeout_s`, at most the lease heartbeat interval):
a path that blackholes packets must turn into a `QueueError` in bounded time, not a
query that waits for ever while leases expire in the database. A connection whose
call timed out is in an unknown state (a statement may still be running on it), so
it is closed and the pool replaces it. libpq keepalives and `tcp_user_timeout` let
the kernel notice a dead path even on an idle connection, and the pool checks each
connection as it lends it (`check_connection`), so a connection that went stale
during a short cut is replaced inside the same call instead of failing a claim.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

import psycopg
from loguru import logger
from psycopg import sql
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from worker.backoff import backoff_delay
from worker.errors import QueueError

Connection = psycopg.AsyncConnection[DictRow]
T = TypeVar("T")

DEFAULT_CALL_TIMEOUT_S = 5.0
# A LISTEN connection that heard nothing for this long is pinged: a half-open TCP
# connection would otherwise wait forever (polling still covers the gap).
LISTEN_PING_INTERVAL_S = 30.0
RETRY_BASE_S = 0.5
RETRY_CAP_S = 15.0
# After severing a connection, how long its call may take to notice.
SEVER_WAIT_S = 0.5
# A pooled connection idle longer than this is checked before it is lent.
CHECK_AFTER_IDLE_S = 1.0


def connection_kwargs(call_timeout_s: float) -> dict[str, Any]:
    """libpq options of every connection: bounded connect, and a dead path noticed by
    the kernel within about the call deadline even while the connection is idle."""
    seconds = max(1, round(call_timeout_s))
    return {
        "autocommit": True,
        "connect_timeout": max(2, seconds),
        "keepalives": 1,
        "keepalives_idle": seconds,
        "keepalives_interval": max(1, seconds // 3),
        "keepalives_count": 3,
        "tcp_user_timeout": int(call_timeout_s * 1000),
    }


@contextmanager
def wrap_exceptions(job_id: str | None = None) -> Iterator[None]:
    """Translate psycopg errors into `QueueError`, once, at the edge."""
    try:
        yield
    except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout) as exc:
        raise QueueError(f"queue database unavailable: {exc}", job_id=job_id) from exc
    except psycopg.Error as exc:
        error = QueueError(f"queue query failed ({exc.sqlstate}): {exc}", job_id=job_id)
        error.retryable = False
        raise error from exc


class PsycopgDriver:
    """A small pool of autocommit connections to one database, plus LISTEN."""

    def __init__(
        self, url: str, *, pool_size: int = 4, call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S
    ) -> None:
        self._url = url
        self.call_timeout_s = call_timeout_s
        self._kwargs = connection_kwargs(call_timeout_s)
        self._pool = self._new_pool(url, pool_size, "llm-relay-queue")
        # Lease renewals have a connection of their own: they must never queue behind
        # checkpoint traffic for a pooled connection while the leases run out.
        self._lease_pool = self._new_pool(url, 1, "llm-relay-lease")
        self._answered: dict[int, float] = {}  # id(conn) -> when it last answered a call
        self._opened = False
        self._closed = False

    def _new_pool(self, url: str, size: int, name: str) -> AsyncConnectionPool[Connection]:
        call_timeout_s = self.call_timeout_s
        return AsyncConnectionPool(
            url,
            min_size=size,
            max_size=size,
            kwargs={**self._kwargs, "row_factory": dict_row},
            connection_class=psycopg.AsyncConnection[DictRow],
            check=self._check_connection,
            timeout=call_timeout_s,
            # The pool's own reconnection backs off without a cap (1, 2, 4 ... s): after
            # an outage the pool could stay empty long after the database is back, and
            # leases would be lost to it. Give a lost connection up quickly instead;
            # the next call that finds the pool short grows it at once.
            reconnect_timeout=call_timeout_s,
            open=False,
            name=name,
        )

    async def _check_connection(self, conn: Connection) -> None:
        # The pool's own check, bounded: a connection that went stale during a cut
        # fails here and is replaced while the caller's call goes on. One that just
        # answered is not checked again: under load the extra round trip per call
        # would halve what the pool carries (a busy connection that breaks fails
        # one call and is replaced).
        if time.monotonic() - self._answered.get(id(conn), float("-inf")) < CHECK_AFTER_IDLE_S:
            return
        await bounded(conn, AsyncConnectionPool.check_connection(conn), self.call_timeout_s / 2)

    async def _open(self) -> None:
        if not self._opened:
            self._opened = True
            # wait=False: the worker starts (and says it is not ready) while Postgres is away.
            await self._pool.open(wait=False)
            await self._lease_pool.open(wait=False)

    async def check(self) -> None:
        """One round trip, within the call deadline (start-up and readiness)."""
        await self.fetch_one("SELECT 1 AS ok", {}, lease=True)

    @asynccontextmanager
    async def connection(self, *, lease: bool = False) -> AsyncIterator[Connection]:
        """Borrow a checked connection (autocommit; `conn.transaction()` for more).

        Waiting for it is bounded (the call deadline); bound what you run on it with
        `bounded()` or use `call()`, which does both.
        """
        if self._closed:
            raise QueueError("queue driver is closed")
        await self._open()
        pool = self._lease_pool if lease else self._pool
        with wrap_exceptions():
            async with pool.connection() as conn:
                yield conn

    async def call(self, work: Callable[[Connection], Awaitable[T]], *, lease: bool = False) -> T:
        """Run `work` on a pooled connection (`lease`: the lease renewals' own one):
        waiting for the connection and running the work are each bounded by the call
        deadline."""
        async with self.connection(lease=lease) as conn:
            with wrap_exceptions():
                result = await bounded(conn, work(conn), self.call_timeout_s)
            if len(self._answered) > 4 * self._pool.max_size:
                self._answered.clear()  # ids of closed connections; a check costs little
            self._answered[id(conn)] = time.monotonic()
            return result

    async def fetch_all(
        self, query: str, params: dict[str, Any], *, lease: bool = False
    ) -> list[DictRow]:
        async def work(conn: Connection) -> list[DictRow]:
            cursor = await conn.execute(query.encode(), params)
            return await cursor.fetchall()

        return await self.call(work, lease=lease)

    async def fetch_one(
        self, query: str, params: dict[str, Any], *, lease: bool = False
    ) -> DictRow | None:
        async def work(conn: Connection) -> DictRow | None:
            cursor = await conn.execute(query.encode(), params)
            return await cursor.fetchone()

        return await self.call(work, lease=lease)

    async def listen(
        self,
        channel: str,
        on_payload: Callable[[str], None],
        on_ready: Callable[[bool], None] | None = None,
    ) -> None:
        """LISTEN on `channel` until cancelled, reconnecting with the one backoff
        (reset once a connection listened)."""
        log = logger.bind(event="queue_listen", channel=channel)
        failures = 0
        listened = False

        def ready(ok: bool) -> None:
            nonlocal listened
            listened = listened or ok
            if on_ready:
                on_ready(ok)

        while True:
            listened = False
            try:
                await self._listen_once(channel, on_payload, ready)
            except (psycopg.OperationalError, psycopg.InterfaceError, QueueError) as exc:
                if on_ready:
                    on_ready(False)
                failures = 1 if listened else failures + 1
                delay = backoff_delay(failures, base_s=RETRY_BASE_S, cap_s=RETRY_CAP_S)
                if failures == 1:  # once per state change, not once per retry
                    log.warning("LISTEN connection lost ({}); reconnecting", exc)
                else:
                    log.debug("LISTEN reconnect failed ({}); next in {:.1f}s", exc, delay)
                await asyncio.sleep(delay)

    async def _listen_once(
        self,
        channel: str,
        on_payload: Callable[[str], None],
        on_ready: Callable[[bool], None],
    ) -> None:
        conn = await psycopg.AsyncConnection.connect(self._url, **self._kwargs)
        async with conn:
            listen = sql.SQL("LISTEN {}").format(sql.Identifier(channel))
            await bounded(conn, conn.execute(listen), self.call_timeout_s)
            on_ready(True)
            logger.bind(event="queue_listen", channel=channel).debug("listening")
            while True:
                async for notify in conn.notifies(timeout=LISTEN_PING_INTERVAL_S):
                    on_payload(notify.payload)
                await bounded(conn, conn.execute("SELECT 1"), self.call_timeout_s)

    async def close(self) -> None:
        self._closed = True
        if self._opened:
            await self._pool.close(timeout=self.call_timeout_s)
            await self._lease_pool.close(timeout=self.call_timeout_s)


async def bounded(conn: psycopg.AsyncConnection[Any], work: Awaitable[T], timeout_s: float) -> T:
    """Await `work` (a call on `conn`) for at most `timeout_s`; past that, sever `conn`.

    Not `asyncio.timeout`: psycopg answers a cancelled query by sending a cancel
    request and waiting for the server (up to 10 s), over the very path that is
    dead. Shutting the socket down makes the call fail at once with a connection
    error, and the pool replaces the connection (it is closed on return).
    """
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    except asyncio.CancelledError:
        # Our caller is cancelled (shutdown): the severed call fails by itself.
        _sever(conn)
        task.add_done_callback(_consume)
        raise
    if done:
        return task.result()
    _sever(conn)
    with contextlib.suppress(BaseException):
        await asyncio.wait_for(task, SEVER_WAIT_S)
    if not task.done():  # pragma: no cover - a shut-down socket answers at once
        task.cancel()
    with contextlib.suppress(Exception):
        await conn.close()
    raise QueueError(f"queue database call timed out after {timeout_s:.3g}s")


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _sever(conn: psycopg.AsyncConnection[Any]) -> None:
    """Shut the connection's socket down without closing its descriptor (closing it
    could hand the number to a new socket while the event loop still watches it)."""
    try:
        fd = conn.pgconn.socket
    except psycopg.Error:
        return
    try:
        dup = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        dup.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        dup.close()
