"""The chaos soak: many streams relayed under every fault at once, checked by
independent subscribers.

    python -m bench.soak --streams 500            # the full soak (a few minutes)
    python -m bench.soak --streams 60 --quick     # about a minute

Relay level (today): one `Publisher` (as in a worker process) relays `--streams`
generations from the simulated upstream, `--concurrency` at a time, through a TCP
fault proxy that cuts every connection every 1-2 s, while the local Realtime server
rejects / drops / delays acks and loses replies, shuts the worker's channels down
for "Too many messages per second" a few times, and the upstream answers some
requests with 429s and resets others mid-stream (mid-stream recovery: continue).
Independent realtime-py subscribers (`Watcher`, several per topic, connected to the
server directly) reassemble every stream by offset. A stream is exact when every
subscriber of its topic has it complete, with no held message, no llm-error, text
equal to the upstream's text and checksums equal to llm-done's.

Prints a JSON report; exits 1 unless every stream is exact.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.chaos import FaultProxy
from devstack.jwt import api_key
from devstack.realtime import RealtimeServer
from devstack.realtime.limits import RealtimeLimits, Timings
from devstack.upstream.faults import Fault
from devstack.upstream.server import SimulatedUpstream
from devstack.upstream.tokens import tokenize
from worker.config import Settings
from worker.relay.publisher import Publisher
from worker.relay.reassembly import StreamReassembly
from worker.relay.stream import RelayResult, relay_stream
from worker.relay.watch import Watcher
from worker.upstream.client import UpstreamClient
from worker.upstream.events import GenerationRequest

TIME_SCALE = 0.01  # the server's 2 s / 5 s backoffs become 20 / 50 ms

WORDS = [
    *("relay", "token", "stream", "offset", "batch", "ack", "retry", "socket", "broadcast"),
    *("subscriber", "café", "naïve", "über", "世界", "🦀", "1234567", "worker", "queue"),
    *("lease", "snapshot", "checksum,", "done.", "again;"),
]


@dataclass
class SoakConfig:
    streams: int = 500
    concurrency: int = 40
    topics: int = 10
    watchers_per_topic: int = 2
    tokens: int = 120  # upstream tokens per stream (about)
    tokens_per_second: float = 300.0
    cut_every_s: tuple[float, float] = (1.0, 2.0)
    ack_reject: float = 0.04
    ack_drop: float = 0.02
    ack_lose_reply: float = 0.02
    ack_delay: float = 0.02
    rate_limit_shutdowns: int = 2
    upstream_429: float = 0.08  # share of streams that get a 429 first
    upstream_reset: float = 0.08  # share of streams cut mid-stream
    seed: int = 1
    timeout_s: float = 900.0


@dataclass
class SoakReport:
    config: dict[str, Any]
    streams: int = 0
    exact: int = 0
    not_exact: list[dict[str, Any]] = field(default_factory=list)
    lost_requests: int = 0  # relays that raised or never ended
    relay_errors: int = 0  # RelayResult.error set
    result_text_mismatch: int = 0  # the relay's own text != upstream text
    duplicates_dropped: int = 0  # tokens, summed over subscribers
    duplicate_messages: int = 0
    gaps: int = 0  # messages held above the next offset (later filled), summed
    reorderings: int = 0  # token messages that arrived below an offset already seen
    subscribers: int = 0
    messages_received: int = 0
    retries: int = 0
    fallbacks: int = 0
    rest_messages: int = 0
    reconnections: int = 0
    proxy_cuts: int = 0
    proxy_connections: int = 0
    server_ack_faults: dict[str, int] = field(default_factory=dict)
    rate_limit_shutdowns: int = 0
    upstream_faults: dict[str, int] = field(default_factory=dict)
    upstream_requests: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0

    @property
    def ok(self) -> bool:
        return self.exact == self.streams and self.lost_requests == 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def soak_text(seed: int, tokens: int) -> str:
    rng = random.Random(seed)
    parts: list[str] = []
    while len(tokenize("".join(parts))) < tokens:
        parts.append(rng.choice(WORDS) + " ")
    return "".join(parts).rstrip() + "\n"


def soak_settings(proxy: FaultProxy, upstream: SimulatedUpstream) -> Settings:
    return Settings(
        _env_file=None,
        supabase_url=proxy.url,
        openai_base_url=upstream.base_url,
        openai_api_key="sk-devstack",
        relay_private_channels=False,
        relay_ack_timeout_s=0.5,
        relay_retry_base_ms=20.0,
        relay_retry_cap_s=0.4,
        relay_rate_limit_rejoin_s=0.3,
        relay_messages_per_second=1_000_000.0,  # the shutdowns are injected, see above
        relay_drain_timeout_s=120.0,
        relay_max_batch_delay_ms=50.0,
        relay_upstream_retries=6,
        relay_upstream_retry_base_s=0.05,
        relay_upstream_retry_cap_s=0.5,
        relay_breaker_failures=1_000_000,  # one shared client: 429s must not trip it
        relay_midstream_recovery="continue",
        relay_midstream_max_recoveries=4,
        relay_idle_timeout_s=10.0,
        relay_first_token_timeout_s=20.0,
    )


def _reorderings(recorded: list[tuple[str, dict[str, Any]]]) -> int:
    highest: dict[str, int] = {}
    count = 0
    for event, payload in recorded:
        if event != "llm-token":
            continue
        stream, offset = payload.get("stream"), payload.get("offset")
        if not isinstance(stream, str) or not isinstance(offset, int):
            continue
        if offset < highest.get(stream, -1):
            count += 1
        highest[stream] = max(highest.get(stream, -1), offset)
    return count


def _check(state: StreamReassembly | None, expected: str) -> str | None:
    """Why a subscriber's copy of a stream is not exact, or None."""
    if state is None:
        return "never seen"
    if state.error is not None:
        return f"llm-error {state.error.type}"
    if not state.complete:
        return f"incomplete at offset {state.next_offset}"
    if state.held_messages:
        return f"{state.held_messages} messages still held"
    content, reasoning = state.text()
    if (content, reasoning) != (expected, ""):
        return f"text differs ({len(content)} chars, expected {len(expected)})"
    if not state.checksums_match():
        return "checksums differ from llm-done"
    return None


class Soak:
    def __init__(self, config: SoakConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.text = soak_text(config.seed, config.tokens)
        self.results: dict[str, RelayResult | BaseException] = {}
        self.shutdowns = 0
        self.upstream_faults: dict[str, int] = {}

    def _push_upstream_fault(self, upstream: SimulatedUpstream) -> None:
        roll = self.rng.random()
        cfg = self.config
        if roll < cfg.upstream_429:
            upstream.faults.push(Fault.rate_limit(retry_after_ms=50))
            self.upstream_faults["429"] = self.upstream_faults.get("429", 0) + 1
        elif roll < cfg.upstream_429 + cfg.upstream_reset:
            after = self.rng.randint(3, max(4, cfg.tokens - 3))
            upstream.faults.push(Fault.reset(after_tokens=after))
            self.upstream_faults["reset"] = self.upstream_faults.get("reset", 0) + 1

    async def _one(
        self,
        index: int,
        gate: asyncio.Semaphore,
        client: UpstreamClient,
        publisher: Publisher,
        upstream: SimulatedUpstream,
        settings: Settings,
    ) -> None:
        stream_id = f"soak-{index}"
        topic = f"llm-token:soak-{index % self.config.topics}"
        async with gate:
            self._push_upstream_fault(upstream)
            request = GenerationRequest([{"role": "user", "content": f"soak {index}"}])
            try:
                self.results[stream_id] = await relay_stream(
                    client.stream(request),
                    publisher=publisher,
                    topic=topic,
                    stream_id=stream_id,
                    settings=settings,
                )
            except Exception as exc:  # a lost request: reported, never hidden
                self.results[stream_id] = exc

    async def _rate_limit_shutdowns(self, server: RealtimeServer, every_s: float) -> None:
        for _ in range(self.config.rate_limit_shutdowns):
            await asyncio.sleep(every_s)
            for tenant in server.tenants.values():
                for sock in list(tenant.sockets):
                    if sock.apikey_claims.get("role") != "service_role":
                        continue
                    for channel in list(sock.channels.values()):
                        sock.shutdown_channel(channel, "Too many messages per second")
            self.shutdowns += 1

    async def run(self) -> SoakReport:
        cfg = self.config
        started, cpu0 = time.monotonic(), time.process_time()
        server = RealtimeServer(
            time_scale=TIME_SCALE,
            timings=Timings(idle_timeout_s=60 / TIME_SCALE),
            limits=RealtimeLimits(
                max_events_per_second=10_000_000,
                max_joins_per_second=100_000,
                max_concurrent_users=10_000,
            ),
        )
        upstream = SimulatedUpstream(text=self.text, tokens_per_second=cfg.tokens_per_second)
        await server.start()
        await upstream.start()
        watchers: list[Watcher] = []
        try:
            async with FaultProxy(
                "127.0.0.1", server.port, cut_every_s=cfg.cut_every_s, seed=cfg.seed
            ) as proxy:
                settings = soak_settings(proxy, upstream)
                for t in range(cfg.topics):
                    for _ in range(cfg.watchers_per_topic):
                        watcher = Watcher(
                            realtime_url=server.url + "/realtime/v1",
                            token=api_key("anon"),
                            topic=f"llm-token:soak-{t}",
                            private=False,
                            record=True,
                        )
                        await watcher.start()
                        watchers.append(watcher)
                server.faults.ack_delay_s = 0.6  # later than our 0.5 s ack timeout
                server.faults.ack_shares(
                    reject=cfg.ack_reject,
                    drop=cfg.ack_drop,
                    lose_reply=cfg.ack_lose_reply,
                    delay=cfg.ack_delay,
                    seed=cfg.seed,
                )
                report = await self._relay_all(server, upstream, proxy, settings, watchers)
                report.proxy_cuts = proxy.stats.cuts
                report.proxy_connections = proxy.stats.connections
        finally:
            for watcher in watchers:
                await watcher.close()
            await upstream.stop()
            await server.stop()
        report.server_ack_faults = {
            k.value: v for k, v in server.faults.outcomes_applied.items() if k.value != "ok"
        }
        report.upstream_requests = len(upstream.requests)
        report.wall_s = round(time.monotonic() - started, 2)
        report.cpu_s = round(time.process_time() - cpu0, 2)
        report.peak_rss_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        return report

    async def _relay_all(
        self,
        server: RealtimeServer,
        upstream: SimulatedUpstream,
        proxy: FaultProxy,
        settings: Settings,
        watchers: list[Watcher],
    ) -> SoakReport:
        cfg = self.config
        gate = asyncio.Semaphore(cfg.concurrency)
        per_stream_s = cfg.tokens / cfg.tokens_per_second + 0.5
        expected_wall = per_stream_s * cfg.streams / cfg.concurrency
        shutdowns = asyncio.create_task(
            self._rate_limit_shutdowns(server, expected_wall / (cfg.rate_limit_shutdowns + 1))
        )
        async with (
            UpstreamClient(settings) as client,
            Publisher(settings, api_key=api_key("service_role")) as publisher,
        ):
            await publisher.wait_connected(10)
            tasks = [
                asyncio.create_task(self._one(i, gate, client, publisher, upstream, settings))
                for i in range(cfg.streams)
            ]
            _done, pending = await asyncio.wait(tasks, timeout=cfg.timeout_s)
            for task in pending:
                task.cancel()
            shutdowns.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await shutdowns
            per_topic = [
                sum(1 for i in range(cfg.streams) if i % cfg.topics == t) for t in range(cfg.topics)
            ]
            waits = [
                w.wait_finished(streams=per_topic[i // cfg.watchers_per_topic], timeout_s=30)
                for i, w in enumerate(watchers)
            ]
            await asyncio.gather(*waits, return_exceptions=True)
            report = self._report(watchers, len(pending))
            report.reconnections = publisher.reconnections
        return report

    def _report(self, watchers: list[Watcher], pending: int) -> SoakReport:
        cfg = self.config
        report = SoakReport(config=asdict(cfg), streams=cfg.streams, subscribers=len(watchers))
        report.rate_limit_shutdowns = self.shutdowns
        report.upstream_faults = dict(self.upstream_faults)
        report.lost_requests = pending
        for i in range(cfg.streams):
            stream_id = f"soak-{i}"
            outcome = self.results.get(stream_id)
            why: list[str] = []
            if isinstance(outcome, RelayResult):
                report.retries += outcome.retries
                report.fallbacks += outcome.fallbacks
                report.rest_messages += outcome.rest_messages
                if outcome.error is not None:
                    report.relay_errors += 1
                    why.append(f"relay error {type(outcome.error).__name__}: {outcome.error}")
                if outcome.content != self.text:
                    report.result_text_mismatch += 1
            elif outcome is not None:
                report.lost_requests += 1
                why.append(f"relay raised {type(outcome).__name__}: {outcome}")
            t = i % cfg.topics
            for w in watchers[t * cfg.watchers_per_topic : (t + 1) * cfg.watchers_per_topic]:
                problem = _check(w.reassembly.streams.get(stream_id), self.text)
                if problem is not None:
                    why.append(f"subscriber: {problem}")
            if why:
                report.not_exact.append({"stream": stream_id, "why": why})
            else:
                report.exact += 1
        for w in watchers:
            report.messages_received += w.received
            for state in w.reassembly.streams.values():
                report.duplicates_dropped += state.duplicate_tokens
                report.duplicate_messages += state.duplicate_messages
                report.gaps += state.gaps
            report.reorderings += _reorderings(w.recorded or [])
        return report


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    defaults = SoakConfig()
    parser.add_argument("--streams", type=int, default=defaults.streams)
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--topics", type=int, default=defaults.topics)
    parser.add_argument("--tokens", type=int, default=defaults.tokens)
    parser.add_argument("--tokens-per-second", type=float, default=defaults.tokens_per_second)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--timeout-s", type=float, default=defaults.timeout_s)
    parser.add_argument("--quick", action="store_true", help="60 streams: about a minute")
    parser.add_argument("--out", help="also write the JSON report here")
    return parser.parse_args(argv)


def quick_config(seed: int = 1) -> SoakConfig:
    return SoakConfig(streams=60, concurrency=20, topics=5, tokens=80, seed=seed, timeout_s=90)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.quick:
        config = quick_config(args.seed)
    else:
        config = SoakConfig(
            streams=args.streams,
            concurrency=args.concurrency,
            topics=args.topics,
            tokens=args.tokens,
            tokens_per_second=args.tokens_per_second,
            seed=args.seed,
            timeout_s=args.timeout_s,
        )
    from worker.logs import configure_logging

    configure_logging(level="ERROR")
    report = asyncio.run(Soak(config).run())
    text = json.dumps(report.to_dict(), indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as sink:
            sink.write(text + "\n")
    print(
        f"soak: {report.exact}/{report.streams} streams exact, {report.lost_requests} lost, "
        f"{report.duplicates_dropped} duplicates dropped, {report.gaps} gaps, "
        f"{report.reorderings} reorderings, peak RSS {report.peak_rss_mb} MB",
        file=sys.stderr,
    )
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
