"""A simulated OpenAI / Groq chat-completions upstream, over real HTTP (aiohttp).

Wire format, chunk by chunk, as the providers send it:

OpenAI (`provider="openai"`; API reference "The chat completion chunk object" and
`stream_options.include_usage`):
    first  {"id","object":"chat.completion.chunk","created","model","service_tier",
            "system_fingerprint","choices":[{"index":0,"delta":{"role":"assistant",
            "content":"","refusal":null},"logprobs":null,"finish_reason":null}]}
    tokens {..."choices":[{"index":0,"delta":{"content":"..."},"logprobs":null,
            "finish_reason":null}]}
    last   {..."choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}
    usage  {..."choices":[],"usage":{...}}        only with include_usage; then every
                                                  other chunk carries "usage":null
    data: [DONE]
Groq (`provider="groq"`; recorded chunks in vercel/ai's Groq provider tests and
Groq's API docs): the same chunk shape without `service_tier`/`refusal`, with
`x_groq: {"id": "req_..."}` on the first chunk and `x_groq: {"id", "usage": {
queue_time, prompt_tokens, prompt_time, completion_tokens, completion_time,
total_tokens, total_time}}` on the last; reasoning models stream
`delta.reasoning` before the content. With include_usage we also put the same
numbers in a top-level `usage` on that last chunk (newer Groq).
Errors: `{"error": {"message","type","param","code"}}` with the HTTP status.

`faults` (a `FaultQueue`) injects one failure per request; see `faults.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import struct
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from aiohttp import web

from devstack.upstream.faults import Fault, FaultQueue
from devstack.upstream.tokens import tokenize

Flavor = Literal["openai", "groq"]

DEFAULT_TEXT = (
    "Hello! Streaming works: words with leading spaces, punctuation, numbers like "
    "1234567, multi-byte UTF-8 such as café, 🦀 and 世界, and a final newline.\n"
)
MODEL_DEFAULTS: dict[str, str] = {"openai": "gpt-4o-mini", "groq": "llama-3.1-8b-instant"}
# How a continuation request is answered: `exact` (the rest of the text, as a model
# that continues exactly would) or `own_words` (what a real model does: the rest in
# different words, so any token regenerated at an offset already shown differs).
Continuation = Literal["exact", "own_words"]
OWN_WORDS_PREFIX = "In other words, "


def own_words(rest: str) -> str:
    """The own-words continuation of `rest`: never the same tokens at the same offsets."""
    return OWN_WORDS_PREFIX + rest.upper()


CONTROL_PREFIX = "/_control"


@dataclass
class StreamPlan:
    """What one request will stream: reasoning tokens, then content or a tool call."""

    reasoning: list[str]
    content: list[str]
    tool_call: tuple[str, str] | None
    finish_reason: str
    prompt_tokens: int


@dataclass
class RecordedRequest:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    fault: Fault | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class SimulatedUpstream:
    """`await SimulatedUpstream(text=...).start()`; `.base_url` ends in `/v1`."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        provider: Flavor = "openai",
        text: str = DEFAULT_TEXT,
        tokens_per_second: float = 0.0,
        reasoning_text: str = "",
        api_key: str | None = "sk-devstack",
        tool_call: tuple[str, str] | None = None,
        model: str | None = None,
        continuation: Continuation = "exact",
    ) -> None:
        self.host = host
        self.continuation: Continuation = continuation
        self.port = port
        self.provider: Flavor = provider
        self.text = text
        self.tokens_per_second = tokens_per_second
        self.reasoning_text = reasoning_text
        self.api_key = api_key
        self.tool_call = tool_call  # (name, arguments JSON) streamed when `tools` are sent
        self.model = model
        self.faults = FaultQueue()
        self.requests: list[RecordedRequest] = []
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()

    # --- lifecycle ---
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    async def start(self) -> SimulatedUpstream:
        app = web.Application()
        for prefix in ("/v1", "/openai/v1"):  # Groq's base URL ends in /openai/v1
            app.router.add_post(f"{prefix}/chat/completions", self._chat)
        app.router.add_get(f"{CONTROL_PREFIX}/faults", self._get_faults)
        app.router.add_post(f"{CONTROL_PREFIX}/faults", self._post_faults)
        app.router.add_delete(f"{CONTROL_PREFIX}/faults", self._delete_faults)
        app.router.add_get(f"{CONTROL_PREFIX}/requests", self._get_requests)
        self._stopping = asyncio.Event()
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        sockets = getattr(site._server, "sockets", None)  # the bound port when port=0
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        self._stopping.set()  # wakes hanging handlers
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> SimulatedUpstream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- control endpoints ---
    async def _get_faults(self, request: web.Request) -> web.Response:
        return web.json_response({"faults": [f.to_dict() for f in self.faults.pending()]})

    async def _post_faults(self, request: web.Request) -> web.Response:
        try:
            payload = await request.json()
            faults = [Fault.from_dict(item) for item in payload.get("faults", [])]
        except (ValueError, TypeError, AttributeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        self.faults.push(*faults)
        return web.json_response({"queued": len(self.faults)})

    async def _delete_faults(self, request: web.Request) -> web.Response:
        self.faults.clear()
        return web.json_response({"queued": 0})

    async def _get_requests(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"requests": [{"path": r.path, "body": r.body} for r in self.requests]}
        )

    # --- the chat endpoint ---
    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return self._error(400, "We could not parse the JSON body of your request.")
        fault = self.faults.take()
        self.requests.append(RecordedRequest(request.path, dict(request.headers), body, fault))
        if self.api_key is not None and request.headers.get("Authorization") != (
            f"Bearer {self.api_key}"
        ):
            message = "Invalid API Key" if self.provider == "groq" else "Incorrect API key provided"
            return self._error(401, message, "invalid_request_error", "invalid_api_key")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return self._error(400, "'messages' is a required property", "invalid_request_error")
        if not body.get("stream"):
            return self._error(400, "the simulated upstream only streams", "invalid_request_error")
        model = str(body.get("model") or self.model or MODEL_DEFAULTS[self.provider])
        if fault is not None and fault.kind == "status":
            return self._fault_response(fault, model)
        if fault is not None and fault.kind == "echo_key":
            # A careless upstream (or proxy) that quotes the request's credentials back.
            echoed = request.headers.get("Authorization", "")
            message = f"upstream failure; request had Authorization: {echoed}"
            kind = "server_error" if fault.status >= 500 else "invalid_request_error"
            return self._error(fault.status, message, kind, "echo")
        if fault is not None and fault.kind == "gzip_bomb":
            return await _gzip_bomb(request, fault.size_bytes, fault.style)
        return await _Streamer(self, request, body, model, fault).run()

    def _error(
        self, status: int, message: str, type_: str = "", code: str | None = None
    ) -> web.Response:
        err = {"message": message, "type": type_ or "invalid_request_error", "param": None}
        err["code"] = code
        return web.json_response({"error": err}, status=status)

    def _fault_response(self, fault: Fault, model: str) -> web.Response:
        headers = dict(fault.headers)
        if fault.body is not None:
            return web.Response(
                status=fault.status,
                body=fault.body.encode(),
                headers={**headers, "Content-Type": fault.content_type},
            )
        err = dict(fault.error or {"message": f"HTTP {fault.status}"})
        err["message"] = str(err.get("message", "")).replace("{model}", model)
        err.setdefault("param", None)
        return web.json_response({"error": err}, status=fault.status, headers=headers)

    def plan(self, body: dict[str, Any]) -> StreamPlan:
        messages = body.get("messages") or []
        text = self.text
        # A continuation request (partial assistant text, then a user turn asking to
        # continue): answer with the rest of the text, as a cooperative model would.
        if len(messages) >= 2 and isinstance(messages[-2], dict):
            prior = messages[-2]
            partial = prior.get("content")
            is_continuation = (
                prior.get("role") == "assistant" and isinstance(partial, str) and bool(partial)
            )
            if is_continuation and self.continuation == "own_words":
                assert isinstance(partial, str)
                text = own_words(text[len(partial) :])
            elif is_continuation and isinstance(partial, str) and text.startswith(partial):
                text = text[len(partial) :]
        prompt_tokens = sum(
            len(tokenize(m["content"]))
            for m in messages
            if isinstance(m, dict) and isinstance(m.get("content"), str)
        )
        tool_call = self.tool_call if body.get("tools") else None
        content = [] if tool_call else tokenize(text)
        reasoning = tokenize(self.reasoning_text) if self.reasoning_text else []
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        finish = "tool_calls" if tool_call else "stop"
        if isinstance(limit, int) and limit >= 0 and len(reasoning) + len(content) > limit:
            reasoning = reasoning[:limit]
            content = content[: max(0, limit - len(reasoning))]
            finish = "length"
        return StreamPlan(reasoning, content, tool_call, finish, prompt_tokens)

    async def pause(self, seconds: float) -> bool:
        """Sleep unless the server stops first; True when it is stopping."""
        if seconds <= 0:
            return self._stopping.is_set()
        if seconds <= SHORT_PAUSE_S:
            # The pace between two tokens: a plain sleep. `wait_for` on the stop event
            # spawned a task and a timeout per token, which made this simulator, not the
            # client under test, the bottleneck of a 100-stream bench (~100 µs a token).
            await asyncio.sleep(seconds)
            return self._stopping.is_set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return self._stopping.is_set()


SHORT_PAUSE_S = 1.0  # pauses up to this long are plain sleeps (see `pause`)


class _Streamer:
    """One streamed response: the chunk framing of the chosen provider, plus the fault."""

    def __init__(
        self,
        server: SimulatedUpstream,
        request: web.Request,
        body: dict[str, Any],
        model: str,
        fault: Fault | None,
    ) -> None:
        self.server = server
        self.request = request
        self.body = body
        self.model = model
        self.fault = fault
        self.groq = server.provider == "groq"
        options = body.get("stream_options")
        self.include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        self.chunk_id = f"chatcmpl-{uuid.uuid4()}" if self.groq else f"chatcmpl-{uuid.uuid4().hex}"
        self.request_id = f"req_{uuid.uuid4().hex[:26]}"
        self.created = int(time.time())
        self.sent_tokens = 0
        self.started = time.monotonic()
        self.response = web.StreamResponse()

    async def run(self) -> web.StreamResponse:
        plan = self.server.plan(self.body)
        self.response.content_type = "text/event-stream"
        if not self.groq:
            self.response.charset = "utf-8"
        self.response.headers["x-request-id"] = self.request_id
        self.response.headers["Cache-Control"] = "no-cache"
        try:
            await self.response.prepare(self.request)
            await self._stream(plan)
        except (ConnectionError, asyncio.CancelledError):
            # The client went away (or the server is stopping): nothing to finish.
            pass
        return self.response

    async def _stream(self, plan: StreamPlan) -> None:
        fault = self.fault
        if fault is not None and fault.kind == "hang_after_headers":
            await self.server.pause(fault.delay_s)
            return
        await self._send(self._first_chunk())
        if fault is not None and fault.kind == "ignore_max_tokens":
            await self._endless_tokens(plan, fault.size_bytes)
            return
        if fault is not None and fault.kind == "slow_first_token":
            self.fault = None
            if await self.server.pause(fault.delay_s):
                return
        field_name = "reasoning" if self.groq else "reasoning_content"
        paced_from, paced_tokens = time.monotonic(), self.sent_tokens
        for kind, pieces in ((field_name, plan.reasoning), ("content", plan.content)):
            for piece in pieces:
                if await self._maybe_fault():
                    return
                if fault is not None and fault.kind == "empty_data":
                    await self.response.write(b"data:\n\ndata: \n\n")
                await self._send(self._chunk({kind: piece}))
                self.sent_tokens += 1
                rate = self.server.tokens_per_second
                # On a schedule, as a model generates: a late wake-up does not slow
                # the stream down (what is due goes out back to back).
                due = paced_from + (self.sent_tokens - paced_tokens) / rate if rate > 0 else 0.0
                if rate > 0 and await self.server.pause(due - time.monotonic()):
                    return
        if plan.tool_call is not None and await self._send_tool_call(*plan.tool_call):
            return
        if await self._maybe_fault():
            return
        await self._finish(plan)

    async def _maybe_fault(self) -> bool:
        """Fire the fault once `after_tokens` tokens went out; True ends the stream."""
        fault = self.fault
        if fault is None or self.sent_tokens < fault.after_tokens:
            return False
        self.fault = None
        if fault.kind == "reset":
            _reset_connection(self.request)
            return True
        if fault.kind == "hang":
            await self.server.pause(fault.delay_s)
            return True
        if fault.kind == "error_event":
            payload = orjson.dumps({"error": fault.error} if not fault.as_event else fault.error)
            prefix = b"event: error\n" if fault.as_event else b""
            await self.response.write(prefix + b"data: " + payload + b"\n\n")
            await self.response.write_eof()
            return True
        if fault.kind == "malformed":
            await self.response.write(b'data: {"id": "chatcmpl-x", "choices": [{"delta": {"con\n\n')
            await self.response.write_eof()
            return True
        if fault.kind == "truncate":
            await self.response.write_eof()
            return True
        return await self._hostile(fault)

    async def _hostile(self, fault: Fault) -> bool:
        """The hostile modes that fire after `after_tokens` tokens; True ends the stream."""
        if fault.kind == "endless_data":
            line = b"data: " + b"x" * 1018 + b"\n"  # 1 KiB lines, never a blank one
            await self._write_repeated(line * 64, fault.size_bytes, b"data: ")
            return True
        if fault.kind == "no_newline":
            await self._write_repeated(b"y" * 65536, fault.size_bytes, b"data: ")
            return True
        if fault.kind == "nul_token":
            await self._send(self._chunk({"content": "nul:\u0000:"}))
            self.sent_tokens += 1
            return False
        if fault.kind == "inband_error":
            err = dict(fault.error or {})
            if fault.style == "openrouter":
                chunk = self._chunk({"content": ""}, finish="error")
                chunk["error"] = err
            else:
                chunk = self._envelope()
                chunk["choices"] = []
                chunk["x_groq"] = {"id": self.request_id, "error": err.get("message", "")}
            await self._send(chunk)
            await self.response.write(b"data: [DONE]\n\n")
            await self.response.write_eof()
            return True
        return False

    async def _write_repeated(self, block: bytes, size: int, head: bytes) -> None:
        """`head`, then `block` again and again up to `size` bytes or until the client
        goes away (a write then raises, ending the handler)."""
        await self.response.write(head)
        sent = len(head)
        while sent < size and not self.server._stopping.is_set():
            await self.response.write(block)
            sent += len(block)

    async def _endless_tokens(self, plan: StreamPlan, tokens: int) -> None:
        """A provider that ignores max_tokens: `tokens` tokens, then a normal end."""
        pieces = tokenize(self.server.text) or ["x"]  # the plan was cut to max_tokens
        for index in range(tokens):
            if self.server._stopping.is_set():
                return
            await self._send(self._chunk({"content": pieces[index % len(pieces)]}))
            self.sent_tokens += 1
        await self._finish(plan)

    async def _send_tool_call(self, name: str, arguments: str) -> bool:
        """Stream one call in pieces (each counts as a token for faults); True: ended."""
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        head = {"index": 0, "id": call_id, "type": "function"}
        pieces = [arguments[i : i + 8] for i in range(0, len(arguments), 8)]
        deltas = [{**head, "function": {"name": name, "arguments": ""}}]
        deltas += [{"index": 0, "function": {"arguments": piece}} for piece in pieces]
        for delta in deltas:
            if await self._maybe_fault():
                return True
            await self._send(self._chunk({"tool_calls": [delta]}))
            self.sent_tokens += 1
        return False

    async def _finish(self, plan: StreamPlan) -> None:
        completion = len(plan.reasoning) + len(plan.content) + (1 if plan.tool_call else 0)
        usage = self._usage(plan.prompt_tokens, completion, len(plan.reasoning))
        last = self._chunk({}, finish=plan.finish_reason)
        if self.groq:
            last["x_groq"] = {"id": self.request_id, "usage": usage}
            if self.include_usage:
                last["usage"] = usage
        await self._send(last)
        if self.include_usage and not self.groq:
            usage_chunk = self._envelope()
            usage_chunk["choices"] = []
            usage_chunk["usage"] = usage
            await self._send(usage_chunk)
        await self.response.write(b"data: [DONE]\n\n")
        await self.response.write_eof()

    def _usage(self, prompt: int, completion: int, reasoning: int) -> dict[str, Any]:
        if self.groq:
            elapsed = round(time.monotonic() - self.started, 6)
            return {
                "queue_time": 0.012,
                "prompt_tokens": prompt,
                "prompt_time": 0.0009,
                "completion_tokens": completion,
                "completion_time": elapsed,
                "total_tokens": prompt + completion,
                "total_time": round(elapsed + 0.0009, 6),
            }
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": reasoning,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def _envelope(self) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.chunk_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
        }
        if not self.groq:
            chunk["service_tier"] = "default"
        chunk["system_fingerprint"] = "fp_devstack01"
        return chunk

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        chunk = self._envelope()
        chunk["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        if self.include_usage and not self.groq:
            chunk["usage"] = None
        return chunk

    def _first_chunk(self) -> dict[str, Any]:
        delta: dict[str, Any] = {"role": "assistant", "content": ""}
        if not self.groq:
            delta["refusal"] = None
        chunk = self._chunk(delta)
        if self.groq:
            chunk["x_groq"] = {"id": self.request_id}
        return chunk

    async def _send(self, chunk: dict[str, Any]) -> None:
        await self.response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")


def _reset_connection(request: web.Request) -> None:
    """Close with RST (SO_LINGER 0): the client sees ECONNRESET, as with a dead proxy."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


_BOMB_LINE = b": keep-alive\n"


@functools.lru_cache(maxsize=4)
def gzip_bomb_body(size_bytes: int, style: str = "lines") -> bytes:
    """gzip of `size_bytes`: tiny on the wire, huge once inflated. "lines": SSE comment
    lines (valid SSE throughout, so only a bound on the decoded body stops it); "line":
    `data: ` and zeros without a line end."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = _BOMB_LINE * (1 << 16) if style == "lines" else b"0" * (1 << 20)
    parts = [compressor.compress(b"data: ")] if style == "line" else []
    left = size_bytes
    while left > 0:
        piece = block if left >= len(block) else block[:left]
        parts.append(compressor.compress(piece))
        left -= len(piece)
    parts.append(compressor.flush())
    return b"".join(parts)


async def _gzip_bomb(request: web.Request, size_bytes: int, style: str) -> web.StreamResponse:
    body = gzip_bomb_body(size_bytes, style)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Content-Encoding": "gzip"}
    )
    try:
        await response.prepare(request)
        for start in range(0, len(body), 16384):
            await response.write(body[start : start + 16384])
        await response.write_eof()
    except (ConnectionError, asyncio.CancelledError):
        pass
    return response
