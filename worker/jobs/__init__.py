"""The request queue: SQL in one place (`queries.sql`), behind `JobRepository`.

`PostgresJobRepository` (real), `InMemoryJobRepository` (worker.jobs.testing, tests).
"""

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
    Undecodable,
)
from worker.jobs.postgres import PostgresJobRepository
from worker.jobs.repository import JobRepository

__all__ = [
    "Appended",
    "Chunk",
    "ChunkRun",
    "Job",
    "JobRecord",
    "JobRepository",
    "JobStatus",
    "NewRequest",
    "Notification",
    "PostgresJobRepository",
    "Result",
    "Snapshot",
    "Submitted",
    "Swept",
    "Undecodable",
]
