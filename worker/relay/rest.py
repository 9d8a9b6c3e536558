"""The REST sender: `POST /api/broadcast` (the batch endpoint), a thin I/O shell.

One request carries many messages, of any topics (ref §4 A): 202 is acceptance of all
of them; 429 means the project's rate counter is over its limit.

Streams `submit()` one message each; whatever is submitted while a request is in
flight goes in the next one (group commit, at most `max_batch` messages), so while
channels wait for their joins (a thousand streams at 40 joins/s) the REST path costs
a request per batch of many topics, not one per message.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any, Literal

import httpx
from loguru import logger

from worker.relay import metrics

RestOutcome = Literal["ok", "error", "rate_limited"]
# The endpoint refuses a batch when the project's average plus its size passes the
# messages/s quota (ref §4 A, 429 "reduce the batch size"): keep batches small.
MAX_BATCH = 50
log = logger.bind(event="relay.rest")


@dataclass(frozen=True, slots=True)
class RestMessage:
    topic: str
    event: str
    payload: dict[str, Any]


class RestSender:
    """Sends broadcasts through the batch endpoint; `start()` before, `close()` after."""

    def __init__(
        self, url: str, api_key: str, *, timeout_s: float, private: bool, max_batch: int = MAX_BATCH
    ) -> None:
        self.url = url + "/api/broadcast"
        self.max_batch = max(1, max_batch)
        self._queue: list[tuple[RestMessage, asyncio.Future[RestOutcome]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.requests = 0  # POSTs sent (one carries up to max_batch messages)
        self.private = private
        self._headers = {"apikey": api_key, "Authorization": f"Bearer {api_key}"}
        self._timeout_s = timeout_s
        self._http: httpx.AsyncClient | None = None

    async def start(self) -> None:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self._timeout_s)

    async def close(self) -> None:
        if self._flusher is not None and not self._flusher.done():
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        for _, waiter in self._queue:
            waiter.cancel()
        self._queue.clear()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def submit(self, message: RestMessage) -> RestOutcome:
        """Send `message` in the next request; its outcome (shared by its batch)."""
        waiter: asyncio.Future[RestOutcome] = asyncio.get_running_loop().create_future()
        self._queue.append((message, waiter))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="relay-rest")
        return await waiter

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            live = [(m, w) for m, w in batch if not w.done()]  # a cancelled stream's are dropped
            if not live:
                continue
            try:
                outcome = await self.send([m for m, _ in live])
            except BaseException:
                for _, waiter in live:
                    if not waiter.done():
                        waiter.set_result("error")
                raise
            for _, waiter in live:
                if not waiter.done():
                    waiter.set_result(outcome)

    async def send(self, messages: list[RestMessage]) -> RestOutcome:
        """POST `messages` in one request; the outcome covers all of them."""
        assert self._http is not None, "RestSender.start() first"
        body = {
            "messages": [
                {"topic": m.topic, "event": m.event, "payload": m.payload, "private": self.private}
                for m in messages
            ]
        }
        self.requests += 1
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
