"""The contract between the worker and a stream runner.

The worker claims a request, validates it, and hands it to a *stream runner*:

    async def runner(job: Job, ctx: StreamContext) -> Outcome

The runner streams the generation (upstream -> relay -> publisher) starting at
`ctx.start` (offsets, message numbers and the text so far: a taken-over request
continues where the last checkpoint left it), reports progress with
`ctx.record(snapshot)` (cheap and synchronous; the worker writes it to Postgres
about once a second and at the end) or `await ctx.checkpoint(snapshot)` (written
now; for runners with their own checkpoint cadence), and returns an `Outcome`.

When `ctx.aborted` is set the runner must stop within `ctx.stop_within_s`:
- `cancelled`: the owner asked. Abort the upstream, tell the client
  (`llm-status` cancelled), return `Outcome("cancelled", ...)`.
- `shutdown`: the worker drains. Stop, flush what was published, return
  `Outcome("interrupted", exact snapshot)`; the worker releases the request and
  another worker continues from that snapshot.
- `lease_lost`: another worker owns the request now. Stop publishing at once.
A runner that does not stop in time is cancelled (asyncio), and the worker
settles with the last recorded snapshot.

Raising is allowed: a `RelayError` carries type and retryability; anything else is
an internal error. Retryable failures are released for another attempt (up to
RELAY_MAX_ATTEMPTS), the rest are failed with their reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from worker.errors import (
    BadInputError,
    PublishError,
    QueueError,
    RelayError,
    UpstreamError,
    bounded,
)
from worker.jobs.chunklog import ChunkLog
from worker.jobs.models import Job, Snapshot
from worker.upstream.events import GenerationRequest

AbortReason = Literal["cancelled", "shutdown", "lease_lost"]
OutcomeKind = Literal["done", "failed", "cancelled", "interrupted"]

# The owner's cancel must stop the upstream within a second (issue 6).
CANCEL_STOP_S = 1.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a stream ended, with the snapshot of everything published."""

    kind: OutcomeKind
    snapshot: Snapshot
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    # None: retry when the error says it is retryable. False: the client was already
    # told the stream failed (llm-error), so another attempt would confuse it.
    retry: bool | None = None

    @property
    def retryable(self) -> bool:
        if self.retry is not None:
            return self.retry
        return bool(self.error and self.error.get("retryable"))


class StreamContext:
    """What one stream needs from the worker, and how it reports back."""

    def __init__(self, job: Job, request: GenerationRequest, *, topic: str) -> None:
        self.job = job
        self.request = request
        self.topic = topic
        self.start: Snapshot = job.snapshot
        self._latest: Snapshot = job.snapshot
        self._aborted = asyncio.Event()
        self.abort_reason: AbortReason | None = None
        self.stop_within_s: float = CANCEL_STOP_S
        self._writer: Callable[[], Awaitable[None]] | None = None
        self._progress: Callable[[], Snapshot] | None = None
        # The worker's write-ahead token log (None: RELAY_WAL off, or no queue). A
        # runner that uses it makes every batch durable before broadcasting it; the
        # worker then writes the row only at the end (the log is the checkpoint).
        self.chunk_log: ChunkLog | None = None

    @property
    def stream_id(self) -> str:
        """The `stream` field of every payload: the request id, stable across takeovers."""
        return self.job.id

    @property
    def start_offset(self) -> int:
        return self.start.next_offset

    @property
    def start_seq(self) -> int:
        return self.start.next_seq

    @property
    def resumed(self) -> bool:
        return self.job.resumed or self.start.next_offset > 0 or self.start.next_seq > 0

    @property
    def latest(self) -> Snapshot:
        if self._progress is not None:
            return self._progress()
        return self._latest

    @property
    def logged(self) -> bool:
        """The runner writes the token log and reports by `track()`: the log is the
        checkpoint, the row is written at the end only."""
        return self.chunk_log is not None and self._progress is not None

    def track(self, progress: Callable[[], Snapshot]) -> None:
        """Report progress by a function the worker calls when it needs the snapshot
        (the runner's transcript of what was published), instead of `record()`."""
        self._progress = progress

    def record(self, snapshot: Snapshot) -> None:
        """Report progress: the text and offsets of everything published so far."""
        if snapshot.next_offset < self._latest.next_offset:
            raise ValueError("a snapshot cannot move backwards")
        self._latest = snapshot

    async def checkpoint(self, snapshot: Snapshot) -> None:
        """Record, and write to Postgres now (for runners with their own cadence).

        Raises:
            LeaseLost: another worker owns the request; stop publishing.
        """
        self.record(snapshot)
        if self._writer is not None:
            await self._writer()

    def set_writer(self, writer: Callable[[], Awaitable[None]]) -> None:
        """Worker side: how `checkpoint()` persists the latest snapshot."""
        self._writer = writer

    @property
    def aborted(self) -> asyncio.Event:
        return self._aborted

    def abort(self, reason: AbortReason, *, within_s: float = CANCEL_STOP_S) -> None:
        """Ask the runner to stop (worker side). The first reason wins."""
        if self._aborted.is_set():
            return
        self.abort_reason = reason
        self.stop_within_s = within_s
        self._aborted.set()


StreamRunner = Callable[[Job, StreamContext], Awaitable[Outcome]]


@runtime_checkable
class ReportsLag(Protocol):
    """A runner that can say it is behind (the relay measures its own lag, issue 16)."""

    @property
    def behind(self) -> bool: ...


# Told when a request is rejected before streaming (e.g. to publish `llm-error`).
RejectHook = Callable[[Job, str, dict[str, Any]], Awaitable[None]]


def error_info(exc: BaseException) -> dict[str, Any]:
    """The `error` column of a failed request: type, message, retryable, and data."""
    if isinstance(exc, UpstreamError):
        info: dict[str, Any] = {"type": exc.type, "provider": exc.provider, "status": exc.status}
    elif isinstance(exc, BadInputError):
        info = {"type": "bad_request", "field": exc.field}
        if exc.value is not None:
            info["value"] = exc.value
    elif isinstance(exc, PublishError):
        info = {"type": "publish", "reason": exc.reason}
    elif isinstance(exc, QueueError):
        info = {"type": "queue"}
    elif isinstance(exc, RelayError):
        info = {"type": type(exc).__name__}
    else:
        # A bug: keep the class, not the text (it could echo user data).
        return {"type": "internal", "message": type(exc).__name__, "retryable": False}
    # Bounded here, where every row's `error` and every `llm-error` is built.
    info["message"] = bounded(exc.message)
    info["retryable"] = exc.retryable
    return info
