"""Chat-completion chunks (OpenAI, Groq) -> upstream events. Pure.

Wire shapes this reads (sources cited where the details live):

- OpenAI `chat.completion.chunk`: `choices[0].delta` with `role`, `content`,
  `refusal`, `tool_calls[{index, id, type, function{name, arguments}}]`;
  `finish_reason` on the last choice chunk (whose delta is usually `{}`). With
  `stream_options.include_usage` "an additional chunk will be streamed before the
  data: [DONE] message ... the choices field will always be an empty array. All
  other chunks will also include a usage field, but with a null value"
  (OpenAI API reference, ChatCompletionStreamOptions; e.g. openai-ruby docs).
- Groq: OpenAI's shape plus `x_groq: {"id": "req_..."}` on the first chunk and
  `x_groq: {"id", "usage": {queue_time, prompt_tokens, prompt_time,
  completion_tokens, completion_time, total_tokens, total_time}}` on the last
  (vercel/ai's Groq provider tests record this chunk); newer Groq also sends a
  top-level `usage`. Reasoning models stream `delta.reasoning`; DeepSeek-style
  servers (and vLLM/SGLang) use `delta.reasoning_content`.
- Errors inside a 200 stream: `data: {"error": {...}}`, or an `event: error` SSE
  event whose data is the error object or the full body.

Tokens are the provider's non-empty deltas, byte-exact: never stripped, joined or
normalised, with one exception made here, the one place tokens are created: text
Postgres refuses (U+0000, and lone surrogates, which only the lenient fallback
decoder lets through) becomes U+FFFD, so the wire, the checksum and the stored row
hold the same text. `[DONE]` ends the stream; a stream that stops without it, and
without a `finish_reason`, is truncated.

Quirks seen in the wild:
- events whose data is empty (`data:` / `data: `) are gateway keep-alives: skipped;
- an error after content has streamed, even when `[DONE]` follows: Groq's
  `x_groq.error` on a chunk with empty `choices`, OpenRouter's top-level `error`
  object next to `finish_reason: "error"`; both end the stream as a failure.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

from worker.errors import UpstreamError
from worker.upstream.errormap import PLAIN, Redactor, error_from_object, error_object_of
from worker.upstream.events import (
    Finished,
    Refusal,
    Token,
    ToolCallDelta,
    UpstreamEvent,
)
from worker.upstream.sse import SSEEvent

DONE_MARKER = "[DONE]"
REPLACEMENT = "\ufffd"
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(text: str) -> str:
    """`text` with what Postgres refuses (NUL, lone surrogates) replaced by U+FFFD."""
    return _UNSTORABLE.sub(REPLACEMENT, text)


MAX_MODEL_CHARS = 200  # the model name a chunk reports goes to llm-done and the row
_USAGE_KEYS = 32
_USAGE_KEY_CHARS = 64


def bounded_usage(usage: dict[str, Any], depth: int = 0) -> dict[str, Any]:
    """A provider's usage object as we pass it on (llm-done, the row): numbers, and
    one level of nested details, at most 32 short keys each; anything else dropped."""
    out: dict[str, Any] = {}
    for key, value in usage.items():
        if len(out) >= _USAGE_KEYS:
            break
        if not isinstance(key, str) or len(key) > _USAGE_KEY_CHARS:
            continue
        if isinstance(value, int | float) or value is None:
            out[key] = value
        elif isinstance(value, dict) and depth == 0:
            out[key] = bounded_usage(value, 1)
    return out


def _scrub(value: Any) -> Any:
    """Every string of a decoded chunk made storable (the lenient decoder's output)."""
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    if isinstance(value, dict):
        return {storable(k): _scrub(v) for k, v in value.items()}
    return value


class ChunkParser:
    """Turns decoded SSE events into `UpstreamEvent`s, keeping the stream's state.

    `feed()` raises `UpstreamError` for an error inside the stream (classified by
    the provider's own type/code) and for a malformed chunk; `end_of_stream()`
    returns the `Finished` event or raises for a truncated stream.
    """

    __slots__ = (
        "clean",
        "content_tokens",
        "done",
        "finish_reason",
        "model",
        "provider",
        "reasoning_tokens",
        "tool_call_indexes",
        "usage",
        "x_groq_id",
    )

    def __init__(self, provider: str, model: str = "", *, clean: Redactor = PLAIN) -> None:
        self.provider = provider
        self.clean = clean  # in-band error messages are redacted and bounded
        self.model = model
        self.done = False
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.x_groq_id: str | None = None
        self.content_tokens = 0
        self.reasoning_tokens = 0
        self.tool_call_indexes: set[int] = set()

    @property
    def tokens_received(self) -> int:
        return self.content_tokens + self.reasoning_tokens

    def feed(self, event: SSEEvent) -> list[UpstreamEvent]:
        if self.done:
            return []  # anything after [DONE] is not part of the answer
        data = event.data
        if event.event == "error":
            raise self._error_from_data(data)
        if data[:1] != "{":
            if not data.strip():
                return []  # `data:` / `data: `: a gateway keep-alive
            if data.strip() == DONE_MARKER:
                self.done = True
                return [self._finished()]
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            chunk = self._lenient(data, exc)
        if type(chunk) is not dict:
            raise self._malformed(f"chunk is a JSON {type(chunk).__name__}, not an object")
        if "error" in chunk:
            err = error_object_of(chunk)
            if err is not None:
                raise self._in_band(err)
        return self._chunk(chunk)

    def cut(self, finish_reason: str) -> Finished:
        """End the stream here ourselves (a provider that ignores max_tokens)."""
        self.done = True
        self.finish_reason = finish_reason
        return self._finished()

    def _lenient(self, data: str, exc: orjson.JSONDecodeError) -> Any:
        """orjson refuses lone surrogates (`"\\ud83d"`, half an emoji) that the JSON
        grammar allows; the standard decoder takes them and `_scrub` makes them
        storable. Anything else it refuses too is a malformed chunk."""
        try:
            return _scrub(json.loads(data))
        except (ValueError, RecursionError):
            raise UpstreamError(
                f"malformed chunk: {str(exc)[:200]}",
                type="malformed",
                provider=self.provider,
                status=200,
                tokens_received=self.tokens_received,
            ) from exc

    def _in_band(self, err: dict[str, Any]) -> UpstreamError:
        return error_from_object(
            err,
            provider=self.provider,
            status=200,
            tokens_received=self.tokens_received,
            in_band=True,
            clean=self.clean,
        )

    def end_of_stream(self) -> Finished:
        """The body ended. Without `[DONE]` a `finish_reason` is enough (some
        compatible servers omit `[DONE]`); without either the stream was cut."""
        if self.done or self.finish_reason is not None:
            self.done = True
            return self._finished()
        raise UpstreamError(
            "stream ended before [DONE] and before a finish_reason (truncated)",
            type="connection_lost",
            provider=self.provider,
            status=200,
            tokens_received=self.tokens_received,
        )

    def _finished(self) -> Finished:
        return Finished(
            finish_reason=self.finish_reason,
            usage=self.usage,
            usage_estimated=False,
            provider=self.provider,
            model=self.model,
        )

    def _malformed(self, message: str) -> UpstreamError:
        return UpstreamError(
            message,
            type="malformed",
            provider=self.provider,
            status=200,
            tokens_received=self.tokens_received,
        )

    def _error_from_data(self, data: str) -> UpstreamError:
        try:
            decoded = orjson.loads(data) if data.strip() else None
        except orjson.JSONDecodeError:
            decoded = {"error": {"message": data.strip() or "error event"}}
        err = error_object_of(decoded)
        if err is None:
            err = decoded if isinstance(decoded, dict) else {"message": "error event"}
        return self._in_band(err)

    def _chunk(self, chunk: dict[str, Any]) -> list[UpstreamEvent]:
        model = chunk.get("model")
        if model and model != self.model and isinstance(model, str):
            self.model = storable(model[:MAX_MODEL_CHARS])
        usage = chunk.get("usage")
        if usage is not None and isinstance(usage, dict):
            self.usage = bounded_usage(usage)
        if "x_groq" in chunk and isinstance(chunk["x_groq"], dict):
            self._x_groq(chunk["x_groq"])
        choices = chunk.get("choices")
        if not choices:
            return []  # the include_usage chunk, or a keep-alive chunk
        if type(choices) is not list:
            raise self._malformed("`choices` is not a list")
        if len(choices) == 1:
            choice = choices[0]
            delta = choice.get("delta") if type(choice) is dict else None
            if (
                # The hot path: one choice whose delta is just a content string.
                type(delta) is dict
                and len(delta) == 1
                and choice.get("index", 0) == 0
                and not choice.get("finish_reason")
            ):
                content = delta.get("content")
                if type(content) is str:
                    if not content:
                        return []
                    self.content_tokens += 1
                    if "\x00" in content:
                        content = storable(content)
                    return [Token("content", content)]
        out: list[UpstreamEvent] = []
        for choice in choices:
            # n > 1 is not relayed: only the first choice is the answer.
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                self._choice(choice, out)
        return out

    def _x_groq(self, x_groq: dict[str, Any]) -> None:
        error = x_groq.get("error")
        if error:
            raise self._in_band(error if isinstance(error, dict) else {"message": str(error)})
        if isinstance(x_groq.get("id"), str):
            self.x_groq_id = x_groq["id"]
        groq_usage = x_groq.get("usage")
        # The top-level `usage` (newer Groq) wins when both are present.
        if isinstance(groq_usage, dict) and self.usage is None:
            self.usage = bounded_usage(groq_usage)

    def _choice(self, choice: dict[str, Any], out: list[UpstreamEvent]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict) and delta:
            self._delta(delta, out)
        reason = choice.get("finish_reason")
        if reason == "error":
            # OpenRouter: the error object sits beside it (handled in feed); alone, the
            # generation still failed, whatever follows.
            raise self._in_band({"message": "the provider ended the stream with an error"})
        if reason:
            self.finish_reason = str(reason)

    def _delta(self, delta: dict[str, Any], out: list[UpstreamEvent]) -> None:
        # Reasoning precedes content when one delta carries both.
        reasoning = delta.get("reasoning")
        if not reasoning:
            reasoning = delta.get("reasoning_content")
        if reasoning and isinstance(reasoning, str):
            self.reasoning_tokens += 1
            out.append(Token("reasoning", storable(reasoning)))
        content = delta.get("content")
        if content and isinstance(content, str):
            self.content_tokens += 1
            out.append(Token("content", storable(content)))
        refusal = delta.get("refusal")
        if refusal and isinstance(refusal, str):
            out.append(Refusal(storable(refusal)))
        tool_calls = delta.get("tool_calls")
        if tool_calls:
            self._tool_calls(tool_calls, out)
        function_call = delta.get("function_call")  # the deprecated single-call shape
        if isinstance(function_call, dict) and function_call:
            self._tool_calls([{"index": 0, "function": function_call}], out)

    def _tool_calls(self, tool_calls: Any, out: list[UpstreamEvent]) -> None:
        if not isinstance(tool_calls, list):
            raise self._malformed("`tool_calls` is not a list")
        for call in tool_calls:
            if not isinstance(call, dict):
                raise self._malformed("a tool call delta is not an object")
            function = call.get("function") or {}
            index = call.get("index", 0)
            if not isinstance(index, int) or not isinstance(function, dict):
                raise self._malformed("a tool call delta has a bad index or function")
            call_id = call.get("id") or None
            name = function.get("name") or None
            arguments = function.get("arguments") or ""
            call_id = storable(call_id) if isinstance(call_id, str) else call_id
            name = storable(name) if isinstance(name, str) else name
            arguments = storable(arguments) if isinstance(arguments, str) else arguments
            if call_id is None and name is None and not arguments:
                continue
            self.tool_call_indexes.add(index)
            out.append(ToolCallDelta(index, call_id, name, str(arguments)))
