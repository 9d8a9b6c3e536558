"""Tenant limits and timings of the local Realtime server (ref §6, §1, §2)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RealtimeLimits:
    """Per-tenant quotas; defaults are the Free plan's (ref §6 table)."""

    max_events_per_second: int = 100
    max_joins_per_second: int = 100
    max_channels_per_client: int = 100
    max_concurrent_users: int = 200
    max_payload_size_in_kb: int = 256
    # ref §6: Free-plan value; presence is not implemented here, so it is never used.
    max_presence_events_per_second: int = 20
    # ref §2 "PrivateOnly": the tenant's private_only flag.
    private_only: bool = False
    # ref §1: cowboy's max_frame_size.
    max_frame_size_bytes: int = 5_000_000


@dataclass(frozen=True)
class Timings:
    """The real server's delays, in seconds, before `time_scale` is applied."""

    connect_error_backoff_s: float = 2.0  # ref §1 CONNECT_ERROR_BACKOFF_MS
    channel_error_backoff_s: float = 5.0  # ref §2 CHANNEL_ERROR_BACKOFF_MS
    idle_timeout_s: float = 60.0  # ref §1 Phoenix websocket `timeout`
    rate_tick_s: float = 5.0  # ref §6 RateCounter tick
    token_recheck_max_s: float = 300.0  # ref §2 access_token: min(5 min, exp - now)

    def scaled(self, time_scale: float) -> Timings:
        return Timings(
            connect_error_backoff_s=self.connect_error_backoff_s * time_scale,
            channel_error_backoff_s=self.channel_error_backoff_s * time_scale,
            idle_timeout_s=self.idle_timeout_s * time_scale,
            rate_tick_s=self.rate_tick_s * time_scale,
            token_recheck_max_s=self.token_recheck_max_s * time_scale,
        )
