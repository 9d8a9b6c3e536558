"""`StreamTranscript`, the one accumulator of a stream's output, and `ChunkLog`'s rules
on the in-memory queue (group commit, retry through an outage, fencing)."""

from __future__ import annotations

import asyncio

import pytest

from worker.errors import LeaseLost, QueueError
from worker.jobs.chunklog import ChunkLog
from worker.jobs.models import ChunkRun, NewRequest
from worker.jobs.testing import InMemoryJobRepository
from worker.transcript import StreamTranscript, ToolCall
from worker.upstream.events import Finished, Refusal, Status, Token, ToolCallDelta


def test_tokens_share_one_offset_space_and_texts_are_exact() -> None:
    t = StreamTranscript.resume(content="He", next_offset=1, next_seq=1)
    for event in (
        Token("reasoning", "hm"),
        Token("content", "llo"),
        Status("retrying"),
        Token("content", " 🦀"),
        Finished("stop"),
    ):
        t.feed(event)
    assert (t.content, t.reasoning, t.next_offset, t.tokens) == ("Hello 🦀", "hm", 4, 3)
    assert t.content == "Hello 🦀"  # reading twice (after compaction) is the same


def test_tool_calls_are_kept_by_index_and_the_first_id_and_name_win() -> None:
    t = StreamTranscript()
    t.feed(ToolCallDelta(0, id="call_1", name="get", arguments='{"a"'))
    t.feed(ToolCallDelta(1, id="call_2", name="put", arguments="{}"))
    t.feed(ToolCallDelta(0, id="", name=None, arguments=": 1}"))
    t.feed(Refusal("no"))
    t.feed(Refusal(" thanks"))
    assert t.tool_calls == [
        ToolCall(0, "call_1", "get", '{"a": 1}'),
        ToolCall(1, "call_2", "put", "{}"),
    ]
    assert t.refusal == "no thanks" and t.has_tool_calls and t.tokens == 0


def test_the_probe_keeps_every_token() -> None:
    t = StreamTranscript(keep_tokens=True)
    for text in ("a", "b"):
        t.feed(Token("content", text))
    t.feed(Token("reasoning", "r"))
    assert (t.content_tokens, t.reasoning_tokens) == (["a", "b"], ["r"])


def claimed(repo: InMemoryJobRepository, n: int) -> list[str]:
    return [repo.add(NewRequest([{"role": "user", "content": "hi"}])) for _ in range(n)]


async def test_the_log_rides_out_an_outage_and_fences_a_lost_lease() -> None:
    repo = InMemoryJobRepository()
    a, b = claimed(repo, 2)
    await repo.claim(worker="w", limit=2, lease_s=30, max_attempts=3)
    log = ChunkLog(repo, "w")
    writer = asyncio.create_task(log.run())
    try:
        repo.fail_next = QueueError("connection refused")
        await asyncio.wait_for(log.append(a, [ChunkRun(a, 0, "content", ("x",))]), 5)
        assert log.stats.failures == 1 and [c.text for c in repo.rows[a].chunks.values()] == ["x"]
        repo.rows[b].lease_owner = "someone-else"
        with pytest.raises(LeaseLost):
            await asyncio.wait_for(log.append(b, [ChunkRun(b, 0, "content", ("y",))]), 5)
        assert repo.rows[b].chunks == {}
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
