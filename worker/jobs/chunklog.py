"""`ChunkLog`: the worker's one writer of durable stream state.

    stream A ─append─┐
    stream B ─append─┼─▶ pending ──one INSERT per flush (all streams)──▶ llm_request_chunks
    stream C ─append─┘                 (fenced by each lease)

- **Group commit.** Every stream of the worker awaits `append()`; one task writes all
  that is pending in a single multi-row statement, and while it runs the next group
  gathers. A stream waits for one commit, not one per stream, and the database sees
  one statement per flush whatever the number of streams.
- **Per batch.** A stream appends runs (`ChunkRun`, one per relay batch), sent as one
  JSON parameter and answered with one row: the worker's cost is per batch, while the
  table keeps its row per token for the readers.
- **Fenced.** The insert writes only the rows of requests whose lease this worker
  holds and never replaces an offset (see `append_chunks` in queries.sql). A stream
  whose rows did not all land gets `LeaseLost`: it must not broadcast them.
- **Outages.** A failed statement is retried with the one backoff generator; the
  streams wait (nothing is broadcast that is not durable). A stream that gives up
  (abort, lease lost) withdraws what was not yet in flight.
- **Recovery.** `recover(job)` is the heir's start: the row's snapshot plus every
  logged token after it, so it continues from exactly the last durable offset. Reads
  are grouped too: the streams that start while one read is in flight share the next
  statement (a burst of 1,000 claims read one at a time through a pool of 4 held the
  last stream's first token back by 17 s, and starved the writer of connections).
- **Retention.** Chunks of requests finished more than RELAY_CHUNK_RETENTION_S ago
  are deleted (the row holds the compacted transcript).
- **Final writes** (`write_final`): the end of a fully relayed stream is retried with
  backoff until it lands, so a finished answer is never generated twice.
"""

from __future__ import annotations

import asyncio
import contextlib
from asyncio import FIRST_COMPLETED
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from loguru import logger

from worker.backoff import backoff_delay
from worker.errors import LeaseLost, QueueError
from worker.jobs.models import Chunk, ChunkRun, Job, Snapshot
from worker.jobs.repository import JobRepository
from worker.transcript import StreamTranscript

RETRY_BASE_S = 0.05
RETRY_CAP_S = 2.0
FINAL_RETRY_BASE_S = 0.2
FINAL_RETRY_CAP_S = 5.0
PRUNE_INTERVAL_S = 60.0
# The most rows one statement carries (a backlog after an outage is written in parts).
MAX_ROWS_PER_STATEMENT = 20_000
# The most streams one recovery read covers. It bounds streams, not rows: heirs of long
# streams bring back their whole logged tails (a takeover after a crash, rare).
MAX_STREAMS_PER_READ = 200


@dataclass(slots=True)
class _Append:
    job_id: str
    runs: tuple[ChunkRun, ...]
    rows: int  # tokens in `runs`: what MAX_ROWS_PER_STATEMENT bounds
    done: asyncio.Future[None]


@dataclass(slots=True)
class _Read:
    job_id: str
    from_offset: int
    done: asyncio.Future[list[Chunk]]


@dataclass
class ChunkLogStats:
    statements: int = 0
    rows: int = 0
    failures: int = 0
    pruned: int = 0
    reads: int = 0  # recovery statements that answered (each for ≤ MAX_STREAMS_PER_READ)
    streams_per_statement: list[int] = field(default_factory=list)


class ChunkLog:
    """The write-ahead token log of one worker (see module docstring)."""

    def __init__(
        self,
        repository: JobRepository,
        worker: str,
        *,
        retention_s: float = 3600.0,
        prune_interval_s: float = PRUNE_INTERVAL_S,
    ) -> None:
        self._repo = repository
        self.worker = worker
        self.retention_s = retention_s
        self.prune_interval_s = prune_interval_s
        self._pending: list[_Append] = []
        self._wake = asyncio.Event()
        self._reads: list[_Read] = []
        self._reading: asyncio.Future[None] | None = None  # the read in flight
        self.stats = ChunkLogStats()
        self._log = logger.bind(event="chunk_log", worker=worker)

    # --- the streams' side ---

    async def append(self, job_id: str, runs: Sequence[ChunkRun]) -> None:
        """Return once every token of `runs` is durable.

        Raises:
            LeaseLost: not every token landed (another worker owns the request now, or
                an offset was already written).
        """
        kept = tuple(r for r in runs if r.texts)
        if not kept:
            return
        rows = sum(len(r.texts) for r in kept)
        entry = _Append(job_id, kept, rows, asyncio.get_running_loop().create_future())
        self._pending.append(entry)
        self._wake.set()
        try:
            await entry.done
        except asyncio.CancelledError:
            # Not yet in flight: withdrawn (never durable, never broadcast).
            with contextlib.suppress(ValueError):
                self._pending.remove(entry)
            raise

    async def recover(self, job: Job) -> Snapshot:
        """Where the heir of `job` continues: its row's snapshot plus the logged tail."""
        start = job.snapshot
        chunks = await self._read_tail(job.id, start.next_offset)
        t = StreamTranscript.resume(
            content=start.content, reasoning=start.reasoning, next_offset=start.next_offset
        )
        for chunk in chunks:
            if chunk.offset != t.next_offset:
                break  # cannot happen (offsets are written in order); never skip one
            t.add_token(chunk.kind, chunk.text)
        # One message carries at least one token: a number past any the dead worker used.
        next_seq = start.next_seq + t.tokens + 1 if t.tokens else start.next_seq
        return Snapshot(t.content, t.reasoning, t.next_offset, next_seq)

    async def _read_tail(self, job_id: str, from_offset: int) -> list[Chunk]:
        """The logged tokens of `job_id` from `from_offset` on, read in one statement
        with those of every stream that asks meanwhile.

        Raises:
            QueueError: the statement failed (each waiting stream gets it: its caller
                retries with the one backoff, and the retries group again).
        """
        loop = asyncio.get_running_loop()
        entry = _Read(job_id, from_offset, loop.create_future())
        self._reads.append(entry)
        try:
            while not entry.done.done():
                if self._reading is None:  # no read in flight: this stream reads for all
                    self._reading = loop.create_future()
                    try:
                        await self._read_group()
                    finally:
                        reading, self._reading = self._reading, None
                        reading.set_result(None)
                else:
                    # Woken by its own answer, or by the end of a read that could not
                    # take it (the bound): then one of those left over reads next.
                    # Not a lock: 1,000 waiters woken one by one took seconds.
                    await asyncio.wait((entry.done, self._reading), return_when=FIRST_COMPLETED)
        finally:
            if not entry.done.done():
                # Cancelled while waiting: nobody reads for it, and a read already in
                # flight must not leave an answer (or an error) nobody retrieves.
                entry.done.cancel()
                with contextlib.suppress(ValueError):
                    self._reads.remove(entry)
        return entry.done.result()

    async def _read_group(self) -> None:
        group = self._reads[:MAX_STREAMS_PER_READ]
        del self._reads[:MAX_STREAMS_PER_READ]
        starts: dict[str, int] = {}
        for e in group:
            starts[e.job_id] = min(e.from_offset, starts.get(e.job_id, e.from_offset))
        try:
            found = await self._repo.read_chunks_of(starts)
        except QueueError as exc:
            for e in group:
                if not e.done.done():
                    e.done.set_exception(exc)
            return
        except BaseException:
            # This reader was cancelled (or broke): the others wait for the next one.
            self._reads[:0] = [e for e in group if not e.done.done()]
            raise
        self.stats.reads += 1
        for e in group:
            if not e.done.done():
                e.done.set_result([c for c in found.get(e.job_id, ()) if c.offset >= e.from_offset])

    # --- the writer task (a supervised side task of the worker) ---

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_prune = loop.time() + self.prune_interval_s
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(next_prune - loop.time(), 0)):
                    await self._wake.wait()
            if loop.time() >= next_prune:
                next_prune = loop.time() + self.prune_interval_s
                await self._prune()
            while self._pending:
                await self._flush()
            self._wake.clear()

    async def _flush(self) -> None:
        group: list[_Append] = []
        rows = 0
        while self._pending and (not group or rows < MAX_ROWS_PER_STATEMENT):
            entry = self._pending.pop(0)
            if entry.done.done():
                continue
            group.append(entry)
            rows += entry.rows
        if not group:
            return
        attempt = 0
        while True:
            runs = [r for entry in group for r in entry.runs]
            try:
                written = await self._repo.append_chunks(worker=self.worker, runs=runs)
                break
            except QueueError as exc:
                self.stats.failures += 1
                attempt += 1
                if attempt == 1:
                    self._log.warning("token log write failed, retrying: {}", exc.message)
                await asyncio.sleep(backoff_delay(attempt, base_s=RETRY_BASE_S, cap_s=RETRY_CAP_S))
                group = [e for e in group if not e.done.done()]
                if not group:
                    return
        self.stats.statements += 1
        self.stats.rows += written.rows
        self.stats.streams_per_statement.append(len({e.job_id for e in group}))
        # `short` indexes `runs`: map each short run back to the entry that sent it.
        failed: set[int] = set()
        if written.short:
            owner = [k for k, entry in enumerate(group) for _ in entry.runs]
            failed = {owner[i] for i in written.short}
        for k, entry in enumerate(group):
            if entry.done.done():
                continue
            if k not in failed:
                entry.done.set_result(None)
            else:
                entry.done.set_exception(
                    LeaseLost("lease lost before the token log write", job_id=entry.job_id)
                )

    async def _prune(self) -> None:
        try:
            pruned = await self._repo.prune_chunks(retention_s=self.retention_s)
        except QueueError as exc:
            self._log.warning("token log retention failed: {}", exc.message)
            return
        self.stats.pruned += pruned
        if pruned:
            self._log.info("deleted {} logged tokens of finished requests", pruned)


async def write_final(
    write: Callable[[], Awaitable[None]],
    *,
    keep_trying: bool,
    on_failure: Callable[[QueueError, int], None],
    give_up_after: int = 5,
) -> bool:
    """Run a final row write (finish / release) until it lands.

    `keep_trying`: a fully relayed stream's end is retried with backoff for as long as
    it takes (callers shield it), because abandoning it would let another worker
    generate the whole answer again. Other writes give up after `give_up_after`
    attempts (the lease expires and the request is continued from the log).

    Returns:
        True when written; False when given up. `LeaseLost` and non-retryable
        `QueueError`s propagate.
    """
    attempt = 0
    while True:
        try:
            await write()
            return True
        except LeaseLost:
            raise
        except QueueError as exc:
            attempt += 1
            on_failure(exc, attempt)
            if not exc.retryable or (not keep_trying and attempt >= give_up_after):
                if not exc.retryable:
                    raise
                return False
            await asyncio.sleep(
                backoff_delay(attempt, base_s=FINAL_RETRY_BASE_S, cap_s=FINAL_RETRY_CAP_S)
            )
