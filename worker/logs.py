"""Logging: loguru configured once at start-up; stdlib loggers routed through it.

Level policy (written down, as websockets does):
- INFO: lifecycle (start, stop, connect, reconnect) and one line per stream start/end.
- DEBUG: one line per batch or retry, never per token.
- WARNING: retries, fallbacks, degraded paths. ERROR: a stream or request failed.
Never log prompts, generated text, or keys. Records carry a stable `event` key and
ids via `logger.bind(stream=..., job=...)`.
"""

from __future__ import annotations

import logging
import sys
from types import FrameType

from loguru import logger

# Third-party loggers worth seeing; their DEBUG is very chatty (realtime logs frames).
_ROUTED = ("httpx", "httpcore", "realtime", "websockets", "psycopg", "asyncio")
_QUIET_BELOW_WARNING = ("httpcore", "websockets", "realtime", "httpx", "pgserver")


class InterceptHandler(logging.Handler):
    """Forward standard-library records to loguru, keeping the caller's location."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        frame: FrameType | None = logging.currentframe()
        depth = 2
        while frame is not None and frame.f_code.co_filename == logging.__file__:
            frame = frame.f_back
            depth += 1
        logger.bind(event="stdlib", source=record.name).opt(
            depth=depth, exception=record.exc_info
        ).log(level, record.getMessage())


_TEXT_FORMAT = (
    "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "<cyan>{extra[event]}</cyan> {message} <dim>{extra}</dim>"
)


def configure_logging(level: str = "INFO", *, json: bool = False) -> None:
    """Install the sinks. Call once, from the entry point only. Logs go to stderr."""
    logger.remove()
    logger.configure(extra={"event": "-"})
    if json:
        logger.add(sys.stderr, level=level, serialize=True, backtrace=False, diagnose=False)
    else:
        logger.add(
            sys.stderr,
            level=level,
            format=_TEXT_FORMAT,
            colorize=None,
            backtrace=False,
            diagnose=False,
        )
    logging.basicConfig(handlers=[InterceptHandler()], level=0, force=True)
    for name in _ROUTED:
        std = logging.getLogger(name)
        std.handlers = []
        std.propagate = True
    noisy_level = logging.DEBUG if level in ("TRACE",) else logging.WARNING
    for name in _QUIET_BELOW_WARNING:
        logging.getLogger(name).setLevel(noisy_level)
