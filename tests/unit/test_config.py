from pathlib import Path

import pytest
from pydantic import ValidationError

from worker.config import Settings, render_env_example, render_markdown_table

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_match_the_product_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT / "tests")  # no .env here
    s = Settings()
    assert s.relay_batch_size == 20
    assert s.relay_max_flush_retries == 3
    assert s.relay_retry_base_ms == 100
    assert s.relay_retry_cap_s == 15
    assert s.topic_for("abc") == "llm-token:abc"


def test_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_BATCH_SIZE", "7")
    monkeypatch.setenv("SUPABASE_URL", "http://example.test:1234/")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    s = Settings()
    assert s.relay_batch_size == 7
    assert s.realtime_url == "http://example.test:1234/realtime/v1"
    assert s.openai_api_key is not None
    assert "sk-test" not in repr(s)  # secrets never print


def test_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_BATCH_SIZE", "0")
    with pytest.raises(ValidationError):
        Settings()
    monkeypatch.setenv("RELAY_BATCH_SIZE", "5")
    monkeypatch.setenv("RELAY_TOPIC_TEMPLATE", "no-placeholder")
    with pytest.raises(ValidationError):
        Settings()


def test_env_example_lists_every_setting() -> None:
    """`.env.example` is generated from Settings; regenerate it when this fails:
    `python -m worker.config --env-example > .env.example`."""
    assert (ROOT / ".env.example").read_text() == render_env_example()


def test_readme_configuration_table_is_generated_from_settings() -> None:
    """Regenerate with `python -m worker.config --readme` when this fails."""
    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- settings:start -->\n", "<!-- settings:end -->"
    table = readme.split(start, 1)[1].split(end, 1)[0]
    assert table.strip() == render_markdown_table().strip()


def test_a_provider_is_configured_by_a_key_or_by_a_base_url_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert not Settings().provider_configured("openai")
    assert not Settings().provider_configured("groq")
    # A local OpenAI-compatible server (Ollama, vLLM, llama.cpp) often takes no key.
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:11434/v1")
    monkeypatch.setenv("GROQ_API_KEY", "gsk-test")
    settings = Settings()
    assert settings.provider_configured("openai") and settings.api_key_for("openai") is None
    assert settings.provider_configured("groq")
    # a copy made by a CLI override keeps what the environment set
    assert settings.model_copy(update={"relay_concurrency": 2}).provider_configured("openai")
