"""Conformance of the PostgREST stand-in against the real embedded Postgres.

The table and policies here are the tests' own (the shape of the project's request
table: an owner column defaulting to `auth.uid()`, RLS on), so that the stand-in is
checked against RLS as it will meet it; the browser tests use the real migrations.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from devstack.jwt import api_key, sign, user_token
from devstack.postgrest import PostgrestServer, status_for_sqlstate

pytestmark = pytest.mark.integration

SCHEMA = """
CREATE TABLE public.notes (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  owner uuid NOT NULL DEFAULT auth.uid(),
  body text NOT NULL,
  meta jsonb,
  n int,
  created_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE public.notes ENABLE ROW LEVEL SECURITY;
CREATE POLICY notes_read ON public.notes FOR SELECT TO authenticated
  USING (owner = auth.uid());
CREATE POLICY notes_write ON public.notes FOR INSERT TO authenticated
  WITH CHECK (owner = auth.uid());
CREATE POLICY notes_update ON public.notes FOR UPDATE TO authenticated
  USING (owner = auth.uid()) WITH CHECK (owner = auth.uid());
GRANT ALL ON public.notes TO anon, authenticated, service_role;
"""

ALICE = "11111111-1111-4111-8111-111111111111"
BOB = "22222222-2222-4222-8222-222222222222"
ANON = api_key("anon")
SERVICE = api_key("service_role")


def headers(token: str | None = None, **extra: str) -> dict[str, str]:
    out = {"apikey": ANON}
    if token:
        out["Authorization"] = f"Bearer {token}"
    out.update(extra)
    return out


@pytest.fixture
async def client(database_url: str) -> AsyncIterator[TestClient[Any, Any]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute(
            "INSERT INTO public.notes (owner, body, n, meta) VALUES"
            " (%s, 'a1', 1, '{\"k\": [1, 2]}'), (%s, 'a2', 2, NULL), (%s, 'b1', 3, NULL)",
            (ALICE, ALICE, BOB),
        )
    app = web.Application()
    PostgrestServer(database_url).add_routes(app)
    async with TestClient(TestServer(app, host="127.0.0.1", port=0)) as c:
        yield c


async def test_select_sees_only_own_rows_under_rls(client: TestClient[Any, Any]) -> None:
    resp = await client.get(
        "/rest/v1/notes?select=body,n&order=n.desc", headers=headers(user_token(ALICE))
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
    assert await resp.json() == [{"body": "a2", "n": 2}, {"body": "a1", "n": 1}]
    assert resp.headers["Content-Range"] == "0-1/*"

    resp = await client.get("/rest/v1/notes?select=body", headers=headers(user_token(BOB)))
    assert await resp.json() == [{"body": "b1"}]


async def test_eq_filter_limit_offset_and_types(client: TestClient[Any, Any]) -> None:
    resp = await client.get(
        "/rest/v1/notes?select=*&body=eq.a1", headers=headers(user_token(ALICE))
    )
    (row,) = await resp.json()
    assert row["owner"] == ALICE
    assert row["meta"] == {"k": [1, 2]}  # jsonb stays structured
    assert uuid.UUID(row["id"])
    assert "T" in row["created_at"] and row["created_at"].endswith("+00:00")

    resp = await client.get(
        "/rest/v1/notes?select=n&order=n.asc&limit=1&offset=1", headers=headers(user_token(ALICE))
    )
    assert await resp.json() == [{"n": 2}]
    resp = await client.get("/rest/v1/notes?select=n&n=in.(1,3)", headers=headers(SERVICE))
    assert sorted(r["n"] for r in await resp.json()) == [1, 3]
    resp = await client.get(
        "/rest/v1/notes?select=n&meta=is.null&n=gte.2", headers=headers(SERVICE)
    )
    assert sorted(r["n"] for r in await resp.json()) == [2, 3]
    resp = await client.get("/rest/v1/notes?select=x:n&n=eq.1", headers=headers(SERVICE))
    assert await resp.json() == [{"x": 1}]


async def test_anon_sees_nothing_and_service_role_bypasses_rls(
    client: TestClient[Any, Any],
) -> None:
    resp = await client.get("/rest/v1/notes", headers=headers())
    assert resp.status == 200
    assert await resp.json() == []
    resp = await client.get("/rest/v1/notes?select=body", headers=headers(SERVICE))
    assert sorted(r["body"] for r in await resp.json()) == ["a1", "a2", "b1"]


async def test_insert_return_representation_applies_defaults(
    client: TestClient[Any, Any],
) -> None:
    body = {"body": "Grüße 東京 🚀", "meta": {"lang": "mixed"}}
    resp = await client.post(
        '/rest/v1/notes?columns="body","meta"&select=*',
        headers=headers(user_token(ALICE), Prefer="return=representation,missing=default"),
        json=body,
    )
    assert resp.status == 201, await resp.text()
    (row,) = await resp.json()
    assert row["body"] == "Grüße 東京 🚀"
    assert row["owner"] == ALICE  # DEFAULT auth.uid() from request.jwt.claims
    assert row["meta"] == {"lang": "mixed"}


async def test_insert_minimal_returns_empty_201(client: TestClient[Any, Any]) -> None:
    resp = await client.post(
        "/rest/v1/notes", headers=headers(user_token(BOB)), json=[{"body": "x"}, {"body": "y"}]
    )
    assert resp.status == 201
    assert await resp.text() == ""
    resp = await client.get(
        "/rest/v1/notes?select=body&order=body", headers=headers(user_token(BOB))
    )
    assert [r["body"] for r in await resp.json()] == ["b1", "x", "y"]


async def test_insert_for_another_user_is_refused_by_rls(client: TestClient[Any, Any]) -> None:
    resp = await client.post(
        "/rest/v1/notes",
        headers=headers(user_token(ALICE), Prefer="return=representation"),
        json={"body": "forged", "owner": BOB},
    )
    assert resp.status == 403
    assert await resp.json() == {
        "code": "42501",
        "details": None,
        "hint": None,
        "message": 'new row violates row-level security policy for table "notes"',
    }
    resp = await client.post("/rest/v1/notes", headers=headers(), json={"body": "anon"})
    assert resp.status == 401  # 42501 without a token
    assert (await resp.json())["code"] == "42501"


async def test_update_touches_only_own_rows(client: TestClient[Any, Any]) -> None:
    resp = await client.patch(
        "/rest/v1/notes?n=gte.1&select=body,n",
        headers=headers(user_token(ALICE), Prefer="return=representation"),
        json={"n": 9},
    )
    assert resp.status == 200
    assert sorted(r["body"] for r in await resp.json()) == ["a1", "a2"]
    resp = await client.get("/rest/v1/notes?select=n&body=eq.b1", headers=headers(SERVICE))
    assert await resp.json() == [{"n": 3}]


async def test_singular_object_and_pgrst116(client: TestClient[Any, Any]) -> None:
    singular = "application/vnd.pgrst.object+json"
    resp = await client.get(
        "/rest/v1/notes?select=body&body=eq.a1", headers=headers(user_token(ALICE), Accept=singular)
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith(singular)
    assert await resp.json(content_type=None) == {"body": "a1"}
    resp = await client.get(
        "/rest/v1/notes?select=body&body=eq.b1", headers=headers(user_token(ALICE), Accept=singular)
    )
    assert resp.status == 406
    assert await resp.json(content_type=None) == {
        "code": "PGRST116",
        "details": "The result contains 0 rows",
        "hint": None,
        "message": "JSON object requested, multiple (or no) rows returned",
    }


async def test_jwt_failures_are_401_with_pgrst_codes(client: TestClient[Any, Any]) -> None:
    forged = sign({"role": "service_role", "exp": 2**33}, "another-secret-of-at-least-32-chars!!")
    resp = await client.get("/rest/v1/notes", headers=headers(forged))
    assert resp.status == 401
    assert (await resp.json())["code"] == "PGRST301"
    assert resp.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')

    expired = user_token(ALICE, ttl_s=-10)
    resp = await client.get("/rest/v1/notes", headers=headers(expired))
    assert resp.status == 401
    assert await resp.json() == {
        "code": "PGRST303",
        "details": None,
        "hint": None,
        "message": "JWT expired",
    }

    resp = await client.get("/rest/v1/notes", headers=headers("not-a-jwt"))
    assert resp.status == 401
    assert (await resp.json())["code"] == "PGRST301"


async def test_gateway_requires_an_apikey(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/rest/v1/notes")
    assert resp.status == 401
    assert (await resp.json())["message"] == "No API key found in request"
    resp = await client.get("/rest/v1/notes", headers={"apikey": "nope"})
    assert resp.status == 401
    assert (await resp.json())["message"] == "Invalid API key"


async def test_schema_errors(client: TestClient[Any, Any]) -> None:
    svc = headers(SERVICE)
    resp = await client.get("/rest/v1/missing", headers=svc)
    assert resp.status == 404
    assert (await resp.json())["code"] == "PGRST205"
    resp = await client.get("/rest/v1/notes?select=nope", headers=svc)
    assert resp.status == 400
    assert (await resp.json())["code"] == "42703"
    resp = await client.get("/rest/v1/notes?n=approx.1", headers=svc)
    assert resp.status == 400
    assert (await resp.json())["code"] == "PGRST100"
    resp = await client.get("/rest/v1/notes?n=eq.notanumber", headers=svc)
    assert resp.status == 400
    assert (await resp.json())["code"] == "22P02"
    resp = await client.get(
        "/rest/v1/notes", headers=headers(SERVICE, **{"Accept-Profile": "auth"})
    )
    assert resp.status == 406
    assert (await resp.json())["code"] == "PGRST106"


async def test_constraint_violations_keep_postgres_details(client: TestClient[Any, Any]) -> None:
    resp = await client.post(
        "/rest/v1/notes", headers=headers(SERVICE), json={"owner": ALICE, "body": None}
    )
    assert resp.status == 400
    err = await resp.json()
    assert err["code"] == "23502"
    assert 'column "body"' in err["message"]
    assert err["details"].startswith("Failing row contains")

    resp = await client.post(
        "/rest/v1/notes",
        headers=headers(SERVICE),
        data=b"{not json",
    )
    assert resp.status == 400
    assert (await resp.json())["code"] == "PGRST102"


async def test_claims_are_visible_to_sql_as_request_jwt_claims(
    client: TestClient[Any, Any], database_url: str
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "CREATE VIEW public.whoami WITH (security_invoker = true) AS SELECT"
            " current_user::text AS role, auth.uid() AS uid,"
            " current_setting('request.jwt.claims', true)::jsonb ->> 'email' AS email,"
            " current_setting('request.method', true) AS method"
        )
        conn.execute("GRANT SELECT ON public.whoami TO anon, authenticated")
    token = user_token(ALICE, email="alice@example.test")
    resp = await client.get("/rest/v1/whoami", headers=headers(token))
    assert await resp.json() == [
        {"role": "authenticated", "uid": ALICE, "email": "alice@example.test", "method": "GET"}
    ]
    resp = await client.get("/rest/v1/whoami", headers=headers())
    assert (await resp.json())[0]["role"] == "anon"


async def test_cors_preflight(client: TestClient[Any, Any]) -> None:
    resp = await client.options("/rest/v1/notes")
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    assert "prefer" in resp.headers["Access-Control-Allow-Headers"]


def test_status_table() -> None:
    assert status_for_sqlstate("42501", authenticated=True) == 403
    assert status_for_sqlstate("42501", authenticated=False) == 401
    assert status_for_sqlstate("23505", authenticated=True) == 409
    assert status_for_sqlstate("08006", authenticated=True) == 503
    assert status_for_sqlstate("23502", authenticated=True) == 400


async def test_minimal_insert_needs_no_select_policy(
    client: TestClient[Any, Any], database_url: str
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE public.inbox (id serial PRIMARY KEY, body text);"
            "ALTER TABLE public.inbox ENABLE ROW LEVEL SECURITY;"
            "CREATE POLICY inbox_drop ON public.inbox FOR INSERT TO authenticated"
            " WITH CHECK (true);"
            "GRANT INSERT ON public.inbox TO authenticated;"
            "GRANT USAGE ON SEQUENCE public.inbox_id_seq TO authenticated;"
        )
    token = user_token(ALICE)
    resp = await client.post("/rest/v1/inbox", headers=headers(token), json={"body": "hi"})
    assert resp.status == 201
    resp = await client.post(
        "/rest/v1/inbox?select=*",
        headers=headers(token, Prefer="return=representation"),
        json={"body": "hi"},
    )
    assert resp.status == 403
    assert (await resp.json())["code"] == "42501"


async def test_rpc_calls_a_function_as_the_caller(
    client: TestClient[Any, Any], database_url: str
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION public.my_count(min_n int) RETURNS bigint LANGUAGE sql STABLE"
            " AS $$ SELECT count(*) FROM public.notes WHERE n >= min_n $$;"
            "CREATE FUNCTION public.my_notes() RETURNS SETOF public.notes LANGUAGE sql STABLE"
            " AS $$ SELECT * FROM public.notes ORDER BY n $$;"
            "CREATE FUNCTION public.secret() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$;"
            "REVOKE ALL ON FUNCTION public.secret() FROM PUBLIC, anon, authenticated;"
        )
    alice = headers(user_token(ALICE))
    resp = await client.post("/rest/v1/rpc/my_count", headers=alice, json={"min_n": 2})
    assert resp.status == 200
    assert await resp.json() == 1  # RLS: only alice's rows count
    resp = await client.post("/rest/v1/rpc/my_notes", headers=alice, json={})
    assert [r["body"] for r in await resp.json()] == ["a1", "a2"]
    resp = await client.post("/rest/v1/rpc/secret", headers=alice, json={})
    assert resp.status == 403
    assert (await resp.json())["code"] == "42501"
    resp = await client.post("/rest/v1/rpc/nope", headers=alice, json={})
    assert resp.status == 404
    assert (await resp.json())["code"] == "PGRST202"


async def test_a_select_cast_is_an_identifier_never_sql(client: TestClient[Any, Any]) -> None:
    """Issue 12: the cast was spliced into the statement when it matched letters and
    spaces, so `n::text from pg_roles union ...` ran as SQL."""
    svc = headers(SERVICE)
    injected = "body::name from pg_roles union select rolname from pg_roles"
    resp = await client.get(f"/rest/v1/notes?select={injected}", headers=svc)
    assert resp.status == 400
    assert (await resp.json())["code"] == "PGRST100"
    resp = await client.get("/rest/v1/notes?select=n::text&n=eq.1", headers=svc)
    assert resp.status == 200
    assert await resp.json() == [{"n": "1"}]
