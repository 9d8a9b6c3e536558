"""Request validation: a claimed row becomes a `GenerationRequest`, or a clear reason.

Pure. Rows come from users (through RLS), so nothing in them is trusted: shape,
sizes, the provider, the model (allowlist) and the parameters are all checked.
A `BadInputError` names the field; the worker fails that request and goes on.
"""

from __future__ import annotations

from typing import Any, Literal, cast

from worker.config import Settings
from worker.errors import BadInputError, preview
from worker.jobs.models import Job, Undecodable
from worker.upstream.events import GenerationRequest

PROVIDERS = ("openai", "groq")
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
# Passed through to the provider as they are (after a type check of the basics).
EXTRA_PARAMS = frozenset(
    {
        "top_p",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "reasoning_effort",
        "reasoning_format",
        "user",
    }
)
KNOWN_PARAMS = EXTRA_PARAMS | {"max_tokens", "temperature"}
MAX_TEMPERATURE = 2.0


def validate_job(job: Job, settings: Settings) -> GenerationRequest:
    """Check a claimed request against the settings' limits.

    The one place that decides a row is unusable: whatever is wrong with it (a
    column that could not be decoded, a value of a type nobody expected) ends here
    as a `BadInputError`, never as another exception that would reach the claim loop.

    Raises:
        BadInputError: with `field` naming what is wrong.
    """
    try:
        return _validate(job, settings)
    except BadInputError:
        raise
    except Exception as exc:  # a check that did not foresee this shape: still this row's fault
        raise BadInputError(
            f"request cannot be validated ({type(exc).__name__})", field="request"
        ) from exc


def _validate(job: Job, settings: Settings) -> GenerationRequest:
    for column in (job.messages, job.params):
        if isinstance(column, Undecodable):
            raise BadInputError(column.reason, field=column.field, value=column.preview)
    provider = _provider(job.provider, settings)
    model = _model(job.model, provider, settings)
    messages = _messages(job.messages, settings)
    params = _params(job.params)
    max_tokens = _max_tokens(params.get("max_tokens"), settings)
    temperature = _temperature(params.get("temperature"))
    extra = {key: value for key, value in params.items() if key in EXTRA_PARAMS}
    return GenerationRequest(
        messages=messages,
        provider=provider,
        model=model,
        max_tokens=max_tokens,
        temperature=temperature,
        extra=extra,
    )


def _provider(value: Any, settings: Settings) -> Literal["openai", "groq"]:
    if value is None or value == "":
        return settings.relay_provider
    if not isinstance(value, str) or value not in PROVIDERS:
        raise BadInputError(
            f"unknown provider {preview(value)} (expected one of {', '.join(PROVIDERS)})",
            field="provider",
            value=preview(value),
        )
    return cast(Literal["openai", "groq"], value)


def _model(value: Any, provider: Literal["openai", "groq"], settings: Settings) -> str:
    if value is not None and not (isinstance(value, str) and value.strip()):
        raise BadInputError("model must be a non-empty string", field="model")
    model = value or settings.model_for(provider)
    allowed = settings.allowed_models
    if allowed and model not in allowed:
        raise BadInputError(f"model {preview(model)} is not allowed on this worker", field="model")
    return model


def _messages(value: Any, settings: Settings) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise BadInputError("messages must be a non-empty array", field="messages")
    if len(value) > settings.relay_max_messages:
        raise BadInputError(
            f"too many messages ({len(value)} > {settings.relay_max_messages})",
            field="messages",
        )
    total = 0
    for index, message in enumerate(value):
        total += _message_chars(index, message)
    if total > settings.relay_max_message_chars:
        raise BadInputError(
            f"messages too long ({total} > {settings.relay_max_message_chars} characters)",
            field="messages",
        )
    return cast(list[dict[str, Any]], value)


def _message_chars(index: int, message: Any) -> int:
    """Validate one chat message and return the length of its text.

    Every string the message carries counts (content, `name`, `image_url`, tool call
    names and arguments...): all of it is sent upstream, so all of it is bounded.
    """
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise BadInputError(f"{where} must be an object", field="messages")
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise BadInputError(
            f"{where}.role must be one of {sorted(ROLES)}",
            field="messages",
            value=preview(role),
        )
    content = message.get("content")
    if isinstance(content, list):
        for part in content:
            _check_part(where, part)
    elif not isinstance(content, str) and not (
        content is None and role == "assistant" and message.get("tool_calls")
    ):
        raise BadInputError(f"{where}.content must be a string or an array", field="messages")
    return _text_chars({k: v for k, v in message.items() if k != "role"})


def _check_part(where: str, part: Any) -> None:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise BadInputError(f"{where}.content parts must be typed objects", field="messages")
    if not isinstance(part.get("text", ""), str):
        raise BadInputError(f"{where}.content text must be a string", field="messages")


def _text_chars(value: Any) -> int:
    """Characters of every string (keys included) in decoded JSON, without recursion."""
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            total += sum(len(key) for key in item if isinstance(key, str))
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return total


def _params(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadInputError("params must be an object", field="params")
    unknown = sorted(set(value) - KNOWN_PARAMS)
    if unknown:
        raise BadInputError(f"unknown params: {', '.join(unknown)}", field="params")
    return cast(dict[str, Any], value)


def _max_tokens(value: Any, settings: Settings) -> int:
    cap = settings.relay_max_tokens_cap
    if value is None:
        return cap
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadInputError("max_tokens must be a positive integer", field="max_tokens")
    if value > cap:
        raise BadInputError(f"max_tokens {value} exceeds the cap of {cap}", field="max_tokens")
    return value


def _temperature(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadInputError("temperature must be a number", field="temperature")
    if not 0 <= value <= MAX_TEMPERATURE:
        raise BadInputError(
            f"temperature must be between 0 and {MAX_TEMPERATURE:g}", field="temperature"
        )
    return float(value)
