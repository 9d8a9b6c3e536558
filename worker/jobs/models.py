"""The queue's data: what a worker claims, what it writes back, what users submit."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

JobStatus = Literal["queued", "running", "done", "failed", "cancelled"]
FinalStatus = Literal["done", "failed", "cancelled"]
NotificationOp = Literal["queued", "cancel"]

# Postgres NOTIFY channel of the migrations' trigger.
NOTIFY_CHANNEL = "llm_requests"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a late or reconnecting subscriber catches up from.

    `next_offset` is the stream-wide index of the next token (content and reasoning
    share one offset space); `next_seq` the number of the next broadcast message.
    """

    content: str = ""
    reasoning: str = ""
    next_offset: int = 0
    next_seq: int = 0


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A column of a claimed row that could not be decoded; validation fails the row
    with this reason (type `bad_request`, the field, a bounded preview of the text)."""

    field: str
    reason: str
    preview: str


@dataclass(frozen=True, slots=True)
class Swept:
    """A row the sweep settled: cancelled, or failed out of attempts."""

    id: str
    session_id: str
    status: JobStatus
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class Chunk:
    """One token of the write-ahead log (`llm_request_chunks`)."""

    job_id: str
    offset: int
    kind: str  # "content" | "reasoning"
    text: str


@dataclass(frozen=True, slots=True)
class ChunkRun:
    """Consecutive tokens of one kind for the write-ahead log: `texts[i]` is the row
    at offset `offset + i`. The log is written per run (one relay batch), so the
    worker's cost is per batch, not per token; the table still has a row per token.
    orjson writes it as it is: the field names are `append_chunks`' JSON keys."""

    job_id: str
    offset: int
    kind: str  # "content" | "reasoning"
    texts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Appended:
    """What one `append_chunks` statement wrote."""

    rows: int
    # Indexes (into the runs sent) of the runs not every token of which this statement
    # wrote: the lease was not held, or an offset was already taken.
    short: frozenset[int]


@dataclass(frozen=True, slots=True)
class Job:
    """A claimed request, as the worker sees it (inputs are not validated yet)."""

    id: str
    session_id: str
    owner: str | None
    provider: str | None
    model: str | None
    messages: Any
    params: Any
    attempts: int
    snapshot: Snapshot
    cancel_requested: bool = False
    created_at: datetime | None = None

    @property
    def resumed(self) -> bool:
        """Another worker streamed part of this request before (it crashed or released it)."""
        return self.snapshot.next_offset > 0 or self.snapshot.next_seq > 0


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A request row as stored (for status reads, tests and `submit --wait`)."""

    id: str
    session_id: str
    owner: str | None
    status: JobStatus
    attempts: int
    lease_owner: str | None
    cancel_requested: bool
    snapshot: Snapshot
    provider: str | None = None
    model: str | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Result:
    """The end of a request, written once with its final snapshot."""

    status: FinalStatus
    snapshot: Snapshot
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Notification:
    """A wake-up from the NOTIFY trigger: a request became claimable, or was cancelled."""

    op: NotificationOp
    id: str


@dataclass(frozen=True, slots=True)
class NewRequest:
    """What a frontend inserts (under its own JWT, so RLS applies)."""

    messages: Any
    provider: str | None = None
    model: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    session_id: str | None = None


@dataclass(frozen=True, slots=True)
class Submitted:
    id: str
    session_id: str
