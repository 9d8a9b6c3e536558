"""Acked, retried, budgeted publishing to Supabase Realtime with realtime-py.

Layers (the names tell them):

- `StreamHandle`: what one stream's relay talks to. `send_tokens(batch)` and
  `send_event(event, fields)` queue a message (never block, never drop); `drain()`
  waits until every message of the stream is acknowledged.
- `_Lane`: one per topic, one task: the one retry loop. It takes the lowest-ordered
  ready message, waits for the messages/s budget (FIFO, so round-robin over topics),
  coalesces queued never-sent token batches of the same stream and kind into one
  message (batches grow while sending is blocked), and sends it:
    * over the socket, `channel.push("broadcast", ...)` on a channel joined with
      `broadcast.ack = true`, pipelined up to `relay_max_in_flight` unacked pushes;
      the reply arrives through `AsyncPush.receive("ok"|"error"|"timeout")`, and our
      own timer (`relay_ack_timeout_s`) bounds the wait;
    * through `POST /realtime/v1/api/broadcast` (REST batch endpoint) while the
      socket is down or the channel cannot join;
    * not at all ("hold") while a rate-limit cool-down runs: then it waits.
  A failure goes through `RetryPolicy`: 3 retries with backoff, then one-token
  messages, then "parked" until the channel is back. Nothing is dropped; the client
  drops duplicates by offset.
- `Publisher`: owns the `AsyncRealtimeClient`, the channels, the lanes, the budget,
  and the supervisor task, which never gives up:
    * realtime-py's own reconnect loop (auto_reconnect) runs inside its unsupervised
      listen task, stops for good after 5 tries and rejoins channels immediately
      (ignoring the 30 s rate-limit delay); so we create the client with
      `auto_reconnect=False` and the supervisor calls its `connect()` with our
      backoff, forever, and replaces the client with a fresh one after every
      `CLIENT_RECREATE_AFTER` consecutive failures or when the socket looks dead
      (acks stop while pushes time out);
    * a channel the server closed (system error + `phx_close`: realtime-py removes it
      and never rejoins) is created and subscribed again, after
      `relay_rate_limit_rejoin_s` when the reason was a rate limit;
    * pushes in flight on a socket or channel that went away are failed at once
      (their replies can never come) and go through the retry policy.

State is `PublisherState`, changed only through `_set_state`, which logs transitions.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import enum
import json
import math
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import httpx
from loguru import logger
from pydantic import SecretStr
from realtime import AsyncRealtimeChannel, AsyncRealtimeClient, RealtimeSubscribeStates
from realtime.types import RealtimeAcknowledgementStatus, RealtimeChannelOptions

from worker.backoff import backoff_delay
from worker.config import Settings
from worker.errors import ConfigError, PublishError
from worker.relay import metrics
from worker.relay.batcher import Batch
from worker.relay.budget import MessageBudget
from worker.relay.retry import Action, RetryPolicy
from worker.relay.wire import EVENT_TOKEN, WIRE_VERSION, TokenMessage

CLIENT_RECREATE_AFTER = 5  # consecutive connect failures (realtime-py's own give-up point)
SUPERVISE_TICK_S = 0.1
ACTIVE_WINDOW_S = 2.0  # a stream counts for the fair share this long after its last token
# A topic with no open stream and nothing queued leaves its channel after this long:
# Realtime allows 100 channels per socket, and every session has its own topic.
TOPIC_LINGER_S = 10.0
DEAD_SOCKET_TIMEOUTS = 3  # consecutive ack timeouts, no ok in between, before a new client
RATE_LIMIT_MESSAGES = ("Too many messages per second",)
RATE_LIMIT_JOIN_CODES = (
    "ChannelRateLimitReached",
    "ConnectionRateLimitReached",
    "ClientJoinRateLimitReached",
    "DatabaseConnectionRateLimitReached",
)

# Failures of the path, not of the message (see `_Lane._failed`).
PATH_FAILURES = frozenset({"disconnected", "channel_closed", "channel_error"})

BUDGET_WAIT_MERGE_S = 0.005  # a budget wait longer than this lets the lane merge batches

Route = Literal["ws", "rest", "hold"]
log = logger.bind(event="relay.publisher")


class PublisherState(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(eq=False)
class _Item:
    """One message to deliver. `payload` is frozen at its first transmission."""

    order: tuple[int, ...]
    handle: StreamHandle
    event: str
    fields: dict[str, Any]
    token: TokenMessage | None = None  # llm-token messages, before their seq is fixed
    payload: dict[str, Any] | None = None
    failures: int = 0
    is_piece: bool = False
    parked: bool = False
    not_before: float = 0.0
    attempt: int = 0  # transmissions so far; replies of older ones are ignored
    in_flight: bool = False
    sent_at: float = 0.0
    settle_timer: asyncio.TimerHandle | None = None
    push: Any = None

    @property
    def splittable(self) -> bool:
        return self.token is not None and len(self.token.tokens) > 1


@dataclass
class StreamStats:
    messages: int = 0  # first transmissions
    retries: int = 0
    fallbacks: int = 0
    parked: int = 0
    rest_messages: int = 0
    coalesced: int = 0


class StreamHandle:
    """One stream's door to the publisher (see `Publisher.stream`)."""

    def __init__(self, publisher: Publisher, topic: str, stream_id: str, start_seq: int) -> None:
        self._publisher = publisher
        self.topic = topic
        self.stream_id = stream_id
        self.next_seq = start_seq
        self.outstanding = 0
        self.stats = StreamStats()
        self.last_activity = float("-inf")
        self._idle = asyncio.Event()
        self._idle.set()
        self.closed = False

    # --- sending ---

    def send_tokens(self, batch: Batch) -> None:
        """Queue one batch as an `llm-token` message (seq fixed at first transmission)."""
        metrics.TOKENS.labels(batch.kind).inc(len(batch.tokens))
        token = TokenMessage(self.stream_id, -1, batch.offset, batch.kind, batch.tokens)
        self._publisher._enqueue(self, EVENT_TOKEN, {}, token)

    def send_event(self, event: str, fields: dict[str, Any]) -> None:
        """Queue a control event; `v`, `stream` and `seq` are added at first transmission."""
        self._publisher._enqueue(self, event, dict(fields), None)

    async def drain(self, timeout_s: float | None = None) -> None:
        """Wait until every queued message of this stream is acknowledged."""
        try:
            async with asyncio.timeout(timeout_s):
                while self.outstanding:
                    self._publisher._raise_if_failed()
                    if self._publisher.state is PublisherState.CLOSED:
                        raise PublishError(
                            "publisher closed with messages unacknowledged",
                            topic=self.topic,
                            reason="closed",
                        )
                    self._idle.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.5):
                            await self._idle.wait()
        except TimeoutError as exc:
            raise PublishError(
                f"{self.outstanding} message(s) still unacknowledged after {timeout_s}s",
                topic=self.topic,
                reason="drain_timeout",
            ) from exc

    # --- fair share ---

    def note_activity(self, now: float) -> None:
        self.last_activity = now

    def min_interval_s(self, now: float) -> float:
        """Flush pacing for this stream's batcher: its fair share of the budget."""
        return self._publisher.min_interval_s(now)

    @property
    def unsent(self) -> int:
        return self._publisher._unsent(self)

    def close(self) -> None:
        """Stop counting this stream for the fair share; queued messages still go out."""
        self.closed = True
        self._publisher._streams.discard(self)

    # --- called by the lane ---

    def _take_seq(self) -> int:
        seq = self.next_seq
        self.next_seq += 1
        self.stats.messages += 1
        return seq

    def _done_one(self) -> None:
        self.outstanding -= 1
        if self.outstanding <= 0:
            self.outstanding = 0
            self._idle.set()


class _Lane:
    """One topic's ordered sender: the one retry loop (see module docstring)."""

    def __init__(self, publisher: Publisher, topic: str) -> None:
        self.pub = publisher
        self.topic = topic
        self.pending: list[_Item] = []  # sorted by order, not in flight
        self.in_flight: set[_Item] = set()
        self.wake = asyncio.Event()
        self.counter = 0
        self.log = log.bind(topic=topic)
        self.task: asyncio.Task[None] | None = None
        self.last_activity = time.monotonic()

    # --- queue ---

    def add(self, item: _Item) -> None:
        self.last_activity = time.monotonic()
        bisect.insort(self.pending, item, key=lambda it: it.order)
        self.wake.set()

    def next_order(self) -> tuple[int, ...]:
        self.counter += 1
        return (self.counter, 0)

    def _ready(self, now: float) -> _Item | None:
        for item in self.pending:
            if item.not_before <= now:
                return item
        return None

    def _next_wake_in(self, now: float) -> float:
        waits = [it.not_before - now for it in self.pending]
        return max(0.0, min(waits)) if waits else 1.0

    # --- the loop ---

    async def run(self) -> None:
        held_since: float | None = None
        while True:
            item = await self._wait_ready()
            route = self.pub._route(self.topic)
            if route == "hold":
                held_since = held_since or time.monotonic()
                await self._sleep(SUPERVISE_TICK_S)
                continue
            waited = await self.pub.budget.acquire()
            route = self.pub._route(self.topic)
            if route == "hold":
                continue
            now = time.monotonic()
            # Merge queued batches only when sending was really blocked (budget, outage,
            # REST); a join taking a few ms must not change the batches' shape.
            blocked = (
                waited > BUDGET_WAIT_MERGE_S
                or route == "rest"
                or (
                    held_since is not None
                    and now - held_since >= self.pub.settings.relay_ack_timeout_s
                )
            )
            held_since = None
            # While we waited, an earlier message may have become ready again.
            item = self._ready(now) or item
            if blocked:
                item = self._coalesce(item)
            self.pending.remove(item)
            if route == "ws":
                await self._send_ws(item)
            else:
                await self._send_rest(item)

    async def _sleep(self, seconds: float) -> None:
        self.wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.wake.wait()

    async def _wait_ready(self) -> _Item:
        while True:
            now = time.monotonic()
            if len(self.in_flight) >= self.pub.settings.relay_max_in_flight:
                # Window full: the next ack or failure sets `wake`.
                await self._sleep(self.pub.settings.relay_ack_timeout_s)
                continue
            item = self._ready(now)
            if item is not None:
                return item
            await self._sleep(self._next_wake_in(now) if self.pending else 1.0)

    def _coalesce(self, first: _Item) -> _Item:
        """Merge the never-sent token batches queued right after `first` into it."""
        if (
            first.token is None
            or first.payload is not None
            or first.is_piece
            or not self.pub.settings.relay_adaptive_batching
        ):
            return first
        start = self.pending.index(first)
        tokens = list(first.token.tokens)
        size = sum(len(t.encode("utf-8")) for t in tokens)
        end = first.token.end_offset
        merged: list[_Item] = []
        for nxt in self.pending[start + 1 :]:
            tok = nxt.token
            if (
                tok is None
                or nxt.payload is not None
                or nxt.is_piece
                or nxt.handle is not first.handle
                or tok.kind != first.token.kind
                or tok.offset != end
            ):
                break
            extra = sum(len(t.encode("utf-8")) for t in tok.tokens)
            if size + extra > self.pub.settings.relay_max_message_bytes:
                break
            tokens.extend(tok.tokens)
            size += extra
            end = tok.end_offset
            merged.append(nxt)
        if not merged:
            return first
        for nxt in merged:
            self.pending.remove(nxt)
            metrics.BACKLOG.dec()
            first.handle._done_one()
            first.handle.stats.coalesced += 1
        first.token = TokenMessage(
            first.token.stream, -1, first.token.offset, first.token.kind, tuple(tokens)
        )
        return first

    def _freeze(self, item: _Item) -> dict[str, Any]:
        if item.payload is None:
            seq = item.handle._take_seq()
            if item.token is not None:
                item.token = TokenMessage(
                    item.token.stream,
                    seq,
                    item.token.offset,
                    item.token.kind,
                    item.token.tokens,
                )
                item.payload = item.token.to_payload()
                metrics.TOKENS_PER_MESSAGE.observe(len(item.token.tokens))
            else:
                item.payload = {
                    "v": WIRE_VERSION,
                    "stream": item.handle.stream_id,
                    "seq": seq,
                    **item.fields,
                }
        return item.payload

    # --- socket path ---

    async def _send_ws(self, item: _Item) -> None:
        channel = self.pub._topics[self.topic].channel
        if channel is None:
            self._failed(item, "disconnected")
            return
        payload = self._freeze(item)
        item.attempt += 1
        attempt = item.attempt
        item.in_flight = True
        item.sent_at = time.monotonic()
        self.in_flight.add(item)
        self.pub.max_in_flight_seen = max(self.pub.max_in_flight_seen, len(self.in_flight))
        try:
            push = await channel.push(
                "broadcast",
                {"type": "broadcast", "event": item.event, "payload": payload},
                self.pub._push_timeout_s,
            )
        except Exception as exc:  # realtime-py raises bare Exceptions; the retry handles all
            self.log.opt(exception=exc).debug("push raised: {}", type(exc).__name__)
            self._settle(item, attempt, "error", None)
            return
        item.push = push

        def on_ok(_response: object) -> None:
            self._settle(item, attempt, "ok", None)

        def on_error(response: object) -> None:
            self._settle(item, attempt, "error", response)

        def on_timeout() -> None:
            self._settle(item, attempt, "timeout", None)

        push.receive(RealtimeAcknowledgementStatus.Ok, on_ok)
        push.receive(RealtimeAcknowledgementStatus.Error, on_error)
        push.receive(RealtimeAcknowledgementStatus.Timeout, on_timeout)
        if item.in_flight and item.attempt == attempt:
            item.settle_timer = asyncio.get_running_loop().call_later(
                self.pub.settings.relay_ack_timeout_s, on_timeout
            )

    def _settle(self, item: _Item, attempt: int, outcome: str, response: object) -> None:
        if not item.in_flight or item.attempt != attempt:
            return  # a reply to an older transmission, or already settled
        item.in_flight = False
        self.in_flight.discard(item)
        if item.settle_timer is not None:
            item.settle_timer.cancel()
            item.settle_timer = None
        push = item.push
        item.push = None
        if outcome == "ok":
            metrics.ACK_SECONDS.observe(time.monotonic() - item.sent_at)
            self.pub._on_ack_ok()
            self._delivered(item, "ws")
            return
        if push is not None:
            push.destroy()
            if push.ref is not None:
                push.channel.messages_waiting_for_ack.pop(push.ref, None)
        if outcome == "timeout":
            self.pub._on_ack_timeout()
        else:
            self.log.debug("ack error: {}", response)
        self._failed(item, outcome)

    def fail_in_flight(self, reason: str) -> None:
        """The socket or channel went away: replies can never come."""
        for item in list(self.in_flight):
            self._settle(item, item.attempt, reason, None)

    def abandon_in_flight(self) -> None:
        """At close: stop the timers of unacked pushes (they stay counted as outstanding)."""
        for item in self.in_flight:
            if item.settle_timer is not None:
                item.settle_timer.cancel()
            if item.push is not None:
                item.push.destroy()
            item.in_flight = False
        self.in_flight.clear()

    # --- REST path ---

    async def _send_rest(self, item: _Item) -> None:
        payload = self._freeze(item)
        ok = await self.pub._rest_send(self.topic, item.event, payload)
        if ok:
            item.handle.stats.rest_messages += 1
            self._delivered(item, "rest")
        else:
            self._failed(item, "rest")

    # --- outcomes ---

    def _delivered(self, item: _Item, route: str) -> None:
        self.last_activity = time.monotonic()
        metrics.MESSAGES.labels(item.event, route).inc()
        metrics.BACKLOG.dec()
        item.handle._done_one()
        self.wake.set()

    def _failed(self, item: _Item, reason: str) -> None:
        metrics.FLUSH_FAILURES.labels(reason).inc()
        if reason in PATH_FAILURES:
            # The socket or channel went away under the message: nothing is wrong with
            # the message itself, so it does not count towards the fallback. It goes
            # again at once, by whatever route is open (REST, or after the rejoin).
            item.not_before = 0.0
            self.add(item)
            return
        item.failures += 1
        decision = self.pub.policy.on_failure(
            item.failures, splittable=item.splittable, is_piece=item.is_piece
        )
        now = time.monotonic()
        stats = item.handle.stats
        if decision.action is Action.SPLIT:
            assert item.token is not None
            stats.fallbacks += 1
            metrics.FALLBACKS.inc()
            self.log.warning(
                "batch at offset {} failed {} times: token-by-token fallback",
                item.token.offset,
                item.failures,
            )
            self._split(item)
            return
        item.not_before = now + decision.delay_s
        if decision.action is Action.RETRY:
            stats.retries += 1
            metrics.RETRIES.inc()
        elif not item.parked:
            item.parked = True
            stats.parked += 1
            metrics.PARKED.inc()
        self.add(item)

    def _split(self, item: _Item) -> None:
        assert item.token is not None
        tok = item.token
        for i, text in enumerate(tok.tokens):
            piece = _Item(
                order=(*item.order, i),
                handle=item.handle,
                event=EVENT_TOKEN,
                fields={},
                token=TokenMessage(tok.stream, -1, tok.offset + i, tok.kind, (text,)),
                is_piece=True,
            )
            self.add(piece)
        n = len(tok.tokens)
        item.handle.outstanding += n - 1
        metrics.BACKLOG.inc(n - 1)

    def channel_up(self) -> None:
        """The channel is (re)joined: parked messages go out again, in order, now."""
        for item in self.pending:
            if item.parked:
                item.not_before = 0.0
        self.wake.set()


@dataclass
class _TopicState:
    channel: AsyncRealtimeChannel | None = None
    join_task: asyncio.Task[None] | None = None
    down_since: float = field(default_factory=time.monotonic)
    rejoin_not_before: float = 0.0
    hold_until: float = 0.0
    closed_reason: str = ""


class Publisher:
    """Acked publishing to Realtime broadcast; use as `async with Publisher(settings):`."""

    def __init__(
        self,
        settings: Settings,
        *,
        api_key: str | SecretStr | None = None,
        budget: MessageBudget | None = None,
    ) -> None:
        key = api_key if api_key is not None else settings.supabase_service_role_key
        if isinstance(key, SecretStr):
            key = key.get_secret_value()
        if not key:
            raise ConfigError("Publisher needs an API key (SUPABASE_SERVICE_ROLE_KEY)")
        self.settings = settings
        self._api_key: str = key
        self.budget = budget or MessageBudget(
            settings.relay_messages_per_second,
            utilization=settings.relay_budget_utilization,
            expected_subscribers=settings.relay_expected_subscribers,
        )
        self.policy = RetryPolicy(
            max_retries=settings.relay_max_flush_retries,
            base_s=settings.relay_retry_base_ms / 1000,
            cap_s=settings.relay_retry_cap_s,
        )
        self._push_timeout_s = math.ceil(settings.relay_ack_timeout_s) + 1
        self._rest_url = settings.realtime_url + "/api/broadcast"
        self.state = PublisherState.IDLE
        self._client: AsyncRealtimeClient | None = None
        self._http: httpx.AsyncClient | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._lanes: dict[str, _Lane] = {}
        self._topics: dict[str, _TopicState] = {}
        self._streams: set[StreamHandle] = set()
        self._wake = asyncio.Event()
        self._connected = asyncio.Event()
        self._join_hold_until = 0.0
        self._timeouts_in_a_row = 0
        self._last_ok = time.monotonic()
        self._failure: BaseException | None = None
        self.reconnections = 0
        self.clients_created = 0
        self.max_in_flight_seen = 0  # pipelining depth reached on any topic
        self.topic_linger_s = TOPIC_LINGER_S

    # --- lifecycle ---

    async def __aenter__(self) -> Publisher:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Start the supervisor; it connects in the background (sends queue meanwhile)."""
        if self._supervisor is not None:
            return
        self._http = httpx.AsyncClient(timeout=self.settings.relay_ack_timeout_s)
        self._client = self._new_client()
        # Streams may register (and queue) before the supervisor task first runs.
        self._set_state(PublisherState.CONNECTING)
        self._supervisor = self._spawn(self._supervise(), "relay-publisher-supervisor")

    async def wait_connected(self, timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            await self._connected.wait()

    async def close(self, grace_s: float = 5.0) -> None:
        """Deliver what is queued (up to `grace_s`), then stop tasks and the client."""
        if self.state in (PublisherState.CLOSING, PublisherState.CLOSED):
            return
        self._set_state(PublisherState.CLOSING)
        with contextlib.suppress(TimeoutError, PublishError):
            async with asyncio.timeout(grace_s):
                while any(lane.pending or lane.in_flight for lane in self._lanes.values()):
                    self._raise_if_failed()
                    await asyncio.sleep(0.02)
        for lane in self._lanes.values():
            lane.abandon_in_flight()
        tasks = [lane.task for lane in self._lanes.values() if lane.task is not None]
        tasks += [t.join_task for t in self._topics.values() if t.join_task is not None]
        if self._supervisor is not None:
            tasks.append(self._supervisor)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._close_client(self._client)
        if self._http is not None:
            await self._http.aclose()
        self._set_state(PublisherState.CLOSED)

    # --- health, for the worker (it supervises `supervised()` and asks `ready()`) ---

    def ready(self) -> bool:
        """Connected to Realtime, and no task of the publisher died."""
        return self._failure is None and self.state is PublisherState.CONNECTED

    async def supervised(self) -> None:
        """Run as a supervised side task: returns never; raises once a publisher task
        died or the supervisor stopped, so the worker stops loudly instead of
        queueing into a publisher that no longer delivers."""
        while True:
            self._raise_if_failed()
            supervisor = self._supervisor
            if supervisor is None or supervisor.done():
                raise PublishError("the publisher's supervisor is not running", reason="internal")
            await asyncio.wait({supervisor}, timeout=SUPERVISE_TICK_S)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._monitor)
        return task

    def _monitor(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            # A dead loop would silently stop delivery: make every waiter fail loudly.
            log.opt(exception=exc).error("publisher task {} died", task.get_name())
            self._failure = exc

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise PublishError(f"publisher failed: {self._failure!r}", reason="internal")

    def _set_state(self, state: PublisherState) -> None:
        if state is self.state:
            return
        log.info("publisher {} -> {}", self.state.value, state.value)
        self.state = state
        metrics.CONNECTED.set(1 if state is PublisherState.CONNECTED else 0)
        if state is PublisherState.CONNECTED:
            self._connected.set()
        else:
            self._connected.clear()

    def describe(self) -> dict[str, Any]:
        """Diagnostics: state, and per topic the channel and the queue (no payloads)."""
        now = time.monotonic()
        topics: dict[str, Any] = {}
        for topic, lane in self._lanes.items():
            st = self._topics[topic]
            topics[topic] = {
                "route": self._route(topic),
                "channel": None if st.channel is None else st.channel.state.value,
                "pending": len(lane.pending),
                "parked": sum(1 for it in lane.pending if it.parked),
                "in_flight": len(lane.in_flight),
                "next_ready_in_s": round(lane._next_wake_in(now), 3) if lane.pending else None,
                "lane_alive": lane.task is not None and not lane.task.done(),
            }
        return {
            "state": self.state.value,
            "connected": self._client is not None and self._client.is_connected,
            "reconnections": self.reconnections,
            "clients_created": self.clients_created,
            "topics": topics,
        }

    # --- streams ---

    def stream(self, topic: str, stream_id: str, *, start_seq: int = 0) -> StreamHandle:
        """Register one stream on `topic` (sub-topic, without `realtime:`)."""
        if self.state in (PublisherState.CLOSING, PublisherState.CLOSED, PublisherState.IDLE):
            raise PublishError(f"publisher is {self.state.value}", topic=topic)
        handle = StreamHandle(self, topic, stream_id, start_seq)
        self._streams.add(handle)
        self._lane(topic)
        return handle

    def active_streams(self, now: float) -> int:
        return sum(1 for h in self._streams if now - h.last_activity <= ACTIVE_WINDOW_S)

    def min_interval_s(self, now: float) -> float:
        return self.budget.min_interval_s(max(1, self.active_streams(now)), now)

    def _lane(self, topic: str) -> _Lane:
        lane = self._lanes.get(topic)
        if lane is None:
            lane = self._lanes[topic] = _Lane(self, topic)
            self._topics[topic] = _TopicState()
            lane.task = self._spawn(lane.run(), f"relay-lane:{topic}")
            self._wake.set()
        return lane

    def _enqueue(
        self, handle: StreamHandle, event: str, fields: dict[str, Any], token: TokenMessage | None
    ) -> None:
        self._raise_if_failed()
        lane = self._lane(handle.topic)
        handle.outstanding += 1
        handle._idle.clear()
        metrics.BACKLOG.inc()
        lane.add(
            _Item(order=lane.next_order(), handle=handle, event=event, fields=fields, token=token)
        )

    def _unsent(self, handle: StreamHandle) -> int:
        lane = self._lanes.get(handle.topic)
        if lane is None:
            return 0
        return sum(1 for it in lane.pending if it.handle is handle and it.payload is None)

    # --- routing ---

    def _route(self, topic: str) -> Route:
        now = time.monotonic()
        state = self._topics[topic]
        if now < state.hold_until:
            return "hold"
        client = self._client
        channel = state.channel
        connected = client is not None and client.is_connected
        if (
            connected
            and channel is not None
            and channel.is_joined
            and client is not None
            and client.channels.get(channel.topic) is channel
        ):
            return "ws"
        if not self.settings.relay_rest_fallback:
            return "hold"
        # A join normally takes milliseconds: wait for it rather than mix paths.
        if not connected or now - state.down_since > self.settings.relay_ack_timeout_s:
            return "rest"
        return "hold"

    async def _rest_send(self, topic: str, event: str, payload: dict[str, Any]) -> bool:
        assert self._http is not None
        body = {
            "messages": [
                {
                    "topic": topic,
                    "event": event,
                    "payload": payload,
                    "private": self.settings.relay_private_channels,
                }
            ]
        }
        headers = {"apikey": self._api_key, "Authorization": f"Bearer {self._api_key}"}
        try:
            response = await self._http.post(self._rest_url, json=body, headers=headers)
        except httpx.HTTPError as exc:
            metrics.REST_SENDS.labels("error").inc()
            log.debug("REST broadcast failed: {}", type(exc).__name__)
            return False
        if response.status_code == 202:
            metrics.REST_SENDS.labels("ok").inc()
            return True
        metrics.REST_SENDS.labels("error").inc()
        if response.status_code == 429:
            metrics.RATE_LIMITED.inc()
            self.budget.penalize()
        log.warning("REST broadcast refused: {} {}", response.status_code, response.text[:200])
        return False

    # --- ack health ---

    def _on_ack_ok(self) -> None:
        self._timeouts_in_a_row = 0
        self._last_ok = time.monotonic()

    def _on_ack_timeout(self) -> None:
        self._timeouts_in_a_row += 1
        if self._timeouts_in_a_row >= DEAD_SOCKET_TIMEOUTS:
            self._wake.set()

    def _socket_looks_dead(self) -> bool:
        return (
            self._timeouts_in_a_row >= DEAD_SOCKET_TIMEOUTS
            and time.monotonic() - self._last_ok > 2 * self.settings.relay_ack_timeout_s
        )

    # --- the supervisor ---

    def _new_client(self) -> AsyncRealtimeClient:
        self.clients_created += 1
        return AsyncRealtimeClient(
            self.settings.realtime_url,
            token=self._api_key,
            auto_reconnect=False,
            timeout=max(2, math.ceil(2 * self.settings.relay_ack_timeout_s)),
        )

    async def _close_client(self, client: AsyncRealtimeClient) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await client.close()

    async def _supervise(self) -> None:
        failures = 0
        was_connected = False
        while self.state is not PublisherState.CLOSING:
            client = self._client
            assert client is not None
            if was_connected and (not client.is_connected or self._socket_looks_dead()):
                was_connected = False
                await self._on_socket_lost()
                continue
            if not client.is_connected:
                failures = await self._connect_once(client, failures)
                was_connected = client.is_connected
                continue
            self._retire_idle_topics()
            self._ensure_channels()
            await self._sleep(SUPERVISE_TICK_S)

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    async def _connect_once(self, client: AsyncRealtimeClient, failures: int) -> int:
        wait = max(0.0, self._join_hold_until - time.monotonic())
        if failures:
            wait = max(
                wait,
                backoff_delay(failures, base_s=self.policy.base_s, cap_s=self.policy.cap_s),
            )
        if wait:
            await self._sleep(wait)
            if self.state is PublisherState.CLOSING:
                return failures
        self._set_state(PublisherState.CONNECTING)
        try:
            async with asyncio.timeout(self.settings.relay_ack_timeout_s * 2 + 1):
                await client.connect()
        except Exception as exc:  # connect() raises bare Exceptions of websockets/OS
            failures += 1
            metrics.RECONNECTIONS.labels("error").inc()
            log.warning("connect failed ({} in a row): {}", failures, type(exc).__name__)
            self._set_state(PublisherState.DISCONNECTED)
            if failures % CLIENT_RECREATE_AFTER == 0:
                await self._recreate_client("connect failures")
            return failures
        self.reconnections += 1
        metrics.RECONNECTIONS.labels("ok").inc()
        self._timeouts_in_a_row = 0
        self._last_ok = time.monotonic()
        self._set_state(PublisherState.CONNECTED)
        return 0

    async def _on_socket_lost(self) -> None:
        dead = self._socket_looks_dead()
        log.warning("socket lost ({})", "acks stopped" if dead else "closed")
        self._set_state(PublisherState.DISCONNECTED)
        now = time.monotonic()
        for topic, lane in self._lanes.items():
            self._topics[topic].down_since = now
            lane.fail_in_flight("disconnected")
        if dead:
            await self._recreate_client("acks stopped")

    async def _recreate_client(self, why: str) -> None:
        metrics.CLIENT_RECREATED.inc()
        log.warning("replacing the realtime client: {}", why)
        old = self._client
        self._client = self._new_client()
        self._timeouts_in_a_row = 0
        for topic, state in self._topics.items():
            if state.join_task is not None:
                state.join_task.cancel()
            state.channel = None
            state.join_task = None
            state.down_since = time.monotonic()
            self._lanes[topic].fail_in_flight("disconnected")
        if old is not None:
            await self._close_client(old)

    def _retire_idle_topics(self) -> None:
        """Leave the channels of topics no stream uses any more (nothing queued)."""
        now = time.monotonic()
        busy = {handle.topic for handle in self._streams}
        for topic, lane in list(self._lanes.items()):
            if (
                topic in busy
                or lane.pending
                or lane.in_flight
                or now - lane.last_activity < self.topic_linger_s
            ):
                continue
            state = self._topics.pop(topic)
            del self._lanes[topic]
            if lane.task is not None:
                lane.task.cancel()
            if state.join_task is not None:
                state.join_task.cancel()
            channel = state.channel
            client = self._client
            if (
                channel is not None
                and client is not None
                and client.channels.get(channel.topic) is channel
            ):
                # unsubscribe() = phx_leave; realtime-py drops the channel on the reply.
                self._spawn(self._leave(channel), f"relay-leave:{topic}")
            log.bind(topic=topic).debug("topic idle: channel left")

    async def _leave(self, channel: AsyncRealtimeChannel) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.settings.relay_ack_timeout_s * 2):
                await channel.unsubscribe()

    def _ensure_channels(self) -> None:
        now = time.monotonic()
        client = self._client
        assert client is not None
        for topic, state in self._topics.items():
            channel = state.channel
            alive = channel is not None and client.channels.get(channel.topic) is channel
            busy = state.join_task is not None and not state.join_task.done()
            if alive or busy or now < state.rejoin_not_before:
                continue
            if channel is not None:
                metrics.CHANNEL_REJOINS.labels(state.closed_reason or "closed").inc()
                log.bind(topic=topic).info("channel closed by the server: joining again")
            state.join_task = self._spawn(self._join(topic, client), f"relay-join:{topic}")

    def _channel_params(self) -> RealtimeChannelOptions:
        return {
            "config": {
                "broadcast": {"ack": True, "self": False},
                "presence": {"key": "", "enabled": False},
                "private": self.settings.relay_private_channels,
            }
        }

    async def _join(self, topic: str, client: AsyncRealtimeClient) -> None:
        state = self._topics[topic]
        channel = client.channel(topic, self._channel_params())
        state.channel = channel
        state.closed_reason = ""

        def on_state(status: RealtimeSubscribeStates, err: Exception | None) -> None:
            self._on_channel_state(topic, channel, status, err)

        try:
            await channel.subscribe(on_state)
        except Exception as exc:  # realtime-py raises bare Exceptions (not connected...)
            log.bind(topic=topic).warning("subscribe failed: {}", type(exc).__name__)

    def _on_channel_state(
        self,
        topic: str,
        channel: AsyncRealtimeChannel,
        status: RealtimeSubscribeStates,
        err: Exception | None,
    ) -> None:
        state = self._topics.get(topic)
        if state is None or state.channel is not channel:
            return  # a replaced channel or client
        lane = self._lanes[topic]
        now = time.monotonic()
        tlog = log.bind(topic=topic)
        if status is RealtimeSubscribeStates.SUBSCRIBED:
            tlog.info("channel joined")
            state.down_since = float("inf")
            lane.channel_up()
            return
        reason = _reason_of(err)
        state.down_since = min(state.down_since, now)
        if status is RealtimeSubscribeStates.CLOSED:
            tlog.warning("channel closed ({})", state.closed_reason or "no reason")
            lane.fail_in_flight("channel_closed")
            self._wake.set()
            return
        if reason.startswith(RATE_LIMIT_MESSAGES):
            metrics.RATE_LIMITED.inc()
            self.budget.penalize(now)
            hold = now + self.settings.relay_rate_limit_rejoin_s
            state.rejoin_not_before = state.hold_until = hold
        elif reason.startswith(RATE_LIMIT_JOIN_CODES):
            metrics.RATE_LIMITED.inc()
            self._join_hold_until = now + self.settings.relay_rate_limit_rejoin_s
        state.closed_reason = reason.split(":", 1)[0][:60] if reason else status.value
        tlog.warning("channel {}: {}", status.value, reason or "-")
        lane.fail_in_flight("channel_error")


def _reason_of(err: Exception | None) -> str:
    """realtime-py wraps join errors and system errors as Exception(json.dumps(payload))."""
    if err is None:
        return ""
    text = str(err)
    try:
        data = json.loads(text)
    except ValueError:
        return text
    if isinstance(data, dict):
        return str(data.get("reason") or data.get("message") or "")
    return text
