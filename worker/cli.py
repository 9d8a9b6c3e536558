"""`llm-relay`: one console script, subcommands as plugins.

Subcommands register under the entry-point group `llm_relay.commands` (see
pyproject.toml), so the worker's CLI never imports `devstack` by name: the
devstack's `demo` and `devstack` commands plug in when that package and its extra
are installed. Only the command being run is imported (`llm-relay run` never pays
for, nor breaks on, the devstack's aiohttp); `llm-relay --help` imports them all
and lists one whose dependencies are missing with the install line that adds them.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from importlib.metadata import EntryPoint, entry_points

from loguru import logger

from worker.config import Settings
from worker.errors import ConfigError
from worker.logs import configure_logging

ENTRY_POINT_GROUP = "llm_relay.commands"
DISTRIBUTION = "llm-token-relay"


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


@dataclass(frozen=True)
class Unavailable:
    """A registered command whose module cannot be imported here (an extra is missing)."""

    name: str
    reason: str


def _extra_providing(module: str) -> str | None:
    """The smallest extra of our distribution that declares `module`'s distribution
    (the devstack extra rather than dev or bench, which include it)."""
    try:
        requires = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return None
    sizes: dict[str, int] = {}
    providing: set[str] = set()
    for requirement in requires:
        name = re.match(r"[A-Za-z0-9._-]+", requirement)
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", requirement)
        if name and extra:
            sizes[extra.group(1)] = sizes.get(extra.group(1), 0) + 1
            if _normalise(name.group(0)) == _normalise(module):
                providing.add(extra.group(1))
    return min(providing, key=lambda e: (sizes[e], e), default=None)


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def load_command(ep: EntryPoint) -> Command | Unavailable:
    try:
        command = ep.load()
    except ModuleNotFoundError as exc:
        missing = (exc.name or "?").split(".")[0]
        if missing in ("worker", "devstack"):
            raise  # our own code is broken: never disguise that as a missing extra
        extra = _extra_providing(missing)
        fix = (
            f"pip install '{DISTRIBUTION}[{extra}]'"
            if extra
            else f"install the Python package {missing!r}"
        )
        return Unavailable(ep.name, f"needs {missing!r}, which is not installed: {fix}")
    if not isinstance(command, Command):
        raise TypeError(f"entry point {ep.name} is not a worker.cli.Command")
    return command


def load_commands(only: str | None = None) -> dict[str, Command | Unavailable]:
    """Every registered command, or only `only` when that one is registered."""
    eps = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    names = [only] if only in eps else sorted(eps)
    return {name: load_command(eps[name]) for name in names}


def command_name(argv: Sequence[str]) -> str | None:
    """The subcommand in `argv` (the first word that is no global option or its value)."""
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word == "--log-level":
            skip = True
        elif not word.startswith("-"):
            return word
    return None


def build_parser(commands: dict[str, Command | Unavailable]) -> argparse.ArgumentParser:
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
        if isinstance(command, Unavailable):
            sub.add_parser(command.name, help=f"(unavailable: {command.reason})")
        else:
            command.add_arguments(sub.add_parser(command.name, help=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = load_commands(only=command_name(argv))
    chosen = next(iter(commands.values())) if len(commands) == 1 else None
    if not isinstance(chosen, Unavailable):
        # An unavailable command is refused before parsing: its options are unknown.
        args = build_parser(commands).parse_args(argv)
        chosen = commands[args.command]
    if isinstance(chosen, Unavailable):
        print(f"llm-relay {chosen.name} {chosen.reason}", file=sys.stderr)
        return 2
    command = chosen
    try:
        settings = Settings()
    except Exception as exc:  # pydantic's ValidationError names the bad variable
        handler = command.on_invalid_settings
        if handler is not None:
            return handler(args, exc)
        print(f"llm-relay: invalid settings: {exc}", file=sys.stderr)
        return 2
    configure_logging(
        args.log_level or settings.relay_log_level,
        json=settings.relay_log_json if args.log_json is None else args.log_json,
    )
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
