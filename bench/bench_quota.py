"""Quota: the most concurrent fast streams served under a 100 msg/s Realtime budget.

    python -m bench.bench_quota [--quick]

The local Realtime server (in this process, real 5 s rate ticks) enforces the Free
plan's 100 events/s per tenant, counting each delivery (one subscriber per stream,
each stream on its own topic). Two relays run the same ladder of concurrent
streams, each stream `--rate` tokens/s for `--seconds`:

- `ours` — the shipped settings: budget 100 msg/s, utilization 0.8, fan-out counted,
  flush pacing by fair share (batches grow with the number of streams).
- `fixed20` — the same relay with the adaptive part switched off: batches of 20
  (or 100 ms), no pacing, no budget gate (a `Publisher` subclass whose fair-share
  interval is 0 and whose budget is unlimited): what a fixed-batch relay does. At
  100 tok/s the 100 ms delay flushes first: about 10 messages/s per stream.

A level is *served* when every stream arrives exactly at its subscriber and the
server shut no channel for "Too many messages per second" (its own counter).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from realtime import AsyncRealtimeClient

from bench.common import machine, percentile
from devstack.jwt import api_key
from devstack.realtime import RealtimeServer
from devstack.realtime.limits import RealtimeLimits
from worker.config import Settings
from worker.relay.budget import MessageBudget
from worker.relay.publisher import Publisher
from worker.relay.reassembly import TopicReassembly
from worker.relay.stream import relay_stream
from worker.relay.wire import TokenMessage, parse_message
from worker.upstream.events import Finished, Token, UpstreamEvent

PUBLIC: Any = {"config": {"private": False}}
TICK_S = 0.05  # tokens are produced in small bursts every 50 ms (rate-exact on average)
CHANNELS_PER_CLIENT = 50


class FixedBatchPublisher(Publisher):
    """Batches of 20 as they fill: no fair-share pacing (the budget is lifted too)."""

    def min_interval_s(self, now: float, *, token_rate: float | None = None) -> float:
        return 0.0


async def paced_tokens(
    stream: int, n: int, rate: float, produced: list[float]
) -> AsyncIterator[UpstreamEvent]:
    per_tick = max(1, round(rate * TICK_S))
    start = time.monotonic()
    sent = 0
    while sent < n:
        now = time.monotonic()
        for _ in range(min(per_tick, n - sent)):
            produced.append(now)
            yield Token("content", f"s{stream}t{sent} ")
            sent += 1
        await asyncio.sleep(max(0.0, start + sent / rate - time.monotonic()))
    yield Finished("stop")


class Subscribers:
    """One channel per topic, spread over a few realtime-py clients (fan-out of one)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.clients: list[AsyncRealtimeClient] = []
        self.topics: dict[str, TopicReassembly] = {}
        self.latencies: list[float] = []  # first token of each message: produce -> receipt
        self.produced: dict[str, list[float]] = {}

    async def join(self, topics: list[str]) -> None:
        for i in range(0, len(topics), CHANNELS_PER_CLIENT):
            client = AsyncRealtimeClient(self.url, token=api_key("anon"))
            await client.connect()
            self.clients.append(client)
            for topic in topics[i : i + CHANNELS_PER_CLIENT]:
                await self._join(client, topic)

    async def _join(self, client: AsyncRealtimeClient, topic: str) -> None:
        reassembly = self.topics.setdefault(topic, TopicReassembly())
        channel = client.channel(topic, PUBLIC)

        def on_message(payload: Any) -> None:
            msg = parse_message(payload["event"], payload["payload"])
            if isinstance(msg, TokenMessage):
                produced = self.produced.get(msg.stream)
                if produced is not None and msg.offset < len(produced):
                    self.latencies.append(time.monotonic() - produced[msg.offset])
            reassembly.apply(msg)

        channel.on_broadcast("*", on_message)
        joined = asyncio.Event()
        await channel.subscribe(lambda state, err: joined.set())
        await asyncio.wait_for(joined.wait(), 10)

    async def close(self) -> None:
        for client in self.clients:
            with contextlib.suppress(Exception):
                await client.close()


async def run_level(mode: str, streams: int, args: argparse.Namespace) -> dict[str, Any]:
    server = RealtimeServer(limits=RealtimeLimits(max_channels_per_client=10_000))
    await server.start()
    settings = Settings(
        _env_file=None,
        supabase_url=server.url,
        relay_private_channels=False,
        relay_messages_per_second=args.budget,
        relay_drain_timeout_s=60.0,
    )
    n_tokens = int(args.rate * args.seconds)
    topics = [f"llm-token:q{i}" for i in range(streams)]
    subs = Subscribers(server.url + "/realtime/v1")
    started = time.monotonic()
    try:
        await subs.join(topics)
        if mode == "ours":
            publisher = Publisher(settings, api_key=api_key("service_role"))
        else:
            unlimited = MessageBudget(1e12)
            publisher = FixedBatchPublisher(
                settings, api_key=api_key("service_role"), budget=unlimited
            )
        async with publisher:
            await publisher.wait_connected(10)
            server.stats.rate_limit_shutdowns = 0
            deliveries0 = server.stats.deliveries

            async def one(i: int) -> Any:
                produced = subs.produced.setdefault(f"q-{i}", [])
                return await relay_stream(
                    paced_tokens(i, n_tokens, args.rate, produced),
                    publisher=publisher,
                    topic=topics[i],
                    stream_id=f"q-{i}",
                    settings=settings,
                )

            results = await asyncio.wait_for(
                asyncio.gather(*(one(i) for i in range(streams)), return_exceptions=True),
                args.seconds * 3 + 60,
            )
            await asyncio.sleep(0.5)
            wall = time.monotonic() - started
            exact = 0
            for i, topic in enumerate(topics):
                state = subs.topics[topic].streams.get(f"q-{i}")
                ok = state is not None and state.complete and state.checksums_match()
                exact += bool(ok and state is not None and state.next_offset == n_tokens)
            deliveries = server.stats.deliveries - deliveries0
            shutdowns = server.stats.rate_limit_shutdowns
            errors = sum(1 for r in results if isinstance(r, BaseException) or r.error)
    finally:
        await subs.close()
        await server.stop()
    served = exact == streams and shutdowns == 0 and errors == 0
    return {
        "mode": mode,
        "streams": streams,
        "served": served,
        "exact": exact,
        "rate_limit_shutdowns": shutdowns,
        "errors": errors,
        "deliveries_per_s": round(deliveries / max(1e-9, args.seconds), 1),
        "tokens_per_message": round(streams * n_tokens / max(1, deliveries), 1),
        "latency_p50_ms": round(percentile(subs.latencies, 50) * 1000, 1),
        "latency_p99_ms": round(percentile(subs.latencies, 99) * 1000, 1),
        "wall_s": round(wall, 1),
    }


async def _bench(args: argparse.Namespace) -> dict[str, Any]:
    levels: dict[str, list[dict[str, Any]]] = {"fixed20": [], "ours": []}
    for mode, ladder in (("fixed20", args.fixed_ladder), ("ours", args.ours_ladder)):
        for streams in ladder:
            level = await run_level(mode, streams, args)
            print(json.dumps(level), file=sys.stderr, flush=True)
            levels[mode].append(level)
            if not level["served"] and not args.full_ladder:
                break
    best = {
        mode: max((lv["streams"] for lv in lvls if lv["served"]), default=0)
        for mode, lvls in levels.items()
    }
    first_failed = {
        mode: min((lv["streams"] for lv in lvls if not lv["served"]), default=None)
        for mode, lvls in levels.items()
    }
    ratio = best["ours"] / best["fixed20"] if best["fixed20"] else float("inf")
    return {
        "machine": machine(),
        "budget_msgs_per_s": args.budget,
        "rate_tok_per_s": args.rate,
        "seconds": args.seconds,
        "most_served": best,
        "first_not_served": first_failed,
        "ratio_ours_to_fixed20": round(ratio, 1),
        "levels": levels,
    }


def _ladder(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_quota", description=__doc__)
    parser.add_argument("--budget", type=float, default=100.0, help="server limit and ours")
    parser.add_argument("--rate", type=float, default=100.0, help="tokens/s per stream")
    parser.add_argument("--seconds", type=float, default=16.0, help="length of each stream")
    parser.add_argument("--fixed-ladder", type=_ladder, default=_ladder("4,5,6,7,8"))
    parser.add_argument("--ours-ladder", type=_ladder, default=_ladder("50,100,200,300,400"))
    parser.add_argument("--full-ladder", action="store_true", help="go on after a failure")
    parser.add_argument("--quick", action="store_true", help="shorter streams, fewer levels")
    parser.add_argument("--timeout-s", type=float, default=1200.0)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = 11.0
        args.fixed_ladder, args.ours_ladder = [6, 8], [100]
        args.full_ladder = True
    from worker.logs import configure_logging

    configure_logging(level="ERROR")
    report = asyncio.run(asyncio.wait_for(_bench(args), args.timeout_s))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
