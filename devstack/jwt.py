"""HS256 JWTs as Supabase issues them (anon / service_role keys, user sessions)."""

from __future__ import annotations

import time
from typing import Any

import jwt as pyjwt

# The Supabase CLI's well-known local secret: fine for a dev stack, never for production.
DEFAULT_JWT_SECRET = "super-secret-jwt-token-with-at-least-32-characters-long"
TEN_YEARS_S = 10 * 365 * 24 * 3600


def sign(claims: dict[str, Any], secret: str = DEFAULT_JWT_SECRET) -> str:
    return pyjwt.encode(claims, secret, algorithm="HS256")


def api_key(role: str, secret: str = DEFAULT_JWT_SECRET, *, ttl_s: int = TEN_YEARS_S) -> str:
    """An `anon` or `service_role` API key, like `supabase status` prints."""
    now = int(time.time())
    return sign({"iss": "supabase-demo", "role": role, "iat": now, "exp": now + ttl_s}, secret)


def user_token(
    user_id: str,
    secret: str = DEFAULT_JWT_SECRET,
    *,
    ttl_s: int = 3600,
    email: str | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """A signed-in user's access token (`role: authenticated`, `sub` = user id)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "aud": "authenticated",
        "role": "authenticated",
        "sub": user_id,
        "iat": now,
        "exp": now + ttl_s,
    }
    if email:
        claims["email"] = email
    if extra:
        claims.update(extra)
    return sign(claims, secret)


def verify(token: str, secret: str = DEFAULT_JWT_SECRET) -> dict[str, Any]:
    """Decode and check signature and expiry; raises `jwt.InvalidTokenError` subclasses."""
    claims: dict[str, Any] = pyjwt.decode(
        token, secret, algorithms=["HS256"], options={"verify_aud": False}
    )
    return claims
