"""The worker against the in-memory queue: lifecycle, cancellation, drain, takeover."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import pytest
from loguru import logger

from worker.config import Settings
from worker.errors import PublishError, QueueError, UpstreamError
from worker.jobs.models import Job, NewRequest, Snapshot, Swept
from worker.jobs.testing import InMemoryJobRepository
from worker.relay.publisher import Publisher
from worker.service.context import Outcome, StreamContext, StreamRunner
from worker.service.runner import RelayRunner
from worker.service.testing import ScriptedRunner, scripted_text
from worker.service.worker import Worker, WorkerState

HELLO = [{"role": "user", "content": "hello"}]
WAIT_S = 5.0


def fast_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "relay_poll_interval_s": 0.05,
        "relay_heartbeat_interval_s": 0.05,
        "relay_checkpoint_interval_s": 0.02,
        "relay_lease_s": 5.0,
        "relay_grace_period_s": 2.0,
        "relay_concurrency": 4,
        "relay_max_attempts": 3,
    }
    return Settings(_env_file=None, **(values | overrides))


class FakeClock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


async def wait_until(predicate: Callable[[], bool], within_s: float = WAIT_S) -> None:
    async with asyncio.timeout(within_s):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.005)


@asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(worker.run())
    try:
        yield task
    finally:
        worker.stop()
        await asyncio.wait({task}, timeout=WAIT_S)
        assert task.done(), "the worker did not stop"
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not warn


def status(repo: InMemoryJobRepository, job_id: str) -> str:
    return repo.rows[job_id].status


def finished(repo: InMemoryJobRepository, *ids: str) -> Callable[[], bool]:
    return lambda: all(status(repo, i) in ("done", "failed", "cancelled") for i in ids)


async def test_requests_are_streamed_under_the_concurrency_cap() -> None:
    repo = InMemoryJobRepository()
    scripted = ScriptedRunner(tokens=10, delay_s=0.005)
    now_running = 0
    most = 0

    async def counting(job: Job, ctx: StreamContext) -> Outcome:
        nonlocal now_running, most
        now_running += 1
        most = max(most, now_running)
        try:
            return await scripted(job, ctx)
        finally:
            now_running -= 1

    ids = [repo.add(NewRequest(HELLO)) for _ in range(6)]
    worker = Worker(repo, counting, fast_settings(relay_concurrency=2))
    async with running(worker):
        await wait_until(finished(repo, *ids))
    assert most == 2
    for job_id in ids:
        row = repo.rows[job_id]
        assert (row.status, row.finish_reason, row.attempts) == ("done", "stop", 1)
        assert row.snapshot.content == scripted_text(0, 10)
        assert row.snapshot.next_offset == 10 and row.lease_owner is None
    assert worker.state is WorkerState.STOPPED
    assert worker.metrics.finished.labels(outcome="done")._value.get() == 6


async def test_two_workers_on_one_queue_never_share_a_request() -> None:
    repo = InMemoryJobRepository()
    runners = [ScriptedRunner(tokens=3, delay_s=0.001) for _ in range(2)]
    ids = [repo.add(NewRequest(HELLO)) for _ in range(30)]
    workers = [
        Worker(repo, runner, fast_settings(), worker_id=f"w{i}") for i, runner in enumerate(runners)
    ]
    async with running(workers[0]), running(workers[1]):
        await wait_until(finished(repo, *ids))
    started = runners[0].started + runners[1].started
    assert sorted(started) == sorted(ids)
    assert all(repo.rows[i].attempts == 1 and status(repo, i) == "done" for i in ids)


async def test_a_malformed_request_is_failed_with_its_reason_and_the_next_is_served() -> None:
    repo = InMemoryJobRepository()
    told: list[tuple[str, str, dict[str, Any]]] = []

    async def on_rejected(job: Job, topic: str, error: dict[str, Any]) -> None:
        told.append((job.id, topic, error))

    bad = repo.add(NewRequest("not a list", session_id="s-bad"))
    good = repo.add(NewRequest(HELLO))
    worker = Worker(
        repo, ScriptedRunner(tokens=3, delay_s=0.001), fast_settings(), on_rejected=on_rejected
    )
    async with running(worker):
        await wait_until(finished(repo, bad, good))
    row = repo.rows[bad]
    assert row.status == "failed"
    assert row.error == {
        "type": "bad_request",
        "field": "messages",
        "message": "messages must be a non-empty array",
        "retryable": False,
    }
    assert status(repo, good) == "done"
    assert told == [(bad, "llm-token:s-bad", row.error)]


async def test_cancel_stops_the_stream_within_a_second_and_tells_the_client() -> None:
    repo = InMemoryJobRepository()
    runner = ScriptedRunner(tokens=100_000, delay_s=0.005)
    job_id = repo.add(NewRequest(HELLO))
    async with running(Worker(repo, runner, fast_settings())):
        await wait_until(lambda: repo.rows[job_id].snapshot.next_offset >= 5)
        asked = time.monotonic()
        repo.request_cancel(job_id)
        await wait_until(finished(repo, job_id))
        took = time.monotonic() - asked
    row = repo.rows[job_id]
    assert took < 1.0
    assert (row.status, row.finish_reason) == ("cancelled", "cancelled")
    assert runner.statuses == [(job_id, "cancelled")]
    # the final snapshot is exactly what was published
    published = [text for j, _, text in runner.published if j == job_id]
    assert row.snapshot.content == "".join(published)
    assert row.snapshot.next_offset == len(published) < 100_000


async def test_a_runner_that_ignores_the_cancel_is_cancelled_by_the_worker() -> None:
    repo = InMemoryJobRepository()
    runner = ScriptedRunner(tokens=100_000, delay_s=0.005, stubborn=True)
    job_id = repo.add(NewRequest(HELLO))
    async with running(Worker(repo, runner, fast_settings())):
        await wait_until(lambda: repo.rows[job_id].snapshot.next_offset >= 5)
        asked = time.monotonic()
        repo.request_cancel(job_id)
        await wait_until(finished(repo, job_id))
        took = time.monotonic() - asked
    row = repo.rows[job_id]
    assert 0.9 < took < 2.0  # CANCEL_STOP_S, then the task is cancelled
    assert row.status == "cancelled"
    assert row.snapshot.content == scripted_text(0, row.snapshot.next_offset)


async def test_a_cancel_missed_by_notify_is_found_by_polling() -> None:
    repo = InMemoryJobRepository()
    job_id = repo.add(NewRequest(HELLO))
    async with running(
        Worker(repo, ScriptedRunner(tokens=100_000, delay_s=0.005), fast_settings())
    ):
        await wait_until(lambda: repo.rows[job_id].snapshot.next_offset >= 2)
        repo.rows[job_id].cancel_requested = True  # no NOTIFY
        await wait_until(finished(repo, job_id), within_s=1.0)
    assert status(repo, job_id) == "cancelled"


async def test_a_taken_over_request_continues_from_its_checkpoint() -> None:
    clock = FakeClock()
    repo = InMemoryJobRepository(clock=clock)
    job_id = repo.add(NewRequest(HELLO))
    # A worker claimed it, checkpointed 7 tokens, and died.
    [dead] = await repo.claim(worker="dead", limit=1, lease_s=1.0, max_attempts=3)
    partial = Snapshot(content=scripted_text(0, 7), next_offset=7, next_seq=7)
    await repo.checkpoint(worker="dead", job_id=dead.id, snapshot=partial)
    runner = ScriptedRunner(tokens=20, delay_s=0.001)
    async with running(Worker(repo, runner, fast_settings())):
        await asyncio.sleep(0.1)
        assert status(repo, job_id) == "running" and repo.rows[job_id].lease_owner == "dead"
        clock.offset += 2.0  # the lease expires
        await wait_until(finished(repo, job_id))
    row = repo.rows[job_id]
    assert (row.status, row.attempts) == ("done", 2)
    assert row.snapshot.content == scripted_text(0, 20)
    assert [offset for _, offset, _ in runner.published] == list(range(7, 20))


async def test_drain_releases_unfinished_streams_within_the_grace_period() -> None:
    repo = InMemoryJobRepository()
    runner = ScriptedRunner(tokens=100_000, delay_s=0.005)
    ids = [repo.add(NewRequest(HELLO)) for _ in range(2)]
    worker = Worker(repo, runner, fast_settings(relay_grace_period_s=0.6))
    task = asyncio.create_task(worker.run())
    await wait_until(lambda: all(repo.rows[i].snapshot.next_offset >= 3 for i in ids))
    stopping = time.monotonic()
    worker.stop()
    await asyncio.wait_for(task, WAIT_S)
    took = time.monotonic() - stopping
    assert 0.3 < took < 0.6 + 0.4
    for job_id in ids:
        row = repo.rows[job_id]
        assert (row.status, row.attempts, row.lease_owner) == ("queued", 0, None)
        published = [text for j, _, text in runner.published if j == job_id]
        assert row.snapshot.content == "".join(published)  # exact: the runner stopped cleanly


async def test_drain_lets_short_streams_finish() -> None:
    repo = InMemoryJobRepository()
    job_id = repo.add(NewRequest(HELLO))
    worker = Worker(repo, ScriptedRunner(tokens=30, delay_s=0.01), fast_settings())
    task = asyncio.create_task(worker.run())
    await wait_until(lambda: status(repo, job_id) == "running")
    worker.stop()
    await asyncio.wait_for(task, WAIT_S)
    assert status(repo, job_id) == "done"
    assert repo.rows[job_id].snapshot.content == scripted_text(0, 30)


async def test_drain_cancels_a_stubborn_runner_and_releases_it() -> None:
    repo = InMemoryJobRepository()
    job_id = repo.add(NewRequest(HELLO))
    runner = ScriptedRunner(tokens=100_000, delay_s=0.005, stubborn=True)
    worker = Worker(repo, runner, fast_settings(relay_grace_period_s=0.6))
    task = asyncio.create_task(worker.run())
    await wait_until(lambda: repo.rows[job_id].snapshot.next_offset >= 3)
    stopping = time.monotonic()
    worker.stop()
    await asyncio.wait_for(task, WAIT_S)
    assert time.monotonic() - stopping < 0.6 + 0.4
    row = repo.rows[job_id]
    assert row.status == "queued" and row.snapshot.next_offset >= 3
    assert row.snapshot.content == scripted_text(0, row.snapshot.next_offset)


async def test_a_dead_side_task_stops_the_worker_loudly() -> None:
    repo = InMemoryJobRepository()
    job_id = repo.add(NewRequest(HELLO))

    async def metrics_server() -> None:
        await asyncio.sleep(0.1)
        raise OSError("address in use")

    worker = Worker(
        repo,
        ScriptedRunner(tokens=100_000, delay_s=0.005),
        fast_settings(relay_grace_period_s=0.4),
        side_tasks=[("metrics", metrics_server)],
    )
    with pytest.raises(OSError, match="address in use"):
        await asyncio.wait_for(worker.run(), WAIT_S)
    assert worker.state is WorkerState.STOPPED and not worker.live
    assert status(repo, job_id) == "queued"  # released, not lost


async def test_a_retryable_failure_is_released_and_continued() -> None:
    repo = InMemoryJobRepository()
    job_id = repo.add(NewRequest(HELLO))
    runner = ScriptedRunner(
        tokens=10,
        delay_s=0.001,
        fail_at=4,
        fail_times=1,
        fail_with=UpstreamError("502 from upstream", type="server_error"),
    )
    async with running(Worker(repo, runner, fast_settings())):
        await wait_until(finished(repo, job_id))
    row = repo.rows[job_id]
    assert (row.status, row.attempts) == ("done", 2)
    assert row.snapshot.content == scripted_text(0, 10)
    assert [offset for _, offset, _ in runner.published] == list(range(10))


async def test_a_retryable_failure_gives_up_after_max_attempts() -> None:
    repo = InMemoryJobRepository()
    job_id = repo.add(NewRequest(HELLO))
    runner = ScriptedRunner(
        tokens=10, delay_s=0.001, fail_at=2, fail_with=UpstreamError("timeout", type="timeout")
    )
    async with running(Worker(repo, runner, fast_settings(relay_max_attempts=2))):
        await wait_until(finished(repo, job_id))
    row = repo.rows[job_id]
    assert (row.status, row.attempts) == ("failed", 2)
    assert row.error is not None and row.error["type"] == "timeout" and row.error["retryable"]


async def test_a_fatal_upstream_error_fails_at_once() -> None:
    repo = InMemoryJobRepository()
    job_id = repo.add(NewRequest(HELLO))
    runner = ScriptedRunner(
        tokens=10,
        delay_s=0.001,
        fail_at=0,
        fail_with=UpstreamError("bad key", type="auth", status=401),
    )
    async with running(Worker(repo, runner, fast_settings())):
        await wait_until(finished(repo, job_id))
    row = repo.rows[job_id]
    assert (row.status, row.attempts) == ("failed", 1)
    assert row.error == {
        "type": "auth",
        "provider": "",
        "status": 401,
        "message": "bad key",
        "retryable": False,
    }


async def test_a_crashing_runner_is_an_internal_error_and_the_worker_goes_on() -> None:
    repo = InMemoryJobRepository()

    async def broken(job: Job, ctx: StreamContext) -> Outcome:
        if job.messages[0]["content"] == "boom":
            raise ValueError("secret prompt text")
        return Outcome("done", Snapshot(content="ok", next_offset=1, next_seq=1), "stop")

    bad = repo.add(NewRequest([{"role": "user", "content": "boom"}]))
    good = repo.add(NewRequest(HELLO))
    async with running(Worker(repo, broken, fast_settings())):
        await wait_until(finished(repo, bad, good))
    assert repo.rows[bad].error == {"type": "internal", "message": "ValueError", "retryable": False}
    assert status(repo, good) == "done"


async def test_a_lost_lease_stops_the_stream_and_its_writes() -> None:
    repo = InMemoryJobRepository()
    job_id = repo.add(NewRequest(HELLO))
    runner = ScriptedRunner(tokens=100_000, delay_s=0.005)
    worker = Worker(repo, runner, fast_settings())
    async with running(worker):
        await wait_until(lambda: repo.rows[job_id].snapshot.next_offset >= 3)
        repo.rows[job_id].lease_owner = "thief"  # reclaimed elsewhere
        stolen = repo.rows[job_id].snapshot
        await wait_until(lambda: not worker.active_ids)
    row = repo.rows[job_id]
    assert (row.status, row.lease_owner, row.snapshot) == ("running", "thief", stolen)
    assert worker.metrics.leases_lost._value.get() == 1


async def test_checkpoints_are_periodic_and_readable_mid_stream() -> None:
    repo = InMemoryJobRepository()
    job_id = repo.add(NewRequest(HELLO))
    async with running(Worker(repo, ScriptedRunner(tokens=60, delay_s=0.005), fast_settings())):
        await wait_until(lambda: 0 < repo.rows[job_id].snapshot.next_offset < 60)
        mid = repo.rows[job_id].snapshot
        await wait_until(finished(repo, job_id))
    assert mid.content == scripted_text(0, mid.next_offset)
    # ~0.3 s of tokens at a 20 ms cadence: several checkpoints, far fewer than tokens
    assert 3 <= repo.checkpoints_of(job_id) < 40


async def test_a_queue_outage_makes_the_worker_unready_until_it_recovers() -> None:
    repo = InMemoryJobRepository()
    repo.fail_next = QueueError("database down")
    worker = Worker(repo, ScriptedRunner(tokens=1, delay_s=0.001), fast_settings())
    async with running(worker):
        await wait_until(lambda: worker.metrics.queue_errors._value.get() == 1)
        await wait_until(lambda: worker.ready)
        job_id = repo.add(NewRequest(HELLO))
        await wait_until(finished(repo, job_id))
    assert not worker.ready


def test_stream_context_refuses_a_snapshot_going_backwards() -> None:
    job = Job("j", "s", None, None, None, HELLO, {}, 1, Snapshot(next_offset=5))
    from worker.upstream.events import GenerationRequest

    ctx = StreamContext(job, GenerationRequest(HELLO), topic="llm-token:s")
    assert (ctx.start_offset, ctx.stream_id, ctx.resumed) == (5, "j", True)
    ctx.record(Snapshot(next_offset=6))
    with pytest.raises(ValueError, match="backwards"):
        ctx.record(Snapshot(next_offset=4))
    ctx.abort("shutdown", within_s=0.5)
    ctx.abort("cancelled")
    assert (ctx.abort_reason, ctx.stop_within_s) == ("shutdown", 0.5)


_: StreamRunner = ScriptedRunner()  # the scripted runner satisfies the runner contract


async def test_a_starved_loop_makes_the_heartbeat_warn_before_leases_expire() -> None:
    repo = InMemoryJobRepository()
    worker = Worker(
        repo, ScriptedRunner(), fast_settings(relay_lease_s=2.05, relay_heartbeat_interval_s=0.05)
    )
    warnings: list[str] = []
    sink = logger.add(lambda m: warnings.append(m.record["message"]), level="WARNING")
    try:
        async with running(worker):
            await wait_until(lambda: worker.ready)
            await asyncio.sleep(0.1)
            assert not any("heartbeat ran" in w for w in warnings)  # on time: silent
            # Starve the event loop past half the lease's slack (1 s), as a CPU-bound
            # process does: a blocking sleep is the point here.
            time.sleep(1.5)  # noqa: ASYNC251
            await wait_until(lambda: any("heartbeat ran" in w for w in warnings))
    finally:
        logger.remove(sink)


async def test_readiness_includes_the_dependencies_the_caller_names() -> None:
    """Issue 13: /readyz reflects the publisher (the runner's `ready()`)."""
    repo = InMemoryJobRepository()
    publisher_up = [False]
    worker = Worker(
        repo,
        ScriptedRunner(tokens=1, delay_s=0.001),
        fast_settings(),
        ready_checks=[lambda: publisher_up[0]],
    )
    async with running(worker):
        await wait_until(lambda: worker.metrics.queue_errors._value.get() == 0 and worker.live)
        await asyncio.sleep(0.2)
        assert not worker.ready
        publisher_up[0] = True
        await wait_until(lambda: worker.ready)


async def test_a_publisher_that_never_started_fails_its_supervised_task() -> None:
    publisher = Publisher(fast_settings(), api_key="service-key")
    assert not publisher.ready()
    with pytest.raises(PublishError, match="supervisor is not running"):
        await publisher.supervised()


class PartitionedRepository(InMemoryJobRepository):
    """The queue as seen across a partition: once `down`, every lease call fails."""

    down = False

    async def heartbeat(self, **kwargs: Any) -> dict[str, bool]:
        if self.down:
            raise QueueError("partitioned")
        return await super().heartbeat(**kwargs)

    async def check(self) -> None:
        if self.down:
            raise QueueError("partitioned")

    async def claim(self, **kwargs: Any) -> list[Job]:
        if self.down:
            raise QueueError("partitioned")
        return await super().claim(**kwargs)

    async def sweep(self, **kwargs: Any) -> list[Swept]:
        if self.down:
            raise QueueError("partitioned")
        return await super().sweep(**kwargs)


async def test_a_stream_whose_lease_cannot_be_renewed_stops_before_the_lease_expires() -> None:
    """Issue 13: self-fencing by time; the worker itself stays up."""
    repo = PartitionedRepository()
    runner = ScriptedRunner(tokens=100_000, delay_s=0.005)
    settings = fast_settings(relay_lease_s=1.0, relay_heartbeat_interval_s=0.1)
    worker = Worker(repo, runner, settings)
    async with running(worker) as task:
        job_id = repo.add(NewRequest(HELLO))
        await wait_until(lambda: len(runner.sends) >= 5)
        repo.down = True
        await wait_until(lambda: worker.metrics.leases_lost._value.get() == 1)
        expires_at = repo.rows[job_id].lease_expires_at
        assert expires_at is not None
        last_send = runner.sends[-1][3]
        assert last_send < expires_at  # stopped while the lease still held
        await asyncio.sleep(settings.relay_lease_s)
        assert not task.done() and worker.live and not worker.ready
        assert runner.sends[-1][3] == last_send  # nothing published since


class FlakyFinishRepository(InMemoryJobRepository):
    """`finish` fails `failures` times (a database away), then works."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.finish_calls = 0

    async def finish(self, **kwargs: Any) -> None:
        self.finish_calls += 1
        if self.finish_calls <= self.failures:
            raise QueueError("queue database unavailable: connection refused")
        await super().finish(**kwargs)


async def test_the_end_of_a_fully_relayed_stream_is_written_however_long_it_takes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 13: the final write is never abandoned (it used to give up after 5 tries,
    leaving the row running for another worker to generate the whole answer again)."""
    monkeypatch.setattr("worker.jobs.chunklog.FINAL_RETRY_BASE_S", 0.001)
    monkeypatch.setattr("worker.jobs.chunklog.FINAL_RETRY_CAP_S", 0.005)
    repo = FlakyFinishRepository(failures=12)
    job_id = repo.add(NewRequest(HELLO))
    async with running(Worker(repo, ScriptedRunner(tokens=5, delay_s=0.001), fast_settings())):
        await wait_until(finished(repo, job_id))
    assert repo.rows[job_id].status == "done" and repo.finish_calls == 13
    assert repo.rows[job_id].snapshot.content == scripted_text(0, 5)


async def test_the_runner_hands_the_publishers_supervisor_to_the_worker() -> None:
    publisher = Publisher(fast_settings(), api_key="service-key")
    runner = RelayRunner(fast_settings(), publisher=publisher)
    tasks = dict(runner.side_tasks())
    assert list(tasks) == ["publisher"]
    # A publisher that does not deliver fails its side task, so the worker stops loudly.
    with pytest.raises(PublishError, match="supervisor is not running"):
        await asyncio.wait_for(tasks["publisher"](), 5)


class SlowPoolRepository(InMemoryJobRepository):
    """The heir's log read waits out the pool a few times (1,000 streams starting at once
    on a pool of 4), then answers."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def read_chunks_of(self, starts: Mapping[str, int]) -> dict[str, list[Any]]:
        if self.failures > 0:
            self.failures -= 1
            raise QueueError("queue database unavailable: couldn't get a connection after 5 s")
        return await super().read_chunks_of(starts)


async def test_a_pool_wait_at_the_start_of_a_stream_is_tried_again_not_a_failure() -> None:
    repo = SlowPoolRepository(failures=2)
    job_id = repo.add(NewRequest(HELLO))
    worker = Worker(repo, ScriptedRunner(tokens=5, delay_s=0.001), fast_settings(relay_wal=True))
    async with running(worker):
        await wait_until(finished(repo, job_id))
    row = repo.rows[job_id]
    assert (row.status, row.attempts) == ("done", 1)  # was: failed, error type "queue"
    assert row.snapshot.content == scripted_text(0, 5)


async def test_a_log_read_that_keeps_failing_puts_the_request_back_in_the_queue() -> None:
    repo = SlowPoolRepository(failures=10**6)
    job_id = repo.add(NewRequest(HELLO))
    worker = Worker(
        repo, ScriptedRunner(tokens=5), fast_settings(relay_wal=True, relay_lease_s=0.4)
    )
    async with running(worker):
        # Back in the queue and claimed again (was: failed for good at attempt 1).
        await wait_until(lambda: repo.rows[job_id].attempts >= 2, within_s=5)
