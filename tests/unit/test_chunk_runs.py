"""The write-ahead log per batch: one `ChunkRun` per relay batch, the in-memory queue
judging runs as the statement does, and the rows bound of one statement."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from worker.errors import LeaseLost
from worker.jobs import chunklog
from worker.jobs.chunklog import ChunkLog
from worker.jobs.models import Appended, ChunkRun, NewRequest
from worker.jobs.testing import InMemoryJobRepository
from worker.relay.batcher import Batch
from worker.service.runner import runs_of


def test_a_batch_is_one_run_sharing_its_tokens() -> None:
    tokens = ("a", "b", "c")
    batches = [Batch("content", 4, tokens, "size"), Batch("reasoning", 7, ("r",), "kind")]
    runs = runs_of("job", batches)
    assert runs == [
        ChunkRun("job", 4, "content", tokens),
        ChunkRun("job", 7, "reasoning", ("r",)),
    ]
    assert runs[0].texts is tokens  # nothing copied per token


async def claimed(repo: InMemoryJobRepository, n: int) -> list[str]:
    ids = [repo.add(NewRequest([{"role": "user", "content": "hi"}])) for _ in range(n)]
    await repo.claim(worker="w", limit=n, lease_s=30, max_attempts=3)
    return ids


async def test_the_in_memory_queue_judges_each_run_as_the_statement_does() -> None:
    repo = InMemoryJobRepository()
    a, b = await claimed(repo, 2)
    await repo.append_chunks(worker="w", runs=[ChunkRun(a, 0, "content", ("a",))])
    repo.rows[b].lease_owner = "other"
    runs = [
        ChunkRun(a, 1, "content", ("b", "c")),  # free: written
        ChunkRun(a, 0, "content", ("A", "x")),  # offset 0 taken: short (1 is this call's)
        ChunkRun(a, 2, "content", ("C", "d")),  # 2 written by run 0 of this call: whole
        ChunkRun(b, 0, "content", ("z",)),  # lease not held: short, nothing written
    ]
    assert await repo.append_chunks(worker="w", runs=runs) == Appended(3, frozenset({1, 3}))
    assert [(c.offset, c.text) for c in await repo.read_chunks(a, 0)] == [
        (0, "a"),
        (1, "b"),
        (2, "c"),
        (3, "d"),
    ]
    assert await repo.read_chunks(b, 0) == []


class _Recording(InMemoryJobRepository):
    def __init__(self) -> None:
        super().__init__()
        self.statements: list[int] = []

    async def append_chunks(self, *, worker: str, runs: Sequence[ChunkRun]) -> Appended:
        self.statements.append(sum(len(r.texts) for r in runs))
        return await super().append_chunks(worker=worker, runs=runs)


async def test_one_statement_carries_about_max_rows_and_the_rest_follows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(chunklog, "MAX_ROWS_PER_STATEMENT", 5)
    repo = _Recording()
    a, b, c = await claimed(repo, 3)
    log = ChunkLog(repo, "w")
    writer = asyncio.create_task(log.run())
    try:
        # Bounded by tokens, not runs: 3 + 3 reaches the bound, the third entry waits.
        await asyncio.wait_for(
            asyncio.gather(
                log.append(
                    a, [ChunkRun(a, 0, "content", ("1", "2")), ChunkRun(a, 2, "content", ("3",))]
                ),
                log.append(b, [ChunkRun(b, 0, "content", ("1", "2", "3"))]),
                log.append(c, [ChunkRun(c, 0, "content", ("1", "2", "3"))]),
            ),
            5,
        )
        assert repo.statements == [6, 3] and log.stats.rows == 9
        # An empty run is no write at all.
        await asyncio.wait_for(log.append(a, [ChunkRun(a, 3, "content", ())]), 5)
        assert repo.statements == [6, 3]
        # A stream that sends an offset it already wrote is not durable (as before).
        with pytest.raises(LeaseLost):
            await asyncio.wait_for(log.append(a, [ChunkRun(a, 2, "content", ("3",))]), 5)
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
