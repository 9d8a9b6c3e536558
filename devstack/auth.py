"""A minimal `/auth/v1` (GoTrue) stand-in: anonymous sign-in for the demo page.

Enough for supabase-js `auth.signInAnonymously()` to give a page its own user, the way
a Supabase project with anonymous sign-ins enabled does:

- `POST /auth/v1/signup` without email or phone: a new anonymous user (a row in
  `auth.users` when a database is given) and a session (HS256 access token signed with
  the stack's JWT secret: `role: authenticated`, `sub`, `is_anonymous: true`).
- `POST /auth/v1/token?grant_type=refresh_token`: a new session for the same user
  (refresh tokens are single-use and kept in memory).
- `GET /auth/v1/user`: the user of the bearer token. `POST /auth/v1/logout`: 204.

Errors are GoTrue-shaped (`{"code", "error_code", "msg"}`); the gateway's apikey check
is the same as for `/rest/v1`. Everything else (email, phone, OAuth, MFA, admin API)
is left out.
"""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt as pyjwt
import psycopg
from aiohttp import web

from devstack.jwt import DEFAULT_JWT_SECRET, sign

SESSION_TTL_S = 3600
_CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": (
        "apikey, authorization, content-type, x-client-info, x-supabase-api-version"
    ),
}


def _error(status: int, error_code: str, msg: str) -> web.Response:
    return web.json_response(
        {"code": status, "error_code": error_code, "msg": msg}, status=status, headers=_CORS
    )


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


@dataclass
class AuthStandIn:
    """Anonymous users and sessions; mount with `add_routes(app)`."""

    database_url: str | None = None
    jwt_secret: str = DEFAULT_JWT_SECRET
    _refresh: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _users: dict[str, float] = field(default_factory=dict, init=False, repr=False)

    def add_routes(self, app: web.Application, prefix: str = "/auth/v1") -> None:
        for path in ("/signup", "/token", "/user", "/logout"):
            app.router.add_route("OPTIONS", prefix + path, self._preflight)
        app.router.add_post(prefix + "/signup", self._signup)
        app.router.add_post(prefix + "/token", self._token)
        app.router.add_get(prefix + "/user", self._user)
        app.router.add_post(prefix + "/logout", self._logout)

    async def _preflight(self, request: web.Request) -> web.Response:
        return web.Response(status=200, headers=_CORS)

    def _apikey_ok(self, request: web.Request) -> bool:
        key = request.headers.get("apikey") or request.query.get("apikey")
        if not key:
            return False
        try:
            pyjwt.decode(key, self.jwt_secret, algorithms=["HS256"])
        except pyjwt.InvalidTokenError:
            return False
        return True

    async def _signup(self, request: web.Request) -> web.Response:
        if not self._apikey_ok(request):
            return _error(401, "no_authorization", "Invalid API key")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "bad_json", "Could not parse request body as JSON")
        if not isinstance(body, dict):
            return _error(400, "bad_json", "Could not parse request body as JSON")
        if body.get("email") or body.get("phone"):
            return _error(422, "signup_disabled", "Only anonymous sign-ins are served here")
        user_id = str(uuid.uuid4())
        now = time.time()
        if self.database_url:
            async with await psycopg.AsyncConnection.connect(self.database_url) as conn:
                await conn.execute("INSERT INTO auth.users (id) VALUES (%s)", (user_id,))
        self._users[user_id] = now
        data = body.get("data")
        metadata: dict[str, Any] = data if isinstance(data, dict) else {}
        return web.json_response(self._session(user_id, metadata), headers=_CORS)

    async def _token(self, request: web.Request) -> web.Response:
        if not self._apikey_ok(request):
            return _error(401, "no_authorization", "Invalid API key")
        if request.query.get("grant_type") != "refresh_token":
            return _error(400, "validation_failed", "unsupported_grant_type")
        try:
            body = await request.json()
        except ValueError:
            body = {}
        token = body.get("refresh_token") if isinstance(body, dict) else None
        user_id = self._refresh.pop(str(token), None) if token else None
        if user_id is None:
            return _error(
                400, "refresh_token_not_found", "Invalid Refresh Token: Refresh Token Not Found"
            )
        return web.json_response(self._session(user_id, {}), headers=_CORS)

    async def _user(self, request: web.Request) -> web.Response:
        claims = self._bearer(request)
        if claims is None:
            return _error(403, "bad_jwt", "invalid JWT: unable to parse or verify signature")
        return web.json_response(self._user_json(str(claims.get("sub")), {}), headers=_CORS)

    async def _logout(self, request: web.Request) -> web.Response:
        if self._bearer(request) is None:
            return _error(403, "bad_jwt", "invalid JWT: unable to parse or verify signature")
        return web.Response(status=204, headers=_CORS)

    def _bearer(self, request: web.Request) -> dict[str, Any] | None:
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() != "bearer ":
            return None
        try:
            claims: dict[str, Any] = pyjwt.decode(
                auth[7:].strip(),
                self.jwt_secret,
                algorithms=["HS256"],
                options={"verify_aud": False},
            )
        except pyjwt.InvalidTokenError:
            return None
        return claims

    def _user_json(self, user_id: str, metadata: dict[str, Any]) -> dict[str, Any]:
        created = _iso(self._users.get(user_id, time.time()))
        return {
            "id": user_id,
            "aud": "authenticated",
            "role": "authenticated",
            "email": "",
            "phone": "",
            "is_anonymous": True,
            "app_metadata": {},
            "user_metadata": metadata,
            "identities": [],
            "created_at": created,
            "updated_at": created,
        }

    def _session(self, user_id: str, metadata: dict[str, Any]) -> dict[str, Any]:
        now = int(time.time())
        access = sign(
            {
                "aud": "authenticated",
                "role": "authenticated",
                "sub": user_id,
                "iat": now,
                "exp": now + SESSION_TTL_S,
                "is_anonymous": True,
                "session_id": str(uuid.uuid4()),
                "aal": "aal1",
                "app_metadata": {},
                "user_metadata": metadata,
            },
            self.jwt_secret,
        )
        refresh = secrets.token_urlsafe(16)
        self._refresh[refresh] = user_id
        return {
            "access_token": access,
            "token_type": "bearer",
            "expires_in": SESSION_TTL_S,
            "expires_at": now + SESSION_TTL_S,
            "refresh_token": refresh,
            "user": self._user_json(user_id, metadata),
        }
