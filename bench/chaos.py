"""A TCP fault proxy: forwards 127.0.0.1:<port> to a target and cuts every connection
every `cut_min_s`..`cut_max_s` seconds (abort: the peer sees a reset, mid-frame or not).

    async with FaultProxy("127.0.0.1", server.port, cut_every_s=(1.0, 2.0)) as proxy:
        settings = Settings(supabase_url=proxy.url, ...)

Only the worker's side goes through it; subscribers connect to the server directly,
so they see what reached the server, never the proxy's cuts.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field

CHUNK = 65536


@dataclass
class ProxyStats:
    connections: int = 0
    cuts: int = 0  # connections aborted by a cut
    cut_rounds: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.transport.abort()


class FaultProxy:
    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        cut_every_s: tuple[float, float] | None = (1.0, 2.0),
        seed: int = 0,
        host: str = "127.0.0.1",
    ) -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = 0
        self.cut_every_s = cut_every_s
        self.stats = ProxyStats()
        self._rng = random.Random(seed)
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None
        self._cutter: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        if self.cut_every_s is not None:
            self._cutter = asyncio.create_task(self._cut_loop(), name="proxy-cutter")
        return self

    async def stop(self) -> None:
        if self._cutter is not None:
            self._cutter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._cutter
        if self._server is not None:
            self._server.close()
        self.cut_all(count=False)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def cut_all(self, *, count: bool = True) -> int:
        links = list(self._links)
        for link in links:
            link.abort()
        self._links.clear()
        if count:
            self.stats.cuts += len(links)
            self.stats.cut_rounds += 1
        return len(links)

    async def _cut_loop(self) -> None:
        assert self.cut_every_s is not None
        low, high = self.cut_every_s
        while True:
            await asyncio.sleep(self._rng.uniform(low, high))
            self.cut_all()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        link = _Link(writer)
        self._links.add(link)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            link.abort()
            self._links.discard(link)
            return
        link.upstream = up_writer
        if link not in self._links:  # cut while connecting
            link.abort()
            return
        await asyncio.gather(
            self._pipe(reader, up_writer, link, up=True),
            self._pipe(up_reader, writer, link, up=False),
        )
        self._links.discard(link)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link, *, up: bool
    ) -> None:
        try:
            while data := await reader.read(CHUNK):
                if up:
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            link.abort()
