"""The demo page in headless Chromium shows exactly the upstream text.

The pieces are the real ones: the simulated OpenAI-compatible upstream, the worker's
upstream client and relay (`relay_stream`, acked realtime-py publisher) publishing to
the local Realtime on a private topic, the project's migrations and RLS, the
PostgREST stand-in serving the token log and the request row to supabase-js. Only
the queue is left out: the test plays the worker's claim and its write-ahead log
(each batch inserted into `llm_request_chunks` before it is broadcast, as
worker/jobs/chunklog.py does) and the final row.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devstack.jwt import user_token
from devstack.realtime.protocol import Version
from devstack.upstream import SimulatedUpstream
from devstack.upstream.faults import Fault
from worker.config import Settings
from worker.relay.batcher import Batch
from worker.relay.publisher import Publisher
from worker.relay.stream import RelayResult, relay_stream
from worker.upstream.client import UpstreamClient
from worker.upstream.events import GenerationRequest

from .conftest import Browser, Stack

pytestmark = pytest.mark.browser

UPSTREAM_KEY = "sk-browser-tests"
# Multi-byte on purpose: accents, CJK, emoji (incl. ZWJ sequences and flags),
# combining marks, RTL, newlines and runs of spaces must all survive untouched.
LINE = "Grüße aus Zürich — 東京の夜は🌃綺麗です 👩‍👩‍👧 🇨🇭 e\u0301 مرحبا  naïve café.\n"
TEXT = "".join(f"{i:02d}. {LINE}" for i in range(14))
REASONING = "Let me think… 考えています 🤔 step by step.\n" * 3


@asynccontextmanager
async def upstream(tokens_per_second: float) -> AsyncIterator[SimulatedUpstream]:
    async with SimulatedUpstream(
        text=TEXT,
        reasoning_text=REASONING,
        tokens_per_second=tokens_per_second,
        api_key=UPSTREAM_KEY,
    ) as up:
        yield up


def new_request(database_url: str, owner: str) -> tuple[str, str]:
    """Insert a request row as its owner would (the trigger creates the session)."""
    session = str(uuid.uuid4())
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO public.llm_requests (session_id, owner, messages, status)"
            ' VALUES (%s, %s, \'[{"role":"user","content":"go"}]\', \'running\')'
            " RETURNING id",
            (session, owner),
        ).fetchone()
    assert row is not None
    return session, str(row[0])


async def relay(
    stack: Stack, up: SimulatedUpstream, session: str, request: str, **overrides: Any
) -> RelayResult:
    """What the worker does for one claimed request, minus the queue."""
    settings = Settings(
        _env_file=None,
        supabase_url=stack.url,
        supabase_service_role_key=stack.service_key,
        openai_base_url=up.base_url,
        openai_api_key=UPSTREAM_KEY,
        relay_private_channels=True,
        **overrides,
    )

    async def write_ahead(batches: Sequence[Batch]) -> None:
        rows = [
            (request, b.offset + i, b.kind, text)
            for b in batches
            for i, text in enumerate(b.tokens)
        ]
        async with (
            await psycopg.AsyncConnection.connect(stack.database_url) as conn,
            conn.cursor() as cur,
        ):
            await cur.executemany(
                "INSERT INTO public.llm_request_chunks (request_id, token_offset, kind, text)"
                " VALUES (%s, %s, %s, %s)",
                rows,
            )

    async with Publisher(settings) as publisher, UpstreamClient(settings) as client:
        result = await relay_stream(
            client.stream(GenerationRequest(messages=[{"role": "user", "content": "go"}])),
            publisher=publisher,
            topic=settings.topic_for(session),
            stream_id=request,
            settings=settings,
            durable=write_ahead,
        )
    async with await psycopg.AsyncConnection.connect(stack.database_url) as conn:
        await conn.execute(
            "UPDATE public.llm_requests SET status = 'done', finished_at = now(),"
            " content = %s, reasoning = %s, next_offset = %s WHERE id = %s",
            (result.content, result.reasoning, result.next_offset, request),
        )
    return result


async def open_demo(browser: Browser, stack: Stack, name: str, **fragment: Any) -> Any:
    page = await browser.new_page(name)
    await page.goto(stack.page("demo.html", **fragment))
    await page.wait_for_function("() => !!(window.demo && window.demo.sub)")
    return page


async def wait_subscribed(page: Any, joins: int = 1) -> None:
    await page.wait_for_function("n => window.demo.sub.joins >= n", arg=joins)


async def wait_complete(page: Any, request: str) -> dict[str, Any]:
    sel = f'[data-stream="{request}"]'
    await page.wait_for_function(
        "sel => document.querySelector(sel)?.dataset.state === 'complete'", arg=sel
    )
    # llm-done's SHA-256 checksums, checked in the page with WebCrypto
    await page.wait_for_function(
        "id => window.demo.page.views.get(id)?.verified != null", arg=request
    )
    shown: dict[str, Any] = await page.evaluate(
        """([sel, id]) => {
          const el = document.querySelector(sel);
          const v = window.demo.page.views.get(id);
          return {
            answer: el.querySelector('.answer').textContent,
            reasoning: el.querySelector('.reasoning').textContent,
            stats: v.stats,
            verified: v.verified,
            joins: window.demo.sub.joins,
            resubscribes: window.demo.sub.resubscribes,
          };
        }""",
        [sel, request],
    )
    return shown


async def test_subscriber_present_from_the_start(browser: Browser, stack: Stack) -> None:
    alice = str(uuid.uuid4())
    session, request = new_request(stack.database_url, alice)
    page = await open_demo(
        browser, stack, "alice", token=user_token(alice), session=session, stream=request
    )
    await wait_subscribed(page)
    async with upstream(tokens_per_second=400) as up:
        result = await relay(stack, up, session, request)
    assert result.error is None and result.content == TEXT
    shown = await wait_complete(page, request)
    assert shown["answer"] == TEXT
    assert shown["reasoning"] == REASONING
    assert shown["verified"] is True
    assert shown["stats"]["duplicateTokens"] == 0


async def test_subscriber_arriving_after_the_end(browser: Browser, stack: Stack) -> None:
    """The replay link `llm-relay demo --prompt` prints: the row alone gives the text."""
    alice = str(uuid.uuid4())
    session, request = new_request(stack.database_url, alice)
    async with upstream(tokens_per_second=0) as up:
        await relay(stack, up, session, request)
    async with await psycopg.AsyncConnection.connect(stack.database_url) as conn:
        await conn.execute(
            "UPDATE public.llm_requests SET finish_reason = 'stop' WHERE id = %s", (request,)
        )
    page = await open_demo(
        browser, stack, "after", token=user_token(alice), session=session, stream=request
    )
    sel = f'[data-stream="{request}"]'
    await page.wait_for_function(
        "sel => document.querySelector(sel)?.dataset.state === 'complete'", arg=sel
    )
    assert await page.text_content(f"{sel} .answer") == TEXT
    assert await page.text_content(f"{sel} .reasoning") == REASONING
    assert "stop" in (await page.text_content(f"{sel} .state") or "")


async def test_subscriber_joining_mid_stream(browser: Browser, stack: Stack) -> None:
    alice = str(uuid.uuid4())
    session, request = new_request(stack.database_url, alice)
    async with upstream(tokens_per_second=50) as up:
        task = asyncio.create_task(relay(stack, up, session, request))
        try:
            await _wait_for_checkpoint(stack.database_url, request, at_least=40)
            page = await open_demo(
                browser, stack, "late", token=user_token(alice), session=session, stream=request
            )
            result = await asyncio.wait_for(task, timeout=40)
        finally:
            task.cancel()
    assert result.error is None
    shown = await wait_complete(page, request)
    assert shown["answer"] == TEXT
    assert shown["reasoning"] == REASONING
    assert shown["verified"] is True
    assert shown["stats"]["logTokens"] >= 40  # it caught up from the token log
    assert shown["stats"]["tokens"] > 0  # and then followed the live messages


async def test_subscriber_whose_websocket_is_cut(browser: Browser, stack: Stack) -> None:
    alice = str(uuid.uuid4())
    session, request = new_request(stack.database_url, alice)
    page = await open_demo(
        browser, stack, "cut", token=user_token(alice), session=session, stream=request
    )
    await wait_subscribed(page)
    async with upstream(tokens_per_second=80) as up:
        task = asyncio.create_task(relay(stack, up, session, request))
        try:
            await page.wait_for_function(
                "id => (window.demo.page.views.get(id)?.nextOffset ?? 0) >= 30", arg=request
            )
            cut = 0
            for tenant in stack.realtime.tenants.values():
                for sock in list(tenant.sockets):
                    if sock.version is Version.V2:  # the browser's, not the publisher's
                        sock.close(1011, "test: connection cut")
                        cut += 1
            assert cut == 1
            result = await asyncio.wait_for(task, timeout=40)
        finally:
            task.cancel()
    assert result.error is None
    shown = await wait_complete(page, request)
    assert shown["answer"] == TEXT
    assert shown["reasoning"] == REASONING
    assert shown["verified"] is True
    assert shown["joins"] >= 2  # supabase-js reconnected and rejoined the same channel
    assert shown["resubscribes"] == 0
    assert shown["stats"]["logTokens"] > 0  # what it missed came from the token log


async def test_subscriber_whose_channel_is_shut_down_for_the_message_rate(
    browser: Browser, stack: Stack
) -> None:
    """ "Too many messages per second" + phx_close: supabase-js drops the channel for
    good; the helper joins a fresh one and catches up from the row."""
    alice = str(uuid.uuid4())
    session, request = new_request(stack.database_url, alice)
    page = await open_demo(
        browser, stack, "ratelimit", token=user_token(alice), session=session, stream=request
    )
    await wait_subscribed(page)
    async with upstream(tokens_per_second=80) as up:
        task = asyncio.create_task(relay(stack, up, session, request))
        try:
            await page.wait_for_function(
                "id => (window.demo.page.views.get(id)?.nextOffset ?? 0) >= 30", arg=request
            )
            stack.realtime.faults.exceed_message_rate()
            await page.wait_for_function(
                "() => window.demo.channelStates.some(s => s.state === 'CLOSED')"
            )
            # Let the inflated bucket leave the 60 s window (12 ticks of 5 s).
            for _ in range(12):
                stack.realtime.tick()
            result = await asyncio.wait_for(task, timeout=40)
        finally:
            task.cancel()
    assert result.error is None
    shown = await wait_complete(page, request)
    assert shown["answer"] == TEXT
    assert shown["reasoning"] == REASONING
    assert shown["verified"] is True
    assert shown["resubscribes"] >= 1


async def test_retried_sends_leave_gaps_and_duplicates_the_page_absorbs(
    browser: Browser, stack: Stack
) -> None:
    """A push the server drops (retried later: a gap meanwhile) and one whose ack is
    lost (retried: a duplicate) reach the page; it shows the text exactly once."""
    alice = str(uuid.uuid4())
    session, request = new_request(stack.database_url, alice)
    page = await open_demo(
        browser, stack, "faults", token=user_token(alice), session=session, stream=request
    )
    await wait_subscribed(page)
    stack.realtime.faults.script_acks("ok", "ok", "drop", "ok", "ok", "lose_reply", "ok")
    async with upstream(tokens_per_second=300) as up:
        result = await relay(stack, up, session, request, relay_ack_timeout_s=0.5)
    assert result.error is None and result.retries >= 2
    shown = await wait_complete(page, request)
    assert shown["answer"] == TEXT
    assert shown["reasoning"] == REASONING
    assert shown["verified"] is True
    assert shown["stats"]["duplicateMessages"] >= 1
    assert shown["stats"]["gapsOpened"] >= 1
    assert shown["stats"]["gapsFilled"] >= 1


async def test_an_upstream_failure_reaches_the_page_as_llm_error(
    browser: Browser, stack: Stack
) -> None:
    """The provider drops the connection mid-stream: the page keeps exactly what was
    relayed and shows the error the relay sent (type, tokens relayed)."""
    alice = str(uuid.uuid4())
    session, request = new_request(stack.database_url, alice)
    page = await open_demo(
        browser, stack, "error", token=user_token(alice), session=session, stream=request
    )
    await wait_subscribed(page)
    async with upstream(tokens_per_second=400) as up:
        up.faults.push(Fault.reset(after_tokens=60))
        result = await relay(stack, up, session, request, relay_upstream_retries=0)
    assert result.error is not None
    await page.wait_for_function("id => window.demo.page.views.get(id)?.error != null", arg=request)
    seen = await page.evaluate(
        """id => {
          const v = window.demo.page.views.get(id);
          const el = document.querySelector(`[data-stream="${id}"]`);
          return { view: v, state: el.querySelector('.state').textContent };
        }""",
        request,
    )
    view = seen["view"]
    assert view["content"] == result.content  # exactly what was relayed before the cut
    assert view["reasoning"] == result.reasoning
    assert view["error"]["tokens_relayed"] == view["nextOffset"] > 0
    assert view["error"]["type"] in seen["state"]
    assert view["complete"] is False


async def test_another_user_cannot_see_the_stream(browser: Browser, stack: Stack) -> None:
    alice, mallory = str(uuid.uuid4()), str(uuid.uuid4())
    session, request = new_request(stack.database_url, alice)
    owner = await open_demo(
        browser, stack, "owner", token=user_token(alice), session=session, stream=request
    )
    intruder = await open_demo(
        browser, stack, "intruder", token=user_token(mallory), session=session, stream=request
    )
    await wait_subscribed(owner)
    async with upstream(tokens_per_second=400) as up:
        await relay(stack, up, session, request)
    assert (await wait_complete(owner, request))["answer"] == TEXT
    # The server refuses the join after its error backoff (RLS on realtime.messages).
    await intruder.wait_for_function(
        "() => (window.demo.channelStates || []).some(s => s.state === 'CHANNEL_ERROR')"
    )
    seen = await intruder.evaluate(
        """id => ({
          states: window.demo.channelStates,
          answer: document.querySelector(`[data-stream="${id}"] .answer`).textContent,
          reasoning: document.querySelector(`[data-stream="${id}"] .reasoning`).textContent,
          joins: window.demo.sub.joins,
          messages: window.demo.sub.messages,
        })""",
        request,
    )
    assert seen["joins"] == 0 and seen["messages"] == 0
    assert seen["answer"] == "" and seen["reasoning"] == ""
    errors = [s["error"] for s in seen["states"] if s["state"] == "CHANNEL_ERROR"]
    assert any("Unauthorized" in (e or "") for e in errors)
    # Nor can the intruder read the row through PostgREST (RLS on llm_requests).
    rows = await intruder.evaluate(
        """async id => {
          const { data, error } = await window.demo.supabase
            .from('llm_requests').select('content').eq('id', id);
          return { data, error };
        }""",
        request,
    )
    assert rows == {"data": [], "error": None}


async def _wait_for_checkpoint(database_url: str, request: str, *, at_least: int) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        for _ in range(200):
            cur = await conn.execute(
                "SELECT count(*) FROM public.llm_request_chunks WHERE request_id = %s", (request,)
            )
            row = await cur.fetchone()
            if row is not None and row[0] >= at_least:
                return
            await asyncio.sleep(0.05)
    raise AssertionError("no checkpoint within 10 s")


PROMPT = "How does llm-token-relay keep a streamed answer exact?"
ANSWER = (
    "Every batch carries the stream-wide offset of its first token, so the page applies "
    "tokens by offset: duplicates from retried sends are dropped, and a gap is held until "
    "a retry or the snapshot row fills it.\n\n"
    "A late or reconnecting subscriber reads the token log from its next offset and "
    "continues from the live messages — ünïcödé, 東京 and 🚀 "
    "included, byte for byte."
)
THOUGHTS = "The user asks about exactness. Explain offsets, duplicates, gaps, snapshots."


async def test_prompt_box_inserts_a_request_and_streams_the_answer(
    browser: Browser, stack: Stack, tmp_path: Any
) -> None:
    """The interactive demo: the page signs in anonymously (supabase-js auth), inserts
    the request row under RLS, and the answer streams in."""
    session = str(uuid.uuid4())
    page = await open_demo(browser, stack, "demo", session=session)  # no token given
    await wait_subscribed(page)  # its session row was created first, so the join is allowed
    user = await page.evaluate("async () => (await window.demo.supabase.auth.getUser()).data.user")
    assert user["is_anonymous"] is True
    await page.fill("#prompt", PROMPT)
    await page.press("#prompt", "Enter")
    request = await _wait_for_request(stack.database_url, session, owner=user["id"])
    async with SimulatedUpstream(
        text=ANSWER, reasoning_text=THOUGHTS, tokens_per_second=60, api_key=UPSTREAM_KEY
    ) as up:
        await relay(stack, up, session, request)
    shown = await wait_complete(page, request)
    assert shown["answer"] == ANSWER
    assert shown["reasoning"] == THOUGHTS
    question = await page.text_content(f'[data-stream="{request}"] .question')
    assert question == PROMPT
    stats = await page.evaluate(
        "() => ({ tps: document.getElementById('s-tps').textContent,"
        " dups: document.getElementById('s-dups').textContent })"
    )
    assert stats["dups"] == "0"  # live duplicates (a catch-up read overtaken is not one)
    await page.wait_for_timeout(1200)  # let the chart draw the last second
    shot = Path(os.environ.get("RELAY_DEMO_SCREENSHOT", str(tmp_path / "demo.png")))
    await page.screenshot(path=str(shot), full_page=True)
    assert await asyncio.to_thread(lambda: shot.stat().st_size) > 10_000


async def _wait_for_request(database_url: str, session: str, *, owner: str) -> str:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        for _ in range(200):
            cur = await conn.execute(
                "SELECT id, owner FROM public.llm_requests WHERE session_id = %s", (session,)
            )
            row = await cur.fetchone()
            if row is not None:
                assert str(row[1]) == owner  # owner = auth.uid() of the page's user
                cur = await conn.execute("SELECT 1 FROM auth.users WHERE id = %s", (owner,))
                assert await cur.fetchone() is not None  # signed up through /auth/v1
                return str(row[0])
            await asyncio.sleep(0.05)
    raise AssertionError("the page inserted no request within 10 s")
