"""`llm-relay demo` streams from the provider the environment names, exactly as
`llm-relay run` would: here a keyless OpenAI-compatible server on loopback (what
Ollama, vLLM, llama.cpp's server or KoboldCpp are), which is not the devstack's
simulated upstream. The server is this test's own: it streams a text the simulator
never would and records what it was asked."""

from __future__ import annotations

import asyncio
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import web

from devstack.demo import DEMO_TEXT
from tests.conftest import env_without_ours

pytestmark = pytest.mark.integration

LOCAL_TEXT = "Answered by a local model on loopback: ¡hola, 東京! 🦙\n"
LOCAL_MODEL = "llama3.2:1b"


@dataclass
class LocalModelServer:
    """The smallest OpenAI-compatible streaming server: one chunk per word."""

    requests: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)
    base_url: str = ""

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((dict(request.headers), await request.json()))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        words = LOCAL_TEXT.split(" ")
        pieces = [w + " " for w in words[:-1]] + [words[-1]]
        for piece in pieces:
            await response.write(_event({"content": piece}, None))
        await response.write(_event({}, "stop"))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _event(delta: dict[str, str], finish: str | None) -> bytes:
    chunk = {
        "id": "chatcmpl-local",
        "object": "chat.completion.chunk",
        "model": LOCAL_MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


@pytest.fixture
async def local_model() -> AsyncIterator[LocalModelServer]:
    server = LocalModelServer()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", server.chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.base_url = f"http://127.0.0.1:{port}/v1"
    try:
        yield server
    finally:
        await runner.cleanup()


async def test_demo_streams_from_a_keyless_openai_compatible_server_on_loopback(
    local_model: LocalModelServer,
) -> None:
    env = {
        **env_without_ours(),
        "OPENAI_BASE_URL": local_model.base_url,  # no OPENAI_API_KEY: the server needs none
        "RELAY_MODEL": LOCAL_MODEL,
    }
    with tempfile.TemporaryDirectory(prefix="llm-relay-demo-") as data_dir:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "worker", "demo", "--once", "--port", "0"),
            *("--upstream-port", "0"),
            *("--data-dir", data_dir, "--prompt", "Who are you?"),
            cwd=data_dir,  # no .env there
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            stdout, stderr = await asyncio.wait_for(proc.communicate(), 90)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    out, err = stdout.decode(), stderr.decode()
    assert proc.returncode == 0, err[-3000:]
    label = f"Upstream: OpenAI-compatible server at {local_model.base_url}"
    assert f"{label} (model {LOCAL_MODEL}, no API key)" in out, out
    assert LOCAL_TEXT.strip() in out  # what the subscriber reassembled
    assert DEMO_TEXT.split(".")[0] not in out  # and never the simulator's text
    assert "stored transcript = screen  yes" in out

    assert len(local_model.requests) == 1
    headers, body = local_model.requests[0]
    assert "Authorization" not in headers  # no key was set, none is invented
    assert body["model"] == LOCAL_MODEL and body["stream"] is True
    assert body["messages"][-1] == {"role": "user", "content": "Who are you?"}
