"""Embedded PostgreSQL 16 (pgserver from PyPI; works as root) with Supabase's shape.

`EmbeddedPostgres.start()` initialises a data directory (once), starts the server
on a Unix socket, applies `sql/supabase_shim.sql` and then `supabase/migrations/*.sql`
in name order, each once (recorded in `devstack_meta.applied`), exactly as
`supabase db push` would apply them to a real project.

Tests clone a fresh database per test from a migrated template
(`create_database(template=...)`), which costs tens of milliseconds.
"""

from __future__ import annotations

import importlib
import re
import secrets
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

SHIM_SQL = Path(__file__).with_name("sql") / "supabase_shim.sql"
REPO_ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS_DIR = REPO_ROOT / "supabase" / "migrations"

_META = """
CREATE SCHEMA IF NOT EXISTS devstack_meta;
CREATE TABLE IF NOT EXISTS devstack_meta.applied (
  name text PRIMARY KEY,
  applied_at timestamptz NOT NULL DEFAULT now()
);
"""


def with_database(url: str, database: str) -> str:
    """The same server URL, pointing at another database."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


def migration_files(directory: Path = MIGRATIONS_DIR) -> list[Path]:
    return sorted(p for p in directory.glob("*.sql") if p.is_file())


def apply_schema(url: str, migrations_dir: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply the shim, then every migration not yet applied. Returns the names applied."""
    applied_now: list[str] = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SHIM_SQL.read_text())
        conn.execute(_META)
        done = {row[0] for row in conn.execute("SELECT name FROM devstack_meta.applied")}
        for path in migration_files(migrations_dir):
            if path.name in done:
                continue
            with conn.transaction():
                conn.execute(path.read_text())
                conn.execute("INSERT INTO devstack_meta.applied (name) VALUES (%s)", (path.name,))
            applied_now.append(path.name)
    return applied_now


@dataclass
class EmbeddedPostgres:
    """A real PostgreSQL server in `data_dir`, reached over a Unix socket."""

    data_dir: Path
    database: str = "postgres"
    _server: Any = field(default=None, init=False, repr=False)

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            # platformdirs warns that XDG_RUNTIME_DIR is unset (root, no session): harmless.
            # pgserver asks for that directory when it is imported, too.
            warnings.simplefilter("ignore")
            # devstack-only dependency, untyped re-export
            get_server = importlib.import_module("pgserver").get_server
            self._server = get_server(str(self.data_dir), cleanup_mode="stop")
        url = self.url
        apply_schema(url)
        return url

    @property
    def server_url(self) -> str:
        if self._server is None:
            raise RuntimeError("EmbeddedPostgres not started")
        return str(self._server.get_uri())

    @property
    def url(self) -> str:
        return with_database(self.server_url, self.database)

    def create_database(self, name: str | None = None, *, template: str | None = None) -> str:
        """Create a database (optionally cloned from `template`) and return its URL."""
        name = name or f"t_{secrets.token_hex(6)}"
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"bad database name {name!r}")
        with psycopg.connect(self.server_url, autocommit=True) as conn:
            stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
            if template:
                stmt = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(template)
                )
            conn.execute(stmt)
        return with_database(self.server_url, name)

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.server_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def stop(self) -> None:
        if self._server is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the same platformdirs warning as start()
                self._server.cleanup()
            self._server = None
