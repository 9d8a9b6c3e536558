"""`llm-relay`: one console script, subcommands as plugins.

Subcommands register under the entry-point group `llm_relay.commands` (see
pyproject.toml), so the worker's CLI never imports `devstack` by name: the
devstack's `demo` and `devstack` commands plug in when that package is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points

from loguru import logger

from worker.config import Settings
from worker.errors import ConfigError
from worker.logs import configure_logging

ENTRY_POINT_GROUP = "llm_relay.commands"


@dataclass(frozen=True)
class Command:
    """A subcommand: `run(args, settings)` returns the exit code (sync or async).

    `on_invalid_settings(args, error)`, when given, reports settings that do not load
    in the command's own format (the doctor's first check) instead of the generic line.
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Settings], int | Awaitable[int]]
    on_invalid_settings: Callable[[argparse.Namespace, Exception], int] | None = None


def load_commands() -> dict[str, Command]:
    commands: dict[str, Command] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        command = ep.load()
        if not isinstance(command, Command):
            raise TypeError(f"entry point {ep.name} is not a worker.cli.Command")
        commands[command.name] = command
    return dict(sorted(commands.items()))


def build_parser(commands: dict[str, Command]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-relay",
        description="Relay LLM token streams to browsers through Supabase Realtime.",
    )
    parser.add_argument("--log-level", default=None, help="override RELAY_LOG_LEVEL")
    parser.add_argument(
        "--log-json", action="store_true", default=None, help="JSON log lines on stderr"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in commands.values():
        command.add_arguments(sub.add_parser(command.name, help=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    commands = load_commands()
    args = build_parser(commands).parse_args(argv)
    try:
        settings = Settings()
    except Exception as exc:  # pydantic's ValidationError names the bad variable
        handler = commands[args.command].on_invalid_settings
        if handler is not None:
            return handler(args, exc)
        print(f"llm-relay: invalid settings: {exc}", file=sys.stderr)
        return 2
    configure_logging(
        args.log_level or settings.relay_log_level,
        json=settings.relay_log_json if args.log_json is None else args.log_json,
    )
    command = commands[args.command]
    try:
        result = command.run(args, settings)
        if inspect.isawaitable(result):
            result = asyncio.run(_await(result))
        return int(result)
    except ConfigError as exc:
        logger.bind(event="config_error").error("{}", exc.message)
        return 2
    except KeyboardInterrupt:
        return 130


async def _await(awaitable: Awaitable[int]) -> int:
    return await awaitable
