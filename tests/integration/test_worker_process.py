"""`llm-relay run` as real processes on real Postgres: kill -9 takeover, SIGTERM drain.

The workers use the scripted runner (deterministic tokens `t0 t1 ...`), so the
stored transcript after a takeover can be compared with the exact expected text.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from worker.jobs import JobRecord, NewRequest, PostgresJobRepository
from worker.service.testing import scripted_text

pytestmark = [pytest.mark.integration, pytest.mark.slow]

USER_A = "6f1b1c1e-0000-4000-8000-00000000000a"
HELLO = [{"role": "user", "content": "hello"}]
STARTUP_S = 30.0  # a cold interpreter on a busy 2-core machine


class WorkerProcess:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def spawn(database_url: str, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def _spawn(worker_id: str, *, tokens: int, delay_ms: int, **env: str) -> WorkerProcess:
        environ = {
            **os.environ,
            "DATABASE_URL": database_url,
            "RELAY_LEASE_S": "1.5",
            "RELAY_HEARTBEAT_INTERVAL_S": "0.3",
            "RELAY_CHECKPOINT_INTERVAL_S": "0.1",
            "RELAY_POLL_INTERVAL_S": "0.2",
            "RELAY_HTTP_PORT": "0",
            "RELAY_LOG_LEVEL": "INFO",
            **env,
        }
        log = tmp_path / f"{worker_id}.log"
        command = [
            sys.executable,
            "-m",
            "worker",
            "run",
            "--worker-id",
            worker_id,
            "--runner",
            "worker.service.testing:scripted",
            "-o",
            f"tokens={tokens}",
            "-o",
            f"delay_ms={delay_ms}",
        ]
        with log.open("wb") as sink:
            # cwd: an empty directory, so no stray .env is read
            proc = subprocess.Popen(command, env=environ, cwd=tmp_path, stderr=sink)
        started.append(WorkerProcess(proc, log))
        return started[-1]

    yield _spawn
    for worker in started:
        if worker.proc.poll() is None:
            worker.proc.kill()
        worker.proc.wait(timeout=10)


@pytest.fixture
async def repo(database_url: str) -> AsyncIterator[PostgresJobRepository]:
    repository = PostgresJobRepository.from_url(database_url, pool_size=1)
    yield repository
    await repository.close()


async def wait_for(
    repo: PostgresJobRepository, job_id: str, ok: Callable[[JobRecord], bool], within_s: float
) -> JobRecord:
    async with asyncio.timeout(within_s):
        while True:
            record = await repo.get(job_id)
            if record is not None and ok(record):
                return record
            await asyncio.sleep(0.05)


async def test_kill_9_mid_stream_another_worker_completes_the_request(
    repo: PostgresJobRepository, spawn: Callable[..., WorkerProcess]
) -> None:
    submitted = await repo.submit_as(USER_A, NewRequest(HELLO))
    first = spawn("worker-a", tokens=150, delay_ms=20)
    at_kill = await wait_for(
        repo,
        submitted.id,
        lambda r: r.lease_owner == "worker-a" and r.snapshot.next_offset >= 20,
        STARTUP_S,
    )
    first.proc.send_signal(signal.SIGKILL)
    assert first.proc.wait(timeout=10) == -signal.SIGKILL
    killed_at = await repo.get(submitted.id)
    assert killed_at is not None and killed_at.status == "running"
    checkpoint = killed_at.snapshot.next_offset
    assert checkpoint >= at_kill.snapshot.next_offset and checkpoint < 150

    second = spawn("worker-b", tokens=150, delay_ms=2)
    record = await wait_for(repo, submitted.id, lambda r: r.status != "running", STARTUP_S)
    assert (record.status, record.attempts, record.finish_reason) == ("done", 2, "stop")
    assert record.snapshot.content == scripted_text(0, 150)
    assert record.snapshot.next_offset == 150
    # worker-b continued from the dead worker's last checkpoint, not from the start
    resumed = re.search(r"attempt 2, from offset (\d+), resumed", second.text())
    assert resumed is not None, second.text()
    assert int(resumed.group(1)) == checkpoint


async def test_sigterm_drains_within_the_grace_period(
    repo: PostgresJobRepository, spawn: Callable[..., WorkerProcess]
) -> None:
    short = await repo.submit_as(USER_A, NewRequest(HELLO, params={"max_tokens": 40}))
    long = await repo.submit_as(USER_A, NewRequest(HELLO))  # 4096 tokens: ~80 s
    worker = spawn("worker-a", tokens=100_000, delay_ms=20, RELAY_GRACE_PERIOD_S="2")
    for job_id in (short.id, long.id):
        await wait_for(repo, job_id, lambda r: r.snapshot.next_offset >= 3, STARTUP_S)
    asked = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(worker.proc.wait, 15)
    took = time.monotonic() - asked
    assert code == 0, worker.text()
    assert took < 2.0 + 2.0  # grace period, plus process exit on a busy machine

    done = await repo.get(short.id)
    assert done is not None and done.status == "done"
    assert done.snapshot.content == scripted_text(0, 40)
    released = await repo.get(long.id)
    assert released is not None
    assert (released.status, released.attempts, released.lease_owner) == ("queued", 0, None)
    offset = released.snapshot.next_offset
    assert 3 <= offset < 4096
    assert released.snapshot.content == scripted_text(0, offset)
    assert "worker stopped cleanly" in worker.text()
