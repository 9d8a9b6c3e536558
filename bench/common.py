"""Shared pieces of the benches: the stand-ins as subprocesses (so their CPU is not
counted in ours), machine facts, medians."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devstack.jwt import api_key
from devstack.upstream.tokens import tokenize

if TYPE_CHECKING:
    from worker.relay.reassembly import StreamReassembly

BENCH_KEY = "sk-bench"
WORDS = ("relay", "token", "stream", "batch", "ack", "café", "世界", "🦀", "1234", "done.")


def long_text(tokens: int) -> str:
    """A deterministic text of at least `tokens` simulated-tokenizer tokens."""
    words = [WORDS[(i * 7) % len(WORDS)] for i in range(tokens)]
    text = " " + " ".join(words)
    assert len(tokenize(text)) >= tokens
    return text


@dataclass
class Stack:
    upstream_url: str  # .../v1
    realtime_url: str  # SUPABASE_URL form
    service_key: str
    anon_key: str
    pids: dict[str, int]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores, every process), /proc/stat:
    what a level leaves of the machine, Postgres and exited processes included."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    jiffies = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
    busy = sum(jiffies) - jiffies[3] - jiffies[4]
    return busy / os.sysconf("SC_CLK_TCK")


def _read_until(proc: subprocess.Popen[str], pattern: str, timeout_s: float) -> re.Match[str]:
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{proc.args!r} exited: {proc.poll()}")
        found = re.search(pattern, line)
        if found:
            return found
    raise TimeoutError(pattern)


LIFTED_LIMITS = (
    *("--max-joins-per-second", "100000"),
    *("--max-concurrent-users", "100000", "--max-channels-per-client", "100000"),
)


@contextlib.contextmanager
def stack(
    text: str,
    *,
    tokens_per_second: float = 0.0,
    database_url: str | None = None,
    real_limits: bool = False,
) -> Iterator[Stack]:
    """The simulated upstream and the local Realtime server, each in its own process,
    with the Realtime quotas lifted (the benches meter their own budget). With
    `real_limits` only the message quota is lifted (a large plan's): channels per
    socket, joins/s and connected users stay the real server's. With `database_url`
    the Realtime server authorizes private channels by RLS there."""
    procs: list[subprocess.Popen[str]] = []
    try:
        up = subprocess.Popen(
            [
                *(sys.executable, "-m", "devstack.upstream", "--port", "0"),
                *("--api-key", BENCH_KEY, "--tokens-per-second", str(tokens_per_second)),
                *("--text", text),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(up)
        upstream_url = _read_until(up, r"upstream on (\S+)", 30).group(1)
        rt = subprocess.Popen(
            [
                *(sys.executable, "-m", "devstack.realtime", "--port", "0"),
                *("--max-events-per-second", "100000000"),
                *(LIFTED_LIMITS if not real_limits else ()),
                *(("--database-url", database_url) if database_url else ()),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(rt)
        realtime_url = _read_until(rt, r"SUPABASE_URL=(\S+)", 30).group(1)
        pids = {"upstream": up.pid, "realtime": rt.pid}
        yield Stack(upstream_url, realtime_url, api_key("service_role"), api_key("anon"), pids)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def machine() -> dict[str, object]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for name in ("realtime", "websockets", "httpx", "orjson", "openai", "aiohttp"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "commit": commit,
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "versions": versions,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


# --- independent subscribers (bench_e2e, bench_e2e_queue) ---------------------------

CHANNELS_PER_CLIENT = 50  # one socket carries at most 100 channels (Realtime's cap)


class Receipts:
    """What independent subscribers saw: first arrival of each token offset, per
    stream, and every stream reassembled by the client rule."""

    def __init__(self) -> None:
        self.received: dict[str, dict[int, float]] = {}
        self.states: dict[str, StreamReassembly] = {}
        self.messages = 0

    def on_message(self, payload: Any) -> None:
        from worker.relay.reassembly import StreamReassembly
        from worker.relay.wire import TokenMessage, parse_message

        now = time.monotonic()
        self.messages += 1
        msg = parse_message(payload["event"], payload["payload"])
        if isinstance(msg, TokenMessage):
            seen = self.received.setdefault(msg.stream, {})
            for k in range(msg.offset, msg.end_offset):
                seen.setdefault(k, now)
        self.states.setdefault(msg.stream, StreamReassembly(msg.stream)).apply(msg)

    def report(self) -> dict[str, Any]:
        exact = sum(1 for s in self.states.values() if s.complete and s.checksums_match())
        return {
            "cpu_s": time.process_time(),
            "exact": exact,
            "messages": self.messages,
            "received": {k: {str(o): t for o, t in v.items()} for k, v in self.received.items()},
        }


async def join_channels(
    url: str,
    token: str,
    topics: list[str],
    params: Any,
    on_message: Any,
    *,
    joins_per_second: float | None = None,
) -> list[Any]:
    """Join every topic, CHANNELS_PER_CLIENT per socket; raise unless each is SUBSCRIBED.
    `joins_per_second` paces the joins (the project's joins/s limit, when it is on).
    Returns the clients (close them when done)."""
    from realtime import AsyncRealtimeClient

    clients: list[AsyncRealtimeClient] = []
    started = time.monotonic()
    joined_n = 0
    for start in range(0, len(topics), CHANNELS_PER_CLIENT):
        client = AsyncRealtimeClient(url, token=token)
        await client.connect()
        clients.append(client)
        for topic in topics[start : start + CHANNELS_PER_CLIENT]:
            if joins_per_second:
                await asyncio.sleep(
                    max(0.0, started + joined_n / joins_per_second - time.monotonic())
                )
            joined_n += 1
            channel = client.channel(topic, params)
            channel.on_broadcast("*", on_message)
            joined: asyncio.Future[str] = asyncio.get_running_loop().create_future()

            def on_state(state: Any, err: Any, fut: asyncio.Future[str] = joined) -> None:
                if not fut.done():
                    fut.set_result(f"{state} {err or ''}")

            await channel.subscribe(on_state)
            outcome = await asyncio.wait_for(joined, 30)
            if "SUBSCRIBED" not in outcome:
                raise RuntimeError(f"join {topic}: {outcome}")
    return clients


async def close_clients(clients: list[Any]) -> None:
    for client in clients:
        with contextlib.suppress(Exception):
            await client.close()
