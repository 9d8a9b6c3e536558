"""A runner that reports it is behind makes the worker leave new requests in the queue
(issue 16: the queue, not an overloaded worker, absorbs the excess)."""

from __future__ import annotations

import asyncio

import pytest

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
from worker.service import worker as worker_module
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


class ClaimLog(InMemoryJobRepository):
    """Records each claim that took rows: (loop time, rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.claims: list[tuple[float, int]] = []

    async def claim(
        self, *, worker: str, limit: int, lease_s: float, max_attempts: int
    ) -> list[Job]:
        jobs = await super().claim(
            worker=worker, limit=limit, lease_s=lease_s, max_attempts=max_attempts
        )
        if jobs:
            self.claims.append((asyncio.get_running_loop().time(), len(jobs)))
        return jobs


class FillingRunner:
    """Behind once it holds `capacity` streams; they end when the test says so."""

    def __init__(self, capacity: int) -> None:
        self.scripted = ScriptedRunner(tokens=1, delay_s=0.001)
        self.capacity = capacity
        self.active = 0
        self.started = 0
        self.release = asyncio.Event()

    @property
    def behind(self) -> bool:
        return self.active >= self.capacity

    async def __call__(self, job: Job, ctx: StreamContext) -> Outcome:
        self.active += 1
        self.started += 1
        try:
            await self.release.wait()
            return await self.scripted(job, ctx)
        finally:
            self.active -= 1


async def test_a_burst_is_admitted_a_step_at_a_time_until_the_relay_is_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker_module, "CLAIM_STEP", 50)
    monkeypatch.setattr(worker_module, "CLAIM_SETTLE_S", 0.2)
    repo = ClaimLog()
    runner = FillingRunner(capacity=60)
    ids = [repo.add(NewRequest(HELLO)) for _ in range(200)]
    worker = Worker(repo, runner, fast_settings(relay_concurrency=300))
    async with running(worker):
        await wait_until(lambda: runner.started >= 100)
        await asyncio.sleep(0.6)  # three more settle periods: no third step
        # 50, then 50 more once the first had time to show; then behind (100 ≥ 60).
        assert [rows for _, rows in repo.claims] == [50, 50]
        assert repo.claims[1][0] - repo.claims[0][0] >= 0.2
        assert runner.started == 100
        runner.release.set()
        await wait_until(finished(repo, *ids))
    assert runner.started == 200
