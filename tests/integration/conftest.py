"""Fixtures shared by the relay integration tests: a local Realtime server with scaled
delays, and an independent realtime-py subscriber on it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from devstack.jwt import api_key
from devstack.realtime import RealtimeServer, Timings
from tests.integration.relay_harness import Subscriber
from worker.jobs.postgres import PostgresJobRepository

TIME_SCALE = 0.01  # server delays (2 s / 5 s backoffs) become 20 / 50 ms


@pytest.fixture
async def server() -> AsyncIterator[RealtimeServer]:
    # Scaled, the 60 s idle close would hit realtime-py's 25 s heartbeats: keep it real.
    srv = RealtimeServer(time_scale=TIME_SCALE, timings=Timings(idle_timeout_s=60 / TIME_SCALE))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
async def subscriber(server: RealtimeServer) -> AsyncIterator[Subscriber]:
    sub = Subscriber(server, api_key("anon"))
    try:
        yield sub
    finally:
        await sub.close()


@pytest.fixture
async def repo(database_url: str) -> AsyncIterator[PostgresJobRepository]:
    """The queue on the test's own database (a file may override it, e.g. a smaller pool)."""
    repository = PostgresJobRepository.from_url(database_url, pool_size=2)
    try:
        yield repository
    finally:
        await repository.close()
