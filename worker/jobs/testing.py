"""`InMemoryJobRepository`: the queue's contract without Postgres, for unit tests.

Like procrastinate's `InMemoryConnector`: the same interface and the same rules
(claim order, leases, attempts, fencing, RLS-like ownership on the user side),
with time read from an injectable clock so tests can expire leases instantly.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from worker.errors import LeaseLost, QueueError
from worker.jobs.models import (
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
from worker.jobs.repository import JobRepository


@dataclass
class _Row:
    id: str
    session_id: str
    owner: str | None
    provider: str | None
    model: str | None
    messages: Any
    params: Any
    created: int
    status: JobStatus = "queued"
    attempts: int = 0
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    cancel_requested: bool = False
    snapshot: Snapshot = field(default_factory=Snapshot)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    checkpoints: int = 0
    chunks: dict[int, Chunk] = field(default_factory=dict)
    finished_at: float | None = None


class InMemoryJobRepository(JobRepository):
    """The request queue in a dict. Not thread-safe; one event loop."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.rows: dict[str, _Row] = {}
        self.sessions: dict[str, str | None] = {}
        self._listeners: list[Callable[[Notification], None]] = []
        self._counter = 0
        self.fail_next: QueueError | None = None  # the next call raises it (outage tests)

    # --- test helpers ---

    def add(self, request: NewRequest, *, owner: str | None = None) -> str:
        """Insert a request directly (as the service role would)."""
        self._counter += 1
        session_id = request.session_id or str(uuid.uuid4())
        self.sessions.setdefault(session_id, owner)
        row = _Row(
            id=str(uuid.uuid4()),
            session_id=session_id,
            owner=owner,
            provider=request.provider,
            model=request.model,
            messages=request.messages,
            params=request.params,
            created=self._counter,
        )
        self.rows[row.id] = row
        self._notify(Notification("queued", row.id))
        return row.id

    def request_cancel(self, job_id: str) -> None:
        row = self.rows[job_id]
        if row.status == "queued":
            row.status = "cancelled"
        row.cancel_requested = True
        self._notify(Notification("cancel", job_id))

    def checkpoints_of(self, job_id: str) -> int:
        return self.rows[job_id].checkpoints

    def _notify(self, notification: Notification) -> None:
        for listener in list(self._listeners):
            listener(notification)

    def _maybe_fail(self) -> None:
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error

    def _held(self, row: _Row, worker: str) -> bool:
        return row.status == "running" and row.lease_owner == worker

    def _expired(self, row: _Row) -> bool:
        return row.lease_expires_at is not None and row.lease_expires_at < self._clock()

    # --- the worker side ---

    async def claim(
        self, *, worker: str, limit: int, lease_s: float, max_attempts: int
    ) -> list[Job]:
        self._maybe_fail()
        candidates = sorted(
            (
                row
                for row in self.rows.values()
                if (row.status == "queued" or (row.status == "running" and self._expired(row)))
                and not row.cancel_requested
                and row.attempts < max_attempts
            ),
            key=lambda row: row.created,
        )[: max(limit, 0)]
        jobs = []
        for row in candidates:
            row.status = "running"
            row.lease_owner = worker
            row.lease_expires_at = self._clock() + lease_s
            row.attempts += 1
            jobs.append(self._job(row))
        return jobs

    def _job(self, row: _Row) -> Job:
        return Job(
            id=row.id,
            session_id=row.session_id,
            owner=row.owner,
            provider=row.provider,
            model=row.model,
            messages=row.messages,
            params=row.params,
            attempts=row.attempts,
            snapshot=row.snapshot,
            cancel_requested=row.cancel_requested,
        )

    async def check(self) -> None:
        self._maybe_fail()

    async def sweep(self, *, max_attempts: int) -> list[Swept]:
        self._maybe_fail()
        settled: list[Swept] = []
        for row in self.rows.values():
            live = row.status == "queued" or (row.status == "running" and self._expired(row))
            if not live or not (row.cancel_requested or row.attempts >= max_attempts):
                continue
            if row.cancel_requested:
                row.status, row.finish_reason = "cancelled", "cancelled"
            else:
                row.status = "failed"
                row.error = {
                    "type": "attempts_exhausted",
                    "message": f"gave up after {row.attempts} attempts",
                    "retryable": False,
                    "last_error": row.error,
                }
            row.lease_owner = row.lease_expires_at = None
            settled.append(Swept(row.id, row.session_id, row.status, row.attempts))
        return settled

    async def heartbeat(
        self, *, worker: str, ids: Sequence[str], lease_s: float
    ) -> dict[str, bool]:
        self._maybe_fail()
        held: dict[str, bool] = {}
        for job_id in ids:
            row = self.rows.get(job_id)
            if row is not None and self._held(row, worker):
                row.lease_expires_at = self._clock() + lease_s
                held[job_id] = row.cancel_requested
        return held

    def _fenced(self, worker: str, job_id: str, what: str) -> _Row:
        row = self.rows.get(job_id)
        if row is None or not self._held(row, worker):
            raise LeaseLost(f"lease lost before {what}", job_id=job_id)
        return row

    async def checkpoint(self, *, worker: str, job_id: str, snapshot: Snapshot) -> bool:
        self._maybe_fail()
        row = self._fenced(worker, job_id, "checkpoint")
        row.snapshot = snapshot
        row.checkpoints += 1
        return row.cancel_requested

    async def append_chunks(self, *, worker: str, runs: Sequence[ChunkRun]) -> Appended:
        self._maybe_fail()
        # As the statement: an offset counts for every run that carried it, as long as
        # this call wrote it; one already there (or a lease not held) leaves it short.
        written: set[tuple[str, int]] = set()
        for run in runs:
            row = self.rows.get(run.job_id)
            if row is None or not self._held(row, worker):
                continue
            for i, text in enumerate(run.texts):
                offset = run.offset + i
                if offset not in row.chunks:
                    row.chunks[offset] = Chunk(run.job_id, offset, run.kind, text)
                    written.add((run.job_id, offset))
        short = frozenset(
            k
            for k, run in enumerate(runs)
            if not all((run.job_id, run.offset + i) in written for i in range(len(run.texts)))
        )
        return Appended(len(written), short)

    async def read_chunks_of(self, starts: Mapping[str, int]) -> dict[str, list[Chunk]]:
        self._maybe_fail()
        found: dict[str, list[Chunk]] = {}
        for job_id, from_offset in starts.items():
            row = self.rows.get(job_id)
            chunks = {} if row is None else row.chunks
            kept = [chunks[o] for o in sorted(chunks) if o >= from_offset]
            if kept:
                found[job_id] = kept
        return found

    async def prune_chunks(self, *, retention_s: float) -> int:
        self._maybe_fail()
        pruned = 0
        for row in self.rows.values():
            ended = row.finished_at
            if ended is not None and ended < self._clock() - retention_s:
                pruned += len(row.chunks)
                row.chunks.clear()
        return pruned

    async def cancel_requested(self, ids: Sequence[str]) -> set[str]:
        self._maybe_fail()
        return {i for i in ids if i in self.rows and self.rows[i].cancel_requested}

    async def finish(self, *, worker: str, job_id: str, result: Result) -> None:
        self._maybe_fail()
        row = self._fenced(worker, job_id, "finish")
        row.status = result.status
        row.snapshot = result.snapshot
        row.finish_reason = result.finish_reason
        row.usage = result.usage
        row.error = result.error
        row.lease_owner = row.lease_expires_at = None
        row.finished_at = self._clock()

    async def release(
        self,
        *,
        worker: str,
        job_id: str,
        snapshot: Snapshot,
        refund_attempt: bool,
        error: dict[str, Any] | None = None,
    ) -> None:
        self._maybe_fail()
        row = self._fenced(worker, job_id, "release")
        row.status = "queued"
        row.snapshot = snapshot
        row.error = error if error is not None else row.error
        row.attempts = max(row.attempts - (1 if refund_attempt else 0), 0)
        row.lease_owner = row.lease_expires_at = None
        self._notify(Notification("queued", job_id))

    async def listen(
        self,
        on_notification: Callable[[Notification], None],
        on_ready: Callable[[bool], None] | None = None,
    ) -> None:
        self._listeners.append(on_notification)
        if on_ready:
            on_ready(True)
        try:
            await asyncio.Event().wait()  # until cancelled
        finally:
            self._listeners.remove(on_notification)

    def _record(self, row: _Row) -> JobRecord:
        return JobRecord(
            id=row.id,
            session_id=row.session_id,
            owner=row.owner,
            status=row.status,
            attempts=row.attempts,
            lease_owner=row.lease_owner,
            cancel_requested=row.cancel_requested,
            snapshot=row.snapshot,
            provider=row.provider,
            model=row.model,
            finish_reason=row.finish_reason,
            usage=row.usage,
            error=row.error,
        )

    async def get(self, job_id: str) -> JobRecord | None:
        row = self.rows.get(job_id)
        return None if row is None else self._record(row)

    # --- the user side ---

    async def create_session_as(self, user_id: str, session_id: str | None = None) -> str:
        session_id = session_id or str(uuid.uuid4())
        if session_id in self.sessions:
            raise QueueError(f"session {session_id} exists")
        self.sessions[session_id] = user_id
        return session_id

    async def submit_as(self, user_id: str, request: NewRequest) -> Submitted:
        session_id = request.session_id or str(uuid.uuid4())
        if self.sessions.get(session_id, user_id) != user_id:
            raise QueueError(f"session {session_id} belongs to another user")
        job_id = self.add(replace(request, session_id=session_id), owner=user_id)
        return Submitted(id=job_id, session_id=session_id)

    async def get_as(self, user_id: str, job_id: str) -> JobRecord | None:
        row = self.rows.get(job_id)
        return None if row is None or row.owner != user_id else self._record(row)

    async def cancel_as(self, user_id: str, job_id: str) -> JobStatus | None:
        row = self.rows.get(job_id)
        if row is None or row.owner != user_id or row.status not in ("queued", "running"):
            return None
        self.request_cancel(job_id)
        return row.status
