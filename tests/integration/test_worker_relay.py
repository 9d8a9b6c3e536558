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
from aiohttp import web

from devstack import jwt
from devstack.postgrest import PostgrestServer
from devstack.realtime import RealtimeServer
from devstack.upstream import SimulatedUpstream
from devstack.upstream.server import OWN_WORDS_PREFIX
from devstack.upstream.tokens import tokenize
from worker.config import Settings
from worker.errors import ConfigError
from worker.jobs import JobRecord, NewRequest, PostgresJobRepository
from worker.relay.reassembly import StreamReassembly
from worker.relay.watch import Watcher
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


async def wait_logged(repo: PostgresJobRepository, job_id: str, tokens: int) -> None:
    """Until the token log of `job_id` holds `tokens` tokens (the row is written at the end)."""
    async with asyncio.timeout(WAIT_S):
        while True:
            if len(await repo.read_chunks(job_id, 0)) >= tokens:
                return
            await asyncio.sleep(0.02)


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
        await wait_logged(repo, submitted.id, 10)
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
            await wait_logged(repo, submitted.id, 20)
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


@pytest.fixture
async def own_words_upstream() -> AsyncIterator[SimulatedUpstream]:
    """Continues in its own words, as a real model does: a regenerated offset differs."""
    async with SimulatedUpstream(
        text=TEXT, tokens_per_second=200, api_key=UPSTREAM_KEY, continuation="own_words"
    ) as server:
        yield server


@pytest.fixture
async def postgrest(database_url: str) -> AsyncIterator[str]:
    """The PostgREST stand-in on a real socket: the subscribers' catch-up reads."""
    app = web.Application()
    PostgrestServer(database_url).add_routes(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/rest/v1"
    finally:
        await runner.cleanup()


async def logged_chunks(database_url: str, job_id: str) -> list[tuple[int, str, str]]:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cursor = await conn.execute(
            "SELECT token_offset, kind, text FROM public.llm_request_chunks"
            " WHERE request_id = %s ORDER BY token_offset",
            (job_id,),
        )
        return [(int(o), str(k), str(t)) for o, k, t in await cursor.fetchall()]


def conflicting_offsets(recorded: list[tuple[str, dict[str, Any]]]) -> dict[int, set[str]]:
    """Offsets at which two different tokens were broadcast."""
    seen: dict[int, set[str]] = {}
    for event, payload in recorded:
        if event == "llm-token":
            for i, token in enumerate(payload["tokens"]):
                seen.setdefault(payload["offset"] + i, set()).add(token)
    return {offset: tokens for offset, tokens in seen.items() if len(tokens) > 1}


async def test_kill_9_with_a_model_that_continues_in_its_own_words(
    database_url: str,
    realtime: RealtimeServer,
    own_words_upstream: SimulatedUpstream,
    postgrest: str,
    repo: PostgresJobRepository,
    tmp_path: Path,
) -> None:
    """Real `llm-relay run` processes, real Postgres, an independent subscriber that
    catches up from the token log (PostgREST, RLS): whatever it was sent before the
    crash is the stored transcript, so its text is exactly the stored transcript even
    though the heir's model words the rest differently."""
    upstream = own_words_upstream
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

    live = Watcher(
        realtime_url=realtime.url + "/realtime/v1",
        token=jwt.user_token(USER_A),
        topic=f"llm-token:{session}",
        private=True,
        record=True,
        rest_url=postgrest,
        apikey=jwt.api_key("anon"),
        gap_timeout_s=0.3,
    )
    await live.start()
    submitted = await repo.submit_as(USER_A, NewRequest(HELLO, session_id=session))
    first = spawn("first")
    second: subprocess.Popen[bytes] | None = None
    try:
        async with asyncio.timeout(WAIT_S):
            while True:  # mid-stream, as the subscriber sees it
                state = live.reassembly.streams.get(submitted.id)
                if state is not None and state.next_offset >= 30:
                    break
                await asyncio.sleep(0.01)
        first.send_signal(signal.SIGKILL)
        await asyncio.to_thread(first.wait, 10)
        second = spawn("second")
        record = await wait_for(repo, submitted.id, lambda r: r.status != "running")
        await live.wait_finished(timeout_s=WAIT_S)  # complete: any gap was caught up
        # A client that joins after the end reads everything from the log.
        async with subscriber(realtime, USER_A, session) as late:
            late_rest = Watcher(
                realtime_url=realtime.url + "/realtime/v1",
                token=jwt.user_token(USER_A),
                topic=f"llm-token:{session}",
                private=True,
                rest_url=postgrest,
                apikey=jwt.api_key("anon"),
            )
            await late_rest.catch_up(submitted.id)
            assert not late.reassembly.streams  # nothing live after the end
    finally:
        await live.close()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                await asyncio.to_thread(proc.wait, 15)
    assert (record.status, record.attempts) == ("done", 2), (tmp_path / "second.log").read_text()
    stored = (record.snapshot.content, record.snapshot.reasoning)
    # The heir's model continued in its own words (the test would be vacuous otherwise).
    assert OWN_WORDS_PREFIX in stored[0] and stored[0] != TEXT
    # Every token any worker broadcast is one token per offset: 0 conflicts...
    assert live.recorded is not None
    assert conflicting_offsets(live.recorded) == {}
    # ...and the subscriber's text is exactly the stored transcript, no gap left.
    state = live.reassembly.streams[submitted.id]
    assert state.text() == stored and state.checksums_match() and state.held_messages == 0
    assert "takeover" in [s.detail.get("reason") for s in state.statuses]
    late_state = late_rest.reassembly.streams[submitted.id]
    assert late_state.text() == stored
    await late_rest.close()
    # The row was compacted from the log: the log is the transcript, token by token,
    # and holds every token that was broadcast.
    log = await logged_chunks(database_url, submitted.id)
    assert [offset for offset, _, _ in log] == list(range(record.snapshot.next_offset))
    assert "".join(text for _, kind, text in log if kind == "content") == stored[0]
    logged = {offset: text for offset, _, text in log}
    for event, payload in live.recorded:
        if event == "llm-token":
            for i, token in enumerate(payload["tokens"]):
                assert logged[payload["offset"] + i] == token
    # What the continuation asked the upstream: the durable partial answer.
    continued = upstream.requests[-1]
    assert continued.body["messages"][-2]["role"] == "assistant"
    assert stored[0].startswith(continued.body["messages"][-2]["content"])


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
