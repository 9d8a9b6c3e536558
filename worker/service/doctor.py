"""`llm-relay doctor [--json]`: check this deployment end to end, one line per check.

The thin I/O shells around `worker.service.diagnosis`: each one observes one thing
(a connection, a catalog query, a join reply, an HTTP status, a probe) with its own
timeout and hands the facts to a pure `judge_*` function. Nothing stops the run:
every check reports, and a check that needs an earlier one says so.

Groups run concurrently (database; Realtime as the worker; Realtime as the anon key;
each provider; the health port) under one overall deadline, and the report lists the
checks in their fixed order. Realtime is spoken directly (Phoenix V1 JSON over
`websockets`): the doctor must see the server's own reason strings and statuses,
which realtime-py retries past or hides (ref §8).

Exit 0 when every check passed, 1 otherwise. Keys never reach the output: every
detail is scrubbed of the configured secrets before it is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
import orjson
import psycopg
from loguru import logger
from psycopg import sql
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus, WebSocketException

from worker.cli import Command
from worker.config import Provider, Settings
from worker.errors import ConfigError
from worker.service import diagnosis as d
from worker.upstream import probe
from worker.upstream.client import parse_fallbacks, parse_model_map

log = logger.bind(event="doctor")

DOCTOR_TOPIC_PREFIX = "llm-relay-doctor:"
DOCTOR_EVENT = "llm-relay-doctor"
PROBE_PROMPT = "Reply with the single word OK."
MAX_BUFFERED_FRAMES = 1000


@dataclass(frozen=True)
class DoctorTimeouts:
    """Per-check bounds, in seconds. A refused upgrade answers after the real server's
    2 s backoff and a refused join after its 5 s backoff (ref §1, §2), so those bounds
    leave room for them; the groups run concurrently and the whole run stays under
    `total_s`."""

    database_s: float = 5.0
    listen_s: float = 3.0
    realtime_connect_s: float = 6.0
    join_s: float = 8.0
    ack_s: float = 4.0
    rest_s: float = 4.0
    delivery_s: float = 3.0
    provider_s: float = 12.0
    health_s: float = 2.0
    total_s: float = 20.0  # plus the CLI's start-up: the whole run stays under 30 s


# --- settings ---------------------------------------------------------------------


def _jwt_role(secret: str | None) -> str | None:
    if not secret:
        return None
    try:
        claims = jwt.decode(secret, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    role = claims.get("role")
    return str(role) if role is not None else None


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None


def providers_of(settings: Settings) -> list[Provider]:
    """The configured provider, then each fallback, each once."""
    out: list[Provider] = [settings.relay_provider]
    for provider in parse_fallbacks(settings.relay_fallback_providers):
        if provider not in out:
            out.append(provider)
    return out


def check_settings(settings: Settings) -> tuple[d.CheckResult, list[Provider]]:
    try:
        providers = providers_of(settings)
        parse_model_map(settings.relay_fallback_models)
    except ConfigError as exc:
        return d.judge_settings(
            error=exc.message,
            service_role_key=False,
            database_url=False,
            provider_keys={},
            key_roles={},
        ), [settings.relay_provider]
    result = d.judge_settings(
        error=None,
        service_role_key=bool(_secret(settings.supabase_service_role_key)),
        database_url=bool(settings.database_url),
        provider_keys={p: settings.provider_configured(p) for p in providers},
        key_roles={
            "SUPABASE_SERVICE_ROLE_KEY": _jwt_role(_secret(settings.supabase_service_role_key)),
            "SUPABASE_ANON_KEY": _jwt_role(_secret(settings.supabase_anon_key)),
        },
    )
    return result, providers


def secrets_of(settings: Settings) -> list[str]:
    values = [
        _secret(settings.supabase_service_role_key),
        _secret(settings.supabase_anon_key),
        _secret(settings.openai_api_key),
        _secret(settings.groq_api_key),
    ]
    if settings.database_url:
        password = urlsplit(settings.database_url).password
        values.append(password)
    return [v for v in values if v]


# --- database ---------------------------------------------------------------------

_CATALOG_TABLES = """
SELECT n.nspname, c.relname, c.relrowsecurity
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname IN ('public', 'realtime')
"""
_CATALOG_POLICIES = "SELECT schemaname, tablename, policyname FROM pg_policies"
_CATALOG_TRIGGERS = """
SELECT n.nspname, c.relname, t.tgname
FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE NOT t.tgisinternal
"""
_CATALOG_FUNCTIONS = """
SELECT n.nspname, p.proname
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = 'public'
"""


async def _connect(url: str, timeout_s: float) -> psycopg.AsyncConnection[Any]:
    # prepare_threshold=None: a pgbouncer in transaction mode breaks prepared
    # statements, and that error would hide the one this check is for.
    return await asyncio.wait_for(
        psycopg.AsyncConnection.connect(
            url, autocommit=True, connect_timeout=max(1, int(timeout_s)), prepare_threshold=None
        ),
        timeout_s,
    )


async def _schema_objects(conn: psycopg.AsyncConnection[Any]) -> tuple[set[d.SchemaObject], bool]:
    found: set[d.SchemaObject] = set()
    realtime_schema = False
    for schema, table, rls in await (await conn.execute(_CATALOG_TABLES)).fetchall():
        found.add(d.SchemaObject("table", schema, table))
        if rls:
            found.add(d.SchemaObject("rls", schema, table))
        realtime_schema = realtime_schema or schema == "realtime"
    for schema, table, name in await (await conn.execute(_CATALOG_POLICIES)).fetchall():
        found.add(d.SchemaObject("policy", schema, name, table))
    for schema, table, name in await (await conn.execute(_CATALOG_TRIGGERS)).fetchall():
        found.add(d.SchemaObject("trigger", schema, name, table))
    for schema, name in await (await conn.execute(_CATALOG_FUNCTIONS)).fetchall():
        found.add(d.SchemaObject("function", schema, name))
    return found, realtime_schema


async def _listen_round_trip(
    url: str, listener: psycopg.AsyncConnection[Any], timeout_s: float
) -> bool:
    """LISTEN here, NOTIFY from a second connection: does it arrive?"""
    channel = f"llm_relay_doctor_{uuid.uuid4().hex}"
    await listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
    try:
        async with await _connect(url, timeout_s) as sender:
            await sender.execute("SELECT pg_notify(%s, 'doctor')", (channel,))
        async for note in listener.notifies(timeout=timeout_s, stop_after=1):
            return note.channel == channel
        return False
    finally:
        with contextlib.suppress(psycopg.Error):
            await listener.execute(sql.SQL("UNLISTEN {}").format(sql.Identifier(channel)))


async def database_group(
    settings: Settings, t: DoctorTimeouts, out: dict[str, d.CheckResult]
) -> None:
    url = settings.database_url
    if not url:
        for name in (d.CHECK_DATABASE, d.CHECK_DATABASE_MODE, d.CHECK_MIGRATIONS):
            out[name] = d.not_run(name, "DATABASE_URL is not set")
        return
    target = d.classify_database_url(url)
    try:
        conn = await _connect(url, t.database_s)
    except (psycopg.Error, OSError, TimeoutError) as exc:
        error = str(exc).strip() or type(exc).__name__
        out[d.CHECK_DATABASE] = d.judge_database(target, error=error, version="")
        out[d.CHECK_DATABASE_MODE] = d.judge_database_mode(target, error=None, notified=None)
        out[d.CHECK_MIGRATIONS] = d.judge_migrations([], error=error, realtime_schema=None)
        return
    async with conn:
        row = await (await conn.execute("SHOW server_version")).fetchone()
        out[d.CHECK_DATABASE] = d.judge_database(
            target, error=None, version=f"PostgreSQL {row[0] if row else '?'}"
        )
        listen_error: str | None = None
        try:
            notified = await _listen_round_trip(url, conn, t.listen_s)
        except (psycopg.Error, OSError, TimeoutError) as exc:
            notified, listen_error = False, f"{type(exc).__name__}: {exc}"
        out[d.CHECK_DATABASE_MODE] = d.judge_database_mode(
            target, error=listen_error, notified=notified
        )
        try:
            found, realtime_schema = await asyncio.wait_for(_schema_objects(conn), t.database_s)
            out[d.CHECK_MIGRATIONS] = d.judge_migrations(
                found, error=None, realtime_schema=realtime_schema
            )
        except (psycopg.Error, TimeoutError) as exc:
            out[d.CHECK_MIGRATIONS] = d.judge_migrations(
                [], error=f"{type(exc).__name__}: {exc}", realtime_schema=None
            )


# --- Realtime (Phoenix V1 JSON, ref §1-§3) ------------------------------------------


def websocket_url(settings: Settings, key: str) -> str:
    base = settings.realtime_url
    base = "wss://" + base[8:] if base.startswith("https://") else base
    base = "ws://" + base[7:] if base.startswith("http://") else base
    return f"{base}/websocket?apikey={key}&vsn=1.0.0"


class PhoenixSocket:
    """Just enough of a Phoenix V1 client to join, push and read replies."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._frames: list[dict[str, Any]] = []
        self._arrived = asyncio.Event()
        self._ref = 0
        self.join_ref = ""
        self._reader = asyncio.create_task(self._read(), name="doctor-realtime-reader")

    @classmethod
    async def open(cls, url: str, timeout_s: float) -> tuple[PhoenixSocket | None, d.Upgrade]:
        try:
            ws = await connect(url, open_timeout=timeout_s, ping_interval=None, max_size=2**22)
        except InvalidStatus as exc:
            body = exc.response.body or b""
            message = body.decode("utf-8", "replace")
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                message = str(orjson.loads(body).get("error") or message)
            return None, d.Upgrade(False, exc.response.status_code, message)
        except (OSError, TimeoutError, WebSocketException) as exc:
            return None, d.Upgrade(False, None, f"{type(exc).__name__}: {exc}")
        return cls(ws), d.Upgrade(True)

    async def _read(self) -> None:
        with contextlib.suppress(WebSocketException, OSError):
            async for raw in self._ws:
                with contextlib.suppress(orjson.JSONDecodeError):
                    frame = orjson.loads(raw)
                    if isinstance(frame, dict):
                        # Bounded: a throw-away topic hears only us, but a busy
                        # socket must not grow this without end.
                        del self._frames[: len(self._frames) - MAX_BUFFERED_FRAMES + 1]
                        self._frames.append(frame)
                        self._arrived.set()

    async def send(self, topic: str, event: str, payload: dict[str, Any], join_ref: str) -> str:
        self._ref += 1
        ref = str(self._ref)
        frame = {"topic": topic, "event": event, "payload": payload, "ref": ref}
        frame["join_ref"] = join_ref or ref
        await self._ws.send(orjson.dumps(frame).decode())
        return ref

    async def expect(
        self, match: Callable[[dict[str, Any]], bool], timeout_s: float
    ) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout_s
        while True:
            for i, frame in enumerate(self._frames):
                if match(frame):
                    return self._frames.pop(i)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._reader.done():
                return None
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    async def reply(self, ref: str, timeout_s: float) -> dict[str, Any] | None:
        frame = await self.expect(
            lambda f: f.get("event") == "phx_reply" and f.get("ref") == ref, timeout_s
        )
        return None if frame is None else dict(frame.get("payload") or {})

    async def join(self, topic: str, key: str, *, private: bool, timeout_s: float) -> d.Join:
        config = {
            "broadcast": {"ack": True, "self": True},
            "presence": {"key": "", "enabled": False},
            "private": private,
            "postgres_changes": [],
        }
        ref = await self.send(
            "realtime:" + topic, "phx_join", {"config": config, "access_token": key}, ""
        )
        self.join_ref = ref
        reply = await self.reply(ref, timeout_s)
        if reply is None:
            return d.Join(False, f"timeout: no reply within {timeout_s:g} s")
        if reply.get("status") == "ok":
            return d.Join(True)
        response = reply.get("response")
        reason = response.get("reason") if isinstance(response, dict) else response
        return d.Join(False, str(reason))

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._ws.close(), 2.0)
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


def _broadcast_with(nonce: str) -> Callable[[dict[str, Any]], bool]:
    def match(frame: dict[str, Any]) -> bool:
        payload = frame.get("payload") or {}
        inner = payload.get("payload") if isinstance(payload, dict) else None
        return (
            frame.get("event") == "broadcast"
            and isinstance(inner, dict)
            and inner.get("nonce") == nonce
        )

    return match


async def _acked_broadcast(sock: PhoenixSocket, topic: str, t: DoctorTimeouts) -> tuple[str, bool]:
    nonce = uuid.uuid4().hex
    ref = await sock.send(
        "realtime:" + topic,
        "broadcast",
        {"type": "broadcast", "event": DOCTOR_EVENT, "payload": {"nonce": nonce}},
        sock.join_ref,
    )
    reply = await sock.reply(ref, t.ack_s)
    if reply is None:
        return "timeout", False
    if reply.get("status") != "ok":
        response = reply.get("response")
        return str(
            response.get("reason", response) if isinstance(response, dict) else response
        ), False
    echoed = await sock.expect(_broadcast_with(nonce), t.delivery_s) is not None
    return "ok", echoed


async def _rest_broadcast(
    settings: Settings, key: str, topic: str, sock: PhoenixSocket | None, t: DoctorTimeouts
) -> d.CheckResult:
    url = settings.realtime_url + "/api/broadcast"
    nonce = uuid.uuid4().hex
    body = {
        "messages": [
            {
                "topic": topic,
                "event": DOCTOR_EVENT,
                "payload": {"nonce": nonce},
                "private": settings.relay_private_channels,
            }
        ]
    }
    headers = {"apikey": key, "Authorization": f"Bearer {key}"}
    try:
        async with httpx.AsyncClient(timeout=t.rest_s) as client:
            response = await client.post(url, json=body, headers=headers)
    except httpx.HTTPError as exc:
        return d.judge_rest(url, status=None, body=f"{type(exc).__name__}: {exc}", delivered=None)
    delivered: bool | None = None
    if response.status_code == 202 and sock is not None:
        delivered = await sock.expect(_broadcast_with(nonce), t.delivery_s) is not None
    return d.judge_rest(url, status=response.status_code, body=response.text, delivered=delivered)


async def realtime_group(
    settings: Settings, topic: str, t: DoctorTimeouts, out: dict[str, d.CheckResult]
) -> None:
    """As the worker: connect, private join, acked broadcast, REST broadcast."""
    key = _secret(settings.supabase_service_role_key) or ""
    sock, upgrade = await PhoenixSocket.open(websocket_url(settings, key), t.realtime_connect_s)
    out[d.CHECK_REALTIME] = d.judge_realtime(settings.realtime_url, upgrade)
    try:
        joined_sock: PhoenixSocket | None = None
        if sock is None:
            out[d.CHECK_PRIVATE_JOIN] = d.not_run(d.CHECK_PRIVATE_JOIN, "no Realtime connection")
            out[d.CHECK_BROADCAST] = d.not_run(d.CHECK_BROADCAST, "no Realtime connection")
        else:
            # As the worker joins: private unless RELAY_PRIVATE_CHANNELS=false.
            private = settings.relay_private_channels
            join = await sock.join(topic, key, private=private, timeout_s=t.join_s)
            out[d.CHECK_PRIVATE_JOIN] = d.judge_private_join(topic, join, private=private)
            if join.ok:
                joined_sock = sock
                ack, echoed = await _acked_broadcast(sock, topic, t)
                out[d.CHECK_BROADCAST] = d.judge_broadcast(ack=ack, echoed=echoed, joined=True)
            else:
                out[d.CHECK_BROADCAST] = d.judge_broadcast(ack=None, echoed=False, joined=False)
        out[d.CHECK_REST] = await _rest_broadcast(settings, key, topic, joined_sock, t)
    finally:
        if sock is not None:
            await sock.close()


async def _join_as(
    settings: Settings, key: str, topic: str, *, private: bool, t: DoctorTimeouts
) -> d.Join | None:
    sock, upgrade = await PhoenixSocket.open(websocket_url(settings, key), t.realtime_connect_s)
    if sock is None:
        log.debug("anon upgrade refused: {} {}", upgrade.status, upgrade.message)
        return None
    try:
        return await sock.join(topic, key, private=private, timeout_s=t.join_s)
    finally:
        await sock.close()


async def anon_group(
    settings: Settings, topic: str, t: DoctorTimeouts, out: dict[str, d.CheckResult]
) -> None:
    """As a stranger with the anon key: the private topic must refuse us. The public
    join runs on its own socket at the same time (a refused join stalls its socket for
    the server's 5 s backoff, ref §2)."""
    key = _secret(settings.supabase_anon_key)
    if not settings.relay_private_channels:
        out[d.CHECK_PRIVATE_ONLY] = d.worker_channels_public()
        return
    if not key:
        out[d.CHECK_PRIVATE_ONLY] = d.judge_private_only(topic, None, None, anon_key=False)
        return
    private, public = await asyncio.gather(
        _join_as(settings, key, topic, private=True, t=t),
        _join_as(settings, key, topic, private=False, t=t),
    )
    out[d.CHECK_PRIVATE_ONLY] = d.judge_private_only(topic, private, public, anon_key=True)


# --- providers --------------------------------------------------------------------


def _probe_args(settings: Settings, provider: Provider, *, fallback: bool) -> argparse.Namespace:
    """`llm-relay probe`'s own flags, so the doctor runs exactly what the probe runs."""
    parser = argparse.ArgumentParser(add_help=False)
    probe.COMMAND.add_arguments(parser)
    argv = ["--provider", provider, "--retries", "0", "--max-tokens", "1", "--json"]
    argv += ["--prompt", PROBE_PROMPT]
    model = parse_model_map(settings.relay_fallback_models).get(provider) if fallback else None
    if model:
        argv += ["--model", model]
    return parser.parse_args(argv)


def bounded_deadlines(settings: Settings, t: DoctorTimeouts) -> Settings:
    """The settings with every upstream deadline capped for a quick check: the global
    ones and any per-provider one (`relay_<provider>_<phase>_timeout_s`), unset ones
    left unset (they fall back to the capped global)."""
    caps = {"connect": 5.0, "first_token": 8.0, "idle": 10.0, "total": t.provider_s}
    update: dict[str, float] = {}
    for name in type(settings).model_fields:
        for phase, cap in caps.items():
            if name.startswith("relay_") and name.endswith(f"_{phase}_timeout_s"):
                value = getattr(settings, name)
                if isinstance(value, int | float):
                    update[name] = min(float(value), cap)
    return settings.model_copy(update=update)


async def provider_check(
    settings: Settings, provider: Provider, *, fallback: bool, t: DoctorTimeouts
) -> d.CheckResult:
    bounded = bounded_deadlines(settings, t)
    args = _probe_args(settings, provider, fallback=fallback)
    try:
        report = await asyncio.wait_for(probe.run_probe(args, bounded), t.provider_s)
    except TimeoutError:
        return d.judge_provider(provider, None, f"no result within {t.provider_s:g} s")
    return d.judge_provider(provider, report.as_dict())


# --- health port ------------------------------------------------------------------


def _port_free(host: str, port: int) -> tuple[bool, str]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False, "address in use"
            return False, f"{type(exc).__name__}: {exc}"
    return True, ""


async def health_check(settings: Settings, t: DoctorTimeouts) -> d.CheckResult:
    host, port = settings.relay_http_host, settings.relay_http_port
    if port == 0:
        return d.judge_health(host, port, "disabled")
    target = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    shown = f"[{target}]" if ":" in target else target
    try:
        async with httpx.AsyncClient(timeout=t.health_s) as client:
            response = await client.get(f"http://{shown}:{port}/readyz")
    except httpx.HTTPError as exc:
        free, why = await asyncio.to_thread(_port_free, host, port)
        if free:
            return d.judge_health(host, port, "free")
        return d.judge_health(host, port, "busy", f"{why}; {type(exc).__name__}")
    if response.status_code == 200 and response.text.strip() == "ready":
        return d.judge_health(host, port, "ready")
    if response.status_code == 503 and response.text.strip() == "not ready":
        return d.judge_health(host, port, "not_ready", "503")
    return d.judge_health(host, port, "other_http", f"HTTP {response.status_code}")


# --- the run ----------------------------------------------------------------------


def check_names(providers: Sequence[str]) -> list[str]:
    return [
        d.CHECK_SETTINGS,
        d.CHECK_DATABASE,
        d.CHECK_DATABASE_MODE,
        d.CHECK_MIGRATIONS,
        d.CHECK_REALTIME,
        d.CHECK_PRIVATE_JOIN,
        d.CHECK_PRIVATE_ONLY,
        d.CHECK_BROADCAST,
        d.CHECK_REST,
        *(d.CHECK_PROVIDER_PREFIX + p for p in providers),
        d.CHECK_HEALTH,
    ]


async def _guarded(
    names: Sequence[str], work: Awaitable[None], out: dict[str, d.CheckResult]
) -> None:
    """Run one group; whatever it did not report, an unexpected error explains."""
    try:
        await work
    except Exception as exc:
        log.opt(exception=exc).debug("doctor check group failed")
        for name in names:
            out.setdefault(name, d.crashed(name, exc))


async def _into(name: str, work: Awaitable[d.CheckResult], out: dict[str, d.CheckResult]) -> None:
    out[name] = await work


async def diagnose(settings: Settings, t: DoctorTimeouts | None = None) -> d.Report:
    t = t or DoctorTimeouts()
    out: dict[str, d.CheckResult] = {}
    out[d.CHECK_SETTINGS], providers = check_settings(settings)
    topic = DOCTOR_TOPIC_PREFIX + uuid.uuid4().hex
    groups: list[tuple[list[str], Awaitable[None]]] = [
        (
            [d.CHECK_DATABASE, d.CHECK_DATABASE_MODE, d.CHECK_MIGRATIONS],
            database_group(settings, t, out),
        ),
        (
            [d.CHECK_REALTIME, d.CHECK_PRIVATE_JOIN, d.CHECK_BROADCAST, d.CHECK_REST],
            realtime_group(settings, topic, t, out),
        ),
        ([d.CHECK_PRIVATE_ONLY], anon_group(settings, topic, t, out)),
        ([d.CHECK_HEALTH], _into(d.CHECK_HEALTH, health_check(settings, t), out)),
    ]
    for i, provider in enumerate(providers):
        name = d.CHECK_PROVIDER_PREFIX + provider
        work = provider_check(settings, provider, fallback=i > 0, t=t)
        groups.append(([name], _into(name, work, out)))
    tasks = [asyncio.create_task(_guarded(names, work, out)) for names, work in groups]
    _, pending = await asyncio.wait(tasks, timeout=t.total_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    names = check_names(providers)
    for name in names:
        out.setdefault(name, d.timed_out(name, t.total_s))
    return d.order(out, names).redacted(secrets_of(settings))


def emit(report: d.Report, *, as_json: bool) -> int:
    sys.stdout.write((d.render_json(report) if as_json else d.render_text(report)) + "\n")
    sys.stdout.flush()
    return report.exit_code


def report_invalid_settings(args: argparse.Namespace, error: Exception) -> int:
    """Settings that do not load: the first check fails and nothing else can run."""
    message = " ".join(str(error).split())
    names = check_names([])
    out = {
        d.CHECK_SETTINGS: d.judge_settings(
            error=message,
            service_role_key=False,
            database_url=False,
            provider_keys={},
            key_roles={},
        )
    }
    for name in names[1:]:
        out[name] = d.not_run(name, "settings did not load")
    return emit(d.order(out, names), as_json=bool(getattr(args, "json", False)))


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    report = await diagnose(settings)
    return emit(report, as_json=args.json)


COMMAND = Command(
    "doctor",
    "Check settings, database, Realtime, providers and the health port end to end",
    _add_arguments,
    _run,
    on_invalid_settings=report_invalid_settings,
)
