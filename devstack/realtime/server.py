"""The local Supabase Realtime server: aiohttp shell around the pure protocol core.

One tenant per Host first label (ref §1), each with its rate counters and topic
registry. `RealtimeServer.add_routes()` mounts the WebSocket and REST routes on any
aiohttp app (so a gateway can host several stand-ins on one port); `start()` runs it
alone on host:port.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from loguru import logger

from devstack.jwt import DEFAULT_JWT_SECRET

from . import dbbroadcast, rest
from .authorization import Authorizer, NoDatabase, PostgresAuthorizer
from .connection import (
    CLOSE_SERVICE_RESTART,
    ChannelSession,
    SocketSession,
)
from .faults import Faults
from .limits import RealtimeLimits, Timings
from .protocol import (
    Broadcast,
    Frame,
    ProtocolError,
    UserBroadcast,
    encode_broadcast,
    negotiate_version,
)
from .ratecounter import RateCounter
from .tokens import TokenError, verify_token

log = logger.bind(event="realtime.server")

WEBSOCKET_PATHS = ("/socket/websocket", "/realtime/v1/websocket")  # ref §1 "Path"
# The tenant of a local Supabase stack: its gateway proxies to realtime-dev.supabase-realtime.
LOCAL_TENANT = "realtime-dev"


def tenant_id_from_host(host: str) -> str:
    """ref §1: tenant = first label of the Host header (port stripped)."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name.split(".", 1)[0] or "localhost"


@dataclass
class Tenant:
    """Per-tenant state: rate counters (ref §6) and the topic registry."""

    id: str
    events: RateCounter
    joins: RateCounter
    requests: RateCounter
    sockets: set[SocketSession] = field(default_factory=set)
    subscribers: dict[tuple[bool, str], dict[ChannelSession, None]] = field(default_factory=dict)


@dataclass
class RealtimeStats:
    """Counters tests can read (server-wide; per-tenant rates are on `Tenant`)."""

    client_broadcasts: int = 0  # accepted client broadcasts (counted on the rate counter)
    deliveries: int = 0  # frames queued to subscribers
    rest_messages: int = 0  # REST messages accepted and published
    db_messages: int = 0  # realtime.send rows published
    db_dropped: int = 0  # realtime.send rows dropped (rate limit, payload size)
    joins: int = 0  # successful joins
    rate_limit_shutdowns: int = 0  # channels closed with "Too many messages per second"
    unauthorized_drops: int = 0  # private sends dropped for lack of write permission
    v1_binary_skips: int = 0  # binary user broadcasts not sent to V1 subscribers
    replies: dict[str, int] = field(default_factory=dict)  # broadcast replies by status
    upgrades_refused: dict[int, int] = field(default_factory=dict)  # by HTTP status


def _already_replayed(channel: ChannelSession, message: Broadcast) -> bool:
    # ref §3 "Replay": later live copies of a replayed message are suppressed.
    if not channel.replayed_ids or not isinstance(message, UserBroadcast) or not message.meta:
        return False
    return str(message.meta.get("id")) in channel.replayed_ids


class RealtimeServer:
    """A faithful local stand-in for Supabase Realtime (broadcast only).

    Args:
        host, port: where `start()` listens (port 0 picks a free one).
        jwt_secret: HS256 secret for apikeys and access tokens.
        limits: tenant quotas; Free plan by default.
        database_url: a Postgres with `realtime.messages`; private channels are authorized
            by its RLS policies. Without it private joins fail like an unreachable DB.
        time_scale: multiplies every server delay and period (2 s / 5 s error backoffs,
            60 s idle close, 5 s rate ticks, 5 min token re-check).
        tenant_ids: if given, the tenant is the first label of the Host (ref §1), and only
            these tenants exist (others get "Tenant not found").
        tenant_from_host: take the tenant from the Host even without `tenant_ids`. Off by
            default: a local Supabase stack's gateway (docker/volumes/api/kong.yml) proxies
            every client to `realtime-dev.supabase-realtime`, so all of them share the one
            tenant `realtime-dev` whatever host name they used (127.0.0.1, localhost...).
        authorizer: replaces the Postgres authorizer (a policy object for unit tests).
        timings: the unscaled delays, to override one of them.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        jwt_secret: str = DEFAULT_JWT_SECRET,
        limits: RealtimeLimits | None = None,
        database_url: str | None = None,
        time_scale: float = 1.0,
        tenant_ids: Collection[str] | None = None,
        tenant_from_host: bool = False,
        authorizer: Authorizer | None = None,
        timings: Timings | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.jwt_secret = jwt_secret
        self.limits = limits or RealtimeLimits()
        self.time_scale = time_scale
        self.timings = (timings or Timings()).scaled(time_scale)
        self.tenant_ids = set(tenant_ids) if tenant_ids is not None else None
        self.tenant_from_host = tenant_from_host or tenant_ids is not None
        self.authorizer: Authorizer = authorizer or (
            PostgresAuthorizer(database_url) if database_url else NoDatabase()
        )
        self.faults = Faults(server=self)
        self.stats = RealtimeStats()
        self.tenants: dict[str, Tenant] = {}
        self.database_url = database_url
        self.db_listener_ready = asyncio.Event()
        self._db_listener: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._expiry_tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ lifecycle

    def add_routes(self, app: web.Application) -> None:
        """Mount the routes of ref §1 and §4 under both bare and `/realtime/v1` paths."""
        for path in WEBSOCKET_PATHS:
            app.router.add_get(path, self._websocket)
        for prefix in ("", "/realtime/v1"):
            app.router.add_post(prefix + "/api/broadcast", self._rest_batch)
            app.router.add_post(prefix + "/api/broadcast/{topic}/events/{event}", self._rest_single)
            app.router.add_route("OPTIONS", prefix + "/api/broadcast", rest.preflight)
            app.router.add_route(
                "OPTIONS", prefix + "/api/broadcast/{topic}/events/{event}", rest.preflight
            )
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)

    async def _on_startup(self, app: web.Application) -> None:
        self._start_ticker()

    async def _on_shutdown(self, app: web.Application) -> None:
        await self._shutdown()

    def _start_ticker(self) -> None:
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.create_task(self._tick_loop(), name="realtime-rate-ticker")
        if self.database_url and (self._db_listener is None or self._db_listener.done()):
            self._db_listener = asyncio.create_task(
                dbbroadcast.listen(self.database_url, self.publish_db, self.db_listener_ready),
                name="realtime-db-broadcast",
            )

    async def start(self) -> None:
        """Run standalone on host:port (port 0 => a free port, see `url`)."""
        app = web.Application()
        self.add_routes(app)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        assert server is not None and isinstance(server, asyncio.base_events.Server)
        self.port = server.sockets[0].getsockname()[1]
        log.info("local Realtime listening on {}", self.url)

    async def stop(self) -> None:
        await self._shutdown()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _shutdown(self) -> None:
        for task in (self._ticker, self._db_listener):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._ticker = self._db_listener = None
        for task in list(self._expiry_tasks):
            task.cancel()
        await self.close_all_sockets(1001, "server shutting down")
        if isinstance(self.authorizer, PostgresAuthorizer):
            await self.authorizer.close()

    @property
    def url(self) -> str:
        """The SUPABASE_URL form: `http://host:port`."""
        return f"http://{self.host}:{self.port}"

    @property
    def websocket_url(self) -> str:
        return f"ws://{self.host}:{self.port}/realtime/v1/websocket"

    # ------------------------------------------------------------ tenants and counters

    def tenant(self, tenant_id: str | None = None) -> Tenant:
        """The tenant `tenant_id` (default: the one a client of `url` lands in)."""
        tid = tenant_id or (
            tenant_id_from_host(self.host) if self.tenant_from_host else LOCAL_TENANT
        )
        found = self.tenants.get(tid)
        if found is None:
            found = Tenant(
                tid,
                events=RateCounter(self.limits.max_events_per_second),
                joins=RateCounter(self.limits.max_joins_per_second),
                requests=RateCounter(self.limits.max_events_per_second),
            )
            self.tenants[tid] = found
        return found

    def tenant_for_request(self, request: web.Request) -> Tenant | None:
        if not self.tenant_from_host:
            return self.tenant(LOCAL_TENANT)
        tid = tenant_id_from_host(request.host)
        if self.tenant_ids is not None and tid not in self.tenant_ids:
            return None
        return self.tenant(tid)

    def tick(self) -> None:
        """Close one 5 s bucket on every tenant's counters now (ref §6); tests may call it."""
        for tenant in self.tenants.values():
            was = tenant.events.triggered
            tenant.events.tick()
            tenant.joins.tick()
            tenant.requests.tick()
            if tenant.events.triggered and not was:
                log.info("tenant {} over its message rate: avg {}", tenant.id, tenant.events.avg)

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.timings.rate_tick_s)
            self.tick()

    def concurrent_users(self, tenant: Tenant) -> int:
        """ref §6: sockets with at least one joined channel."""
        return sum(1 for s in tenant.sockets if s.channels)

    # ------------------------------------------------------------ pubsub

    def attach_channel(self, channel: ChannelSession) -> None:
        sock = channel.socket
        sock.channels[channel.topic] = channel
        sock.tenant.subscribers.setdefault(channel.key, {})[channel] = None
        self.restart_expiry_timer(channel)

    def detach_channel(self, channel: ChannelSession) -> None:
        subs = channel.socket.tenant.subscribers.get(channel.key)
        if subs is not None:
            subs.pop(channel, None)
            if not subs:
                del channel.socket.tenant.subscribers[channel.key]
        if channel.expiry_task is not None:
            channel.expiry_task.cancel()
            channel.expiry_task = None

    def detach_socket(self, sock: SocketSession) -> None:
        for channel in list(sock.channels.values()):
            sock.remove_channel(channel)
        sock.tenant.sockets.discard(sock)

    def deliver(
        self,
        tenant: Tenant,
        key: tuple[bool, str],
        topic: str,
        message: Broadcast,
        *,
        exclude: ChannelSession | None = None,
    ) -> int:
        """Queue `message` to every subscriber of `key` (ref §3), counting each delivery.

        ref §6 (rt: message_dispatcher.ex): the frame goes straight to the subscriber's
        socket, and the channel, told to count it, shuts itself down ("Too many messages per
        second") if the tenant's counter is triggered, so that frame still arrives first.
        """
        delivered = 0
        for channel in list(tenant.subscribers.get(key, ())):
            if channel is exclude or _already_replayed(channel, message):
                continue
            tenant.events.add(1)  # ref §6: +1 per delivery to each subscribed channel
            try:
                data = encode_broadcast(channel.socket.version, topic, message)
            except ProtocolError as exc:  # e.g. a topic over 255 bytes for kind 4
                log.warning("cannot encode a broadcast for {}: {}", topic, exc)
                data = None
            if data is None:
                self.stats.v1_binary_skips += 1
            else:
                channel.socket.push(data)
                delivered += 1
            if tenant.events.triggered:
                self.stats.rate_limit_shutdowns += 1
                channel.socket.shutdown_channel(channel, "Too many messages per second")
        self.stats.deliveries += delivered
        return delivered

    # ------------------------------------------------------------ tokens

    def restart_expiry_timer(self, channel: ChannelSession) -> None:
        """ref §2: re-check the token every min(5 min, exp - now); expired => shutdown."""
        if channel.expiry_task is not None:
            channel.expiry_task.cancel()
        task = asyncio.create_task(self._expiry_loop(channel), name="realtime-token-expiry")
        channel.expiry_task = task
        self._expiry_tasks.add(task)
        task.add_done_callback(self._expiry_tasks.discard)

    async def _expiry_loop(self, channel: ChannelSession) -> None:
        while True:
            exp = float(channel.claims.get("exp", 0))
            delay = max(0.0, min(self.timings.token_recheck_max_s, exp - time.time()))
            # A tick past exp, so the check sees the token expired.
            await asyncio.sleep(delay + 0.01)
            try:
                verify_token(channel.token, self.jwt_secret, time.time())
            except TokenError as err:
                channel.expiry_task = None
                channel.socket.shutdown_channel(channel, err.shutdown_message())
                return

    # ------------------------------------------------------------ faults

    async def close_all_sockets(self, code: int, reason: str = "") -> int:
        sockets = [s for t in self.tenants.values() for s in t.sockets]
        for sock in sockets:
            sock.close(code, reason)
        await asyncio.sleep(0)
        return len(sockets)

    async def server_requested_disconnect(self) -> int:
        """ref §2: system ok "Server requested disconnect" (no `channel`) on every channel,
        then socket close 1012."""
        sockets = [s for t in self.tenants.values() for s in t.sockets]
        for sock in sockets:
            for channel in list(sock.channels.values()):
                payload = {
                    "extension": "system",
                    "status": "ok",
                    "message": "Server requested disconnect",
                }
                sock.send(Frame(channel.topic, "system", payload, None, channel.join_ref))
            sock.close(CLOSE_SERVICE_RESTART, "")
        await asyncio.sleep(0)
        return len(sockets)

    # ------------------------------------------------------------ HTTP handlers

    async def _refuse_upgrade(self, status: int, message: str) -> web.Response:
        # ref §1: HTTP error + {"error": msg} after the 2 s CONNECT_ERROR_BACKOFF.
        self.stats.upgrades_refused[status] = self.stats.upgrades_refused.get(status, 0) + 1
        await asyncio.sleep(self.timings.connect_error_backoff_s)
        return web.json_response({"error": message}, status=status)

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        self._start_ticker()
        version = negotiate_version(request.query.get("vsn"))
        if version is None:
            # ref §1: other vsn values refuse the upgrade (Phoenix, before user code runs).
            self.stats.upgrades_refused[403] = self.stats.upgrades_refused.get(403, 0) + 1
            return web.Response(status=403)
        tenant = self.tenant_for_request(request)
        if tenant is None:
            return await self._refuse_upgrade(404, "Tenant not found")
        # ref §1: header x-api-key wins over the apikey query parameter.
        apikey = request.headers.get("x-api-key") or request.query.get("apikey")
        try:
            claims = verify_token(apikey, self.jwt_secret, time.time())
        except TokenError as err:
            return await self._refuse_upgrade(401, err.upgrade_message())
        if self.faults.take_upgrade_refusal():
            return await self._refuse_upgrade(500, "Error connecting to Realtime")
        if self.concurrent_users(tenant) >= self.limits.max_concurrent_users:
            return await self._refuse_upgrade(429, "Too many connected users")
        if tenant.joins.triggered:
            return await self._refuse_upgrade(429, "Too many joins per second")
        assert apikey is not None
        ws = web.WebSocketResponse(
            autoping=False,  # pongs are ours to send (or to withhold: faults.stall_pong)
            # Realtime's endpoint leaves Phoenix's `compress` at false (rt:
            # lib/realtime_web/endpoint.ex 16-35): permessage-deflate is never agreed.
            compress=False,
            max_msg_size=self.limits.max_frame_size_bytes,
            timeout=2.0,
        )
        await ws.prepare(request)
        sock = SocketSession(self, ws, version, tenant, apikey, claims)
        tenant.sockets.add(sock)
        await sock.run()
        return ws

    async def _rest_batch(self, request: web.Request) -> web.StreamResponse:
        return await rest.batch(self, request)

    async def _rest_single(self, request: web.Request) -> web.StreamResponse:
        return await rest.single(self, request)

    def publish(self, tenant: Tenant, private: bool, sub: str, message: Broadcast) -> int:
        """Publish a server-originated message (REST, DB) to a sub-topic."""
        return self.deliver(tenant, (private, sub), "realtime:" + sub, message)

    def publish_db(self, sub: str, private: bool, message: UserBroadcast) -> None:
        """A committed `realtime.send` row (ref §5): counted, size- and rate-checked,
        dropped when over either, else published as a user broadcast with `meta.id`."""
        tenant = self.tenant()
        too_big = len(message.data) > self.limits.max_payload_size_in_kb * 1000 + 500
        if too_big or tenant.events.triggered:
            self.stats.db_dropped += 1
            return
        tenant.events.add(1)  # ref §6: +1 per DB broadcast
        self.stats.db_messages += 1
        self.publish(tenant, private, sub, message)

    def describe(self) -> dict[str, Any]:
        """A snapshot for logs and debugging."""
        return {
            tid: {
                "sockets": len(t.sockets),
                "events_avg": t.events.avg,
                "events_triggered": t.events.triggered,
                "topics": len(t.subscribers),
            }
            for tid, t in self.tenants.items()
        }
