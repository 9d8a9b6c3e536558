"""Private-channel authorization against the project's own RLS (ref §5).

The real server never decides by itself: it asks Postgres, inside a transaction that is
always rolled back, with the role and claims of the channel's JWT set locally, and lets
the project's policies on `realtime.messages` answer. `PostgresAuthorizer` does exactly
that; `Authorizer` is the seam tests may fill with a plain policy object.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
from loguru import logger

log = logger.bind(event="realtime.authorization")


@dataclass(frozen=True)
class AuthContext:
    """What RLS sees: the sub-topic (no `realtime:`) and the verified JWT claims."""

    sub_topic: str
    claims: dict[str, Any]

    @property
    def role(self) -> str:
        return str(self.claims.get("role", "anon"))


class AuthorizationUnavailable(Exception):
    """The database could not be asked (the real server then refuses with a DB reason)."""


class Authorizer(Protocol):
    async def can_read(self, ctx: AuthContext) -> bool: ...

    async def can_write(self, ctx: AuthContext) -> bool: ...


class NoDatabase:
    """No `database_url`: private channels cannot be authorized (ref §2 DB reasons)."""

    async def can_read(self, ctx: AuthContext) -> bool:
        raise AuthorizationUnavailable("no database configured")

    async def can_write(self, ctx: AuthContext) -> bool:
        raise AuthorizationUnavailable("no database configured")


POOL_NAME = "realtime_connect"  # the real pool's application_name, as pg_stat_activity shows
_PROBE = "INSERT INTO realtime.messages (topic, extension) VALUES (%s, 'broadcast') RETURNING id"


class PostgresAuthorizer:
    """RLS checks as in rt: lib/realtime/tenants/authorization.ex (ref §5).

    The real server asks through the tenant's `realtime_connect` pool, whose size is the
    tenant's `db_pool` setting, 1 by default (rt: lib/realtime/database.ex 343-348): one
    long-lived connection that every check queues for, never a connection per check
    (a backend fork per join or REST message would make the stand-in, not the client,
    what limits a load test).
    """

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """The pool of one: wait for it, (re)connect if needed, drop it when it broke."""
        async with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = await psycopg.AsyncConnection.connect(
                        self._url, application_name=POOL_NAME
                    )
                yield self._conn
            except psycopg.Error as exc:
                await self._drop()
                raise AuthorizationUnavailable(str(exc)) from exc

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            with contextlib.suppress(psycopg.Error):  # already broken: nothing to release
                await conn.close()

    async def close(self) -> None:
        async with self._lock:
            await self._drop()

    async def _set_claims(self, conn: psycopg.AsyncConnection[Any], ctx: AuthContext) -> None:
        # ref §5: role, realtime.topic, request.jwt.claims, .claim.sub, .claim.role,
        # request.headers, all transaction-local, in one query as the real server's
        # `set_conn_config` (rt: authorization.ex 216-240).
        await conn.execute(
            "SELECT set_config('role', %s, true),"
            " set_config('realtime.topic', %s, true),"
            " set_config('request.jwt.claims', %s, true),"
            " set_config('request.jwt.claim.sub', %s, true),"
            " set_config('request.jwt.claim.role', %s, true),"
            " set_config('request.headers', '{}', true)",
            (
                ctx.role,
                ctx.sub_topic,
                json.dumps(ctx.claims),
                str(ctx.claims.get("sub", "")),
                ctx.role,
            ),
        )

    async def can_read(self, ctx: AuthContext) -> bool:
        """Insert a probe row as the privileged connection, SELECT it under RLS, roll back."""
        async with self._connection() as conn, conn.transaction(force_rollback=True):
            cur = await conn.execute(_PROBE, (ctx.sub_topic,))
            row = await cur.fetchone()
            assert row is not None
            await self._set_claims(conn, ctx)
            cur = await conn.execute("SELECT id FROM realtime.messages WHERE id = %s", (row[0],))
            return await cur.fetchone() is not None

    async def can_write(self, ctx: AuthContext) -> bool:
        """INSERT in a savepoint under RLS; SQLSTATE 42501 means denied (ref §5)."""
        async with self._connection() as conn, conn.transaction(force_rollback=True):
            await self._set_claims(conn, ctx)
            try:
                async with conn.transaction():
                    await conn.execute(
                        "INSERT INTO realtime.messages (topic, extension) VALUES (%s, 'broadcast')",
                        (ctx.sub_topic,),
                    )
            except psycopg.errors.InsufficientPrivilege:
                return False
            return True
