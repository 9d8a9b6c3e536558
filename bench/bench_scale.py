"""Scale through `llm-relay run` under the Realtime stand-in's real limits (issue 16),
with two reference consumers of the same paced streams timed in the same run.

    python -m bench.bench_scale [--levels 50:100:8,100:100:8,300:100:8,1000:20:20]
                                [--cap-s 240] [--out bench/out/scale.json]

A level is `streams:tokens_per_second:seconds`. For each level, one stack (simulated
upstream paced at that rate, local Realtime server, embedded Postgres) and, in order:

1. the worker: `python -m worker run` (RELAY_CONCURRENCY = streams) and one subscriber
   process, as in `bench_e2e_queue` (private topics, client rule by offset). The
   Realtime server keeps its real limits — 100 channels per socket, 100 joins/s,
   200 connected users, 5 s join-error stall — and only the message quota is raised
   (to 100 M/s, a quota that does not bind; the worker's own budget is raised too);
   the subscriber paces its joins at 40/s so that both sides stay under 100 joins/s.
2. the **raw asyncio Protocol floor**: one process reads the same number of streams
   from the same upstream with `loop.create_connection` (HTTP/1.0, so the body is
   unframed), splits SSE events and parses each with orjson in `data_received` —
   one loop wake-up per read, no coroutine hop: the least Python can do per token.
3. **httpx + orjson**: one process reads them with `httpx.AsyncClient.stream`,
   `aiter_lines` and orjson.

CPU per token is each process's user+system time over its level divided by the
tokens it handled (the worker's from /proc; the consumers' `time.process_time`).
The ideal time of a level is one stream's length (all streams start at once).
`--cap-s` bounds each level: what is not final by then is reported as such.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from bench.common import BENCH_KEY, long_text, machine, stack

BODY = orjson.dumps(
    {"model": "m", "messages": [{"role": "user", "content": "bench"}], "stream": True}
)
SUBSCRIBER_JOINS_PER_SECOND = 40.0


# --- reference consumers (run as their own processes) --------------------------------


class _SSEProtocol(asyncio.Protocol):
    """Reads one streamed response: split SSE events and parse them in the callback."""

    def __init__(self, done: asyncio.Future[list[str]]) -> None:
        self.done = done
        self.buf = b""
        self.in_body = False
        self.tokens: list[str] = []

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.in_body:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.buf = self.buf[end + 4 :]
            self.in_body = True
        while True:
            end = self.buf.find(b"\n\n")
            if end < 0:
                return
            event, self.buf = self.buf[:end], self.buf[end + 2 :]
            if not event.startswith(b"data: ") or event == b"data: [DONE]":
                continue
            choices = orjson.loads(event[6:]).get("choices")
            if choices:
                content = choices[0].get("delta", {}).get("content")
                if content:
                    self.tokens.append(content)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(self.tokens)


async def _raw_one(base_url: str) -> list[str]:
    url = urlsplit(base_url)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[list[str]] = loop.create_future()
    host, port = url.hostname or "127.0.0.1", url.port or 80
    transport, _ = await loop.create_connection(lambda: _SSEProtocol(done), host, port)
    head = (
        f"POST {url.path}/chat/completions HTTP/1.0\r\nHost: {url.netloc}\r\n"
        f"Authorization: Bearer {BENCH_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\n\r\n"
    )
    transport.write(head.encode() + BODY)
    try:
        return await done
    finally:
        transport.close()


async def _httpx_all(base_url: str, n: int) -> list[list[str]]:
    import httpx

    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(limits=limits, timeout=600) as http:

        async def one() -> list[str]:
            out: list[str] = []
            headers = {"Authorization": f"Bearer {BENCH_KEY}", "Content-Type": "application/json"}
            url = base_url + "/chat/completions"
            async with http.stream("POST", url, content=BODY, headers=headers) as response:
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    choices = orjson.loads(line[6:]).get("choices")
                    if choices:
                        content = choices[0].get("delta", {}).get("content")
                        if content:
                            out.append(content)
            return out

        return await asyncio.gather(*(one() for _ in range(n)))


async def _consume(kind: str, base_url: str, n: int, text: str) -> dict[str, Any]:
    cpu0, wall0 = time.process_time(), time.monotonic()
    if kind == "raw":
        results = await asyncio.gather(*(_raw_one(base_url) for _ in range(n)))
    else:
        results = await _httpx_all(base_url, n)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    tokens = sum(len(r) for r in results)
    return {
        "kind": kind,
        "streams": n,
        "exact": sum(1 for r in results if "".join(r) == text),
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 3),
        "cpu_us_per_token": round(cpu / max(1, tokens) * 1e6, 1),
    }


def _reference(kind: str, base_url: str, n: int, text_file: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "bench.bench_scale", "--role", kind),
            *("--upstream", base_url, "--streams", str(n), "--text-file", str(text_file)),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# --- orchestration ---------------------------------------------------------------------


def _level(args: argparse.Namespace, spec: str, root: Path) -> dict[str, Any]:
    from bench.bench_e2e_queue import run_level
    from devstack.postgres import EmbeddedPostgres, apply_schema
    from devstack.upstream.tokens import tokenize

    streams, rate, seconds = (float(x) for x in spec.split(":"))
    n = int(streams)
    text = long_text(int(rate * seconds))
    text_file = root / f"text-{n}.txt"
    text_file.write_text(text)
    pg = EmbeddedPostgres(root / f"data-{n}")  # a fresh database per level
    pg.start()
    try:
        url = pg.create_database("scale")
        apply_schema(url)
        with stack(text, tokens_per_second=rate, database_url=url, real_limits=True) as s:
            level_args = argparse.Namespace(
                seconds=seconds,
                rate=rate,
                level_timeout_s=args.cap_s,
                subscriber_joins_per_second=SUBSCRIBER_JOINS_PER_SECOND,
                expect_file=text_file,
                worker_env={
                    "RELAY_LOG_LEVEL": "WARNING",
                    **({"PYTHONPATH": args.worker_src} if args.worker_src else {}),
                    **dict(kv.split("=", 1) for kv in args.worker_env),
                },
            )
            by_reader: dict[str, dict[str, Any]] = {}
            for reader in args.readers.split(","):
                level_args.worker_env["RELAY_UPSTREAM_READER"] = reader
                by_reader[reader] = run_level(s, level_args, url, n, root)
            worker = next(iter(by_reader.values()))
            raw = _reference("raw", s.upstream_url, n, text_file)
            httpx_ = _reference("httpx", s.upstream_url, n, text_file)
    finally:
        pg.stop()
    tokens_per_stream = len(tokenize(text))
    ideal = tokens_per_stream / rate
    floor = raw["cpu_us_per_token"]
    return {
        "level": spec,
        "streams": n,
        "rate": rate,
        "tokens_per_stream": tokens_per_stream,
        "ideal_s": round(ideal, 2),
        "worker": worker,
        "worker_by_reader": by_reader,
        "worker_wall_over_ideal": round(worker["wall_s"] / ideal, 2),
        "raw_protocol": raw,
        "httpx_orjson": httpx_,
        "worker_cpu_over_floor": round(worker["worker_cpu_us_per_token"] / floor, 2),
        "httpx_cpu_over_floor": round(httpx_["cpu_us_per_token"] / floor, 2),
    }


def _rest_of_machine(w: dict[str, Any]) -> str:
    """CPU per relayed token of everything but the worker; "other" is Postgres, the
    bench and the kernel (the machine's busy time less every process measured)."""
    tokens = max(1, w["tokens"])
    parts = w.get("cpu_s", {})
    if "machine_busy_cores" not in w or "subscriber" not in parts:
        return "–"
    busy = w["machine_busy_cores"] * w["wall_s"]
    other = busy - w["worker_cpu_s"] - sum(parts.values())
    us = [parts.get(k, 0.0) / tokens * 1e6 for k in ("upstream", "realtime", "subscriber")]
    total = (busy - w["worker_cpu_s"]) / tokens * 1e6
    return f"{total:.0f}: " + " · ".join(f"{x:.0f}" for x in [*us, other / tokens * 1e6])


def render_table(report: dict[str, Any]) -> str:
    """The RESULTS.md table of a saved report."""
    rows = [
        "| streams × tok/s | exact | not final at cap | wall / ideal | achieved / offered "
        "tok/s | lag behind pace p50 / p99 | first token p50 | messages / token | worker "
        "µs/token | raw Protocol µs/token | httpx+orjson µs/token | worker ÷ floor | httpx ÷ "
        "floor | worker CPU use | machine busy (of 2 cores) | the rest of the machine "
        "µs/token: upstream · Realtime · subscriber · other |",
        "|" + "---|" * 16,
    ]
    for d in report["levels"]:
        w, raw, hx = d["worker"], d["raw_protocol"], d["httpx_orjson"]
        lag50, lag99 = w["lag_behind_pace_p50_ms"] / 1000, w["lag_behind_pace_p99_ms"] / 1000
        raw_wall = raw["wall_s"]
        rows.append(
            f"| {d['streams']} × {d['rate']:g} | {w['exact']}/{d['streams']} | {w['not_final']} "
            f"| {w['wall_s']} s / {d['ideal_s']} s = {d['worker_wall_over_ideal']}× "
            f"| {w['achieved_tok_per_s']:.0f} / {w['offered_tok_per_s']:.0f} "
            f"| {lag50:.1f} / {lag99:.1f} s "
            f"| {w['first_token_from_submit_p50_ms'] / 1000:.1f} s | {w['messages_per_token']} "
            f"| {w['worker_cpu_us_per_token']} "
            f"| {raw['cpu_us_per_token']} ({raw['exact']}/{raw['streams']} exact, {raw_wall} s) "
            f"| {hx['cpu_us_per_token']} ({hx['exact']}/{hx['streams']} exact, {hx['wall_s']} s) "
            f"| {d['worker_cpu_over_floor']}× | {d['httpx_cpu_over_floor']}× "
            f"| {w['worker_cpu_utilization']} core | {w.get('machine_busy_cores', '–')} "
            f"| {_rest_of_machine(w)} |"
        )
    compared = [d for d in report["levels"] if len(d.get("worker_by_reader", {})) > 1]
    if compared:
        rows += [
            "",
            "| streams × tok/s | upstream reader | exact | wall / ideal | worker µs/token "
            "| ÷ floor | messages / token | worker CPU use |",
            "|" + "---|" * 8,
        ]
        for d in compared:
            floor = d["raw_protocol"]["cpu_us_per_token"]
            for reader, w in d["worker_by_reader"].items():
                rows.append(
                    f"| {d['streams']} × {d['rate']:g} | {reader} | {w['exact']}/{d['streams']} "
                    f"| {round(w['wall_s'] / d['ideal_s'], 2)}× | {w['worker_cpu_us_per_token']} "
                    f"| {round(w['worker_cpu_us_per_token'] / floor, 2)}× "
                    f"| {w['messages_per_token']} | {w['worker_cpu_utilization']} core |"
                )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_scale", description=__doc__)
    parser.add_argument("--levels", default="50:100:8,100:100:8,300:100:8,1000:20:20")
    parser.add_argument("--cap-s", type=float, default=240.0, help="bound on each level")
    parser.add_argument("--out")
    parser.add_argument(
        "--worker-src", help="run the worker from this checkout (e.g. main, for a baseline)"
    )
    parser.add_argument(
        "--readers",
        default="protocol",
        help="RELAY_UPSTREAM_READER values to run the worker with, each in turn (the first "
        "is the table's)",
    )
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting for the worker (repeatable; the report says which were set)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the logs and data dirs")
    parser.add_argument("--table", help="print the markdown table of a saved report")
    parser.add_argument("--role", choices=["raw", "httpx"])  # internal: a reference consumer
    parser.add_argument("--upstream")
    parser.add_argument("--streams", type=int, default=0)
    parser.add_argument("--text-file")
    args = parser.parse_args(argv)
    if args.table:
        print(render_table(json.loads(Path(args.table).read_text())))
        return 0
    if args.role is not None:
        text = Path(args.text_file).read_text()
        result = asyncio.run(_consume(args.role, args.upstream, args.streams, text))
        print(json.dumps(result), flush=True)
        return 0
    from worker.logs import configure_logging

    configure_logging(level="ERROR")
    report: dict[str, Any] = {
        "machine": machine(),
        "cap_s": args.cap_s,
        "worker_src": args.worker_src or "this checkout",
        "worker_env": args.worker_env,
        "levels": [],
    }
    root = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        for spec in args.levels.split(","):
            level = _level(args, spec, root)
            print(json.dumps(level), file=sys.stderr, flush=True)
            report["levels"].append(level)
            if args.out:  # what finished survives a later level's failure
                Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    finally:
        if args.keep:
            print(f"kept {root} (worker logs, sessions)", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
