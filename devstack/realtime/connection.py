"""One WebSocket of the local Realtime server: the socket "process" and its channels.

Phoenix runs a socket's frames one at a time in one process and a join synchronously
inside it (ref §2 "Join pipeline"), so `SocketSession.run` reads and handles frames
strictly in order and awaits each join before reading the next frame; while a join is
pending, outbound pushes from elsewhere are held, as they would sit in the process's
mailbox, and go out after the join's reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg
from aiohttp import WSMsgType, web
from loguru import logger

from . import dbbroadcast
from .authorization import AuthContext, AuthorizationUnavailable
from .faults import AckOutcome
from .protocol import (
    TOPIC_PREFIX,
    Broadcast,
    Frame,
    MapBroadcast,
    ProtocolError,
    UserBroadcast,
    UserPayload,
    Version,
    close_frame,
    decode_binary,
    decode_text,
    encode_broadcast,
    encode_message,
    payload_too_large,
    reply_frame,
    sub_topic,
    system_frame,
)
from .tokens import TokenError, verify_token

if TYPE_CHECKING:
    from .server import RealtimeServer, Tenant

log = logger.bind(event="realtime.socket")

# ref §1: no-inbound-frame timeout closes with 1000; 1011 when a frame cannot be decoded
# (the Phoenix socket process crashes).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL_ERROR = 1011
CLOSE_SERVICE_RESTART = 1012
CLOSE_GRACE_S = 3.0  # for queued frames and the close handshake (aiohttp's own timeout: 2 s)


@dataclass(frozen=True)
class _Close:
    code: int
    reason: str


class JoinRefused(Exception):
    def __init__(self, reason: str, *, close_code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.close_code = close_code


def _truthy(value: Any, default: bool = False) -> bool:
    # ref §2: booleans accept "true"/"false" strings; invalid values fall back to defaults.
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return default


@dataclass(eq=False)
class ChannelSession:
    """One joined channel (the real server's channel process)."""

    socket: SocketSession
    topic: str
    join_ref: str | None
    private: bool
    ack: bool
    self_broadcast: bool
    claims: dict[str, Any]
    token: str | None
    can_write: bool | None = None
    expiry_task: asyncio.Task[None] | None = field(default=None, repr=False)
    # ref §3 "Replay": pushed right after the join reply; live copies of them suppressed.
    replay: list[UserBroadcast] = field(default_factory=list, repr=False)
    replayed_ids: set[str] = field(default_factory=set, repr=False)

    @property
    def sub_topic(self) -> str:
        return sub_topic(self.topic)

    @property
    def key(self) -> tuple[bool, str]:
        # ref §3 "Namespaces": private and public channels of one name are separate topics.
        return (self.private, self.sub_topic)

    def auth_context(self) -> AuthContext:
        return AuthContext(self.sub_topic, self.claims)


class SocketSession:
    """The socket process: strict in-order frame handling, one outbound queue."""

    def __init__(
        self,
        server: RealtimeServer,
        ws: web.WebSocketResponse,
        version: Version,
        tenant: Tenant,
        apikey: str,
        apikey_claims: dict[str, Any],
    ) -> None:
        self.server = server
        self.ws = ws
        self.version = version
        self.tenant = tenant
        self.apikey = apikey
        self.apikey_claims = apikey_claims
        self.channels: dict[str, ChannelSession] = {}
        self._out: asyncio.Queue[str | bytes | _Close] = asyncio.Queue()
        self._held: list[str | bytes | _Close] = []
        self._blocked = False
        self._closing = False
        self.close_code: int | None = None

    # ------------------------------------------------------------ outbound

    def push(self, item: str | bytes | _Close, *, from_socket: bool = False) -> None:
        """Queue an outbound frame; held while a join blocks the socket unless it is the
        socket process's own output (a reply to the frame being handled)."""
        if self._closing:
            return
        if isinstance(item, _Close):
            self._closing = True
        if self._blocked and not from_socket:
            self._held.append(item)
        else:
            self._out.put_nowait(item)

    def send(self, frame: Frame, *, from_socket: bool = False) -> None:
        self.push(encode_message(self.version, frame), from_socket=from_socket)

    def close(self, code: int, reason: str = "", *, from_socket: bool = True) -> None:
        self.push(_Close(code, reason), from_socket=from_socket)

    def _unblock(self) -> None:
        self._blocked = False
        held, self._held = self._held, []
        for item in held:
            self._out.put_nowait(item)

    async def _writer(self) -> None:
        while True:
            item = await self._out.get()
            if isinstance(item, _Close):
                self.close_code = item.code
                with contextlib.suppress(ConnectionError):
                    await self.ws.close(code=item.code, message=item.reason.encode())
                return
            if self.ws.closed:
                return
            try:
                if isinstance(item, bytes):
                    await self.ws.send_bytes(item)
                else:
                    await self.ws.send_str(item)
            except ConnectionError:
                return

    # ------------------------------------------------------------ inbound

    async def run(self) -> None:
        writer = asyncio.create_task(self._writer(), name="realtime-socket-writer")
        try:
            await self._read_loop()
        finally:
            self.server.detach_socket(self)
            if not writer.done():
                # Give queued frames (a reply, a close) a moment to go out.
                self.push(_Close(CLOSE_NORMAL, ""), from_socket=True)
                with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
                    await asyncio.wait_for(asyncio.shield(writer), CLOSE_GRACE_S)
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await writer

    async def _read_loop(self) -> None:
        idle_s = self.server.timings.idle_timeout_s
        while not self.ws.closed:
            try:
                msg = await self.ws.receive(timeout=idle_s)
            except TimeoutError:
                # ref §1: close 1000 after 60 s without an inbound frame.
                self.close(CLOSE_NORMAL, "")
                return
            if msg.type == WSMsgType.PING:
                if not self.server.faults.stall_pong:
                    with contextlib.suppress(ConnectionError):
                        await self.ws.pong(msg.data)
                continue
            if msg.type == WSMsgType.PONG:
                continue
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                # CLOSE / CLOSING / CLOSED / ERROR (1009 for oversize frames, ref §1).
                return
            try:
                if msg.type == WSMsgType.TEXT:
                    frame = decode_text(self.version, msg.data)
                else:
                    frame = decode_binary(self.version, msg.data)
            except ProtocolError as exc:
                log.warning("undecodable frame, closing socket: {}", exc)
                self.close(CLOSE_INTERNAL_ERROR, "")
                return
            await self.handle(frame)

    async def handle(self, frame: Frame) -> None:
        if frame.topic == "phoenix" and frame.event == "heartbeat":
            # ref §2 "Heartbeat": reply ok {} on `phoenix`, same ref (null allowed).
            if not self.server.faults.stall_heartbeat:
                self.send(
                    reply_frame("phoenix", frame.ref, frame.join_ref, "ok", {}), from_socket=True
                )
            return
        if frame.event == "phx_join":
            await self._join(frame)
            return
        channel = self.channels.get(frame.topic)
        if channel is None:
            # ref §2: push to a topic not joined on this socket.
            self.send(
                reply_frame(
                    frame.topic, frame.ref, frame.join_ref, "error", {"reason": "unmatched topic"}
                ),
                from_socket=True,
            )
            return
        # ref §2: stale or missing join_ref is accepted (no join_ref check here).
        if frame.event == "phx_leave":
            self.send(
                reply_frame(frame.topic, frame.ref, channel.join_ref, "ok", {}), from_socket=True
            )
            self.remove_channel(channel)
            self.send(close_frame(channel.topic, channel.join_ref), from_socket=True)
        elif frame.event == "broadcast":
            await self._broadcast(channel, frame)
        elif frame.event == "access_token":
            await self._access_token(channel, frame)
        elif frame.event != "presence":
            # rt: realtime_channel.ex handle_in catch-all: counted, logged, no reply.
            self.tenant.events.add(1)
        # Presence is not implemented: its pushes are ignored without a reply.

    # ------------------------------------------------------------ join

    async def _join(self, frame: Frame) -> None:
        if not frame.topic.startswith(TOPIC_PREFIX):
            # ref §2: non-`realtime:` topics get Phoenix's "unmatched topic", at once.
            self.send(
                reply_frame(
                    frame.topic, frame.ref, frame.join_ref, "error", {"reason": "unmatched topic"}
                ),
                from_socket=True,
            )
            return
        old = self.channels.get(frame.topic)
        if old is not None:
            # ref §2: duplicate join => old channel's phx_close, then the new join.
            self.remove_channel(old)
            self.send(close_frame(old.topic, old.join_ref), from_socket=True)
        self._blocked = True
        try:
            try:
                channel = await self._guarded_admit(frame)
            except JoinRefused as refused:
                await asyncio.sleep(self.server.timings.channel_error_backoff_s)
                self.send(
                    reply_frame(
                        frame.topic, frame.ref, frame.join_ref, "error", {"reason": refused.reason}
                    ),
                    from_socket=True,
                )
                if refused.close_code is not None:
                    self.close(refused.close_code, "")
                return
            postgres_changes = _echo_postgres_changes(frame.payload)
            self.send(
                reply_frame(
                    frame.topic,
                    frame.ref,
                    frame.join_ref,
                    "ok",
                    {"postgres_changes": postgres_changes},
                ),
                from_socket=True,
            )
            for message in channel.replay:
                with contextlib.suppress(ProtocolError):
                    data = encode_broadcast(self.version, channel.topic, message)
                    if data is not None:
                        self.push(data, from_socket=True)
            self.server.attach_channel(channel)
        finally:
            self._unblock()

    async def _guarded_admit(self, frame: Frame) -> ChannelSession:
        try:
            return await self._admit(frame)
        except JoinRefused:
            raise
        except Exception as exc:
            # ref §2: catch-all "Unknown Error on Channel" (no prefix).
            log.exception("join failed unexpectedly")
            raise JoinRefused("Unknown Error on Channel") from exc

    async def _admit(self, frame: Frame) -> ChannelSession:
        """The join pipeline of ref §2, in the real order; raises JoinRefused."""
        payload = frame.payload if isinstance(frame.payload, dict) else {}
        config = payload.get("config") if isinstance(payload.get("config"), dict) else {}
        assert isinstance(config, dict)
        broadcast = config.get("broadcast") if isinstance(config.get("broadcast"), dict) else {}
        assert isinstance(broadcast, dict)
        private = _truthy(config.get("private"))
        name = sub_topic(frame.topic)
        tenant, limits = self.tenant, self.server.limits
        if not name:
            raise JoinRefused("TopicNameRequired: You must provide a topic name")
        if limits.private_only and not private:
            raise JoinRefused("PrivateOnly: This project only allows private channels")
        if (
            not self.channels
            and self.server.concurrent_users(tenant) >= limits.max_concurrent_users
        ):
            raise JoinRefused("ConnectionRateLimitReached: Too many connected users")
        if tenant.joins.triggered:
            raise JoinRefused(
                "ClientJoinRateLimitReached: Too many joins per second", close_code=CLOSE_GOING_AWAY
            )
        tenant.joins.add(1)  # rt: limit_joins counts only joins it lets through
        if len(self.channels) >= limits.max_channels_per_client:
            raise JoinRefused("ChannelRateLimitReached: Too many channels")
        token = payload.get("access_token") or payload.get("user_token") or self.apikey
        if not isinstance(token, str) or token.startswith("sb_"):
            token = self.apikey
        try:
            claims = verify_token(token, self.server.jwt_secret, time.time())
        except TokenError as err:
            raise JoinRefused(err.join_reason()) from err
        replay = broadcast.get("replay")
        if replay is not None and not private:
            raise JoinRefused("UnableToReplayMessages: Replay is not allowed for public channels")
        channel = ChannelSession(
            socket=self,
            topic=frame.topic,
            join_ref=frame.join_ref or frame.ref,
            private=private,
            ack=_truthy(broadcast.get("ack")),
            self_broadcast=_truthy(broadcast.get("self")),
            claims=claims,
            token=token,
        )
        if private and not await self._may_read(channel):
            raise JoinRefused(
                f"Unauthorized: You do not have permissions to read from this Channel topic: {name}"
            )
        if replay is not None:
            await self._load_replay(channel, replay)
        self.server.stats.joins += 1
        return channel

    async def _load_replay(self, channel: ChannelSession, replay: Any) -> None:
        since = replay.get("since") if isinstance(replay, dict) else None
        if not isinstance(since, int) or isinstance(since, bool):
            raise JoinRefused("UnableToReplayMessages: Replay params are not valid")
        url = self.server.database_url
        if url is None:
            raise JoinRefused("UnableToReplayMessages: Realtime was unable to replay messages")
        try:
            channel.replay = await dbbroadcast.fetch_replay(
                url, channel.sub_topic, since, dbbroadcast.replay_limit(replay.get("limit"))
            )
        except psycopg.Error as exc:
            log.warning("replay query failed: {}", exc)
            raise JoinRefused(
                "UnableToReplayMessages: Realtime was unable to replay messages"
            ) from exc
        channel.replayed_ids = {str((m.meta or {}).get("id")) for m in channel.replay}

    async def _may_read(self, channel: ChannelSession) -> bool:
        try:
            return await self.server.authorizer.can_read(channel.auth_context())
        except AuthorizationUnavailable as exc:
            log.warning("RLS read check failed: {}", exc)
            raise JoinRefused(
                "UnableToConnectToProject: Realtime was unable to connect to the project database"
            ) from exc

    # ------------------------------------------------------------ broadcast

    async def _may_write(self, channel: ChannelSession) -> bool:
        # ref §3: checked lazily on the first send, cached until an access_token refresh.
        if channel.can_write is None:
            try:
                channel.can_write = await self.server.authorizer.can_write(channel.auth_context())
            except AuthorizationUnavailable as exc:
                log.warning("RLS write check failed: {}", exc)
                return False  # ref §3/§5: policy errors are logged, the send dropped
        return channel.can_write

    async def _broadcast(self, channel: ChannelSession, frame: Frame) -> None:
        payload = frame.payload
        if not isinstance(payload, dict | UserPayload):
            return
        if channel.private and not await self._may_write(channel):
            # ref §3: unauthorized private send => dropped, no reply even with ack.
            self.server.stats.unauthorized_drops += 1
            return
        tenant = self.tenant
        tenant.events.add(1)  # ref §6: +1 per accepted client broadcast
        self.server.stats.client_broadcasts += 1
        if payload_too_large(payload, self.server.limits.max_payload_size_in_kb):
            # ref §3: oversize + ack => error "payload_size_exceeded"; without ack, dropped.
            if channel.ack:
                self._reply(channel, frame, "error", "payload_size_exceeded")
            return
        outcome = self.server.faults.next_ack_outcome() if channel.ack else AckOutcome.OK
        if outcome in (AckOutcome.REJECT, AckOutcome.DROP):
            if outcome is AckOutcome.REJECT:
                self._reply(channel, frame, "error", self.server.faults.reject_response)
            return
        message: Broadcast
        if isinstance(payload, UserPayload):
            message = UserBroadcast(payload.event, payload.encoding, payload.data)
        else:
            message = MapBroadcast(payload)  # ref §3: verbatim, extra keys included
        exclude = None if channel.self_broadcast else channel
        self.server.deliver(tenant, channel.key, channel.topic, message, exclude=exclude)
        if not channel.ack or outcome is AckOutcome.LOSE_REPLY:
            return
        if outcome is AckOutcome.DELAY:
            asyncio.get_running_loop().call_later(
                self.server.faults.ack_delay_s, self._reply, channel, frame, "ok", {}, False
            )
            return
        # ref §3: ok once handed to PubSub; local subscribers' frames are already queued.
        self._reply(channel, frame, "ok", {})

    def _reply(
        self, channel: ChannelSession, frame: Frame, status: str, response: Any, now: bool = True
    ) -> None:
        self.server.stats.replies[status] = self.server.stats.replies.get(status, 0) + 1
        self.send(
            reply_frame(channel.topic, frame.ref, channel.join_ref, status, response),
            from_socket=now,
        )

    # ------------------------------------------------------------ tokens

    async def _access_token(self, channel: ChannelSession, frame: Frame) -> None:
        payload = frame.payload if isinstance(frame.payload, dict) else {}
        token = payload.get("access_token")
        # ref §2 "access_token": ignored when sb_…, unchanged or null; no reply on success.
        if not isinstance(token, str) or token.startswith("sb_") or token == channel.token:
            return
        try:
            claims = verify_token(token, self.server.jwt_secret, time.time())
        except TokenError as err:
            self.shutdown_channel(channel, err.shutdown_message())
            return
        channel.claims, channel.token, channel.can_write = claims, token, None
        if channel.private:
            try:
                readable = await self.server.authorizer.can_read(channel.auth_context())
            except AuthorizationUnavailable:
                self.shutdown_channel(
                    channel, "Realtime was unable to connect to the project database"
                )
                return
            if not readable:
                self.shutdown_channel(
                    channel,
                    "You no longer have permission to read from this Channel topic: "
                    + channel.sub_topic,
                )
                return
        self.server.restart_expiry_timer(channel)

    # ------------------------------------------------------------ channel lifecycle

    def remove_channel(self, channel: ChannelSession) -> None:
        if self.channels.get(channel.topic) is channel:
            del self.channels[channel.topic]
        self.server.detach_channel(channel)

    def shutdown_channel(self, channel: ChannelSession, message: str) -> None:
        """ref §2 "Channel shutdown": system error, then phx_close; the socket stays."""
        if self.channels.get(channel.topic) is not channel:
            return
        self.remove_channel(channel)
        self.send(system_frame(channel.topic, channel.join_ref, "error", message))
        self.send(close_frame(channel.topic, channel.join_ref))


def _echo_postgres_changes(payload: Any) -> list[dict[str, Any]]:
    """ref §2: the ok reply echoes postgres_changes filters with numeric ids (no events
    are ever produced: postgres_changes is not implemented here)."""
    if not isinstance(payload, dict):
        return []
    config = payload.get("config")
    changes = config.get("postgres_changes") if isinstance(config, dict) else None
    if not isinstance(changes, list):
        return []
    echoed: list[dict[str, Any]] = []
    for i, change in enumerate(changes):
        if isinstance(change, dict):
            echoed.append({**change, "id": 1000 + i})
    return echoed
