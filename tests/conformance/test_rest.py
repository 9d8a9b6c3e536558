"""§9 "REST of §4 exactly (202 empty, 401/403/415/422/429 bodies, x-rate-* headers, batch
cap, silent private drops on batch)"."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from realtime import AsyncRealtimeClient
from realtime.exceptions import RealtimeHTTPError

from devstack.jwt import sign
from devstack.realtime import RealtimeLimits, RealtimeServer
from devstack.realtime.limits import Timings

from .conftest import TEST_TIME_SCALE
from .policies import TopicPolicy
from .wsclient import RawClient

pytestmark = pytest.mark.integration


@pytest.fixture
async def rest_server() -> AsyncIterator[RealtimeServer]:
    srv = RealtimeServer(
        time_scale=TEST_TIME_SCALE,
        limits=RealtimeLimits(max_events_per_second=3, max_payload_size_in_kb=1),
        timings=Timings(rate_tick_s=10_000, idle_timeout_s=600.0),
        authorizer=TopicPolicy(readable={"open", "shut"}, writable={"open"}),
    )
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


async def _post(
    srv: RealtimeServer, path: str, key: str | None, **kwargs: Any
) -> tuple[int, bytes, Any]:
    headers = dict(kwargs.pop("headers", {}))
    if key:
        headers["apikey"] = key
    async with (
        aiohttp.ClientSession() as http,
        http.post(srv.url + path, headers=headers, **kwargs) as response,
    ):
        return response.status, await response.read(), response.headers


def _batch(*messages: dict[str, Any]) -> dict[str, Any]:
    return {"messages": list(messages)}


M = {"topic": "open", "event": "e", "payload": {"a": 1}}


async def test_202_with_empty_body_and_rate_headers(
    rest_server: RealtimeServer, anon_key: str
) -> None:
    status, body, headers = await _post(rest_server, "/api/broadcast", anon_key, json=_batch(M))
    assert (status, body) == (202, b"")
    assert headers["x-rate-limit"] == "3"
    assert headers["x-rate-rolling"] == "0"
    assert headers["x-rate-limit-remaining"] == "3"
    status, body, _ = await _post(
        rest_server, "/api/broadcast/open/events/e", anon_key, json={"a": 1}
    )
    assert (status, body) == (202, b"")


@pytest.mark.parametrize(
    "key", [None, "garbage", sign({"role": "anon", "exp": 1}), sign({"role": "anon"})]
)
async def test_401_unauthorized(rest_server: RealtimeServer, key: str | None) -> None:
    status, body, headers = await _post(rest_server, "/api/broadcast", key, json=_batch(M))
    assert (status, body) == (401, b'{"message": "Unauthorized"}')
    assert "x-rate-limit" in headers


async def test_bearer_token_is_used_before_apikey(
    rest_server: RealtimeServer, anon_key: str
) -> None:
    status, _, _ = await _post(
        rest_server,
        "/api/broadcast",
        "garbage",
        json=_batch(M),
        headers={"Authorization": f"Bearer {anon_key}"},
    )
    assert status == 202


async def test_415_unsupported_media_type(rest_server: RealtimeServer, anon_key: str) -> None:
    status, body, _ = await _post(
        rest_server,
        "/api/broadcast/open/events/e",
        anon_key,
        data=b"hi",
        headers={"Content-Type": "text/plain"},
    )
    assert status == 415
    assert body == (
        b'{"error": "Unsupported Media Type. Use application/json or application/octet-stream"}'
    )


async def test_single_accepts_json_without_content_type_and_bytes(
    rest_server: RealtimeServer, anon_key: str
) -> None:
    rx = await RawClient.connect(rest_server.url, anon_key, vsn="2.0.0")
    await rx.send("realtime:open", "phx_join", {"config": {}}, ref="1", join_ref="1")
    await rx.recv()
    async with aiohttp.ClientSession() as http:
        bare = await http.post(
            rest_server.url + "/api/broadcast/open/events/e",
            data=b'{"n":1}',
            headers={"apikey": anon_key},
            skip_auto_headers=["Content-Type"],
        )
        octets = await http.post(
            rest_server.url + "/api/broadcast/open/events/e",
            data=b"\x01\x02",
            headers={"apikey": anon_key, "Content-Type": "application/octet-stream"},
        )
    assert (bare.status, octets.status) == (202, 202)
    assert (await rx.recv_raw())[-7:] == b'{"n":1}'
    binary = await rx.recv_raw()
    assert isinstance(binary, bytes) and binary[4] == 0 and binary.endswith(b"\x01\x02")


async def test_422_bodies(rest_server: RealtimeServer, anon_key: str) -> None:
    big = {"topic": "open", "event": "e", "payload": {"pad": "x" * 1600}}
    status, body, _ = await _post(rest_server, "/api/broadcast", anon_key, json=_batch(M, big))
    assert status == 422
    assert body == (
        b'{"errors": {"messages": [{}, {"payload": ["Payload size exceeds tenant limit"]}]}}'
    )
    status, body, _ = await _post(
        rest_server, "/api/broadcast", anon_key, json=_batch({"topic": "open", "event": "e"})
    )
    assert (status, body) == (422, b'{"errors": {"messages": [{"payload": ["can\'t be blank"]}]}}')
    status, body, _ = await _post(
        rest_server, "/api/broadcast/open/events/e", anon_key, json={"pad": "x" * 1600}
    )
    assert (status, body) == (
        422,
        b'{"errors": {"payload": ["Payload size exceeds tenant limit"]}}',
    )


async def test_batch_cap_is_avg_plus_count_over_limit(
    rest_server: RealtimeServer, anon_key: str
) -> None:
    status, body, _ = await _post(rest_server, "/api/broadcast", anon_key, json=_batch(M, M, M, M))
    assert status == 429
    assert body == b'{"message": "Too many messages to broadcast, please reduce the batch size"}'
    status, _, _ = await _post(rest_server, "/api/broadcast", anon_key, json=_batch(M, M, M))
    assert status == 202


async def test_429_when_the_tenant_is_over_its_rate(
    rest_server: RealtimeServer, anon_key: str
) -> None:
    counter = rest_server.tenant().events
    counter.add(20)
    rest_server.tick()  # avg 4 > 3
    status, body, _ = await _post(rest_server, "/api/broadcast", anon_key, json=_batch(M))
    assert (status, body) == (429, b'{"message": "You have exceeded your rate limit"}')
    status, body, _ = await _post(
        rest_server, "/api/broadcast/open/events/e", anon_key, json={"a": 1}
    )
    assert (status, body) == (429, b'{"message": "You have exceeded your rate limit"}')


async def test_request_limiter_429_too_many_requests(
    rest_server: RealtimeServer, anon_key: str
) -> None:
    rest_server.tenant().requests.add(15)
    rest_server.tick()  # 15 requests / 5 s = 3/s >= 3
    status, body, headers = await _post(rest_server, "/api/broadcast", anon_key, json=_batch(M))
    assert (status, body) == (429, b'{"message": "Too many requests"}')
    assert (headers["x-rate-rolling"], headers["x-rate-limit-remaining"]) == ("3", "0")


async def test_private_batch_without_permission_is_dropped_silently(
    rest_server: RealtimeServer, anon_key: str
) -> None:
    rx = await RawClient.connect(rest_server.url, anon_key)
    await rx.join("shut", private=True)
    denied = {"topic": "shut", "event": "e", "payload": {}, "private": True}
    status, body, _ = await _post(rest_server, "/api/broadcast", anon_key, json=_batch(denied))
    assert (status, body) == (202, b"")
    await rx.expect_silence(0.2)
    status, body, _ = await _post(
        rest_server, "/api/broadcast/shut/events/e?private=true", anon_key, json={}
    )
    assert (status, body) == (403, b'{"message": "Unauthorized"}')
    status, _, _ = await _post(
        rest_server, "/api/broadcast/open/events/e?private=true", anon_key, json={}
    )
    assert status == 202


async def test_realtime_py_http_send(rest_server: RealtimeServer, anon_key: str) -> None:
    client = AsyncRealtimeClient(rest_server.url + "/realtime/v1", token=anon_key)
    await client.channel("open").http_send("e", {"a": 1})
    with pytest.raises(RealtimeHTTPError) as denied:
        params: Any = {"config": {"private": True}}
        await client.channel("shut", params).http_send("e", {})
    assert denied.value.status == 403


async def test_private_batch_asks_once_per_topic(
    rest_server: RealtimeServer, anon_key: str
) -> None:
    # rt: batch_broadcast.ex groups private messages by topic and asks each topic's
    # write permission once per request, however many messages it carries.
    policy = rest_server.authorizer
    assert isinstance(policy, TopicPolicy)
    rx = await RawClient.connect(rest_server.url, anon_key)
    await rx.join("open", private=True)
    messages = [
        {"topic": topic, "event": "e", "payload": {"n": n}, "private": True}
        for n, topic in enumerate(["open", "shut", "open"])  # the quota allows 3
    ]
    status, _, _ = await _post(rest_server, "/api/broadcast", anon_key, json=_batch(*messages))
    assert status == 202
    assert policy.writes == 2
    got = [(await rx.recv())["payload"]["payload"]["n"] for _ in range(2)]
    assert got == [0, 2]
    await rx.close()
