"""`llm-relay devstack`: run the local stack and print the `.env` lines to use."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path

from loguru import logger

from devstack.realtime import RealtimeLimits
from devstack.stack import DEFAULT_API_PORT, DEFAULT_UPSTREAM_PORT, DevStack, StackOptions
from worker.cli import Command
from worker.config import Settings


def add_stack_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=DEFAULT_API_PORT, help="API gateway port")
    parser.add_argument(
        "--upstream-port", type=int, default=DEFAULT_UPSTREAM_PORT, help="simulated upstream"
    )
    parser.add_argument("--data-dir", type=Path, default=Path(".devstack"))
    parser.add_argument("--jwt-secret", default=None, help="HS256 secret of the keys")
    parser.add_argument(
        "--tokens-per-second", type=float, default=60.0, help="simulated upstream token rate"
    )
    parser.add_argument("--text", default=None, help="text the simulated upstream streams")
    parser.add_argument(
        "--reasoning-text", default="", help="reasoning the simulated upstream streams first"
    )
    parser.add_argument(
        "--max-events-per-second",
        type=int,
        default=None,
        help="Realtime messages/s quota (Free plan: 100)",
    )
    parser.add_argument("--no-postgres", action="store_true", help="skip embedded Postgres")


def stack_options(args: argparse.Namespace) -> StackOptions:
    opts = StackOptions(
        api_port=args.port,
        upstream_port=args.upstream_port,
        data_dir=args.data_dir,
        upstream_tokens_per_second=args.tokens_per_second,
        upstream_text=args.text,
        upstream_reasoning_text=args.reasoning_text,
        with_postgres=not args.no_postgres,
    )
    if args.jwt_secret:
        opts.jwt_secret = args.jwt_secret
    if args.max_events_per_second is not None:
        opts.limits = RealtimeLimits(max_events_per_second=args.max_events_per_second)
    return opts


def format_env(env: dict[str, str]) -> str:
    return "\n".join(f"{key}={value}" for key, value in env.items())


@contextlib.contextmanager
def stop_signals() -> Iterator[asyncio.Event]:
    """SIGINT / SIGTERM set the event while the block runs. Install it before saying
    "Ctrl-C stops": a signal that came between the message and the handlers was a
    KeyboardInterrupt (exit 130 instead of an orderly stop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield stop
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    stack = DevStack(stack_options(args))
    await stack.start()
    try:
        with stop_signals() as stop:
            print("# llm-relay devstack is up. Paste these lines into .env:", flush=True)
            print(format_env(stack.env()), flush=True)
            print(f"# demo page: {stack.api_url}/demo/demo.html   (Ctrl-C stops)", flush=True)
            logger.bind(event="devstack_up").info("devstack running at {}", stack.api_url)
            await stop.wait()
    finally:
        await stack.stop()
    return 0


COMMAND = Command(
    "devstack",
    "Start the local stack (Postgres, Realtime, simulated upstream) and print .env lines",
    add_stack_arguments,
    _run,
)
