"""The pure core of `llm-relay doctor`: check results, what a failure means, the report.

No I/O here. The shells in `worker.service.doctor` observe the world (sockets,
catalog rows, HTTP statuses) and hand plain facts to these functions, which decide
pass or fail, name the likely cause and the fix, and render the report.

    facts ──▶ judge_*() ──▶ CheckResult ──▶ Report ──▶ render_text() / render_json()
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson

# The names of the checks, in the order they run and are reported (a stable interface:
# scripts read them from `--json`).
CHECK_SETTINGS = "settings"
CHECK_DATABASE = "database"
CHECK_DATABASE_MODE = "database_mode"
CHECK_MIGRATIONS = "migrations"
CHECK_REALTIME = "realtime_connect"
CHECK_PRIVATE_JOIN = "realtime_private_join"
CHECK_PRIVATE_ONLY = "realtime_private_only"
CHECK_BROADCAST = "realtime_broadcast"
CHECK_REST = "realtime_rest"
CHECK_PROVIDER_PREFIX = "provider:"
CHECK_HEALTH = "health_port"

REDACTED = "***"


@dataclass(frozen=True)
class CheckResult:
    """One line of the report. `cause` and `fix` are for humans, shown only on failure."""

    name: str
    ok: bool
    detail: str
    cause: str = ""
    fix: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


def passed(name: str, detail: str) -> CheckResult:
    return CheckResult(name, True, detail)


def failed(name: str, detail: str, *, cause: str, fix: str) -> CheckResult:
    return CheckResult(name, False, detail, cause=cause, fix=fix)


@dataclass
class Report:
    checks: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def redacted(self, secrets: Iterable[str]) -> Report:
        """The same report with every secret value blanked out, wherever it appears,
        and each text on one line (libpq's messages span several)."""
        values = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

        def scrub(text: str) -> str:
            for value in values:
                text = text.replace(value, REDACTED)
            return " ".join(text.split())

        return Report(
            [
                CheckResult(c.name, c.ok, scrub(c.detail), scrub(c.cause), scrub(c.fix))
                for c in self.checks
            ]
        )


def render_json(report: Report) -> str:
    return orjson.dumps({"ok": report.ok, "checks": [c.as_dict() for c in report.checks]}).decode()


def render_text(report: Report) -> str:
    lines: list[str] = []
    for check in report.checks:
        lines.append(f"{'✓' if check.ok else '✗'} {check.name}: {check.detail}")
        if not check.ok:
            if check.cause:
                lines.append(f"    likely cause: {check.cause}")
            if check.fix:
                lines.append(f"    fix: {check.fix}")
    failures = sum(not c.ok for c in report.checks)
    lines.append(
        "all checks passed"
        if failures == 0
        else f"{failures} of {len(report.checks)} checks failed"
    )
    return "\n".join(lines)


# --- settings ---------------------------------------------------------------------


def judge_settings(
    *,
    error: str | None,
    service_role_key: bool,
    database_url: bool,
    provider_keys: Mapping[str, bool],
    key_roles: Mapping[str, str | None],
) -> CheckResult:
    """Did the settings load, and is what the worker needs to run set?

    `provider_keys` maps each configured provider (first, then fallbacks) to whether
    it is configured (its API key, or its base URL for a keyless server); `key_roles`
    maps a Supabase key's variable to the `role` claim it carries (None: not a JWT, as
    with the newer `sb_...` keys).
    """
    if error is not None:
        return failed(
            CHECK_SETTINGS,
            f"invalid settings: {error}",
            cause="a variable in the environment or .env has a value the worker cannot use",
            fix="correct the variable named above (`.env.example` lists every setting)",
        )
    missing = [
        name
        for name, present in (
            ("SUPABASE_SERVICE_ROLE_KEY", service_role_key),
            ("DATABASE_URL", database_url),
        )
        if not present
    ]
    missing += [
        f"{p.upper()}_API_KEY (or {p.upper()}_BASE_URL for a server that takes no key)"
        for p, present in provider_keys.items()
        if not present
    ]
    if missing:
        return failed(
            CHECK_SETTINGS,
            "not set: " + ", ".join(missing),
            cause="`llm-relay run` needs these to reach the database, Realtime and the provider",
            fix="set them in the environment or .env (Supabase dashboard → Project Settings → "
            "API keys / Database; your provider's console for API keys)",
        )
    wrong_roles = [
        f"{name} has role {role!r}"
        for name, role, want in (
            (
                "SUPABASE_SERVICE_ROLE_KEY",
                key_roles.get("SUPABASE_SERVICE_ROLE_KEY"),
                "service_role",
            ),
            ("SUPABASE_ANON_KEY", key_roles.get("SUPABASE_ANON_KEY"), "anon"),
        )
        if role is not None and role != want
    ]
    if wrong_roles:
        return failed(
            CHECK_SETTINGS,
            "; ".join(wrong_roles),
            cause="the anon and service-role keys are swapped or copied from the wrong field",
            fix="copy the `service_role` key into SUPABASE_SERVICE_ROLE_KEY and the `anon` key "
            "into SUPABASE_ANON_KEY",
        )
    providers = ", ".join(provider_keys) or "none"
    return passed(CHECK_SETTINGS, f"loaded; providers: {providers}")


# --- database ---------------------------------------------------------------------

PoolerKind = Literal["direct", "supavisor_session", "supavisor_transaction", "unknown"]


@dataclass(frozen=True)
class DatabaseTarget:
    """Where DATABASE_URL points, without its password."""

    host: str
    port: int
    database: str
    kind: PoolerKind

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}/{self.database}"


def classify_database_url(url: str) -> DatabaseTarget:
    """Name the connection mode from the URL alone (the LISTEN round trip confirms it).

    Supabase (docs "Connect to your database"): direct `db.<ref>.supabase.co:5432`;
    Supavisor `*.pooler.supabase.com` in session mode on 5432 and in transaction mode
    on 6543. Port 6543 is the transaction pooler's elsewhere too (self-hosted Supavisor).
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if not host:
        # libpq's `host=/path` query form (Unix sockets, as in the devstack).
        query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
        host = query.get("host", "localhost")
    try:
        port = parts.port or 5432
    except ValueError:
        port = 5432
    database = parts.path.lstrip("/") or "postgres"
    kind: PoolerKind
    if port == 6543:
        kind = "supavisor_transaction"
    elif host.endswith(".pooler.supabase.com"):
        kind = "supavisor_session"
    elif (
        host.endswith(".supabase.co") or host.startswith("/") or host in ("localhost", "127.0.0.1")
    ):
        kind = "direct"
    else:
        kind = "unknown"
    return DatabaseTarget(host=host, port=port, database=database, kind=kind)


def judge_database(target: DatabaseTarget, *, error: str | None, version: str) -> CheckResult:
    if error is None:
        return passed(CHECK_DATABASE, f"connected to {target.where} ({version})")
    lowered = error.lower()
    if "password authentication failed" in lowered or "authentication" in lowered:
        cause, fix = (
            "wrong user or password in DATABASE_URL",
            "copy the connection string again from Supabase (Project Settings → Database) "
            "and put the database password in it",
        )
    elif "network is unreachable" in lowered or "no route" in lowered:
        cause, fix = (
            "Supabase's direct host (db.<ref>.supabase.co) is IPv6-only and this machine "
            "has no IPv6 route",
            "use the session pooler string (…pooler.supabase.com:5432), or enable the IPv4 add-on",
        )
    elif "does not exist" in lowered:
        cause, fix = ("the database named in DATABASE_URL does not exist", "fix its path")
    elif "timeout" in lowered or "timed out" in lowered:
        cause, fix = (
            "the host does not answer (firewall, paused project, wrong host)",
            "check the host and port; a paused Supabase project must be restored first",
        )
    else:
        cause, fix = (
            "nothing accepts connections at that host and port",
            "check DATABASE_URL's host and port, and that the database is running",
        )
    return failed(CHECK_DATABASE, f"{target.where}: {error}", cause=cause, fix=fix)


def judge_database_mode(
    target: DatabaseTarget, *, error: str | None, notified: bool | None
) -> CheckResult:
    """Direct or session mode: LISTEN must receive a NOTIFY from another connection.

    `notified` is None when the round trip could not run (no connection).
    """
    transaction_fix = (
        "use the direct connection string (db.<ref>.supabase.co:5432) or Supavisor's "
        "session mode (…pooler.supabase.com:5432), never port 6543"
    )
    if target.kind == "supavisor_transaction":
        return failed(
            CHECK_DATABASE_MODE,
            f"{target.where} is the transaction pooler (Supavisor transaction mode, port 6543)",
            cause="a transaction pooler hands each transaction to any server connection: "
            "LISTEN does not stay, so the worker misses NOTIFY wake-ups",
            fix=transaction_fix,
        )
    if notified is None:
        return failed(
            CHECK_DATABASE_MODE,
            f"not checked: {error or 'no database connection'}",
            cause="the database is unreachable (see the `database` check)",
            fix="fix the `database` check first",
        )
    if not notified:
        return failed(
            CHECK_DATABASE_MODE,
            f"LISTEN on {target.where} did not receive a NOTIFY from another connection"
            + (f" ({error})" if error else ""),
            cause="a transaction-mode pooler (pgbouncer `pool_mode = transaction`, Supavisor "
            "port 6543) sits between the worker and Postgres",
            fix=transaction_fix + "; with pgbouncer, use `pool_mode = session`",
        )
    mode = {"supavisor_session": "Supavisor session mode"}.get(target.kind, "direct")
    return passed(CHECK_DATABASE_MODE, f"{mode}; LISTEN/NOTIFY round trip works")


@dataclass(frozen=True)
class SchemaObject:
    kind: Literal["table", "rls", "policy", "trigger", "function"]
    schema: str
    name: str
    on: str = ""  # the table of a policy or trigger

    @property
    def label(self) -> str:
        where = f" on {self.on}" if self.on else ""
        return f"{self.kind} {self.schema}.{self.name}{where}"


# What supabase/migrations create that the worker or its frontends rely on. A unit test
# reads the migrations and fails when this list drifts from them.
EXPECTED_SCHEMA: tuple[SchemaObject, ...] = (
    SchemaObject("table", "public", "llm_sessions"),
    SchemaObject("table", "public", "llm_requests"),
    SchemaObject("rls", "public", "llm_sessions"),
    SchemaObject("rls", "public", "llm_requests"),
    SchemaObject("policy", "public", "llm_sessions_select_own", "llm_sessions"),
    SchemaObject("policy", "public", "llm_sessions_insert_own", "llm_sessions"),
    SchemaObject("policy", "public", "llm_requests_select_own", "llm_requests"),
    SchemaObject("policy", "public", "llm_requests_insert_own", "llm_requests"),
    SchemaObject("policy", "realtime", "llm_token_topic_owner_receives", "messages"),
    SchemaObject("trigger", "public", "llm_requests_attach_session", "llm_requests"),
    SchemaObject("trigger", "public", "llm_requests_notify_insert", "llm_requests"),
    SchemaObject("trigger", "public", "llm_requests_notify_update", "llm_requests"),
    SchemaObject("function", "public", "llm_requests_attach_session"),
    SchemaObject("function", "public", "llm_requests_notify"),
    SchemaObject("function", "public", "cancel_llm_request"),
    # The write-ahead token log: the worker writes each batch here before sending it.
    SchemaObject("table", "public", "llm_request_chunks"),
    SchemaObject("rls", "public", "llm_request_chunks"),
    SchemaObject("policy", "public", "llm_request_chunks_select_own", "llm_request_chunks"),
)


def judge_migrations(
    found: Iterable[SchemaObject], *, error: str | None, realtime_schema: bool | None
) -> CheckResult:
    if error is not None:
        return failed(
            CHECK_MIGRATIONS,
            f"not checked: {error}",
            cause="the database is unreachable (see the `database` check)",
            fix="fix the `database` check first",
        )
    present = set(found)
    missing = [obj for obj in EXPECTED_SCHEMA if obj not in present]
    if not missing:
        return passed(CHECK_MIGRATIONS, f"{len(EXPECTED_SCHEMA)} objects present")
    shown = ", ".join(obj.label for obj in missing[:6])
    more = f" and {len(missing) - 6} more" if len(missing) > 6 else ""
    cause = "supabase/migrations were not applied to this database"
    if realtime_schema is False:
        cause += " (it has no `realtime` schema either: is it a Supabase database?)"
    return failed(
        CHECK_MIGRATIONS,
        f"missing: {shown}{more}",
        cause=cause,
        fix="`supabase link --project-ref <ref>` then `supabase db push` (or run "
        "supabase/migrations/*.sql in order against DATABASE_URL)",
    )


# --- Realtime ---------------------------------------------------------------------


@dataclass(frozen=True)
class Upgrade:
    """The WebSocket upgrade: ok, or the HTTP status and `{"error"}` text (ref §1)."""

    ok: bool
    status: int | None = None
    message: str = ""


def judge_realtime(url: str, upgrade: Upgrade) -> CheckResult:
    if upgrade.ok:
        return passed(CHECK_REALTIME, f"{url}: WebSocket upgraded with the service-role key")
    said = f"HTTP {upgrade.status}: {upgrade.message}" if upgrade.status else upgrade.message
    if upgrade.status == 401:
        cause = {
            "API key is missing": "SUPABASE_SERVICE_ROLE_KEY is empty",
            "Token has expired": "the key has expired",
            "Failed to validate JWT signature": "the key belongs to another project (or "
            "another JWT secret)",
            "The token provided is not a valid JWT": "the value is not a JWT (truncated, "
            "quoted, or an `sb_secret_…` key sent past the gateway)",
        }.get(upgrade.message, "Realtime refused the key")
        fix = "copy the service_role key of *this* project into SUPABASE_SERVICE_ROLE_KEY"
    elif upgrade.status == 403:
        cause, fix = "Realtime is disabled for the project", "enable Realtime in the dashboard"
    elif upgrade.status == 404:
        cause, fix = (
            "no Realtime at this URL (wrong SUPABASE_URL, or the project ref is unknown)",
            "set SUPABASE_URL to https://<ref>.supabase.co",
        )
    elif upgrade.status == 429:
        cause, fix = (
            "the project's concurrent-user or joins-per-second quota is full",
            "wait, or raise the plan's Realtime quotas",
        )
    else:
        cause, fix = (
            "Realtime cannot be reached (wrong SUPABASE_URL, network, proxy without WebSocket)",
            "check SUPABASE_URL and that wss:// to it is allowed from this host",
        )
    return failed(CHECK_REALTIME, f"{url}: {said}", cause=cause, fix=fix)


def not_run(name: str, because: str) -> CheckResult:
    return failed(
        name,
        f"not checked: {because}",
        cause=f"an earlier check failed ({because})",
        fix="fix the earlier failure first",
    )


@dataclass(frozen=True)
class Join:
    """A join's reply: ok, or the server's reason string (ref §2), or a local timeout."""

    ok: bool
    reason: str = ""


def _join_hint(reason: str) -> tuple[str, str]:
    code = reason.split(":", 1)[0]
    hints = {
        "Unauthorized": (
            "no policy on realtime.messages lets this role read the topic",
            "apply supabase/migrations (the worker's service_role bypasses RLS; anything "
            "else needs a SELECT policy)",
        ),
        "PrivateOnly": (
            "the project allows private channels only and this join was public",
            "keep RELAY_PRIVATE_CHANNELS=true",
        ),
        "ChannelRateLimitReached": (
            "this socket already has the maximum channels (100)",
            "fewer topics per connection",
        ),
        "ClientJoinRateLimitReached": (
            "the project's joins per second are used up",
            "wait; spread joins out",
        ),
        "ConnectionRateLimitReached": (
            "the project's concurrent users are used up",
            "wait, or raise the plan's quota",
        ),
        "InvalidJWTToken": ("the key's JWT is expired or lacks role/exp", "use a fresh key"),
        "JwtSignatureError": ("the key belongs to another project", "copy this project's key"),
        "MalformedJWT": ("the key is not a JWT", "copy the key again, unquoted"),
    }
    if code in hints:
        return hints[code]
    if code in (
        "IncreaseConnectionPool",
        "DatabaseLackOfConnections",
        "UnableToConnectToProject",
        "InitializingProjectConnection",
        "DatabaseConnectionRateLimitReached",
    ):
        return (
            "Realtime could not reach the project's database to authorize the join",
            "retry in a minute; check the database's connection limits",
        )
    return ("Realtime refused the join", "see the reason above")


def judge_private_join(topic: str, join: Join, *, private: bool = True) -> CheckResult:
    kind = "private" if private else "public"
    if join.ok:
        return passed(CHECK_PRIVATE_JOIN, f"service-role key joined {kind} topic {topic}")
    if join.reason.startswith("timeout"):
        return failed(
            CHECK_PRIVATE_JOIN,
            f"{topic}: no join reply ({join.reason})",
            cause="the socket is stalled or the server is overloaded",
            fix="retry; if it persists, check Realtime's status page",
        )
    cause, fix = _join_hint(join.reason)
    if join.reason.startswith("Unauthorized"):
        cause = "the key is not the service_role key (only service_role bypasses RLS)"
        fix = "set SUPABASE_SERVICE_ROLE_KEY to the project's service_role key"
    elif join.reason.startswith("PrivateOnly"):
        cause = "RELAY_PRIVATE_CHANNELS=false, and the project allows private channels only"
        fix = "set RELAY_PRIVATE_CHANNELS=true (the default)"
    return failed(CHECK_PRIVATE_JOIN, f"{topic}: {join.reason}", cause=cause, fix=fix)


def worker_channels_public() -> CheckResult:
    return failed(
        CHECK_PRIVATE_ONLY,
        "RELAY_PRIVATE_CHANNELS=false: the worker publishes on public topics",
        cause="public topics skip RLS: anyone with the anon key who knows or guesses a "
        "session id reads its tokens",
        fix="set RELAY_PRIVATE_CHANNELS=true (the default) and apply supabase/migrations",
    )


def judge_private_only(
    topic: str, anon: Join | None, public: Join | None, *, anon_key: bool
) -> CheckResult:
    """A private join with the anon key must be refused with `Unauthorized`.

    `public` is the anon key's *public* join of the same name: informational only
    (a separate namespace, ref §3), reported so that "Allow public access" is visible.
    """
    if not anon_key:
        return failed(
            CHECK_PRIVATE_ONLY,
            "SUPABASE_ANON_KEY not set: cannot check that strangers are refused",
            cause="doctor joins as the anon key to prove private topics are closed to it",
            fix="set SUPABASE_ANON_KEY (the worker itself does not need it)",
        )
    if anon is None:
        return not_run(CHECK_PRIVATE_ONLY, "no Realtime connection for the anon key")
    public_note = ""
    if public is not None and public.ok:
        public_note = (
            "; public channels allowed (dashboard: Realtime settings → Allow public "
            "access; frontends must join with private: true)"
        )
    elif public is not None and public.reason.startswith("PrivateOnly"):
        public_note = "; public channels refused (private only)"
    if anon.ok:
        return failed(
            CHECK_PRIVATE_ONLY,
            f"the anon key joined private topic {topic}{public_note}",
            cause="a policy on realtime.messages lets anon (or PUBLIC: a policy without "
            "`TO authenticated`) read every topic, so anyone with the anon key can read "
            "every session's tokens",
            fix="drop that policy (`select policyname, roles from pg_policies where "
            "schemaname = 'realtime'`); keep only llm_token_topic_owner_receives",
        )
    if anon.reason.startswith("Unauthorized"):
        return passed(CHECK_PRIVATE_ONLY, f"anon key refused ({anon.reason}){public_note}")
    cause, fix = _join_hint(anon.reason)
    return failed(
        CHECK_PRIVATE_ONLY,
        f"the anon key's join failed for another reason: {anon.reason}",
        cause=cause,
        fix=fix,
    )


def judge_broadcast(
    *, ack: str | None, echoed: bool, joined: bool, because: str = ""
) -> CheckResult:
    """`ack`: "ok", the error reply, or "timeout"; `echoed`: our message came back."""
    if not joined:
        return not_run(CHECK_BROADCAST, because or "the private join failed")
    if ack == "ok" and echoed:
        return passed(CHECK_BROADCAST, "acked broadcast sent and received back")
    if ack == "ok":
        return failed(
            CHECK_BROADCAST,
            "acked but never delivered back to the sender's channel (self: true)",
            cause="the server accepted the message and dropped it (overload or a rate-limit "
            "shutdown of the channel)",
            fix="retry; watch for 'Too many messages per second' (RELAY_MESSAGES_PER_SECOND)",
        )
    if ack == "timeout":
        return failed(
            CHECK_BROADCAST,
            "no ack within the timeout",
            cause="a private channel without INSERT permission drops sends with no reply "
            "(the key is not service_role), or the socket stalled",
            fix="use the service_role key; raise RELAY_ACK_TIMEOUT_S on slow links",
        )
    return failed(
        CHECK_BROADCAST,
        f"error ack: {ack}",
        cause="payload_size_exceeded: the message is over the plan's payload limit"
        if ack == "payload_size_exceeded"
        else "Realtime refused the message",
        fix="lower RELAY_MAX_MESSAGE_BYTES" if ack == "payload_size_exceeded" else "see above",
    )


def judge_rest(url: str, *, status: int | None, body: str, delivered: bool | None) -> CheckResult:
    """The batch REST endpoint (ref §4 A): 202; private messages without write
    permission are dropped silently, so delivery is checked when a socket is joined."""
    if status == 202 and delivered is not False:
        seen = " and delivered" if delivered else " (delivery not checked: no joined channel)"
        return passed(CHECK_REST, f"{url}: 202 accepted{seen}")
    if status == 202:
        return failed(
            CHECK_REST,
            f"{url}: 202 but the message never arrived on the joined channel",
            cause="private REST messages without INSERT permission are dropped silently "
            "(the key is not service_role)",
            fix="set SUPABASE_SERVICE_ROLE_KEY to the service_role key",
        )
    if status is None:
        return failed(
            CHECK_REST,
            f"{url}: {body}",
            cause="the REST endpoint cannot be reached",
            fix="check SUPABASE_URL",
        )
    if status == 401:
        cause, fix = (
            "Realtime refused the key",
            "set SUPABASE_SERVICE_ROLE_KEY to this project's service_role key",
        )
    elif status == 429:
        cause, fix = (
            "the project's messages per second are used up",
            "lower RELAY_MESSAGES_PER_SECOND / RELAY_BUDGET_UTILIZATION or raise the plan",
        )
    elif status == 404:
        cause, fix = "no REST broadcast at this URL", "check SUPABASE_URL"
    else:
        cause, fix = "Realtime refused the request", "see the body above"
    return failed(CHECK_REST, f"{url}: HTTP {status} {body[:200]}", cause=cause, fix=fix)


# --- provider and health ----------------------------------------------------------


def judge_provider(provider: str, probe: Mapping[str, Any] | None, error: str = "") -> CheckResult:
    """`probe` is `llm-relay probe --json`'s object (design.md "Diagnostics")."""
    name = CHECK_PROVIDER_PREFIX + provider
    if probe is None:
        return failed(
            name,
            error or "no answer",
            cause="the provider did not answer in time",
            fix=f"`llm-relay probe --provider {provider} --json` shows where it stops",
        )
    where = f"{probe.get('model')} http={probe.get('http_status')}"
    if probe.get("outcome") == "ok":
        timings = probe.get("timings") or {}
        return passed(name, f"{where}: streamed, first token in {timings.get('first_token_s')} s")
    err = probe.get("error") or {}
    kind = str(err.get("type") or probe.get("outcome"))
    message = str(err.get("message") or "")
    hints: dict[str, tuple[str, str]] = {
        "connection_lost": (
            "the provider's host cannot be reached or closed the connection",
            f"check {provider.upper()}_BASE_URL and the network (proxy, DNS, firewall)",
        ),
        "timeout": (
            "the provider accepted the request but was too slow",
            "raise RELAY_CONNECT_TIMEOUT_S / RELAY_FIRST_TOKEN_TIMEOUT_S for slow models",
        ),
        "auth": (
            "the API key is wrong, revoked, or for another provider",
            f"set {provider.upper()}_API_KEY",
        ),
        "rate_limit": (
            "the provider is rate limiting this key (or the quota is used up)",
            "wait (Retry-After), lower RELAY_CONCURRENCY, or add RELAY_FALLBACK_PROVIDERS",
        ),
        "bad_request": (
            "the provider refused the request (unknown model?)",
            "set RELAY_MODEL (or RELAY_FALLBACK_MODELS) to a model this key may use",
        ),
        "server_error": ("the provider is failing", "retry later; add a fallback provider"),
        "malformed": (
            "the answer is not an OpenAI-compatible SSE stream",
            f"check that {provider.upper()}_BASE_URL ends with the API's /v1 path",
        ),
    }
    cause, fix = hints.get(kind, ("the stream did not finish", "run the probe for details"))
    return failed(name, f"{where}: {kind}: {message}"[:400], cause=cause, fix=fix)


HealthState = Literal["free", "ready", "not_ready", "other_http", "busy", "disabled"]


def judge_health(host: str, port: int, state: HealthState, detail: str = "") -> CheckResult:
    where = f"{host}:{port}"
    if state == "disabled":
        return passed(CHECK_HEALTH, "RELAY_HTTP_PORT=0: health server disabled")
    if state == "free":
        return passed(CHECK_HEALTH, f"{where} is free for the worker's /healthz, /readyz")
    if state == "ready":
        return passed(CHECK_HEALTH, f"a worker answers on {where}: /readyz 200")
    if state == "not_ready":
        return failed(
            CHECK_HEALTH,
            f"a worker answers on {where} but /readyz says not ready ({detail})",
            cause="that worker has not connected to Postgres or Realtime yet, or is draining",
            fix="read its logs (`event` keys) for the failing side",
        )
    if state == "other_http":
        return failed(
            CHECK_HEALTH,
            f"{where} answers HTTP but not as a worker ({detail})",
            cause="another program uses the port",
            fix="set RELAY_HTTP_PORT to a free port",
        )
    return failed(
        CHECK_HEALTH,
        f"{where} is in use and does not answer HTTP ({detail})",
        cause="another program holds the port; `llm-relay run` would fail to start",
        fix="set RELAY_HTTP_PORT to a free port (0 disables the health server)",
    )


def timed_out(name: str, seconds: float) -> CheckResult:
    return failed(
        name,
        f"no result within {seconds:g} s",
        cause="the service does not answer (network, firewall, overloaded server)",
        fix="check the host and port of this service",
    )


def crashed(name: str, exc: BaseException) -> CheckResult:
    return failed(
        name,
        f"{type(exc).__name__}: {exc}",
        cause="an unexpected error while checking",
        fix="run with --log-level DEBUG and report it",
    )


def order(results: Mapping[str, CheckResult], names: Sequence[str]) -> Report:
    """The report in the fixed order; a check missing from `results` never ran."""
    return Report(
        [results.get(n) or failed(n, "did not run", cause="internal", fix="") for n in names]
    )
