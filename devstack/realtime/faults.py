"""Fault hooks for tests (ref §9 "Test hooks").

The real server can be slow, can go away, and can refuse; these hooks make the local one
do so on demand, so that the worker's retry, fallback and reconnect paths are exercised
against a server that otherwise behaves exactly like Realtime.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .server import RealtimeServer


class AckOutcome(Enum):
    """What happens to one acked broadcast push (a channel joined with `broadcast.ack`)."""

    OK = "ok"  # normal: delivered, `ok` reply
    REJECT = "reject"  # not delivered, `error` reply with `reject_response`
    DELAY = "delay"  # delivered, `ok` reply after `ack_delay_s`
    DROP = "drop"  # not delivered, never replied (like an unauthorized private send)
    LOSE_REPLY = "lose_reply"  # delivered, never replied (the reply was lost)


# An object, so realtime-py's strict parser hands it to `.receive("error")`; the real
# server's only broadcast error is the bare string "payload_size_exceeded" (ref §3).
DEFAULT_REJECT_RESPONSE: dict[str, Any] = {"reason": "InjectedFault: push rejected by test hook"}


@dataclass
class Faults:
    """Switches read by the server on every frame. Reset with `clear()`.

    Attributes:
        stall_heartbeat: do not reply to `heartbeat` (the socket otherwise works).
        stall_pong: do not answer WebSocket pings (websockets closes 1011 after its timeout).
        ack_delay_s: real seconds a DELAY outcome holds its reply.
        reject_response: the `response` of a REJECT reply.
        refuse_upgrades: refuse this many next upgrades with 500 "Error connecting to
            Realtime" (after the connect backoff); -1 refuses all until cleared.
    """

    server: RealtimeServer | None = None
    stall_heartbeat: bool = False
    stall_pong: bool = False
    ack_delay_s: float = 1.0
    reject_response: Any = field(default_factory=lambda: dict(DEFAULT_REJECT_RESPONSE))
    refuse_upgrades: int = 0
    _script: deque[AckOutcome] = field(default_factory=deque)
    _shares: dict[AckOutcome, float] = field(default_factory=dict)
    _rng: random.Random = field(default_factory=lambda: random.Random(0))
    outcomes_applied: dict[AckOutcome, int] = field(default_factory=dict)

    def clear(self) -> None:
        """Back to a healthy server (scripts, shares, stalls, refusals)."""
        self.stall_heartbeat = False
        self.stall_pong = False
        self.ack_delay_s = 1.0
        self.reject_response = dict(DEFAULT_REJECT_RESPONSE)
        self.refuse_upgrades = 0
        self._script.clear()
        self._shares.clear()

    def script_acks(self, *outcomes: AckOutcome | str) -> None:
        """Queue outcomes for the next acked pushes, in order; then shares, then OK."""
        self._script.extend(AckOutcome(o) for o in outcomes)

    def ack_shares(
        self,
        *,
        reject: float = 0.0,
        delay: float = 0.0,
        drop: float = 0.0,
        lose_reply: float = 0.0,
        seed: int = 0,
    ) -> None:
        """Apply outcomes at random to these shares (0..1) of acked pushes."""
        total = reject + delay + drop + lose_reply
        if total > 1.0 or min(reject, delay, drop, lose_reply) < 0:
            raise ValueError("shares must be >= 0 and sum to at most 1")
        self._shares = {
            AckOutcome.REJECT: reject,
            AckOutcome.DELAY: delay,
            AckOutcome.DROP: drop,
            AckOutcome.LOSE_REPLY: lose_reply,
        }
        self._rng = random.Random(seed)

    def next_ack_outcome(self) -> AckOutcome:
        if self._script:
            outcome = self._script.popleft()
        else:
            outcome = AckOutcome.OK
            roll = self._rng.random() if self._shares else 1.0
            for candidate, share in self._shares.items():
                if roll < share:
                    outcome = candidate
                    break
                roll -= share
        self.outcomes_applied[outcome] = self.outcomes_applied.get(outcome, 0) + 1
        return outcome

    def take_upgrade_refusal(self) -> bool:
        if self.refuse_upgrades == 0:
            return False
        if self.refuse_upgrades > 0:
            self.refuse_upgrades -= 1
        return True

    def exceed_message_rate(self, tenant_id: str | None = None) -> None:
        """Push a tenant's message counter over its limit for one full 60 s window.

        Adds `limit x 5 s x 12` events and closes a bucket: the average is then >= the
        limit until that bucket leaves the window, so every channel that receives a
        message meanwhile is shut down with "Too many messages per second" and REST
        broadcasts get 429 (ref §6)."""
        assert self.server is not None
        counter = self.server.tenant(tenant_id).events
        counter.add(int(counter.limit * counter.tick_s * counter.max_buckets))
        self.server.tick()

    def shutdown_channels(
        self, message: str = "Too many messages per second", *, sub_topic: str | None = None
    ) -> int:
        """Shut channels down the way the server does (ref §2 "Channel shutdown"): `system`
        error `message`, then `phx_close`; sockets stay open. All channels, or those of one
        sub-topic (no `realtime:` prefix). Returns how many."""
        assert self.server is not None
        closed = 0
        for tenant in self.server.tenants.values():
            for sock in list(tenant.sockets):
                for channel in list(sock.channels.values()):
                    if sub_topic is None or channel.sub_topic == sub_topic:
                        sock.shutdown_channel(channel, message)
                        closed += 1
        return closed

    async def close_sockets(self, code: int, reason: str = "") -> int:
        """Close every open socket with `code` (1000, 1001, 1011, 1012...). Returns how many."""
        assert self.server is not None
        return await self.server.close_all_sockets(code, reason)

    async def server_requested_disconnect(self) -> int:
        """`system` "Server requested disconnect" on every channel, then close 1012 (ref §2)."""
        assert self.server is not None
        return await self.server.server_requested_disconnect()
