"""Prometheus metrics of the Realtime side (default registry, served on /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MESSAGES = Counter(
    "relay_messages_total",
    "Broadcast messages accepted by Realtime, by event and route (ws|rest).",
    ["event", "route"],
)
TOKENS = Counter("relay_tokens_total", "Tokens handed to the publisher, by kind.", ["kind"])
FLUSH_FAILURES = Counter(
    "relay_flush_failures_total",
    "Sends that were not acknowledged, by reason (error|timeout|disconnected|rest).",
    ["reason"],
)
RETRIES = Counter("relay_retries_total", "Re-sends of a message after a failure.")
FALLBACKS = Counter("relay_fallbacks_total", "Batches that fell back to token-by-token messages.")
PARKED = Counter("relay_parked_total", "Messages kept for re-sending once the channel is back.")
REST_SENDS = Counter(
    "relay_rest_sends_total", "REST broadcast requests, by outcome (ok|error).", ["outcome"]
)
RECONNECTIONS = Counter(
    "relay_reconnections_total",
    "Socket (re)connections made by the supervisor, by outcome.",
    ["outcome"],
)
CLIENT_RECREATED = Counter(
    "relay_client_recreated_total", "Fresh AsyncRealtimeClient instances after repeated failures."
)
CHANNEL_REJOINS = Counter(
    "relay_channel_rejoins_total",
    "Channels created again after the server closed them, by reason.",
    ["reason"],
)
RATE_LIMITED = Counter(
    "relay_rate_limited_total", "Rate-limit signals from Realtime (shutdown, join error, 429)."
)
BUDGET_WAITS = Counter(
    "relay_budget_waits_total", "Sends that had to wait for the messages/s budget."
)
BUDGET_WAIT_SECONDS = Histogram(
    "relay_budget_wait_seconds",
    "Time a send waited for the messages/s budget.",
    buckets=(0.001, 0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
)
ACK_SECONDS = Histogram(
    "relay_ack_seconds",
    "From push to the server's ok.",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 5),
)
TOKENS_PER_MESSAGE = Histogram(
    "relay_tokens_per_message",
    "Tokens in each llm-token message (grows when the budget is short).",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000),
)
BACKLOG = Gauge("relay_backlog_messages", "Messages queued or in flight, all topics.")
CONNECTED = Gauge("relay_connected", "1 while the Realtime socket is connected.")
