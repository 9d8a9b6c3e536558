"""A fault-injecting TCP proxy for the fault tests and bench/bench_faults.py.

Listens on 127.0.0.1 and forwards each connection to a target, which may be a Unix
socket (pgserver's Postgres listens on one only). Faults:

- `blackhole()`: bytes stop flowing both ways and new connections are accepted but
  never forwarded; nothing is closed. What a partition looks like to an
  application: calls hang. (The kernel still acknowledges what the proxy's socket
  receives, so TCP-level timers such as `tcp_user_timeout` are not exercised;
  the application's own deadlines are what this tests.)
- `cut()`: every connection is closed at once and new ones are closed on accept,
  until `restore()`: a network blip or a restarted load balancer.
- `restore()`: back to forwarding.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from dataclasses import dataclass, field
from pathlib import Path

CHUNK = 64 * 1024


class Mode(enum.Enum):
    FORWARD = "forward"
    BLACKHOLE = "blackhole"
    CUT = "cut"


@dataclass(eq=False)
class _Pair:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for writer in (self.client, self.upstream):
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.transport.abort()


class FaultProxy:
    """`async with FaultProxy(unix_path=...) as proxy:` then connect to `proxy.port`."""

    def __init__(
        self, *, unix_path: str | Path | None = None, host: str = "", port: int = 0
    ) -> None:
        if unix_path is None and not (host and port):
            raise ValueError("FaultProxy needs a unix_path or a host and port")
        self._unix_path = None if unix_path is None else str(unix_path)
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._pairs: set[_Pair] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.mode = Mode.FORWARD
        self.port = 0
        self.connections_accepted = 0

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        self._flowing.set()
        for pair in list(self._pairs):
            pair.close()
        self._pairs.clear()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    # --- faults ---

    def blackhole(self) -> None:
        self.mode = Mode.BLACKHOLE
        self._flowing.clear()

    def cut(self) -> None:
        self.mode = Mode.CUT
        for pair in list(self._pairs):
            pair.close()
        self._pairs.clear()

    def restore(self) -> None:
        self.mode = Mode.FORWARD
        self._flowing.set()

    # --- plumbing ---

    def _cut_since_accept(self, pair: _Pair) -> bool:
        return pair not in self._pairs  # cut() forgets every pair it closed

    async def _connect_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._unix_path is not None:
            return await asyncio.open_unix_connection(self._unix_path)
        return await asyncio.open_connection(*self._target)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_accepted += 1
        if self.mode is Mode.CUT:
            writer.transport.abort()
            return
        pair = _Pair(writer)
        self._pairs.add(pair)
        try:
            await self._flowing.wait()  # a blackholed connect hangs, as over a partition
            if self._cut_since_accept(pair):
                return
            up_reader, up_writer = await self._connect_upstream()
            pair.upstream = up_writer
            pair.tasks = [
                asyncio.create_task(self._pump(reader, up_writer)),
                asyncio.create_task(self._pump(up_reader, writer)),
            ]
            await asyncio.wait(pair.tasks, return_when=asyncio.FIRST_COMPLETED)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            pair.close()
            self._pairs.discard(pair)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                await self._flowing.wait()
                data = await reader.read(CHUNK)
                if not data:
                    return
                # Read as a blackhole began: held, and delivered once the path heals,
                # as TCP retransmission would (late writes must meet the fences).
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
