"""One Realtime socket (a realtime-py client) and the channels joined on it: an I/O shell.

realtime-py's own reconnect loop stops for good after 5 tries and rejoins channels at
once (ignoring the 30 s rate-limit delay), so the client is created with
`auto_reconnect=False` and `RealtimeLink.run()` reconnects with our backoff, forever,
replacing the client after `CLIENT_RECREATE_AFTER` consecutive failures.

Liveness is the server's word, never our queueing delay: the link is down when the
socket is closed — by a close frame, or by the websockets keepalive when the server
stops answering pings. Acks that come late because our loop is busy are not a death.

Channels are joined only when the owner says so (`join`), so that the owner can pace
joins against the project's joins/s limit; `needs_join` lists the assigned topics
without a live channel. A topic the owner releases is left at once (`phx_leave`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loguru import logger
from realtime import AsyncRealtimeChannel, AsyncRealtimeClient, RealtimeSubscribeStates
from realtime.types import RealtimeChannelOptions

from worker.backoff import backoff_delay
from worker.config import Settings
from worker.relay import metrics

CLIENT_RECREATE_AFTER = 5  # consecutive connect failures (realtime-py's own give-up point)
# realtime-py's join timeout (its client timeout). A join that times out locally but
# succeeds on the server is followed by realtime-py's own rejoin; the server answers
# that duplicate with phx_close of the first, which V1 clients cannot tell from a close
# of the new one (ref §8): the channel closes locally, every rejoin repeats it. Private
# joins check RLS in the database and take seconds under load, so wait long.
JOIN_TIMEOUT_S = 30
WATCH_TICK_S = 0.1

# topic, status, reason (the server's reason string, or "")
ChannelListener = Callable[[str, RealtimeSubscribeStates, str], None]
log = logger.bind(event="relay.link")


class LinkState(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    CLOSED = "closed"


@dataclass
class _Channel:
    channel: AsyncRealtimeChannel | None = None
    join_task: asyncio.Task[None] | None = None
    rejoin_not_before: float = 0.0
    closed_reason: str = ""


def reason_of(err: Exception | None) -> str:
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


class RealtimeLink:
    """One socket; `run()` is its supervisor task (see module docstring)."""

    def __init__(
        self,
        name: str,
        settings: Settings,
        api_key: str,
        *,
        on_channel: ChannelListener,
        on_down: Callable[[RealtimeLink], None],
        on_up: Callable[[RealtimeLink], None],
        base_s: float,
        cap_s: float,
    ) -> None:
        self.name = name
        self.settings = settings
        self._api_key = api_key
        self._on_channel = on_channel
        self._on_down = on_down
        self._on_up = on_up
        self._base_s, self._cap_s = base_s, cap_s
        self.state = LinkState.IDLE
        self.capacity = settings.relay_channels_per_connection
        self.client = self._new_client()
        self.clients_created = 1
        self.reconnections = 0
        self.connect_not_before = 0.0  # set by the owner after a join rate limit
        self._channels: dict[str, _Channel] = {}
        self._leaving: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self.log = log.bind(link=name)

    # --- topics ---

    @property
    def occupancy(self) -> int:
        """Channel slots in use on the server: assigned topics and leaves in progress."""
        return len(self._channels) + len(self._leaving)

    @property
    def has_room(self) -> bool:
        return self.occupancy < self.capacity and self.state is not LinkState.CLOSED

    @property
    def connected(self) -> bool:
        return self.state is LinkState.CONNECTED and self.client.is_connected

    def assign(self, topic: str) -> None:
        self._channels.setdefault(topic, _Channel())

    def channel_for(self, topic: str) -> AsyncRealtimeChannel | None:
        """The topic's joined channel on the current client, or None."""
        state = self._channels.get(topic)
        channel = None if state is None else state.channel
        if (
            channel is None
            or not self.connected
            or not channel.is_joined
            or self.client.channels.get(channel.topic) is not channel
        ):
            return None
        return channel

    def owns(self, topic: str, channel_topic: str) -> bool:
        state = self._channels.get(topic)
        return (
            state is not None
            and state.channel is not None
            and (state.channel.topic == channel_topic)
        )

    def needs_join(self, now: float) -> list[str]:
        """Assigned topics with no live channel and no join under way, due now."""
        if not self.connected:
            return []
        out = []
        for topic, state in self._channels.items():
            channel = state.channel
            alive = channel is not None and self.client.channels.get(channel.topic) is channel
            joining = state.join_task is not None and not state.join_task.done()
            if not alive and not joining and now >= state.rejoin_not_before:
                out.append(topic)
        return out

    def join_started(self, topic: str) -> bool:
        """A join of `topic` was sent on the current client (it may still be pending)."""
        state = self._channels.get(topic)
        return state is not None and state.channel is not None

    def hold_rejoin(self, topic: str, until: float) -> None:
        state = self._channels.get(topic)
        if state is not None:
            state.rejoin_not_before = until

    def join(self, topic: str, spawn: Callable[[Any, str], asyncio.Task[None]]) -> None:
        state = self._channels[topic]
        if state.channel is not None:
            metrics.CHANNEL_REJOINS.labels(state.closed_reason or "closed").inc()
            self.log.bind(topic=topic).info("channel closed by the server: joining again")
        state.join_task = spawn(self._join(topic, state), f"relay-join:{topic}")

    def release(self, topic: str, spawn: Callable[[Any, str], asyncio.Task[None]]) -> None:
        """Forget `topic` and leave its channel (unsubscribe = phx_leave)."""
        state = self._channels.pop(topic, None)
        if state is None:
            return
        if state.join_task is not None:
            state.join_task.cancel()
        channel = state.channel
        if channel is not None and self.client.channels.get(channel.topic) is channel:
            task = spawn(self._leave(channel), f"relay-leave:{topic}")
            self._leaving.add(task)
            task.add_done_callback(self._leaving.discard)

    def topics(self) -> list[str]:
        return list(self._channels)

    def describe(self, topic: str) -> str | None:
        state = self._channels.get(topic)
        if state is None or state.channel is None:
            return None
        return str(state.channel.state.value)

    # --- channels ---

    def _channel_params(self) -> RealtimeChannelOptions:
        return {
            "config": {
                "broadcast": {"ack": True, "self": False},
                "presence": {"key": "", "enabled": False},
                "private": self.settings.relay_private_channels,
            }
        }

    async def _join(self, topic: str, state: _Channel) -> None:
        channel = self.client.channel(topic, self._channel_params())
        state.channel = channel
        state.closed_reason = ""

        def on_state(status: RealtimeSubscribeStates, err: Exception | None) -> None:
            if self._channels.get(topic) is not state or state.channel is not channel:
                return  # a released topic or a replaced channel
            reason = reason_of(err)
            if status is not RealtimeSubscribeStates.SUBSCRIBED:
                state.closed_reason = (
                    reason.split(":", 1)[0][:60] if reason else state.closed_reason or status.value
                )
            self._on_channel(topic, status, reason)

        try:
            await channel.subscribe(on_state)
        except Exception as exc:  # realtime-py raises bare Exceptions (not connected...)
            self.log.bind(topic=topic).warning("subscribe failed: {}", type(exc).__name__)

    async def _leave(self, channel: AsyncRealtimeChannel) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.settings.relay_ack_timeout_s * 2 + 1):
                await channel.unsubscribe()

    # --- the socket ---

    def _new_client(self) -> AsyncRealtimeClient:
        return AsyncRealtimeClient(
            self.settings.realtime_url,
            token=self._api_key,
            auto_reconnect=False,
            timeout=max(JOIN_TIMEOUT_S, math.ceil(2 * self.settings.relay_ack_timeout_s)),
        )

    def _set_state(self, state: LinkState) -> None:
        if state is not self.state:
            self.log.info("link {} -> {}", self.state.value, state.value)
            self.state = state

    def wake(self) -> None:
        self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    async def run(self, loop_time: Callable[[], float]) -> None:
        """Keep the socket connected, forever (cancel to stop)."""
        failures = 0
        while self.state is not LinkState.CLOSED:
            if self.state is LinkState.CONNECTED:
                if self.client.is_connected:
                    await self._sleep(WATCH_TICK_S)
                    continue
                await self._lost()
                continue
            wait = max(0.0, self.connect_not_before - loop_time())
            if failures:
                wait = max(wait, backoff_delay(failures, base_s=self._base_s, cap_s=self._cap_s))
            if wait:
                await self._sleep(wait)
            failures = await self._connect_once(failures)

    async def _connect_once(self, failures: int) -> int:
        self._set_state(LinkState.CONNECTING)
        try:
            async with asyncio.timeout(self.settings.relay_ack_timeout_s * 2 + 1):
                await self.client.connect()
        except Exception as exc:  # connect() raises bare Exceptions of websockets/OS
            failures += 1
            metrics.RECONNECTIONS.labels("error").inc()
            self.log.warning("connect failed ({} in a row): {}", failures, type(exc).__name__)
            self._set_state(LinkState.DISCONNECTED)
            if failures % CLIENT_RECREATE_AFTER == 0:
                await self._recreate_client("connect failures")
            return failures
        self.reconnections += 1
        metrics.RECONNECTIONS.labels("ok").inc()
        self._set_state(LinkState.CONNECTED)
        self._on_up(self)
        return 0

    async def _lost(self) -> None:
        self.log.warning("socket closed by the server or the network")
        self._set_state(LinkState.DISCONNECTED)
        self._on_down(self)
        # A fresh client: the old one would rejoin its errored channels itself on
        # connect(), all at once; ours are joined again by the owner, paced.
        await self._recreate_client("socket closed")

    async def _recreate_client(self, why: str) -> None:
        metrics.CLIENT_RECREATED.inc()
        self.log.warning("replacing the realtime client: {}", why)
        old = self.client
        self.client = self._new_client()
        self.clients_created += 1
        for state in self._channels.values():
            if state.join_task is not None:
                state.join_task.cancel()
            state.channel = None
            state.join_task = None
        await _close_client(old)

    async def close(self) -> None:
        self._set_state(LinkState.CLOSED)
        for state in self._channels.values():
            if state.join_task is not None:
                state.join_task.cancel()
        for task in list(self._leaving):
            task.cancel()
        await _close_client(self.client)


async def _close_client(client: AsyncRealtimeClient) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(2.0):
            await client.close()
