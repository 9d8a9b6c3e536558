"""Shared fixtures: real embedded Postgres, one migrated template, a fresh DB per test."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack.postgres import EmbeddedPostgres, apply_schema, with_database
from devstack.stack import DevStack, StackOptions
from worker.config import Settings

TEMPLATE_DB = "relay_template"

# One time unit for sleeps and timeouts in tests; raise it on a slow machine.
MS = float(os.environ.get("RELAY_TEST_MS", "0.001"))


_OUR_ENV = ("RELAY_", "SUPABASE_", "OPENAI_", "GROQ_", "DATABASE_URL")


def env_without_ours() -> dict[str, str]:
    """This process's environment minus our settings, for subprocesses under test."""
    return {k: v for k, v in os.environ.items() if not k.startswith(_OUR_ENV)}


@pytest.fixture(autouse=True)
def isolated_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's `.env` or exported keys (the README suggests
    `llm-relay devstack > .env`): Settings come from what each test sets."""
    monkeypatch.setitem(Settings.model_config, "env_file", None)
    for name in list(os.environ):
        if name.startswith(_OUR_ENV):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[EmbeddedPostgres]:
    """A real PostgreSQL 16 for the whole session, with a migrated template database."""
    # Not under pytest's basetemp: pytest resets /tmp/pytest-of-<user> to mode 0700,
    # which locks out the unprivileged user pgserver runs postgres as (we run as root).
    root = Path(tempfile.mkdtemp(prefix="llm-relay-pg-"))
    data_dir = root / "data"
    pg = EmbeddedPostgres(data_dir)
    pg.start()
    template_url = pg.create_database(TEMPLATE_DB)
    apply_schema(template_url)
    try:
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def database_url(pg_cluster: EmbeddedPostgres) -> Iterator[str]:
    """A fresh database cloned from the migrated template; dropped afterwards."""
    url = pg_cluster.create_database(template=TEMPLATE_DB)
    name = url.rsplit("/", 1)[-1].split("?", 1)[0]
    try:
        yield url
    finally:
        pg_cluster.drop_database(name)


@pytest.fixture
def template_url(pg_cluster: EmbeddedPostgres) -> str:
    return with_database(pg_cluster.server_url, TEMPLATE_DB)


@contextlib.asynccontextmanager
async def running_stack(**options: Any) -> AsyncIterator[DevStack]:
    """A whole local stack on free ports (`StackOptions` fields as keywords)."""
    # Not under pytest's basetemp (mode 0700): pgserver runs postgres as another user.
    data_dir = Path(tempfile.mkdtemp(prefix="llm-relay-stack-"))
    devstack = DevStack(StackOptions(api_port=0, upstream_port=0, data_dir=data_dir, **options))
    await devstack.start()
    try:
        yield devstack
    finally:
        await devstack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
