"""The heirs' reads of the write-ahead log are grouped: streams that start together
share one statement, each still gets exactly its own tail, and a failed or cancelled
read loses no waiting stream."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from worker.errors import QueueError
from worker.jobs import chunklog
from worker.jobs.chunklog import ChunkLog
from worker.jobs.models import Chunk, ChunkRun, Job, NewRequest, Snapshot
from worker.jobs.testing import InMemoryJobRepository


class SlowReads(InMemoryJobRepository):
    """Each read takes a while (a loaded pool), so that starts pile up behind it."""

    def __init__(self, delay_s: float = 0.02) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.read_sizes: list[int] = []
        self.failing: set[int] = set()  # the indexes of the reads that fail
        self.started = asyncio.Event()

    async def read_chunks_of(self, starts: Mapping[str, int]) -> dict[str, list[Chunk]]:
        index = len(self.read_sizes)
        self.read_sizes.append(len(starts))
        self.started.set()
        await asyncio.sleep(self.delay_s)
        if index in self.failing:
            raise QueueError("queue database unavailable: couldn't get a connection")
        return await super().read_chunks_of(starts)


async def claimed_with_logs(repo: InMemoryJobRepository, n: int) -> list[Job]:
    ids = [repo.add(NewRequest([{"role": "user", "content": "hi"}])) for _ in range(n)]
    jobs = await repo.claim(worker="w", limit=n, lease_s=30, max_attempts=3)
    runs = [
        ChunkRun(job_id, 0, "content", tuple(f"{k}." for _ in range(k)))
        for k, job_id in enumerate(ids)
        if k
    ]
    await repo.append_chunks(worker="w", runs=runs)
    return sorted(jobs, key=lambda j: ids.index(j.id))


async def first_read_in_flight(
    n: int, *, failing: set[int] | frozenset[int] = frozenset()
) -> tuple[SlowReads, list[Job], ChunkLog, asyncio.Future[Snapshot]]:
    """`n` logged streams and their log; the first one's read (index 0) under way."""
    repo = SlowReads(delay_s=0.05)
    repo.failing = set(failing)
    jobs = await claimed_with_logs(repo, n)
    log = ChunkLog(repo, "w")
    first = asyncio.ensure_future(log.recover(jobs[0]))
    await repo.started.wait()
    return repo, jobs, log, first


async def test_streams_starting_together_share_one_read_and_each_gets_its_own_tail() -> None:
    repo = SlowReads()
    jobs = await claimed_with_logs(repo, 50)
    log = ChunkLog(repo, "w")
    starts = await asyncio.gather(*(log.recover(job) for job in jobs))
    # The first asks alone; the 49 that came while it read share the second statement.
    assert repo.read_sizes == [1, 49]
    assert log.stats.reads == 2
    for k, start in enumerate(starts):
        assert (start.content, start.next_offset) == (f"{k}." * k, k)


async def test_a_read_covers_at_most_the_bound_of_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunklog, "MAX_STREAMS_PER_READ", 8)
    repo = SlowReads()
    jobs = await claimed_with_logs(repo, 20)
    log = ChunkLog(repo, "w")
    starts = await asyncio.gather(*(log.recover(job) for job in jobs))
    assert repo.read_sizes == [1, 8, 8, 3]
    assert [s.next_offset for s in starts] == list(range(20))


async def test_a_failed_read_fails_every_stream_waiting_for_it() -> None:
    repo = SlowReads()
    jobs = await claimed_with_logs(repo, 4)
    log = ChunkLog(repo, "w")
    repo.failing = {1}
    results = await asyncio.gather(*(log.recover(job) for job in jobs), return_exceptions=True)
    # The first read (the first stream's) landed; the second, for the three that came
    # meanwhile, failed: each of them gets the error, for its caller to retry.
    assert repo.read_sizes == [1, 3]
    assert not isinstance(results[0], BaseException) and results[0].next_offset == 0
    assert all(isinstance(r, QueueError) for r in results[1:])
    again = await asyncio.gather(*(log.recover(job) for job in jobs[1:]))
    assert [s.next_offset for s in again] == [1, 2, 3]


async def test_a_reader_cancelled_mid_read_leaves_the_others_to_the_next_read() -> None:
    repo, jobs, log, first = await first_read_in_flight(4)
    rest = [asyncio.ensure_future(log.recover(job)) for job in jobs[1:]]
    await asyncio.sleep(0)
    repo.started.clear()
    second_reader = rest[0]
    await asyncio.sleep(0.06)  # the first read is done; the second (for 3) is under way
    await repo.started.wait()
    second_reader.cancel()
    assert (await first).next_offset == 0
    with pytest.raises(asyncio.CancelledError):
        await second_reader
    async with asyncio.timeout(5):
        assert [(await r).next_offset for r in rest[1:]] == [2, 3]
    assert repo.read_sizes == [1, 3, 2]


async def test_a_stream_cancelled_while_waiting_is_not_read_for() -> None:
    repo, jobs, log, first = await first_read_in_flight(3)
    gone = asyncio.ensure_future(log.recover(jobs[1]))
    kept = asyncio.ensure_future(log.recover(jobs[2]))
    await asyncio.sleep(0)
    gone.cancel()
    assert (await first).next_offset == 0
    assert (await kept).next_offset == 2
    assert gone.cancelled()
    assert repo.read_sizes == [1, 1]


class GatedReads(InMemoryJobRepository):
    """Each read waits for a permit: the test decides when a statement returns."""

    def __init__(self) -> None:
        super().__init__()
        self.permits: asyncio.Queue[None] = asyncio.Queue()
        self.reads = 0
        self.read_started = asyncio.Event()

    async def read_chunks_of(self, starts: Mapping[str, int]) -> dict[str, list[Chunk]]:
        self.reads += 1
        self.read_started.set()
        await self.permits.get()
        return await super().read_chunks_of(starts)


async def test_the_streams_one_read_answered_resume_together_not_one_by_one() -> None:
    repo = GatedReads()
    jobs = await claimed_with_logs(repo, 101)
    log = ChunkLog(repo, "w")
    first = asyncio.ensure_future(log.recover(jobs[0]))
    await asyncio.sleep(0)
    others = [asyncio.ensure_future(log.recover(job)) for job in jobs[1:]]
    for _ in range(3):
        await asyncio.sleep(0)
    repo.read_started.clear()
    repo.permits.put_nowait(None)  # the first read returns; the 100 share the second
    async with asyncio.timeout(5):
        await first
        await repo.read_started.wait()
    assert repo.reads == 2
    repo.permits.put_nowait(None)
    # A handful of loop turns, not one per waiter (a lock handed from waiter to waiter
    # took one turn each: seconds for 1,000 streams on a busy loop).
    turns = 0
    while not all(t.done() for t in others):
        await asyncio.sleep(0)
        turns += 1
        assert turns < 10
    assert [t.result().next_offset for t in others] == list(range(1, 101))


async def test_a_stream_cancelled_during_a_failed_read_leaves_no_unread_error() -> None:
    repo, jobs, log, first = await first_read_in_flight(3, failing={1})
    unread: list[str] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: unread.append(str(context["message"])))
    repo.started.clear()
    waiting = [asyncio.ensure_future(log.recover(job)) for job in jobs[1:]]
    await repo.started.wait()  # the second read (for both) is in flight
    waiting[1].cancel()
    assert (await first).next_offset == 0
    with pytest.raises(QueueError):
        await waiting[0]
    with pytest.raises(asyncio.CancelledError):
        await waiting[1]
    del waiting
    import gc

    gc.collect()  # an unread exception is reported when its future is collected
    await asyncio.sleep(0)
    loop.set_exception_handler(None)
    assert unread == []
