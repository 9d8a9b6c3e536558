"""More streams than one Realtime socket carries, through the whole worker, while the
upstream misbehaves (issue 16 with the edges of issues 9-15).

    120 owners, each subscribed to their own private topic -> Postgres queue -> one
    worker (the real runner: Protocol reader, token log, publisher) -> a simulated
    upstream that refuses, rate-limits, goes silent, sends junk or resets on a share
    of the requests, before or after its first tokens -> the Realtime
    stand-in with its real limits on (100 channels per socket, 100 joins/s, 200
    connected users, the 5 s join-error stall); only the message quota is raised, as
    a large plan has it.

Every request ends (none lost, none hung), the worker stays up, and what each owner
reassembled is exactly the transcript the database holds, whatever happened upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from devstack import jwt
from devstack.realtime import RealtimeLimits, RealtimeServer
from devstack.upstream import SimulatedUpstream
from devstack.upstream.faults import Fault
from tests.integration.relay_harness import publisher_sockets
from tests.integration.test_worker_relay import (
    HELLO,
    UPSTREAM_KEY,
    USER_A,
    env_for,
    settings_for,
    worker_in_process,
)
from worker.jobs import JobRecord, NewRequest, PostgresJobRepository
from worker.relay.watch import Watcher

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STREAMS = 120  # > 100: the worker's channels cannot all live on one socket
SUBSCRIBER_JOINS_PER_S = 40.0  # with the worker's 40/s, under the project's 100/s
TEXT = "".join(f"Part {i} of an answer that many owners wait for, 東京 {i}. " for i in range(10))
WAIT_S = 120.0
# Before the first token: retried, so the text is still exact.
CLEAN_RETRIES = [
    Fault.http(500, "The server had an error while processing your request."),
    Fault.rate_limit(retry_after_ms=200),
    Fault.html_502(),
    Fault.hang_after_headers(max_s=30),  # silent: the first-token deadline retries it
]
# After some tokens: the stream ends with an llm-error, the tokens relayed so
# far kept (RELAY_MIDSTREAM_RECOVERY=stop, the default: a model asked again would not
# continue the same text).
MID_STREAM = [Fault.reset(after_tokens=5), Fault.malformed(after_tokens=5), Fault.hang(5, max_s=30)]
# What a request may end with when its faults left no retry (a retry meets the next
# fault in the queue too).
BROKEN = {"connection_lost", "malformed", "timeout", "server_error", "rate_limit"}


@pytest.fixture
async def limited_realtime(database_url: str) -> AsyncIterator[RealtimeServer]:
    limits = RealtimeLimits(max_events_per_second=1_000_000)
    server = RealtimeServer(database_url=database_url, limits=limits)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def wait_final(repo: PostgresJobRepository, ids: list[str]) -> list[JobRecord]:
    async with asyncio.timeout(WAIT_S):
        while True:
            records = [await repo.get(i) for i in ids]
            if all(r is not None and r.status in ("done", "failed") for r in records):
                return [r for r in records if r is not None]
            await asyncio.sleep(0.2)


async def test_120_owners_exact_while_the_upstream_misbehaves_under_real_limits(
    database_url: str, limited_realtime: RealtimeServer, repo: PostgresJobRepository
) -> None:
    realtime = limited_realtime
    async with SimulatedUpstream(text=TEXT, tokens_per_second=40, api_key=UPSTREAM_KEY) as upstream:
        faults = [*CLEAN_RETRIES, *MID_STREAM] * 3  # 21 of the first upstream requests
        upstream.faults.push(*faults)
        env = env_for(database_url, realtime, upstream) | {
            "RELAY_CONCURRENCY": str(STREAMS + 10),
            "RELAY_FIRST_TOKEN_TIMEOUT_S": "1.5",
            "RELAY_IDLE_TIMEOUT_S": "1.0",
            "RELAY_LEASE_S": "10",
            "RELAY_HEARTBEAT_INTERVAL_S": "1",
        }
        settings = settings_for(env)
        sessions = [await repo.create_session_as(USER_A) for _ in range(STREAMS)]
        watchers: list[Watcher] = []
        try:
            for session in sessions:
                watcher = Watcher(
                    realtime_url=realtime.url + "/realtime/v1",
                    token=jwt.user_token(USER_A),
                    topic=f"llm-token:{session}",
                    private=True,
                )
                await watcher.start()
                watchers.append(watcher)
                await asyncio.sleep(1 / SUBSCRIBER_JOINS_PER_S)
            async with worker_in_process(settings, "w-scale") as (worker, task):
                ids = [
                    (await repo.submit_as(USER_A, NewRequest(HELLO, session_id=s))).id
                    for s in sessions
                ]
                # Two junk rows among them: each fails alone with a clear error.
                junk = [
                    (await repo.submit_as(USER_A, NewRequest(messages))).id
                    for messages in ({"role": "user"}, [{"role": "user", "content": 42}])
                ]
                finals = asyncio.ensure_future(wait_final(repo, ids + junk))
                peak_sockets = 0
                while not finals.done():
                    busy = [s for s in publisher_sockets(realtime) if s.channels]
                    peak_sockets = max(peak_sockets, len(busy))
                    assert all(len(s.channels) <= 100 for s in busy)
                    await asyncio.wait({finals}, timeout=0.05)
                records = finals.result()
                assert not task.done() and worker.live
            async with asyncio.timeout(30):
                for watcher in watchers:
                    await watcher.wait_finished(timeout_s=30)
        finally:
            for watcher in watchers:
                with contextlib.suppress(Exception):
                    await watcher.close()
        assert len(upstream.faults) == 0  # every fault was met by some request
    by_id = {r.id: r for r in records}
    for job_id in junk:
        record = by_id[job_id]
        assert record.status == "failed" and record.error is not None
        assert record.error["type"] == "bad_request", record.error
    done = failed = 0
    for job_id, watcher in zip(ids, watchers, strict=True):
        record = by_id[job_id]
        stream = watcher.reassembly.streams[job_id]
        # What the owner saw is what the database holds, byte for byte, no seam.
        assert stream.text() == (record.snapshot.content, record.snapshot.reasoning), job_id
        assert stream.next_offset == record.snapshot.next_offset
        if record.status == "done":
            done += 1
            assert stream.complete and stream.checksums_match(), job_id
            assert record.snapshot.content == TEXT  # refusals before output were retried
        else:
            # A break after output ends the stream with a clear error; the owner was
            # told, with the tokens relayed so far.
            failed += 1
            assert record.error is not None and record.error["type"] in BROKEN, record.error
            assert stream.error is not None and stream.error.type == record.error["type"]
            assert stream.error.retryable == record.error["retryable"]
            assert stream.error.tokens_relayed == record.snapshot.next_offset
    assert failed <= len(faults) and done + failed == STREAMS
    assert done >= STREAMS - len(faults)
    assert peak_sockets >= 2  # the channels were spread over more than one socket
