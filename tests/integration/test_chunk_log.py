"""The write-ahead token log on the real Postgres: group commit, lease fencing,
recovery of the heir's start, the catch-up read through the PostgREST stand-in (RLS),
and retention."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from devstack.jwt import api_key, user_token
from devstack.postgrest import PostgrestServer
from worker.errors import LeaseLost
from worker.jobs import Appended, ChunkRun, NewRequest, PostgresJobRepository, Result, Snapshot
from worker.jobs.chunklog import ChunkLog

pytestmark = pytest.mark.integration

USER_A = "6f1b1c1e-0000-4000-8000-00000000000a"
USER_B = "6f1b1c1e-0000-4000-8000-00000000000b"
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
async def rest(database_url: str) -> AsyncIterator[TestClient[Any, Any]]:
    app = web.Application()
    PostgrestServer(database_url).add_routes(app)
    async with TestClient(TestServer(app, host="127.0.0.1", port=0)) as client:
        yield client


async def claimed(
    repo: PostgresJobRepository, worker: str, n: int, lease_s: float = 30
) -> list[str]:
    ids = [(await repo.submit_as(USER_A, NewRequest(HELLO))).id for _ in range(n)]
    jobs = await repo.claim(worker=worker, limit=100, lease_s=lease_s, max_attempts=3)
    mine = [j.id for j in jobs if j.id in ids]
    assert sorted(mine) == sorted(ids)
    return ids


def as_user(user: str) -> dict[str, str]:
    return {"apikey": api_key("anon"), "Authorization": f"Bearer {user_token(user)}"}


def chunks(job_id: str, start: int, texts: list[str], kind: str = "content") -> list[ChunkRun]:
    return [ChunkRun(job_id, start, kind, tuple(texts))]


@pytest.fixture
async def log(repo: PostgresJobRepository) -> AsyncIterator[ChunkLog]:
    chunk_log = ChunkLog(repo, "w1")
    task = asyncio.create_task(chunk_log.run())
    try:
        yield chunk_log
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_streams_of_a_worker_are_written_in_one_statement(
    repo: PostgresJobRepository, log: ChunkLog
) -> None:
    a, b = await claimed(repo, "w1", 2)
    before = log.stats.statements
    await asyncio.gather(
        log.append(a, chunks(a, 0, ["He", "llo"])),
        log.append(b, chunks(b, 0, ["thinking"], kind="reasoning")),
    )
    assert log.stats.statements == before + 1 and log.stats.streams_per_statement[-1] == 2
    assert [(c.offset, c.text) for c in await repo.read_chunks(a, 0)] == [(0, "He"), (1, "llo")]
    assert [(c.kind, c.text) for c in await repo.read_chunks(b, 0)] == [("reasoning", "thinking")]


async def test_one_read_brings_each_request_its_own_tail(
    repo: PostgresJobRepository, log: ChunkLog
) -> None:
    a, b, c = await claimed(repo, "w1", 3)
    await log.append(a, chunks(a, 0, ["a0", "a1", "a2"]))
    await log.append(b, chunks(b, 0, ["b0", "b1"]))
    tails = await repo.read_chunks_of({a: 1, b: 2, c: 0})
    # b has nothing at or after 2 and c nothing at all: both are left out.
    assert {k: [(ch.offset, ch.text) for ch in v] for k, v in tails.items()} == {
        a: [(1, "a1"), (2, "a2")]
    }
    assert await repo.read_chunks_of({}) == {}


async def test_a_worker_whose_lease_was_reclaimed_writes_nothing(
    repo: PostgresJobRepository, log: ChunkLog
) -> None:
    [job] = await claimed(repo, "w1", 1, lease_s=0.05)
    await log.append(job, chunks(job, 0, ["a", "b"]))
    await asyncio.sleep(0.1)
    reclaimed = await repo.claim(worker="w2", limit=100, lease_s=30, max_attempts=3)
    assert job in [j.id for j in reclaimed]
    with pytest.raises(LeaseLost):
        await log.append(job, chunks(job, 2, ["zombie"]))
    # An offset, once written, is never replaced (even by the owner).
    appended = await repo.append_chunks(worker="w2", runs=chunks(job, 1, ["B", "c"]))
    assert appended == Appended(rows=1, short=frozenset({0}))
    assert [(c.offset, c.text) for c in await repo.read_chunks(job, 0)] == [
        (0, "a"),
        (1, "b"),
        (2, "c"),
    ]


async def test_the_heir_starts_at_the_last_durable_offset(
    repo: PostgresJobRepository, log: ChunkLog
) -> None:
    [job_id] = await claimed(repo, "w1", 1, lease_s=0.05)
    await repo.checkpoint(
        worker="w1", job_id=job_id, snapshot=Snapshot("Hi", "hm", next_offset=2, next_seq=2)
    )
    await log.append(job_id, chunks(job_id, 0, ["hm"], "reasoning") + chunks(job_id, 1, ["Hi"]))
    await log.append(job_id, chunks(job_id, 2, [" there", "!"]))
    await asyncio.sleep(0.1)
    [heir] = [
        j
        for j in await repo.claim(worker="w2", limit=100, lease_s=30, max_attempts=3)
        if j.id == job_id
    ]
    start = await ChunkLog(repo, "w2").recover(heir)
    assert (start.content, start.reasoning, start.next_offset) == ("Hi there!", "hm", 4)
    assert start.next_seq > 2  # past any message number the dead worker may have used


async def test_a_user_reads_the_log_of_their_own_requests_from_an_offset(
    repo: PostgresJobRepository, log: ChunkLog, rest: TestClient[Any, Any]
) -> None:
    [job_id] = await claimed(repo, "w1", 1)
    await log.append(job_id, chunks(job_id, 0, ["a", "b", "c", "d"]))
    query = (
        f"/rest/v1/llm_request_chunks?select=token_offset,kind,text&request_id=eq.{job_id}"
        "&token_offset=gte.2&order=token_offset"
    )
    own = await rest.get(query, headers=as_user(USER_A))
    assert own.status == 200
    assert await own.json() == [
        {"token_offset": 2, "kind": "content", "text": "c"},
        {"token_offset": 3, "kind": "content", "text": "d"},
    ]
    other = await rest.get(query, headers=as_user(USER_B))
    assert other.status == 200 and await other.json() == []
    anon = await rest.get(query, headers={"apikey": api_key("anon")})
    # Supabase grants public tables to anon by default: RLS (no anon policy) hides all
    assert anon.status == 200 and await anon.json() == []


async def test_the_log_of_a_finished_request_is_deleted_after_the_retention(
    repo: PostgresJobRepository, log: ChunkLog
) -> None:
    [job_id] = await claimed(repo, "w1", 1)
    await log.append(job_id, chunks(job_id, 0, ["x", "y"]))
    assert await repo.prune_chunks(retention_s=0) >= 0
    assert len(await repo.read_chunks(job_id, 0)) == 2  # still running: kept
    final = Snapshot("xy", "", next_offset=2, next_seq=3)
    await repo.finish(worker="w1", job_id=job_id, result=Result("done", final, "stop"))
    assert await repo.prune_chunks(retention_s=3600) >= 0
    assert len(await repo.read_chunks(job_id, 0)) == 2  # within the retention: kept
    await asyncio.sleep(0.05)
    assert await repo.prune_chunks(retention_s=0.01) >= 2
    assert await repo.read_chunks(job_id, 0) == []
    record = await repo.get(job_id)
    assert record is not None and record.snapshot.content == "xy"  # the compacted row


# Everything a token may hold once made storable upstream (NUL and lone surrogates are
# U+FFFD by then): JSON's escapes, multi-byte and astral characters, and one token far
# longer than any a model sends.
WORST_CASE_TEXTS = [
    "\ufffd",
    'say "hi"',
    "back\\slash \\u0000 \\n",
    "line\nbreak\r\n\ttab",
    "\x01\x1f\x7f",
    "🦀 café 世界 \u2028\u2029",
    "",
    "x" * 30_000,
    "\ufffd🦀\ufffd" * 1000,
]


async def test_a_run_of_the_worst_texts_round_trips_byte_exact(
    repo: PostgresJobRepository, log: ChunkLog, rest: TestClient[Any, Any]
) -> None:
    [job_id] = await claimed(repo, "w1", 1)
    await log.append(job_id, chunks(job_id, 0, WORST_CASE_TEXTS, kind="reasoning"))
    read = await repo.read_chunks(job_id, 0)
    assert [(c.offset, c.kind) for c in read] == [
        (i, "reasoning") for i in range(len(WORST_CASE_TEXTS))
    ]
    assert [c.text.encode() for c in read] == [t.encode() for t in WORST_CASE_TEXTS]
    # The clients' read (PostgREST, one row per token) sees the same bytes.
    got = await rest.get(
        f"/rest/v1/llm_request_chunks?select=token_offset,text&request_id=eq.{job_id}"
        "&order=token_offset",
        headers=as_user(USER_A),
    )
    assert got.status == 200
    assert [row["text"].encode() for row in await got.json()] == [
        t.encode() for t in WORST_CASE_TEXTS
    ]


async def test_a_run_partly_over_a_written_offset_is_lease_lost_and_replaces_nothing(
    repo: PostgresJobRepository, log: ChunkLog
) -> None:
    [job] = await claimed(repo, "w1", 1)
    await log.append(job, chunks(job, 0, ["a", "b"]))
    with pytest.raises(LeaseLost):
        await log.append(job, chunks(job, 1, ["B", "c", "d"]))
    # As before: the free offsets of the run landed, the taken one kept its token.
    assert [(c.offset, c.text) for c in await repo.read_chunks(job, 0)] == [
        (0, "a"),
        (1, "b"),
        (2, "c"),
        (3, "d"),
    ]
    # The same owner sending the same offsets again: nothing lands, so not durable.
    with pytest.raises(LeaseLost):
        await log.append(job, chunks(job, 2, ["c", "d"]))


async def test_in_one_statement_only_the_stream_whose_lease_was_taken_is_lease_lost(
    repo: PostgresJobRepository, log: ChunkLog
) -> None:
    kept, taken = await claimed(repo, "w1", 2)
    await log.append(taken, chunks(taken, 0, ["t"]))
    async with repo.driver.connection() as conn:
        await conn.execute(
            "UPDATE public.llm_requests SET lease_owner = 'w2' WHERE id = %(id)s", {"id": taken}
        )
    before = log.stats.statements
    results = await asyncio.gather(
        log.append(kept, chunks(kept, 0, ["k0", "k1"]) + chunks(kept, 2, ["r"], "reasoning")),
        log.append(taken, chunks(taken, 1, ["zombie", "more"])),
        return_exceptions=True,
    )
    assert log.stats.statements == before + 1
    assert results[0] is None and isinstance(results[1], LeaseLost)
    assert [(c.offset, c.kind, c.text) for c in await repo.read_chunks(kept, 0)] == [
        (0, "content", "k0"),
        (1, "content", "k1"),
        (2, "reasoning", "r"),
    ]
    assert [c.text for c in await repo.read_chunks(taken, 0)] == ["t"]  # nothing written


async def test_the_runs_of_one_stream_in_one_statement_are_judged_each_on_its_own(
    repo: PostgresJobRepository, log: ChunkLog
) -> None:
    [job] = await claimed(repo, "w1", 1)
    await log.append(job, chunks(job, 0, ["a"]))
    # Writes are pipelined: a stream's next batches may share a statement with the
    # ones before. Only the one over a taken offset is not durable.
    before = log.stats.statements
    results = await asyncio.gather(
        log.append(job, chunks(job, 1, ["b", "c"])),
        log.append(job, chunks(job, 0, ["A", "x"])),
        log.append(job, chunks(job, 5, ["f"])),
        return_exceptions=True,
    )
    assert log.stats.statements == before + 1
    assert results[0] is None and isinstance(results[1], LeaseLost) and results[2] is None
    assert [(c.offset, c.text) for c in await repo.read_chunks(job, 0)] == [
        (0, "a"),
        (1, "b"),
        (2, "c"),
        (5, "f"),
    ]


async def test_an_offset_two_runs_of_one_statement_carry_counts_for_both(
    repo: PostgresJobRepository,
) -> None:
    # As when every written key came back: each run's offsets were all written by
    # this statement (once), so neither is short.
    [job] = await claimed(repo, "w1", 1)
    runs = chunks(job, 0, ["a", "b"]) + chunks(job, 1, ["B", "c"])
    assert await repo.append_chunks(worker="w1", runs=runs) == Appended(3, frozenset())
    assert [c.text for c in await repo.read_chunks(job, 0)] == ["a", "b", "c"]
    assert await repo.append_chunks(worker="w1", runs=[]) == Appended(0, frozenset())
