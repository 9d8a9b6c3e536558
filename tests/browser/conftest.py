"""Headless Chromium (Debian's `chromium`) driven by Playwright, against the local stack.

One aiohttp app on 127.0.0.1:0 plays the Supabase gateway: the Realtime stand-in
(`/realtime/v1/*`), the PostgREST stand-in (`/rest/v1/*`), the anonymous-sign-in
stand-in (`/auth/v1/*`) and `examples/frontend` as
static files (supabase-js comes from its `node_modules`, never from a CDN). The
database is the per-test clone of the migrated template.

Never `playwright install`: Playwright launches `/usr/bin/chromium` (installed by
`make browser-deps`) with a fresh user-data-dir per page.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from aiohttp import web

from devstack.auth import AuthStandIn
from devstack.jwt import api_key
from devstack.postgres import REPO_ROOT
from devstack.postgrest import PostgrestServer
from devstack.realtime import RealtimeServer, Timings

FRONTEND_DIR = REPO_ROOT / "examples" / "frontend"
PAGES_DIR = Path(__file__).with_name("pages")
SUPABASE_UMD = FRONTEND_DIR / "node_modules" / "@supabase" / "supabase-js" / "dist" / "umd"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
JOIN_ERROR_DELAY_S = 1.0
# Every wait in a browser test is bounded by this (ms).
PAGE_TIMEOUT_MS = 20_000


def _require(path: Path | str, what: str) -> None:
    if Path(path).exists():
        return
    message = f"{what} missing ({path}); run `make browser-deps`"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def chromium_executable() -> str:
    _require(shutil.which("chromium") or CHROMIUM, "Debian's chromium")
    return shutil.which("chromium") or CHROMIUM


@dataclass
class Stack:
    """The gateway the pages talk to, and the servers behind it."""

    url: str
    database_url: str
    realtime: RealtimeServer
    anon_key: str = field(default_factory=lambda: api_key("anon"))
    service_key: str = field(default_factory=lambda: api_key("service_role"))

    def page(self, path: str = "demo.html", **fragment: Any) -> str:
        """A page URL; its configuration travels in the fragment (never sent to servers)."""
        params = {"url": self.url, "key": self.anon_key} | {
            k: str(v) for k, v in fragment.items() if v is not None
        }
        return f"{self.url}/{path}#{urlencode(params)}"


@pytest.fixture
async def stack(database_url: str) -> AsyncIterator[Stack]:
    # Real time (supabase-js heartbeats every 25 s, so the 60 s idle close must stay
    # real), except the 5 s backoff before a join error: 1 s keeps refusals quick.
    realtime = RealtimeServer(
        database_url=database_url, timings=Timings(channel_error_backoff_s=JOIN_ERROR_DELAY_S)
    )
    app = web.Application()
    realtime.add_routes(app)
    PostgrestServer(database_url).add_routes(app)
    AuthStandIn(database_url).add_routes(app)
    app.router.add_static("/__tests__/", PAGES_DIR)
    app.router.add_static("/", FRONTEND_DIR)
    # Short shutdown: a page's idle keep-alive connections must not hold the teardown.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    realtime.host, realtime.port = "127.0.0.1", port
    try:
        yield Stack(f"http://127.0.0.1:{port}", database_url, realtime)
    finally:
        await runner.cleanup()


@dataclass
class Browser:
    """Opens pages, each in its own Chromium profile (a fresh user-data-dir)."""

    executable: str
    root: Path
    _pw: Any = None
    _contexts: list[Any] = field(default_factory=list)
    console: list[str] = field(default_factory=list)

    async def new_page(self, name: str = "page") -> Any:
        profile = self.root / f"profile-{len(self._contexts)}-{name}"
        context = await self._pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=self.executable,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 860},
        )
        self._contexts.append(context)
        page = context.pages[0] if context.pages else await context.new_page()
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        page.on("console", lambda m: self.console.append(f"[{name}] {m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.console.append(f"[{name}] pageerror: {e}"))
        return page

    async def close(self) -> None:
        for context in self._contexts:
            await context.close()
        self._contexts.clear()


@asynccontextmanager
async def _browser(executable: str, root: Path) -> AsyncIterator[Browser]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = Browser(executable, root, pw)
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def browser(
    chromium_executable: str, stack: Stack, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Browser]:
    # The harness pages load supabase-js from node_modules (the demo page: from vendor/).
    _require(SUPABASE_UMD / "supabase.js", "supabase-js (npm ci in examples/frontend)")
    # Depends on `stack` so that the pages close before the servers stop.
    async with _browser(chromium_executable, tmp_path) as b:
        yield b
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed and b.console:
            print("\n--- browser console ---\n" + "\n".join(b.console[-80:]))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]


def js_args(**kwargs: Any) -> str:
    return json.dumps(kwargs)
