"""End to end: N concurrent streams at 100 tok/s, upstream → relay → Realtime →
independent subscribers, each part in its own process.

    python -m bench.bench_e2e [--quick] [--levels 1,100,1000] [--seconds 5]

Processes: the simulated upstream (paced at `--rate` tok/s per stream), the local
Realtime server (quotas lifted), one *worker* process (one `Publisher`, N
`UpstreamClient.stream` → `relay_stream` relays at once: what `llm-relay run` does
per stream; the queue is left out, see RESULTS.md) and one *subscriber* process
(realtime-py clients, one channel per stream's topic, client rule by offset).

Measured: worker CPU per token (`time.process_time` of the worker process only),
token latency = subscriber receipt − arrival of that token from the upstream at the
worker (both `time.monotonic`, system-wide on Linux), first-token added latency
(the same for offset 0), messages per token, worker peak RSS per stream, achieved
vs offered token rate (the saturation point).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bench.common import (
    BENCH_KEY,
    Receipts,
    Stack,
    close_clients,
    cpu_seconds,
    join_channels,
    long_text,
    machine,
    median,
    percentile,
    stack,
)

PUBLIC: Any = {"config": {"private": False}}


def _topic(i: int) -> str:
    return f"llm-token:e2e-{i}"


# --- worker role ---------------------------------------------------------------


async def _worker(args: argparse.Namespace) -> dict[str, Any]:
    from worker.config import Settings
    from worker.relay.publisher import Publisher
    from worker.relay.stream import relay_stream
    from worker.upstream.client import UpstreamClient
    from worker.upstream.events import GenerationRequest, Token, UpstreamEvent

    settings = Settings(
        _env_file=None,
        supabase_url=args.realtime_url,
        openai_base_url=args.upstream_url,
        openai_api_key=BENCH_KEY,
        relay_private_channels=False,
        relay_messages_per_second=1_000_000.0,  # a quota that does not bind (see RESULTS)
        relay_drain_timeout_s=120.0,
        relay_first_token_timeout_s=120.0,
        relay_idle_timeout_s=120.0,
    )
    arrivals: dict[int, list[float]] = {}
    started_at: dict[int, float] = {}
    n_tokens = int(args.rate * args.seconds)
    limits = int(os.environ.get("BENCH_HTTP_LIMIT", "2000"))

    import httpx

    transport = httpx.AsyncHTTPTransport(  # one connection per concurrent stream
        limits=httpx.Limits(max_connections=limits, max_keepalive_connections=limits)
    )
    async with UpstreamClient(settings, transport=transport) as client:

        async def timed(
            i: int, events: AsyncIterator[UpstreamEvent]
        ) -> AsyncIterator[UpstreamEvent]:
            times = arrivals.setdefault(i, [])
            async for event in events:
                if isinstance(event, Token):
                    times.append(time.monotonic())
                yield event

        async def one(i: int, publisher: Publisher) -> Any:
            started_at[i] = time.monotonic()
            messages = [{"role": "user", "content": f"e2e {i}"}]
            request = GenerationRequest(messages, max_tokens=n_tokens)
            return await relay_stream(
                timed(i, client.stream(request)),
                publisher=publisher,
                topic=_topic(i),
                stream_id=f"e2e-{i}",
                settings=settings,
            )

        async with Publisher(settings, api_key=args.service_key) as publisher:
            await publisher.wait_connected(30)
            rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            cpu0, wall0 = time.process_time(), time.monotonic()
            results = await asyncio.gather(
                *(one(i, publisher) for i in range(args.streams)), return_exceptions=True
            )
            cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ok = [r for r in results if not isinstance(r, BaseException) and r.error is None]
    tokens = sum(r.content_tokens for r in ok)
    return {
        "cpu_s": cpu,
        "wall_s": wall,
        "tokens": tokens,
        "messages": sum(r.messages for r in ok),
        "errors": len(results) - len(ok),
        "error_samples": [repr(r)[:200] for r in results if r not in ok][:3],
        "rss_before_kb": rss0,
        "rss_peak_kb": rss,
        "arrivals": {str(k): v for k, v in arrivals.items()},
        "started_at": {str(k): v for k, v in started_at.items()},
    }


# --- subscriber role -------------------------------------------------------------


async def _subscriber(args: argparse.Namespace) -> dict[str, Any]:
    receipts = Receipts()
    topics = [_topic(i) for i in range(args.streams)]
    url = args.realtime_url + "/realtime/v1"
    clients = await join_channels(url, args.anon_key, topics, PUBLIC, receipts.on_message)
    print("READY", flush=True)
    deadline = time.monotonic() + args.seconds * 4 + 900
    states = receipts.states
    while time.monotonic() < deadline:
        if len(states) == args.streams and all(s.complete for s in states.values()):
            break
        await asyncio.sleep(0.1)
    await close_clients(clients)
    return receipts.report()


# --- orchestration -----------------------------------------------------------------


def _role_cmd(role: str, s: Stack, args: argparse.Namespace, streams: int, out: Path) -> list[str]:
    return [
        *(sys.executable, "-m", "bench.bench_e2e", "--role", role, "--streams", str(streams)),
        *("--seconds", str(args.seconds), "--rate", str(args.rate), "--out", str(out)),
        *("--realtime-url", s.realtime_url, "--upstream-url", s.upstream_url),
        *("--service-key", s.service_key, "--anon-key", s.anon_key),
    ]


def run_level(s: Stack, args: argparse.Namespace, streams: int, tmp: Path) -> dict[str, Any]:
    sub_out, worker_out = tmp / f"sub-{streams}.json", tmp / f"worker-{streams}.json"
    timeout = args.seconds * 6 + 900
    stack_cpu0 = {name: cpu_seconds(pid) for name, pid in s.pids.items()}
    sub = subprocess.Popen(
        _role_cmd("subscriber", s, args, streams, sub_out), stdout=subprocess.PIPE, text=True
    )
    try:
        assert sub.stdout is not None
        if sub.stdout.readline().strip() != "READY":
            raise RuntimeError("subscriber did not start")
        subprocess.run(
            _role_cmd("worker", s, args, streams, worker_out), check=True, timeout=timeout
        )
        sub.wait(timeout=timeout)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()
    stack_cpu = {name: cpu_seconds(pid) - stack_cpu0[name] for name, pid in s.pids.items()}
    w = json.loads(worker_out.read_text())
    r = json.loads(sub_out.read_text())
    latencies: list[float] = []
    first: list[float] = []
    for i in range(streams):
        arrivals = w["arrivals"].get(str(i), [])
        got = r["received"].get(f"e2e-{i}", {})
        for k, at in enumerate(arrivals):
            seen = got.get(str(k))
            if seen is not None:
                latencies.append(seen - at)
                if k == 0:
                    first.append(seen - at)
    offered = streams * args.rate
    achieved = w["tokens"] / w["wall_s"] if w["wall_s"] else 0.0
    return {
        "streams": streams,
        "exact": r["exact"],
        "errors": w["errors"],
        "error_samples": w["error_samples"],
        "tokens": w["tokens"],
        "worker_cpu_us_per_token": round(w["cpu_s"] / max(1, w["tokens"]) * 1e6, 1),
        "worker_cpu_utilization": round(w["cpu_s"] / w["wall_s"], 2),
        "offered_tok_per_s": offered,
        "achieved_tok_per_s": round(achieved, 1),
        "latency_p50_ms": round(percentile(latencies, 50) * 1000, 1),
        "latency_p99_ms": round(percentile(latencies, 99) * 1000, 1),
        "first_token_added_p50_ms": round(median(first) * 1000, 1),
        "first_token_added_p99_ms": round(percentile(first, 99) * 1000, 1),
        "messages_per_token": round(w["messages"] / max(1, w["tokens"]), 4),
        "worker_rss_peak_mb": round(w["rss_peak_kb"] / 1024, 1),
        "worker_rss_growth_kb_per_stream": round(
            (w["rss_peak_kb"] - w["rss_before_kb"]) / streams, 1
        ),
        "wall_s": round(w["wall_s"], 1),
        # CPU seconds of each process over the level (who saturates first)
        "cpu_s": {
            "worker": round(w["cpu_s"], 1),
            "subscriber": round(r["cpu_s"], 1),
            **{name: round(v, 1) for name, v in stack_cpu.items()},
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_e2e", description=__doc__)
    parser.add_argument("--levels", default="1,100,1000")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each stream")
    parser.add_argument("--rate", type=float, default=100.0, help="tokens/s per stream")
    parser.add_argument("--quick", action="store_true", help="levels 1 and 50, 3 s streams")
    parser.add_argument("--out")
    # internal: the worker and subscriber processes
    parser.add_argument("--role", choices=["worker", "subscriber"])
    parser.add_argument("--streams", type=int, default=1)
    for flag in ("--realtime-url", "--upstream-url", "--service-key", "--anon-key"):
        parser.add_argument(flag)
    args = parser.parse_args(argv)
    from worker.logs import configure_logging

    configure_logging(level="ERROR")
    if args.role is not None:
        role = _worker if args.role == "worker" else _subscriber
        result = asyncio.run(role(args))
        Path(args.out).write_text(json.dumps(result))
        return 0
    if args.quick:
        args.levels, args.seconds = "1,50", 3.0
    levels = [int(x) for x in args.levels.split(",") if x]
    n_tokens = int(args.rate * args.seconds)
    report: dict[str, Any] = {"machine": machine(), "rate": args.rate, "seconds": args.seconds}
    report["levels"] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp,
        stack(long_text(n_tokens + 10), tokens_per_second=args.rate) as s,
    ):
        for streams in levels:
            level = run_level(s, args, streams, Path(tmp))
            print(json.dumps(level), file=sys.stderr, flush=True)
            report["levels"].append(level)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
