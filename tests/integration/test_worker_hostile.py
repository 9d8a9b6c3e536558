"""Hostile upstream modes through the whole worker (real runner, real Postgres, local
Realtime, a subscriber): the row, the wire and the checksum agree on a NUL token; a
provider that goes silent after 20 tokens ends the row `failed` with the deadline that
fired; an echoed key reaches neither the row nor the subscriber (issues #12, #13)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from devstack.realtime import RealtimeServer
from devstack.upstream import Fault, SimulatedUpstream
from tests.integration.test_worker_relay import (
    HELLO,
    UPSTREAM_KEY,
    USER_A,
    WAIT_S,
    env_for,
    realtime,
    settings_for,
    subscriber,
    the_stream,
    wait_for,
    worker_in_process,
)
from worker.jobs import NewRequest, PostgresJobRepository

pytestmark = [pytest.mark.integration, pytest.mark.slow]
__all__ = ["realtime"]  # a fixture, imported for pytest (repo comes from conftest)

TEXT = "word " * 40


@pytest.fixture
async def upstream() -> AsyncIterator[SimulatedUpstream]:
    async with SimulatedUpstream(text=TEXT, tokens_per_second=200, api_key=UPSTREAM_KEY) as up:
        yield up


async def test_a_nul_token_is_stored_and_relayed_as_the_same_text(
    database_url: str,
    realtime: RealtimeServer,
    upstream: SimulatedUpstream,
    repo: PostgresJobRepository,
) -> None:
    upstream.faults.push(Fault.nul_token(after_tokens=3))
    settings = settings_for(env_for(database_url, realtime, upstream))
    session = await repo.create_session_as(USER_A)
    async with subscriber(realtime, USER_A, session) as watcher, worker_in_process(settings, "w"):
        submitted = await repo.submit_as(USER_A, NewRequest(HELLO, session_id=session))
        await watcher.wait_finished(timeout_s=WAIT_S)
        record = await wait_for(repo, submitted.id, lambda r: r.status in ("done", "failed"))
    assert record.status == "done", record.error
    stream = the_stream(watcher, submitted.id)
    assert stream.checksums_match()
    assert stream.text()[0] == record.snapshot.content
    assert "nul:\ufffd:" in record.snapshot.content


async def test_silent_after_20_tokens_fails_the_row_with_the_idle_deadline(
    database_url: str,
    realtime: RealtimeServer,
    upstream: SimulatedUpstream,
    repo: PostgresJobRepository,
) -> None:
    upstream.faults.push(Fault.hang(after_tokens=20))
    env = env_for(database_url, realtime, upstream)
    env["RELAY_IDLE_TIMEOUT_S"] = "0.5"
    settings = settings_for(env)
    session = await repo.create_session_as(USER_A)
    async with subscriber(realtime, USER_A, session) as watcher, worker_in_process(settings, "w"):
        submitted = await repo.submit_as(USER_A, NewRequest(HELLO, session_id=session))
        await watcher.wait_finished(timeout_s=WAIT_S)
        record = await wait_for(repo, submitted.id, lambda r: r.status in ("done", "failed"))
    assert record.status == "failed" and record.error is not None
    assert record.error["type"] == "timeout"
    assert "idle deadline" in record.error["message"]
    error = the_stream(watcher, submitted.id).error
    assert error is not None and error.type == "timeout"
    assert record.snapshot.next_offset == 20


async def test_an_echoed_key_reaches_neither_the_row_nor_the_subscriber(
    database_url: str,
    realtime: RealtimeServer,
    upstream: SimulatedUpstream,
    repo: PostgresJobRepository,
) -> None:
    upstream.faults.push(Fault.echo_key(status=400))
    settings = settings_for(env_for(database_url, realtime, upstream))
    session = await repo.create_session_as(USER_A)
    async with subscriber(realtime, USER_A, session) as watcher, worker_in_process(settings, "w"):
        submitted = await repo.submit_as(USER_A, NewRequest(HELLO, session_id=session))
        await watcher.wait_finished(timeout_s=WAIT_S)
        record = await wait_for(repo, submitted.id, lambda r: r.status in ("done", "failed"))
    assert record.status == "failed" and record.error is not None
    assert UPSTREAM_KEY not in str(record.error) and "[redacted]" in record.error["message"]
    error = the_stream(watcher, submitted.id).error
    assert error is not None and UPSTREAM_KEY not in error.message
