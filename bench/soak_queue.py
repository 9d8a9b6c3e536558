"""The queue half of the soak: `kill -9` of a worker process mid-run, another takes over.

    python -m bench.soak_queue [--requests 300] [--quick]

Real `llm-relay run` processes on a real PostgreSQL (embedded): requests are
submitted the way a frontend does (under a user's JWT and RLS), two workers claim
them, one is killed with SIGKILL while it streams, a fresh worker joins, and every
request must end `done` with the stored transcript equal to the expected text
(0 lost requests).

Two modes:
- default (`--scripted`): the scripted runner (deterministic tokens, no Realtime): the
  queue, leases, checkpoints and takeover alone.
- `--real`: the real runner of `llm-relay run` (simulated upstream → relay → local
  Realtime), the workers' Realtime connections through the `FaultProxy` (cut every
  1-2 s), ack faults on the server, 429s and mid-stream resets on the upstream, one
  rate-limit shutdown at the kill; independent subscribers (`Watcher`, one per
  session, direct to the server) must have every stream exact, and every stored
  transcript must equal the upstream's text.
  With `own_words` (the default of `--real`, issue 14) the upstream continues in its
  own words, as a real model does: a continued or taken-over stream's transcript is
  then no longer the upstream's text, so each is checked against itself instead:
  the row equals its write-ahead token log, every subscriber's text (live, plus its
  catch-up reads of the log through PostgREST under RLS) equals the row, no offset
  was ever broadcast with two different tokens, and no gap is left.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from bench.chaos import FaultProxy
from bench.soak import TIME_SCALE, _check, soak_text
from devstack.jwt import api_key, user_token
from devstack.postgrest import PostgrestServer
from devstack.realtime import RealtimeServer
from devstack.realtime.limits import RealtimeLimits, Timings
from devstack.upstream.faults import Fault
from devstack.upstream.server import OWN_WORDS_PREFIX, SimulatedUpstream
from worker.jobs import NewRequest, PostgresJobRepository
from worker.relay.reassembly import StreamReassembly
from worker.relay.watch import Watcher
from worker.relay.wire import text_checksum
from worker.service.testing import scripted_text

USER = "6f1b1c1e-0000-4000-8000-0000000000b9"
HELLO = [{"role": "user", "content": "soak"}]


@dataclass
class QueueSoakConfig:
    requests: int = 300
    tokens: int = 100
    delay_ms: int = 10
    concurrency: int = 32
    kill_after_s: float = 2.0
    timeout_s: float = 300.0
    real: bool = False  # the real runner through Realtime (else the scripted one)
    sessions: int = 4
    tokens_per_second: float = 200.0
    seed: int = 3
    chaos: bool = True  # False: no faults, no kill (bench/bench_scaleout.py)
    lease_s: float = 1.5  # short, so the takeover after the kill is quick
    heartbeat_s: float = 0.3
    workers: int = 2
    own_words: bool = True  # real mode: the upstream continues in its own words


@dataclass
class QueueSoakReport:
    config: dict[str, Any]
    requests: int = 0
    done_exact: int = 0
    lost: list[dict[str, Any]] = field(default_factory=list)
    taken_over: int = 0  # requests finished on a later attempt (after the kill)
    running_on_killed_worker: int = 0
    killed_exit_code: int | None = None
    subscriber_exact_live: int = 0
    subscriber_exact_after_catch_up: int = 0  # live gap after the kill, filled by the snapshot
    subscriber_not_exact: list[dict[str, Any]] = field(default_factory=list)
    continued_in_own_words: int = 0  # stored transcripts with an own-words continuation
    conflicting_offsets: int = 0  # offsets broadcast with two different tokens
    gaps_left: int = 0  # streams a subscriber could not complete
    caught_up_tokens: int = 0  # tokens the subscribers read from the token log
    duplicates_dropped: int = 0
    proxy_cuts: int = 0
    upstream_requests: int = 0
    server_ack_faults: dict[str, int] = field(default_factory=dict)
    relay_wall_s: float = 0.0  # from spawning the workers to every request final
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            self.done_exact == self.requests
            and not self.lost
            and not self.subscriber_not_exact
            and self.conflicting_offsets == 0
            and self.gaps_left == 0
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


class Workers:
    def __init__(
        self,
        database_url: str,
        config: QueueSoakConfig,
        logs: Path,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.database_url = database_url
        self.config = config
        self.logs = logs
        self.extra_env = extra_env or {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, worker_id: str) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "RELAY_LEASE_S": str(self.config.lease_s),
            "RELAY_HEARTBEAT_INTERVAL_S": str(self.config.heartbeat_s),
            "RELAY_CHECKPOINT_INTERVAL_S": "0.1",
            "RELAY_POLL_INTERVAL_S": "0.2",
            "RELAY_HTTP_PORT": "0",
            "RELAY_CONCURRENCY": str(self.config.concurrency),
            "RELAY_LOG_LEVEL": "WARNING",
            **self.extra_env,
        }
        command = [sys.executable, "-m", "worker", "run", "--worker-id", worker_id]
        if not self.config.real:
            command += [
                *("--runner", "worker.service.testing:scripted"),
                *("-o", f"tokens={self.config.tokens}", "-o", f"delay_ms={self.config.delay_ms}"),
            ]
        with (self.logs / f"{worker_id}.log").open("wb") as sink:
            proc = subprocess.Popen(command, env=env, cwd=self.logs, stderr=sink)
        self.procs[worker_id] = proc
        return proc

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


async def run_queue_soak(database_url: str, config: QueueSoakConfig) -> QueueSoakReport:
    if not config.real:
        return await _run(database_url, config, None)
    return await _run_real(database_url, config)


async def _run_real(database_url: str, config: QueueSoakConfig) -> QueueSoakReport:
    """The stack for the real runner: Realtime (behind the fault proxy), upstream."""
    server = RealtimeServer(
        time_scale=TIME_SCALE,
        timings=Timings(idle_timeout_s=60 / TIME_SCALE),
        limits=RealtimeLimits(
            max_events_per_second=10_000_000,
            max_joins_per_second=100_000,
            max_concurrent_users=10_000,
        ),
    )
    text = soak_text(config.seed, config.tokens)
    upstream = SimulatedUpstream(
        text=text,
        tokens_per_second=config.tokens_per_second,
        continuation="own_words" if config.own_words else "exact",
    )
    await server.start()
    await upstream.start()
    rest = web.Application()
    PostgrestServer(database_url).add_routes(rest)
    rest_runner = web.AppRunner(rest, access_log=None)
    await rest_runner.setup()
    rest_site = web.TCPSite(rest_runner, "127.0.0.1", 0)
    await rest_site.start()
    rest_port = rest_site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        cuts = (1.0, 2.0) if config.chaos else None
        async with FaultProxy(
            "127.0.0.1", server.port, cut_every_s=cuts, seed=config.seed
        ) as proxy:
            env = {
                "SUPABASE_URL": proxy.url,
                "SUPABASE_SERVICE_ROLE_KEY": api_key("service_role"),
                "OPENAI_BASE_URL": upstream.base_url,
                "OPENAI_API_KEY": "sk-devstack",
                "RELAY_PRIVATE_CHANNELS": "false",
                "RELAY_MESSAGES_PER_SECOND": "1000000",
                "RELAY_ACK_TIMEOUT_S": "0.5",
                "RELAY_RETRY_BASE_MS": "20",
                "RELAY_RETRY_CAP_S": "0.4",
                "RELAY_RATE_LIMIT_REJOIN_S": "0.3",
                "RELAY_UPSTREAM_RETRIES": "6",
                "RELAY_UPSTREAM_RETRY_BASE_S": "0.05",
                "RELAY_UPSTREAM_RETRY_CAP_S": "0.5",
                "RELAY_BREAKER_FAILURES": "1000000",
                "RELAY_MIDSTREAM_RECOVERY": "continue",
                "RELAY_MIDSTREAM_MAX_RECOVERIES": "4",
                "RELAY_GRACE_PERIOD_S": "1.0",
            }
            server.faults.ack_delay_s = 0.6
            if config.chaos:
                server.faults.ack_shares(
                    reject=0.04, drop=0.02, lose_reply=0.02, delay=0.02, seed=config.seed
                )
            rng = random.Random(config.seed)
            for _ in range(max(1, config.requests // 12) if config.chaos else 0):
                upstream.faults.push(
                    Fault.rate_limit(retry_after_ms=50),
                    Fault.reset(after_tokens=rng.randint(3, max(4, config.tokens - 3))),
                )
            stack = _RealStack(server, upstream, text, env)
            stack.rest_url = f"http://127.0.0.1:{rest_port}/rest/v1"
            report = await _run(database_url, config, stack)
            report.proxy_cuts = proxy.stats.cuts
    finally:
        await rest_runner.cleanup()
        await upstream.stop()
        await server.stop()
    report.upstream_requests = len(upstream.requests)
    report.server_ack_faults = {
        k.value: v for k, v in server.faults.outcomes_applied.items() if k.value != "ok"
    }
    return report


@dataclass
class _RealStack:
    server: RealtimeServer
    upstream: SimulatedUpstream
    text: str
    env: dict[str, str]
    watchers: list[Watcher] = field(default_factory=list)
    rest_url: str | None = None  # PostgREST: the subscribers' catch-up reads


async def _run(
    database_url: str, config: QueueSoakConfig, stack: _RealStack | None
) -> QueueSoakReport:
    report = QueueSoakReport(config=asdict(config), requests=config.requests)
    started = time.monotonic()
    repo = PostgresJobRepository.from_url(database_url, pool_size=2)
    logs = Path(tempfile.mkdtemp(prefix="soak-queue-"))
    workers = Workers(database_url, config, logs, stack.env if stack else None)
    try:
        sessions: list[str | None] = [None]
        if stack is not None:
            sessions = [await repo.create_session_as(USER) for _ in range(config.sessions)]
            for session in sessions:
                watcher = Watcher(
                    realtime_url=stack.server.url + "/realtime/v1",
                    token=user_token(USER),  # the owner: RLS lets it read its token log
                    topic=f"llm-token:{session}",
                    private=False,
                    record=config.own_words,
                    rest_url=stack.rest_url if config.own_words else None,
                    apikey=api_key("anon"),
                )
                await watcher.start()
                stack.watchers.append(watcher)
        ids = [
            (
                await repo.submit_as(
                    USER, NewRequest(HELLO, session_id=sessions[i % len(sessions)])
                )
            ).id
            for i in range(config.requests)
        ]
        spawned = time.monotonic()
        if config.chaos:
            workers.spawn("soak-a")
            workers.spawn("soak-b")
            await _kill_one_mid_stream(repo, ids, workers, config, report)
            if stack is not None:
                _rate_limit_shutdown(stack.server)
            workers.spawn("soak-c")
        else:
            for n in range(config.workers):
                workers.spawn(f"worker-{n}")
        await _wait_all_final(repo, ids, config.timeout_s - (time.monotonic() - started))
        report.relay_wall_s = round(time.monotonic() - spawned, 2)
        expected = stack.text if stack else scripted_text(0, config.tokens)
        if stack is not None and config.own_words:
            await _verify_own_words(repo, stack, ids, sessions, report)
        else:
            await _verify(repo, ids, expected, report)
            if stack is not None:
                await _verify_subscribers(stack, ids, sessions, report)
    finally:
        workers.stop_all()
        if stack is not None:
            for watcher in stack.watchers:
                await watcher.close()
        await repo.close()
        shutil.rmtree(logs, ignore_errors=True)
    report.wall_s = round(time.monotonic() - started, 1)
    return report


def _rate_limit_shutdown(server: RealtimeServer) -> None:
    for tenant in server.tenants.values():
        for sock in list(tenant.sockets):
            if sock.apikey_claims.get("role") == "service_role":
                for channel in list(sock.channels.values()):
                    sock.shutdown_channel(channel, "Too many messages per second")


async def _verify(
    repo: PostgresJobRepository, ids: list[str], expected: str, report: QueueSoakReport
) -> None:
    for job_id in ids:
        record = await repo.get(job_id)
        if record is None or record.status != "done" or record.snapshot.content != expected:
            report.lost.append(
                {
                    "id": job_id,
                    "status": None if record is None else record.status,
                    "next_offset": None if record is None else record.snapshot.next_offset,
                    "chars": None if record is None else len(record.snapshot.content),
                    "attempts": None if record is None else record.attempts,
                    "error": None if record is None else record.error,
                }
            )
        else:
            report.done_exact += 1
            report.taken_over += record.attempts > 1


async def _verify_subscribers(
    stack: _RealStack, ids: list[str], sessions: list[str | None], report: QueueSoakReport
) -> None:
    """Exact live, or exact by the client rule's catch-up after a takeover: the
    subscriber saw `llm-status` resuming, its live text is a prefix of the stored
    snapshot, and the snapshot's text is what `llm-done` announced."""
    mine_of = {
        i: [job_id for n, job_id in enumerate(ids) if n % len(sessions) == i]
        for i in range(len(stack.watchers))
    }

    def ended(i: int) -> bool:  # llm-done / llm-error seen (a gap may still be held)
        streams = stack.watchers[i].reassembly.streams
        return all(
            (st := streams.get(job_id)) is not None and (st.done or st.error) is not None
            for job_id in mine_of[i]
        )

    with contextlib.suppress(TimeoutError):  # what is missing is reported below
        async with asyncio.timeout(30):
            while not all(ended(i) for i in mine_of):  # noqa: ASYNC110 - polls 4 watchers
                await asyncio.sleep(0.1)
    for i, watcher in enumerate(stack.watchers):
        mine = mine_of[i]
        for job_id in mine:
            state = watcher.reassembly.streams.get(job_id)
            problem = _check(state, stack.text)
            if state is not None:
                report.duplicates_dropped += state.duplicate_tokens
            if problem is None:
                report.subscriber_exact_live += 1
                continue
            if state is not None and _caught_up(state, stack.text):
                report.subscriber_exact_after_catch_up += 1
                continue
            statuses = [] if state is None else [m.status for m in state.statuses]
            report.subscriber_not_exact.append({"id": job_id, "why": problem, "statuses": statuses})


async def _verify_own_words(
    repo: PostgresJobRepository,
    stack: _RealStack,
    ids: list[str],
    sessions: list[str | None],
    report: QueueSoakReport,
) -> None:
    """Each stored transcript against itself: row = its token log = every subscriber's
    text; no offset broadcast with two tokens; no gap left."""
    stored: dict[str, tuple[str, str]] = {}
    for job_id in ids:
        record = await repo.get(job_id)
        log = await repo.read_chunks(job_id, 0)
        logged = (
            "".join(c.text for c in log if c.kind == "content"),
            "".join(c.text for c in log if c.kind == "reasoning"),
        )
        ok = (
            record is not None
            and record.status == "done"
            and [c.offset for c in log] == list(range(record.snapshot.next_offset))
            and logged == (record.snapshot.content, record.snapshot.reasoning)
            and (record.snapshot.content == stack.text or OWN_WORDS_PREFIX in logged[0])
        )
        if not ok or record is None:
            report.lost.append(
                {
                    "id": job_id,
                    "status": None if record is None else record.status,
                    "next_offset": None if record is None else record.snapshot.next_offset,
                    "logged": len(log),
                    "attempts": None if record is None else record.attempts,
                    "error": None if record is None else record.error,
                }
            )
            continue
        report.done_exact += 1
        report.taken_over += record.attempts > 1
        report.continued_in_own_words += OWN_WORDS_PREFIX in logged[0]
        stored[job_id] = (record.snapshot.content, record.snapshot.reasoning)
    await _verify_subscribers_against(stack, ids, sessions, stored, report)


async def _verify_subscribers_against(
    stack: _RealStack,
    ids: list[str],
    sessions: list[str | None],
    stored: dict[str, tuple[str, str]],
    report: QueueSoakReport,
) -> None:
    mine_of = {
        i: [job_id for n, job_id in enumerate(ids) if n % len(sessions) == i]
        for i in range(len(stack.watchers))
    }

    def finished(i: int) -> bool:  # complete, catch-up included
        streams = stack.watchers[i].reassembly.streams
        return all(
            (st := streams.get(job_id)) is not None and (st.complete or st.error is not None)
            for job_id in mine_of[i]
        )

    with contextlib.suppress(TimeoutError):  # what is missing is reported below
        async with asyncio.timeout(30):
            while not all(finished(i) for i in mine_of):  # noqa: ASYNC110 - polls 4 watchers
                await asyncio.sleep(0.1)
    for i, watcher in enumerate(stack.watchers):
        report.caught_up_tokens += watcher.caught_up_tokens
        seen: dict[tuple[str, int], set[str]] = {}
        for event, payload in watcher.recorded or []:
            if event == "llm-token":
                for k, token in enumerate(payload["tokens"]):
                    seen.setdefault((payload["stream"], payload["offset"] + k), set()).add(token)
        report.conflicting_offsets += sum(1 for tokens in seen.values() if len(tokens) > 1)
        for job_id in mine_of[i]:
            state = watcher.reassembly.streams.get(job_id)
            if state is not None:
                report.duplicates_dropped += state.duplicate_tokens
            if state is None or not state.complete:
                report.gaps_left += 1
            if state is None or job_id not in stored:
                why = "no stream" if state is None else "not stored"
            elif state.text() != stored[job_id]:
                why = "text differs from the stored transcript"
            elif not state.checksums_match():
                why = "checksum mismatch"
            else:
                report.subscriber_exact_live += 1
                continue
            statuses = [] if state is None else [m.status for m in state.statuses]
            report.subscriber_not_exact.append({"id": job_id, "why": why, "statuses": statuses})


def _caught_up(state: StreamReassembly, transcript: str) -> bool:
    resumed = any(m.status == "resuming" for m in state.statuses)
    content, _ = state.text()
    done = state.done
    return (
        resumed
        and done is not None
        and state.error is None
        and transcript.startswith(content)
        and text_checksum(transcript) == done.content_sha256
    )


async def _kill_one_mid_stream(
    repo: PostgresJobRepository,
    ids: list[str],
    workers: Workers,
    config: QueueSoakConfig,
    report: QueueSoakReport,
) -> None:
    """SIGKILL soak-a while it streams a request: after `kill_after_s`, or sooner once
    most requests are final (a fixed wait let fast runs drain the queue first, and
    then soak-a had nothing left to be killed in)."""
    seen: dict[str, tuple[str | None, str]] = {}
    try:
        owned = await _soak_a_streaming(repo, ids, seen, config.kill_after_s)
    except TimeoutError:
        # Say what the queue looked like: who held what, and soak-a's own last words.
        rows = sorted(f"{owner}:{status}" for owner, status in seen.values())
        log_tail = (workers.logs / "soak-a.log").read_text(errors="replace")[-3000:]
        raise TimeoutError(
            f"soak-a streamed no request within 60 s; last seen (owner:status): {rows}; "
            f"soak-a log tail:\n{log_tail}"
        ) from None
    proc = workers.procs["soak-a"]
    proc.send_signal(signal.SIGKILL)
    report.killed_exit_code = await asyncio.to_thread(proc.wait, 10)
    report.running_on_killed_worker = owned


async def _soak_a_streaming(
    repo: PostgresJobRepository,
    ids: list[str],
    seen: dict[str, tuple[str | None, str]],
    after_s: float,
) -> int:
    """How many requests soak-a streams (a running row with tokens), once it streams
    one and `after_s` passed or three quarters of the requests are final."""
    started = time.monotonic()
    async with asyncio.timeout(60):
        while True:
            owned = 0
            for job_id in ids:
                record = await repo.get(job_id)
                if record is None:
                    continue
                seen[job_id] = (record.lease_owner, record.status)
                if (
                    record.lease_owner == "soak-a"
                    and record.status == "running"
                    and (
                        record.snapshot.next_offset > 0  # scripted runner: row checkpoints
                        or await repo.read_chunks(job_id, 0)  # real runner: its token log
                    )
                ):
                    owned += 1
            final = sum(1 for _, status in seen.values() if status not in ("queued", "running"))
            late = time.monotonic() - started >= after_s or final >= len(ids) * 3 // 4
            if owned and late:
                return owned
            await asyncio.sleep(0.05)


async def _wait_all_final(repo: PostgresJobRepository, ids: list[str], within_s: float) -> None:
    pending = set(ids)
    try:
        async with asyncio.timeout(max(1.0, within_s)):
            while pending:
                for job_id in list(pending):
                    record = await repo.get(job_id)
                    if record is not None and record.status not in ("queued", "running"):
                        pending.discard(job_id)
                await asyncio.sleep(0.2)
    except TimeoutError:
        pass  # what is still pending is reported as lost


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak_queue", description=__doc__)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="60 requests")
    parser.add_argument("--real", action="store_true", help="the real runner through Realtime")
    parser.add_argument("--out")
    parser.add_argument(
        "--exact-upstream", action="store_true", help="--real: an upstream that continues exactly"
    )
    args = parser.parse_args(argv)
    config = QueueSoakConfig(
        requests=60 if args.quick else args.requests,
        tokens=args.tokens,
        real=args.real,
        own_words=not args.exact_upstream,
    )
    from devstack.postgres import EmbeddedPostgres, apply_schema

    root = Path(tempfile.mkdtemp(prefix="soak-pg-"))
    pg = EmbeddedPostgres(root / "data")
    pg.start()
    try:
        url = pg.create_database("soak")
        apply_schema(url)
        report = asyncio.run(run_queue_soak(url, config))
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    text = json.dumps(report.to_dict(), indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
