"""The request queue: SQL in one place (`queries.sql`), behind `JobRepository`.

`PostgresJobRepository` (real), `InMemoryJobRepository` (worker.jobs.testing, tests).
"""

from worker.jobs.models import (
    Chunk,
    Job,
    JobRecord,
    JobStatus,
    NewRequest,
    Notification,
    Result,
    Snapshot,
    Submitted,
)
from worker.jobs.postgres import PostgresJobRepository
from worker.jobs.repository import JobRepository

__all__ = [
    "Chunk",
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
]
