"""`ScriptedRunner`: a stream runner without upstream or Realtime, for tests and drills.

It "generates" deterministic tokens (`t0 `, `t1 `, ...: token i is the same on
every worker, so a takeover can be checked exactly), records a snapshot after
each one as a real relay does after each acked batch, and honours the worker's
aborts. `llm-relay run --runner worker.service.testing:scripted -o tokens=200
-o delay_ms=20` runs a worker with it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from worker.config import Settings
from worker.errors import RelayError
from worker.jobs.models import Job, Snapshot
from worker.service.context import Outcome, StreamContext


def scripted_token(offset: int) -> str:
    return f"t{offset} "


def scripted_text(start: int, stop: int) -> str:
    return "".join(scripted_token(i) for i in range(start, stop))


@dataclass
class ScriptedRunner:
    """Deterministic tokens at a fixed pace; `published` is what a subscriber got."""

    tokens: int = 50
    delay_s: float = 0.01
    reasoning_tokens: int = 0
    fail_at: int | None = None
    fail_with: RelayError | None = None
    fail_times: int = 1_000_000  # how many streams fail at `fail_at` before it works
    stubborn: bool = False  # ignores aborts: the worker must cancel it
    published: list[tuple[str, int, str]] = field(default_factory=list)  # (job, offset, text)
    statuses: list[tuple[str, str]] = field(default_factory=list)  # (job, llm-status kind)
    started: list[str] = field(default_factory=list)
    # (job, attempt, offset, time.monotonic()) of every token "published": what the
    # fault tests check for two workers publishing one stream at once.
    sends: list[tuple[str, int, int, float]] = field(default_factory=list)

    async def __call__(self, job: Job, ctx: StreamContext) -> Outcome:
        self.started.append(job.id)
        snapshot = ctx.start
        total = min(self.tokens, ctx.request.max_tokens or self.tokens)
        for offset in range(snapshot.next_offset, total):
            if await self._pause(ctx):
                return self._stopped(job, ctx, snapshot)
            if self._should_fail(offset):
                self.fail_times -= 1
                assert self.fail_with is not None
                raise self.fail_with
            text = scripted_token(offset)
            self.published.append((job.id, offset, text))
            self.sends.append((job.id, job.attempts, offset, time.monotonic()))
            reasoning = offset < self.reasoning_tokens
            snapshot = Snapshot(
                content=snapshot.content + ("" if reasoning else text),
                reasoning=snapshot.reasoning + (text if reasoning else ""),
                next_offset=offset + 1,
                next_seq=snapshot.next_seq + 1,
            )
            ctx.record(snapshot)
        finish_reason = "length" if total < self.tokens else "stop"
        usage = {"completion_tokens": total}
        return Outcome("done", snapshot, finish_reason=finish_reason, usage=usage)

    def _should_fail(self, offset: int) -> bool:
        return (
            self.fail_with is not None
            and self.fail_at is not None
            and offset >= self.fail_at
            and self.fail_times > 0
        )

    async def _pause(self, ctx: StreamContext) -> bool:
        """Wait one token's time; True when the worker asked to stop."""
        if self.stubborn:
            await asyncio.sleep(self.delay_s)
            return False
        try:
            await asyncio.wait_for(ctx.aborted.wait(), timeout=self.delay_s)
        except TimeoutError:
            return False
        return True

    def _stopped(self, job: Job, ctx: StreamContext, snapshot: Snapshot) -> Outcome:
        if ctx.abort_reason == "cancelled":
            self.statuses.append((job.id, "cancelled"))  # what llm-status would carry
            return Outcome("cancelled", snapshot, finish_reason="cancelled")
        return Outcome("interrupted", snapshot)


def scripted(settings: Settings, **options: str) -> ScriptedRunner:
    """Runner factory for `llm-relay run --runner worker.service.testing:scripted`.

    Options: tokens, delay_ms, reasoning_tokens (integers).
    """
    known = {"tokens", "delay_ms", "reasoning_tokens"}
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"unknown scripted runner options: {sorted(unknown)}")
    kwargs: dict[str, Any] = {
        "tokens": int(options.get("tokens", "50")),
        "delay_s": float(options.get("delay_ms", "10")) / 1000,
        "reasoning_tokens": int(options.get("reasoning_tokens", "0")),
    }
    return ScriptedRunner(**kwargs)
