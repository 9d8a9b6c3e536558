"""Request validation: a claimed row becomes a `GenerationRequest`, or a clear reason.

Pure. Rows come from users (through RLS), so nothing in them is trusted: shape,
sizes, the provider, the model (allowlist) and the parameters are all checked.
A `BadInputError` names the field; the worker fails that request and goes on.
"""

from __future__ import annotations

from typing import Any, Literal, cast

from worker.config import Settings
from worker.errors import BadInputError
from worker.jobs.models import Job
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

    Raises:
        BadInputError: with `field` naming what is wrong.
    """
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
    if value not in PROVIDERS:
        raise BadInputError(
            f"unknown provider {value!r} (expected one of {', '.join(PROVIDERS)})",
            field="provider",
        )
    return cast(Literal["openai", "groq"], value)


def _model(value: Any, provider: Literal["openai", "groq"], settings: Settings) -> str:
    if value is not None and not (isinstance(value, str) and value.strip()):
        raise BadInputError("model must be a non-empty string", field="model")
    model = value or settings.model_for(provider)
    allowed = settings.allowed_models
    if allowed and model not in allowed:
        raise BadInputError(f"model {model!r} is not allowed on this worker", field="model")
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
    """Validate one chat message and return the length of its text."""
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise BadInputError(f"{where} must be an object", field="messages")
    role = message.get("role")
    if role not in ROLES:
        raise BadInputError(f"{where}.role must be one of {sorted(ROLES)}", field="messages")
    content = message.get("content")
    if isinstance(content, str):
        return len(content)
    if content is None and role == "assistant" and message.get("tool_calls"):
        return 0
    if isinstance(content, list):
        return sum(_part_chars(where, part) for part in content)
    raise BadInputError(f"{where}.content must be a string or an array", field="messages")


def _part_chars(where: str, part: Any) -> int:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise BadInputError(f"{where}.content parts must be typed objects", field="messages")
    text = part.get("text", "")
    if not isinstance(text, str):
        raise BadInputError(f"{where}.content text must be a string", field="messages")
    return len(text)


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
