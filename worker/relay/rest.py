"""The REST sender: `POST /api/broadcast` (the batch endpoint), a thin I/O shell.

One request carries many messages, of any topics (ref §4 A): 202 is acceptance of all
of them; 429 means the project's rate counter is over its limit.

Streams `submit()` one message each; whatever is submitted while a request is in
flight goes in the next one (group commit, at most `max_batch` messages), so while
channels wait for their joins (a thousand streams at 40 joins/s) the REST path costs
a request per batch of many topics, not one per message. Each request carries the
oldest queued messages, in submission order.

One request is in flight while the queue holds less than a full batch; a backlog of
full batches gets up to `max_requests` at once. The server asks the database once per
private topic of a request (ref §4 A), so one request of 50 topics takes tens of
milliseconds there: sent one after another, those waits, not the quota, bounded the
REST path at 1,000 streams. Light load still sends one request at a time, so the
request rate (which the server limits like messages) stays low.
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
MAX_REQUESTS = 4  # requests in flight at once, only while full batches wait
log = logger.bind(event="relay.rest")


@dataclass(frozen=True, slots=True)
class RestMessage:
    topic: str
    event: str
    payload: dict[str, Any]


class RestSender:
    """Sends broadcasts through the batch endpoint; `start()` before, `close()` after."""

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        timeout_s: float,
        private: bool,
        max_batch: int = MAX_BATCH,
        max_requests: int = MAX_REQUESTS,
    ) -> None:
        self.url = url + "/api/broadcast"
        self.max_batch = max(1, max_batch)
        self.max_requests = max(1, max_requests)
        self._queue: list[tuple[RestMessage, asyncio.Future[RestOutcome]]] = []
        self._flushers: set[asyncio.Task[None]] = set()
        self.requests = 0  # POSTs sent (one carries up to max_batch messages)
        self.max_in_flight_seen = 0  # requests in flight at once, at most
        self.private = private
        self._headers = {"apikey": api_key, "Authorization": f"Bearer {api_key}"}
        self._timeout_s = timeout_s
        self._http: httpx.AsyncClient | None = None

    async def start(self) -> None:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self._timeout_s)

    async def close(self) -> None:
        flushers, self._flushers = self._flushers, set()
        for task in flushers:
            task.cancel()
        for task in flushers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
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
        flushing = len(self._flushers)
        if flushing == 0 or (
            flushing < self.max_requests and len(self._queue) >= self.max_batch * flushing
        ):
            task = asyncio.create_task(self._flush(), name="relay-rest")
            self._flushers.add(task)
            task.add_done_callback(self._flushers.discard)
        return await waiter

    async def _flush(self) -> None:
        me = asyncio.current_task()
        try:
            await self._flush_while_queued()
        finally:
            # Now, not in the done callback: a flusher deciding right after must
            # count without this one, or both could leave a queue nobody sends.
            self._flushers.discard(me)

    async def _flush_while_queued(self) -> None:
        while self._queue:
            if len(self._flushers) > 1 and len(self._queue) < self.max_batch:
                return  # the backlog is gone: one request at a time again
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            live = [(m, w) for m, w in batch if not w.done()]  # a cancelled stream's are dropped
            if not live:
                continue
            try:
                self.max_in_flight_seen = max(self.max_in_flight_seen, len(self._flushers))
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
