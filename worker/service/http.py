"""`/healthz`, `/readyz` and `/metrics` on a deliberately tiny asyncio HTTP server.

GET/HEAD only, one request per connection, small bounded reads: enough for
Kubernetes probes and a Prometheus scraper, with no web framework in the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from loguru import logger

from worker.service.metrics import CONTENT_TYPE_LATEST, Metrics

READ_TIMEOUT_S = 5.0
MAX_HEADER_LINES = 100
MAX_LINE_BYTES = 8 * 1024

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class HealthServer:
    """Serves the probes and metrics of one worker."""

    def __init__(
        self,
        *,
        metrics: Metrics,
        live: Callable[[], bool],
        ready: Callable[[], bool],
        host: str = "127.0.0.1",
        port: int = 0,
        with_default_registry: bool = False,
    ) -> None:
        self._metrics = metrics
        self._with_default = with_default_registry
        self._live = live
        self._ready = ready
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        """Bind and start accepting; returns the port (useful with port 0)."""
        self._server = await asyncio.start_server(
            self._handle, self._host, self._port, limit=MAX_LINE_BYTES
        )
        port: int = self._server.sockets[0].getsockname()[1]
        logger.bind(event="http_listen", port=port).info(
            "health and metrics on http://{}:{}", self._host, port
        )
        return port

    async def serve(self) -> None:
        """Run until cancelled (a supervised side task)."""
        if self._server is None:
            await self.start()
        assert self._server is not None
        try:
            await self._server.serve_forever()
        finally:
            await self.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            method, path = await asyncio.wait_for(self._read_request(reader), READ_TIMEOUT_S)
            status, content_type, body = self._route(method, path)
            head = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                f"Content-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode("latin-1") + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, ValueError, ConnectionError, asyncio.IncompleteReadError):
            pass  # a broken or slow client: just hang up
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _read_request(self, reader: asyncio.StreamReader) -> tuple[str, str]:
        parts = (await reader.readline()).decode("latin-1").split()
        if len(parts) != 3:
            raise ValueError("bad request line")
        for _ in range(MAX_HEADER_LINES):
            if (await reader.readline()) in (b"\r\n", b"\n", b""):
                return parts[0], parts[1].split("?", 1)[0]
        raise ValueError("too many header lines")

    def _route(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if path == "/healthz":
            ok = self._live()
            return (200 if ok else 503), "text/plain", b"ok\n" if ok else b"unhealthy\n"
        if path == "/readyz":
            ok = self._ready()
            return (200 if ok else 503), "text/plain", b"ready\n" if ok else b"not ready\n"
        if path == "/metrics":
            body = self._metrics.render(with_default_registry=self._with_default)
            return 200, CONTENT_TYPE_LATEST, body
        return 404, "text/plain", b"not found\n"
