"""Shared pieces of the relay integration tests: a local Realtime server, an independent
realtime-py subscriber that reassembles streams with the client rule, token sources."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from realtime import AsyncRealtimeClient, RealtimeSubscribeStates

from devstack.realtime import RealtimeServer
from worker.config import Settings
from worker.relay.reassembly import StreamReassembly, TopicReassembly
from worker.relay.wire import TokenMessage, parse_message
from worker.upstream.events import Finished, Status, Token, UpstreamEvent

WAIT_S = 10.0


def relay_settings(server: RealtimeServer, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "supabase_url": server.url,
        "relay_private_channels": False,
        "relay_ack_timeout_s": 0.5,
        "relay_retry_base_ms": 20.0,
        "relay_retry_cap_s": 0.4,
        "relay_rate_limit_rejoin_s": 0.3,
        "relay_messages_per_second": 100_000.0,
        "relay_checkpoint_interval_s": 0.2,
        "relay_drain_timeout_s": 30.0,
        "relay_max_batch_delay_ms": 50.0,
    }
    values.update(overrides)
    return Settings(**values)


class Subscriber:
    """An independent realtime-py client: one public channel per topic, client rule applied."""

    def __init__(self, server: RealtimeServer, key: str) -> None:
        self.client = AsyncRealtimeClient(server.url + "/realtime/v1", token=key)
        self.topics: dict[str, TopicReassembly] = {}
        self.received_at: dict[tuple[str, int], float] = {}  # (stream, offset) -> first seen
        self.messages = 0
        self.changed = asyncio.Event()

    async def join(self, topic: str) -> None:
        params: Any = {
            "config": {
                "broadcast": {"ack": False, "self": False},
                "presence": {"key": "", "enabled": False},
                "private": False,
            }
        }
        reassembly = self.topics.setdefault(topic, TopicReassembly())
        channel = self.client.channel(topic, params)

        def on_message(payload: Any) -> None:
            self.messages += 1
            msg = parse_message(payload["event"], payload["payload"])
            if isinstance(msg, TokenMessage):
                now = time.monotonic()
                for i in range(len(msg.tokens)):
                    self.received_at.setdefault((msg.stream, msg.offset + i), now)
            reassembly.apply(msg)
            self.changed.set()

        channel.on_broadcast("*", on_message)
        states: list[RealtimeSubscribeStates] = []
        await asyncio.wait_for(channel.subscribe(lambda s, e: states.append(s)), WAIT_S)
        assert states == [RealtimeSubscribeStates.SUBSCRIBED]

    def stream(self, topic: str, stream_id: str) -> StreamReassembly:
        return self.topics[topic].streams[stream_id]

    async def wait_until(self, condition: Callable[[], bool], timeout_s: float) -> None:
        """Wait (bounded) until `condition()` holds; re-checked on every message."""
        async with asyncio.timeout(timeout_s):
            while not condition():
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.1):
                        await self.changed.wait()

    async def wait_complete(self, topic: str, stream_id: str, timeout_s: float = WAIT_S) -> None:
        def complete() -> bool:
            state = self.topics[topic].streams.get(stream_id)
            return state is not None and state.complete

        await self.wait_until(complete, timeout_s)

    async def close(self) -> None:
        await self.client.close()


def words(n: int, *, prefix: str = "w") -> list[str]:
    return [f"{prefix}{i} " for i in range(n)]


async def token_source(
    content: list[str],
    *,
    reasoning: list[str] = (),  # type: ignore[assignment]
    per_token_s: float = 0.0,
    pause_at: dict[int, float] | None = None,
    statuses: dict[int, Status] | None = None,
    produced_at: dict[int, float] | None = None,
    finish: bool = True,
) -> AsyncIterator[UpstreamEvent]:
    """Reasoning tokens, then content tokens; optional pacing, pauses and status events."""
    tokens = [Token("reasoning", t) for t in reasoning] + [Token("content", t) for t in content]
    for i, token in enumerate(tokens):
        if pause_at and i in pause_at:
            await asyncio.sleep(pause_at[i])
        if statuses and i in statuses:
            yield statuses[i]
        if produced_at is not None:
            produced_at[i] = time.monotonic()
        yield token
        if per_token_s:
            await asyncio.sleep(per_token_s)
        elif i % 50 == 0:
            await asyncio.sleep(0)
    if finish:
        yield Finished("stop", usage={"completion_tokens": len(tokens)})


def publisher_sockets(server: RealtimeServer) -> list[Any]:
    """The server-side sessions of the worker (service_role key)."""
    return [
        sock
        for tenant in server.tenants.values()
        for sock in tenant.sockets
        if sock.apikey_claims.get("role") == "service_role"
    ]
