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
from worker.jobs import Chunk, NewRequest, PostgresJobRepository, Result, Snapshot
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


def chunks(job_id: str, start: int, texts: list[str], kind: str = "content") -> list[Chunk]:
    return [Chunk(job_id, start + i, kind, t) for i, t in enumerate(texts)]


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
    assert await repo.append_chunks(worker="w2", chunks=chunks(job, 1, ["B", "c"])) == {(job, 2)}
    assert [c.text for c in await repo.read_chunks(job, 0)] == ["a", "b", "c"]


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
