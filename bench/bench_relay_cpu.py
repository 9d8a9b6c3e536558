"""Whole-relay CPU per token, marginal, side by side in one run.

    python -m bench.bench_relay_cpu [--quick] [--profile]

The simulated upstream (as fast as it can) and the local Realtime server run in
their own processes; only this process's CPU (`time.process_time`) is counted.
Each variant streams a long and a short generation from the same upstream
(`max_tokens` cuts the same text), and the marginal cost per token is
(cpu_long - cpu_short) / (tokens_long - tokens_short), so start-up cancels.
Rounds interleave the variants; the figures are medians over rounds.

Variants:
- `httpx_orjson` — the reference: httpx streaming, SSE lines split by hand, orjson.
- `openai_sdk` — the openai SDK's stream iteration alone (`AsyncOpenAI`).
- `ours_upstream` — our `UpstreamClient.stream` alone (SSE decoder + chunk parser).
- `ours_relay` — the whole relay: `UpstreamClient` → `relay_stream` → `Publisher`
  (batches of 20, acked by the server, drained before `relay_stream` returns).
- `peer` — the openai SDK + one realtime-py broadcast per token (not acked: the
  cheapest form of that path).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
from realtime import AsyncRealtimeClient

from bench.common import BENCH_KEY, Stack, long_text, machine, median, stack
from worker.config import Settings
from worker.relay.publisher import Publisher
from worker.relay.stream import relay_stream
from worker.upstream.client import UpstreamClient
from worker.upstream.events import GenerationRequest, Token

MODEL = "gpt-4o-mini"
PUBLIC: Any = {"config": {"private": False}}
Run = Callable[[int], Awaitable[int]]


def bench_settings(s: Stack) -> Settings:
    return Settings(
        _env_file=None,
        supabase_url=s.realtime_url,
        openai_base_url=s.upstream_url,
        openai_api_key=BENCH_KEY,
        relay_private_channels=False,
        relay_messages_per_second=1_000_000.0,  # CPU, not pacing
    )


def _messages(i: int) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"bench {i}"}]


class Variants:
    def __init__(self, s: Stack) -> None:
        self.stack = s
        self.settings = bench_settings(s)
        self.http = httpx.AsyncClient(timeout=60)
        self.client = UpstreamClient(self.settings)
        self.publisher = Publisher(self.settings, api_key=s.service_key)
        self.rt = AsyncRealtimeClient(s.realtime_url + "/realtime/v1", token=s.service_key)
        self.peer_channel: Any = None
        self.openai: Any = None
        self.count = 0

    async def start(self) -> None:
        from openai import AsyncOpenAI

        self.openai = AsyncOpenAI(base_url=self.stack.upstream_url, api_key=BENCH_KEY)
        await self.publisher.start()
        await self.publisher.wait_connected(10)
        await self.rt.connect()
        channel = self.rt.channel("llm-token:peer", PUBLIC)
        joined = asyncio.Event()
        await channel.subscribe(lambda state, err: joined.set())
        await asyncio.wait_for(joined.wait(), 10)
        self.peer_channel = channel

    async def close(self) -> None:
        await self.publisher.close()
        await self.client.aclose()
        await self.http.aclose()
        await self.rt.close()
        if self.openai is not None:
            await self.openai.close()

    async def httpx_orjson(self, n: int) -> int:
        self.count += 1
        body = {"model": MODEL, "messages": _messages(self.count), "stream": True}
        body["max_tokens"] = n
        tokens = 0
        headers = {"Authorization": f"Bearer {BENCH_KEY}"}
        url = self.stack.upstream_url + "/chat/completions"
        async with self.http.stream("POST", url, json=body, headers=headers) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = orjson.loads(line[6:])
                for choice in chunk.get("choices") or ():
                    if choice.get("delta", {}).get("content"):
                        tokens += 1
        return tokens

    async def openai_sdk(self, n: int) -> int:
        self.count += 1
        stream = await self.openai.chat.completions.create(
            model=MODEL, messages=_messages(self.count), stream=True, max_tokens=n
        )
        tokens = 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                tokens += 1
        return tokens

    async def ours_upstream(self, n: int) -> int:
        self.count += 1
        request = GenerationRequest(_messages(self.count), max_tokens=n)
        tokens = 0
        async for event in self.client.stream(request):
            if isinstance(event, Token):
                tokens += 1
        return tokens

    async def ours_relay(self, n: int) -> int:
        self.count += 1
        request = GenerationRequest(_messages(self.count), max_tokens=n)
        result = await relay_stream(
            self.client.stream(request),
            publisher=self.publisher,
            topic=f"llm-token:cpu-{self.count % 4}",
            stream_id=f"cpu-{self.count}",
            settings=self.settings,
        )
        if result.error is not None:
            raise result.error
        return result.content_tokens

    async def peer(self, n: int) -> int:
        self.count += 1
        stream = await self.openai.chat.completions.create(
            model=MODEL, messages=_messages(self.count), stream=True, max_tokens=n
        )
        offset = 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                await self.peer_channel.send_broadcast(
                    "llm-token",
                    {
                        "stream": "peer",
                        "offset": offset,
                        "tokens": [chunk.choices[0].delta.content],
                    },
                )
                offset += 1
        return offset


async def _measure(run: Run, n: int) -> tuple[float, int]:
    cpu0 = time.process_time()
    tokens = await run(n)
    await asyncio.sleep(0.05)  # let background writes / acks settle (same in every run)
    return time.process_time() - cpu0, tokens


async def _bench(args: argparse.Namespace, s: Stack) -> dict[str, Any]:
    v = Variants(s)
    await v.start()
    names = ["httpx_orjson", "openai_sdk", "ours_upstream", "ours_relay", "peer"]
    runs: dict[str, Run] = {name: getattr(v, name) for name in names}
    marginal: dict[str, list[float]] = {name: [] for name in names}
    counts: dict[str, tuple[int, int]] = {}
    try:
        for run in runs.values():  # warm-up: imports, connections, JIT-free caches
            await run(args.short)
        for _ in range(args.rounds):
            for name, run in runs.items():
                cpu_long, n_long = await _measure(run, args.long)
                cpu_short, n_short = await _measure(run, args.short)
                counts[name] = (n_long, n_short)
                marginal[name].append((cpu_long - cpu_short) / max(1, n_long - n_short) * 1e6)
        profile = await _profile(v, args) if args.profile else None
    finally:
        await v.close()
    ref = median(marginal["httpx_orjson"])
    table = {
        name: {
            "us_per_token_median": round(median(values), 2),
            "per_round": [round(x, 2) for x in values],
            "x_reference": round(median(values) / ref, 2),
            "tokens_long_short": counts[name],
        }
        for name, values in marginal.items()
    }
    return {"machine": machine(), "long": args.long, "short": args.short, "results": table} | (
        {"profile": profile} if profile else {}
    )


async def _profile(v: Variants, args: argparse.Namespace) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    await v.ours_relay(args.long)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(30)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_relay_cpu", description=__doc__)
    parser.add_argument("--long", type=int, default=5000)
    parser.add_argument("--short", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2,000 / 200 tokens, 3 rounds")
    parser.add_argument("--profile", help="write a cProfile of one long ours_relay run here")
    parser.add_argument("--timeout-s", type=float, default=900.0)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.long, args.short, args.rounds = 2000, 200, 3
    from worker.logs import configure_logging

    configure_logging(level="ERROR")

    async def go() -> dict[str, Any]:
        with stack(long_text(args.long + 10)) as s:
            return await asyncio.wait_for(_bench(args, s), args.timeout_s)

    report = asyncio.run(go())
    profile = report.pop("profile", None)
    if profile and args.profile:
        Path(args.profile).write_text(profile)
    text = json.dumps(report, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
