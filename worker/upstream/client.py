"""The streaming client: httpx in, `UpstreamEvent`s out, with deadlines and recovery.

Layers, outermost first:

1. `UpstreamClient.stream()` — mid-stream recovery. Once output reached the
   consumer, a failure is handled by `RELAY_MIDSTREAM_RECOVERY`:
   - `stop` (default): raise the `UpstreamError` with `tokens_received` and a
     usage estimate. Honest: the client keeps exactly what it has seen, marked
     incomplete; nothing is invented and nothing is paid twice. The job layer
     may still re-run the whole request visibly.
   - `restart`: yield `Status("reset")`, then generate again from the original
     messages. For callers that own their client side only: the relay refuses the
     setting and ends a stream on a `reset` (contract v1 cannot make a client discard
     what it showed).
   - `continue`: yield `Status("resuming")`, then ask again with the partial
     content appended as an assistant turn plus a user turn asking to continue.
     A stream with tool calls, or with reasoning only, is not continued: it stops
     (a restart would splice two generations, e.g. concatenate two attempts'
     tool-call arguments).
     This is the seam LiteLLM removed from its automatic retries: models
     restart, repeat or change voice, personas break, models without prefill
     answer the new user turn instead, and tool-call arguments cannot be
     resumed. So it is opt-in, announced to the client, never used for
     tool-call streams (those stop instead), and the text after the seam
     is relayed as-is: the transcript the relay stores is what the client saw.
2. `_acquire()` — before the first output of an attempt: retries with backoff
   (`RetryPolicy`), the circuit breaker per provider, the fallback chain with
   model mapping; `Status("retrying" | "fallback")` tell the client why it waits.
3. `_attempt()` — one HTTP request: status and error-body mapping, bounded body
   decoding (`body.py`), SSE decoding (bounded lines and events), chunk parsing,
   the max_tokens bound, and the deadlines (connect via httpx, per request; first
   token, idle gap and total through `deadline.py`'s one watchdog around each wait —
   never around a `yield`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
import urllib.request
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import httpx
import orjson
from loguru import logger

from worker.config import DEFAULT_MODELS, Provider, Settings
from worker.errors import ConfigError, UpstreamError
from worker.transcript import StreamTranscript
from worker.upstream.body import ACCEPT_ENCODING, BodyDecoder, BodyLimitError
from worker.upstream.buffer import EventBuffer, HttpxBody, ReadPace, WakeWheel
from worker.upstream.chunks import ChunkParser
from worker.upstream.deadline import ReadDeadlines, ReadTimeout, ReadWatchdog
from worker.upstream.errormap import (
    Redactor,
    error_from_httpx,
    error_from_response,
    map_httpx_exceptions,
)
from worker.upstream.events import (
    Finished,
    GenerationRequest,
    Refusal,
    Status,
    Token,
    ToolCallDelta,
    UpstreamEvent,
)
from worker.upstream.h1 import H1Response, post_stream
from worker.upstream.retry import CircuitBreaker, RetryPolicy
from worker.upstream.sse import SSEDecoder, SSEEvent, SSELimitError

PROVIDERS: tuple[Provider, ...] = ("openai", "groq")
MAX_ERROR_BODY_BYTES = 64 * 1024  # an error page is read this far, never more
CHARS_PER_TOKEN_ESTIMATE = 4.0  # the usual rule of thumb for English text

Sleep = Callable[[float], Awaitable[None]]
Response = httpx.Response | H1Response


@dataclass
class StreamStats:
    """What happened during one `stream()` call (for `llm-relay probe` and metrics)."""

    attempts: int = 0
    provider: str = ""
    model: str = ""
    http_status: int | None = None
    started: float = field(default_factory=time.monotonic)
    headers_s: float | None = None
    first_token_s: float | None = None
    end_s: float | None = None
    recoveries: int = 0


@dataclass
class _Progress:
    """Output of the current generation since the last reset."""

    transcript: StreamTranscript = field(default_factory=StreamTranscript)
    usage_parts: list[tuple[dict[str, Any], bool]] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.transcript.tokens


@dataclass
class _Read:
    """One attempt's parser and what its accounting needs."""

    parser: ChunkParser
    progress: _Progress
    messages: list[dict[str, Any]]
    start_tokens: int  # progress.tokens when the attempt began
    deadlines: ReadDeadlines
    max_outputs: int  # output deltas this attempt may yield (max_tokens + slack)
    pace: ReadPace  # the consumer's batching window
    breaker: CircuitBreaker  # its provider's: told at the first output
    outputs: int = 0
    produced: bool = False  # output (token, tool call, refusal) reached the consumer
    error: UpstreamError | None = None  # a failure found while parsing a read
    accounted: bool = False  # its partial usage was recorded


def _proxied(url: str) -> bool:
    """httpx (trust_env) would send this request through a proxy from the environment."""
    proxies = urllib.request.getproxies_environment()
    parsed = httpx.URL(url)
    if not (proxies.get(parsed.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass_environment(parsed.host)  # type: ignore[attr-defined]


def not_configured(provider: str) -> UpstreamError:
    """A request for a provider this worker has neither a key nor a base URL for."""
    return UpstreamError(
        f"provider {provider} is not configured on this worker",
        type="bad_request",
        provider=provider,
    )


def parse_fallbacks(value: str) -> list[Provider]:
    out: list[Provider] = []
    for name in (part.strip() for part in value.split(",")):
        if not name:
            continue
        if name not in PROVIDERS:
            raise ConfigError(f"RELAY_FALLBACK_PROVIDERS: unknown provider {name!r}")
        out.append(name)  # checked against PROVIDERS above
    return out


def parse_model_map(value: str) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        provider, sep, model = part.partition(":")
        if not sep or provider.strip() not in PROVIDERS or not model.strip():
            raise ConfigError(f"RELAY_FALLBACK_MODELS: expected provider:model, got {part!r}")
        mapping[provider.strip()] = model.strip()
    return mapping


def estimate_usage(messages: list[dict[str, Any]], completion_tokens: int) -> dict[str, Any]:
    """A usage estimate for a generation whose provider never reported one."""
    chars = sum(len(str(m.get("content") or "")) for m in messages)
    prompt = max(1, round(chars / CHARS_PER_TOKEN_ESTIMATE)) if chars else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }


def combine_usage(parts: list[tuple[dict[str, Any], bool]]) -> tuple[dict[str, Any] | None, bool]:
    """One attempt: its usage as sent. Several (restart / continue): summed counts."""
    if not parts:
        return None, False
    if len(parts) == 1:
        return parts[0]
    total: dict[str, Any] = {}
    for usage, _ in parts:
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            value = usage.get(key)
            if isinstance(value, int | float):
                total[key] = total.get(key, 0) + value
    return total, any(estimated for _, estimated in parts)


POOL_HEADROOM = 16  # connections beyond RELAY_CONCURRENCY
MAX_IDLE_CONNECTIONS = 64  # kept alive between generations


class UpstreamClient:
    """Streams chat completions from OpenAI / Groq as typed events.

    Args:
        settings: the worker's settings (deadlines, retries, providers, recovery).
        transport: an httpx transport (tests: `httpx.MockTransport`), else real HTTP.
        sleep: the retry sleep (tests inject a recorder).
        rng: jitter source in [0, 1).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Sleep = asyncio.sleep,
        rng: Callable[[], float] | None = None,
    ) -> None:
        self.settings = settings
        self._sleep = sleep
        self.clean = Redactor(settings.secret_values(), settings.relay_max_error_chars)
        connect = settings.relay_connect_timeout_s
        # Reads are bounded by our own first-token / idle / total deadlines.
        timeout = httpx.Timeout(connect=connect, read=None, write=connect, pool=connect)
        # One streaming response holds one connection for its whole life: httpx's default
        # pool (100) made stream 101 of RELAY_CONCURRENCY fail with PoolTimeout
        # (bench/RESULTS.md 4b). The concurrency cap is the real bound; the headroom
        # covers a fallback or continuation opened while a closing stream lets go.
        limits = httpx.Limits(
            max_connections=settings.relay_concurrency + POOL_HEADROOM,
            max_keepalive_connections=min(settings.relay_concurrency, MAX_IDLE_CONNECTIONS),
        )
        self._http = httpx.AsyncClient(transport=transport, timeout=timeout, limits=limits)
        # A custom transport (tests' mock) is httpx's; so is every proxied request.
        self._protocol_reader = transport is None and settings.relay_upstream_reader == "protocol"
        self._ssl: ssl.SSLContext | None = None
        # Whether httpx would proxy a URL: decided from the environment once per URL, as
        # httpx reads it once, when its client is made (not on every request).
        self._proxied: dict[str, bool] = {}
        self._wheel = WakeWheel()  # one timer for every stream's wake-ups
        policy_kwargs: dict[str, Any] = {} if rng is None else {"rng": rng}
        self.policy = RetryPolicy(
            retries=settings.relay_upstream_retries,
            base_s=settings.relay_upstream_retry_base_s,
            cap_s=settings.relay_upstream_retry_cap_s,
            **policy_kwargs,
        )
        self.fallbacks = [
            p for p in parse_fallbacks(settings.relay_fallback_providers) if self._usable(p)
        ]
        self.fallback_models = parse_model_map(settings.relay_fallback_models)
        self.breakers = {
            p: CircuitBreaker(
                p, failures=settings.relay_breaker_failures, reset_s=settings.relay_breaker_reset_s
            )
            for p in PROVIDERS
        }

    def _usable(self, provider: Provider) -> bool:
        if self.settings.provider_configured(provider):
            return True
        logger.bind(event="upstream_config", provider=provider).warning(
            "fallback provider {} is not configured on this worker (no key, no base URL): skipped",
            provider,
        )
        return False

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> UpstreamClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- layer 1: mid-stream recovery ---
    async def stream(
        self, request: GenerationRequest, *, stats: StreamStats | None = None
    ) -> AsyncGenerator[UpstreamEvent, None]:
        """Yield the events of one generation; raise `UpstreamError` when it fails.

        `Finished` is always the last event of a successful stream.
        """
        batches = self.stream_batches(request, stats=stats)
        async with contextlib.aclosing(batches):
            async for batch in batches:
                for event in batch:
                    yield event

    async def stream_batches(
        self,
        request: GenerationRequest,
        *,
        stats: StreamStats | None = None,
        pace: ReadPace | None = None,
    ) -> AsyncGenerator[list[UpstreamEvent], None]:
        """`stream()`, a wake-up at a time: the events read since the last one, as an
        `EventBatch` (with the time the oldest was read) when they came from the wire.
        The relay's path: no hop per event. `pace` is the consumer's batching window
        (default RELAY_MAX_BATCH_DELAY_MS), read at each wake-up it schedules."""
        stats = stats if stats is not None else StreamStats()
        if pace is None:
            pace = ReadPace(self.settings.relay_max_batch_delay_ms / 1000)
        loop = asyncio.get_running_loop()
        started = loop.time()
        progress = _Progress()
        messages = request.messages
        log = logger.bind(event="upstream", provider=request.provider)
        while True:
            try:
                batches = self._acquire(request, messages, progress, stats, started, pace)
                async with contextlib.aclosing(batches):
                    async for batch in batches:
                        yield batch
                stats.end_s = time.monotonic() - stats.started
                return
            except UpstreamError as error:
                stats.end_s = time.monotonic() - stats.started
                mode = self._recovery_mode(error, progress, stats)
                if mode == "stop":
                    raise self._final_error(error, progress) from error
                stats.recoveries += 1
                log.warning("mid-stream {} after {} tokens: {}", mode, progress.tokens, error.type)
                if mode == "restart":
                    yield [
                        Status(
                            "reset",
                            {
                                "reason": error.type,
                                "tokens_discarded": progress.tokens,
                                "provider": error.provider,
                            },
                        )
                    ]
                    progress.transcript = StreamTranscript()
                    messages = request.messages
                else:
                    yield [
                        Status(
                            "resuming",
                            {
                                "reason": error.type,
                                "mode": "continue",
                                "tokens_received": progress.tokens,
                                "provider": error.provider,
                                "seam": True,  # the text after this point is a continuation
                            },
                        )
                    ]
                    messages = [
                        *request.messages,
                        {"role": "assistant", "content": progress.transcript.content},
                        {"role": "user", "content": self.settings.relay_continue_prompt},
                    ]

    def _recovery_mode(
        self, error: UpstreamError, progress: _Progress, stats: StreamStats
    ) -> Literal["stop", "restart", "continue"]:
        t = progress.transcript
        if t.tokens == 0 and not t.has_tool_calls:
            return "stop"  # failed before any output: retries already ran in _acquire
        mode = self.settings.relay_midstream_recovery
        if (
            mode == "stop"
            or not error.retryable
            or stats.recoveries >= self.settings.relay_midstream_max_recoveries
        ):
            return "stop"
        if mode == "continue" and (t.has_tool_calls or not t.content):
            # Tool-call arguments (or reasoning only) cannot be continued, and a restart
            # would splice two generations into what the client already has (the
            # arguments of both attempts concatenated): end honestly instead.
            return "stop"
        return mode

    def _final_error(self, error: UpstreamError, progress: _Progress) -> UpstreamError:
        usage, estimated = combine_usage(progress.usage_parts)
        return UpstreamError(
            error.message,
            type=error.type,
            provider=error.provider,
            status=error.status,
            retry_after_s=error.retry_after_s,
            tokens_received=progress.tokens,
            retryable=error.retryable,
            usage=usage,
            usage_estimated=estimated,
        )

    # --- layer 2: retries, breaker, fallback (before the first output) ---
    def _chain(self, request: GenerationRequest) -> list[tuple[Provider, str]]:
        primary = request.provider
        chain: list[tuple[Provider, str]] = [
            (primary, request.model or self.settings.model_for(primary))
        ]
        for provider in self.fallbacks:
            if provider != primary and all(provider != p for p, _ in chain):
                model = self.fallback_models.get(provider) or DEFAULT_MODELS[provider]
                chain.append((provider, model))
        return chain

    async def _acquire(
        self,
        request: GenerationRequest,
        messages: list[dict[str, Any]],
        progress: _Progress,
        stats: StreamStats,
        started: float,
        pace: ReadPace,
    ) -> AsyncGenerator[list[UpstreamEvent], None]:
        """Batches of events (one per network read); retries and falls back until the
        first output, re-raises after it."""
        if not self.settings.provider_configured(request.provider):
            raise not_configured(request.provider)
        total_deadline = started + self.settings.deadlines_for(request.provider).total_s
        chain = self._chain(request)
        last_error: UpstreamError | None = None
        for index, (provider, model) in enumerate(chain):
            breaker = self.breakers[provider]
            if index > 0:
                assert last_error is not None
                yield [
                    Status(
                        "fallback",
                        {
                            "from": chain[index - 1][0],
                            "to": provider,
                            "model": model,
                            "reason": last_error.type,
                        },
                    )
                ]
            if not breaker.allow(time.monotonic()):
                last_error = UpstreamError(
                    f"circuit breaker open for {provider}", type="server_error", provider=provider
                )
                continue
            attempt = 0
            limits = self.settings.deadlines_for(provider)
            deadlines = ReadDeadlines(limits, min(total_deadline, started + limits.total_s))
            max_outputs = (
                request.max_tokens or self.settings.relay_max_tokens_cap
            ) + self.settings.relay_max_tokens_slack_tokens
            while True:
                read = _Read(
                    ChunkParser(provider, model, clean=self.clean),
                    progress,
                    messages,
                    progress.tokens,
                    deadlines,
                    max_outputs,
                    pace,
                    breaker,
                )
                try:
                    batches = self._attempt(read, request, stats)
                    async with contextlib.aclosing(batches):
                        async for batch in batches:
                            yield batch
                    breaker.record_success()
                    return
                except UpstreamError as error:
                    breaker.record_failure(error, time.monotonic(), after_output=read.produced)
                    if read.produced:
                        raise  # mid-stream: layer 1 decides
                    last_error = error
                    delay = self.policy.delay_for(error, attempt)
                    if delay is None or asyncio.get_running_loop().time() + delay > total_deadline:
                        break
                    attempt += 1
                    yield [self._retrying(provider, attempt, delay, error)]
                    await self._sleep(delay)
                    if not breaker.allow(time.monotonic()):
                        break
            if last_error is not None and last_error.type == "bad_request":
                break  # the same request would be refused by the next provider too
        assert last_error is not None
        raise last_error

    @staticmethod
    def _retrying(provider: str, attempt: int, delay: float, error: UpstreamError) -> Status:
        logger.bind(event="upstream_retry", provider=provider).info(
            "retry {} in {:.2f}s after {}", attempt, delay, error.type
        )
        return Status(
            "retrying",
            {
                "provider": provider,
                "attempt": attempt,
                "delay_s": round(delay, 3),
                "reason": error.type,
                "status": error.status,
            },
        )

    # --- layer 3: one HTTP request ---
    def _body(
        self, provider: Provider, model: str, request: GenerationRequest, messages: list[Any]
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "messages": messages, "stream": True}
        if provider == "openai":
            # Usage arrives in a final chunk with `choices: []`; Groq sends x_groq.usage.
            body["stream_options"] = {"include_usage": True}
        if request.max_tokens is not None:
            key = "max_completion_tokens" if provider == "openai" else "max_tokens"
            body[key] = request.max_tokens
        if request.temperature is not None:
            body["temperature"] = request.temperature
        body.update(request.extra)
        return body

    async def _open(
        self, read: _Read, request: GenerationRequest, watchdog: ReadWatchdog, first_at: float
    ) -> Response:
        """Send the request; return the response of a stream that began (200, SSE)."""
        provider, model = cast(Provider, read.parser.provider), read.parser.model
        headers = {"Accept": "text/event-stream", "Accept-Encoding": ACCEPT_ENCODING}
        key = self.settings.api_key_for(provider)
        if key is not None and key.get_secret_value().strip():  # a key-less local server
            headers["Authorization"] = f"Bearer {key.get_secret_value()}"
        url = self.settings.base_url_for(provider).rstrip("/") + "/chat/completions"
        body = self._body(provider, model, request, read.messages)
        connect = read.deadlines.limits.connect_s
        deadline, phase = read.deadlines.first_token_at(first_at)
        sending: Awaitable[Response]
        proxied = self._proxied.get(url)
        if proxied is None:
            proxied = self._proxied[url] = _proxied(url)
        if self._protocol_reader and not proxied:
            if self._ssl is None and url.startswith("https:"):
                self._ssl = httpx.create_ssl_context()
            sending = post_stream(
                url, headers, orjson.dumps(body), connect_timeout_s=connect, ssl_context=self._ssl
            )
        else:
            timeout = httpx.Timeout(connect=connect, read=None, write=connect, pool=connect)
            http_request = self._http.build_request(
                "POST", url, json=body, headers=headers, timeout=timeout
            )
            sending = self._http.send(http_request, stream=True)
        try:
            with map_httpx_exceptions(provider, clean=self.clean):
                try:
                    response: Response = await watchdog.read(sending, deadline, phase)
                except httpx.ConnectTimeout:
                    raise ReadTimeout("connect") from None
        except ReadTimeout as timeout_exc:
            raise self._timeout(read, timeout_exc.phase) from None
        return response

    async def _attempt(
        self, read: _Read, request: GenerationRequest, stats: StreamStats
    ) -> AsyncGenerator[list[UpstreamEvent], None]:
        loop = asyncio.get_running_loop()
        provider = read.parser.provider
        stats.attempts += 1
        stats.provider, stats.model, stats.http_status = provider, read.parser.model, None
        first_at = loop.time()
        watchdog = ReadWatchdog()
        try:
            response = await self._open(read, request, watchdog, first_at)
            try:
                await self._check_response(response, read, stats, watchdog, first_at)
                async for batch in self._read_events(read, response, stats, watchdog, first_at):
                    yield batch
            finally:
                await response.aclose()
        finally:
            watchdog.close()

    async def _read_events(
        self,
        read: _Read,
        response: Response,
        stats: StreamStats,
        watchdog: ReadWatchdog,
        first_at: float,
    ) -> AsyncGenerator[list[UpstreamEvent], None]:
        """The events of the body, a wake-up at a time (`EventBuffer`): each read is
        decoded where it arrives, and this generator runs once per window, not per read."""
        settings = self.settings
        decoder = SSEDecoder(
            max_line_bytes=settings.relay_max_sse_line_bytes,
            max_event_bytes=settings.relay_max_sse_event_bytes,
        )
        try:
            body = BodyDecoder(
                response.headers.get("content-encoding", "identity"), settings.relay_max_body_bytes
            )
        except BodyLimitError as exc:
            raise self._malformed(read, str(exc)) from None
        parser = read.parser
        buffer = EventBuffer(
            self._decoder(read, body, decoder, stats),
            lambda: parser.done or read.error is not None,
            self._wheel,
            window_s=read.pace,
            max_events=settings.relay_batch_size,
        )
        source = response if isinstance(response, H1Response) else HttpxBody(response)
        buffer.attach(source)
        source.attach(buffer)
        deadlines = read.deadlines
        try:
            while True:
                deadline, phase = deadlines.next(buffer.last_data_at, read.produced, first_at)
                try:
                    batch = await watchdog.read(buffer.take(), deadline, phase)
                except ReadTimeout as exc:
                    raise self._timeout(read, exc.phase) from None
                except httpx.HTTPError as exc:
                    raise self._read_failed(read, exc) from exc
                if batch is None:
                    break  # the buffer is drained and ended (end of body, done, or error)
                if batch:
                    yield batch
        finally:
            if isinstance(source, HttpxBody):
                await source.aclose()
        # Only now: events read before the end or a failure were all yielded first,
        # however late the consumer came back for them.
        if read.error is not None:
            raise read.error
        if not parser.done:
            yield self._end_of_stream(read, decoder)

    def _decoder(
        self, read: _Read, body: BodyDecoder, decoder: SSEDecoder, stats: StreamStats
    ) -> Callable[[bytes], list[UpstreamEvent]]:
        """What one read decodes to, synchronously: body, SSE, chunks, accounting. A
        failure is left in `read.error` after the events before it."""
        parser = read.parser

        def decode(data: bytes) -> list[UpstreamEvent]:
            out: list[UpstreamEvent] = []
            try:
                # Identity (the usual case): one piece, counted without a generator.
                pieces = (body.count(data),) if body.identity else body.feed(data)
                for piece in pieces:
                    out += self._piece(read, decoder, piece, stats)
                    if read.error is not None or parser.done:
                        break
            except BodyLimitError as exc:
                read.error = self._malformed(read, str(exc))
            return out

        return decode

    def _read_failed(self, read: _Read, exc: ReadTimeout | httpx.HTTPError) -> UpstreamError:
        if isinstance(exc, ReadTimeout):
            return self._timeout(read, exc.phase)
        error = error_from_httpx(exc, read.parser.provider, clean=self.clean)
        return self._with_partial_usage(error, read)

    def _piece(
        self, read: _Read, decoder: SSEDecoder, piece: bytes, stats: StreamStats
    ) -> list[UpstreamEvent]:
        """The events of one decoded piece; past an SSE bound, the events before it
        (the failure is left in `read.error`)."""
        try:
            sse_events = decoder.feed(piece)
        except SSELimitError as exc:
            read.error = self._malformed(read, exc.message)
            sse_events = exc.events
        batch = self._parse(read, sse_events)
        if batch:
            self._note_output(read, batch, stats)
        return batch

    def _malformed(self, read: _Read, message: str) -> UpstreamError:
        error = UpstreamError(message, type="malformed", provider=read.parser.provider, status=200)
        return self._with_partial_usage(error, read)

    async def _check_response(
        self,
        response: Response,
        read: _Read,
        stats: StreamStats,
        watchdog: ReadWatchdog,
        first_at: float,
    ) -> None:
        """A stream begins only with a 200 that is an event stream."""
        stats.http_status = response.status_code
        if stats.headers_s is None:
            stats.headers_s = time.monotonic() - stats.started
        if response.status_code != 200:
            raise await self._status_error(response, read, watchdog, first_at)
        content_type = response.headers.get("content-type", "")
        if "text/html" in content_type or "application/json" in content_type:
            raise await self._not_a_stream(response, read, watchdog, first_at)

    def _timeout(self, read: _Read, phase: str) -> UpstreamError:
        error = UpstreamError(
            read.deadlines.message(phase), type="timeout", provider=read.parser.provider
        )
        return self._with_partial_usage(error, read)

    def _end_of_stream(self, read: _Read, decoder: SSEDecoder) -> list[UpstreamEvent]:
        batch = self._parse(read, decoder.flush())
        if read.error is not None:
            raise read.error
        if not read.parser.done:
            try:
                batch.append(self._finished(read.parser.end_of_stream(), read))
            except UpstreamError as error:
                raise self._with_partial_usage(error, read) from None
        return batch

    @staticmethod
    def _note_output(read: _Read, batch: list[UpstreamEvent], stats: StreamStats) -> None:
        if not read.produced and any(isinstance(e, Token | ToolCallDelta | Refusal) for e in batch):
            read.produced = True
            # Refusals before it are no longer consecutive. Not at the end only: 120
            # streams started together had 5 quick refusals in a row before any stream
            # ended, and the open breaker failed the other 111.
            read.breaker.record_answered()
            if stats.first_token_s is None:
                stats.first_token_s = time.monotonic() - stats.started

    def _parse(self, read: _Read, sse_events: list[SSEEvent]) -> list[UpstreamEvent]:
        """Events of one read. A failure keeps the events before it (they are yielded
        first) and is left in `read.error` for the caller to raise."""
        out: list[UpstreamEvent] = []
        progress = read.progress
        parser = read.parser
        for sse in sse_events:
            try:
                events = parser.feed(sse)
            except UpstreamError as error:
                read.error = self._with_partial_usage(error, read)
                break
            for event in events:
                if isinstance(event, Token | ToolCallDelta | Refusal):
                    read.outputs += 1
                    if read.outputs > read.max_outputs:
                        return self._cut(read, out)
                if isinstance(event, Finished):
                    event = self._finished(event, read)
                else:
                    progress.transcript.feed(event)
                out.append(event)
            if parser.done:
                break
        return out

    def _cut(self, read: _Read, out: list[UpstreamEvent]) -> list[UpstreamEvent]:
        """Past max_tokens (+ slack) the provider is ignoring it: end the stream
        ourselves, as the provider should have (`length`)."""
        logger.bind(event="upstream_overrun", provider=read.parser.provider).warning(
            "provider sent more than {} output deltas (max_tokens + "
            "RELAY_MAX_TOKENS_SLACK_TOKENS): stream ended with finish_reason length",
            read.max_outputs,
        )
        out.append(self._finished(read.parser.cut("length"), read))
        return out

    def _finished(self, finished: Finished, read: _Read) -> Finished:
        parts = read.progress.usage_parts
        if finished.usage is not None:
            parts.append((finished.usage, False))
        else:
            completion = read.progress.tokens - read.start_tokens
            parts.append((estimate_usage(read.messages, completion), True))
        usage, estimated = combine_usage(parts)
        return Finished(
            finish_reason=finished.finish_reason,
            usage=usage,
            usage_estimated=estimated,
            provider=finished.provider,
            model=finished.model,
        )

    def _with_partial_usage(self, error: UpstreamError, read: _Read) -> UpstreamError:
        """The attempt died: account for what it consumed (an estimate, flagged)."""
        progress = read.progress
        completion = progress.tokens - read.start_tokens
        if completion > 0 and not read.accounted:  # an attempt with no output: unbilled
            read.accounted = True
            progress.usage_parts.append((estimate_usage(read.messages, completion), True))
        usage, estimated = combine_usage(progress.usage_parts)
        error.tokens_received = progress.tokens
        error.usage, error.usage_estimated = usage, estimated
        return error

    async def _status_error(
        self, response: Response, read: _Read, watchdog: ReadWatchdog, first_at: float
    ) -> UpstreamError:
        provider = read.parser.provider
        body = b""
        deadline, phase = read.deadlines.first_token_at(first_at)
        try:
            with map_httpx_exceptions(provider, clean=self.clean):
                body = await watchdog.read(self._read_capped(response), deadline, phase)
        except (UpstreamError, ReadTimeout, BodyLimitError):
            pass  # the status alone still classifies the failure
        return error_from_response(
            response.status_code,
            response.headers,
            body,
            provider=provider,
            now=time.time(),
            clean=self.clean,
        )

    async def _not_a_stream(
        self, response: Response, read: _Read, watchdog: ReadWatchdog, first_at: float
    ) -> UpstreamError:
        """A 200 that is not an event stream: a JSON error, or a proxy's HTML page."""
        error = await self._status_error(response, read, watchdog, first_at)
        if error.type in ("upstream_error", "bad_request") and error.message.startswith("HTTP"):
            content_type = response.headers.get("content-type", "")
            return UpstreamError(
                f"HTTP 200 with {content_type!r} instead of an event stream"[:200],
                type="malformed",
                provider=read.parser.provider,
                status=200,
            )
        return error

    @staticmethod
    async def _read_capped(response: Response) -> bytes:
        """At most MAX_ERROR_BODY_BYTES of the decoded body (a bomb stops there too)."""
        decoder = BodyDecoder(response.headers.get("content-encoding", "identity"), 1 << 62)
        parts: list[bytes] = []
        size = 0
        async for data in response.aiter_raw():
            for piece in decoder.feed(data):
                parts.append(piece)
                size += len(piece)
                if size >= MAX_ERROR_BODY_BYTES:
                    return b"".join(parts)[:MAX_ERROR_BODY_BYTES]
        return b"".join(parts)
