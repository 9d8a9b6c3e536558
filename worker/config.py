"""The one settings object: the only reader of the environment and of `.env`.

Ecosystem names are used where they exist (`SUPABASE_URL`, `OPENAI_API_KEY`,
`DATABASE_URL`, ...); everything of ours starts with `RELAY_`. Components never
read the environment: they receive this object, or the frozen view they need.

Every field has a unit in its name (`_s`, `_ms`) and a one-line description,
which `.env.example` and the README's configuration table are generated from
(`python -m worker.config --env-example` / `--readme`; a test fails on drift).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Provider = Literal["openai", "groq"]

OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
GROQ_DEFAULT_BASE_URL = "https://api.groq.com/openai/v1"
DEFAULT_MODELS: dict[str, str] = {"openai": "gpt-4o-mini", "groq": "llama-3.1-8b-instant"}


_DEADLINES = ("connect", "first_token", "idle", "total")
# Shorter "keys" (test placeholders such as "x") would redact ordinary words.
MIN_REDACTED_SECRET_CHARS = 8


@dataclass(frozen=True, slots=True)
class UpstreamDeadlines:
    """One provider's read-path deadlines, in seconds, and the setting each came from
    (error messages name the setting that fired)."""

    connect_s: float
    first_token_s: float
    idle_s: float
    total_s: float
    names: dict[str, str] = dataclass_field(default_factory=dict)


def _env(name: str) -> Any:
    """Bind a field to exactly one environment name (no prefix magic)."""
    return AliasChoices(name)


class Settings(BaseSettings):
    """All configuration of the worker, from the environment and `.env`."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        # `NAME=` (as a copy of .env.example has it) means "not set", not an empty value:
        # otherwise every optional number would refuse an empty string.
        env_ignore_empty=True,
        populate_by_name=True,
        frozen=True,
    )

    # --- Supabase (names as in the Supabase CLI's `supabase status -o env`) ---
    supabase_url: str = Field(
        "http://127.0.0.1:54321",
        validation_alias=_env("SUPABASE_URL"),
        description="Project URL; Realtime is reached at <url>/realtime/v1.",
    )
    supabase_anon_key: SecretStr | None = Field(
        None,
        validation_alias=_env("SUPABASE_ANON_KEY"),
        description="Public anon key (JWT), used by frontends and `watch`.",
    )
    supabase_service_role_key: SecretStr | None = Field(
        None,
        validation_alias=_env("SUPABASE_SERVICE_ROLE_KEY"),
        description="Service-role key (JWT) the worker publishes with.",
    )
    database_url: str | None = Field(
        None,
        validation_alias=_env("DATABASE_URL"),
        description="Postgres URL of the request queue (Supabase: the direct connection string).",
    )

    # --- Providers ---
    openai_api_key: SecretStr | None = Field(
        None,
        validation_alias=_env("OPENAI_API_KEY"),
        description="OpenAI API key (unset for a local server that takes none).",
    )
    openai_base_url: str = Field(
        OPENAI_DEFAULT_BASE_URL,
        validation_alias=_env("OPENAI_BASE_URL"),
        description="OpenAI-compatible base URL: OpenAI, or a local server such as Ollama, "
        "vLLM, llama.cpp or KoboldCpp (setting it alone configures the provider).",
    )
    groq_api_key: SecretStr | None = Field(
        None, validation_alias=_env("GROQ_API_KEY"), description="Groq API key."
    )
    groq_base_url: str = Field(
        GROQ_DEFAULT_BASE_URL,
        validation_alias=_env("GROQ_BASE_URL"),
        description="Groq base URL.",
    )
    relay_provider: Provider = Field(
        "openai",
        validation_alias=_env("RELAY_PROVIDER"),
        description="Provider used when a request names none.",
    )
    relay_model: str | None = Field(
        None,
        validation_alias=_env("RELAY_MODEL"),
        description="Model used when a request names none (empty: the provider's default).",
    )
    relay_fallback_providers: str = Field(
        "",
        validation_alias=_env("RELAY_FALLBACK_PROVIDERS"),
        description="Comma-separated providers tried in order when the first fails before "
        "any token (e.g. `openai`).",
    )

    # --- Upstream deadlines and retries ---
    relay_upstream_reader: Literal["protocol", "httpx"] = Field(
        "protocol",
        validation_alias=_env("RELAY_UPSTREAM_READER"),
        description="How streamed responses are read: `protocol` (an asyncio Protocol that "
        "decodes each read in its callback; plain HTTP/1.1, TCP or TLS) or `httpx`. Through an "
        "HTTP(S) proxy from the environment httpx is always used.",
    )
    relay_connect_timeout_s: float = Field(
        10.0,
        validation_alias=_env("RELAY_CONNECT_TIMEOUT_S"),
        description="TCP/TLS connect deadline per upstream request.",
    )
    relay_first_token_timeout_s: float = Field(
        60.0,
        validation_alias=_env("RELAY_FIRST_TOKEN_TIMEOUT_S"),
        description="Deadline from request to the first token (reasoning models think first).",
    )
    relay_idle_timeout_s: float = Field(
        30.0,
        validation_alias=_env("RELAY_IDLE_TIMEOUT_S"),
        description="Longest gap between two upstream chunks once streaming.",
    )
    relay_total_timeout_s: float = Field(
        600.0,
        validation_alias=_env("RELAY_TOTAL_TIMEOUT_S"),
        description="Overall deadline for one upstream generation.",
    )
    relay_openai_connect_timeout_s: float | None = Field(
        None,
        gt=0,
        validation_alias=_env("RELAY_OPENAI_CONNECT_TIMEOUT_S"),
        description="OpenAI only: connect deadline (unset: RELAY_CONNECT_TIMEOUT_S).",
    )
    relay_openai_first_token_timeout_s: float | None = Field(
        None,
        gt=0,
        validation_alias=_env("RELAY_OPENAI_FIRST_TOKEN_TIMEOUT_S"),
        description="OpenAI only: first-token deadline (unset: RELAY_FIRST_TOKEN_TIMEOUT_S).",
    )
    relay_openai_idle_timeout_s: float | None = Field(
        None,
        gt=0,
        validation_alias=_env("RELAY_OPENAI_IDLE_TIMEOUT_S"),
        description="OpenAI only: idle deadline (unset: RELAY_IDLE_TIMEOUT_S).",
    )
    relay_openai_total_timeout_s: float | None = Field(
        None,
        gt=0,
        validation_alias=_env("RELAY_OPENAI_TOTAL_TIMEOUT_S"),
        description="OpenAI only: total deadline (unset: RELAY_TOTAL_TIMEOUT_S).",
    )
    relay_groq_connect_timeout_s: float | None = Field(
        None,
        gt=0,
        validation_alias=_env("RELAY_GROQ_CONNECT_TIMEOUT_S"),
        description="Groq only: connect deadline (unset: RELAY_CONNECT_TIMEOUT_S).",
    )
    relay_groq_first_token_timeout_s: float | None = Field(
        None,
        gt=0,
        validation_alias=_env("RELAY_GROQ_FIRST_TOKEN_TIMEOUT_S"),
        description="Groq only: first-token deadline (unset: RELAY_FIRST_TOKEN_TIMEOUT_S).",
    )
    relay_groq_idle_timeout_s: float | None = Field(
        None,
        gt=0,
        validation_alias=_env("RELAY_GROQ_IDLE_TIMEOUT_S"),
        description="Groq only: idle deadline (unset: RELAY_IDLE_TIMEOUT_S).",
    )
    relay_groq_total_timeout_s: float | None = Field(
        None,
        gt=0,
        validation_alias=_env("RELAY_GROQ_TOTAL_TIMEOUT_S"),
        description="Groq only: total deadline (unset: RELAY_TOTAL_TIMEOUT_S).",
    )
    relay_upstream_retries: int = Field(
        3,
        ge=0,
        validation_alias=_env("RELAY_UPSTREAM_RETRIES"),
        description="Retries of an upstream request that failed before its first token.",
    )
    relay_upstream_retry_base_s: float = Field(
        0.5,
        gt=0,
        validation_alias=_env("RELAY_UPSTREAM_RETRY_BASE_S"),
        description="First upstream retry delay; doubles each attempt, with jitter.",
    )
    relay_upstream_retry_cap_s: float = Field(
        20.0,
        gt=0,
        validation_alias=_env("RELAY_UPSTREAM_RETRY_CAP_S"),
        description="Longest upstream retry delay; a longer Retry-After moves on to the "
        "fallback provider instead of waiting.",
    )
    relay_breaker_failures: int = Field(
        5,
        ge=1,
        validation_alias=_env("RELAY_BREAKER_FAILURES"),
        description="Consecutive retryable failures that open a provider's circuit breaker.",
    )
    relay_breaker_reset_s: float = Field(
        30.0,
        gt=0,
        validation_alias=_env("RELAY_BREAKER_RESET_S"),
        description="How long an open circuit breaker skips its provider before one trial.",
    )
    relay_fallback_models: str = Field(
        "",
        validation_alias=_env("RELAY_FALLBACK_MODELS"),
        description="Model per fallback provider, `provider:model` comma-separated (e.g. "
        "`openai:gpt-4o-mini`); unset: the provider's default model.",
    )
    relay_midstream_recovery: Literal["stop", "restart", "continue"] = Field(
        "stop",
        validation_alias=_env("RELAY_MIDSTREAM_RECOVERY"),
        description="When the upstream fails after tokens were relayed: `stop` (honest "
        "incomplete end) or `continue` (ask the model to continue the partial text; never "
        "for tool calls). `restart` is refused by the relay (contract v1 cannot reset).",
    )
    relay_midstream_max_recoveries: int = Field(
        1,
        ge=0,
        validation_alias=_env("RELAY_MIDSTREAM_MAX_RECOVERIES"),
        description="Restarts or continuations of one generation after tokens were relayed.",
    )
    relay_continue_prompt: str = Field(
        "Continue exactly where your previous message stopped, mid-word if need be. "
        "Do not repeat any of it and do not comment on the interruption.",
        validation_alias=_env("RELAY_CONTINUE_PROMPT"),
        description="The user turn appended after the partial answer for `continue`.",
    )

    # --- Upstream bounds (a hostile or broken provider cannot exhaust the worker) ---
    relay_max_sse_line_bytes: int = Field(
        1_048_576,
        ge=1024,
        validation_alias=_env("RELAY_MAX_SSE_LINE_BYTES"),
        description="Most bytes of one pending upstream SSE line (a line that never ends is "
        "`malformed`).",
    )
    relay_max_sse_event_bytes: int = Field(
        1_048_576,
        ge=1024,
        validation_alias=_env("RELAY_MAX_SSE_EVENT_BYTES"),
        description="Most bytes of one pending upstream SSE event (data lines that never "
        "reach a blank line are `malformed`).",
    )
    relay_max_body_bytes: int = Field(
        67_108_864,
        ge=65_536,
        validation_alias=_env("RELAY_MAX_BODY_BYTES"),
        description="Most bytes of one upstream response body after decompression (a gzip "
        "bomb is `malformed`).",
    )
    relay_max_tokens_slack_tokens: int = Field(
        16,
        ge=0,
        validation_alias=_env("RELAY_MAX_TOKENS_SLACK_TOKENS"),
        description="Output deltas tolerated beyond a request's max_tokens (or "
        "RELAY_MAX_TOKENS_CAP) before the stream ends with finish_reason `length`.",
    )
    relay_max_error_chars: int = Field(
        500,
        ge=40,
        validation_alias=_env("RELAY_MAX_ERROR_CHARS"),
        description="Longest upstream error message stored on a row or sent in `llm-error`.",
    )

    # --- Relay: batching and publishing ---
    relay_batch_size: int = Field(
        20,
        ge=1,
        le=10_000,
        validation_alias=_env("RELAY_BATCH_SIZE"),
        description="Tokens per broadcast message (flush when reached).",
    )
    relay_max_batch_delay_ms: float = Field(
        100.0,
        gt=0,
        validation_alias=_env("RELAY_MAX_BATCH_DELAY_MS"),
        description="Longest a token waits in a partial batch before it is flushed.",
    )
    relay_max_flush_retries: int = Field(
        3,
        ge=0,
        validation_alias=_env("RELAY_MAX_FLUSH_RETRIES"),
        description="Retries of a failed or unacked batch before the token-by-token fallback.",
    )
    relay_retry_base_ms: float = Field(
        100.0,
        gt=0,
        validation_alias=_env("RELAY_RETRY_BASE_MS"),
        description="First retry delay; doubles each attempt, with jitter.",
    )
    relay_retry_cap_s: float = Field(
        15.0,
        gt=0,
        validation_alias=_env("RELAY_RETRY_CAP_S"),
        description="Longest retry delay.",
    )
    relay_ack_timeout_s: float = Field(
        5.0,
        gt=0,
        validation_alias=_env("RELAY_ACK_TIMEOUT_S"),
        description="How long a broadcast waits for the server's ack.",
    )
    relay_topic_template: str = Field(
        "llm-token:{session_id}",
        validation_alias=_env("RELAY_TOPIC_TEMPLATE"),
        description="Realtime topic of a session; `{session_id}` is replaced.",
    )
    relay_private_channels: bool = Field(
        True,
        validation_alias=_env("RELAY_PRIVATE_CHANNELS"),
        description="Use private channels (RLS on realtime.messages decides who may join).",
    )
    relay_messages_per_second: float = Field(
        100.0,
        gt=0,
        validation_alias=_env("RELAY_MESSAGES_PER_SECOND"),
        description="Realtime message budget (Free 100/s, Pro 500/s), deliveries counted.",
    )
    relay_expected_subscribers: int = Field(
        1,
        ge=0,
        validation_alias=_env("RELAY_EXPECTED_SUBSCRIBERS"),
        description="Subscribers per topic assumed when counting fan-out against the budget.",
    )
    relay_budget_utilization: float = Field(
        0.8,
        gt=0,
        le=1,
        validation_alias=_env("RELAY_BUDGET_UTILIZATION"),
        description="Share of RELAY_MESSAGES_PER_SECOND the worker spends (Realtime closes "
        "channels at avg >= limit, and other clients count too).",
    )
    relay_adaptive_batching: bool = Field(
        True,
        validation_alias=_env("RELAY_ADAPTIVE_BATCHING"),
        description="Grow batches (more tokens per message) when the budget is short; false "
        "keeps fixed batches (for benchmarks).",
    )
    relay_max_in_flight: int = Field(
        32,
        ge=1,
        validation_alias=_env("RELAY_MAX_IN_FLIGHT"),
        description="Unacknowledged broadcasts allowed per topic (pipelining window).",
    )
    relay_max_message_bytes: int = Field(
        32_000,
        ge=64,
        validation_alias=_env("RELAY_MAX_MESSAGE_BYTES"),
        description="Most UTF-8 bytes of token text in one message (Free plan payloads: 256 KB).",
    )
    relay_rate_limit_rejoin_s: float = Field(
        30.0,
        ge=0,
        validation_alias=_env("RELAY_RATE_LIMIT_REJOIN_S"),
        description="Wait before rejoining after a rate-limit join error or a 'Too many "
        "messages per second' channel shutdown.",
    )
    relay_rest_fallback: bool = Field(
        True,
        validation_alias=_env("RELAY_REST_FALLBACK"),
        description="Send through the REST broadcast endpoint while the socket is down.",
    )
    relay_channels_per_connection: int = Field(
        100,
        ge=1,
        validation_alias=_env("RELAY_CHANNELS_PER_CONNECTION"),
        description="Channels the publisher joins on one Realtime socket (Realtime allows 100 "
        "on every plan); more topics open more sockets.",
    )
    relay_max_connections: int = Field(
        20,
        ge=1,
        validation_alias=_env("RELAY_MAX_CONNECTIONS"),
        description="Most Realtime sockets one worker opens (each counts as a concurrent user "
        "once it has a channel); topics beyond them go through REST.",
    )
    relay_joins_per_second: float = Field(
        40.0,
        gt=0,
        validation_alias=_env("RELAY_JOINS_PER_SECOND"),
        description="Channel joins per second the worker spends (Realtime's project limit is "
        "100 on Free and counts every client's joins).",
    )
    relay_max_lag_s: float = Field(
        1.0,
        gt=0,
        validation_alias=_env("RELAY_MAX_LAG_S"),
        description="The worker stops claiming new requests while the relay is this far "
        "behind (event-loop delay or oldest unsent message).",
    )
    relay_drain_timeout_s: float = Field(
        120.0,
        gt=0,
        validation_alias=_env("RELAY_DRAIN_TIMEOUT_S"),
        description="How long the end of a stream waits for its last messages to be acked.",
    )

    # --- Worker process and queue ---
    relay_concurrency: int = Field(
        16,
        ge=1,
        validation_alias=_env("RELAY_CONCURRENCY"),
        description="Requests one worker process streams at once.",
    )
    relay_lease_s: float = Field(
        30.0,
        gt=0,
        validation_alias=_env("RELAY_LEASE_S"),
        description="Lease on a claimed request; another worker reclaims it after expiry.",
    )
    relay_poll_interval_s: float = Field(
        2.0,
        gt=0,
        validation_alias=_env("RELAY_POLL_INTERVAL_S"),
        description="Polling period of the queue (NOTIFY wakes it sooner).",
    )
    relay_max_attempts: int = Field(
        3,
        ge=1,
        validation_alias=_env("RELAY_MAX_ATTEMPTS"),
        description="Claims of one request before it is failed for good.",
    )
    relay_checkpoint_interval_s: float = Field(
        1.0,
        gt=0,
        validation_alias=_env("RELAY_CHECKPOINT_INTERVAL_S"),
        description=(
            "Period of the cancel poll, and of row checkpoints for runners that do not "
            "write the token log (RELAY_WAL=false, custom runners)."
        ),
    )
    relay_wal: bool = Field(
        True,
        validation_alias=_env("RELAY_WAL"),
        description=(
            "Write each batch to the write-ahead token log (llm_request_chunks) before it is "
            "broadcast, so a takeover continues from exactly what subscribers may have seen; "
            "false only to benchmark without it."
        ),
    )
    relay_chunk_retention_s: float = Field(
        3600.0,
        ge=0,
        validation_alias=_env("RELAY_CHUNK_RETENTION_S"),
        description=(
            "How long the token log of a finished request is kept for catch-up reads "
            "(its row then holds the compacted transcript)."
        ),
    )
    relay_grace_period_s: float = Field(
        20.0,
        ge=0,
        validation_alias=_env("RELAY_GRACE_PERIOD_S"),
        description="On SIGTERM, how long in-flight streams may finish before they are released.",
    )
    relay_http_port: int = Field(
        9464,
        ge=0,
        validation_alias=_env("RELAY_HTTP_PORT"),
        description="Port of /healthz, /readyz and /metrics (0 disables).",
    )
    relay_http_host: str = Field(
        "127.0.0.1",
        validation_alias=_env("RELAY_HTTP_HOST"),
        description="Address /healthz, /readyz and /metrics listen on (0.0.0.0: every interface).",
    )

    relay_heartbeat_interval_s: float = Field(
        10.0,
        gt=0,
        validation_alias=_env("RELAY_HEARTBEAT_INTERVAL_S"),
        description="Period of the lease heartbeat (keep it well under RELAY_LEASE_S).",
    )
    relay_worker_id: str = Field(
        "",
        validation_alias=_env("RELAY_WORKER_ID"),
        description="Name this worker writes as lease owner (empty: <host>-<pid>).",
    )
    relay_db_pool_size: int = Field(
        4,
        ge=1,
        le=64,
        validation_alias=_env("RELAY_DB_POOL_SIZE"),
        description="Postgres connections one worker uses for queue queries (plus one LISTEN).",
    )
    relay_db_timeout_s: float = Field(
        5.0,
        gt=0,
        validation_alias=_env("RELAY_DB_TIMEOUT_S"),
        description="Deadline of every queue database call (at most RELAY_HEARTBEAT_INTERVAL_S).",
    )
    relay_allowed_models: str = Field(
        "",
        validation_alias=_env("RELAY_ALLOWED_MODELS"),
        description="Comma-separated models a request may name (empty: any model).",
    )
    relay_max_message_chars: int = Field(
        200_000,
        ge=1,
        validation_alias=_env("RELAY_MAX_MESSAGE_CHARS"),
        description="Largest total text of a request's messages, in characters.",
    )
    relay_max_messages: int = Field(
        200,
        ge=1,
        validation_alias=_env("RELAY_MAX_MESSAGES"),
        description="Most messages one request may carry.",
    )
    relay_max_tokens_cap: int = Field(
        4096,
        ge=1,
        validation_alias=_env("RELAY_MAX_TOKENS_CAP"),
        description="Largest max_tokens a request may ask for (also the default when unset).",
    )

    # --- Logging ---
    relay_log_level: Literal["TRACE", "DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO",
        validation_alias=_env("RELAY_LOG_LEVEL"),
        description="Log level (DEBUG adds one line per batch, never per token).",
    )
    relay_log_json: bool = Field(
        False,
        validation_alias=_env("RELAY_LOG_JSON"),
        description="Write logs as JSON lines (one object per record) instead of text.",
    )

    @field_validator(
        *(f"relay_{p}_{d}_timeout_s" for p in ("openai", "groq") for d in _DEADLINES),
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # `.env.example` lists these as `RELAY_GROQ_IDLE_TIMEOUT_S=`: empty means unset.
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("relay_topic_template")
    @classmethod
    def _template_has_session(cls, value: str) -> str:
        if "{session_id}" not in value:
            raise ValueError("RELAY_TOPIC_TEMPLATE must contain {session_id}")
        return value

    @property
    def db_call_timeout_s(self) -> float:
        """The deadline of one queue database call: never longer than a heartbeat
        interval, so an outage is noticed before the next heartbeat is due."""
        return min(self.relay_db_timeout_s, self.relay_heartbeat_interval_s)

    def topic_for(self, session_id: str) -> str:
        """The Realtime sub-topic (without `realtime:`) of one session."""
        return self.relay_topic_template.format(session_id=session_id)

    @property
    def realtime_url(self) -> str:
        return self.supabase_url.rstrip("/") + "/realtime/v1"

    def base_url_for(self, provider: Provider) -> str:
        return self.openai_base_url if provider == "openai" else self.groq_base_url

    def api_key_for(self, provider: Provider) -> SecretStr | None:
        return self.openai_api_key if provider == "openai" else self.groq_api_key

    def provider_configured(self, provider: Provider) -> bool:
        """The one rule for "this worker can use `provider`": a key, or a base URL of
        its own.

        A local OpenAI-compatible server (Ollama, vLLM, llama.cpp, KoboldCpp) often
        takes no key, so naming its URL configures the provider on its own. An empty
        key, or the public default URL without a key (a copy of `.env.example` has both)
        configures nothing.
        """
        key = self.api_key_for(provider)
        if key is not None and key.get_secret_value():
            return True
        default = OPENAI_DEFAULT_BASE_URL if provider == "openai" else GROQ_DEFAULT_BASE_URL
        return self.base_url_for(provider).rstrip("/") != default

    def deadlines_for(self, provider: Provider) -> UpstreamDeadlines:
        """Connect / first-token / idle / total for one provider: its own setting when
        set (`RELAY_GROQ_IDLE_TIMEOUT_S`), else the global one (`RELAY_IDLE_TIMEOUT_S`)."""
        values: dict[str, tuple[float, str]] = {}
        for phase in _DEADLINES:
            own: float | None = getattr(self, f"relay_{provider}_{phase}_timeout_s")
            if own is not None:
                values[phase] = own, f"RELAY_{provider.upper()}_{phase.upper()}_TIMEOUT_S"
            else:
                values[phase] = (
                    getattr(self, f"relay_{phase}_timeout_s"),
                    f"RELAY_{phase.upper()}_TIMEOUT_S",
                )
        return UpstreamDeadlines(
            connect_s=values["connect"][0],
            first_token_s=values["first_token"][0],
            idle_s=values["idle"][0],
            total_s=values["total"][0],
            names={phase: name for phase, (_, name) in values.items()},
        )

    def secret_values(self) -> list[str]:
        """Every configured key, for redaction (never log or send these)."""
        out: list[str] = []
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                secret = value.get_secret_value()
                if len(secret) >= MIN_REDACTED_SECRET_CHARS:
                    out.append(secret)
        return out

    def model_for(self, provider: Provider) -> str:
        return self.relay_model or DEFAULT_MODELS[provider]

    @property
    def allowed_models(self) -> frozenset[str]:
        """The model allowlist; empty means any model is allowed."""
        return frozenset(m.strip() for m in self.relay_allowed_models.split(",") if m.strip())


def _env_name(name: str, field: Any) -> str:
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        first = alias.choices[0]
        if isinstance(first, str):
            return first
    return name.upper()


def _default_text(field: Any) -> str:
    default = field.default
    if default is None:
        return ""
    if isinstance(default, bool):
        return "true" if default else "false"
    return str(default)


def settings_rows() -> list[tuple[str, str, str]]:
    """(ENV_NAME, default, description) for every setting, in declaration order."""
    return [
        (_env_name(name, field), _default_text(field), field.description or "")
        for name, field in Settings.model_fields.items()
    ]


def render_env_example() -> str:
    lines = [
        "# llm-token-relay settings: every one, with its default and meaning.",
        "# Generated by `python -m worker.config --env-example`; tests fail on drift.",
        "",
    ]
    for env, default, description in settings_rows():
        lines.append(f"# {description}")
        lines.append(f"{env}={default}")
        lines.append("")
    return "\n".join(lines)


def render_markdown_table() -> str:
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for env, default, description in settings_rows():
        shown = f"`{default}`" if default else "(unset)"
        lines.append(f"| `{env}` | {shown} | {description} |")
    return "\n".join(lines)


def update_readme(path: str = "README.md") -> None:
    """Rewrite the table between the settings markers of the README."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{head}{README_START}{render_markdown_table()}\n{README_END}{tail}")


README_START, README_END = "<!-- settings:start -->\n", "<!-- settings:end -->"

if __name__ == "__main__":  # pragma: no cover - generator entry
    if "--readme" in sys.argv:
        update_readme()
    elif "--markdown" in sys.argv:
        print(render_markdown_table())
    else:
        print(render_env_example(), end="")
