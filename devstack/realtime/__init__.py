"""The local Supabase Realtime server (broadcast), the stand-in every guarantee is tested
against. See README.md here and shared/reference/supabase-realtime-protocol.md."""

from devstack.jwt import DEFAULT_JWT_SECRET

from .authorization import AuthContext, Authorizer, PostgresAuthorizer
from .faults import AckOutcome, Faults
from .limits import RealtimeLimits, Timings
from .server import RealtimeServer, RealtimeStats, Tenant

__all__ = [
    "DEFAULT_JWT_SECRET",
    "AckOutcome",
    "AuthContext",
    "Authorizer",
    "Faults",
    "PostgresAuthorizer",
    "RealtimeLimits",
    "RealtimeServer",
    "RealtimeStats",
    "Tenant",
    "Timings",
]
