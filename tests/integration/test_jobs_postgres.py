"""The queue on real Postgres: claims, leases, fencing, sweep, NOTIFY, user side."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest

from worker.errors import LeaseLost, QueueError
from worker.jobs import NewRequest, Notification, PostgresJobRepository, Result, Snapshot

pytestmark = pytest.mark.integration

USER_A = "6f1b1c1e-0000-4000-8000-00000000000a"
USER_B = "6f1b1c1e-0000-4000-8000-00000000000b"
HELLO = [{"role": "user", "content": "hello"}]


async def _claim(repo: PostgresJobRepository, worker: str, limit: int = 10, lease_s: float = 30):
    return await repo.claim(worker=worker, limit=limit, lease_s=lease_s, max_attempts=3)


async def test_submit_claim_checkpoint_finish(repo: PostgresJobRepository) -> None:
    submitted = await repo.submit_as(USER_A, NewRequest(HELLO, params={"max_tokens": 5}))
    [job] = await _claim(repo, "w1")
    assert (job.id, job.session_id, job.owner) == (submitted.id, submitted.session_id, USER_A)
    assert job.attempts == 1 and job.messages == HELLO and job.params == {"max_tokens": 5}
    assert job.snapshot == Snapshot() and not job.resumed
    assert await _claim(repo, "w2") == []  # leased

    snap = Snapshot(content="Hi", reasoning="hm", next_offset=3, next_seq=2)
    assert await repo.checkpoint(worker="w1", job_id=job.id, snapshot=snap) is False
    seen = await repo.get_as(USER_A, job.id)
    assert seen is not None and seen.snapshot == snap and seen.status == "running"

    final = Snapshot(content="Hi there", reasoning="hm", next_offset=5, next_seq=3)
    usage = {"completion_tokens": 5}
    await repo.finish(worker="w1", job_id=job.id, result=Result("done", final, "stop", usage))
    record = await repo.get(job.id)
    assert record is not None
    assert (record.status, record.finish_reason, record.usage) == ("done", "stop", usage)
    assert record.snapshot == final and record.lease_owner is None
    with pytest.raises(LeaseLost):
        await repo.checkpoint(worker="w1", job_id=job.id, snapshot=final)


async def test_expired_lease_is_reclaimed_and_the_old_owner_is_fenced(
    repo: PostgresJobRepository,
) -> None:
    submitted = await repo.submit_as(USER_A, NewRequest(HELLO))
    [first] = await _claim(repo, "w1", lease_s=0.05)
    partial = Snapshot(content="t0 t1 ", next_offset=2, next_seq=2)
    await repo.checkpoint(worker="w1", job_id=first.id, snapshot=partial)
    await asyncio.sleep(0.1)
    [second] = await _claim(repo, "w2")
    assert second.id == submitted.id and second.attempts == 2
    assert second.snapshot == partial and second.resumed
    with pytest.raises(LeaseLost):
        await repo.checkpoint(worker="w1", job_id=first.id, snapshot=partial)
    assert await repo.heartbeat(worker="w1", ids=[first.id], lease_s=30) == {}
    assert await repo.heartbeat(worker="w2", ids=[first.id], lease_s=30) == {first.id: False}


async def test_attempts_cap_fails_an_expired_request(repo: PostgresJobRepository) -> None:
    submitted = await repo.submit_as(USER_A, NewRequest(HELLO))
    for attempt in (1, 2):
        [job] = await repo.claim(worker=f"w{attempt}", limit=1, lease_s=0.02, max_attempts=2)
        assert job.attempts == attempt
        await asyncio.sleep(0.05)
    assert await repo.claim(worker="w3", limit=1, lease_s=1, max_attempts=2) == []
    assert [(s.id, s.status) for s in await repo.sweep(max_attempts=2)] == [
        (submitted.id, "failed")
    ]
    record = await repo.get(submitted.id)
    assert record is not None and record.status == "failed" and record.error is not None
    assert record.error["type"] == "attempts_exhausted"


async def test_release_refunds_a_drained_attempt_and_keeps_the_snapshot(
    repo: PostgresJobRepository,
) -> None:
    await repo.submit_as(USER_A, NewRequest(HELLO))
    [job] = await _claim(repo, "w1")
    snap = Snapshot(content="abc", next_offset=3, next_seq=1)
    await repo.release(worker="w1", job_id=job.id, snapshot=snap, refund_attempt=True)
    [again] = await _claim(repo, "w2")
    assert again.attempts == 1 and again.snapshot == snap
    error = {"type": "server_error", "message": "502", "retryable": True}
    await repo.release(worker="w2", job_id=job.id, snapshot=snap, refund_attempt=False, error=error)
    record = await repo.get(job.id)
    assert record is not None and record.attempts == 1 and record.error == error
    with pytest.raises(LeaseLost):
        await repo.release(worker="w2", job_id=job.id, snapshot=snap, refund_attempt=True)


async def test_cancel_queued_and_running(repo: PostgresJobRepository) -> None:
    queued = await repo.submit_as(USER_A, NewRequest(HELLO))
    assert await repo.cancel_as(USER_B, queued.id) is None  # not B's
    assert await repo.cancel_as(USER_A, queued.id) == "cancelled"
    assert await _claim(repo, "w1") == []

    running = await repo.submit_as(USER_A, NewRequest(HELLO))
    [job] = await _claim(repo, "w1")
    assert await repo.cancel_as(USER_A, running.id) == "running"
    assert await repo.cancel_requested([job.id]) == {job.id}
    snap = Snapshot(content="x", next_offset=1, next_seq=1)
    assert await repo.checkpoint(worker="w1", job_id=job.id, snapshot=snap) is True
    assert await repo.heartbeat(worker="w1", ids=[job.id], lease_s=30) == {job.id: True}


async def test_sweep_settles_a_cancelled_request_whose_worker_died(
    repo: PostgresJobRepository,
) -> None:
    submitted = await repo.submit_as(USER_A, NewRequest(HELLO))
    await repo.claim(worker="w1", limit=1, lease_s=0.02, max_attempts=3)
    await repo.cancel_as(USER_A, submitted.id)
    await asyncio.sleep(0.05)
    assert await _claim(repo, "w2") == []
    assert [(s.id, s.status) for s in await repo.sweep(max_attempts=3)] == [
        (submitted.id, "cancelled")
    ]


async def test_listen_hears_inserts_releases_and_cancels(repo: PostgresJobRepository) -> None:
    heard: asyncio.Queue[Notification] = asyncio.Queue()
    ready = asyncio.Event()
    listener = asyncio.create_task(
        repo.listen(heard.put_nowait, lambda ok: ready.set() if ok else None)
    )
    try:
        await asyncio.wait_for(ready.wait(), 10)
        submitted = await repo.submit_as(USER_A, NewRequest(HELLO))
        assert await asyncio.wait_for(heard.get(), 10) == Notification("queued", submitted.id)
        [job] = await _claim(repo, "w1")
        await repo.cancel_as(USER_A, job.id)
        assert await asyncio.wait_for(heard.get(), 10) == Notification("cancel", job.id)
        await repo.release(worker="w1", job_id=job.id, snapshot=Snapshot(), refund_attempt=True)
        assert await asyncio.wait_for(heard.get(), 10) == Notification("queued", job.id)
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)


async def test_listen_reconnects_after_its_connection_is_killed(
    repo: PostgresJobRepository, database_url: str
) -> None:
    heard: asyncio.Queue[Notification] = asyncio.Queue()
    states: asyncio.Queue[bool] = asyncio.Queue()
    listener = asyncio.create_task(repo.listen(heard.put_nowait, states.put_nowait))
    try:
        assert await asyncio.wait_for(states.get(), 10) is True
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as admin:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"
            )
        assert await asyncio.wait_for(states.get(), 10) is False
        assert await asyncio.wait_for(states.get(), 10) is True
        submitted = await repo.submit_as(USER_A, NewRequest(HELLO))
        assert await asyncio.wait_for(heard.get(), 10) == Notification("queued", submitted.id)
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)


async def test_a_session_belongs_to_its_first_user(repo: PostgresJobRepository) -> None:
    session = str(uuid.uuid4())
    first = await repo.submit_as(USER_A, NewRequest(HELLO, session_id=session))
    second = await repo.submit_as(USER_A, NewRequest(HELLO, session_id=session))
    assert first.session_id == second.session_id == session
    with pytest.raises(QueueError, match="belongs to another user"):
        await repo.submit_as(USER_B, NewRequest(HELLO, session_id=session))


async def test_claims_are_oldest_first_and_limited(repo: PostgresJobRepository) -> None:
    ids = [(await repo.submit_as(USER_A, NewRequest(HELLO))).id for _ in range(5)]
    first = await _claim(repo, "w1", limit=2)
    rest = await _claim(repo, "w2", limit=10)
    assert [j.id for j in first] == ids[:2]
    assert [j.id for j in rest] == ids[2:]


async def test_unreachable_database_is_a_queue_error() -> None:
    repository = PostgresJobRepository.from_url(
        "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1", pool_size=1
    )
    with pytest.raises(QueueError) as info:
        await repository.check()
    assert info.value.retryable
    await repository.close()
