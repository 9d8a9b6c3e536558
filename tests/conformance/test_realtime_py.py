"""The official realtime-py client (2.34.1, protocol 1.0.0) against the local server."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from realtime import AsyncRealtimeClient, RealtimeSubscribeStates

from devstack.realtime import RealtimeServer

pytestmark = pytest.mark.integration

WAIT_S = 5.0


async def _subscribed(client: AsyncRealtimeClient, sub: str, **config: Any) -> Any:
    params: Any = {
        "config": {
            "broadcast": {"ack": config.get("ack", False), "self": config.get("self", False)},
            "presence": {"key": "", "enabled": False},
            "private": config.get("private", False),
        }
    }
    states: list[RealtimeSubscribeStates] = []
    channel = client.channel(sub, params)
    await asyncio.wait_for(channel.subscribe(lambda s, e: states.append(s)), WAIT_S)
    assert states == [RealtimeSubscribeStates.SUBSCRIBED]
    return channel


async def test_realtime_py_acked_send_reaches_another_client(
    server: RealtimeServer, anon_key: str
) -> None:
    sender = AsyncRealtimeClient(server.url + "/realtime/v1", token=anon_key)
    receiver = AsyncRealtimeClient(server.url + "/realtime/v1", token=anon_key)
    try:
        got: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        rx = receiver.channel("room1")
        rx.on_broadcast("tok", lambda p: got.put_nowait(dict(p)))
        await asyncio.wait_for(rx.subscribe(), WAIT_S)
        tx = await _subscribed(sender, "room1", ack=True)

        acked: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        push = await tx.push(
            "broadcast", {"type": "broadcast", "event": "tok", "payload": {"seq": 1}}
        )
        push.receive("ok", lambda resp: acked.set_result(resp))
        push.receive("error", lambda resp: acked.set_exception(AssertionError(resp)))
        await asyncio.wait_for(acked, WAIT_S)

        message = await asyncio.wait_for(got.get(), WAIT_S)
        assert message["event"] == "tok"
        assert message["payload"] == {"seq": 1}
        assert server.stats.client_broadcasts == 1
        assert server.stats.deliveries == 1
    finally:
        await sender.close()
        await receiver.close()
