"""The `/auth/v1` stand-in (anonymous sign-in) feeding the PostgREST stand-in."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from devstack.auth import AuthStandIn
from devstack.jwt import api_key, verify
from devstack.postgrest import PostgrestServer

pytestmark = pytest.mark.integration

ANON = {"apikey": api_key("anon")}


@pytest.fixture
async def client(database_url: str) -> AsyncIterator[TestClient[Any, Any]]:
    app = web.Application()
    AuthStandIn(database_url).add_routes(app)
    PostgrestServer(database_url).add_routes(app)
    async with TestClient(TestServer(app, host="127.0.0.1", port=0)) as c:
        yield c


async def test_anonymous_sign_up_gives_a_session_for_a_new_user(
    client: TestClient[Any, Any], database_url: str
) -> None:
    resp = await client.post("/auth/v1/signup", headers=ANON, json={"data": {}})
    assert resp.status == 200
    session = await resp.json()
    claims = verify(session["access_token"])
    user = session["user"]
    assert claims["role"] == "authenticated" and claims["sub"] == user["id"]
    assert claims["is_anonymous"] is True and user["is_anonymous"] is True
    assert session["token_type"] == "bearer" and session["expires_in"] == 3600
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT 1 FROM auth.users WHERE id = %s", (user["id"],)).fetchone()
    assert row is not None

    # the token works against PostgREST as that user (RLS: own rows only)
    bearer = ANON | {"Authorization": f"Bearer {session['access_token']}"}
    resp = await client.post(
        "/rest/v1/llm_requests?select=owner",
        headers=bearer | {"Prefer": "return=representation"},
        json={"messages": [{"role": "user", "content": "hi"}]},
    )
    assert resp.status == 201, await resp.text()
    assert await resp.json() == [{"owner": user["id"]}]

    resp = await client.get("/auth/v1/user", headers=bearer)
    assert (await resp.json())["id"] == user["id"]


async def test_refresh_tokens_are_single_use(client: TestClient[Any, Any]) -> None:
    first = await (await client.post("/auth/v1/signup", headers=ANON, json={})).json()
    resp = await client.post(
        "/auth/v1/token?grant_type=refresh_token",
        headers=ANON,
        json={"refresh_token": first["refresh_token"]},
    )
    second = await resp.json()
    assert resp.status == 200
    assert second["user"]["id"] == first["user"]["id"]
    assert second["refresh_token"] != first["refresh_token"]
    resp = await client.post(
        "/auth/v1/token?grant_type=refresh_token",
        headers=ANON,
        json={"refresh_token": first["refresh_token"]},
    )
    assert resp.status == 400
    assert (await resp.json())["error_code"] == "refresh_token_not_found"


async def test_refusals(client: TestClient[Any, Any]) -> None:
    resp = await client.post("/auth/v1/signup", json={})
    assert resp.status == 401
    resp = await client.post("/auth/v1/signup", headers=ANON, json={"email": "a@b.c"})
    assert resp.status == 422
    resp = await client.get("/auth/v1/user", headers=ANON | {"Authorization": "Bearer x"})
    assert resp.status == 403
