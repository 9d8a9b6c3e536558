"""The worker: claims requests, streams them through a runner, keeps them durable.

    Worker -> JobRepository -> driver        (it never sees SQL)

- A claim loop fills free slots (RELAY_CONCURRENCY), woken by NOTIFY and by
  finished streams, with polling as the guarantee (RELAY_POLL_INTERVAL_S).
- Side tasks, each named and monitored: lease heartbeat, lease fence, checkpointer
  (snapshots about once a second, plus the cancel poll), LISTEN, and whatever the
  caller adds (the metrics server, the publisher's supervisor). If one dies, the
  worker stops loudly: it drains and `run()` re-raises that task's exception.
- A database that is away is not a death: calls fail with `QueueError` within their
  deadline, the worker says so once, turns not ready, and keeps trying. Streams
  whose leases it can no longer renew are stopped as lease-lost before the leases
  can expire (self-fencing by time: a lease renewed by a heartbeat sent at t runs
  until at least t + lease, so a stream stops publishing at t + lease - one
  heartbeat interval unless a newer heartbeat succeeded), so no other worker that
  reclaims the row ever publishes beside this one.
- `stop()` only sets an event. Shutdown runs in order: stop claiming; let streams
  finish until shortly before the grace period ends; ask the rest to stop and
  release them with their snapshots (another worker continues them); cancel
  whatever still runs and release it under `asyncio.shield`; stop the side tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from worker.backoff import backoff_delay
from worker.config import Settings
from worker.errors import BadInputError, LeaseLost, QueueError
from worker.jobs.chunklog import ChunkLog, write_final
from worker.jobs.models import Job, Notification, Result, Snapshot, Swept
from worker.jobs.repository import JobRepository
from worker.service.context import (
    AbortReason,
    Outcome,
    RejectHook,
    ReportsLag,
    StreamContext,
    StreamRunner,
    error_info,
)
from worker.service.metrics import Metrics
from worker.service.validation import validate_job

SideTask = tuple[str, Callable[[], Coroutine[Any, Any, None]]]

# Part of the grace period kept for stopping and releasing unfinished streams.
STOP_MARGIN_S = 2.0
CLAIM_LOOP_STOP_TIMEOUT_S = 5.0
RECOVER_RETRY_BASE_S = 0.2  # first wait before the heir's log read is tried again
# A burst is admitted a step at a time, each step given time to show in the relay's lag
# (the claim gate's signal): 1,000 requests queued at once were all claimed within 2 s,
# before the lag of any of them could stop a claim (bench/RESULTS.md §7d).
CLAIM_STEP = 100
CLAIM_SETTLE_S = 0.25


class WorkerState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass
class _Active:
    job: Job
    ctx: StreamContext | None  # None: rejected by validation, being failed
    # Loop time at which the last successful lease write for this row was *sent*:
    # the database's lease runs until at least this + RELAY_LEASE_S.
    renewed_at: float
    task: asyncio.Task[None] | None = None
    saved: Snapshot | None = None  # the last snapshot written to Postgres
    settling: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one checkpoint at a time


async def _complete(coro: Coroutine[Any, Any, None]) -> None:
    """Run a final write to its end even if the caller is cancelled meanwhile."""
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    """One worker process's queue consumer. Create, `await run()`, `stop()` to drain."""

    def __init__(
        self,
        repository: JobRepository,
        runner: StreamRunner,
        settings: Settings,
        *,
        worker_id: str | None = None,
        metrics: Metrics | None = None,
        side_tasks: Sequence[SideTask] = (),
        on_rejected: RejectHook | None = None,
        ready_checks: Sequence[Callable[[], bool]] = (),
    ) -> None:
        self._repo = repository
        self._runner = runner
        self._settings = settings
        self.worker_id = worker_id or settings.relay_worker_id or default_worker_id()
        self.metrics = metrics or Metrics()
        self._extra_side_tasks = list(side_tasks)
        self._on_rejected = on_rejected
        self._ready_checks = list(ready_checks)
        self._active: dict[str, _Active] = {}
        self._background: set[asyncio.Task[None]] = set()  # best-effort notices
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()
        self._state = WorkerState.CREATED
        self._queue_ok = False
        self._queue_ok_at = float("-inf")  # monotonic time of the last successful call
        self._queue_reported: bool | None = None  # the state last logged
        self._crashed: BaseException | None = None
        self._last_sweep = float("-inf")
        self._log = logger.bind(event="worker", worker=self.worker_id)
        # The one writer of durable stream state: the token log (every stream's
        # batches, group-committed) and, through `_write_final`, the end rows.
        self.chunk_log: ChunkLog | None = None
        if settings.relay_wal:
            self.chunk_log = ChunkLog(
                repository, self.worker_id, retention_s=settings.relay_chunk_retention_s
            )

    # --- public surface ---

    @property
    def state(self) -> WorkerState:
        return self._state

    def _set_state(self, state: WorkerState) -> None:
        if state is not self._state:
            self._log.info("worker {} -> {}", self._state.value, state.value)
            self._state = state
            self._update_ready()

    @property
    def live(self) -> bool:
        return self._crashed is None

    @property
    def ready(self) -> bool:
        """Running, the database answered its last call recently, and every dependency
        the caller named (the publisher) says it is ready."""
        if self._state is not WorkerState.RUNNING or not self._queue_ok:
            return False
        stale_after = self._settings.relay_heartbeat_interval_s + self._settings.db_call_timeout_s
        if time.monotonic() - self._queue_ok_at > stale_after:
            return False  # a call is hanging on a dead path: do not wait for its deadline
        return all(check() for check in self._ready_checks)

    @property
    def active_ids(self) -> list[str]:
        return list(self._active)

    def stop(self) -> None:
        """Begin a graceful drain (safe from a signal handler)."""
        if not self._stopping.is_set():
            self._log.info("stop requested: draining")
            self._stopping.set()
            self._wakeup.set()

    async def run(self) -> None:
        """Work until `stop()`; then drain. Re-raises the error of a side task that died."""
        self._set_state(WorkerState.RUNNING)
        side = self._start_side_tasks()
        claim_loop = asyncio.create_task(self._claim_loop(), name="claim-loop")
        try:
            await self._monitor(claim_loop, side)
        finally:
            self._set_state(WorkerState.DRAINING)
            self._stopping.set()
            await self._stop_claim_loop(claim_loop)
            await self._drain()
            await self._cancel([*side, *self._background])
            self._set_state(WorkerState.STOPPED)
        if self._crashed is not None:
            raise self._crashed

    # --- supervision ---

    def _start_side_tasks(self) -> dict[asyncio.Task[None], str]:
        tasks: list[SideTask] = [
            ("lease-heartbeat", self._heartbeat_loop),
            ("lease-fence", self._fence_loop),
            ("checkpointer", self._checkpoint_loop),
            ("listen", self._listen),
            *([("token-log", self.chunk_log.run)] if self.chunk_log is not None else []),
            *self._extra_side_tasks,
        ]
        return {asyncio.create_task(factory(), name=name): name for name, factory in tasks}

    async def _monitor(
        self, claim_loop: asyncio.Task[None], side: dict[asyncio.Task[None], str]
    ) -> None:
        stop_wait = asyncio.create_task(self._stopping.wait(), name="stop-wait")
        names: dict[asyncio.Task[Any], str] = {**side, claim_loop: "claim-loop"}
        try:
            done, _ = await asyncio.wait([stop_wait, *names], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
        for task in done:
            if task is stop_wait:
                continue
            error = None if task.cancelled() else task.exception()
            if task is claim_loop and error is None and self._stopping.is_set():
                continue  # it returns when asked to stop
            self._crashed = error or RuntimeError(f"side task {names[task]} exited")
            self._log.opt(exception=error).error("{} died: stopping the worker", names[task])
            self.stop()

    @staticmethod
    async def _cancel(tasks: Sequence[asyncio.Task[Any]]) -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- claiming ---

    async def _claim_loop(self) -> None:
        while not self._stopping.is_set():
            self._wakeup.clear()  # before claiming: a NOTIFY during the claim re-wakes us
            if await self._claim_once() >= CLAIM_STEP:
                # More may be queued: the next step once this one shows in the lag.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), CLAIM_SETTLE_S)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._wakeup.wait(), timeout=self._settings.relay_poll_interval_s
                )

    async def _stop_claim_loop(self, claim_loop: asyncio.Task[None]) -> None:
        # Let a claim in flight return its rows (cancelling it could lease rows to
        # nobody until their lease expires); cancel only a claim that hangs.
        done, _ = await asyncio.wait({claim_loop}, timeout=CLAIM_LOOP_STOP_TIMEOUT_S)
        if not done:
            await self._cancel([claim_loop])

    async def _claim_once(self) -> int:
        """Claim what fits (at most CLAIM_STEP) unless the relay is behind; the count."""
        s = self._settings
        loop = asyncio.get_running_loop()
        free = min(s.relay_concurrency - len(self._active), CLAIM_STEP)
        try:
            if loop.time() - self._last_sweep >= s.relay_poll_interval_s:
                self._last_sweep = loop.time()
                for swept in await self._repo.sweep(max_attempts=s.relay_max_attempts):
                    self._on_swept(swept)
            jobs = []
            sent_at = loop.time()
            if free > 0 and self._runner_behind():
                free = 0  # the queue, not this worker, absorbs the excess (issue 16)
            if free > 0:
                jobs = await self._repo.claim(
                    worker=self.worker_id,
                    limit=free,
                    lease_s=s.relay_lease_s,
                    max_attempts=s.relay_max_attempts,
                )
            self._queue_call(ok=True)
        except QueueError as exc:
            self._queue_call(ok=False, error=exc)
            return 0
        for job in jobs:
            try:
                self._start(job, sent_at)
            except Exception:  # pragma: no cover - _start fails rows itself; never the loop
                self._log.bind(job=job.id).opt(exception=True).error("could not start a request")
        return len(jobs)

    def _runner_behind(self) -> bool:
        return isinstance(self._runner, ReportsLag) and self._runner.behind

    def _queue_call(self, *, ok: bool, error: QueueError | None = None) -> None:
        """Every queue call reports here: readiness, and one log line per change."""
        if ok:
            self._queue_ok_at = time.monotonic()
        else:
            self.metrics.queue_errors.inc()
        if ok != self._queue_reported:
            self._queue_reported = ok
            if ok:
                self._log.info("queue database reachable")
            else:
                why = error.message if error is not None else "unknown"
                self._log.warning("queue database unreachable ({}): not ready; retrying", why)
        elif error is not None:
            self._log.debug("queue call failed: {}", error.message)
        self._queue_ok = ok
        self._update_ready()

    def _on_swept(self, swept: Swept) -> None:
        """A row the sweep settled: its subscribers learn why it will never stream."""
        self._log.bind(job=swept.id).info("settled unclaimable request: {}", swept.status)
        if swept.status != "failed" or self._on_rejected is None:
            return
        error = {
            "type": "attempts_exhausted",
            "message": f"gave up after {swept.attempts} attempts",
            "retryable": False,
        }
        job = Job(
            id=swept.id,
            session_id=swept.session_id,
            owner=None,
            provider=None,
            model=None,
            messages=None,
            params=None,
            attempts=swept.attempts,
            snapshot=Snapshot(),
        )
        self._spawn_notice(self._tell(job, error), f"swept-{swept.id}")

    def _spawn_notice(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _tell(self, job: Job, error: dict[str, Any]) -> None:
        if self._on_rejected is None:
            return
        try:
            await self._on_rejected(job, self._settings.topic_for(job.session_id), error)
        except Exception:  # telling the client is best effort; the row says it all
            self._log.bind(event="job", job=job.id).opt(exception=True).warning(
                "could not tell the client why the request failed"
            )

    def _update_ready(self) -> None:
        self.metrics.ready.set(1 if self.ready else 0)

    def _start(self, job: Job, claimed_at: float) -> None:
        self.metrics.claimed.inc()
        try:
            request = validate_job(job, self._settings)
        except BadInputError as exc:
            active = _Active(job, None, claimed_at)
            active.task = asyncio.create_task(self._reject(job, exc), name=f"reject-{job.id}")
        else:
            ctx = StreamContext(job, request, topic=self._settings.topic_for(job.session_id))
            ctx.chunk_log = self.chunk_log
            active = _Active(job, ctx, claimed_at, saved=job.snapshot)
            ctx.set_writer(lambda: self._checkpoint_now(active))
            active.task = asyncio.create_task(self._process(active), name=f"stream-{job.id}")
        self._active[job.id] = active
        self.metrics.in_flight.set(len(self._active))
        active.task.add_done_callback(lambda _: self._forget(job.id))

    def _forget(self, job_id: str) -> None:
        self._active.pop(job_id, None)
        self.metrics.in_flight.set(len(self._active))
        self._wakeup.set()  # a slot is free

    # --- one request ---

    async def _reject(self, job: Job, exc: BadInputError) -> None:
        log = self._log.bind(event="job", job=job.id, field=exc.field)
        log.warning("rejected: {}", exc.message)
        self.metrics.rejected.inc()
        error = error_info(exc)
        result = Result("failed", job.snapshot, error=error)
        await _complete(self._write_final(job, "failed", lambda: self._finish(job, result)))
        await self._tell(job, error)

    async def _process(self, active: _Active) -> None:
        job, ctx = active.job, active.ctx
        assert ctx is not None
        log = self._log.bind(event="job", job=job.id, session=job.session_id)
        if self.chunk_log is not None:
            try:
                # The heir starts at exactly the last durable offset (row + log tail).
                ctx.start = await self._recover(job)
                ctx.record(ctx.start)
            except QueueError as exc:
                # Nothing was streamed: the request goes back to the queue (a busy or
                # absent database is not the request's failure; at 1,000 streams a
                # pool wait once failed 244 of them for good).
                active.settling = True
                outcome = Outcome("failed", job.snapshot, error=error_info(exc), retry=True)
                await _complete(self._settle(job, ctx, outcome))
                return
        log.info(
            "stream start (attempt {}, from offset {}{})",
            job.attempts,
            ctx.start_offset,
            ", resumed" if ctx.resumed else "",
        )
        runner_task = asyncio.create_task(self._run_runner(job, ctx), name=f"runner-{job.id}")
        try:
            outcome = await self._await_runner(runner_task, ctx)
        except asyncio.CancelledError:
            # Forced stop at the end of the grace period: release what we have.
            await self._cancel([runner_task])
            active.settling = True
            await _complete(self._settle(job, ctx, Outcome("interrupted", ctx.latest)))
            raise
        except Exception as exc:
            error = error_info(exc)
            if error["type"] == "internal":
                log.opt(exception=exc).error("stream runner crashed")
            outcome = Outcome("failed", ctx.latest, error=error)
        active.settling = True
        await _complete(self._settle(job, ctx, outcome))

    async def _recover(self, job: Job) -> Snapshot:
        """`ChunkLog.recover`, tried again with the one backoff while the lease is far
        from its fencing point (a pool wait under load is transient)."""
        assert self.chunk_log is not None
        s = self._settings
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + s.relay_lease_s / 2
        attempt = 0
        while True:
            try:
                return await self.chunk_log.recover(job)
            except QueueError:
                self.metrics.queue_errors.inc()
                attempt += 1
                delay = backoff_delay(attempt, base_s=RECOVER_RETRY_BASE_S, cap_s=s.relay_lease_s)
                if loop.time() + delay >= give_up_at:
                    raise
                await asyncio.sleep(delay)

    async def _run_runner(self, job: Job, ctx: StreamContext) -> Outcome:
        return await self._runner(job, ctx)

    async def _await_runner(self, task: asyncio.Task[Outcome], ctx: StreamContext) -> Outcome:
        """The runner's outcome; after an abort, give it `ctx.stop_within_s` to stop."""
        abort_wait = asyncio.create_task(ctx.aborted.wait())
        try:
            await asyncio.wait({task, abort_wait}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                done, _ = await asyncio.wait({task}, timeout=ctx.stop_within_s)
                if not done:
                    await self._cancel([task])
        finally:
            abort_wait.cancel()
            if not task.done():  # we are being cancelled ourselves
                task.cancel()
        if task.cancelled():
            if ctx.abort_reason == "cancelled":
                return Outcome("cancelled", ctx.latest, finish_reason="cancelled")
            return Outcome("interrupted", ctx.latest)
        return task.result()

    async def _settle(self, job: Job, ctx: StreamContext, outcome: Outcome) -> None:
        """Write the end of one stream: finish, release, or leave it to its new owner."""
        s = self._settings
        snap = outcome.snapshot
        if ctx.abort_reason == "lease_lost":
            self.metrics.leases_lost.inc()
            self._log.bind(job=job.id).warning("lease lost: another worker continues")
            return
        if outcome.kind == "interrupted":
            refund = ctx.abort_reason == "shutdown"
            await self._write_final(job, "released", lambda: self._release(job, snap, refund))
        elif outcome.kind == "failed" and outcome.retryable and job.attempts < s.relay_max_attempts:
            await self._write_final(
                job, "retry", lambda: self._release(job, snap, False, outcome.error)
            )
        else:
            status = "failed" if outcome.kind == "failed" else outcome.kind
            finish_reason = outcome.finish_reason
            if status == "cancelled":
                finish_reason = finish_reason or "cancelled"
            result = Result(status, snap, finish_reason, outcome.usage, outcome.error)
            await self._write_final(job, status, lambda: self._finish(job, result))
        self.metrics.tokens.inc(max(snap.next_offset - job.snapshot.next_offset, 0))

    async def _finish(self, job: Job, result: Result) -> None:
        await self._repo.finish(worker=self.worker_id, job_id=job.id, result=result)

    async def _release(
        self, job: Job, snap: Snapshot, refund: bool, error: dict[str, object] | None = None
    ) -> None:
        await self._repo.release(
            worker=self.worker_id, job_id=job.id, snapshot=snap, refund_attempt=refund, error=error
        )

    async def _write_final(
        self, job: Job, label: str, write: Callable[[], Awaitable[None]]
    ) -> None:
        log = self._log.bind(event="job", job=job.id)

        def on_failure(exc: QueueError, attempt: int) -> None:
            self.metrics.queue_errors.inc()
            if attempt == 1:
                log.warning("final write ({}) failed, retrying: {}", label, exc.message)

        # A stream relayed to its end is kept until its end is written (callers shield
        # this): abandoning it would let another worker generate the answer again.
        keep_trying = label in ("done", "cancelled")
        try:
            landed = await write_final(write, keep_trying=keep_trying, on_failure=on_failure)
        except LeaseLost:
            self.metrics.leases_lost.inc()
            log.warning("lease lost before the final write ({}); its new owner decides", label)
            return
        except QueueError as exc:
            log.error("final write ({}) failed: {}; the lease will expire", label, exc)
            return
        if not landed:
            log.error("final write ({}) gave up; the lease will expire", label)
            return
        self.metrics.finished.labels(outcome=label).inc()
        log.info("stream {}", label)

    # --- side tasks ---

    def _abort(self, job_id: str, reason: AbortReason) -> None:
        active = self._active.get(job_id)
        if active is not None and active.ctx is not None and not active.settling:
            if not active.ctx.aborted.is_set():
                self._log.bind(job=job_id).info("aborting stream: {}", reason)
            active.ctx.abort(reason)

    def _on_notification(self, notification: Notification) -> None:
        if notification.op == "queued":
            self._wakeup.set()
        elif notification.op == "cancel" and notification.id in self._active:
            # Anyone with SQL access can NOTIFY: only the row says whether its owner
            # really cancelled (cancel_llm_request sets the flag before notifying).
            self._spawn_notice(self._verify_cancel(notification.id), f"cancel-{notification.id}")

    async def _verify_cancel(self, job_id: str) -> None:
        try:
            cancelled = await self._repo.cancel_requested([job_id])
        except QueueError as exc:  # the checkpointer's cancel poll tries again
            self._queue_call(ok=False, error=exc)
            return
        self._queue_call(ok=True)
        if job_id in cancelled:
            self._abort(job_id, "cancelled")
        else:
            self._log.bind(job=job_id).warning("ignored a cancel NOTIFY the row does not confirm")

    async def _listen(self) -> None:
        await self._repo.listen(self._on_notification)

    async def _heartbeat_loop(self) -> None:
        s = self._settings
        loop = asyncio.get_running_loop()
        # Half the slack a lease leaves after one interval: later than that, a starved
        # event loop is about to let leases expire (seen in bench/RESULTS.md, scale-out).
        late_warning_s = (s.relay_lease_s - s.relay_heartbeat_interval_s) / 2
        pause = s.relay_heartbeat_interval_s
        while True:
            slept_from = loop.time()
            await asyncio.sleep(pause)
            late = loop.time() - slept_from - pause
            if late > late_warning_s:
                self._log.warning(
                    "lease heartbeat ran {:.1f} s late: the event loop is starved and leases "
                    "({:g} s) may expire; lower RELAY_CONCURRENCY or add workers",
                    late,
                    s.relay_lease_s,
                )
            renewed = await self._heartbeat_once()
            # After a failure, try again sooner: a short blip must not cost the leases
            # their fence (one interval before expiry).
            pause = s.relay_heartbeat_interval_s if renewed else s.relay_heartbeat_interval_s / 4

    async def _heartbeat_once(self) -> bool:
        """Renew every lease held; with none, one round trip still tells readiness."""
        s = self._settings
        loop = asyncio.get_running_loop()
        ids = [i for i, a in self._active.items() if a.ctx is not None and not a.settling]
        sent_at = loop.time()
        try:
            if ids:
                held = await self._repo.heartbeat(
                    worker=self.worker_id, ids=ids, lease_s=s.relay_lease_s
                )
            else:
                held = {}
                await self._repo.check()
        except QueueError as exc:
            self._queue_call(ok=False, error=exc)
            return False  # the fence stops streams before their leases can expire
        self._queue_call(ok=True)
        for job_id in ids:
            active = self._active.get(job_id)
            if job_id not in held:
                self._abort(job_id, "lease_lost")
            elif held[job_id]:
                self._abort(job_id, "cancelled")
            elif active is not None:
                active.renewed_at = max(active.renewed_at, sent_at)
        return True

    def _fence_deadline(self, active: _Active) -> float:
        """Loop time by which a stream must have stopped publishing unless renewed."""
        s = self._settings
        return active.renewed_at + s.relay_lease_s - s.relay_heartbeat_interval_s

    async def _fence_loop(self) -> None:
        """Self-fencing by time: a stream whose lease was not renewed in time stops
        before the lease can expire in the database (and another worker reclaims it)."""
        s = self._settings
        loop = asyncio.get_running_loop()
        tick = min(s.relay_heartbeat_interval_s / 4, 0.5)
        while True:
            now = loop.time()
            for job_id, active in list(self._active.items()):
                if active.ctx is None or active.settling or active.ctx.aborted.is_set():
                    continue
                if now >= self._fence_deadline(active):
                    self._log.bind(job=job_id).warning(
                        "lease not renewed for {:.1f}s: stopping the stream before the lease "
                        "can expire",
                        now - active.renewed_at,
                    )
                    self._abort(job_id, "lease_lost")
            self._update_ready()  # readiness also goes stale with time
            await asyncio.sleep(tick)

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self._settings.relay_checkpoint_interval_s)
            try:
                await self._checkpoint_all()
            except QueueError as exc:
                self._queue_call(ok=False, error=exc)

    async def _checkpoint_all(self) -> None:
        """Write changed snapshots; poll the cancel flag of the others (NOTIFY backup)."""
        unchanged: list[str] = []
        for job_id, active in list(self._active.items()):
            if active.ctx is None or active.settling:
                continue
            if active.ctx.logged or active.ctx.latest == active.saved:
                # Logged streams: the token log is the checkpoint; only poll the cancel.
                unchanged.append(job_id)
                continue
            try:
                await self._write_checkpoint(active)
            except LeaseLost:
                self._abort(job_id, "lease_lost")
        for job_id in await self._repo.cancel_requested(unchanged):
            self._abort(job_id, "cancelled")

    async def _write_checkpoint(self, active: _Active) -> None:
        assert active.ctx is not None
        async with active.lock:
            snapshot = active.ctx.latest
            if snapshot == active.saved or active.settling:
                return
            cancel = await self._repo.checkpoint(
                worker=self.worker_id, job_id=active.job.id, snapshot=snapshot
            )
            active.saved = snapshot
        self.metrics.checkpoints.inc()
        if cancel:
            self._abort(active.job.id, "cancelled")

    async def _checkpoint_now(self, active: _Active) -> None:
        """`ctx.checkpoint()`: write at once; a lost lease stops the runner."""
        try:
            await self._write_checkpoint(active)
        except LeaseLost:
            self._abort(active.job.id, "lease_lost")
            raise
        except QueueError as exc:  # the periodic checkpointer tries again
            self._queue_call(ok=False, error=exc)

    # --- shutdown ---

    async def _drain(self) -> None:
        grace = self._settings.relay_grace_period_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        margin = min(STOP_MARGIN_S, grace / 2)
        tasks = [a.task for a in self._active.values() if a.task is not None]
        if not tasks:
            return
        self._log.info("draining {} stream(s) within {:.1f}s", len(tasks), grace)
        await asyncio.wait(tasks, timeout=max(deadline - margin - loop.time(), 0))
        for job_id in list(self._active):
            active = self._active.get(job_id)
            if active is not None and active.ctx is not None and not active.settling:
                active.ctx.abort("shutdown", within_s=margin * 0.75)
        pending = [t for t in tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=max(deadline - loop.time(), 0))
        pending = [t for t in tasks if not t.done()]
        if pending:
            self._log.warning("grace period over: releasing {} stream(s)", len(pending))
            await self._cancel(pending)
