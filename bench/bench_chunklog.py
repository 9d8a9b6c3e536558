"""The write-ahead token log's cost in the worker: per batch (now) vs per token (before).

    python -m bench.bench_chunklog [--quick] [--streams 100] [--batches 40] [--reps 3]
                                   [--out bench/out/chunklog.json]

An embedded Postgres (its data dir from tempfile.mkdtemp, not under any pytest
basetemp) holds the migrated schema. Each repetition claims `--streams` fresh requests
and lets every stream append `--batches` batches of 10-20 tokens (seeded) through one
`ChunkLog`, each stream awaiting its write before the next (so every flush carries
about one batch per stream: group commit as in the worker). Counted: this process's
CPU (`time.process_time`: the asyncio loop, psycopg, ChunkLog) and the Postgres
backends' CPU (from /proc), per token, and the wall time, of the append phase only.

Variants, interleaved in every repetition (order alternating), same database:
- `per_batch` — the code as it is: one `ChunkRun` per batch, one orjson parameter,
  one row back (`append_chunks` in worker/jobs/queries.sql).
- `per_token` — the reference, kept here only: the statement as it was (five arrays
  in, `RETURNING` one row per token) with the Python work that went with it (a
  `Chunk` per token, five lists, dict rows, a set of keys probed per token).

Figures are medians over repetitions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import WORDS, cpu_seconds, machine, median
from worker.jobs.chunklog import ChunkLog
from worker.jobs.models import Appended, Chunk, ChunkRun, NewRequest
from worker.jobs.postgres import PostgresJobRepository
from worker.jobs.queries import query

USER = "6f1b1c1e-0000-4000-8000-0000000000be"
WORKER = "bench-worker"

# The statement before the log went per batch (commit dafda28), verbatim but for
# its comments: the reference.
LEGACY_APPEND_SQL = """
WITH owned AS (
  SELECT id
  FROM public.llm_requests
  WHERE id = ANY(%(ids)s::uuid[])
    AND lease_owner = %(worker)s
    AND status = 'running'
  FOR KEY SHARE
)
INSERT INTO public.llm_request_chunks (request_id, token_offset, kind, text)
SELECT u.request_id, u.token_offset, u.kind, u.text
FROM unnest(%(request_ids)s::uuid[], %(offsets)s::integer[], %(kinds)s::text[],
            %(texts)s::text[]) AS u(request_id, token_offset, kind, text)
JOIN owned ON owned.id = u.request_id
ON CONFLICT DO NOTHING
RETURNING request_id, token_offset;
"""


class PerTokenRepository(PostgresJobRepository):
    """The per-token path as it was, behind today's interface (reference only)."""

    async def append_chunks(self, *, worker: str, runs: Sequence[ChunkRun]) -> Appended:
        # As `chunks_of` did in the runner, and ChunkLog's flush after it.
        chunks = [
            Chunk(r.job_id, r.offset + i, r.kind, text)
            for r in runs
            for i, text in enumerate(r.texts)
        ]
        rows = await self.driver.fetch_all(
            LEGACY_APPEND_SQL,
            {
                "worker": worker,
                "ids": sorted({c.job_id for c in chunks}),
                "request_ids": [c.job_id for c in chunks],
                "offsets": [c.offset for c in chunks],
                "kinds": [c.kind for c in chunks],
                "texts": [c.text for c in chunks],
            },
        )
        written = {(str(row["request_id"]), row["token_offset"]) for row in rows}
        short = frozenset(
            k
            for k, r in enumerate(runs)
            if not all((r.job_id, r.offset + i) in written for i in range(len(r.texts)))
        )
        return Appended(len(written), short)


def postgres_cpu_s(data_dir: Path) -> float:
    """utime + stime of the postmaster's children alive now (the backends)."""
    postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == postmaster:
                total += cpu_seconds(int(stat.parent.name))
        except (OSError, ValueError):
            continue  # gone meanwhile
    return total


def stream_batches(seed: int, batches: int) -> list[tuple[str, ...]]:
    rng = random.Random(seed)
    return [
        tuple(" " + rng.choice(WORDS) for _ in range(rng.randint(10, 20))) for _ in range(batches)
    ]


async def claim_fresh(repo: PostgresJobRepository, n: int) -> list[str]:
    ids = [
        (await repo.submit_as(USER, NewRequest([{"role": "user", "content": "b"}]))).id
        for _ in range(n)
    ]
    jobs = await repo.claim(worker=WORKER, limit=n, lease_s=600, max_attempts=3)
    assert sorted(j.id for j in jobs) == sorted(ids), "claimed other requests"
    return ids


async def one_run(
    repo: PostgresJobRepository, data_dir: Path, args: argparse.Namespace, seed: int
) -> dict[str, Any]:
    async with repo.driver.connection() as conn:
        await conn.execute("TRUNCATE public.llm_request_chunks")
    ids = await claim_fresh(repo, args.streams)
    work = {job: stream_batches(seed + k, args.batches) for k, job in enumerate(ids)}
    tokens = sum(len(b) for batches in work.values() for b in batches)
    log = ChunkLog(repo, WORKER)
    writer = asyncio.create_task(log.run())

    async def stream(job: str) -> None:
        offset = 0
        for texts in work[job]:
            await log.append(job, [ChunkRun(job, offset, "content", texts)])
            offset += len(texts)

    try:
        pg0, cpu0, wall0 = postgres_cpu_s(data_dir), time.process_time(), time.perf_counter()
        await asyncio.gather(*(stream(job) for job in ids))
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        pg = postgres_cpu_s(data_dir) - pg0
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
    async with repo.driver.connection() as conn:
        cursor = await conn.execute("SELECT count(*) AS n FROM public.llm_request_chunks")
        row = await cursor.fetchone()
    assert row is not None and row["n"] == tokens == log.stats.rows, "rows missing"
    async with repo.driver.connection() as conn:
        await conn.execute(
            "UPDATE public.llm_requests SET status = 'done', lease_owner = NULL"
            " WHERE id = ANY(%(ids)s::uuid[])",
            {"ids": ids},
        )
    return {
        "tokens": tokens,
        "statements": log.stats.statements,
        "worker_cpu_us_per_token": cpu / tokens * 1e6,
        "postgres_cpu_us_per_token": pg / tokens * 1e6,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
    }


async def run_all(url: str, data_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    repos: dict[str, PostgresJobRepository] = {
        "per_batch": PostgresJobRepository.from_url(url),
        "per_token": PerTokenRepository.from_url(url),
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in repos}
    try:
        for repo in repos.values():
            await repo.check()
            await repo.create_session_as(USER)  # warm the pool
        for rep in range(args.reps):
            order = list(repos) if rep % 2 == 0 else list(reversed(repos))
            for name in order:
                result = await one_run(repos[name], data_dir, args, seed=rep * 10_000)
                print(json.dumps({"variant": name, "rep": rep, **result}), file=sys.stderr)
                runs[name].append(result)
    finally:
        for repo in repos.values():
            await repo.close()
    figures = {
        name: {
            key: round(median([r[key] for r in results]), 2)
            for key in (
                "worker_cpu_us_per_token",
                "postgres_cpu_us_per_token",
                "wall_s",
                "tokens_per_s",
                "statements",
            )
        }
        | {"tokens": results[0]["tokens"]}
        for name, results in runs.items()
    }
    return {"figures": figures, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_chunklog", description=__doc__)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--batches", type=int, default=40, help="batches per stream")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="20 streams x 10 batches")
    parser.add_argument("--timeout-s", type=float, default=110.0, help="the whole run")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.quick:
        args.streams, args.batches = 20, 10
    from devstack.postgres import EmbeddedPostgres, apply_schema
    from worker.logs import configure_logging

    configure_logging(level="ERROR")
    assert query("append_chunks") != LEGACY_APPEND_SQL
    report: dict[str, Any] = {
        "machine": machine(),
        "streams": args.streams,
        "batches_per_stream": args.batches,
        "tokens_per_batch": "10-20",
        "reps": args.reps,
    }
    root = Path(tempfile.mkdtemp(prefix="bench-chunklog-"))
    pg = EmbeddedPostgres(root / "data")
    pg.start()
    try:
        url = pg.create_database("chunklog")
        apply_schema(url)

        async def bounded() -> dict[str, Any]:
            async with asyncio.timeout(args.timeout_s):
                return await run_all(url, root / "data", args)

        report |= asyncio.run(bounded())
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    text = json.dumps(report, indent=2)
    print(json.dumps(report["figures"], indent=2))
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
