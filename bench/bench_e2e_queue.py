"""End to end through `llm-relay run`: the queue, one real worker process, the local
Realtime server and independent subscribers (issue 9).

    python -m bench.bench_e2e_queue [--quick] [--levels 1,100] [--seconds 5]

Processes: the embedded PostgreSQL (migrated), the simulated upstream (paced at
`--rate` tok/s per stream), the local Realtime server (quotas lifted, private
channels authorized by RLS on that database), one `python -m worker run` process
per level (the real runner; `RELAY_CONCURRENCY` >= streams, the message quota
lifted as `bench_e2e` does) and one *subscriber* process (realtime-py clients
under the user's JWT, one private channel per session, client rule by offset).
This process creates one session per stream and submits the requests the way a
frontend does (`create_session_as`, `submit_as` under RLS), then waits for every
request to be final.

The simulated upstream does not report when it emitted a token, so the per-token
figure is not "receipt − emit". Measured instead (all `time.monotonic`,
system-wide on Linux):
- first token from submit: subscriber receipt of offset 0 − return of `submit_as`
  (includes the NOTIFY/claim, the upstream request and its first chunk);
- lag behind pace: receipt of offset k − (receipt of offset 0 + k / rate), i.e. how
  far a token arrives behind the upstream's paced schedule anchored at the first
  receipt (the batcher's wait, the worker's and the server's queues);
- worker CPU per token: utime + stime of the worker process (/proc) over the level;
- worker peak RSS: VmHWM of the worker process at the end of the level.
- Postgres writes (issue 14): committed transactions of the database (pg_stat_database
  `xact_commit`, every statement of the queue is one) and rows inserted into the
  token log, per second of the level; `--wal on,off` runs each level with the
  write-ahead token log on (the product default) and off (RELAY_WAL=false), side by
  side in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import (
    BENCH_KEY,
    Receipts,
    Stack,
    close_clients,
    cpu_seconds,
    join_channels,
    long_text,
    machine,
    machine_busy_seconds,
    median,
    percentile,
    stack,
)

if TYPE_CHECKING:
    from worker.relay.reassembly import StreamReassembly

USER = "6f1b1c1e-0000-4000-8000-0000000000e9"
WORKER_START_S = 5.0  # a cold interpreter connecting to Postgres and Realtime


# --- subscriber role -------------------------------------------------------------


async def _subscriber(args: argparse.Namespace, sessions: list[str]) -> dict[str, Any]:
    receipts = Receipts()
    topics = [f"llm-token:{session}" for session in sessions]
    private: Any = {"config": {"private": True}}
    url = args.realtime_url + "/realtime/v1"
    clients = await join_channels(
        url,
        args.token,
        topics,
        private,
        receipts.on_message,
        joins_per_second=float(args.joins_per_second) if args.joins_per_second else None,
    )
    print("READY", flush=True)
    states = receipts.states
    await _wait_streams(states, len(sessions), Path(args.stop), args.seconds * 4 + 900)
    await close_clients(clients)
    report = receipts.report()
    expected = args.expected_text
    if expected is not None:
        # Exact means what the upstream sent, not only self-consistent with llm-done
        # (a token lost before publication would leave the checksums matching).
        report["exact"] = sum(
            1
            for s in states.values()
            if s.complete and s.checksums_match() and s.text() == (expected, "")
        )
    return {
        **report,
        "errors": _error_counts(states),
        "tokens": sum(s.next_offset for s in states.values()),
    }


async def _wait_streams(
    states: dict[str, StreamReassembly], n: int, stop: Path, within_s: float
) -> None:
    """Until every stream is complete, or once the bench says every request is final
    (a failed request may never send a message) and late messages had 2 s."""
    deadline = time.monotonic() + within_s
    stop_seen: float | None = None
    while time.monotonic() < deadline:
        if len(states) == n and all(s.complete for s in states.values()):
            return
        if stop_seen is None and await asyncio.to_thread(stop.exists):
            stop_seen = time.monotonic()
        if stop_seen is not None and time.monotonic() - stop_seen > 2.0:
            return
        await asyncio.sleep(0.1)


def _error_counts(states: dict[str, StreamReassembly]) -> dict[str, int]:
    errors: dict[str, int] = {}
    for state in states.values():
        if state.error is not None:
            key = f"{state.error.type}: {state.error.message}"[:120]
            errors[key] = errors.get(key, 0) + 1
    return errors


# --- orchestration -----------------------------------------------------------------


def _worker_env(
    s: Stack, args: argparse.Namespace, database_url: str, streams: int, wal: bool = True
) -> dict[str, str]:
    return {
        "RELAY_WAL": "true" if wal else "false",
        **os.environ,
        "DATABASE_URL": database_url,
        "SUPABASE_URL": s.realtime_url,
        "SUPABASE_SERVICE_ROLE_KEY": s.service_key,
        "OPENAI_BASE_URL": s.upstream_url,
        "OPENAI_API_KEY": BENCH_KEY,
        "RELAY_PROVIDER": "openai",
        "RELAY_MESSAGES_PER_SECOND": "1000000",  # a quota that does not bind (as bench_e2e)
        "RELAY_CONCURRENCY": str(max(streams, 1)),
        "RELAY_HTTP_PORT": "0",
        "RELAY_LOG_LEVEL": "WARNING",
        "RELAY_DRAIN_TIMEOUT_S": "120",
        "RELAY_FIRST_TOKEN_TIMEOUT_S": "120",
        "RELAY_IDLE_TIMEOUT_S": "120",
        **getattr(args, "worker_env", {}),
    }


def _peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


async def _submit_and_wait(
    database_url: str, sessions: list[str], timeout_s: float
) -> tuple[dict[str, float], dict[str, str], float]:
    """Submits one request per session under the user's JWT; returns the submit time
    per request id, the final status per id, and the wall time to all final."""
    import psycopg

    from worker.jobs import NewRequest, PostgresJobRepository

    repo = PostgresJobRepository.from_url(database_url, pool_size=4)
    submitted: dict[str, float] = {}
    final: dict[str, str] = {}
    try:
        started = time.monotonic()

        async def one(i: int, session: str) -> None:
            request = NewRequest([{"role": "user", "content": f"e2e {i}"}], session_id=session)
            sub = await repo.submit_as(USER, request)
            submitted[sub.id] = time.monotonic()

        await asyncio.gather(*(one(i, s) for i, s in enumerate(sessions)))
        # One statement per poll: a `repo.get` per pending row (1,000 reads of whole
        # rows every 0.2 s) made the bench itself a large share of Postgres's load.
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            with contextlib.suppress(TimeoutError):  # what is not final is reported
                async with asyncio.timeout(timeout_s):
                    while len(final) < len(submitted):
                        cur = await conn.execute(
                            "SELECT id::text, status FROM public.llm_requests"
                            " WHERE id = ANY(%s::uuid[]) AND status NOT IN ('queued', 'running')",
                            (list(submitted.keys() - final.keys()),),
                        )
                        for job_id, status in await cur.fetchall():
                            final[job_id] = status
                        await asyncio.sleep(0.2)
        return submitted, final, time.monotonic() - started
    finally:
        await repo.close()


async def _create_sessions(database_url: str, n: int) -> list[str]:
    from worker.jobs import PostgresJobRepository

    repo = PostgresJobRepository.from_url(database_url, pool_size=2)
    try:
        return [await repo.create_session_as(USER) for _ in range(n)]
    finally:
        await repo.close()


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _db_counters(database_url: str) -> tuple[int, int]:
    """(committed transactions, rows inserted into the token log) so far."""
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        commits = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
        rows = conn.execute(
            "SELECT coalesce(sum(n_tup_ins), 0) FROM pg_stat_user_tables"
            " WHERE relname = 'llm_request_chunks'"
        ).fetchone()
    return int(commits[0] if commits else 0), int(rows[0] if rows else 0)


STATS_FLUSH_S = 1.5  # backends publish their counters about once a second


def run_level(
    s: Stack,
    args: argparse.Namespace,
    database_url: str,
    streams: int,
    tmp: Path,
    wal: bool = True,
) -> dict[str, Any]:
    from devstack.jwt import user_token

    sessions = asyncio.run(_create_sessions(database_url, streams))
    name = f"{streams}-{'wal' if wal else 'nowal'}"  # one level may run twice (--wal on,off)
    sessions_file, sub_out = tmp / f"sessions-{name}.json", tmp / f"sub-{name}.json"
    sessions_file.write_text(json.dumps(sessions))
    stop = tmp / f"sub-{name}.stop"
    stop.unlink(missing_ok=True)  # a second run of the level (--readers) starts afresh
    timeout = getattr(args, "level_timeout_s", None) or args.seconds * 6 + 900
    log = (tmp / f"worker-{name}.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "worker", "run", "--worker-id", f"e2e-{streams}"],
        env=_worker_env(s, args, database_url, streams, wal),
        cwd=tmp,
        stderr=log,
    )
    sub = subprocess.Popen(
        [
            *(sys.executable, "-m", "bench.bench_e2e_queue", "--role", "subscriber"),
            *("--sessions", str(sessions_file), "--out", str(sub_out), "--stop", str(stop)),
            *("--realtime-url", s.realtime_url, "--token", user_token(USER)),
            *("--seconds", str(args.seconds)),
            *("--joins-per-second", str(getattr(args, "subscriber_joins_per_second", 0) or "")),
            *(
                ("--expect-file", str(args.expect_file))
                if getattr(args, "expect_file", None)
                else ()
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sub.stdout is not None
        if sub.stdout.readline().strip() != "READY":
            raise RuntimeError("subscriber did not start")
        time.sleep(max(0.0, WORKER_START_S))
        if worker.poll() is not None:
            raise RuntimeError(f"worker exited {worker.returncode}, see {log.name}")
        # The subscriber's joins are behind it by now: its CPU counts from here too.
        pids = {**s.pids, "subscriber": sub.pid}
        stack_cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        time.sleep(STATS_FLUSH_S)
        db0 = _db_counters(database_url)
        cpu0, busy0 = cpu_seconds(worker.pid), machine_busy_seconds()
        submitted, final, wall = asyncio.run(_submit_and_wait(database_url, sessions, timeout))
        cpu, busy = cpu_seconds(worker.pid) - cpu0, machine_busy_seconds() - busy0
        time.sleep(STATS_FLUSH_S)
        db1 = _db_counters(database_url)
        stack_cpu = {name: cpu_seconds(pid) - stack_cpu0[name] for name, pid in pids.items()}
        rss_kb = _peak_rss_kb(worker.pid)
        stop.touch()
        sub.wait(timeout=120)
    finally:
        _stop(sub)
        _stop(worker)
        log.close()
    r = json.loads(sub_out.read_text())
    figures = _figures(args, streams, submitted, final, wall, cpu, rss_kb, r, stack_cpu)
    figures["wal"] = wal
    # Everything shares the machine: how much of it the level used (2 cores = 2.0).
    figures["machine_busy_cores"] = round(busy / wall, 2) if wall else 0.0
    # The counters also cover the flush sleep, so per second is over wall + sleep.
    span = wall + STATS_FLUSH_S
    figures["pg_commits_per_s"] = round((db1[0] - db0[0]) / span, 1)
    figures["pg_log_rows_per_s"] = round((db1[1] - db0[1]) / span, 1)
    return figures


def _figures(
    args: argparse.Namespace,
    streams: int,
    submitted: dict[str, float],
    final: dict[str, str],
    wall: float,
    cpu: float,
    rss_kb: int,
    r: dict[str, Any],
    stack_cpu: dict[str, float],
) -> dict[str, Any]:
    lags: list[float] = []
    first: list[float] = []
    rates: list[float] = []
    for job_id, at in submitted.items():
        got = r["received"].get(job_id, {})
        if "0" not in got:
            continue
        t0 = got["0"]
        first.append(t0 - at)
        lags.extend(t - t0 - int(k) / args.rate for k, t in got.items())
        span = max(got.values()) - t0
        if span > 0:
            rates.append((len(got) - 1) / span)
    tokens = r["tokens"]
    statuses: dict[str, int] = {}
    for status in final.values():
        statuses[status] = statuses.get(status, 0) + 1
    return {
        "streams": streams,
        "exact": r["exact"],
        "final_statuses": statuses,
        "errors": r["errors"],
        "not_final": len(submitted) - len(final),
        "tokens": tokens,
        "wall_s": round(wall, 1),
        "offered_tok_per_s": streams * args.rate,
        "achieved_tok_per_s": round(tokens / wall, 1) if wall else 0.0,
        "stream_tok_per_s_p50": round(median(rates), 1),
        "stream_tok_per_s_min": round(min(rates, default=0.0), 1),
        "worker_cpu_s": round(cpu, 2),
        "worker_cpu_us_per_token": round(cpu / max(1, tokens) * 1e6, 1),
        "worker_cpu_utilization": round(cpu / wall, 2) if wall else 0.0,
        "lag_behind_pace_p50_ms": round(percentile(lags, 50) * 1000, 1),
        "lag_behind_pace_p99_ms": round(percentile(lags, 99) * 1000, 1),
        "first_token_from_submit_p50_ms": round(median(first) * 1000, 1),
        "first_token_from_submit_p99_ms": round(percentile(first, 99) * 1000, 1),
        "messages_per_token": round(r["messages"] / max(1, tokens), 4),
        "worker_rss_peak_mb": round(rss_kb / 1024, 1),
        "cpu_s": {name: round(v, 1) for name, v in stack_cpu.items()},
    }


def _run_all(args: argparse.Namespace, levels: list[int]) -> dict[str, Any]:
    from devstack.postgres import EmbeddedPostgres, apply_schema
    from devstack.upstream.tokens import tokenize

    n_tokens = int(args.rate * args.seconds)
    report: dict[str, Any] = {"machine": machine(), "rate": args.rate, "seconds": args.seconds}
    text = long_text(n_tokens)
    report["tokens_per_stream"] = len(tokenize(text))
    report["levels"] = []
    root = Path(tempfile.mkdtemp(prefix="bench-e2e-queue-"))
    pg = EmbeddedPostgres(root / "data")
    pg.start()
    try:
        url = pg.create_database("e2e_queue")
        apply_schema(url)
        with stack(text, tokens_per_second=args.rate, database_url=url) as s:
            for streams in levels:
                for wal in [m == "on" for m in args.wal.split(",") if m]:
                    level = run_level(s, args, url, streams, root, wal)
                    print(json.dumps(level), file=sys.stderr, flush=True)
                    report["levels"].append(level)
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_e2e_queue", description=__doc__)
    parser.add_argument("--levels", default="1,100,1000")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each stream")
    parser.add_argument("--rate", type=float, default=100.0, help="tokens/s per stream")
    parser.add_argument("--quick", action="store_true", help="levels 1 and 20, 2 s streams")
    parser.add_argument("--out")
    parser.add_argument(
        "--wal", default="on", help="on, off or on,off: the write-ahead token log per level"
    )
    # internal: the subscriber process
    parser.add_argument("--role", choices=["subscriber"])
    for flag in (
        *("--sessions", "--realtime-url", "--token", "--stop", "--joins-per-second"),
        "--expect-file",
    ):
        parser.add_argument(flag)
    args = parser.parse_args(argv)
    from worker.logs import configure_logging

    configure_logging(level="ERROR")
    if args.role is not None:
        sessions = json.loads(Path(args.sessions).read_text())
        args.expected_text = Path(args.expect_file).read_text() if args.expect_file else None
        result = asyncio.run(_subscriber(args, sessions))
        Path(args.out).write_text(json.dumps(result))
        return 0
    if args.quick:
        args.levels, args.seconds = "1,20", 2.0
    report = _run_all(args, [int(x) for x in args.levels.split(",") if x])
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
