"""/healthz, /readyz and /metrics over a real socket (127.0.0.1, port 0)."""

from __future__ import annotations

import asyncio

import pytest

import worker.relay.metrics  # noqa: F401 - registers the relay's metrics
from worker.service.http import HealthServer
from worker.service.metrics import Metrics

pytestmark = pytest.mark.integration


async def http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    writer.write(request)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


async def test_probes_and_metrics() -> None:
    metrics = Metrics()
    state = {"live": True, "ready": False}
    server = HealthServer(
        metrics=metrics,
        live=lambda: state["live"],
        ready=lambda: state["ready"],
        host="127.0.0.1",
        port=0,
        with_default_registry=True,
    )
    port = await server.start()
    serving = asyncio.create_task(server.serve())
    try:
        assert (await http(port, get("/healthz")))[0] == 200
        assert (await http(port, get("/readyz")))[0] == 503
        state["ready"] = True
        status, _, body = await http(port, get("/readyz?verbose=1"))
        assert (status, body) == (200, b"ready\n")
        state["live"] = False
        assert (await http(port, get("/healthz")))[0] == 503

        metrics.claimed.inc(3)
        metrics.finished.labels(outcome="done").inc()
        status, headers, body = await http(port, get("/metrics"))
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        assert int(headers["Content-Length"]) == len(body)
        text = body.decode()
        assert "llm_relay_requests_claimed_total 3.0" in text
        assert 'llm_relay_requests_finished_total{outcome="done"} 1.0' in text
        assert "relay_messages_total" in text  # the relay's metrics (default registry)

        status, headers, body = await http(port, get("/metrics", "HEAD"))
        assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
        assert (await http(port, get("/nope")))[0] == 404
        assert (await http(port, get("/healthz", "POST")))[0] == 405
        # garbage is hung up on, and the server keeps serving
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"nonsense\r\n\r\n")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await writer.wait_closed()
        state["live"] = True
        assert (await http(port, get("/healthz")))[0] == 200
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
