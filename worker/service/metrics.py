"""Prometheus metrics of one worker process (its own registry: tests run several)."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    """The worker's counters and gauges, rendered at `/metrics`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.claimed = Counter(
            "llm_relay_requests_claimed",
            "Requests claimed (each claim is one attempt).",
            registry=r,
        )
        self.finished = Counter(
            "llm_relay_requests_finished",
            "Requests settled by this worker, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.rejected = Counter(
            "llm_relay_requests_rejected", "Requests failed by validation.", registry=r
        )
        self.in_flight = Gauge("llm_relay_requests_in_flight", "Streams running now.", registry=r)
        self.tokens = Counter(
            "llm_relay_tokens_relayed", "Tokens relayed (by settled snapshots).", registry=r
        )
        self.checkpoints = Counter(
            "llm_relay_checkpoints", "Snapshot checkpoints written.", registry=r
        )
        self.leases_lost = Counter(
            "llm_relay_leases_lost", "Leases lost to another worker.", registry=r
        )
        self.queue_errors = Counter(
            "llm_relay_queue_errors", "Failed queue operations (database trouble).", registry=r
        )
        self.ready = Gauge("llm_relay_ready", "1 while the worker claims requests.", registry=r)

    def render(self, *, with_default_registry: bool = False) -> bytes:
        """The exposition text; with the default registry too (the relay and the
        upstream client register there), as one worker process serves it."""
        text = generate_latest(self.registry)
        if with_default_registry and self.registry is not REGISTRY:
            text += generate_latest(REGISTRY)
        return text
