"""`worker.client.RelayClient`, the Python frontend: supabase-py signs in anonymously
and writes the rows through PostgREST under RLS, realtime-py reassembles the private
topic; a real `llm-relay run` process relays the request from the local stack's queue."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from postgrest.exceptions import APIError

from devstack.stack import DevStack
from tests.conftest import env_without_ours, running_stack
from worker.client import RelayClient
from worker.errors import ConfigError

pytestmark = pytest.mark.integration

TEXT = "Asked from Python: supabase-py wrote the row, realtime-py read the tokens. ✓ 東京\n"
REASONING = "Think first, then answer."


@pytest.fixture
async def stack() -> AsyncIterator[DevStack]:
    async with running_stack(
        upstream_text=TEXT, upstream_reasoning_text=REASONING, upstream_tokens_per_second=400
    ) as devstack:
        yield devstack


@pytest.fixture
def worker(stack: DevStack, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {
        **env_without_ours(),
        **stack.env(),
        "RELAY_HTTP_PORT": "0",
        "RELAY_POLL_INTERVAL_S": "0.2",
    }
    env.pop("PYTHONWARNINGS", None)
    with (tmp_path / "worker.log").open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "run"], env=env, cwd=tmp_path, stderr=sink
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


async def test_a_python_app_asks_and_gets_the_exact_text(
    stack: DevStack, worker: subprocess.Popen[bytes]
) -> None:
    pieces: list[tuple[str, str]] = []
    async with await RelayClient.connect(stack.api_url, stack.anon_key()) as relay:
        answer = await relay.ask(
            "What happened?", on_text=lambda kind, text: pieces.append((kind, text)), timeout_s=60
        )
        stored = await relay.result(answer.request_id)
    assert worker.poll() is None
    assert (answer.content, answer.reasoning) == (TEXT, REASONING)
    assert answer.exact and answer.status == "done" and answer.finish_reason == "stop"
    # the live pieces, in order, are the text: reasoning first, then the answer
    assert "".join(t for k, t in pieces if k == "reasoning") == REASONING
    assert "".join(t for k, t in pieces if k == "content") == TEXT
    assert (stored["content"], stored["reasoning"], stored["status"]) == (TEXT, REASONING, "done")


async def test_another_user_cannot_read_the_request(
    stack: DevStack, worker: subprocess.Popen[bytes]
) -> None:
    async with await RelayClient.connect(stack.api_url, stack.anon_key()) as owner:
        answer = await owner.ask("mine", timeout_s=60)
    async with await RelayClient.connect(stack.api_url, stack.anon_key()) as other:
        with pytest.raises(APIError) as refused:  # RLS hides the row: .single() finds none
            await other.result(answer.request_id)
        # nor join its topic (RLS on realtime.messages), so it cannot ask in that session
        with pytest.raises(ConfigError, match="Unauthorized"):
            await other.ask("theirs", session_id=answer.session_id, timeout_s=10)
    assert refused.value.code == "PGRST116"
    assert os.environ.get("SUPABASE_SERVICE_ROLE_KEY") is None  # the client never had it


def _submit(stack: DevStack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **env_without_ours(),
        "SUPABASE_URL": stack.api_url,
        "SUPABASE_ANON_KEY": stack.anon_key(),
    }
    return subprocess.run(  # no DATABASE_URL, no service key: only what a frontend has
        [sys.executable, "-m", "worker", "submit", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )


async def test_submit_goes_through_auth_and_postgrest_like_a_frontend(
    stack: DevStack, worker: subprocess.Popen[bytes]
) -> None:
    done = await asyncio.to_thread(
        _submit, stack, "--anonymous", "--prompt", "hi", "--wait", "--timeout", "60"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    submitted, final = (json.loads(line) for line in done.stdout.splitlines())
    assert submitted["topic"] == f"llm-token:{submitted['session_id']}"
    assert final["id"] == submitted["id"] and final["status"] == "done"
    assert (final["content"], final["reasoning"]) == (TEXT, REASONING)
    # Another (anonymous) user can neither see nor cancel it.
    refused = await asyncio.to_thread(_submit, stack, "--anonymous", "--cancel", submitted["id"])
    assert refused.returncode == 1
    assert json.loads(refused.stdout) == {"id": submitted["id"], "status": None}
