"""Acked, retried, budgeted publishing to Supabase Realtime with realtime-py.

Layers (the names tell them):

- `Outbox` (`worker.relay.outbox`, pure): one topic's messages and their states
  (queued, in flight, parked), coalescing, and every ack/failure decision.
- `RealtimeLink` (`worker.relay.link`, I/O): one socket and its channels. Realtime
  allows 100 channels per socket on every plan, so the publisher opens as many links
  as its topics need (up to `relay_max_connections`) and joins channels at
  `relay_joins_per_second` (the project's joins/s limit counts every client).
- `RestSender` (`worker.relay.rest`, I/O): the batch endpoint, used while a topic
  has no joined channel (socket down, join pending, no socket with room).
- `StreamHandle`: what one stream's relay talks to. `send_tokens(batch)` and
  `send_event(event, fields)` queue a message (never block, never drop); `drain()`
  waits until every message of the stream is acknowledged.
- `Publisher`: owns the links, the outboxes, the budget, one sender task per topic
  (take the next message of the outbox, wait for the messages/s budget, send it,
  pipelined up to `relay_max_in_flight` unacked pushes), and the supervisor (assign
  topics to links, pace joins, leave the channels of finished streams at once).

Liveness is the server's word: a link is down when its socket closes (close frame,
or the websockets keepalive when pings go unanswered). An ack that is late because
our loop is busy only makes that one message time out and go again (its timer
allows for the measured loop delay); it never replaces the socket.

Overload: the publisher measures its lag (`lag_s`: event-loop delay, or the age of
the oldest never-sent message). While the loop is late, streams flush less often
(`min_interval_s`) and queued batches are coalesced, so messages per token fall as
load rises; `behind` tells the worker to stop claiming new requests.

State is `PublisherState`, changed only through `_set_state`, which logs transitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

from loguru import logger
from pydantic import SecretStr
from realtime import AsyncRealtimeChannel, RealtimeSubscribeStates
from realtime.types import RealtimeAcknowledgementStatus

from worker.config import Settings
from worker.errors import ConfigError, PublishError
from worker.relay import metrics
from worker.relay.batcher import Batch
from worker.relay.budget import MessageBudget, TokenBucket
from worker.relay.link import RealtimeLink, reason_of
from worker.relay.outbox import Failure, Message, Outbox, StreamLedger, StreamStats
from worker.relay.rest import RestMessage, RestSender
from worker.relay.retry import Action, RetryPolicy
from worker.relay.wire import EVENT_TOKEN, TokenMessage

SUPERVISE_TICK_S = 0.1
ACTIVE_WINDOW_S = 2.0  # a stream counts for the fair share this long after its last token
ACTIVE_RECOUNT_S = 0.05  # how stale that count may be
# A topic with no open stream and nothing queued leaves its channel after this long
# (0: right after the stream's last ack; a new stream on the topic joins again).
TOPIC_LINGER_S = 0.0
JOIN_BURST_S = 0.25  # join bucket capacity, in seconds of rate
LAG_TICK_S = 0.05  # the loop-delay probe's period
LAG_DECAY = 0.9  # per probe: the measured delay decays, so one hiccup fades in ~1 s
OVERLOAD_MIN_LAG_S = 0.02  # loop delay from which streams flush less often
# While the loop is late, all streams together flush about this often, so the cost of
# messages stays bounded as streams are added (tokens per message grow instead) ...
OVERLOAD_MESSAGES_PER_S = 250.0
# ... and each message carries about this many tokens of its stream, however slowly
# the starved loop reads them (tokens per message must grow with load, never shrink) ...
OVERLOAD_TOKENS_PER_MESSAGE = 10.0
# ... but no stream waits longer than this share of `relay_max_lag_s` to flush: a longer
# wait would break the lag bound by itself; past it the worker is behind and stops
# claiming instead (at 1,000 streams a cap of 5 s made every token wait ~2 s).
OVERLOAD_MAX_INTERVAL_SHARE = 0.5
RATE_WINDOW_S = 1.0  # a stream's token rate is measured over windows this long
ACK_TIMER_MAX_EXTENSIONS = 3  # a late loop extends an ack timer at most this often
TIMER_LATE_SHARE = 0.2  # an ack timer firing this share of the timeout late: the loop lagged
RATE_LIMIT_MESSAGES = ("Too many messages per second",)
CHANNEL_LIMIT_CODE = "ChannelRateLimitReached"
RATE_LIMIT_JOIN_CODES = (
    "ConnectionRateLimitReached",
    "ClientJoinRateLimitReached",
    "DatabaseConnectionRateLimitReached",
)

Route = Literal["ws", "rest", "hold"]
log = logger.bind(event="relay.publisher")

__all__ = ["Publisher", "PublisherState", "StreamHandle", "StreamStats", "reason_of"]


class PublisherState(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    CLOSING = "closing"
    CLOSED = "closed"


class StreamHandle:
    """One stream's door to the publisher (see `Publisher.stream`)."""

    def __init__(self, publisher: Publisher, topic: str, ledger: StreamLedger) -> None:
        self._publisher = publisher
        self.topic = topic
        self.ledger = ledger
        self.last_activity = float("-inf")
        self.token_rate: float | None = None  # tokens/s, measured once a window passed
        self._window_start = time.monotonic()
        self._window_tokens = 0
        self.closed = False
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def stream_id(self) -> str:
        return self.ledger.stream_id

    @property
    def next_seq(self) -> int:
        return self.ledger.next_seq

    @property
    def outstanding(self) -> int:
        return self.ledger.outstanding

    @property
    def stats(self) -> StreamStats:
        return self.ledger.stats

    # --- sending ---

    def send_tokens(self, batch: Batch) -> None:
        """Queue one batch as an `llm-token` message (seq fixed at first transmission)."""
        metrics.TOKENS.labels(batch.kind).inc(len(batch.tokens))
        token = TokenMessage(self.stream_id, -1, batch.offset, batch.kind, batch.tokens)
        self._publisher.enqueue(self, EVENT_TOKEN, {}, token)
        self._idle.clear()

    def send_event(self, event: str, fields: dict[str, Any]) -> None:
        """Queue a control event; `v`, `stream` and `seq` are added at first transmission."""
        self._publisher.enqueue(self, event, dict(fields), None)
        self._idle.clear()

    def progressed(self) -> None:
        """Called by the publisher when one of this stream's messages settled."""
        if self.ledger.outstanding <= 0:
            self._idle.set()

    async def drain(self, timeout_s: float | None = None) -> None:
        """Wait until every queued message of this stream is acknowledged."""
        try:
            async with asyncio.timeout(timeout_s):
                while self.outstanding:
                    self._publisher.raise_if_failed()
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
        """One token arrived (feeds the fair share and this stream's measured rate)."""
        self.last_activity = now
        self._window_tokens += 1
        elapsed = now - self._window_start
        if elapsed >= RATE_WINDOW_S:
            self.token_rate = self._window_tokens / elapsed
            self._window_start, self._window_tokens = now, 0

    def min_interval_s(self, now: float) -> float:
        """Flush pacing for this stream's batcher: budget share, or longer under overload."""
        return self._publisher.min_interval_s(now, token_rate=self.token_rate)

    @property
    def unsent(self) -> int:
        return self._publisher.unsent(self)

    def close(self) -> None:
        """Stop counting this stream; queued messages still go out, then the topic retires."""
        if not self.closed:
            self.closed = True
            self._publisher.release(self)


@dataclass(eq=False)
class _Push:
    attempt: int
    push: Any
    timer: asyncio.TimerHandle | None = None
    extensions: int = 0


@dataclass(eq=False)
class _Topic:
    name: str
    outbox: Outbox
    down_since: float
    last_activity: float
    link: RealtimeLink | None = None
    task: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    hold_until: float = 0.0
    handles: set[StreamHandle] = field(default_factory=set)
    pushes: dict[Message, _Push] = field(default_factory=dict)


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
        # realtime-py's own push timeout stays behind ours (which allows for loop delay).
        self._push_timeout_s = math.ceil(settings.relay_ack_timeout_s * 4) + 1
        self._rest = RestSender(
            settings.realtime_url,
            key,
            timeout_s=settings.relay_ack_timeout_s,
            private=settings.relay_private_channels,
        )
        rate = settings.relay_joins_per_second
        self._joins = TokenBucket(rate, max(1.0, rate * JOIN_BURST_S), time.monotonic())
        self.state = PublisherState.IDLE
        self._links: list[RealtimeLink] = []
        self._link_tasks: list[asyncio.Task[None]] = []
        self._topics: dict[str, _Topic] = {}
        self._handles: dict[StreamLedger, StreamHandle] = {}
        self._active: tuple[float, int] = (float("-inf"), 0)  # (counted at, active streams)
        self._supervisor: asyncio.Task[None] | None = None
        self._lag_watch: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._connected = asyncio.Event()
        self._join_hold_until = 0.0
        self._failure: BaseException | None = None
        self._oldest_unsent_s = 0.0
        self.loop_lag_s = 0.0
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
        """Start the supervisor; links connect in the background (sends queue meanwhile)."""
        if self._supervisor is not None:
            return
        await self._rest.start()
        # Streams may register (and queue) before the supervisor task first runs.
        self._set_state(PublisherState.CONNECTING)
        self._add_link()
        self._supervisor = self._spawn(self._supervise(), "relay-publisher-supervisor")
        self._lag_watch = self._spawn(self._watch_lag(), "relay-publisher-lag")

    async def wait_connected(self, timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            await self._connected.wait()

    async def close(self, grace_s: float = 5.0) -> None:
        """Deliver what is queued (up to `grace_s`), then stop tasks and the links."""
        if self.state in (PublisherState.CLOSING, PublisherState.CLOSED):
            return
        self._set_state(PublisherState.CLOSING)
        with contextlib.suppress(TimeoutError, PublishError):
            async with asyncio.timeout(grace_s):
                while any(not t.outbox.empty for t in self._topics.values()):
                    self.raise_if_failed()
                    await asyncio.sleep(0.02)
        tasks = [t.task for t in self._topics.values() if t.task is not None]
        for t in self._topics.values():
            for entry in t.pushes.values():
                _forget_push(entry)
            t.pushes.clear()
            t.outbox.abandon_in_flight()
        tasks += [x for x in (self._supervisor, self._lag_watch) if x is not None]
        tasks += self._link_tasks
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for link in self._links:
            await link.close()
        await self._rest.close()
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
            self.raise_if_failed()
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

    def raise_if_failed(self) -> None:
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

    def _refresh_state(self) -> None:
        if self.state in (PublisherState.CLOSING, PublisherState.CLOSED):
            return
        if all(link.connected for link in self._links):
            self._set_state(PublisherState.CONNECTED)
        elif self.state is PublisherState.CONNECTED:
            self._set_state(PublisherState.DISCONNECTED)

    # --- public figures ---

    @property
    def reconnections(self) -> int:
        return sum(link.reconnections for link in self._links)

    @property
    def clients_created(self) -> int:
        return sum(link.clients_created for link in self._links)

    @property
    def links(self) -> int:
        """Realtime sockets opened so far."""
        return len(self._links)

    @property
    def topics(self) -> list[str]:
        """Topics with a sender (open streams, or messages not yet acknowledged)."""
        return list(self._topics)

    @property
    def open_streams(self) -> int:
        return len(self._handles)

    @property
    def lag_s(self) -> float:
        """How far behind the publisher is: loop delay or the oldest unsent message."""
        return max(self.loop_lag_s, self._oldest_unsent_s)

    @property
    def behind(self) -> bool:
        """True while `lag_s` exceeds `relay_max_lag_s` (stop taking new streams)."""
        return self.lag_s > self.settings.relay_max_lag_s

    def describe(self) -> dict[str, Any]:
        """Diagnostics: state, links, and per topic the route and the queue (no payloads)."""
        now = time.monotonic()
        topics: dict[str, Any] = {}
        for name, t in self._topics.items():
            topics[name] = {
                "route": self._route(t, now),
                "link": None if t.link is None else t.link.name,
                "channel": None if t.link is None else t.link.describe(name),
                "pending": t.outbox.pending,
                "parked": t.outbox.parked,
                "in_flight": t.outbox.in_flight,
                "next_ready_in_s": t.outbox.next_ready_in(now),
                "sender_alive": t.task is not None and not t.task.done(),
            }
        return {
            "state": self.state.value,
            "links": [
                {"name": k.name, "state": k.state.value, "channels": k.occupancy}
                for k in self._links
            ],
            "reconnections": self.reconnections,
            "clients_created": self.clients_created,
            "lag_s": round(self.lag_s, 3),
            "topics": topics,
        }

    # --- streams ---

    def stream(self, topic: str, stream_id: str, *, start_seq: int = 0) -> StreamHandle:
        """Register one stream on `topic` (sub-topic, without `realtime:`)."""
        if self.state in (PublisherState.CLOSING, PublisherState.CLOSED, PublisherState.IDLE):
            raise PublishError(f"publisher is {self.state.value}", topic=topic)
        handle = StreamHandle(self, topic, StreamLedger(stream_id, next_seq=start_seq))
        t = self._topic(topic)
        t.handles.add(handle)
        self._handles[handle.ledger] = handle
        return handle

    def release(self, handle: StreamHandle) -> None:
        """The stream ended: it no longer counts; its topic retires once acknowledged."""
        t = self._topics.get(handle.topic)
        if t is not None:
            t.handles.discard(handle)
            t.last_activity = time.monotonic()
        if handle.outstanding <= 0:
            self._handles.pop(handle.ledger, None)
        self._active = (float("-inf"), 0)  # a stream fewer: count again
        self._wake.set()

    def active_streams(self, now: float) -> int:
        """Streams that had a token within ACTIVE_WINDOW_S. Counted at most once per
        ACTIVE_RECOUNT_S: every stream asks for it, so a count per ask cost O(streams²)."""
        at, count = self._active
        if 0 <= now - at < ACTIVE_RECOUNT_S:
            return count
        count = sum(
            1
            for h in self._handles.values()
            if not h.closed and now - h.last_activity <= ACTIVE_WINDOW_S
        )
        self._active = (now, count)
        return count

    def min_interval_s(self, now: float, *, token_rate: float | None = None) -> float:
        """Shortest flush interval of a stream (reading `token_rate` tokens/s).

        The budget's fair share; while the loop is late, also long enough that all
        streams together send ~OVERLOAD_MESSAGES_PER_S and each message carries
        ~OVERLOAD_TOKENS_PER_MESSAGE tokens (capped at OVERLOAD_MAX_INTERVAL_SHARE of
        `relay_max_lag_s`).
        """
        active = self.active_streams(now)
        budget = self.budget.min_interval_s(max(1, active), now)
        overload = 0.0
        if self.loop_lag_s >= OVERLOAD_MIN_LAG_S:
            share = active / OVERLOAD_MESSAGES_PER_S
            fill = OVERLOAD_TOKENS_PER_MESSAGE / token_rate if token_rate else 0.0
            cap = OVERLOAD_MAX_INTERVAL_SHARE * self.settings.relay_max_lag_s
            overload = min(cap, max(2 * self.loop_lag_s, share, fill))
        return max(budget, overload)

    def enqueue(
        self, handle: StreamHandle, event: str, fields: dict[str, Any], token: TokenMessage | None
    ) -> None:
        self.raise_if_failed()
        t = self._topic(handle.topic)
        now = time.monotonic()
        t.last_activity = now
        t.outbox.enqueue(handle.ledger, event, fields, token, now)
        t.wake.set()

    def unsent(self, handle: StreamHandle) -> int:
        t = self._topics.get(handle.topic)
        return 0 if t is None else t.outbox.unsent(handle.ledger)

    def _topic(self, name: str) -> _Topic:
        t = self._topics.get(name)
        if t is None:
            now = time.monotonic()
            outbox = Outbox(
                self.policy,
                max_message_bytes=self.settings.relay_max_message_bytes,
                coalesce=self.settings.relay_adaptive_batching,
            )
            t = self._topics[name] = _Topic(name, outbox, down_since=now, last_activity=now)
            t.task = self._spawn(self._send_loop(t), f"relay-sender:{name}")
            self._wake.set()
        return t

    # --- routing ---

    def _route(self, t: _Topic, now: float) -> Route:
        if now < t.hold_until:
            return "hold"
        link = t.link
        if link is not None and link.channel_for(t.name) is not None:
            return "ws"
        if not self.settings.relay_rest_fallback:
            return "hold"
        # A join normally takes milliseconds: wait for one under way rather than mix
        # paths; but one still queued behind the joins/s pacing may take seconds.
        if link is None or not link.connected or not link.join_started(t.name):
            return "rest"
        if now - t.down_since > self.settings.relay_ack_timeout_s:
            return "rest"
        return "hold"

    # --- one topic's sender ---

    async def _send_loop(self, t: _Topic) -> None:
        max_in_flight = self.settings.relay_max_in_flight
        while True:
            now = time.monotonic()
            if t.outbox.in_flight >= max_in_flight:
                await _sleep(t.wake, self.settings.relay_ack_timeout_s)  # an ack wakes us
                continue
            if t.outbox.ready(now) is None:
                await _sleep(t.wake, t.outbox.next_ready_in(now) or 1.0)
                continue
            if self._route(t, now) == "hold":
                await _sleep(t.wake, SUPERVISE_TICK_S)
                continue
            await self.budget.acquire()
            now = time.monotonic()
            route = self._route(t, now)
            if route == "hold":
                continue  # the budget unit is lost: rare (a hold began while waiting)
            msg = t.outbox.take(now)  # coalesces what queued meanwhile
            if msg is None:
                continue
            if route == "ws":
                await self._send_ws(t, msg)
            else:
                await self._send_rest(t, msg)

    async def _send_ws(self, t: _Topic, msg: Message) -> None:
        assert msg.payload is not None
        attempt = msg.attempt
        channel = None if t.link is None else t.link.channel_for(t.name)
        if channel is None:
            self._settle(t, msg, attempt, "disconnected")
            return
        self._count_first_send(msg)
        self.max_in_flight_seen = max(self.max_in_flight_seen, t.outbox.in_flight)
        try:
            push = await channel.push(
                "broadcast",
                {"type": "broadcast", "event": msg.event, "payload": msg.payload},
                self._push_timeout_s,
            )
        except Exception as exc:  # realtime-py raises bare Exceptions; the retry handles all
            log.bind(topic=t.name).opt(exception=exc).debug("push raised")
            self._settle(t, msg, attempt, "error")
            return
        entry = t.pushes[msg] = _Push(attempt, push)

        def on_ok(_response: object) -> None:
            self._settle(t, msg, attempt, "ok")

        def on_error(response: object) -> None:
            log.bind(topic=t.name).debug("ack error: {}", response)
            self._settle(t, msg, attempt, "error")

        def on_timeout() -> None:
            self._settle(t, msg, attempt, "timeout")

        push.receive(RealtimeAcknowledgementStatus.Ok, on_ok)
        push.receive(RealtimeAcknowledgementStatus.Error, on_error)
        push.receive(RealtimeAcknowledgementStatus.Timeout, on_timeout)
        if t.pushes.get(msg) is entry:
            self._arm_ack_timer(t, msg, entry, channel)

    def _arm_ack_timer(
        self, t: _Topic, msg: Message, entry: _Push, channel: AsyncRealtimeChannel
    ) -> None:
        loop = asyncio.get_running_loop()

        def expired() -> None:
            if t.pushes.get(msg) is not entry:
                return
            timeout_s = self.settings.relay_ack_timeout_s
            waited = time.monotonic() - msg.sent_at
            late = 0.0 if entry.timer is None else loop.time() - entry.timer.when()
            allowance = timeout_s + 2 * self.loop_lag_s
            if entry.extensions < ACK_TIMER_MAX_EXTENSIONS and (
                late > timeout_s * TIMER_LATE_SHARE or waited < allowance
            ):
                # Our loop was late (this very timer fired late, or the loop has been
                # slow): the reply may be waiting in the socket buffer, unread.
                entry.extensions += 1
                entry.timer = loop.call_later(max(allowance - waited, timeout_s), expired)
                return
            self._settle(t, msg, entry.attempt, "timeout")

        entry.timer = loop.call_later(self.settings.relay_ack_timeout_s, expired)

    async def _send_rest(self, t: _Topic, msg: Message) -> None:
        assert msg.payload is not None
        attempt = msg.attempt
        self._count_first_send(msg)
        outcome = await self._rest.submit(RestMessage(t.name, msg.event, msg.payload))
        if outcome == "ok":
            msg.ledger.stats.rest_messages += 1
            self._settle(t, msg, attempt, "ok", route="rest")
            return
        if outcome == "rate_limited":
            metrics.RATE_LIMITED.inc()
            self.budget.penalize()
        self._settle(t, msg, attempt, "rest")

    @staticmethod
    def _count_first_send(msg: Message) -> None:
        if msg.attempt == 1 and msg.token is not None:
            metrics.TOKENS_PER_MESSAGE.observe(len(msg.token.tokens))

    def _settle(
        self, t: _Topic, msg: Message, attempt: int, outcome: str, *, route: str = "ws"
    ) -> None:
        entry = t.pushes.get(msg)
        if entry is not None and entry.attempt == attempt:
            del t.pushes[msg]
            if entry.timer is not None:
                entry.timer.cancel()
            if outcome != "ok":
                _forget_push(entry)
        now = time.monotonic()
        if outcome == "ok":
            if not t.outbox.acked(msg, attempt):
                return
            metrics.ACK_SECONDS.observe(now - msg.sent_at)
            metrics.MESSAGES.labels(msg.event, route).inc()
            t.last_activity = now
            self._progressed(msg.ledger)
        else:
            failure = t.outbox.failed(msg, attempt, outcome, now)
            if failure is None:
                return
            self._count_failure(t, failure)
        t.wake.set()

    def _progressed(self, ledger: StreamLedger) -> None:
        handle = self._handles.get(ledger)
        if handle is None:
            return
        handle.progressed()
        if handle.closed and ledger.outstanding <= 0:
            del self._handles[ledger]

    def _count_failure(self, t: _Topic, failure: Failure) -> None:
        metrics.FLUSH_FAILURES.labels(failure.reason).inc()
        decision = failure.decision
        if decision is None:
            return
        if decision.action is Action.SPLIT:
            metrics.FALLBACKS.inc()
            token = failure.message.token
            log.bind(topic=t.name).warning(
                "batch at offset {} failed {} times: token-by-token fallback",
                None if token is None else token.offset,
                failure.message.failures,
            )
        elif decision.action is Action.RETRY:
            metrics.RETRIES.inc()
        else:
            metrics.PARKED.inc()

    def _fail_in_flight(self, t: _Topic, reason: str) -> None:
        for entry in t.pushes.values():
            if entry.timer is not None:
                entry.timer.cancel()
            _forget_push(entry)
        t.pushes.clear()
        for failure in t.outbox.fail_in_flight(reason, time.monotonic()):
            self._count_failure(t, failure)
        t.wake.set()

    # --- links ---

    def _add_link(self) -> RealtimeLink:
        link: RealtimeLink

        def on_channel(topic: str, status: RealtimeSubscribeStates, reason: str) -> None:
            self._on_channel_state(link, topic, status, reason)

        link = RealtimeLink(
            f"rt-{len(self._links)}",
            self.settings,
            self._api_key,
            on_channel=on_channel,
            on_down=self._on_link_down,
            on_up=self._on_link_up,
            base_s=self.policy.base_s,
            cap_s=self.policy.cap_s,
        )
        link.connect_not_before = self._join_hold_until
        self._links.append(link)
        self._link_tasks.append(self._spawn(link.run(time.monotonic), f"relay-{link.name}"))
        self._refresh_state()
        return link

    def _on_link_up(self, link: RealtimeLink) -> None:
        self._refresh_state()
        self._wake.set()

    def _on_link_down(self, link: RealtimeLink) -> None:
        now = time.monotonic()
        for name in link.topics():
            t = self._topics.get(name)
            if t is not None and t.link is link:
                t.down_since = now
                self._fail_in_flight(t, "disconnected")
        self._refresh_state()

    def _on_channel_state(
        self, link: RealtimeLink, topic: str, status: RealtimeSubscribeStates, reason: str
    ) -> None:
        t = self._topics.get(topic)
        if t is None or t.link is not link:
            return  # a retired or moved topic
        now = time.monotonic()
        tlog = log.bind(topic=topic, link=link.name)
        if status is RealtimeSubscribeStates.SUBSCRIBED:
            tlog.debug("channel joined")
            t.down_since = float("inf")
            t.outbox.channel_up()
            t.wake.set()
            return
        t.down_since = min(t.down_since, now)
        if status is RealtimeSubscribeStates.CLOSED:
            tlog.warning("channel closed")
            self._fail_in_flight(t, "channel_closed")
            self._wake.set()
            return
        rejoin_s = self.settings.relay_rate_limit_rejoin_s
        if reason.startswith(RATE_LIMIT_MESSAGES):
            metrics.RATE_LIMITED.inc()
            self.budget.penalize(now)
            t.hold_until = now + rejoin_s
            link.hold_rejoin(topic, t.hold_until)
        elif reason.startswith(CHANNEL_LIMIT_CODE):
            # The server counts more channels on this socket than we do (leaves not
            # yet done): this link is full; the topic moves to another one.
            metrics.RATE_LIMITED.inc()
            link.capacity = max(1, link.occupancy - 1)
            link.release(topic, self._spawn)
            t.link = None
        elif reason.startswith(RATE_LIMIT_JOIN_CODES):
            metrics.RATE_LIMITED.inc()
            self._join_hold_until = now + rejoin_s
            for k in self._links:
                k.connect_not_before = self._join_hold_until
        tlog.warning("channel {}: {}", status.value, reason or "-")
        self._fail_in_flight(t, "channel_error")

    # --- the supervisor ---

    async def _supervise(self) -> None:
        while self.state is not PublisherState.CLOSING:
            now = time.monotonic()
            self._retire_finished_topics(now)
            self._assign_topics()
            self._pace_joins(now)
            self._measure(now)
            await _sleep(self._wake, SUPERVISE_TICK_S)

    async def _watch_lag(self) -> None:
        """Loop delay: how late a short sleep wakes up (decays, so hiccups fade)."""
        while True:
            start = time.monotonic()
            await asyncio.sleep(LAG_TICK_S)
            late = max(0.0, time.monotonic() - start - LAG_TICK_S)
            self.loop_lag_s = max(late, self.loop_lag_s * LAG_DECAY)

    def _measure(self, now: float) -> None:
        oldest = 0.0
        backlog = 0
        for t in self._topics.values():
            backlog += t.outbox.pending + t.outbox.in_flight
            oldest = max(oldest, t.outbox.oldest_unsent_age(now))
        self._oldest_unsent_s = oldest
        metrics.BACKLOG.set(backlog)

    def _retire_finished_topics(self, now: float) -> None:
        """Leave the channels of topics whose streams ended and whose messages are acked."""
        for name, t in list(self._topics.items()):
            if t.handles or not t.outbox.empty or now - t.last_activity < self.topic_linger_s:
                continue
            del self._topics[name]
            if t.task is not None:
                t.task.cancel()
            if t.link is not None:
                t.link.release(name, self._spawn)
            log.bind(topic=name).debug("topic finished: channel left")

    def _assign_topics(self) -> None:
        for name, t in self._topics.items():
            if t.link is not None:
                continue
            link = next((k for k in self._links if k.has_room), None)
            if link is None and len(self._links) < self.settings.relay_max_connections:
                link = self._add_link()
            if link is None:
                continue  # every socket is full: REST until a slot frees
            link.assign(name)
            t.link = link
            t.down_since = min(t.down_since, time.monotonic())

    def _pace_joins(self, now: float) -> None:
        if now < self._join_hold_until:
            return
        for link in self._links:
            for topic in link.needs_join(now):
                if self._joins.wait_time(1, now) > 0:
                    return
                self._joins.take(1, now)
                link.join(topic, self._spawn)


def _forget_push(entry: _Push) -> None:
    """Stop realtime-py's own timer for a push whose reply we no longer wait for."""
    if entry.timer is not None:
        entry.timer.cancel()
    push = entry.push
    push.destroy()
    if push.ref is not None:
        push.channel.messages_waiting_for_ack.pop(push.ref, None)


async def _sleep(event: asyncio.Event, seconds: float) -> None:
    event.clear()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
