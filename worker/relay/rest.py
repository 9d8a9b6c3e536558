"""The REST sender: `POST /api/broadcast` (the batch endpoint), a thin I/O shell.

One request carries many messages, of any topics (ref §4 A): 202 is acceptance of all
of them; 429 means the project's rate counter is over its limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import httpx
from loguru import logger

from worker.relay import metrics

RestOutcome = Literal["ok", "error", "rate_limited"]
log = logger.bind(event="relay.rest")


@dataclass(frozen=True, slots=True)
class RestMessage:
    topic: str
    event: str
    payload: dict[str, Any]


class RestSender:
    """Sends broadcasts through the batch endpoint; `start()` before, `close()` after."""

    def __init__(self, url: str, api_key: str, *, timeout_s: float, private: bool) -> None:
        self.url = url + "/api/broadcast"
        self.private = private
        self._headers = {"apikey": api_key, "Authorization": f"Bearer {api_key}"}
        self._timeout_s = timeout_s
        self._http: httpx.AsyncClient | None = None

    async def start(self) -> None:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self._timeout_s)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def send(self, messages: list[RestMessage]) -> RestOutcome:
        """POST `messages` in one request; the outcome covers all of them."""
        assert self._http is not None, "RestSender.start() first"
        body = {
            "messages": [
                {"topic": m.topic, "event": m.event, "payload": m.payload, "private": self.private}
                for m in messages
            ]
        }
        try:
            response = await self._http.post(self.url, json=body, headers=self._headers)
        except httpx.HTTPError as exc:
            metrics.REST_SENDS.labels("error").inc()
            log.debug("REST broadcast failed: {}", type(exc).__name__)
            return "error"
        if response.status_code == 202:
            metrics.REST_SENDS.labels("ok").inc()
            return "ok"
        metrics.REST_SENDS.labels("error").inc()
        log.warning("REST broadcast refused: {} {}", response.status_code, response.text[:200])
        return "rate_limited" if response.status_code == 429 else "error"
