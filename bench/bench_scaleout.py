"""Scale-out: the same queue drained by one, then two `llm-relay run` processes.

    python -m bench.bench_scaleout [--quick] [--requests 200] [--tokens 300]

Real worker processes (the real runner) on one embedded PostgreSQL, the simulated
upstream at 100 tok/s per stream and the local Realtime server (in this process),
no faults, one independent subscriber per session. The queue is filled first, then
the workers start; the figure is the wall time from spawning the workers to every
request final (worker start-up, ~1-3 s of a cold interpreter, included), and the
throughput that implies. Every stored transcript and subscriber copy is checked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import machine
from bench.soak_queue import QueueSoakConfig, run_queue_soak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_scaleout", description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=200, help="per worker")
    parser.add_argument("--lease-s", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="60 requests of 100 tokens")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.tokens = 60, 100
    from devstack.postgres import EmbeddedPostgres, apply_schema

    root = Path(tempfile.mkdtemp(prefix="scaleout-pg-"))
    pg = EmbeddedPostgres(root / "data")
    pg.start()
    rows: list[dict[str, Any]] = []
    try:
        template = pg.create_database("scaleout_template")
        apply_schema(template)
        for workers in (1, 2):
            url = pg.create_database(f"scaleout_{workers}", template="scaleout_template")
            config = QueueSoakConfig(
                requests=args.requests,
                tokens=args.tokens,
                concurrency=args.concurrency,
                tokens_per_second=100.0,
                real=True,
                chaos=False,
                workers=workers,
                timeout_s=600,
                lease_s=args.lease_s,
                heartbeat_s=args.lease_s / 5,
            )
            report = asyncio.run(run_queue_soak(url, config))
            tokens = report.done_exact * args.tokens
            rows.append(
                {
                    "workers": workers,
                    "done_exact": report.done_exact,
                    "lost": len(report.lost),
                    "lost_sample": report.lost[:3],
                    "taken_over": report.taken_over,
                    "subscriber_exact": report.subscriber_exact_live
                    + report.subscriber_exact_after_catch_up,
                    "relay_wall_s": report.relay_wall_s,
                    "requests_per_s": round(report.done_exact / report.relay_wall_s, 2),
                    "tokens_per_s": round(tokens / report.relay_wall_s, 1),
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    result = {"machine": machine(), "requests": args.requests, "tokens": args.tokens}
    result["rows"] = rows
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
