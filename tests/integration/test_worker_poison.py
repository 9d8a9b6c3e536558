"""Hostile rows through the real worker on real Postgres (issue 12).

A row that cannot be decoded or validated is failed with its own reason; it never
stops the claim loop and never drags the innocent rows of the same claim down.
"""

from __future__ import annotations

import asyncio
import json

import psycopg
import pytest

from tests.integration.test_worker_postgres import (
    HELLO,
    USER_A,
    fast_settings,
    is_final,
    wait_for_rows,
    worker_on,
)
from worker.jobs import NewRequest, PostgresJobRepository
from worker.service.testing import ScriptedRunner, scripted_text

pytestmark = pytest.mark.integration

DEEP = "[" * 5000 + "]" * 5000  # RecursionError when decoded by json / psycopg


def insert_as_user(database_url: str, user: str, messages_json: str, provider: str | None) -> str:
    """What a frontend can send through PostgREST: any JSON its RLS policy allows."""
    with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
        conn.execute(
            "SELECT set_config('role', 'authenticated', true),"
            " set_config('request.jwt.claims', %s, true)",
            (json.dumps({"sub": user, "role": "authenticated"}),),
        )
        row = conn.execute(
            "INSERT INTO public.llm_requests (provider, messages) VALUES (%s, %s::jsonb)"
            " RETURNING id",
            (provider, messages_json),
        ).fetchone()
    assert row is not None
    return str(row[0])


async def test_poison_rows_in_a_claim_fail_alone_and_the_worker_keeps_serving(
    database_url: str,
) -> None:
    repo = PostgresJobRepository.from_url(database_url, pool_size=2)
    try:
        innocent = [(await repo.submit_as(USER_A, NewRequest(HELLO))).id for _ in range(2)]
        role_list = json.dumps([{"role": ["user"], "content": "hi"}])
        poison = {
            "role": insert_as_user(database_url, USER_A, role_list, None),
            "deep": insert_as_user(database_url, USER_A, DEEP, None),
            "provider": insert_as_user(database_url, USER_A, json.dumps(HELLO), "p" * 1_000_000),
        }
        innocent.append((await repo.submit_as(USER_A, NewRequest(HELLO))).id)
        runner = ScriptedRunner(tokens=3, delay_s=0.001)
        settings = fast_settings(database_url, relay_concurrency=8)  # one claim takes all six
        async with worker_on(settings, runner, "w-poison") as worker:
            records = await wait_for_rows(repo, innocent + list(poison.values()), is_final)
            # Still serving: a request submitted after the poison is claimed and done.
            later = await repo.submit_as(USER_A, NewRequest(HELLO))
            [after] = await wait_for_rows(repo, [later.id], is_final)
            assert worker.live
        by_id = {r.id: r for r in records}
        for job_id in innocent:
            record = by_id[job_id]
            assert (record.status, record.attempts) == ("done", 1)
            assert record.snapshot.content == scripted_text(0, 3)
        assert after.status == "done"
        expected_field = {"role": "messages", "deep": "messages", "provider": "provider"}
        for name, job_id in poison.items():
            record = by_id[job_id]
            assert (record.status, record.attempts) == ("failed", 1), name
            assert record.error is not None
            assert record.error["type"] == "bad_request"
            assert record.error["field"] == expected_field[name]
            assert record.error["retryable"] is False
            assert len(json.dumps(record.error)) < 1_000, name  # bounded, even for 1 MB input
        assert "nested too deeply" in by_id[poison["deep"]].error["message"]  # type: ignore[index]
        assert "role must be one of" in by_id[poison["role"]].error["message"]  # type: ignore[index]
        assert set(runner.started) == {*innocent, later.id}
    finally:
        await repo.close()


async def test_a_forged_cancel_notify_does_not_stop_a_stream(database_url: str) -> None:
    """Anyone with SQL access can NOTIFY; only the row's cancel flag may stop a stream."""
    repo = PostgresJobRepository.from_url(database_url, pool_size=2)
    try:
        submitted = await repo.submit_as(USER_A, NewRequest(HELLO))
        runner = ScriptedRunner(tokens=60, delay_s=0.02)
        async with worker_on(fast_settings(database_url), runner, "w"):
            await wait_for_rows(repo, [submitted.id], lambda r: r.snapshot.next_offset >= 3)
            forged = json.dumps({"op": "cancel", "id": submitted.id})
            async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as c:
                await c.execute("SELECT pg_notify('llm_requests', %s)", (forged,))
            await asyncio.sleep(0.3)  # let the worker hear it (and, before the fix, act on it)
            [record] = await wait_for_rows(repo, [submitted.id], is_final)
        assert (record.status, record.finish_reason) == ("done", "stop")
        assert runner.statuses == []
        assert record.snapshot.content == scripted_text(0, 60)
    finally:
        await repo.close()
