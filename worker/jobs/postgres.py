"""`PostgresJobRepository`: the queue on Postgres (Supabase), through `PsycopgDriver`."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import orjson
from loguru import logger
from psycopg.rows import DictRow
from psycopg.types.json import Json, Jsonb

from worker.errors import LeaseLost, QueueError
from worker.jobs.decode import decode_column
from worker.jobs.driver import DEFAULT_CALL_TIMEOUT_S, Connection, PsycopgDriver
from worker.jobs.models import (
    NOTIFY_CHANNEL,
    Appended,
    Chunk,
    ChunkRun,
    Job,
    JobRecord,
    JobStatus,
    NewRequest,
    Notification,
    Result,
    Snapshot,
    Submitted,
    Swept,
)
from worker.jobs.queries import query
from worker.jobs.repository import JobRepository


def _snapshot_params(snapshot: Snapshot) -> dict[str, Any]:
    return {
        "content": snapshot.content,
        "reasoning": snapshot.reasoning,
        "next_offset": snapshot.next_offset,
        "next_seq": snapshot.next_seq,
    }


def _snapshot_of(row: DictRow) -> Snapshot:
    return Snapshot(
        content=row["content"],
        reasoning=row["reasoning"],
        next_offset=row["next_offset"],
        next_seq=row["next_seq"],
    )


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def job_from_row(row: DictRow) -> Job:
    """A claimed row; `messages` and `params` arrive as text and are decoded here,
    per row (an undecodable one becomes `Undecodable`, failed by validation)."""
    return Job(
        id=str(row["id"]),
        session_id=str(row["session_id"]),
        owner=_str_or_none(row["owner"]),
        provider=row["provider"],
        model=row["model"],
        messages=decode_column("messages", row["messages"]),
        params=decode_column("params", row["params"]),
        attempts=row["attempts"],
        snapshot=_snapshot_of(row),
        cancel_requested=row["cancel_requested"],
        created_at=row["created_at"],
    )


def record_from_row(row: DictRow) -> JobRecord:
    return JobRecord(
        id=str(row["id"]),
        session_id=str(row["session_id"]),
        owner=_str_or_none(row["owner"]),
        status=row["status"],
        attempts=row["attempts"],
        lease_owner=row["lease_owner"],
        cancel_requested=row["cancel_requested"],
        snapshot=_snapshot_of(row),
        provider=row["provider"],
        model=row["model"],
        finish_reason=row["finish_reason"],
        usage=row["usage"],
        error=row["error"],
    )


def parse_notification(payload: str) -> Notification | None:
    """The trigger's JSON payload; None (and a warning) for anything else."""
    try:
        data = json.loads(payload)
        op, job_id = data["op"], data["id"]
    except (ValueError, TypeError, KeyError):
        logger.bind(event="queue_notify").warning("ignored a malformed NOTIFY payload")
        return None
    if op not in ("queued", "cancel") or not isinstance(job_id, str):
        return None
    return Notification(op=op, id=job_id)


def _user_claims(user_id: str) -> str:
    return json.dumps({"sub": user_id, "role": "authenticated", "aud": "authenticated"})


class PostgresJobRepository(JobRepository):
    """The request queue in `public.llm_requests`."""

    def __init__(self, driver: PsycopgDriver) -> None:
        self._driver = driver

    @classmethod
    def from_url(
        cls, url: str, *, pool_size: int = 4, call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S
    ) -> PostgresJobRepository:
        return cls(PsycopgDriver(url, pool_size=pool_size, call_timeout_s=call_timeout_s))

    @property
    def driver(self) -> PsycopgDriver:
        """The pool and call deadline, for other writers of the same database."""
        return self._driver

    async def check(self) -> None:
        await self._driver.check()

    async def claim(
        self, *, worker: str, limit: int, lease_s: float, max_attempts: int
    ) -> list[Job]:
        if limit <= 0:
            return []
        rows = await self._driver.fetch_all(
            query("claim"),
            {"worker": worker, "limit": limit, "lease_s": lease_s, "max_attempts": max_attempts},
        )
        jobs = [job_from_row(row) for row in rows]
        # UPDATE ... RETURNING does not keep the CTE's order.
        jobs.sort(key=lambda job: (job.created_at is None, job.created_at))
        return jobs

    async def sweep(self, *, max_attempts: int) -> list[Swept]:
        rows = await self._driver.fetch_all(query("sweep"), {"max_attempts": max_attempts})
        return [
            Swept(str(row["id"]), str(row["session_id"]), row["status"], row["attempts"])
            for row in rows
        ]

    async def heartbeat(
        self, *, worker: str, ids: Sequence[str], lease_s: float
    ) -> dict[str, bool]:
        if not ids:
            return {}
        rows = await self._driver.fetch_all(
            query("heartbeat"),
            {"worker": worker, "ids": list(ids), "lease_s": lease_s},
            lease=True,
        )
        return {str(row["id"]): row["cancel_requested"] for row in rows}

    async def checkpoint(self, *, worker: str, job_id: str, snapshot: Snapshot) -> bool:
        row = await self._driver.fetch_one(
            query("checkpoint"), {"id": job_id, "worker": worker, **_snapshot_params(snapshot)}
        )
        if row is None:
            raise LeaseLost("lease lost before checkpoint", job_id=job_id)
        return bool(row["cancel_requested"])

    async def append_chunks(self, *, worker: str, runs: Sequence[ChunkRun]) -> Appended:
        if not runs:
            return Appended(0, frozenset())
        row = await self._driver.fetch_one(
            query("append_chunks"),
            {
                "worker": worker,
                "ids": sorted({r.job_id for r in runs}),
                # Serialized in C (orjson writes the dataclasses as they are), once
                # per statement: psycopg would dump one array element per token and
                # column otherwise.
                "runs": Json(runs, orjson.dumps),
            },
        )
        if row is None:  # an aggregate always has its one row
            raise QueueError("append_chunks returned no row")
        return Appended(int(row["written"]), frozenset(row["short"]))

    async def read_chunks_of(self, starts: Mapping[str, int]) -> dict[str, list[Chunk]]:
        if not starts:
            return {}
        rows = await self._driver.fetch_all(
            query("read_chunks"), {"ids": list(starts), "from_offsets": list(starts.values())}
        )
        chunks: dict[str, list[Chunk]] = {}
        for row in rows:
            job_id = str(row["request_id"])
            chunks.setdefault(job_id, []).append(
                Chunk(job_id, row["token_offset"], row["kind"], row["text"])
            )
        return chunks

    async def prune_chunks(self, *, retention_s: float) -> int:
        async with self._driver.connection() as conn:
            cursor = await conn.execute(
                query("prune_chunks").encode(), {"retention_s": retention_s}
            )
            return cursor.rowcount

    async def cancel_requested(self, ids: Sequence[str]) -> set[str]:
        if not ids:
            return set()
        rows = await self._driver.fetch_all(query("cancel_requested"), {"ids": list(ids)})
        return {str(row["id"]) for row in rows}

    async def finish(self, *, worker: str, job_id: str, result: Result) -> None:
        row = await self._driver.fetch_one(
            query("finish"),
            {
                "id": job_id,
                "worker": worker,
                "status": result.status,
                "finish_reason": result.finish_reason,
                "usage": None if result.usage is None else Jsonb(result.usage),
                "error": None if result.error is None else Jsonb(result.error),
                **_snapshot_params(result.snapshot),
            },
        )
        if row is None:
            raise LeaseLost("lease lost before finish", job_id=job_id)

    async def release(
        self,
        *,
        worker: str,
        job_id: str,
        snapshot: Snapshot,
        refund_attempt: bool,
        error: dict[str, Any] | None = None,
    ) -> None:
        row = await self._driver.fetch_one(
            query("release"),
            {
                "id": job_id,
                "worker": worker,
                "refund": 1 if refund_attempt else 0,
                "error": None if error is None else Jsonb(error),
                **_snapshot_params(snapshot),
            },
        )
        if row is None:
            raise LeaseLost("lease lost before release", job_id=job_id)

    async def listen(
        self,
        on_notification: Callable[[Notification], None],
        on_ready: Callable[[bool], None] | None = None,
    ) -> None:
        def on_payload(payload: str) -> None:
            notification = parse_notification(payload)
            if notification is not None:
                on_notification(notification)

        await self._driver.listen(NOTIFY_CHANNEL, on_payload, on_ready)

    async def get(self, job_id: str) -> JobRecord | None:
        row = await self._driver.fetch_one(query("get"), {"id": job_id})
        return None if row is None else record_from_row(row)

    # --- the user side: one transaction each, as PostgREST runs a request ---

    async def create_session_as(self, user_id: str, session_id: str | None = None) -> str:
        row = await self._as_user(user_id, "create_session", {"session_id": session_id})
        if row is None:  # pragma: no cover - INSERT ... RETURNING always returns the row
            raise QueueError("insert returned no row")
        return str(row["id"])

    async def submit_as(self, user_id: str, request: NewRequest) -> Submitted:
        params = {
            "session_id": request.session_id,
            "provider": request.provider,
            "model": request.model,
            "messages": Jsonb(request.messages),
            "params": Jsonb(request.params),
        }
        row = await self._as_user(user_id, "submit", params)
        if row is None:  # pragma: no cover - INSERT ... RETURNING always returns the row
            raise QueueError("insert returned no row")
        return Submitted(id=str(row["id"]), session_id=str(row["session_id"]))

    async def get_as(self, user_id: str, job_id: str) -> JobRecord | None:
        row = await self._as_user(user_id, "get", {"id": job_id})
        return None if row is None else record_from_row(row)

    async def cancel_as(self, user_id: str, job_id: str) -> JobStatus | None:
        row = await self._as_user(user_id, "cancel", {"id": job_id})
        return None if row is None else cast(JobStatus | None, row["status"])

    async def _as_user(self, user_id: str, name: str, params: dict[str, Any]) -> DictRow | None:
        async def work(conn: Connection) -> DictRow | None:
            async with conn.transaction():
                await conn.execute(query("act_as_user").encode(), {"claims": _user_claims(user_id)})
                cursor = await conn.execute(query(name).encode(), params)
                return await cursor.fetchone()

        return await self._driver.call(work)

    async def close(self) -> None:
        await self._driver.close()
