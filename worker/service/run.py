"""`llm-relay run`: the worker process.

Claims requests from Postgres (DATABASE_URL) and streams each through a stream
runner; serves /healthz, /readyz and /metrics on RELAY_HTTP_HOST:RELAY_HTTP_PORT;
drains on SIGTERM / SIGINT within RELAY_GRACE_PERIOD_S. A database that is away
at start-up is waited for (with the one backoff, logged once), never a reason to
exit. Exit status: 0 after a clean drain, 1 when a supervised side task died, 2
for bad settings.

The runner is a plugin: `--runner module:factory`, where `factory(settings,
**options)` returns the stream runner (`-o key=value` become the options). A
runner may also be an async context manager (entered for the process lifetime),
expose `side_tasks()` (supervised with the worker's own), `ready()` (part of
/readyz) and `on_rejected`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import signal
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from typing import Any

from loguru import logger

from worker.backoff import backoff_delay
from worker.cli import Command
from worker.config import Settings
from worker.errors import ConfigError, QueueError
from worker.jobs.postgres import PostgresJobRepository
from worker.service.context import StreamRunner
from worker.service.http import HealthServer
from worker.service.metrics import Metrics
from worker.service.worker import SideTask, Worker

DEFAULT_RUNNER = "worker.service.runner:build_runner"
RETRY_BASE_S = 0.5
RETRY_CAP_S = 15.0


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concurrency", type=int, help="override RELAY_CONCURRENCY")
    parser.add_argument("--worker-id", help="override RELAY_WORKER_ID (the lease owner name)")
    parser.add_argument("--http-port", type=int, help="override RELAY_HTTP_PORT (0: off)")
    parser.add_argument(
        "--runner",
        default=DEFAULT_RUNNER,
        help="stream runner factory, module:attr (default: the real relay)",
    )
    parser.add_argument(
        "-o",
        "--runner-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="option passed to the runner factory (repeatable)",
    )


def parse_options(pairs: list[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"runner option {pair!r} is not KEY=VALUE")
        options[key] = value
    return options


def load_runner(spec: str, settings: Settings, options: dict[str, str]) -> Any:
    """Import `module:attr` and call it with the settings and options."""
    module_name, sep, attr = spec.partition(":")
    if not sep:
        raise ConfigError(f"--runner {spec!r} is not module:attr")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load the stream runner {spec!r}: {exc}") from exc
    try:
        return factory(settings, **options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"stream runner {spec!r} rejected its options: {exc}") from exc


def _effective_settings(args: argparse.Namespace, settings: Settings) -> Settings:
    update: dict[str, Any] = {}
    if args.concurrency is not None:
        update["relay_concurrency"] = args.concurrency
    if args.worker_id:
        update["relay_worker_id"] = args.worker_id
    if args.http_port is not None:
        update["relay_http_port"] = args.http_port
    return settings.model_copy(update=update) if update else settings


def check_lease_settings(settings: Settings) -> None:
    """Leases must survive one missed heartbeat plus one call deadline, or the fence
    (which stops a stream one interval before its lease can expire) would fire
    during normal operation."""
    interval, lease = settings.relay_heartbeat_interval_s, settings.relay_lease_s
    if 2 * interval + settings.db_call_timeout_s >= lease:
        raise ConfigError(
            f"RELAY_LEASE_S ({lease:g}) must exceed two RELAY_HEARTBEAT_INTERVAL_S "
            f"({interval:g}) plus the database call deadline ({settings.db_call_timeout_s:g})"
        )


async def wait_for_database(repository: PostgresJobRepository) -> bool:
    """Wait until the queue database answers (True), or a signal asks to stop (False)."""
    log = logger.bind(event="worker_process")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled = (signal.SIGTERM, signal.SIGINT)
    for sig in handled:
        loop.add_signal_handler(sig, stop.set)
    failures = 0
    try:
        while True:
            try:
                await repository.check()
            except QueueError as exc:
                failures += 1
                if failures == 1:
                    log.warning("waiting for the queue database: {}", exc.message)
                delay = backoff_delay(failures, base_s=RETRY_BASE_S, cap_s=RETRY_CAP_S)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    return False
                continue
            if failures:
                log.info("queue database reachable after {} attempt(s)", failures + 1)
            return True
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)


@contextmanager
def _signals_stop(worker: Worker) -> Iterator[None]:
    """SIGTERM / SIGINT drain the worker while `run()` runs; handlers restored after."""
    loop = asyncio.get_running_loop()
    handled = (signal.SIGTERM, signal.SIGINT)
    for sig in handled:
        loop.add_signal_handler(sig, worker.stop)
    try:
        yield
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)


async def run_worker(settings: Settings, runner_spec: str, options: dict[str, str]) -> int:
    if not settings.database_url:
        raise ConfigError("DATABASE_URL is not set: the worker needs the request queue")
    check_lease_settings(settings)
    repository = PostgresJobRepository.from_url(
        settings.database_url,
        pool_size=settings.relay_db_pool_size,
        call_timeout_s=settings.db_call_timeout_s,
    )
    async with AsyncExitStack() as stack:
        stack.push_async_callback(repository.close)
        if not await wait_for_database(repository):
            return 0  # asked to stop while waiting
        runner = load_runner(runner_spec, settings, options)
        if hasattr(runner, "__aenter__"):
            runner = await stack.enter_async_context(runner)
        return await _serve(settings, repository, runner)
    return 1  # pragma: no cover - unreachable; mypy cannot tell


async def _serve(settings: Settings, repository: PostgresJobRepository, runner: Any) -> int:
    metrics = Metrics()
    side_tasks: list[SideTask] = list(getattr(runner, "side_tasks", list)())
    worker: Worker | None = None
    server: HealthServer | None = None
    if settings.relay_http_port:
        server = HealthServer(
            metrics=metrics,
            live=lambda: worker is not None and worker.live,
            ready=lambda: worker is not None and worker.ready,
            host=settings.relay_http_host,
            port=settings.relay_http_port,
            with_default_registry=True,
        )
        await server.start()
        side_tasks.append(("http", server.serve))
    stream_runner: StreamRunner = runner
    runner_ready = getattr(runner, "ready", None)
    worker = Worker(
        repository,
        stream_runner,
        settings,
        metrics=metrics,
        side_tasks=side_tasks,
        on_rejected=getattr(runner, "on_rejected", None),
        ready_checks=[runner_ready] if callable(runner_ready) else [],
    )
    log = logger.bind(event="worker_process", worker=worker.worker_id)
    log.info(
        "worker started: concurrency {}, lease {:g}s, grace {:g}s",
        settings.relay_concurrency,
        settings.relay_lease_s,
        settings.relay_grace_period_s,
    )
    try:
        with _signals_stop(worker):
            await worker.run()
    except Exception as exc:
        log.opt(exception=exc).error("worker stopped after a failure")
        return 1
    finally:
        if server is not None:
            await server.close()
    log.info("worker stopped cleanly")
    return 0


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    effective = _effective_settings(args, settings)
    return await run_worker(effective, args.runner, parse_options(args.runner_option))


COMMAND = Command(
    "run",
    "Run the worker: claim requests from Postgres and relay their token streams",
    _add_arguments,
    _run,
)
