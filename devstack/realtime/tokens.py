"""JWT checks with the real server's messages (ref §1 upgrade failures, §2 join reasons)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import jwt as pyjwt


class TokenProblem(Enum):
    MISSING = "missing"
    MALFORMED = "malformed"
    SIGNATURE = "signature"
    CLAIMS = "claims"
    EXPIRED = "expired"


@dataclass(frozen=True)
class TokenError(Exception):
    problem: TokenProblem
    expired_s_ago: int = 0

    def upgrade_message(self) -> str:
        """The `{"error": ...}` text of a refused upgrade (ref §1)."""
        return {
            TokenProblem.MISSING: "API key is missing",
            TokenProblem.MALFORMED: "The token provided is not a valid JWT",
            TokenProblem.SIGNATURE: "Failed to validate JWT signature",
            TokenProblem.CLAIMS: "Fields `role` and `exp` are required in JWT",
            TokenProblem.EXPIRED: "Token has expired",
        }[self.problem]

    def join_reason(self) -> str:
        """The `reason` of a refused join (ref §2)."""
        return {
            TokenProblem.MISSING: "MalformedJWT: The token provided is not a valid JWT",
            TokenProblem.MALFORMED: "MalformedJWT: The token provided is not a valid JWT",
            TokenProblem.SIGNATURE: "JwtSignatureError: Failed to validate JWT signature",
            TokenProblem.CLAIMS: "InvalidJWTToken: Fields `role` and `exp` are required in JWT",
            TokenProblem.EXPIRED: (
                f"InvalidJWTToken: Token has expired {self.expired_s_ago} seconds ago"
            ),
        }[self.problem]

    def shutdown_message(self) -> str:
        """The `system` error text when a joined channel's token fails (ref §2): the join
        reasons without their `Code: ` prefix."""
        if self.problem is TokenProblem.EXPIRED:
            return f"Token has expired {self.expired_s_ago} seconds ago"
        return self.join_reason().split(": ", 1)[1]


def verify_token(token: str | None, secret: str, now: float) -> dict[str, Any]:
    """Signature first, then `role` and `exp`, then expiry (ref §1: JWT with role and exp).

    Raises:
        TokenError: with the problem the real server would report.
    """
    if not token:
        raise TokenError(TokenProblem.MISSING)
    try:
        pyjwt.get_unverified_header(token)
    except pyjwt.InvalidTokenError as exc:
        raise TokenError(TokenProblem.MALFORMED) from exc
    try:
        claims: dict[str, Any] = pyjwt.decode(
            token,
            secret,
            algorithms=["HS256"],
            options={"verify_exp": False, "verify_aud": False, "verify_iat": False},
        )
    except pyjwt.InvalidSignatureError as exc:
        raise TokenError(TokenProblem.SIGNATURE) from exc
    except pyjwt.InvalidTokenError as exc:
        raise TokenError(TokenProblem.MALFORMED) from exc
    exp = claims.get("exp")
    if not claims.get("role") or not isinstance(exp, int | float):
        raise TokenError(TokenProblem.CLAIMS)
    if exp <= now:
        raise TokenError(TokenProblem.EXPIRED, max(0, math.floor(now - exp)))
    return claims
