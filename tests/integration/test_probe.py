"""`llm-relay probe --json` against the simulated upstream, healthy and with faults.

The CLI runs its own event loop, so the simulated upstream runs in a thread with
its own loop; faults are queued through the HTTP control endpoint, as a script
in another process would.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from loguru import logger

from devstack.upstream import Fault, SimulatedUpstream, tokenize
from worker.cli import main

pytestmark = pytest.mark.integration

TEXT = "Probe says: héllo 🦀, 世界!"
KEY = "sk-devstack"


class ThreadedUpstream:
    def __init__(self, **kwargs: Any) -> None:
        self.upstream = SimulatedUpstream(api_key=KEY, text=TEXT, **kwargs)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> ThreadedUpstream:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.upstream.start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.upstream.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def push(self, *faults: Fault) -> None:
        url = f"http://{self.upstream.host}:{self.upstream.port}/_control/faults"
        response = httpx.post(url, json={"faults": [f.to_dict() for f in faults]}, timeout=5)
        response.raise_for_status()


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """`main()` configures loguru and routes stdlib logging to capsys' stderr; undo it,
    or later records (pgserver's at exit) hit a closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    logger.remove()
    logger.add(sys.stderr)
    root.handlers, root.level = handlers, level


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name in ("OPENAI_BASE_URL", "GROQ_BASE_URL", "RELAY_PROVIDER", "RELAY_MODEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("GROQ_API_KEY", KEY)
    monkeypatch.setenv("RELAY_UPSTREAM_RETRY_BASE_S", "0.01")


@pytest.fixture
def upstream(env: None) -> Iterator[ThreadedUpstream]:
    with ThreadedUpstream() as up:
        yield up


def probe(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    code = main(["probe", "--json", *args])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 1, out  # exactly one JSON object on stdout
    report: dict[str, Any] = orjson.loads(lines[0])
    return report


def test_probe_ok(upstream: ThreadedUpstream, capsys: pytest.CaptureFixture[str]) -> None:
    report = probe(capsys, "--base-url", upstream.upstream.base_url, "--model", "gpt-x")
    assert report["outcome"] == "ok" and report["error"] is None
    assert (report["provider"], report["model"], report["http_status"]) == ("openai", "gpt-x", 200)
    assert report["content"] == TEXT
    assert report["content_tokens"] == tokenize(TEXT)
    assert report["finish_reason"] == "stop"
    assert report["usage"]["completion_tokens"] == len(tokenize(TEXT))
    assert report["usage_estimated"] is False
    assert report["attempts"] == 1
    timings = report["timings"]
    assert 0 <= timings["headers_s"] <= timings["first_token_s"] <= timings["end_s"]
    expected = {
        "provider",
        "model",
        "http_status",
        "outcome",
        "finish_reason",
        "content",
        "reasoning",
        "refusal",
        "content_tokens",
        "reasoning_tokens",
        "tool_calls",
        "usage",
        "usage_estimated",
        "error",
        "attempts",
        "timings",
    }
    assert expected <= set(report)


def test_probe_groq_reasoning(env: None, capsys: pytest.CaptureFixture[str]) -> None:
    with ThreadedUpstream(provider="groq", reasoning_text="Thinking hard.") as up:
        report = probe(capsys, "--provider", "groq", "--base-url", up.upstream.base_url)
    assert report["provider"] == "groq" and report["outcome"] == "ok"
    assert report["reasoning"] == "Thinking hard."
    assert report["reasoning_tokens"] == tokenize("Thinking hard.")
    assert "queue_time" in report["usage"]


def test_probe_retries_zero_makes_one_request(
    upstream: ThreadedUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    upstream.push(Fault.rate_limit(retry_after_s=1.5))
    report = probe(capsys, "--base-url", upstream.upstream.base_url, "--retries", "0")
    assert report["outcome"] == "upstream_error" and report["http_status"] == 429
    assert report["error"] == {
        "type": "rate_limit",
        "retryable": True,
        "message": "Rate limit reached for requests",
        "retry_after_s": 1.5,
    }
    assert report["attempts"] == 1 and len(upstream.upstream.requests) == 1


def test_probe_retries_then_ok(
    upstream: ThreadedUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    upstream.push(Fault.html_502(), Fault.reset(after_tokens=0))
    report = probe(capsys, "--base-url", upstream.upstream.base_url, "--retries", "2")
    assert report["outcome"] == "ok" and report["attempts"] == 3
    assert report["content"] == TEXT


def test_probe_truncated_midstream(
    upstream: ThreadedUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    upstream.push(Fault.reset(after_tokens=3))
    report = probe(capsys, "--base-url", upstream.upstream.base_url)
    assert report["outcome"] == "truncated" and report["http_status"] == 200
    assert report["content_tokens"] == tokenize(TEXT)[:3]
    assert report["error"]["type"] == "connection_lost"
    assert report["usage_estimated"] is True and report["usage"]["completion_tokens"] == 3
    assert report["finish_reason"] is None and report["attempts"] == 1


def test_probe_idle_timeout(upstream: ThreadedUpstream, capsys: pytest.CaptureFixture[str]) -> None:
    upstream.push(Fault.hang(after_tokens=2))
    report = probe(capsys, "--base-url", upstream.upstream.base_url, "--idle-timeout", "0.3")
    assert report["outcome"] == "truncated" and report["error"]["type"] == "timeout"
    assert len(report["content_tokens"]) == 2


def test_probe_first_token_timeout(
    upstream: ThreadedUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    upstream.push(Fault.hang_after_headers())
    args = ["--base-url", upstream.upstream.base_url, "--first-token-timeout", "0.3"]
    report = probe(capsys, *args, "--retries", "0")
    assert report["outcome"] == "truncated" and report["error"]["type"] == "timeout"
    assert report["http_status"] == 200 and report["content_tokens"] == []


def test_probe_error_inside_stream(
    upstream: ThreadedUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    upstream.push(Fault.error_event(after_tokens=2, as_event=True))
    report = probe(capsys, "--base-url", upstream.upstream.base_url)
    assert report["outcome"] == "upstream_error" and report["http_status"] == 200
    assert report["error"]["type"] == "server_error"


def test_probe_malformed_and_auth(
    upstream: ThreadedUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    upstream.push(Fault.malformed(after_tokens=1))
    report = probe(capsys, "--base-url", upstream.upstream.base_url)
    assert (report["outcome"], report["error"]["type"]) == ("truncated", "malformed")
    upstream.push(Fault.http(401, "Invalid API Key", "invalid_request_error", "invalid_api_key"))
    report = probe(capsys, "--base-url", upstream.upstream.base_url)
    assert (report["outcome"], report["error"]["type"], report["http_status"]) == (
        "upstream_error",
        "auth",
        401,
    )
    assert report["error"]["retryable"] is False


def test_probe_unreachable(env: None, capsys: pytest.CaptureFixture[str]) -> None:
    report = probe(capsys, "--base-url", "http://127.0.0.1:9/v1", "--retries", "0")
    assert report["outcome"] == "upstream_error" and report["http_status"] is None
    assert report["error"]["type"] == "connection_lost"


def test_probe_human_mode_exit_codes(
    upstream: ThreadedUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["probe", "--base-url", upstream.upstream.base_url]) == 0
    assert capsys.readouterr().out.startswith(TEXT)
    upstream.push(Fault.http(400, "bad", "invalid_request_error"))
    assert main(["probe", "--base-url", upstream.upstream.base_url]) == 1
