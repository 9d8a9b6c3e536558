"""Which provider `llm-relay demo` hands its worker: the one `llm-relay run` would use."""

from __future__ import annotations

from pathlib import Path

import pytest

from devstack import stack as stack_module
from devstack.demo import choose_upstream
from devstack.stack import SIMULATED_API_KEY
from worker.config import Settings
from worker.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

SIMULATOR = {
    "OPENAI_BASE_URL": "http://127.0.0.1:40001/v1",
    "OPENAI_API_KEY": SIMULATED_API_KEY,
    "RELAY_PROVIDER": "openai",
}


def settings(**env: str) -> Settings:
    return Settings(_env_file=None, **env)  # type: ignore[arg-type]


def test_nothing_configured_uses_the_stacks_simulator() -> None:
    upstream = choose_upstream(settings(), SIMULATOR)
    assert upstream.env == SIMULATOR
    assert upstream.label.startswith("simulated OpenAI at http://127.0.0.1:40001/v1")


def test_a_base_url_alone_configures_a_keyless_local_server() -> None:
    upstream = choose_upstream(settings(OPENAI_BASE_URL="http://127.0.0.1:11434/v1"), SIMULATOR)
    assert upstream.env == {"RELAY_PROVIDER": "openai"}  # its own URL, from the environment
    assert upstream.label == (
        "OpenAI-compatible server at http://127.0.0.1:11434/v1 (model gpt-4o-mini, no API key)"
    )


def test_a_real_key_keeps_the_default_url_and_says_so() -> None:
    upstream = choose_upstream(settings(OPENAI_API_KEY="sk-real"), SIMULATOR)
    assert upstream.env == {"RELAY_PROVIDER": "openai"}
    assert upstream.label.startswith("OpenAI at https://api.openai.com/v1 (")
    assert "API key set" in upstream.label and "sk-real" not in upstream.label


def test_groq_alone_is_chosen_and_relay_provider_names_it_for_the_worker() -> None:
    upstream = choose_upstream(settings(GROQ_API_KEY="gsk-real"), SIMULATOR)
    assert upstream.env == {"RELAY_PROVIDER": "groq"}
    assert upstream.label.startswith("Groq at https://api.groq.com/openai/v1 (model llama")


def test_relay_provider_decides_over_the_first_configured() -> None:
    both = settings(OPENAI_API_KEY="sk-real", GROQ_API_KEY="gsk-real", RELAY_PROVIDER="groq")
    assert choose_upstream(both, SIMULATOR).env == {"RELAY_PROVIDER": "groq"}


def test_relay_provider_naming_an_unconfigured_provider_falls_back_and_says_why() -> None:
    upstream = choose_upstream(settings(RELAY_PROVIDER="groq"), SIMULATOR)
    assert upstream.env == SIMULATOR
    assert "(RELAY_PROVIDER=groq has no GROQ_API_KEY or GROQ_BASE_URL)" in upstream.label


def test_a_copy_of_env_example_configures_no_provider(tmp_path: Path) -> None:
    # Every line present with its default: empty keys, the public URLs, RELAY_PROVIDER.
    env_file = tmp_path / ".env"
    env_file.write_text((ROOT / ".env.example").read_text())
    copied = Settings(_env_file=env_file)
    assert copied.openai_api_key is None  # an empty line means "not set"
    assert copied.relay_openai_idle_timeout_s is None  # not a number it cannot parse
    assert not copied.provider_configured("openai") and not copied.provider_configured("groq")
    assert choose_upstream(copied, SIMULATOR).env == SIMULATOR


def test_leftover_devstack_lines_in_env_mean_this_stacks_simulator() -> None:
    # `llm-relay devstack > .env` wrote another stack's simulator: not a provider.
    leftover = settings(
        OPENAI_BASE_URL="http://127.0.0.1:54329/v1", OPENAI_API_KEY=SIMULATED_API_KEY
    )
    assert choose_upstream(leftover, SIMULATOR).env == SIMULATOR


def test_the_stack_refuses_to_start_without_its_page_and_migrations(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # What a wheel install would see: no examples/frontend, no supabase/migrations.
    monkeypatch.setattr(stack_module, "FRONTEND_DIR", tmp_path / "frontend")
    monkeypatch.setattr(stack_module, "MIGRATIONS_DIR", tmp_path / "migrations")
    with pytest.raises(ConfigError, match=r"clone of the repository.*make demo") as refused:
        stack_module.DevStack().check_sources()
    assert "demo.html" in refused.value.message and "migrations" in refused.value.message


def test_the_checkout_has_what_the_stack_serves() -> None:
    stack_module.DevStack().check_sources()
