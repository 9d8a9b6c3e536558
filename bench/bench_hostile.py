"""Peak RSS of the worker path under each hostile upstream mode (issue #12).

    python -m bench.bench_hostile [--path once|run] [--tree PATH] [--modes a,b] [--out F]

In this process: the local Realtime server and the simulated upstream (with its
hostile modes). Per mode, `--path once` (default): `python -m worker once` as a
subprocess (upstream client -> relay_stream -> acked publisher -> Realtime), its peak
RSS from `wait4()`'s `ru_maxrss`, its exit, wall time and the error it reported.
`--path run`: a fresh `python -m worker run` per mode on an embedded Postgres, one
request submitted through the queue (`max_tokens` 10), waited for until its row is
final; the row's status and error, and the process's peak RSS (VmHWM) before SIGTERM.
References in the same run: `healthy` (a normal stream through the same path) and
`idle` (`once`: the CLI started and left at once, `python -m worker --help`; `run`:
the worker after start-up, before any request).

`--tree` runs another checkout's worker (e.g. main before the fix) against the same
stand-ins; the sizes below keep the pre-fix run finite (it reads all of them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from devstack.jwt import api_key
from devstack.realtime import RealtimeServer
from devstack.upstream import Fault, SimulatedUpstream

KEY = "sk-bench-hostile-0123456789"
MIB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]
PER_MODE_TIMEOUT_S = 300.0
USER = "6f1b1c1e-0000-4000-8000-0000000000f1"
WORKER_START_S = 5.0


def modes() -> dict[str, Fault | None]:
    return {
        "healthy": None,
        "empty_data": Fault.empty_data(),
        "endless_data": Fault.endless_data(after_tokens=3, size_bytes=512 * MIB),
        "no_newline": Fault.no_newline(after_tokens=3, size_bytes=64 * MIB),
        "gzip_bomb": Fault.gzip_bomb(size_bytes=512 * MIB),
        "gzip_bomb_line": Fault.gzip_bomb(size_bytes=512 * MIB, style="line"),
        "ignore_max_tokens": Fault.ignore_max_tokens(tokens=200_000),
        "nul_token": Fault.nul_token(after_tokens=3),
        "echo_key": Fault.echo_key(status=500),
        "inband_error": Fault.inband_error(after_tokens=5, style="openrouter", code=502),
    }


def _env(realtime: RealtimeServer, upstream: SimulatedUpstream, tree: Path) -> dict[str, str]:
    ours = ("RELAY_", "SUPABASE_", "OPENAI_", "GROQ_", "DATABASE_URL")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env.update(
        PYTHONPATH=str(tree),
        SUPABASE_URL=realtime.url,
        SUPABASE_SERVICE_ROLE_KEY=api_key("service_role"),
        OPENAI_API_KEY=KEY,
        OPENAI_BASE_URL=upstream.base_url,
        RELAY_PRIVATE_CHANNELS="false",
        RELAY_UPSTREAM_RETRIES="0",
        RELAY_HTTP_PORT="0",
        RELAY_LOG_LEVEL="WARNING",
    )
    return env


def _run_child(command: list[str], env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """Start, wait with wait4 (peak RSS of exactly this child), parse its stdout."""
    started = time.monotonic()
    proc = subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    out = b""
    deadline = started + PER_MODE_TIMEOUT_S
    os.set_blocking(proc.stdout.fileno(), False)
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        chunk = proc.stdout.read() or b""
        out += chunk
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.02)
    out += proc.stdout.read() or b""
    proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait again
    summary: dict[str, Any] = {}
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("{"):
            summary = json.loads(line)
    return {
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
        "exit": proc.returncode,
        "seconds": round(time.monotonic() - started, 2),
        "tokens": summary.get("tokens"),
        "finish_reason": summary.get("finish_reason"),
        "error": summary.get("error"),
    }


async def run(tree: Path, only: set[str]) -> dict[str, Any]:
    realtime = RealtimeServer()
    await realtime.start()
    upstream = SimulatedUpstream(text="Hostile bench: a short answer of a few words. " * 4)
    upstream.api_key = KEY
    await upstream.start()
    results: dict[str, Any] = {}
    try:
        env = _env(realtime, upstream, tree)
        cwd = Path("/tmp")  # no stray .env
        idle = [sys.executable, "-m", "worker", "--help"]
        results["idle"] = await asyncio.to_thread(_run_child, idle, env, cwd)
        for name, fault in modes().items():
            if only and name not in only:
                continue
            upstream.faults.clear()
            if fault is not None:
                upstream.faults.push(fault)
            command = [
                *(sys.executable, "-m", "worker", "once", "--session", f"bench-{name}"),
                *("--max-tokens", "10", "hello"),
            ]
            results[name] = await asyncio.to_thread(_run_child, command, env, cwd)
            print(name, results[name], file=sys.stderr, flush=True)
    finally:
        await upstream.stop()
        await realtime.stop()
    return {
        "tree": str(tree),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, "
        f"Python {platform.python_version()} (shared with other sessions)",
        "modes": results,
    }


def _vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


async def _run_mode(env: dict[str, str], name: str, database_url: str) -> dict[str, Any]:
    """One `llm-relay run` process, one request through the queue, its row's end."""
    from worker.jobs import NewRequest, PostgresJobRepository

    repo = PostgresJobRepository.from_url(database_url, pool_size=2)
    worker = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "worker", "run", "--worker-id", f"hostile-{name}"),
        env=env,
        cwd="/tmp",
        stderr=subprocess.DEVNULL,
    )
    started = time.monotonic()
    try:
        await asyncio.sleep(WORKER_START_S)
        idle_mb = _vm_hwm_mb(worker.pid)
        session = await repo.create_session_as(USER)
        request = NewRequest(
            [{"role": "user", "content": "hello"}], params={"max_tokens": 10}, session_id=session
        )
        submitted = await repo.submit_as(USER, request)
        record = None
        timed_out = False
        try:
            async with asyncio.timeout(PER_MODE_TIMEOUT_S):
                while worker.returncode is None:
                    record = await repo.get(submitted.id)
                    if record is not None and record.status not in ("queued", "running"):
                        break
                    await asyncio.sleep(0.2)
        except TimeoutError:
            timed_out = True  # reported: the row was still not final
        alive = worker.returncode is None
        peak_mb = _vm_hwm_mb(worker.pid) if alive else None
        error = record.error if record is not None else None
        return {
            "peak_rss_mb": peak_mb,
            "idle_rss_mb": idle_mb,
            "worker_alive": alive,
            "timed_out": timed_out,
            "status": record.status if record is not None else None,
            "tokens": record.snapshot.next_offset if record is not None else None,
            "finish_reason": record.finish_reason if record is not None else None,
            "error": None if error is None else {k: error.get(k) for k in ("type", "message")},
            "seconds": round(time.monotonic() - started - WORKER_START_S, 2),
        }
    finally:
        await repo.close()
        if worker.returncode is None:
            worker.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(worker.wait(), 30)
        except TimeoutError:
            worker.kill()
            await asyncio.wait_for(worker.wait(), 10)


async def run_queue(tree: Path, only: set[str]) -> dict[str, Any]:
    from devstack.postgres import EmbeddedPostgres, apply_schema

    root = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
    pg = EmbeddedPostgres(root / "data")
    pg.start()
    realtime = RealtimeServer()
    upstream = SimulatedUpstream(text="Hostile bench: a short answer of a few words. " * 4)
    upstream.api_key = KEY
    results: dict[str, Any] = {}
    try:
        url = pg.create_database("hostile")
        apply_schema(url)
        await realtime.start()
        await upstream.start()
        env = {**_env(realtime, upstream, tree), "DATABASE_URL": url}
        for name, fault in modes().items():
            if only and name not in only:
                continue
            upstream.faults.clear()
            if fault is not None:
                upstream.faults.push(fault)
            results[name] = await _run_mode(env, name, url)
            print(name, results[name], file=sys.stderr, flush=True)
    finally:
        await upstream.stop()
        await realtime.stop()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    return {
        "path": "llm-relay run",
        "tree": str(tree),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, "
        f"Python {platform.python_version()} (shared with other sessions)",
        "modes": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_hostile")
    parser.add_argument("--tree", type=Path, default=ROOT, help="checkout whose worker runs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "hostile.json")
    parser.add_argument("--modes", default="", help="comma-separated subset (default: all)")
    parser.add_argument("--path", choices=["once", "run"], default="once")
    args = parser.parse_args()
    only = {m.strip() for m in args.modes.split(",") if m.strip()}
    entry = run if args.path == "once" else run_queue
    report = asyncio.run(entry(args.tree.resolve(), only))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
