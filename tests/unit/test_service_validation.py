from typing import Any

import pytest

from worker.config import Settings
from worker.errors import BadInputError
from worker.jobs.decode import decode_column
from worker.jobs.models import Job, Snapshot, Undecodable
from worker.service.context import error_info
from worker.service.validation import validate_job

HELLO = [{"role": "user", "content": "hello"}]


def settings(**overrides: Any) -> Settings:
    return Settings(_env_file=None, **overrides)


def job(**fields: Any) -> Job:
    base: dict[str, Any] = {
        "id": "j1",
        "session_id": "s1",
        "owner": "u1",
        "provider": None,
        "model": None,
        "messages": HELLO,
        "params": {},
        "attempts": 1,
        "snapshot": Snapshot(),
    }
    return Job(**(base | fields))


def test_a_plain_request_gets_the_defaults() -> None:
    s = settings(relay_provider="groq", relay_max_tokens_cap=123)
    request = validate_job(job(), s)
    assert request.provider == "groq"
    assert request.model == s.model_for("groq")
    assert request.messages == HELLO
    assert request.max_tokens == 123  # the cap is also the default
    assert request.temperature is None and request.extra == {}


def test_params_are_checked_and_passed_through() -> None:
    params = {"max_tokens": 50, "temperature": 0.5, "top_p": 0.9, "seed": 7}
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]},
    ]
    request = validate_job(job(params=params, messages=messages, provider="openai"), settings())
    assert (request.max_tokens, request.temperature) == (50, 0.5)
    assert request.extra == {"top_p": 0.9, "seed": 7}
    assert request.provider == "openai"


@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        ({"messages": "hello"}, "messages", "non-empty array"),
        ({"messages": []}, "messages", "non-empty array"),
        ({"messages": [42]}, "messages", r"messages\[0\] must be an object"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages", "role"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages", "content"),
        ({"messages": [{"role": "user", "content": [{"text": "x"}]}]}, "messages", "typed"),
        ({"messages": [{"role": "user", "content": "x" * 101}]}, "messages", "too long"),
        ({"messages": [{"role": "user", "content": "x"}] * 4}, "messages", "too many"),
        ({"provider": "anthropic"}, "provider", "unknown provider"),
        ({"model": "gpt-evil"}, "model", "not allowed"),
        ({"model": ""}, "model", "non-empty"),
        ({"params": []}, "params", "object"),
        ({"params": {"logit_bias": {}}}, "params", "unknown params: logit_bias"),
        ({"params": {"max_tokens": 0}}, "max_tokens", "positive"),
        ({"params": {"max_tokens": True}}, "max_tokens", "positive"),
        ({"params": {"max_tokens": 1001}}, "max_tokens", "exceeds the cap of 1000"),
        ({"params": {"temperature": "hot"}}, "temperature", "number"),
        ({"params": {"temperature": 3}}, "temperature", "between"),
    ],
)
def test_malformed_requests_are_refused_with_a_reason(
    fields: dict[str, Any], field: str, reason: str
) -> None:
    s = settings(
        relay_allowed_models="gpt-4o-mini,llama-3.1-8b-instant",
        relay_max_message_chars=100,
        relay_max_messages=3,
        relay_max_tokens_cap=1000,
    )
    with pytest.raises(BadInputError, match=reason) as info:
        validate_job(job(**fields), s)
    assert info.value.field == field
    assert not info.value.retryable


def test_an_allowlisted_model_passes() -> None:
    s = settings(relay_allowed_models=" gpt-4o-mini , llama-3.1-8b-instant")
    assert validate_job(job(model="llama-3.1-8b-instant"), s).model == "llama-3.1-8b-instant"
    assert s.allowed_models == {"gpt-4o-mini", "llama-3.1-8b-instant"}


# --- issue 12: hostile rows ---


def test_a_role_that_is_a_list_is_a_bad_request_not_a_type_error() -> None:
    with pytest.raises(BadInputError) as caught:
        validate_job(job(messages=[{"role": ["user"], "content": "hi"}]), settings())
    assert caught.value.field == "messages"
    assert caught.value.value == "['user']"


@pytest.mark.parametrize(
    "message",
    [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x" * 200}}]},
        {"role": "user", "content": "hi", "name": "n" * 200},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "a" * 200}}
            ],
        },
    ],
    ids=["image_url", "name", "tool_call_arguments"],
)
def test_every_string_of_a_message_counts_against_the_character_limit(
    message: dict[str, Any],
) -> None:
    with pytest.raises(BadInputError, match="messages too long") as caught:
        validate_job(job(messages=[message]), settings(relay_max_message_chars=150))
    assert caught.value.field == "messages"


def test_an_undecodable_column_is_failed_with_its_own_reason() -> None:
    deep = "[" * 5000 + "]" * 5000
    messages = decode_column("messages", deep)
    assert isinstance(messages, Undecodable)
    with pytest.raises(BadInputError, match="messages is nested too deeply") as caught:
        validate_job(job(messages=messages), settings())
    assert caught.value.field == "messages"
    assert caught.value.value is not None and len(caught.value.value) <= 130
    moderately_deep = "[" * 100 + "]" * 100  # json decodes it; still far beyond any message
    assert isinstance(decode_column("messages", moderately_deep), Undecodable)
    assert decode_column("messages", '[{"role": "user", "content": "hi"}]') == [
        {"role": "user", "content": "hi"}
    ]


def test_a_huge_provider_name_gives_a_bounded_error() -> None:
    with pytest.raises(BadInputError) as caught:
        validate_job(job(provider="p" * 1_000_000), settings())
    info = error_info(caught.value)
    assert info["field"] == "provider"
    assert len(info["message"]) <= 600
    assert len(info["value"]) <= 130


def test_any_unforeseen_failure_of_a_check_is_still_a_bad_request() -> None:
    class Hostile(dict[str, Any]):
        def get(self, *_: Any, **__: Any) -> Any:
            raise RuntimeError("boom")

    with pytest.raises(BadInputError, match="cannot be validated") as caught:
        validate_job(job(messages=[Hostile()]), settings())
    assert caught.value.field == "request"
