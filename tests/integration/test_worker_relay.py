"""The worker with the real runner, end to end over real sockets and real Postgres:

    submit (as user A, RLS) -> Postgres -> worker (RelayRunner) -> simulated upstream
    -> relay -> local Realtime (authorizing joins with the migrations' RLS) -> a
    realtime-py subscriber holding user A's JWT.

A subscriber's reassembled text must equal the stored transcript: after a normal
stream, a cancel, a drain handover, and a kill -9 takeover by another process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devstack import jwt
from devstack.realtime import RealtimeServer
from devstack.upstream import SimulatedUpstream
from devstack.upstream.tokens import tokenize
from worker.config import Settings
from worker.errors import ConfigError
from worker.jobs import JobRecord, NewRequest, PostgresJobRepository
from worker.relay.reassembly import StreamReassembly
from worker.relay.watch import Watcher
from worker.relay.wire import parse_message
from worker.service.runner import RelayRunner
from worker.service.worker import Worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

USER_A = "6f1b1c1e-0000-4000-8000-00000000000a"
USER_B = "6f1b1c1e-0000-4000-8000-00000000000b"
UPSTREAM_KEY = "sk-test-upstream"
HELLO = [{"role": "user", "content": "hello"}]
WAIT_S = 60.0
TEXT = "".join(
    f"Sentence {i} of a durable stream, relayed exactly once: café 東京 🚀 {i * 37}. "
    for i in range(16)
)


@pytest.fixture
async def realtime(database_url: str) -> AsyncIterator[RealtimeServer]:
    server = RealtimeServer(database_url=database_url)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def upstream() -> AsyncIterator[SimulatedUpstream]:
    async with SimulatedUpstream(text=TEXT, tokens_per_second=200, api_key=UPSTREAM_KEY) as server:
        yield server


@pytest.fixture
async def repo(database_url: str) -> AsyncIterator[PostgresJobRepository]:
    repository = PostgresJobRepository.from_url(database_url, pool_size=2)
    yield repository
    await repository.close()


def env_for(
    database_url: str, realtime: RealtimeServer, upstream: SimulatedUpstream
) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "SUPABASE_URL": realtime.url,
        "SUPABASE_SERVICE_ROLE_KEY": jwt.api_key("service_role"),
        "OPENAI_BASE_URL": upstream.base_url,
        "OPENAI_API_KEY": UPSTREAM_KEY,
        "RELAY_LEASE_S": "1.5",
        "RELAY_HEARTBEAT_INTERVAL_S": "0.3",
        "RELAY_CHECKPOINT_INTERVAL_S": "0.2",
        "RELAY_POLL_INTERVAL_S": "0.2",
        "RELAY_GRACE_PERIOD_S": "1.0",
        "RELAY_HTTP_PORT": "0",
    }


def settings_for(env: dict[str, str]) -> Settings:
    names = {"DATABASE_URL": "database_url", "SUPABASE_URL": "supabase_url"}
    values: dict[str, Any] = {names.get(key, key.lower()): value for key, value in env.items()}
    return Settings(_env_file=None, **values)


@asynccontextmanager
async def subscriber(
    realtime: RealtimeServer, user: str, session: str, *, record: bool = False
) -> AsyncIterator[Watcher]:
    watcher = Watcher(
        realtime_url=realtime.url + "/realtime/v1",
        token=jwt.user_token(user),
        topic=f"llm-token:{session}",
        private=True,
        record=record,
    )
    await watcher.start()
    try:
        yield watcher
    finally:
        await watcher.close()


@asynccontextmanager
async def worker_in_process(
    settings: Settings, worker_id: str
) -> AsyncIterator[tuple[Worker, asyncio.Task[None]]]:
    assert settings.database_url
    repo = PostgresJobRepository.from_url(settings.database_url, pool_size=2)
    async with RelayRunner(settings) as runner:
        worker = Worker(repo, runner, settings, worker_id=worker_id, on_rejected=runner.on_rejected)
        task = asyncio.create_task(worker.run())
        try:
            yield worker, task
        finally:
            worker.stop()
            await asyncio.wait_for(task, WAIT_S)
            await repo.close()


async def wait_for(
    repo: PostgresJobRepository, job_id: str, ok: Callable[[JobRecord], bool]
) -> JobRecord:
    async with asyncio.timeout(WAIT_S):
        while True:
            record = await repo.get(job_id)
            if record is not None and ok(record):
                return record
            await asyncio.sleep(0.05)


def the_stream(watcher: Watcher, job_id: str) -> StreamReassembly:
    return watcher.reassembly.streams[job_id]


async def test_a_request_reaches_its_owner_and_only_its_owner(
    database_url: str,
    realtime: RealtimeServer,
    upstream: SimulatedUpstream,
    repo: PostgresJobRepository,
) -> None:
    settings = settings_for(env_for(database_url, realtime, upstream))
    session = await repo.create_session_as(USER_A)
    with pytest.raises(ConfigError, match="could not join"):
        async with subscriber(realtime, USER_B, session):
            pass
    async with subscriber(realtime, USER_A, session) as watcher, worker_in_process(settings, "w"):
        submitted = await repo.submit_as(USER_A, NewRequest(HELLO, session_id=session))
        await watcher.wait_finished(timeout_s=WAIT_S)
        record = await wait_for(repo, submitted.id, lambda r: r.status == "done")
    stream = the_stream(watcher, submitted.id)
    assert stream.checksums_match() and stream.gaps == 0
    assert stream.text() == (record.snapshot.content, record.snapshot.reasoning) == (TEXT, "")
    assert record.snapshot.next_offset == len(tokenize(TEXT))
    assert record.finish_reason == "stop"


async def test_a_rejected_request_is_reported_to_the_subscriber(
    database_url: str,
    realtime: RealtimeServer,
    upstream: SimulatedUpstream,
    repo: PostgresJobRepository,
) -> None:
    settings = settings_for(env_for(database_url, realtime, upstream))
    session = await repo.create_session_as(USER_A)
    async with subscriber(realtime, USER_A, session) as watcher, worker_in_process(settings, "w"):
        bad = await repo.submit_as(USER_A, NewRequest([], session_id=session))
        await watcher.wait_finished(timeout_s=WAIT_S)
    error = the_stream(watcher, bad.id).error
    assert error is not None and error.type == "bad_request"
    assert "non-empty array" in error.message


async def test_the_owner_cancels_and_the_subscriber_is_told(
    database_url: str,
    realtime: RealtimeServer,
    upstream: SimulatedUpstream,
    repo: PostgresJobRepository,
) -> None:
    settings = settings_for(env_for(database_url, realtime, upstream))
    session = await repo.create_session_as(USER_A)
    async with subscriber(realtime, USER_A, session) as watcher, worker_in_process(settings, "w"):
        submitted = await repo.submit_as(USER_A, NewRequest(HELLO, session_id=session))
        await wait_for(repo, submitted.id, lambda r: r.snapshot.next_offset >= 10)
        await repo.cancel_as(USER_A, submitted.id)
        record = await wait_for(repo, submitted.id, lambda r: r.status != "running")
        await watcher.wait_finished(timeout_s=WAIT_S)
    assert (record.status, record.finish_reason) == ("cancelled", "cancelled")
    stream = the_stream(watcher, submitted.id)
    assert [s.status for s in stream.statuses] == ["cancelled"]
    assert stream.done is not None and stream.done.finish_reason == "cancelled"
    assert stream.checksums_match()
    assert stream.text()[0] == record.snapshot.content
    assert 10 <= record.snapshot.next_offset < len(tokenize(TEXT))
    assert TEXT.startswith(record.snapshot.content)


async def test_a_drained_stream_is_continued_by_another_worker_without_a_seam(
    database_url: str,
    realtime: RealtimeServer,
    upstream: SimulatedUpstream,
    repo: PostgresJobRepository,
) -> None:
    settings = settings_for(env_for(database_url, realtime, upstream))
    session = await repo.create_session_as(USER_A)
    async with subscriber(realtime, USER_A, session) as watcher:
        async with worker_in_process(settings, "first") as (first, _):
            submitted = await repo.submit_as(USER_A, NewRequest(HELLO, session_id=session))
            await wait_for(repo, submitted.id, lambda r: r.snapshot.next_offset >= 20)
            first.stop()
        released = await wait_for(repo, submitted.id, lambda r: r.status == "queued")
        assert released.attempts == 0
        async with worker_in_process(settings, "second"):
            record = await wait_for(repo, submitted.id, lambda r: r.status == "done")
            await watcher.wait_finished(timeout_s=WAIT_S)
    stream = the_stream(watcher, submitted.id)
    assert stream.text()[0] == record.snapshot.content == TEXT
    assert stream.checksums_match()
    assert [s.detail.get("reason") for s in stream.statuses] == ["handover", "takeover"]
    # the handover was exact: nothing was sent twice
    assert stream.duplicate_tokens == 0


async def test_kill_9_mid_stream_the_subscriber_text_equals_the_stored_transcript(
    database_url: str,
    realtime: RealtimeServer,
    upstream: SimulatedUpstream,
    repo: PostgresJobRepository,
    tmp_path: Path,
) -> None:
    """The client rule of design.md: apply live tokens by offset, and catch up from the
    snapshot row (read as the user, under RLS) — here right after the crash."""
    env = {**os.environ, **env_for(database_url, realtime, upstream)}
    session = await repo.create_session_as(USER_A)

    def spawn(worker_id: str) -> subprocess.Popen[bytes]:
        with (tmp_path / f"{worker_id}.log").open("wb") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "worker", "run", "--worker-id", worker_id],
                env=env,
                cwd=tmp_path,
                stderr=log,
            )

    async with subscriber(realtime, USER_A, session, record=True) as watcher:
        submitted = await repo.submit_as(USER_A, NewRequest(HELLO, session_id=session))
        first = spawn("first")
        second: subprocess.Popen[bytes] | None = None
        try:
            await wait_for(
                repo,
                submitted.id,
                lambda r: r.lease_owner == "first" and r.snapshot.next_offset >= 30,
            )
            first.send_signal(signal.SIGKILL)
            await asyncio.to_thread(first.wait, 10)
            caught_up = await repo.get_as(USER_A, submitted.id)  # a reconnecting client
            second = spawn("second")
            record = await wait_for(repo, submitted.id, lambda r: r.status != "running")
            async with asyncio.timeout(WAIT_S):
                while True:  # the live stream may hold a gap: wait for llm-done
                    live = watcher.reassembly.streams.get(submitted.id)
                    if live is not None and live.done is not None:
                        break
                    await asyncio.sleep(0.05)
        finally:
            for proc in (first, second):
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    await asyncio.to_thread(proc.wait, 15)
    assert (record.status, record.attempts) == ("done", 2), (tmp_path / "second.log").read_text()
    assert record.snapshot.content == TEXT
    assert caught_up is not None and caught_up.status == "running"
    # Nothing any worker published contradicts the stored transcript...
    assert watcher.recorded is not None
    tokens = tokenize(TEXT)
    token_messages = [p for event, p in watcher.recorded if event == "llm-token"]
    for payload in token_messages:
        offset = payload["offset"]
        assert payload["tokens"] == tokens[offset : offset + len(payload["tokens"])]
    # ...and the snapshot plus the live messages give exactly the transcript.
    merged = StreamReassembly(
        submitted.id,
        next_offset=caught_up.snapshot.next_offset,
        content=caught_up.snapshot.content,
        reasoning=caught_up.snapshot.reasoning,
    )
    for event, payload in watcher.recorded:
        merged.apply(parse_message(event, payload))
    assert merged.complete and merged.checksums_match()
    assert merged.text() == (TEXT, "")
    assert "takeover" in [s.detail.get("reason") for s in merged.statuses]
    # what the continuation asked the upstream: the partial answer, then "continue"
    continued = upstream.requests[-1]
    assert continued.body["messages"][-2] == {
        "role": "assistant",
        "content": caught_up.snapshot.content,
    }


async def test_a_request_the_sweep_fails_is_reported_to_the_subscriber(
    database_url: str,
    realtime: RealtimeServer,
    upstream: SimulatedUpstream,
    repo: PostgresJobRepository,
) -> None:
    """Issue 13: a row out of attempts after crashes was failed by the sweep in silence."""
    settings = settings_for(env_for(database_url, realtime, upstream))
    session = await repo.create_session_as(USER_A)
    submitted = await repo.submit_as(USER_A, NewRequest(HELLO, session_id=session))
    # What a third crashed worker leaves: running, out of attempts, its lease expired.
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(
            "UPDATE public.llm_requests SET status = 'running', attempts = %s,"
            " lease_owner = 'dead', lease_expires_at = now() - interval '1 second'"
            " WHERE id = %s",
            (settings.relay_max_attempts, submitted.id),
        )
    async with subscriber(realtime, USER_A, session) as watcher, worker_in_process(settings, "w"):
        record = await wait_for(repo, submitted.id, lambda r: r.status == "failed")
        await watcher.wait_finished(timeout_s=WAIT_S)
    assert record.error is not None and record.error["type"] == "attempts_exhausted"
    error = the_stream(watcher, submitted.id).error
    assert error is not None and error.type == "attempts_exhausted"
    assert error.retryable is False
    assert f"{settings.relay_max_attempts} attempts" in error.message
