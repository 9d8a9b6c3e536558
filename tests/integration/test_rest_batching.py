"""The REST sender's group commit (issue 16): messages submitted while a request is in
flight share the next one, many topics per request, each request a run of the queue in
submission order; a backlog of full batches gets a few requests at once, light load one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from worker.relay.rest import RestMessage, RestSender

pytestmark = pytest.mark.integration


class Endpoint:
    def __init__(self, status: int = 202, delay_s: float = 0.02) -> None:
        self.status = status
        self.delay_s = delay_s
        self.bodies: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)  # a request in flight while others submit
        finally:
            self.in_flight -= 1
        return web.Response(status=self.status)


@pytest.fixture
async def endpoint() -> AsyncIterator[tuple[Endpoint, str]]:
    ep = Endpoint()
    app = web.Application()
    app.router.add_post("/api/broadcast", ep.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield ep, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_concurrent_submits_share_requests_in_order(endpoint: tuple[Endpoint, str]) -> None:
    ep, url = endpoint
    sender = RestSender(url, "key", timeout_s=5, private=True, max_batch=50)
    await sender.start()
    try:
        messages = [RestMessage(f"llm-token:{i % 130}", "llm-token", {"i": i}) for i in range(400)]
        outcomes = await asyncio.wait_for(asyncio.gather(*(sender.submit(m) for m in messages)), 10)
    finally:
        await sender.close()
    assert outcomes == ["ok"] * 400
    sent = [m for body in ep.bodies for m in body["messages"]]
    assert sorted(m["payload"]["i"] for m in sent) == list(range(400))  # each once
    for body in ep.bodies:  # each request: the oldest queued, in submission order
        got = [m["payload"]["i"] for m in body["messages"]]
        assert got == list(range(got[0], got[0] + len(got)))
    assert all(m["private"] is True for m in sent)
    assert max(len(b["messages"]) for b in ep.bodies) <= 50
    assert sender.requests == len(ep.bodies) <= 400 // 50 + 1  # not one POST per message
    # A backlog of full batches: several requests at once, never more than allowed.
    assert 1 < ep.max_in_flight <= sender.max_requests
    assert sender.max_in_flight_seen == ep.max_in_flight


async def test_light_load_sends_one_request_at_a_time(endpoint: tuple[Endpoint, str]) -> None:
    # Streams submitting a message now and then (less than a batch waits): group
    # commit, one request in flight, so the request rate the server limits stays low.
    ep, url = endpoint
    sender = RestSender(url, "key", timeout_s=5, private=False, max_batch=50)
    await sender.start()

    async def stream(n: int) -> list[str]:
        outcomes: list[str] = []
        for i in range(5):
            outcomes.append(await sender.submit(RestMessage(f"t{n}", "e", {"i": i})))
        return outcomes

    try:
        results = await asyncio.wait_for(asyncio.gather(*(stream(n) for n in range(30))), 10)
    finally:
        await sender.close()
    assert results == [["ok"] * 5] * 30
    assert ep.max_in_flight == 1
    assert sender.requests <= 5 + 1  # 30 streams' messages shared each request
    for n in range(30):  # one stream's messages arrive in its order
        sent = [m for b in ep.bodies for m in b["messages"]]
        mine = [m["payload"]["i"] for m in sent if m["topic"] == f"t{n}"]
        assert mine == list(range(5))


async def test_after_a_backlog_nothing_is_left_unsent(endpoint: tuple[Endpoint, str]) -> None:
    # Flushers leave as the backlog drains; whatever is queued meanwhile still goes.
    ep, url = endpoint
    sender = RestSender(url, "key", timeout_s=5, private=False, max_batch=10)
    await sender.start()
    try:
        burst = [sender.submit(RestMessage("t", "e", {"i": i})) for i in range(95)]
        first = asyncio.gather(*burst)
        await asyncio.sleep(0.03)  # mid-backlog
        late = asyncio.gather(*(sender.submit(RestMessage("u", "e", {"i": i})) for i in range(3)))
        assert await asyncio.wait_for(first, 10) == ["ok"] * 95
        assert await asyncio.wait_for(late, 10) == ["ok"] * 3
    finally:
        await sender.close()
    assert sum(len(b["messages"]) for b in ep.bodies) == 98
    assert ep.max_in_flight > 1


async def test_a_refused_batch_fails_each_of_its_messages(endpoint: tuple[Endpoint, str]) -> None:
    ep, url = endpoint
    ep.status = 429
    sender = RestSender(url, "key", timeout_s=5, private=False)
    await sender.start()
    try:
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(sender.submit(RestMessage("t", "e", {"i": i})) for i in range(5))), 10
        )
    finally:
        await sender.close()
    assert outcomes == ["rate_limited"] * 5


async def test_a_cancelled_submit_is_not_sent(endpoint: tuple[Endpoint, str]) -> None:
    ep, url = endpoint
    sender = RestSender(url, "key", timeout_s=5, private=False)
    await sender.start()
    try:
        first = asyncio.ensure_future(sender.submit(RestMessage("t", "e", {"i": 0})))
        await asyncio.sleep(0.005)  # the first request is in flight
        doomed = asyncio.ensure_future(sender.submit(RestMessage("t", "e", {"i": 1})))
        kept = asyncio.ensure_future(sender.submit(RestMessage("t", "e", {"i": 2})))
        await asyncio.sleep(0)
        doomed.cancel()
        assert await asyncio.wait_for(first, 5) == "ok"
        assert await asyncio.wait_for(kept, 5) == "ok"
    finally:
        await sender.close()
    sent = [m["payload"]["i"] for body in ep.bodies for m in body["messages"]]
    assert sent == [0, 2]
