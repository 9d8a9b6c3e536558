"""`llm-relay watch SESSION`: subscribe like a frontend would and print the text.

`Watcher` is an independent subscriber built on the official realtime-py client
and the pure client rule (`reassembly.py`); the demo and the end-to-end tests use
it to check what actually arrived, never the publisher's own bookkeeping.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from typing import Any

from loguru import logger
from realtime import AsyncRealtimeChannel, AsyncRealtimeClient, RealtimeSubscribeStates

from worker.cli import Command
from worker.config import Settings
from worker.errors import BadInputError, ConfigError
from worker.relay.reassembly import StreamReassembly, TopicReassembly
from worker.relay.wire import EVENTS, parse_message

TextCallback = Callable[[str, str, str], None]  # (stream, kind, text)


class Watcher:
    """Subscribes to one topic and reassembles every stream on it by offset."""

    def __init__(
        self,
        *,
        realtime_url: str,
        token: str,
        topic: str,
        private: bool,
        on_text: TextCallback | None = None,
        join_timeout_s: float = 10.0,
        record: bool = False,
    ) -> None:
        self.topic = topic
        self.private = private
        self.reassembly = TopicReassembly()
        self.received = 0
        self.malformed = 0
        self.first_message_at: float | None = None
        # Raw (event, payload) pairs in arrival order, for tests that check the wire.
        self.recorded: list[tuple[str, dict[str, Any]]] | None = [] if record else None
        self._on_text = on_text
        self._join_timeout_s = join_timeout_s
        self._client = AsyncRealtimeClient(realtime_url, token=token, auto_reconnect=True)
        self._channel: AsyncRealtimeChannel | None = None
        self._changed = asyncio.Event()

    async def start(self) -> None:
        joined: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_state(state: RealtimeSubscribeStates, error: Exception | None) -> None:
            if joined.done():
                return
            if state == RealtimeSubscribeStates.SUBSCRIBED:
                joined.set_result(None)
            else:
                joined.set_exception(
                    ConfigError(f"could not join {self.topic}: {state.value} {error or ''}")
                )

        await self._client.connect()
        channel = self._client.channel(
            self.topic,
            {
                "config": {
                    "broadcast": {"ack": False, "self": False},
                    "presence": {"key": "", "enabled": False},
                    "private": self.private,
                }
            },
        )
        for event in EVENTS:
            channel.on_broadcast(event, self._on_broadcast)
        self._channel = channel
        await channel.subscribe(on_state)
        await asyncio.wait_for(joined, self._join_timeout_s)

    def _on_broadcast(self, message: Any) -> None:
        self.received += 1
        if self.first_message_at is None:
            self.first_message_at = time.monotonic()
        if self.recorded is not None:
            self.recorded.append((message["event"], message["payload"]))
        try:
            parsed = parse_message(message["event"], message["payload"])
        except (BadInputError, KeyError, TypeError) as exc:
            self.malformed += 1
            logger.bind(event="watch_malformed").warning("ignored a malformed message: {}", exc)
            return
        for kind, text in self.reassembly.apply(parsed):
            if self._on_text is not None:
                self._on_text(parsed.stream, kind, text)
        self._changed.set()

    def finished(self) -> list[StreamReassembly]:
        return [s for s in self.reassembly.streams.values() if s.complete or s.error is not None]

    async def wait_finished(self, *, streams: int = 1, timeout_s: float = 60.0) -> None:
        """Wait until `streams` streams are complete (or errored); raise TimeoutError."""
        async with asyncio.timeout(timeout_s):
            while len(self.finished()) < streams:
                self._changed.clear()
                await self._changed.wait()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._client.close()


def _token(args: argparse.Namespace, settings: Settings) -> str:
    # An operator's tool: a user's JWT when given, else the service-role key (which
    # may read every private topic), else the anon key (public topics only).
    for candidate in (args.token, settings.supabase_service_role_key, settings.supabase_anon_key):
        if candidate:
            return candidate if isinstance(candidate, str) else candidate.get_secret_value()
    raise ConfigError("watch needs --token, SUPABASE_SERVICE_ROLE_KEY or SUPABASE_ANON_KEY")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("session", help="session id (the topic is RELAY_TOPIC_TEMPLATE)")
    parser.add_argument("--token", default=None, help="a user's access token (JWT)")
    parser.add_argument("--public", action="store_true", help="join the public topic")
    parser.add_argument("--follow", action="store_true", help="keep watching after a stream")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait")


def _printer(stream: str, kind: str, text: str) -> None:
    if kind == "reasoning":
        # Reasoning goes to stderr so that stdout is exactly the answer.
        sys.stderr.write(text)
        sys.stderr.flush()
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    watcher = Watcher(
        realtime_url=settings.realtime_url,
        token=_token(args, settings),
        topic=settings.topic_for(args.session),
        private=settings.relay_private_channels and not args.public,
        on_text=_printer,
    )
    await watcher.start()
    print(f"# watching {watcher.topic}", file=sys.stderr, flush=True)
    try:
        if args.follow:
            await asyncio.sleep(args.timeout)
        else:
            await watcher.wait_finished(timeout_s=args.timeout)
    except TimeoutError:
        print("\n# timed out", file=sys.stderr)
        return 1
    finally:
        await watcher.close()
    sys.stdout.write("\n")
    for state in watcher.reassembly.streams.values():
        exact = state.checksums_match()
        print(
            f"# stream {state.stream}: {state.next_offset} tokens, {state.messages} messages, "
            f"duplicates dropped {state.duplicate_tokens}, gaps {state.gaps}, "
            f"checksum {'ok' if exact else 'MISMATCH or incomplete'}"
            + (f", error {state.error.type}: {state.error.message}" if state.error else ""),
            file=sys.stderr,
        )
    return 0 if all(s.checksums_match() for s in watcher.reassembly.streams.values()) else 1


COMMAND = Command(
    "watch", "Subscribe to a session's topic and print the reassembled text", _add_arguments, _run
)
