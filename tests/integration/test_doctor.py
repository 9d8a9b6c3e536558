"""`llm-relay doctor --json` as a subprocess against the local stack, healthy and broken.

Each test starts the real pieces on this test's loop (embedded Postgres through the
`database_url` fixtures, the Realtime stand-in authorizing private joins with that
database's RLS, the simulated upstream) and runs the CLI in a child process, as a user
would; the child's report is the only thing asserted on.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from devstack.jwt import api_key
from devstack.postgres import EmbeddedPostgres, apply_schema
from devstack.realtime import RealtimeLimits, RealtimeServer
from devstack.upstream import SimulatedUpstream
from tests.conftest import env_without_ours
from worker.config import Settings
from worker.service import diagnosis as d
from worker.service.doctor import DoctorTimeouts, health_check
from worker.service.http import HealthServer
from worker.service.metrics import Metrics

pytestmark = pytest.mark.integration

UPSTREAM_KEY = "sk-doctor-simulated"
RUN_TIMEOUT_S = 45.0  # the doctor bounds itself under 30 s; this only stops a hang
# Broken setups need not wait the real 2 s / 5 s refusal backoffs; the healthy run does.
FAST = 0.01


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Stack:
    realtime: RealtimeServer
    upstream: SimulatedUpstream
    database_url: str
    env: dict[str, str] = field(default_factory=dict)

    def base_env(self) -> dict[str, str]:
        return {
            "SUPABASE_URL": self.realtime.url,
            "SUPABASE_ANON_KEY": api_key("anon"),
            "SUPABASE_SERVICE_ROLE_KEY": api_key("service_role"),
            "DATABASE_URL": self.database_url,
            "OPENAI_BASE_URL": self.upstream.base_url,
            "OPENAI_API_KEY": UPSTREAM_KEY,
            "RELAY_PROVIDER": "openai",
            "RELAY_HTTP_HOST": "127.0.0.1",
            "RELAY_HTTP_PORT": str(_closed_port()),
        }


@dataclass
class Outcome:
    code: int
    report: dict[str, Any]
    stdout: str
    stderr: str

    def check(self, name: str) -> dict[str, Any]:
        for check in self.report["checks"]:
            if check["name"] == name:
                return dict(check)
        raise AssertionError(f"no check {name!r} in {self.names}")

    @property
    def names(self) -> list[str]:
        return [c["name"] for c in self.report["checks"]]

    @property
    def failing(self) -> list[str]:
        return [c["name"] for c in self.report["checks"] if not c["ok"]]


async def run_doctor(env: dict[str, str], cwd: Path) -> Outcome:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "doctor",
        "--json",
        env={**env_without_ours(), **env},
        cwd=cwd,  # no stray .env
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    stdout, stderr = out.decode(), err.decode()
    assert proc.returncode is not None
    return Outcome(proc.returncode, orjson.loads(stdout), stdout, stderr)


@contextlib.asynccontextmanager
async def started(
    database_url: str, *, time_scale: float = FAST, limits: RealtimeLimits | None = None
) -> AsyncIterator[Stack]:
    realtime = RealtimeServer(database_url=database_url, time_scale=time_scale, limits=limits)
    upstream = SimulatedUpstream(api_key=UPSTREAM_KEY, text="OK")
    await realtime.start()
    await upstream.start()
    try:
        yield Stack(realtime, upstream, database_url)
    finally:
        await upstream.stop()
        await realtime.stop()


def assert_no_keys(outcome: Outcome, env: dict[str, str]) -> None:
    for name in ("SUPABASE_ANON_KEY", "SUPABASE_SERVICE_ROLE_KEY", "OPENAI_API_KEY"):
        assert env[name] not in outcome.stdout, f"{name} printed"
        assert env[name] not in outcome.stderr, f"{name} logged"


EXPECTED_NAMES = [
    d.CHECK_SETTINGS,
    d.CHECK_DATABASE,
    d.CHECK_DATABASE_MODE,
    d.CHECK_MIGRATIONS,
    d.CHECK_REALTIME,
    d.CHECK_PRIVATE_JOIN,
    d.CHECK_PRIVATE_ONLY,
    d.CHECK_BROADCAST,
    d.CHECK_REST,
    "provider:openai",
    "provider:groq",
    d.CHECK_HEALTH,
]
ONE_PROVIDER_NAMES = [n for n in EXPECTED_NAMES if n != "provider:groq"]


async def test_devstack_all_checks_pass(database_url: str, tmp_path: Path) -> None:
    # Real server delays: a refused join answers after 5 s, and the run must still pass.
    async with (
        started(database_url, time_scale=1.0) as stack,
        SimulatedUpstream(api_key="gsk-doctor", provider="groq", text="OK") as groq,
    ):
        env = stack.base_env() | {
            "RELAY_FALLBACK_PROVIDERS": "groq",
            "GROQ_BASE_URL": groq.base_url,
            "GROQ_API_KEY": "gsk-doctor",
        }
        outcome = await run_doctor(env, tmp_path)
    assert outcome.failing == [], outcome.report
    assert outcome.code == 0
    assert outcome.report["ok"] is True
    assert outcome.names == EXPECTED_NAMES
    for check in outcome.report["checks"]:
        assert set(check) == {"name", "ok", "detail"}
        assert isinstance(check["detail"], str) and check["detail"]
    assert "Unauthorized" in outcome.check(d.CHECK_PRIVATE_ONLY)["detail"]
    # The stand-in's default, like a new project's: "Allow public access" on.
    assert "public channels allowed" in outcome.check(d.CHECK_PRIVATE_ONLY)["detail"]
    assert "delivered" in outcome.check(d.CHECK_REST)["detail"]
    assert_no_keys(outcome, env)


async def test_postgres_port_closed(database_url: str, tmp_path: Path) -> None:
    async with started(database_url) as stack:
        env = stack.base_env() | {
            "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{_closed_port()}/postgres"
        }
        outcome = await run_doctor(env, tmp_path)
    assert outcome.code == 1
    assert outcome.report["ok"] is False
    # Every check still ran; the database ones fail, the rest do not.
    assert outcome.names == ONE_PROVIDER_NAMES
    assert outcome.failing == [d.CHECK_DATABASE, d.CHECK_DATABASE_MODE, d.CHECK_MIGRATIONS]
    assert "refused" in outcome.check(d.CHECK_DATABASE)["detail"].lower()


@pytest.fixture
def bare_database_url(pg_cluster: EmbeddedPostgres, tmp_path: Path) -> Iterator[str]:
    """A fresh database with Supabase's shape (the shim) but none of our migrations,
    like a new Supabase project before `supabase db push`."""
    url = pg_cluster.create_database()
    empty = tmp_path / "no-migrations"
    empty.mkdir()
    apply_schema(url, migrations_dir=empty)
    try:
        yield url
    finally:
        pg_cluster.drop_database(url.rsplit("/", 1)[-1].split("?", 1)[0])


async def test_migrations_missing(bare_database_url: str, tmp_path: Path) -> None:
    async with started(bare_database_url) as stack:
        outcome = await run_doctor(stack.base_env(), tmp_path)
    assert outcome.code == 1
    assert outcome.failing == [d.CHECK_MIGRATIONS]
    detail = outcome.check(d.CHECK_MIGRATIONS)["detail"]
    assert "public.llm_requests" in detail


async def test_wrong_service_key(database_url: str, tmp_path: Path) -> None:
    other_project = api_key("service_role", "another-projects-jwt-secret-of-32-characters")
    async with started(database_url) as stack:
        env = stack.base_env() | {"SUPABASE_SERVICE_ROLE_KEY": other_project}
        outcome = await run_doctor(env, tmp_path)
    assert outcome.code == 1
    assert d.CHECK_REALTIME in outcome.failing
    assert "Failed to validate JWT signature" in outcome.check(d.CHECK_REALTIME)["detail"]
    assert "401" in outcome.check(d.CHECK_REST)["detail"]
    assert not outcome.check(d.CHECK_REST)["ok"]
    assert outcome.check(d.CHECK_PRIVATE_ONLY)["ok"]  # the anon side is not to blame
    assert_no_keys(outcome, env)


async def test_private_topics_readable_by_anon(database_url: str, tmp_path: Path) -> None:
    # The classic mistake: a policy "so that the frontend can subscribe" granted to anon.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "CREATE POLICY anyone_reads ON realtime.messages FOR SELECT TO anon USING (true)"
        )
    async with started(database_url) as stack:
        outcome = await run_doctor(stack.base_env(), tmp_path)
    assert outcome.code == 1
    assert outcome.failing == [d.CHECK_PRIVATE_ONLY]
    assert "anon key joined private topic" in outcome.check(d.CHECK_PRIVATE_ONLY)["detail"]


async def test_private_only_project_is_reported(database_url: str, tmp_path: Path) -> None:
    # "Allow public access" off (ref §2 PrivateOnly): still all green, and said so.
    async with started(database_url, limits=RealtimeLimits(private_only=True)) as stack:
        outcome = await run_doctor(stack.base_env(), tmp_path)
    assert outcome.code == 0, outcome.report
    assert "public channels refused" in outcome.check(d.CHECK_PRIVATE_ONLY)["detail"]


async def test_public_worker_channels_on_a_private_only_project(
    database_url: str, tmp_path: Path
) -> None:
    async with started(database_url, limits=RealtimeLimits(private_only=True)) as stack:
        env = stack.base_env() | {"RELAY_PRIVATE_CHANNELS": "false"}
        outcome = await run_doctor(env, tmp_path)
    assert outcome.code == 1
    assert outcome.failing == [d.CHECK_PRIVATE_JOIN, d.CHECK_PRIVATE_ONLY, d.CHECK_BROADCAST]
    assert "PrivateOnly" in outcome.check(d.CHECK_PRIVATE_JOIN)["detail"]


async def test_provider_unreachable(database_url: str, tmp_path: Path) -> None:
    async with started(database_url) as stack:
        env = stack.base_env() | {"OPENAI_BASE_URL": f"http://127.0.0.1:{_closed_port()}/v1"}
        outcome = await run_doctor(env, tmp_path)
    assert outcome.code == 1
    assert outcome.failing == ["provider:openai"]
    assert "connection_lost" in outcome.check("provider:openai")["detail"]


async def test_invalid_settings_reported_as_the_first_check(tmp_path: Path) -> None:
    outcome = await run_doctor({"RELAY_BATCH_SIZE": "many"}, tmp_path)
    assert outcome.code == 1
    assert outcome.names[0] == d.CHECK_SETTINGS
    assert "RELAY_BATCH_SIZE" in outcome.check(d.CHECK_SETTINGS)["detail"]
    assert outcome.failing == outcome.names  # nothing else could run


async def test_health_port_states() -> None:
    timeouts = DoctorTimeouts()
    port = _closed_port()
    settings = Settings(RELAY_HTTP_HOST="127.0.0.1", RELAY_HTTP_PORT=port)
    assert (await health_check(settings, timeouts)).detail.endswith(
        "is free for the worker's /healthz, /readyz"
    )

    ready = {"value": True}
    server = HealthServer(
        metrics=Metrics(), live=lambda: True, ready=lambda: ready["value"], host="127.0.0.1"
    )
    bound = await server.start()
    try:
        settings = Settings(RELAY_HTTP_HOST="127.0.0.1", RELAY_HTTP_PORT=bound)
        result = await health_check(settings, timeouts)
        assert result.ok and "/readyz 200" in result.detail
        ready["value"] = False
        result = await health_check(settings, timeouts)
        assert not result.ok and "not ready" in result.detail
    finally:
        await server.close()

    # Something else holds the port and does not speak HTTP.
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    squatter = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        taken = int(squatter.sockets[0].getsockname()[1])
        settings = Settings(RELAY_HTTP_HOST="127.0.0.1", RELAY_HTTP_PORT=taken)
        result = await health_check(settings, timeouts)
        assert not result.ok and "in use" in result.detail
    finally:
        squatter.close()
        await squatter.wait_closed()
