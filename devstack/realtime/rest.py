"""REST broadcast API of the local Realtime server (ref §4), exact statuses and bodies."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .authorization import AuthContext, AuthorizationUnavailable
from .protocol import MapBroadcast, UserBroadcast, payload_too_large
from .tokens import TokenError, verify_token

if TYPE_CHECKING:
    from .server import RealtimeServer, Tenant

CORS_HEADERS = {
    # ref §4: CORS `*`.
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST, OPTIONS",
    "Access-Control-Allow-Headers": "authorization, apikey, content-type, x-client-info",
}
SINGLE_MEDIA_TYPES = ("application/json", "application/octet-stream")
SIZE_MESSAGE = "Payload size exceeds tenant limit"


async def preflight(request: web.Request) -> web.Response:
    # Browsers (supabase-js) ask for apikey / authorization / x-client-info: echo them.
    headers = dict(CORS_HEADERS)
    requested = request.headers.get("Access-Control-Request-Headers")
    if requested:
        headers["Access-Control-Allow-Headers"] = requested
    return web.Response(status=204, headers=headers)


def _json(body: Any, status: int, headers: dict[str, str]) -> web.Response:
    return web.json_response(body, status=status, headers={**CORS_HEADERS, **headers})


def _empty(status: int, headers: dict[str, str]) -> web.Response:
    return web.Response(status=status, headers={**CORS_HEADERS, **headers})


def _pipeline(
    server: RealtimeServer, request: web.Request
) -> tuple[Tenant, dict[str, Any], dict[str, str]] | web.Response:
    """AssignTenant -> RateLimiter -> AuthTenant, as the real router's pipeline (ref §4)."""
    tenant = server.tenant_for_request(request)
    if tenant is None:
        return _json({"message": "Tenant not found in database"}, 401, {})
    tenant.requests.add(1)
    avg = int(tenant.requests.avg)
    limit = server.limits.max_events_per_second
    headers = {
        "x-rate-rolling": str(avg),
        "x-rate-limit": str(limit),
        "x-rate-limit-remaining": str(limit - avg),
    }
    if avg >= limit:
        return _json({"message": "Too many requests"}, 429, headers)
    auth = request.headers.get("Authorization", "")
    token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
    token = token or request.headers.get("apikey")
    try:
        claims = verify_token(token, server.jwt_secret, time.time())
    except TokenError:
        return _json({"message": "Unauthorized"}, 401, headers)
    return tenant, claims, headers


async def _may_write(server: RealtimeServer, sub: str, claims: dict[str, Any]) -> bool:
    try:
        return await server.authorizer.can_write(AuthContext(sub, claims))
    except AuthorizationUnavailable:
        return False


def _message_errors(message: Any, max_kb: int) -> dict[str, list[str]]:
    if not isinstance(message, dict):
        return {"message": ["is invalid"]}
    errors: dict[str, list[str]] = {}
    for key in ("topic", "event", "payload"):
        if message.get(key) in (None, "", {}) and key != "payload":
            errors[key] = ["can't be blank"]
    payload = message.get("payload")
    if payload is None:
        errors["payload"] = ["can't be blank"]
    elif not isinstance(payload, dict):
        errors["payload"] = ["is invalid"]
    elif payload_too_large(payload, max_kb):
        errors["payload"] = [SIZE_MESSAGE]
    for key in ("topic", "event"):
        if key not in errors and not isinstance(message.get(key), str):
            errors[key] = ["is invalid"]
    return errors


async def batch(server: RealtimeServer, request: web.Request) -> web.StreamResponse:
    """A. `POST /api/broadcast` (ref §4): 202 empty; 422 / 429 bodies; silent private drops."""
    result = _pipeline(server, request)
    if isinstance(result, web.Response):
        return result
    tenant, claims, headers = result
    try:
        body = await request.json()
    except ValueError:
        return _json({"errors": {"detail": "Bad Request"}}, 400, headers)
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list) or not messages:
        return _json({"errors": {"messages": ["can't be blank"]}}, 422, headers)
    max_kb = server.limits.max_payload_size_in_kb
    errors = [_message_errors(m, max_kb) for m in messages]
    if any(errors):
        return _json({"errors": {"messages": errors}}, 422, headers)
    limit = server.limits.max_events_per_second
    avg = tenant.events.avg
    if avg > limit:
        return _json({"message": "You have exceeded your rate limit"}, 429, headers)
    if avg + len(messages) > limit:
        return _json(
            {"message": "Too many messages to broadcast, please reduce the batch size"},
            429,
            headers,
        )
    # rt: batch_broadcast.ex 55-90: private messages are grouped by topic and each
    # topic's write permission is asked once per request.
    writable: dict[str, bool] = {}
    for message in messages:
        private = message.get("private") is True
        topic = message["topic"]
        if private and topic not in writable:
            writable[topic] = await _may_write(server, topic, claims)
        if private and not writable[topic]:
            continue  # ref §4 A: silently dropped, still 202
        payload: dict[str, Any] = {
            "type": "broadcast",
            "event": message["event"],
            "payload": message["payload"],
        }
        if isinstance(message.get("id"), str):
            payload["meta"] = {"id": message["id"]}
        tenant.events.add(1)  # ref §6: +1 per REST message
        server.stats.rest_messages += 1
        server.publish(tenant, private, message["topic"], MapBroadcast(payload))
    return _empty(202, headers)


async def single(server: RealtimeServer, request: web.Request) -> web.StreamResponse:
    """B. `POST /api/broadcast/{topic}/events/{event}` (ref §4), a user broadcast."""
    result = _pipeline(server, request)
    if isinstance(result, web.Response):
        return result
    tenant, claims, headers = result
    topic = request.match_info["topic"]
    event = request.match_info["event"]
    media = request.content_type if "Content-Type" in request.headers else "application/json"
    if media not in SINGLE_MEDIA_TYPES:
        return _json(
            {"error": "Unsupported Media Type. Use application/json or application/octet-stream"},
            415,
            headers,
        )
    data = await request.read()
    encoding: Any = "json" if media == "application/json" else "binary"
    if encoding == "json":
        try:
            json.loads(data)
        except ValueError:
            return _json({"errors": {"detail": "Bad Request"}}, 400, headers)
    message = UserBroadcast(event, encoding, data)
    if len(data) > server.limits.max_payload_size_in_kb * 1000 + 500:
        return _json({"errors": {"payload": [SIZE_MESSAGE]}}, 422, headers)
    if tenant.events.avg >= server.limits.max_events_per_second:
        return _json({"message": "You have exceeded your rate limit"}, 429, headers)
    private = request.query.get("private") == "true"
    if private and not await _may_write(server, topic, claims):
        return _json({"message": "Unauthorized"}, 403, headers)
    tenant.events.add(1)  # ref §6: +1 per REST message
    server.stats.rest_messages += 1
    server.publish(tenant, private, topic, message)
    return _empty(202, headers)
