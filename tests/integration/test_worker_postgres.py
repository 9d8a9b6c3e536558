"""Workers on real Postgres, in process: exclusivity, validation, cancellation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from worker.config import Settings
from worker.jobs import JobRecord, NewRequest, PostgresJobRepository
from worker.service.testing import ScriptedRunner, scripted_text
from worker.service.worker import Worker

pytestmark = pytest.mark.integration

USER_A = "6f1b1c1e-0000-4000-8000-00000000000a"
HELLO = [{"role": "user", "content": "hello"}]
WAIT_S = 20.0


def fast_settings(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "relay_poll_interval_s": 0.2,
        "relay_heartbeat_interval_s": 0.2,
        "relay_checkpoint_interval_s": 0.1,
        "relay_lease_s": 5.0,
        "relay_grace_period_s": 2.0,
        "relay_concurrency": 4,
    }
    return Settings(_env_file=None, **(values | overrides))


@asynccontextmanager
async def worker_on(
    settings: Settings, runner: ScriptedRunner, worker_id: str
) -> AsyncIterator[Worker]:
    assert settings.database_url
    repo = PostgresJobRepository.from_url(settings.database_url, pool_size=2)
    worker = Worker(repo, runner, settings, worker_id=worker_id)
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, WAIT_S)
        await repo.close()


async def wait_for_rows(
    repo: PostgresJobRepository,
    ids: list[str],
    done: Callable[[JobRecord], bool],
    within_s: float = WAIT_S,
) -> list[JobRecord]:
    async with asyncio.timeout(within_s):
        while True:
            records = [await repo.get(i) for i in ids]
            if all(r is not None and done(r) for r in records):
                return [r for r in records if r is not None]
            await asyncio.sleep(0.05)


def is_final(record: JobRecord) -> bool:
    return record.status in ("done", "failed", "cancelled")


async def test_two_workers_never_process_the_same_request(
    database_url: str, repo: PostgresJobRepository
) -> None:
    ids = [(await repo.submit_as(USER_A, NewRequest(HELLO))).id for _ in range(40)]
    runners = [ScriptedRunner(tokens=4, delay_s=0.002) for _ in range(2)]
    settings = fast_settings(database_url)
    async with worker_on(settings, runners[0], "w-one"), worker_on(settings, runners[1], "w-two"):
        records = await wait_for_rows(repo, ids, is_final)
    started = runners[0].started + runners[1].started
    assert len(started) == len(set(started)) == 40
    assert set(started) == set(ids)
    for record in records:
        assert (record.status, record.attempts) == ("done", 1)
        assert record.snapshot.content == scripted_text(0, 4)


async def test_a_malformed_request_is_failed_and_the_next_one_is_served(
    database_url: str, repo: PostgresJobRepository
) -> None:
    bad = await repo.submit_as(USER_A, NewRequest(HELLO, model="not-on-the-list"))
    good = await repo.submit_as(USER_A, NewRequest(HELLO))
    settings = fast_settings(database_url, relay_allowed_models="gpt-4o-mini")
    async with worker_on(settings, ScriptedRunner(tokens=3, delay_s=0.001), "w"):
        bad_row, good_row = await wait_for_rows(repo, [bad.id, good.id], is_final)
    assert bad_row.status == "failed"
    assert bad_row.error == {
        "type": "bad_request",
        "field": "model",
        "message": "model 'not-on-the-list' is not allowed on this worker",
        "retryable": False,
    }
    assert good_row.status == "done"
    seen = await repo.get_as(USER_A, bad.id)  # the owner can read the reason
    assert seen is not None and seen.error == bad_row.error


async def test_the_owner_cancels_a_running_stream(
    database_url: str, repo: PostgresJobRepository
) -> None:
    submitted = await repo.submit_as(USER_A, NewRequest(HELLO))
    runner = ScriptedRunner(tokens=100_000, delay_s=0.005)
    async with worker_on(fast_settings(database_url), runner, "w"):
        await wait_for_rows(repo, [submitted.id], lambda r: r.snapshot.next_offset >= 5)
        asked = time.monotonic()
        assert await repo.cancel_as(USER_A, submitted.id) == "running"
        [record] = await wait_for_rows(repo, [submitted.id], is_final)
        took = time.monotonic() - asked
    assert took < 1.5  # NOTIFY -> abort -> final write; generous for a busy machine
    assert (record.status, record.finish_reason) == ("cancelled", "cancelled")
    assert runner.statuses == [(submitted.id, "cancelled")]
    assert record.snapshot.content == scripted_text(0, record.snapshot.next_offset)
