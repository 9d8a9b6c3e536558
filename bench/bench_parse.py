"""Parse CPU per token: our SSE + chunk path vs the openai SDK, httpx-sse and httpx + orjson.

All contenders read the same recorded stream (recorded once from the simulated
upstream over a real socket) through the same `httpx.MockTransport`, delivered
one SSE event per read as a paced stream arrives, so they differ only in how they
parse. CPU time (`time.process_time`) is measured per run; the table shows the
median over runs in µs per content token.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python -m bench.bench_parse [--tokens 2000] [--runs 15] [--out bench/RESULTS-parse.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import orjson

from devstack.upstream import SimulatedUpstream
from worker.config import Settings
from worker.upstream.chunks import ChunkParser
from worker.upstream.client import UpstreamClient
from worker.upstream.events import GenerationRequest, Token
from worker.upstream.sse import SSEDecoder

URL = "http://bench.invalid/v1/chat/completions"
KEY = "sk-bench"
MESSAGES = [{"role": "user", "content": "Write a long story."}]
WORDS = (
    "The relay reads every chunk , keeps each token exact and sends 20 at a time — "
    "café 🦀 世界 ! Streams end with [DONE] ; usage comes last . "
)


async def record(tokens: int) -> list[bytes]:
    """One real stream from the simulated upstream, split into SSE events."""
    words = WORDS.split(" ")
    text = " ".join(words[i % len(words)] for i in range(tokens))
    async with SimulatedUpstream(text=text, api_key=KEY) as up, httpx.AsyncClient() as http:
        body = {
            "model": "gpt-4o-mini",
            "messages": MESSAGES,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        headers = {"Authorization": f"Bearer {KEY}"}
        raw = b""
        async with http.stream(
            "POST", up.base_url + "/chat/completions", json=body, headers=headers
        ) as response:
            async for read in response.aiter_bytes():
                raw += read
    return [event + b"\n\n" for event in raw.split(b"\n\n") if event]


class Replay(httpx.AsyncByteStream):
    def __init__(self, reads: list[bytes]) -> None:
        self.reads = reads

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for read in self.reads:
            yield read


def transport(reads: list[bytes]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"content-type": "text/event-stream; charset=utf-8"}, stream=Replay(reads)
        )

    return httpx.MockTransport(handler)


# --- contenders: each returns the content tokens it saw ---


# Built once: a worker builds its settings once, not per stream (~2 ms each here).
SETTINGS = Settings(_env_file=None, openai_api_key=KEY, openai_base_url="http://bench.invalid/v1")


async def ours_client(reads: list[bytes]) -> list[str]:
    out: list[str] = []
    async with UpstreamClient(SETTINGS, transport=transport(reads)) as client:
        async for event in client.stream(GenerationRequest(messages=MESSAGES, model="m")):
            if isinstance(event, Token) and event.kind == "content":
                out.append(event.text)
    return out


async def ours_core(reads: list[bytes]) -> list[str]:
    """The pure cores alone, no HTTP: what our parsing itself costs."""
    decoder, parser = SSEDecoder(), ChunkParser("openai")
    out: list[str] = []
    for read in reads:
        for sse in decoder.feed(read):
            for event in parser.feed(sse):
                if isinstance(event, Token) and event.kind == "content":
                    out.append(event.text)
    return out


async def openai_sdk(reads: list[bytes]) -> list[str]:
    import openai

    out: list[str] = []
    messages: Any = MESSAGES
    async with httpx.AsyncClient(transport=transport(reads)) as http:
        http_client: Any = http  # newer SDKs type it as their vendored httpx2; same interface
        client = openai.AsyncOpenAI(
            api_key=KEY, base_url="http://bench.invalid/v1", http_client=http_client
        )
        stream = await client.chat.completions.create(
            model="m", messages=messages, stream=True, stream_options={"include_usage": True}
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                out.append(chunk.choices[0].delta.content)
    return out


async def httpx_sse(reads: list[bytes]) -> list[str]:
    from httpx_sse import aconnect_sse

    out: list[str] = []
    async with httpx.AsyncClient(transport=transport(reads)) as http:
        body = {"model": "m", "messages": MESSAGES, "stream": True}
        async with aconnect_sse(http, "POST", URL, json=body) as source:
            async for sse in source.aiter_sse():
                if sse.data == "[DONE]":
                    break
                chunk = json.loads(sse.data)
                choices = chunk.get("choices")
                if choices and choices[0]["delta"].get("content"):
                    out.append(choices[0]["delta"]["content"])
    return out


async def httpx_orjson(reads: list[bytes]) -> list[str]:
    out: list[str] = []
    async with httpx.AsyncClient(transport=transport(reads)) as http:
        body = {"model": "m", "messages": MESSAGES, "stream": True}
        async with http.stream("POST", URL, json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                choices = orjson.loads(data).get("choices")
                if choices and choices[0]["delta"].get("content"):
                    out.append(choices[0]["delta"]["content"])
    return out


async def httpx_floor(reads: list[bytes]) -> int:
    """No parsing at all: what reading the body through httpx costs (the floor)."""
    count = 0
    async with (
        httpx.AsyncClient(transport=transport(reads)) as http,
        http.stream("POST", URL, json={}) as response,
    ):
        async for _ in response.aiter_raw():
            count += 1
    return count


Contender = Callable[[list[bytes]], Awaitable[list[str]]]
CONTENDERS: list[tuple[str, Contender, str]] = [
    ("ours: UpstreamClient.stream (httpx + SSEDecoder + ChunkParser)", ours_client, "full path"),
    ("ours: SSEDecoder + ChunkParser only (no HTTP)", ours_core, "parser core"),
    ("openai SDK AsyncStream iteration", openai_sdk, "full path"),
    ("httpx-sse aiter_sse + json.loads", httpx_sse, "full path"),
    ("plain httpx aiter_lines + orjson", httpx_orjson, "full path"),
]


async def measure(fn: Contender, reads: list[bytes], expected: list[str], runs: int) -> list[float]:
    tokens = await fn(reads)  # warm-up, and a correctness check
    if tokens != expected:
        raise AssertionError(f"{fn.__name__} saw different tokens")
    per_token: list[float] = []
    for _ in range(runs):
        start = time.process_time()
        await fn(reads)
        per_token.append((time.process_time() - start) / len(expected) * 1e6)
    return per_token


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return cpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_parse")
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--out", default="bench/RESULTS-parse.md")
    args = parser.parse_args(argv)
    lines = asyncio.run(run(args))
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}", file=sys.stderr)


async def table(
    reads: list[bytes], expected: list[str], runs: int
) -> list[tuple[str, str, float, float]]:
    rows: list[tuple[str, str, float, float]] = []
    for name, fn, scope in CONTENDERS:
        samples = await measure(fn, reads, expected, runs)
        rows.append((name, scope, statistics.median(samples), min(samples)))
        print(f"{name:66} {statistics.median(samples):8.2f} µs/token", file=sys.stderr)
    floor: list[float] = []
    for _ in range(runs):
        start = time.process_time()
        await httpx_floor(reads)
        floor.append((time.process_time() - start) / len(expected) * 1e6)
    rows.append(
        (
            "httpx aiter_raw, no parsing (the floor)",
            "reference",
            statistics.median(floor),
            min(floor),
        )
    )
    return rows


def grouped(events: list[bytes], size: int) -> list[bytes]:
    return [b"".join(events[i : i + size]) for i in range(0, len(events), size)]


async def run(args: argparse.Namespace) -> list[str]:
    events = await record(args.tokens)
    expected = await ours_core(events)
    lines = [
        "# Parse CPU per token",
        "",
        "Same recorded stream for every contender (simulated OpenAI upstream, "
        f"{len(expected)} content tokens, {len(events)} SSE events incl. role, finish, usage "
        "and `[DONE]`), replayed through the same `httpx.MockTransport`. CPU time "
        f"(`time.process_time`), median of {args.runs} runs after one warm-up run; every "
        "contender must yield exactly the same tokens (checked).",
        "",
        f"- machine: {machine()}, {platform.system()} {platform.release()}",
        f"- python {platform.python_version()}; httpx {version('httpx')}, orjson "
        f"{version('orjson')}, openai {version('openai')} (its HTTP layer is httpx2), "
        f"httpx-sse {version('httpx-sse')}",
        f"- command: `.venv/bin/python -m bench.bench_parse --tokens {args.tokens} "
        f"--runs {args.runs}`",
        "- the machine is shared (2 cores, other jobs running): compare rows within one run,"
        " not across runs",
    ]
    for size, title in (
        (1, "one SSE event per read (a paced stream)"),
        (8, "eight SSE events per read (a fast stream, or a burst)"),
    ):
        print(f"-- {title}", file=sys.stderr)
        rows = await table(grouped(events, size), expected, args.runs)
        ours = rows[0][2]
        lines += [
            "",
            f"## {title}",
            "",
            "| contender | scope | median µs/token | best µs/token | × ours (full path) |",
            "|---|---|---:|---:|---:|",
        ]
        for name, scope, median, best in rows:
            lines.append(f"| {name} | {scope} | {median:.2f} | {best:.2f} | {median / ours:.2f} |")
    lines += [
        "",
        "## Reading it",
        "",
        "- Target for the whole relay: 5 µs/token. The upstream side alone does not meet it: "
        "reading the body through httpx costs well under 1 µs per read (the floor row); "
        "our parser core (byte-exact SSE decoding, orjson, typed events, `[DONE]`/error/"
        "truncation checks) costs about 5 µs per token, and the client's machinery (read "
        "deadline, retry and recovery layers, usage accounting) about 2-3 µs more.",
        "- The plain httpx + orjson row is the lower bound of a parser that is almost "
        "right (httpx's line decoder handles CR/CRLF and split UTF-8; it ignores "
        "multi-line `data`, `data:` without a space, `event: error`, `id`/`retry`, and it "
        "has no deadlines, retries or typed events); httpx-sse is spec-complete and sits "
        "near our full path; the openai SDK builds pydantic models per chunk and is more "
        "than an order of magnitude slower.",
        "- Already done: one lazily re-armed timer per stream (`worker/upstream/deadline.py`) "
        "instead of `asyncio.timeout` per read (which cost ~12 µs/token more; the bench "
        "builds `Settings` once, as the worker does), events "
        "travel through the generator layers in one list per read, fast paths for a read "
        "holding one whole `data:` event and for a content-only delta.",
        "- Not done: parse JSON from the bytes without building the event's `str`; make "
        "`Token` a tuple type (its frozen-dataclass construction is ~0.4 µs); merge the "
        "retry layer and the read loop into one generator.",
        "",
    ]
    return lines


if __name__ == "__main__":
    main()
