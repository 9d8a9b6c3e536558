"""The one logging configuration never prints a key, at any level (issue 12)."""

from __future__ import annotations

import logging

import pytest
from loguru import logger

from worker.logs import configure_logging

SERVICE_KEY = "eyJhbGciOiJIUzI1NiJ9.c2VydmljZV9yb2xl.signature-of-the-service-key"
UPSTREAM_KEY = "sk-test-upstream-0123456789"


@pytest.fixture(autouse=True)
def restore_logging() -> object:
    yield None
    logger.remove()
    logging.basicConfig(handlers=[], force=True)


@pytest.mark.parametrize("json", [False, True], ids=["text", "json"])
def test_trace_logs_never_print_a_configured_key(
    capsys: pytest.CaptureFixture[str], json: bool
) -> None:
    configure_logging("TRACE", json=json, secrets=[SERVICE_KEY, UPSTREAM_KEY])
    url = f"ws://127.0.0.1:5/realtime/v1/websocket?apikey={SERVICE_KEY}&vsn=1.0.0"
    # What websockets / realtime-py log at DEBUG when TRACE routes them through.
    logging.getLogger("websockets.client").debug("connecting to %s", url)
    logger.trace("upstream said: bad key {}", UPSTREAM_KEY)
    try:
        raise ValueError(f"handshake failed for {url}")
    except ValueError:
        logger.exception("socket error")
    logger.info("dsn postgresql://postgres:hunter2-secret@db:5432/postgres")
    err = capsys.readouterr().err
    assert "connecting to" in err and "socket error" in err  # the lines are there
    assert SERVICE_KEY not in err
    assert UPSTREAM_KEY not in err
    assert "hunter2-secret" not in err
    assert "apikey=***" in err


def test_an_unconfigured_apikey_in_a_url_is_masked_too(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("DEBUG")
    logger.debug("GET /api/broadcast?apikey=some-other-key-value&x=1")
    err = capsys.readouterr().err
    assert "some-other-key-value" not in err and "x=1" in err
