"""`llm-relay watch SESSION`: subscribe like a frontend would and print the text.

`Watcher` is an independent subscriber built on the official realtime-py client
and the pure client rule (`reassembly.py`); the demo and the end-to-end tests use
it to check what actually arrived, never the publisher's own bookkeeping.

Catch-up (given `rest_url`): what the live messages do not bring is read from the
write-ahead token log through PostgREST, as the user (RLS: their own requests only):

    GET <rest_url>/llm_request_chunks?select=token_offset,kind,text
        &request_id=eq.<stream>&token_offset=gte.<next expected offset>&order=token_offset

at once when a stream is first seen past offset 0 (joined late), and whenever a gap
has been held for `gap_timeout_s` (a message lost with a dead worker, or never sent).
Every broadcast token is in the log before it is sent, so the log always fills it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
from loguru import logger
from realtime import AsyncRealtimeChannel, AsyncRealtimeClient, RealtimeSubscribeStates

from worker.cli import Command
from worker.config import Settings
from worker.errors import BadInputError, ConfigError
from worker.relay.reassembly import StreamReassembly, TopicReassembly
from worker.relay.wire import EVENTS, DoneMessage, TokenMessage, parse_message
from worker.upstream.events import TokenKind

TextCallback = Callable[[str, str, str], None]  # (stream, kind, text)
CATCH_UP_PAGE = 1000  # rows per read (Supabase's default max rows)
CATCH_UP_TIMEOUT_S = 10.0


def chunk_messages(stream: str, rows: list[dict[str, Any]]) -> list[TokenMessage]:
    """Rows of the token log as `llm-token` messages (one per run of one kind)."""
    out: list[TokenMessage] = []
    run: list[str] = []
    start, kind = 0, "content"
    for row in rows:
        offset, row_kind, text = int(row["token_offset"]), str(row["kind"]), str(row["text"])
        if run and (row_kind != kind or offset != start + len(run)):
            out.append(TokenMessage(stream, -1, start, _kind(kind), tuple(run)))
            run = []
        if not run:
            start, kind = offset, row_kind
        run.append(text)
    if run:
        out.append(TokenMessage(stream, -1, start, _kind(kind), tuple(run)))
    return out


def _kind(value: str) -> TokenKind:
    return "reasoning" if value == "reasoning" else "content"


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
        rest_url: str | None = None,
        apikey: str | None = None,
        gap_timeout_s: float = 0.5,
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
        self._token = token
        self._rest_url = rest_url.rstrip("/") if rest_url else None
        self._apikey = apikey or token
        self.gap_timeout_s = gap_timeout_s
        self._catching: dict[str, asyncio.Task[None]] = {}
        self.caught_up_tokens = 0  # tokens applied from the log, not from live messages
        self.catch_up_reads = 0
        self._http: httpx.AsyncClient | None = None

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
        first = parsed.stream not in self.reassembly.streams
        self._apply(parsed)
        catchable = isinstance(parsed, TokenMessage | DoneMessage)
        if self._rest_url is not None and catchable and self._gapped(parsed.stream):
            self._schedule_catch_up(parsed.stream, at_once=first)

    def _apply(self, parsed: Any) -> None:
        for kind, text in self.reassembly.apply(parsed):
            if self._on_text is not None:
                self._on_text(parsed.stream, kind, text)
        self._changed.set()

    # --- catch-up from the token log ---

    def _gapped(self, stream: str) -> bool:
        state = self.reassembly.streams.get(stream)
        if state is None:
            return True
        return bool(state.held_messages) or (state.done is not None and not state.complete)

    def _schedule_catch_up(self, stream: str, *, at_once: bool = False) -> None:
        task = self._catching.get(stream)
        if task is None or task.done():
            self._catching[stream] = asyncio.create_task(
                self._catch_up_loop(stream, 0.0 if at_once else self.gap_timeout_s),
                name=f"catch-up:{stream}",
            )

    async def catch_up(self, stream: str) -> int:
        """Read the log of `stream` from its next expected offset; the tokens applied."""
        if self._rest_url is None:
            raise ConfigError("catch-up needs the PostgREST URL (rest_url)")
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=CATCH_UP_TIMEOUT_S)
        state = self.reassembly.streams.get(stream)
        before = 0 if state is None else state.next_offset
        offset = before
        while True:
            self.catch_up_reads += 1
            response = await self._http.get(
                f"{self._rest_url}/llm_request_chunks",
                params={
                    "select": "token_offset,kind,text",
                    "request_id": f"eq.{stream}",
                    "token_offset": f"gte.{offset}",
                    "order": "token_offset",
                    "limit": str(CATCH_UP_PAGE),
                },
                headers={"apikey": self._apikey, "Authorization": f"Bearer {self._token}"},
            )
            response.raise_for_status()
            rows: list[dict[str, Any]] = response.json()
            for message in chunk_messages(stream, rows):
                self._apply(message)
            if len(rows) < CATCH_UP_PAGE:
                break
            offset = int(rows[-1]["token_offset"]) + 1
        now = self.reassembly.streams.get(stream)
        after = before if now is None else now.next_offset
        self.caught_up_tokens += after - before
        return after - before

    async def _catch_up_loop(self, stream: str, first_wait_s: float) -> None:
        wait_s = first_wait_s
        while True:
            if wait_s:
                await asyncio.sleep(wait_s)
            if not self._gapped(stream):
                return
            try:
                await self.catch_up(stream)
            except (httpx.HTTPError, ValueError) as exc:
                logger.bind(event="watch_catch_up", stream=stream).warning(
                    "catch-up read failed: {}", exc
                )
            wait_s = self.gap_timeout_s

    def finished(self) -> list[StreamReassembly]:
        return [s for s in self.reassembly.streams.values() if s.complete or s.error is not None]

    async def wait_finished(self, *, streams: int = 1, timeout_s: float = 60.0) -> None:
        """Wait until `streams` streams are complete (or errored); raise TimeoutError."""
        async with asyncio.timeout(timeout_s):
            while len(self.finished()) < streams:
                self._changed.clear()
                await self._changed.wait()

    async def close(self) -> None:
        for task in self._catching.values():
            task.cancel()
        await asyncio.gather(*self._catching.values(), return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()
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
    anon = settings.supabase_anon_key
    watcher = Watcher(
        realtime_url=settings.realtime_url,
        token=_token(args, settings),
        topic=settings.topic_for(args.session),
        private=settings.relay_private_channels and not args.public,
        on_text=_printer,
        # What it missed (joined late, a gap) comes from the token log through PostgREST.
        rest_url=settings.supabase_url.rstrip("/") + "/rest/v1",
        apikey=anon.get_secret_value() if anon is not None else None,
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
