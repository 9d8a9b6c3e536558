"""Retry classifier, delay generator and circuit breaker: pure, no clock."""

from __future__ import annotations

import pytest

from worker.errors import ConfigError, UpstreamError
from worker.upstream.client import combine_usage, estimate_usage, parse_fallbacks, parse_model_map
from worker.upstream.retry import BreakerState, CircuitBreaker, RetryPolicy


def err(kind: str = "server_error", **kw: object) -> UpstreamError:
    return UpstreamError("x", type=kind, **kw)  # type: ignore[arg-type]


def test_backoff_doubles_with_equal_jitter_and_cap() -> None:
    policy = RetryPolicy(retries=10, base_s=1, cap_s=100, rng=lambda: 0.0)
    assert [policy.delay_for(err(), n) for n in range(4)] == [0.5, 1.0, 2.0, 4.0]
    policy = RetryPolicy(retries=40, base_s=1, cap_s=10, rng=lambda: 1.0)
    assert [policy.delay_for(err(), n) for n in range(4)] == [1.0, 2.0, 4.0, 8.0]
    assert policy.delay_for(err(), 30) == 10


def test_policy_classifies() -> None:
    policy = RetryPolicy(retries=2, base_s=1, cap_s=10, rng=lambda: 0.0)
    assert policy.delay_for(err("server_error"), 0) == 0.5
    assert policy.delay_for(err("server_error"), 2) is None  # retries used up
    assert policy.delay_for(err("bad_request"), 0) is None
    assert policy.delay_for(err("auth"), 0) is None
    assert policy.delay_for(err("rate_limit", retry_after_s=3.0), 0) == 3.0
    assert policy.delay_for(err("rate_limit", retry_after_s=30.0), 0) is None  # > cap
    assert policy.delay_for(err("rate_limit", retryable=False), 0) is None  # quota


def test_retry_after_gets_bounded_jitter() -> None:
    policy = RetryPolicy(retries=1, base_s=1, cap_s=10, rng=lambda: 1.0)
    assert policy.delay_for(err("rate_limit", retry_after_s=2.0), 0) == pytest.approx(2.2)


def test_breaker_opens_half_opens_and_closes() -> None:
    breaker = CircuitBreaker("groq", failures=2, reset_s=10)
    assert breaker.allow(0)
    breaker.record_failure(err(), now=1, after_output=False)
    assert breaker.state is BreakerState.CLOSED
    breaker.record_failure(err(), now=2, after_output=False)
    assert breaker.state.name == "OPEN"
    assert not breaker.allow(5)
    assert breaker.allow(12)  # one trial after reset_s
    assert breaker.state.name == "HALF_OPEN"
    assert not breaker.allow(12.5)  # only one: others skip while it runs
    # The trial failed: open again.
    breaker.record_failure(err("timeout"), now=12, after_output=False)
    assert breaker.state.name == "OPEN" and not breaker.allow(13)
    assert breaker.allow(23)
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED and breaker.failures == 0


def test_an_answer_ends_a_run_of_refusals_but_not_a_run_of_breaks() -> None:
    breaker = CircuitBreaker("openai", failures=3, reset_s=10)
    for now in range(5):  # refused, refused, answered, ...: never 3 refusals in a row
        breaker.record_failure(err(), now=now, after_output=False)
        breaker.record_failure(err(), now=now, after_output=False)
        breaker.record_answered()
    assert breaker.state is BreakerState.CLOSED
    # A provider that answers and then drops every stream is failing all the same.
    for now in range(3):
        breaker.record_answered()
        breaker.record_failure(err("connection_lost"), now=10 + now, after_output=True)
    assert breaker.state.name == "OPEN"


def test_only_a_completed_stream_closes_a_half_open_breaker() -> None:
    breaker = CircuitBreaker("openai", failures=1, reset_s=10)
    breaker.record_failure(err(), now=0, after_output=False)
    assert breaker.allow(10) and breaker.state.name == "HALF_OPEN"
    breaker.record_answered()  # the trial's first token: not yet a success
    assert breaker.state.name == "HALF_OPEN" and not breaker.allow(11)
    breaker.record_failure(err("connection_lost"), now=12, after_output=True)
    assert breaker.state.name == "OPEN"
    assert breaker.allow(22)
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED


def test_breaker_ignores_our_own_mistakes() -> None:
    breaker = CircuitBreaker("openai", failures=1, reset_s=10)
    breaker.record_failure(err("bad_request"), now=0, after_output=False)
    breaker.record_failure(err("auth"), now=0, after_output=False)
    assert breaker.state is BreakerState.CLOSED
    breaker.record_failure(err("rate_limit"), now=0, after_output=False)
    assert breaker.state.name == "OPEN"


def test_settings_parsers() -> None:
    assert parse_fallbacks(" openai , groq,") == ["openai", "groq"]
    assert parse_model_map("openai:gpt-4o-mini, groq:llama-3.3-70b-versatile") == {
        "openai": "gpt-4o-mini",
        "groq": "llama-3.3-70b-versatile",
    }
    with pytest.raises(ConfigError):
        parse_fallbacks("anthropic")
    with pytest.raises(ConfigError):
        parse_model_map("openai=gpt")


def test_usage_estimate_and_combination() -> None:
    estimate = estimate_usage([{"role": "user", "content": "x" * 40}], 7)
    assert estimate == {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17}
    real = {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30, "x": 1}
    assert combine_usage([(real, False)]) == (real, False)
    assert combine_usage([]) == (None, False)
    assert combine_usage([(estimate, True), (real, False)]) == (
        {"prompt_tokens": 20, "completion_tokens": 27, "total_tokens": 47},
        True,
    )


def test_breaker_replaces_a_trial_that_never_reported() -> None:
    breaker = CircuitBreaker("groq", failures=1, reset_s=10)
    breaker.record_failure(err(), now=0, after_output=False)
    assert breaker.allow(10)  # the trial starts, and its consumer goes away
    assert not breaker.allow(15)
    assert breaker.allow(20)  # a new trial
