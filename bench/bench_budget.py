"""Budget benchmark: many fast streams under one messages/s budget, adaptive vs fixed batches.

    .venv/bin/python -m bench.bench_budget [--seconds 60] [--streams 20] [--rate 500]
                                           [--budget 100] [--out bench/RESULTS-budget.md]

Runs the local Realtime server (real 5 s rate ticks, Free-plan limit), one Publisher,
N relay_streams fed by simulated token sources at a fixed rate, and one realtime-py
subscriber per topic that reassembles every stream with the client rule. Reports
messages/s (sends + deliveries, as Realtime counts them), messages per token, token
latency (produced -> reassembled, p50/p99), completeness, and whether the server ever
triggered its rate limit. Two modes under the same budget:

- adaptive: the batcher paces flushes to each stream's fair share and the lane
  coalesces queued batches, so messages carry more tokens when demand exceeds supply;
- fixed: batches of `batch_size` tokens, no pacing, no coalescing (the budget still
  gates sends, so the backlog and the latency grow instead).

`run_load()` is also the engine of the shorter test in tests/integration/test_relay_budget.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from devstack.jwt import api_key
from devstack.realtime import RealtimeLimits, RealtimeServer
from tests.integration.relay_harness import Subscriber
from worker.config import Settings
from worker.relay.publisher import Publisher
from worker.relay.stream import RelayResult, relay_stream
from worker.upstream.events import Finished, Token, UpstreamEvent

TICK_S = 0.005  # token source granularity


@dataclass
class LoadReport:
    mode: str
    streams: int
    tokens_per_s: float
    seconds: float
    budget: float
    tokens: int
    complete_streams: int
    messages_sent: int
    deliveries: int
    wall_s: float
    p50_latency_s: float
    p99_latency_s: float
    max_latency_s: float
    undelivered_tokens: int
    rate_limit_triggered: int
    rate_limit_shutdowns: int
    budget_waits: int
    window_p99_s: list[float]  # p99 latency of the tokens produced in each 10 s window
    window_max_lag_s: list[float]  # worst event-loop lag (CPU starvation) in each window

    @property
    def messages_per_s(self) -> float:
        return (self.messages_sent + self.deliveries) / self.wall_s

    @property
    def messages_per_token(self) -> float:
        """Messages per token delivered (what each message carried, on average)."""
        return self.messages_sent / max(1, self.tokens - self.undelivered_tokens)

    def line(self) -> str:
        return (
            f"{self.mode}: {self.streams} streams x {self.tokens_per_s:.0f} tok/s for "
            f"{self.seconds:.0f} s, budget {self.budget:.0f} msg/s: "
            f"{self.messages_per_s:.1f} msg/s counted, "
            f"{self.messages_per_token:.4f} msg/token, "
            f"p50 {self.p50_latency_s * 1000:.0f} ms, p99 {self.p99_latency_s * 1000:.0f} ms, "
            f"complete {self.complete_streams}/{self.streams}, "
            f"undelivered {self.undelivered_tokens}, triggered {self.rate_limit_triggered}"
        )


async def paced_tokens(
    stream: int, rate: float, seconds: float, produced: dict[tuple[str, int], float]
) -> AsyncIterator[UpstreamEvent]:
    """`rate` tokens/s for `seconds`, on an absolute schedule (no drift)."""
    start = time.monotonic()
    total = int(rate * seconds)
    sid = f"load-{stream}"
    i = 0
    while i < total:
        now = time.monotonic()
        due = min(total, int((now - start) * rate) + 1)
        while i < due:
            produced[(sid, i)] = time.monotonic()
            yield Token("content", f"t{i} ")
            i += 1
        await asyncio.sleep(TICK_S)
    yield Finished("stop")


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 1000) - 1]


async def run_load(
    *,
    streams: int = 20,
    tokens_per_s: float = 500.0,
    seconds: float = 60.0,
    budget: float = 100.0,
    adaptive: bool = True,
    batch_size: int = 20,
    grace_s: float = 10.0,
) -> LoadReport:
    """One run; see the module docstring."""
    server = RealtimeServer(limits=RealtimeLimits(max_events_per_second=int(budget)))
    await server.start()
    subscriber = Subscriber(server, api_key("anon"))
    settings = Settings(
        supabase_url=server.url,
        relay_private_channels=False,
        relay_messages_per_second=budget,
        relay_expected_subscribers=1,
        relay_batch_size=batch_size,
        relay_adaptive_batching=adaptive,
        relay_drain_timeout_s=grace_s,
    )
    produced: dict[tuple[str, int], float] = {}
    topics = [f"llm-token:load-{i}" for i in range(streams)]
    results: list[RelayResult | BaseException] = []
    start = time.monotonic()
    lags: dict[int, float] = {}
    lag_task = asyncio.create_task(_watch_lag(lags, lambda: start))
    try:
        for topic in topics:
            await subscriber.join(topic)
        async with Publisher(settings, api_key=api_key("service_role")) as pub:
            await pub.wait_connected(10)
            start = time.monotonic()
            results = await asyncio.gather(
                *(
                    relay_stream(
                        paced_tokens(i, tokens_per_s, seconds, produced),
                        publisher=pub,
                        topic=topic,
                        stream_id=f"load-{i}",
                        settings=settings,
                    )
                    for i, topic in enumerate(topics)
                ),
                return_exceptions=True,
            )
            with contextlib.suppress(TimeoutError):
                await subscriber.wait_until(
                    lambda: all(
                        _complete(subscriber, t, f"load-{i}") for i, t in enumerate(topics)
                    ),
                    2.0,
                )
            wall = time.monotonic() - start
            budget_waits = pub.budget.waits
            # Counted now: what the publisher still sends while closing is not in `wall`.
            sent = server.stats.client_broadcasts + server.stats.rest_messages
            deliveries = server.stats.deliveries
    finally:
        lag_task.cancel()
        await subscriber.close()
        tenant = server.tenant()
        triggered = tenant.events.times_triggered
        stats = server.stats
        await server.stop()
    for r in results:
        if isinstance(r, BaseException) and not isinstance(r, Exception):
            raise r
    latencies = [
        subscriber.received_at[key] - t0
        for key, t0 in produced.items()
        if key in subscriber.received_at
    ]
    windows: dict[int, list[float]] = {}
    for key, t0 in produced.items():
        if key in subscriber.received_at:
            windows.setdefault(int((t0 - start) // 10), []).append(subscriber.received_at[key] - t0)
    return LoadReport(
        mode="adaptive" if adaptive else f"fixed-{batch_size}",
        streams=streams,
        tokens_per_s=tokens_per_s,
        seconds=seconds,
        budget=budget,
        tokens=len(produced),
        complete_streams=sum(
            1 for i, t in enumerate(topics) if _complete(subscriber, t, f"load-{i}", exact=True)
        ),
        messages_sent=sent,
        deliveries=deliveries,
        wall_s=wall,
        p50_latency_s=_percentile(latencies, 0.5),
        p99_latency_s=_percentile(latencies, 0.99),
        max_latency_s=max(latencies) if latencies else float("nan"),
        undelivered_tokens=len(produced) - len(latencies),
        rate_limit_triggered=triggered,
        rate_limit_shutdowns=stats.rate_limit_shutdowns,
        budget_waits=budget_waits,
        window_p99_s=[_percentile(windows[w], 0.99) for w in sorted(windows)],
        window_max_lag_s=[lags.get(w, 0.0) for w in sorted(windows)],
    )


async def _watch_lag(lags: dict[int, float], start: Callable[[], float]) -> None:
    """Record how late a 50 ms sleep wakes up: the loop's CPU starvation, per window."""
    while True:
        t0 = time.monotonic()
        await asyncio.sleep(0.05)
        lag = time.monotonic() - t0 - 0.05
        window = int((t0 - start()) // 10)
        lags[window] = max(lags.get(window, 0.0), lag)


def _complete(sub: Subscriber, topic: str, stream: str, *, exact: bool = False) -> bool:
    state = sub.topics.get(topic)
    st = state.streams.get(stream) if state else None
    if st is None or not st.complete:
        return False
    return st.checksums_match() if exact else True


@dataclass
class LimiterReport:
    name: str
    sends_per_s: float
    min_share: float  # the least-served stream's sends / the fair share (1.0 = fair)
    max_share: float
    p99_wait_s: float
    cpu_s: float


async def compare_limiters(
    seconds: float = 5.0, rate: float = 40.0, streams: int = 20
) -> list[LimiterReport]:
    """asyncio-throttle vs MessageBudget as the lanes use them: one waiter per stream,
    every stream always has a message ready, `rate` messages/s in all."""
    return [
        await _limiter_run("asyncio-throttle", seconds, rate, streams),
        await _limiter_run("MessageBudget", seconds, rate, streams),
    ]


async def _limiter_run(name: str, seconds: float, rate: float, streams: int) -> LimiterReport:
    from asyncio_throttle.throttler import Throttler

    from worker.relay.budget import MessageBudget

    acquire: Callable[[], Awaitable[object]]
    if name == "asyncio-throttle":
        acquire = cast(Callable[[], Awaitable[object]], Throttler(rate_limit=int(rate)).acquire)
    else:
        # cost 1 per message here (no subscribers), so both see the same messages/s
        acquire = MessageBudget(rate / 0.8, utilization=0.8, expected_subscribers=0).acquire
    counts = [0] * streams
    waits: list[float] = []
    stop = time.monotonic() + seconds

    async def sender(i: int) -> None:
        while time.monotonic() < stop:
            t0 = time.monotonic()
            await acquire()
            if time.monotonic() >= stop:
                return
            counts[i] += 1
            waits.append(time.monotonic() - t0)

    cpu0 = time.process_time()
    await asyncio.gather(*(sender(i) for i in range(streams)))
    total = sum(counts)
    fair = total / streams
    return LimiterReport(
        name=name,
        sends_per_s=total / seconds,
        min_share=min(counts) / fair if fair else 0.0,
        max_share=max(counts) / fair if fair else 0.0,
        p99_wait_s=_percentile(waits, 0.99),
        cpu_s=time.process_time() - cpu0,
    )


def _limiter_markdown(reports: list[LimiterReport]) -> list[str]:
    rows = [
        "## Why not asyncio-throttle",
        "",
        "`python -m bench.bench_budget --limiters`: 20 streams, one waiter each (as the "
        "publisher's lanes), always a message ready, 40 messages/s for 5 s. Share = a "
        "stream's sends / the fair share (1.0 = fair).",
        "",
        "| limiter | sends/s | least-served stream | most-served stream | p99 wait | CPU |",
        "|---|---|---|---|---|---|",
    ]
    for r in reports:
        rows.append(
            f"| {r.name} | {r.sends_per_s:.1f} | {r.min_share:.2f} | {r.max_share:.2f} "
            f"| {r.p99_wait_s * 1000:.0f} ms | {r.cpu_s:.2f} s |"
        )
    rows += [
        "",
        "asyncio-throttle wakes every waiter every 10 ms to race for a free slot (CPU, "
        "and no order among waiters); it also counts one per acquire (no fan-out cost). "
        "MessageBudget grants in FIFO order, weighs each message 1 + subscribers, and "
        "sleeps exactly until the bucket refills.",
        "",
    ]
    return rows


def _markdown(reports: list[LoadReport], args: argparse.Namespace) -> str:
    rows = [
        "| mode | msg/s counted | msg/token | p50 latency | p99 latency | max latency "
        "| complete | undelivered tokens | rate limit triggered |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        rows.append(
            f"| {r.mode} | {r.messages_per_s:.1f} | {r.messages_per_token:.4f} "
            f"| {r.p50_latency_s * 1000:.0f} ms | {r.p99_latency_s * 1000:.0f} ms "
            f"| {r.max_latency_s * 1000:.0f} ms | {r.complete_streams}/{r.streams} "
            f"| {r.undelivered_tokens} | {r.rate_limit_triggered} |"
        )
    windows = [
        f"- {r.mode}: p99 "
        + ", ".join(f"{p * 1000:.0f}" for p in r.window_p99_s)
        + " ms; worst event-loop lag "
        + ", ".join(f"{p * 1000:.0f}" for p in r.window_max_lag_s)
        + " ms"
        for r in reports
    ]
    return "\n".join(
        [
            "# Budget benchmark: adaptive batches vs fixed batches of 20",
            "",
            f"`python -m bench.bench_budget --seconds {args.seconds} --streams {args.streams} "
            f"--rate {args.rate} --budget {args.budget}` on the shared 2-core machine, against "
            "the local Realtime server (real 5 s rate ticks, limit = budget). Messages/s "
            "counts sends plus deliveries (one subscriber per topic), as Realtime does. "
            "Latency: token produced -> token reassembled by the subscriber. The fixed run "
            f"stops waiting {args.grace:.0f} s after the sources end; tokens still queued then "
            "are 'undelivered' (the publisher would deliver them later, ever later).",
            "",
            *rows,
            "",
            "Per 10 s window: p99 latency of the tokens produced in it, and the worst lag of "
            "the event loop (a 50 ms sleep waking late = CPU starvation of the process):",
            "",
            *windows,
            "",
        ]
    )


async def _main(args: argparse.Namespace) -> list[LoadReport]:
    reports = []
    for adaptive in [m == "adaptive" for m in args.modes.split(",")]:
        report = await run_load(
            streams=args.streams,
            tokens_per_s=args.rate,
            seconds=args.seconds,
            budget=args.budget,
            adaptive=adaptive,
            grace_s=args.grace,
        )
        print(report.line(), flush=True)
        print("  p99 per 10 s window (ms):", [round(p * 1000) for p in report.window_p99_s])
        print("  max loop lag per window (ms):", [round(p * 1000) for p in report.window_max_lag_s])
        reports.append(report)
    return reports


async def _main_limiters() -> list[LimiterReport]:
    reports = await compare_limiters()
    for r in reports:
        print(
            f"{r.name}: {r.sends_per_s:.1f} sends/s, shares {r.min_share:.2f}..{r.max_share:.2f}"
            f" of fair, p99 wait {r.p99_wait_s * 1000:.0f} ms, cpu {r.cpu_s:.2f} s"
        )
    return reports


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--budget", type=float, default=100.0)
    parser.add_argument("--grace", type=float, default=10.0)
    parser.add_argument("--out", default="bench/RESULTS-budget.md")
    parser.add_argument("--modes", default="adaptive,fixed", help="adaptive,fixed")
    parser.add_argument(
        "--limiters", action="store_true", help="only compare asyncio-throttle and MessageBudget"
    )
    arguments = parser.parse_args()
    if arguments.limiters:
        limiters = asyncio.run(_main_limiters())
        if arguments.out:
            path = Path(arguments.out)
            text = path.read_text() if path.exists() else ""
            marker = "## Why not asyncio-throttle"
            text = text.split(marker, 1)[0].rstrip() + "\n\n"
            path.write_text(text + "\n".join(_limiter_markdown(limiters)))
    else:
        done = asyncio.run(_main(arguments))
        if arguments.out:
            Path(arguments.out).write_text(_markdown(done, arguments))
