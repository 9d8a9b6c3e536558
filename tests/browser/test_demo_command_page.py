"""The page served by `llm-relay demo`, through the real queue and worker process:
anonymous sign-in, the request inserted through PostgREST under RLS, claimed by
`llm-relay run`, relayed on the private topic, shown exactly (checksum verified)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from devstack.demo import DEMO_REASONING, DEMO_TEXT
from tests.browser.conftest import _browser
from tests.conftest import env_without_ours

pytestmark = [pytest.mark.browser, pytest.mark.integration]
PROMPT = "How do tokens travel? (ünïcödé, 東京)"
READY_LINE = "The demo page is up: "


@pytest.fixture
async def demo_page_url() -> AsyncIterator[str]:
    # Not under pytest's basetemp (reset to mode 0700, which locks out the user pgserver
    # runs postgres as), like the session cluster in tests/conftest.py.
    data_dir = tempfile.mkdtemp(prefix="llm-relay-demo-page-")
    try:
        async with _demo_page(data_dir) as url:
            yield url
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


@contextlib.asynccontextmanager
async def _demo_page(data_dir: str) -> AsyncIterator[str]:
    env = env_without_ours()
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "worker", "demo", "--no-prompt", "--port", "0"),
        *("--upstream-port", "0", "--tokens-per-second", "300", "--data-dir", data_dir),
        cwd=data_dir,
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(90):
            while True:
                line = (await proc.stdout.readline()).decode()
                assert line, "the demo exited before serving the page"
                if line.startswith(READY_LINE):
                    break
        yield line[len(READY_LINE) :].split()[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(proc.wait(), 40)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0


async def test_the_demo_pages_prompt_box_goes_through_the_worker(
    demo_page_url: str, chromium_executable: str, tmp_path: Path
) -> None:
    async with _browser(chromium_executable, tmp_path / "browser") as browser:
        page = await browser.new_page("demo")
        await page.goto(demo_page_url)
        await page.wait_for_function("() => !!(window.demo && window.demo.sub)")
        await page.wait_for_function("() => window.demo.sub.joins >= 1")
        await page.fill("#prompt", PROMPT)
        await page.press("#prompt", "Enter")
        await page.wait_for_function(
            "() => document.querySelector('[data-stream]')?.dataset.state === 'complete'"
        )
        shown: dict[str, Any] = await page.evaluate(
            """async () => {
              const el = document.querySelector('[data-stream]');
              const id = el.dataset.stream;
              for (let i = 0; i < 100 && window.demo.page.views.get(id)?.verified == null; i++)
                await new Promise((r) => setTimeout(r, 50));
              return {
                question: el.querySelector('.question').textContent,
                answer: el.querySelector('.answer').textContent,
                reasoning: el.querySelector('.reasoning').textContent,
                verified: window.demo.page.views.get(id)?.verified,
              };
            }"""
        )
    assert shown["question"] == PROMPT
    assert shown["answer"] == DEMO_TEXT
    assert shown["reasoning"] == DEMO_REASONING
    assert shown["verified"] is True
