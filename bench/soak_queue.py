"""The queue half of the soak: `kill -9` of a worker process mid-run, another takes over.

    python -m bench.soak_queue [--requests 300] [--quick]

Real `llm-relay run` processes on a real PostgreSQL (embedded): requests are
submitted the way a frontend does (under a user's JWT and RLS), two workers claim
them, one is killed with SIGKILL while it streams, a fresh worker joins, and every
request must end `done` with the stored transcript equal to the expected text
(0 lost requests). The workers use the scripted runner (deterministic tokens),
because the real stream runner is not wired into `llm-relay run` yet
(`worker/service/runner.py`); the relay half of the soak is `bench/soak.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from worker.jobs import NewRequest, PostgresJobRepository
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


@dataclass
class QueueSoakReport:
    config: dict[str, Any]
    requests: int = 0
    done_exact: int = 0
    lost: list[dict[str, Any]] = field(default_factory=list)
    taken_over: int = 0  # requests finished on a later attempt (after the kill)
    running_on_killed_worker: int = 0
    killed_exit_code: int | None = None
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.done_exact == self.requests and not self.lost

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


class Workers:
    def __init__(self, database_url: str, config: QueueSoakConfig, logs: Path) -> None:
        self.database_url = database_url
        self.config = config
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, worker_id: str) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "RELAY_LEASE_S": "1.5",
            "RELAY_HEARTBEAT_INTERVAL_S": "0.3",
            "RELAY_CHECKPOINT_INTERVAL_S": "0.1",
            "RELAY_POLL_INTERVAL_S": "0.2",
            "RELAY_HTTP_PORT": "0",
            "RELAY_CONCURRENCY": str(self.config.concurrency),
            "RELAY_LOG_LEVEL": "WARNING",
        }
        command = [
            *(sys.executable, "-m", "worker", "run", "--worker-id", worker_id),
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
    report = QueueSoakReport(config=asdict(config), requests=config.requests)
    started = time.monotonic()
    repo = PostgresJobRepository.from_url(database_url, pool_size=2)
    logs = Path(tempfile.mkdtemp(prefix="soak-queue-"))
    workers = Workers(database_url, config, logs)
    try:
        ids = [(await repo.submit_as(USER, NewRequest(HELLO))).id for _ in range(config.requests)]
        workers.spawn("soak-a")
        workers.spawn("soak-b")
        await _kill_one_mid_stream(repo, ids, workers, config, report)
        workers.spawn("soak-c")
        await _wait_all_final(repo, ids, config.timeout_s - (time.monotonic() - started))
        expected = scripted_text(0, config.tokens)
        for job_id in ids:
            record = await repo.get(job_id)
            if record is None or record.status != "done" or record.snapshot.content != expected:
                report.lost.append(
                    {
                        "id": job_id,
                        "status": None if record is None else record.status,
                        "next_offset": None if record is None else record.snapshot.next_offset,
                        "attempts": None if record is None else record.attempts,
                        "error": None if record is None else record.error,
                    }
                )
            else:
                report.done_exact += 1
                report.taken_over += record.attempts > 1
    finally:
        workers.stop_all()
        await repo.close()
        shutil.rmtree(logs, ignore_errors=True)
    report.wall_s = round(time.monotonic() - started, 1)
    return report


async def _kill_one_mid_stream(
    repo: PostgresJobRepository,
    ids: list[str],
    workers: Workers,
    config: QueueSoakConfig,
    report: QueueSoakReport,
) -> None:
    """SIGKILL soak-a once it streams several requests (after `kill_after_s` at least)."""
    await asyncio.sleep(config.kill_after_s)
    async with asyncio.timeout(60):
        while True:
            owned = 0
            for job_id in ids:
                record = await repo.get(job_id)
                if (
                    record is not None
                    and record.lease_owner == "soak-a"
                    and record.status == "running"
                    and record.snapshot.next_offset > 0
                ):
                    owned += 1
            if owned:
                break
            await asyncio.sleep(0.1)
    proc = workers.procs["soak-a"]
    proc.send_signal(signal.SIGKILL)
    report.killed_exit_code = await asyncio.to_thread(proc.wait, 10)
    report.running_on_killed_worker = owned


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
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    config = QueueSoakConfig(requests=60 if args.quick else args.requests, tokens=args.tokens)
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
