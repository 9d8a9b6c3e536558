"""Fixtures for the Realtime conformance suite: a real server on 127.0.0.1:0."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from devstack.jwt import api_key
from devstack.realtime import RealtimeLimits, RealtimeServer, Timings

# Server delays are real-time by default; tests shrink them 100x (5 s => 50 ms).
TEST_TIME_SCALE = 0.01
# ...except the 60 s idle close, kept at 6 s so that clients heartbeating every 25 s
# (realtime-py) are not cut off mid-test; the idle tests use the real ratio.
TEST_TIMINGS = Timings(idle_timeout_s=600.0)


@pytest.fixture
async def server() -> AsyncIterator[RealtimeServer]:
    srv = RealtimeServer(time_scale=TEST_TIME_SCALE, limits=RealtimeLimits(), timings=TEST_TIMINGS)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
def anon_key() -> str:
    return api_key("anon")


@pytest.fixture
def service_key() -> str:
    return api_key("service_role")
