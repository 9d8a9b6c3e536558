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
import re
import sys
from collections.abc import Iterable
from types import FrameType
from typing import Any

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


# Credentials that travel in URLs (the Realtime socket's `apikey=`, a token, a
# password in a DSN): masked in every line, whatever logged it.
_URL_SECRET = re.compile(r"(?i)((?:apikey|api_key|access_token|token|password|key)=)[^&\s\"']+")
_DSN_PASSWORD = re.compile(r"(postgres(?:ql)?://[^:/@\s]+:)[^@\s]+@")
MASK = "***"
# Shorter values are not masked: they would also match ordinary words.
MIN_SECRET_CHARS = 8


class Redactor:
    """Masks the configured secrets and URL credentials in a formatted log line."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets = sorted(
            {s for s in secrets if len(s) >= MIN_SECRET_CHARS}, key=len, reverse=True
        )

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        text = _URL_SECRET.sub(lambda m: m.group(1) + MASK, text)
        return _DSN_PASSWORD.sub(lambda m: m.group(1) + MASK + "@", text)


class _RedactingSink:
    """The one sink: every formatted record (traceback included) is redacted."""

    def __init__(self, stream: Any, redact: Redactor) -> None:
        self._stream = stream
        self._redact = redact

    def write(self, message: str) -> None:
        self._stream.write(self._redact(message))

    def flush(self) -> None:
        self._stream.flush()


def configure_logging(
    level: str = "INFO", *, json: bool = False, secrets: Iterable[str] = ()
) -> None:
    """Install the sinks. Call once, from the entry point only. Logs go to stderr.

    `secrets` (the configured keys) never appear in a line, at any level: the sink
    masks them and any `apikey=`-style URL credential (TRACE logs socket URLs).
    """
    logger.remove()
    logger.configure(extra={"event": "-"})
    sink = _RedactingSink(sys.stderr, Redactor(secrets))
    if json:
        logger.add(sink, level=level, serialize=True, backtrace=False, diagnose=False)
    else:
        logger.add(
            sink,
            level=level,
            format=_TEXT_FORMAT,
            colorize=sys.stderr.isatty(),
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
    # The pool logs every failed reconnection attempt; the worker logs the outage once.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
