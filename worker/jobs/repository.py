"""`JobRepository`: every operation the worker performs on the request queue.

Layers as in procrastinate: `Worker -> JobRepository -> driver`. The worker never
sees SQL; `PostgresJobRepository` (worker/jobs/postgres.py) runs the named blocks of
`queries.sql`, `InMemoryJobRepository` (worker/jobs/testing.py) implements the
same contract in memory for unit tests.

Every write that belongs to a lease is fenced by it (`lease_owner = worker` and
status `running`): a worker whose lease was reclaimed gets `LeaseLost` and can no
longer overwrite the new owner's progress.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from typing import Any

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


class JobRepository(abc.ABC):
    """The request queue, as the worker and the `submit` command use it."""

    # --- the worker side ---

    async def check(self) -> None:  # noqa: B027 - optional hook
        """One round trip to the queue (readiness); raises `QueueError` when away."""

    @abc.abstractmethod
    async def claim(
        self, *, worker: str, limit: int, lease_s: float, max_attempts: int
    ) -> list[Job]:
        """Lease up to `limit` claimable requests (queued, or running with an expired
        lease) to `worker`, oldest first; each claim counts one attempt."""

    @abc.abstractmethod
    async def sweep(self, *, max_attempts: int) -> list[Swept]:
        """Settle unclaimable rows: cancelled ones, and expired ones out of attempts."""

    @abc.abstractmethod
    async def heartbeat(
        self, *, worker: str, ids: Sequence[str], lease_s: float
    ) -> dict[str, bool]:
        """Extend the leases `worker` still holds among `ids`.

        Returns:
            {id: cancel_requested} for the leases still held; an id missing was lost.
        """

    @abc.abstractmethod
    async def checkpoint(self, *, worker: str, job_id: str, snapshot: Snapshot) -> bool:
        """Store the snapshot. Returns whether the owner asked to cancel.

        Raises:
            LeaseLost: the lease is no longer `worker`'s.
        """

    # --- the write-ahead token log (worker/jobs/chunklog.py is its one writer) ---

    @abc.abstractmethod
    async def append_chunks(self, *, worker: str, runs: Sequence[ChunkRun]) -> Appended:
        """Insert the tokens of any number of runs (of any requests) in one statement,
        fenced by the leases `worker` holds; an offset already written is never
        replaced.

        Returns:
            The rows written, and which runs were not written whole (lease lost, or an
            offset was taken). A run counts as written whole when every one of its
            offsets was written by this statement, even if another run of the same
            statement carried it too.
        """

    @abc.abstractmethod
    async def read_chunks_of(self, starts: Mapping[str, int]) -> dict[str, list[Chunk]]:
        """The logged tokens of each request in `starts` at and after its offset there,
        in order, in one query (requests without any are left out)."""

    async def read_chunks(self, job_id: str, from_offset: int) -> list[Chunk]:
        """The logged tokens of one request at and after `from_offset`, in order."""
        return (await self.read_chunks_of({job_id: from_offset})).get(job_id, [])

    @abc.abstractmethod
    async def prune_chunks(self, *, retention_s: float) -> int:
        """Delete the tokens of requests that ended more than `retention_s` ago."""

    @abc.abstractmethod
    async def cancel_requested(self, ids: Sequence[str]) -> set[str]:
        """The ids among `ids` whose owner asked to cancel."""

    @abc.abstractmethod
    async def finish(self, *, worker: str, job_id: str, result: Result) -> None:
        """Write the end state and drop the lease.

        Raises:
            LeaseLost: the lease is no longer `worker`'s.
        """

    @abc.abstractmethod
    async def release(
        self,
        *,
        worker: str,
        job_id: str,
        snapshot: Snapshot,
        refund_attempt: bool,
        error: dict[str, Any] | None = None,
    ) -> None:
        """Put a running request back in the queue with its snapshot.

        Raises:
            LeaseLost: the lease is no longer `worker`'s.
        """

    @abc.abstractmethod
    async def listen(
        self,
        on_notification: Callable[[Notification], None],
        on_ready: Callable[[bool], None] | None = None,
    ) -> None:
        """Deliver wake-ups until cancelled, reconnecting as needed; `on_ready(False)`
        while not listening (polling still guarantees progress)."""

    # --- reads ---

    @abc.abstractmethod
    async def get(self, job_id: str) -> JobRecord | None:
        """One request as stored, bypassing RLS (the worker's view)."""

    # --- the user side (what a frontend does, under its JWT and RLS) ---

    @abc.abstractmethod
    async def create_session_as(self, user_id: str, session_id: str | None = None) -> str:
        """Create a session owned by `user_id` (to join its topic before any request)."""

    @abc.abstractmethod
    async def submit_as(self, user_id: str, request: NewRequest) -> Submitted:
        """Insert a request as `user_id`."""

    @abc.abstractmethod
    async def get_as(self, user_id: str, job_id: str) -> JobRecord | None:
        """Read a request as `user_id`: None unless it is theirs."""

    @abc.abstractmethod
    async def cancel_as(self, user_id: str, job_id: str) -> JobStatus | None:
        """Ask to cancel as `user_id`. Returns the status after the call, or None when
        the request is not theirs, unknown, or already finished."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
