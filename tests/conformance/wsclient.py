"""A raw Phoenix client for conformance tests: frames exactly as §1 and §7 describe."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlencode

import websockets
from websockets.asyncio.client import ClientConnection

TIMEOUT_S = 5.0


class RawClient:
    def __init__(self, ws: ClientConnection, vsn: str) -> None:
        self.ws = ws
        self.vsn = vsn
        self._ref = 0

    @classmethod
    async def connect(
        cls,
        base_url: str,
        apikey: str | None,
        *,
        vsn: str | None = "1.0.0",
        path: str = "/realtime/v1/websocket",
        **kwargs: Any,
    ) -> RawClient:
        params = {}
        if apikey is not None:
            params["apikey"] = apikey
        if vsn is not None:
            params["vsn"] = vsn
        url = base_url.replace("http://", "ws://") + path + "?" + urlencode(params)
        ws = await asyncio.wait_for(websockets.connect(url, **kwargs), TIMEOUT_S)
        return cls(ws, vsn or "1.0.0")

    def next_ref(self) -> str:
        self._ref += 1
        return str(self._ref)

    async def send(
        self,
        topic: str,
        event: str,
        payload: Any,
        *,
        ref: str | None = None,
        join_ref: str | None = None,
    ) -> str | None:
        if self.vsn.startswith("2"):
            await self.ws.send(json.dumps([join_ref, ref, topic, event, payload]))
        else:
            await self.ws.send(
                json.dumps(
                    {
                        "topic": topic,
                        "event": event,
                        "payload": payload,
                        "ref": ref,
                        "join_ref": join_ref,
                    }
                )
            )
        return ref

    async def recv(self, wait_s: float = TIMEOUT_S) -> Any:
        raw = await asyncio.wait_for(self.ws.recv(), wait_s)
        return raw if isinstance(raw, bytes) else json.loads(raw)

    async def recv_raw(self, wait_s: float = TIMEOUT_S) -> str | bytes:
        return await asyncio.wait_for(self.ws.recv(), wait_s)

    async def expect_silence(self, seconds: float) -> None:
        try:
            got = await asyncio.wait_for(self.ws.recv(), seconds)
        except TimeoutError:
            return
        raise AssertionError(f"expected no frame, got {got!r}")

    async def join(
        self,
        sub: str,
        *,
        ack: bool = False,
        self_: bool = False,
        private: bool = False,
        access_token: str | None = None,
        extra_config: dict[str, Any] | None = None,
    ) -> tuple[str, Any]:
        """Send a phx_join like realtime-py does (§2) and return (join_ref, reply)."""
        ref = self.next_ref()
        payload: dict[str, Any] = {
            "config": {
                "broadcast": {"ack": ack, "self": self_},
                "presence": {"key": "", "enabled": False},
                "private": private,
                "postgres_changes": [],
                **(extra_config or {}),
            }
        }
        if access_token:
            payload["access_token"] = access_token
        await self.send(f"realtime:{sub}", "phx_join", payload, ref=ref, join_ref=ref)
        return ref, await self.recv()

    async def close(self) -> None:
        await self.ws.close()
