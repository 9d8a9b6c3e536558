"""A runner that reports it is behind makes the worker leave new requests in the queue
(issue 16: the queue, not an overloaded worker, absorbs the excess)."""

from __future__ import annotations

import asyncio

from tests.unit.test_service_worker import (
    HELLO,
    fast_settings,
    finished,
    running,
    status,
    wait_until,
)
from worker.jobs.models import Job, NewRequest
from worker.jobs.testing import InMemoryJobRepository
from worker.service.context import Outcome, ReportsLag, StreamContext
from worker.service.testing import ScriptedRunner
from worker.service.worker import Worker


class LaggingRunner:
    def __init__(self) -> None:
        self.scripted = ScriptedRunner(tokens=3, delay_s=0.001)
        self.behind = True

    async def __call__(self, job: Job, ctx: StreamContext) -> Outcome:
        return await self.scripted(job, ctx)


async def test_no_claims_while_the_runner_is_behind() -> None:
    repo = InMemoryJobRepository()
    runner = LaggingRunner()
    assert isinstance(runner, ReportsLag)
    ids = [repo.add(NewRequest(HELLO)) for _ in range(3)]
    worker = Worker(repo, runner, fast_settings())
    async with running(worker):
        polls = 0
        while polls < 10:  # ten poll periods of 50 ms, each one a claim attempt
            await asyncio.sleep(0.05)
            polls += 1
            assert all(status(repo, i) == "queued" for i in ids)
        assert runner.scripted.started == []
        runner.behind = False
        await wait_until(finished(repo, *ids))
    assert sorted(runner.scripted.started) == sorted(ids)
