"""Plain policy objects standing in for RLS where a test is not about Postgres."""

from __future__ import annotations

from dataclasses import dataclass, field

from devstack.realtime import AuthContext


@dataclass
class TopicPolicy:
    """Read / write allowed for the listed sub-topics; counts the checks asked."""

    readable: set[str] = field(default_factory=set)
    writable: set[str] = field(default_factory=set)
    reads: int = 0
    writes: int = 0

    async def can_read(self, ctx: AuthContext) -> bool:
        self.reads += 1
        return ctx.sub_topic in self.readable

    async def can_write(self, ctx: AuthContext) -> bool:
        self.writes += 1
        return ctx.sub_topic in self.writable
