"""Infrastructure faults against two real workers on the real Postgres (issue 13).

    python -m bench.bench_faults [--out bench/out/faults.json] [--quick]

Each scenario starts a fresh migrated database on one embedded PostgreSQL, two
workers in this process (the real `Worker`, scripted runners that record every
token they publish with its time), worker one reaching Postgres through a fault
proxy (devstack/tcpproxy.py), worker two directly. Ten streams of 400 tokens at
20 ms a token (8 s each) are in flight when the fault begins. Leases are scaled
down (RELAY_LEASE_S=3, heartbeat 0.5 s, database calls bounded at 0.5 s) so an
8 s outage outlasts two leases, as the issue's 30 s outage does with 30 s leases;
one 30 s stop is run as it is.

Scenarios: `none` (the control: same streams, no fault), `postgres-stop` (the
server process stopped and restarted: both workers lose it), `blackhole` (worker
one's path hangs; worker two still reaches Postgres), `cut` (worker one's path
closed for 1 s; four requests submitted after it).

Per scenario: streams exact (done with exactly the scripted text), failed, stuck
(not final 60 s after the fault ended), double-streamed (two workers, or two
attempts, publishing one stream at overlapping times, from the runners' send
records), time to not-ready (fault start -> worker one's `ready` false), time to
ready (fault end -> ready again), and for `cut` the claim latency of the requests
submitted after it (started_at - created_at, the database's clock).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg

from devstack.postgres import EmbeddedPostgres, apply_schema
from devstack.tcpproxy import FaultProxy
from worker.config import Settings
from worker.errors import QueueError
from worker.jobs import JobRecord, NewRequest, PostgresJobRepository
from worker.logs import configure_logging
from worker.service.testing import ScriptedRunner, scripted_text
from worker.service.worker import Worker

USER = "6f1b1c1e-0000-4000-8000-00000000000a"
HELLO = [{"role": "user", "content": "hello"}]
TOKENS = 400
DELAY_S = 0.02
STREAMS = 10
SETTLE_S = 60.0


def settings_for(url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": url,
        "relay_lease_s": 3.0,
        "relay_heartbeat_interval_s": 0.5,
        "relay_db_timeout_s": 0.5,
        "relay_poll_interval_s": 0.25,
        "relay_checkpoint_interval_s": 0.2,
        "relay_grace_period_s": 2.0,
        "relay_concurrency": STREAMS,
    }
    return Settings(_env_file=None, **(values | overrides))


def overlaps(runners: list[ScriptedRunner]) -> int:
    spans: dict[str, list[tuple[float, float]]] = {}
    for index, runner in enumerate(runners):
        times: dict[tuple[str, int, int], list[float]] = {}
        for job_id, attempt, _, sent_at in runner.sends:
            times.setdefault((job_id, index, attempt), []).append(sent_at)
        for (job_id, _, _), ts in times.items():
            spans.setdefault(job_id, []).append((min(ts), max(ts)))
    doubled = 0
    for items in spans.values():
        items.sort()
        if any(b[0] <= a[1] for a, b in itertools.pairwise(items)):
            doubled += 1
    return doubled


async def watch_ready(worker: Worker, want: bool, since: float, limit_s: float) -> float | None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if worker.ready == want:
            return time.monotonic() - since
        await asyncio.sleep(0.02)
    return None


async def wait_final(
    repo: PostgresJobRepository, ids: list[str], limit_s: float
) -> list[JobRecord | None]:
    deadline = time.monotonic() + limit_s
    while True:
        try:
            records = [await repo.get(i) for i in ids]
        except QueueError:  # the bench's own connection may be stale after the fault
            await asyncio.sleep(0.2)
            continue
        final = all(r is not None and r.status in ("done", "failed", "cancelled") for r in records)
        if final or time.monotonic() > deadline:
            return records
        await asyncio.sleep(0.2)


async def claim_latencies(url: str, ids: list[str]) -> list[float]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT extract(epoch FROM started_at - created_at) FROM public.llm_requests"
            " WHERE id = ANY(%s::uuid[])",
            (ids,),
        )
        return [float(row[0]) for row in await cur.fetchall()]


async def scenario(
    pg: EmbeddedPostgres, name: str, fault: str, duration_s: float
) -> dict[str, Any]:
    url = pg.create_database()
    apply_schema(url)
    repo = PostgresJobRepository.from_url(url, pool_size=1)
    runners = [ScriptedRunner(tokens=TOKENS, delay_s=DELAY_S) for _ in range(2)]
    result: dict[str, Any] = {"scenario": name, "fault": fault, "duration_s": duration_s}
    async with FaultProxy(unix_path=pg.socket_path) as proxy:
        proxied = f"postgresql://postgres@127.0.0.1:{proxy.port}{urlsplit(url).path}"
        settings = [settings_for(proxied), settings_for(url)]
        repos = [
            PostgresJobRepository.from_url(s.database_url or "", call_timeout_s=s.db_call_timeout_s)
            for s in settings
        ]
        workers = [
            Worker(r, runner, s, worker_id=f"w{i + 1}")
            for i, (r, runner, s) in enumerate(zip(repos, runners, settings, strict=True))
        ]
        tasks = [asyncio.create_task(workers[0].run())]
        ids = [(await repo.submit_as(USER, NewRequest(HELLO))).id for _ in range(STREAMS)]
        while True:  # every stream running on worker one before the fault
            records = [await repo.get(i) for i in ids]
            if all(r is not None and r.snapshot.next_offset >= 5 for r in records):
                break
            await asyncio.sleep(0.05)
        tasks.append(asyncio.create_task(workers[1].run()))
        await asyncio.sleep(0.5)
        started = time.monotonic()
        stopping: asyncio.Future[None] | None = None
        if fault == "postgres-stop":
            # pg_ctl waits for the shutdown: in a thread, or the workers would stall;
            # and not awaited before watching, or its own duration would be counted.
            stopping = asyncio.ensure_future(asyncio.to_thread(pg.pause, "fast"))
        elif fault == "blackhole":
            proxy.blackhole()
        elif fault == "cut":
            proxy.cut()
        not_ready = None
        if fault != "none":
            not_ready = await watch_ready(workers[0], False, started, duration_s)
        if stopping is not None:
            await stopping
        await asyncio.sleep(max(duration_s - (time.monotonic() - started), 0))
        if fault == "postgres-stop":
            await asyncio.to_thread(pg.resume)  # time to ready counts from here: it answers
        else:
            proxy.restore()
        ended = time.monotonic()
        ready = await watch_ready(workers[0], True, ended, SETTLE_S)
        later: list[str] = []
        if fault == "cut":
            later = [(await repo.submit_as(USER, NewRequest(HELLO))).id for _ in range(4)]
        final = await wait_final(repo, ids + later, SETTLE_S)
        main = final[: len(ids)]
        result |= {
            "streams": len(ids),
            "exact": sum(
                1
                for r in main
                if r is not None
                and r.status == "done"
                and r.snapshot.content == scripted_text(0, TOKENS)
            ),
            "failed": sum(1 for r in main if r is not None and r.status == "failed"),
            "stuck": sum(1 for r in main if r is None or r.status in ("queued", "running")),
            "double_streamed": overlaps(runners),
            # of the streams in flight at the fault (requests submitted after a cut go
            # to worker two as well: worker one has no free slot)
            "taken_over": len({job for job, *_ in runners[1].sends} & set(ids)),
            "time_to_not_ready_s": None if not_ready is None else round(not_ready, 3),
            "time_to_ready_s": None if ready is None else round(ready, 3),
            "worker_alive": [not t.done() for t in tasks],
        }
        if later:
            result["claim_latency_after_cut_s"] = [
                round(x, 3) for x in await claim_latencies(url, later)
            ]
        for worker in workers:
            worker.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        for r in repos:
            await r.close()
    await repo.close()
    return result


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/out/faults.json")
    parser.add_argument("--quick", action="store_true", help="skip the 30 s stop")
    args = parser.parse_args(argv)
    configure_logging("WARNING")
    plan = [
        ("none", "none", 8.0),
        ("postgres-stop-8s", "postgres-stop", 8.0),
        ("blackhole-8s", "blackhole", 8.0),
        ("cut-1s", "cut", 1.0),
    ]
    if not args.quick:
        plan.append(("postgres-stop-30s", "postgres-stop", 30.0))
    root = Path(tempfile.mkdtemp(prefix="llm-relay-faults-"))
    pg = EmbeddedPostgres(root / "data")
    pg.start()
    results = []
    try:
        for name, fault, duration in plan:
            print(f"scenario {name} ...", file=sys.stderr, flush=True)
            results.append(await scenario(pg, name, fault, duration))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    _write(Path(args.out), json.dumps(results, indent=2) + "\n")
    print(
        "| fault | duration | streams exact / failed / stuck | double-streamed | "
        "taken over | to not-ready | to ready |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['scenario']} | {r['duration_s']:g} s | {r['exact']} / {r['failed']} / "
            f"{r['stuck']} of {r['streams']} | {r['double_streamed']} | {r['taken_over']} | "
            f"{r['time_to_not_ready_s']} s | {r['time_to_ready_s']} s |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
