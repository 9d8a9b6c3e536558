"""The doctor's pure core: judges, the expected schema against the migrations, the report."""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest
from pydantic import SecretStr

from devstack.jwt import api_key
from worker.config import Settings
from worker.service import diagnosis as d
from worker.service.doctor import DoctorTimeouts, bounded_deadlines, check_settings, secrets_of

MIGRATIONS = Path(__file__).resolve().parents[2] / "supabase" / "migrations"


def _strip_comments(text: str) -> str:
    return re.sub(r"--[^\n]*", "", text)


def schema_of_migrations() -> set[d.SchemaObject]:
    """What supabase/migrations create (and do not drop again), read from their SQL."""
    objects: set[d.SchemaObject] = set()
    for path in sorted(MIGRATIONS.glob("*.sql")):
        text = _strip_comments(path.read_text())
        for schema, name in re.findall(r"CREATE TABLE (?:IF NOT EXISTS )?(\w+)\.(\w+)", text):
            objects.add(d.SchemaObject("table", schema, name))
        for schema, name in re.findall(r"ALTER TABLE (\w+)\.(\w+) ENABLE ROW LEVEL SECURITY", text):
            objects.add(d.SchemaObject("rls", schema, name))
        for name, schema, table in re.findall(r"CREATE POLICY (\w+) ON (\w+)\.(\w+)", text):
            objects.add(d.SchemaObject("policy", schema, name, table))
        for name, schema, table in re.findall(
            r"CREATE (?:OR REPLACE )?TRIGGER (\w+)\s+"
            r"(?:BEFORE|AFTER|INSTEAD OF)[^;]*?\bON (\w+)\.(\w+)",
            text,
        ):
            objects.add(d.SchemaObject("trigger", schema, name, table))
        for schema, name in re.findall(r"CREATE (?:OR REPLACE )?FUNCTION (\w+)\.(\w+)", text):
            objects.add(d.SchemaObject("function", schema, name))
        for name, schema, table in re.findall(
            r"DROP (?:POLICY|TRIGGER) (?:IF EXISTS )?(\w+) ON (\w+)\.(\w+)", text
        ):
            objects -= {o for o in objects if (o.name, o.schema, o.on) == (name, schema, table)}
        for schema, name in re.findall(r"DROP FUNCTION (?:IF EXISTS )?(\w+)\.(\w+)", text):
            objects.discard(d.SchemaObject("function", schema, name))
    return objects


def test_expected_schema_is_what_the_migrations_create() -> None:
    assert schema_of_migrations() == set(d.EXPECTED_SCHEMA)


def test_migrations_judge_names_what_is_missing() -> None:
    present = [o for o in d.EXPECTED_SCHEMA if o.name != "cancel_llm_request"]
    result = d.judge_migrations(present, error=None, realtime_schema=True)
    assert not result.ok
    assert result.detail == "missing: function public.cancel_llm_request"
    assert d.judge_migrations(d.EXPECTED_SCHEMA, error=None, realtime_schema=True).ok
    bare = d.judge_migrations([], error=None, realtime_schema=False)
    assert "no `realtime` schema" in bare.cause and "and 12 more" in bare.detail


@pytest.mark.parametrize(
    ("url", "kind", "port"),
    [
        ("postgresql://postgres:pw@db.abcd.supabase.co:5432/postgres", "direct", 5432),
        (
            "postgresql://postgres.abcd:pw@aws-0-eu-central-1.pooler.supabase.com:5432/postgres",
            "supavisor_session",
            5432,
        ),
        (
            "postgresql://postgres.abcd:pw@aws-0-eu-central-1.pooler.supabase.com:6543/postgres",
            "supavisor_transaction",
            6543,
        ),
        ("postgres://u:p@10.0.0.5:6543/app", "supavisor_transaction", 6543),
        ("postgresql://postgres:@/postgres?host=/tmp/pg", "direct", 5432),
        ("postgresql://u@pgbouncer.internal:6432/app", "unknown", 6432),
    ],
)
def test_database_url_classification(url: str, kind: str, port: int) -> None:
    target = d.classify_database_url(url)
    assert (target.kind, target.port) == (kind, port)
    assert "pw" not in target.where


def test_transaction_pooler_fails_even_when_a_notify_happens_to_arrive() -> None:
    target = d.classify_database_url("postgresql://u:p@x.pooler.supabase.com:6543/postgres")
    result = d.judge_database_mode(target, error=None, notified=True)
    assert not result.ok and "transaction pooler" in result.detail and "6543" in result.fix


def test_lost_notify_names_a_transaction_pooler() -> None:
    target = d.classify_database_url("postgresql://u@pgbouncer.internal:6432/app")
    result = d.judge_database_mode(target, error=None, notified=False)
    assert not result.ok and "pgbouncer" in result.cause
    assert d.judge_database_mode(target, error=None, notified=True).ok


def test_settings_judge_catches_swapped_keys() -> None:
    result = d.judge_settings(
        error=None,
        service_role_key=True,
        database_url=True,
        provider_keys={"openai": True},
        key_roles={"SUPABASE_SERVICE_ROLE_KEY": "anon", "SUPABASE_ANON_KEY": "service_role"},
    )
    assert not result.ok and "SUPABASE_SERVICE_ROLE_KEY has role 'anon'" in result.detail
    missing = d.judge_settings(
        error=None,
        service_role_key=True,
        database_url=False,
        provider_keys={"openai": True, "groq": False},
        key_roles={},
    )
    assert missing.detail == (
        "not set: DATABASE_URL, GROQ_API_KEY (or GROQ_BASE_URL for a server that takes no key)"
    )


def test_realtime_refusals_map_to_their_cause() -> None:
    bad = d.judge_realtime("u", d.Upgrade(False, 401, "Failed to validate JWT signature"))
    assert not bad.ok and "another project" in bad.cause
    assert d.judge_realtime("u", d.Upgrade(True)).ok


def test_private_only_needs_an_unauthorized_refusal() -> None:
    refused = d.Join(False, "Unauthorized: You do not have permissions to read from this")
    assert d.judge_private_only("t", refused, d.Join(True), anon_key=True).ok
    joined = d.judge_private_only("t", d.Join(True), None, anon_key=True)
    assert not joined.ok and "anon" in joined.cause
    other = d.judge_private_only(
        "t", d.Join(False, "ClientJoinRateLimitReached: x"), None, anon_key=True
    )
    assert not other.ok
    assert not d.judge_private_only("t", None, None, anon_key=False).ok
    private_only = d.judge_private_only(
        "t",
        refused,
        d.Join(False, "PrivateOnly: This project only allows private channels"),
        anon_key=True,
    )
    assert private_only.ok and "public channels refused" in private_only.detail


def test_rest_202_without_delivery_is_a_silent_drop() -> None:
    assert d.judge_rest("u", status=202, body="", delivered=True).ok
    dropped = d.judge_rest("u", status=202, body="", delivered=False)
    assert not dropped.ok and "silently" in dropped.cause
    assert not d.judge_rest("u", status=401, body='{"message":"Unauthorized"}', delivered=None).ok


def test_provider_judge_reads_the_probe_contract() -> None:
    ok = {"outcome": "ok", "model": "m", "http_status": 200, "timings": {"first_token_s": 0.1}}
    assert d.judge_provider("openai", ok).ok
    auth = {
        "outcome": "upstream_error",
        "model": "m",
        "http_status": 401,
        "error": {"type": "auth", "message": "Incorrect API key"},
    }
    result = d.judge_provider("groq", auth)
    assert result.name == "provider:groq" and not result.ok and "GROQ_API_KEY" in result.fix


def test_report_renders_one_line_per_check_and_hints_only_on_failure() -> None:
    report = d.Report(
        [
            d.passed("a", "fine"),
            d.failed("b", "broken", cause="because", fix="do this"),
        ]
    )
    text = d.render_text(report).splitlines()
    assert text == [
        "✓ a: fine",
        "✗ b: broken",
        "    likely cause: because",
        "    fix: do this",
        "1 of 2 checks failed",
    ]
    assert orjson.loads(d.render_json(report)) == {
        "ok": False,
        "checks": [
            {"name": "a", "ok": True, "detail": "fine"},
            {"name": "b", "ok": False, "detail": "broken"},
        ],
    }
    assert report.exit_code == 1
    assert d.Report([d.passed("a", "fine")]).exit_code == 0


def test_redaction_removes_secrets_and_joins_lines() -> None:
    report = d.Report([d.failed("x", "url ws://h/?apikey=SECRET-KEY\n\tmore", cause="", fix="")])
    cleaned = report.redacted(["SECRET-KEY", ""])
    assert cleaned.checks[0].detail == "url ws://h/?apikey=*** more"


def test_provider_deadlines_are_capped_for_the_check_never_raised() -> None:
    settings = Settings(RELAY_FIRST_TOKEN_TIMEOUT_S=180, RELAY_CONNECT_TIMEOUT_S=2)
    bounded = bounded_deadlines(settings, DoctorTimeouts(provider_s=12))
    assert bounded.relay_first_token_timeout_s == 8.0
    assert bounded.relay_connect_timeout_s == 2.0
    assert bounded.relay_total_timeout_s == 12.0
    assert bounded.relay_idle_timeout_s == 10.0


def test_settings_check_reads_the_keys_roles_and_never_shows_them() -> None:
    anon, service = api_key("anon"), api_key("service_role")
    swapped = Settings(
        SUPABASE_SERVICE_ROLE_KEY=anon,
        SUPABASE_ANON_KEY=service,
        DATABASE_URL="postgresql://u:hunter22@h/db",
        OPENAI_API_KEY="sk-x",
    )
    result, providers = check_settings(swapped)
    assert providers == ["openai"]
    assert not result.ok and "SUPABASE_SERVICE_ROLE_KEY has role 'anon'" in result.detail
    assert set(secrets_of(swapped)) == {anon, service, "sk-x", "hunter22"}
    fine = swapped.model_copy(
        update={
            "supabase_service_role_key": SecretStr(service),
            "supabase_anon_key": SecretStr(anon),
        }
    )
    assert check_settings(fine)[0].ok
    keyless = Settings(
        SUPABASE_SERVICE_ROLE_KEY=service,
        DATABASE_URL="postgresql://u@h/db",
        OPENAI_BASE_URL="http://127.0.0.1:11434/v1",
    )
    assert check_settings(keyless)[0].ok
    assert not check_settings(Settings(SUPABASE_SERVICE_ROLE_KEY=service, DATABASE_URL="x"))[0].ok


def test_public_worker_channels_fail_the_private_only_check() -> None:
    result = d.worker_channels_public()
    assert result.name == d.CHECK_PRIVATE_ONLY and not result.ok
    refused = d.judge_private_join(
        "t", d.Join(False, "PrivateOnly: This project only allows private channels"), private=False
    )
    assert not refused.ok and "RELAY_PRIVATE_CHANNELS=true" in refused.fix
    assert "public topic" in d.judge_private_join("t", d.Join(True), private=False).detail
