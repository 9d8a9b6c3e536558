"""The whole local stack in one process: what `supabase start` gives, minus Elixir.

- embedded PostgreSQL 16 (pgserver), migrated with `supabase/migrations`;
- one HTTP gateway on `SUPABASE_URL` (like Supabase's Kong) mounting the Realtime
  stand-in under `/realtime/v1`, the PostgREST stand-in under `/rest/v1`, and the
  demo page under `/demo/`;
- a simulated OpenAI-compatible upstream on its own port (`OPENAI_BASE_URL`).

`env()` returns the lines to paste into `.env`, like `supabase status -o env`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from devstack import jwt
from devstack.auth import AuthStandIn
from devstack.postgres import MIGRATIONS_DIR, REPO_ROOT, EmbeddedPostgres
from devstack.postgrest import PostgrestServer
from devstack.realtime import RealtimeLimits, RealtimeServer
from devstack.upstream import SimulatedUpstream
from worker.errors import ConfigError

DEFAULT_API_PORT = 54321  # the Supabase CLI's API port
DEFAULT_UPSTREAM_PORT = 54329
FRONTEND_DIR = REPO_ROOT / "examples" / "frontend"
SIMULATED_API_KEY = "sk-devstack-simulated"


@dataclass
class StackOptions:
    host: str = "127.0.0.1"
    api_port: int = DEFAULT_API_PORT
    upstream_port: int = DEFAULT_UPSTREAM_PORT
    data_dir: Path = field(default_factory=lambda: Path(".devstack"))
    jwt_secret: str = jwt.DEFAULT_JWT_SECRET
    limits: RealtimeLimits | None = None
    upstream_text: str | None = None
    upstream_reasoning_text: str = ""
    upstream_tokens_per_second: float = 60.0
    with_postgres: bool = True


class DevStack:
    """Start with `await stack.start()`, stop with `await stack.stop()` (in that order)."""

    def __init__(self, options: StackOptions | None = None) -> None:
        self.options = options or StackOptions()
        self.postgres: EmbeddedPostgres | None = None
        self.database_url: str | None = None
        self.realtime: RealtimeServer | None = None
        self.upstream: SimulatedUpstream | None = None
        self._runner: web.AppRunner | None = None
        self._api_port: int | None = None

    def check_sources(self) -> None:
        """Fail now, saying how to fix it, when the files the stack serves are absent.

        The migrations and the page live in the repository, not in the wheel: from a
        `pip install` the devstack would start with no schema and a page that cannot load.
        """
        needed = [FRONTEND_DIR / "demo.html", FRONTEND_DIR / "vendor" / "supabase.js"]
        if self.options.with_postgres:
            needed.append(MIGRATIONS_DIR)
        missing = [str(path) for path in needed if not path.exists()]
        if missing:
            raise ConfigError(
                f"the local stack needs {', '.join(missing)}: it runs from a clone of the "
                "repository (`git clone <repo> && cd llm-token-relay && make demo`); in a "
                "clone, `git checkout -- examples/frontend supabase` restores them"
            )

    async def start(self) -> None:
        self.check_sources()
        opts = self.options
        if opts.with_postgres:
            self.postgres = EmbeddedPostgres(opts.data_dir / "pg")
            # pgserver blocks while initdb / pg_ctl run: keep the loop free.
            self.database_url = await asyncio.to_thread(self.postgres.start)
        self.realtime = RealtimeServer(
            host=opts.host,
            jwt_secret=opts.jwt_secret,
            limits=opts.limits,
            database_url=self.database_url,
        )
        app = web.Application(client_max_size=8 * 1024 * 1024)
        self.realtime.add_routes(app)
        if self.database_url is not None:
            PostgrestServer(database_url=self.database_url, jwt_secret=opts.jwt_secret).add_routes(
                app
            )
        AuthStandIn(database_url=self.database_url, jwt_secret=opts.jwt_secret).add_routes(app)
        # Registered before the static route so that it wins over a file of that name.
        app.router.add_get("/demo/demo-config.json", self._demo_config)
        app.router.add_static("/demo/", FRONTEND_DIR, show_index=False)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, opts.host, opts.api_port)
        await site.start()
        self._api_port = _bound_port(site)
        upstream_kwargs: dict[str, Any] = {
            "host": opts.host,
            "port": opts.upstream_port,
            "tokens_per_second": opts.upstream_tokens_per_second,
            "api_key": SIMULATED_API_KEY,
            "reasoning_text": opts.upstream_reasoning_text,
        }
        if opts.upstream_text is not None:
            upstream_kwargs["text"] = opts.upstream_text
        self.upstream = SimulatedUpstream(**upstream_kwargs)
        await self.upstream.start()

    async def _demo_config(self, request: web.Request) -> web.Response:
        """What the demo page needs to talk to this stack (it signs in anonymously)."""
        config: dict[str, Any] = {"url": self.api_url, "anonKey": self.anon_key()}
        if self.options.limits is not None:
            config["budget"] = self.options.limits.max_events_per_second
        return web.json_response(config, headers={"Cache-Control": "no-store"})

    @property
    def demo_page_url(self) -> str:
        return f"{self.api_url}/demo/demo.html"

    @property
    def api_url(self) -> str:
        if self._api_port is None:
            raise RuntimeError("stack not started")
        return f"http://{self.options.host}:{self._api_port}"

    def anon_key(self) -> str:
        return jwt.api_key("anon", self.options.jwt_secret)

    def service_role_key(self) -> str:
        return jwt.api_key("service_role", self.options.jwt_secret)

    def env(self) -> dict[str, str]:
        """The settings a worker needs to use this stack (the `.env` lines)."""
        return {**self.supabase_env(), **self.simulator_env()}

    def supabase_env(self) -> dict[str, str]:
        """The Supabase and queue lines alone: what a worker with its own provider needs."""
        env = {
            "SUPABASE_URL": self.api_url,
            "SUPABASE_ANON_KEY": self.anon_key(),
            "SUPABASE_SERVICE_ROLE_KEY": self.service_role_key(),
        }
        if self.database_url:
            env["DATABASE_URL"] = self.database_url
        return env

    def simulator_env(self) -> dict[str, str]:
        """The provider lines that point a worker at the simulated upstream."""
        if self.upstream is None:
            raise RuntimeError("stack not started")
        return {
            "OPENAI_BASE_URL": self.upstream.base_url,
            "OPENAI_API_KEY": SIMULATED_API_KEY,
            "RELAY_PROVIDER": "openai",
        }

    async def stop(self) -> None:
        if self.upstream is not None:
            await self.upstream.stop()
            self.upstream = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.postgres is not None:
            await asyncio.to_thread(self.postgres.stop)
            self.postgres = None


def _bound_port(site: web.TCPSite) -> int:
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    for sock in sockets:
        return int(sock.getsockname()[1])
    raise RuntimeError("gateway did not bind")
