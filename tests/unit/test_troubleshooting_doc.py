"""docs/troubleshooting.md names only settings, error types and metrics that exist."""

from __future__ import annotations

import re
from pathlib import Path
from typing import get_args

from worker.config import settings_rows
from worker.errors import UpstreamErrorType
from worker.relay import metrics
from worker.relay.publisher import RATE_LIMIT_JOIN_CODES, RATE_LIMIT_MESSAGES
from worker.service import diagnosis

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "troubleshooting.md").read_text()
OUR_ENV = re.compile(r"\b(?:RELAY|SUPABASE|OPENAI|GROQ)_[A-Z0-9_]*[A-Z0-9]\b|\bDATABASE_URL\b")


def test_every_setting_named_exists() -> None:
    known = {env for env, _, _ in settings_rows()}
    named = set(OUR_ENV.findall(DOC))
    assert named, "the guide names no setting"
    assert named - known == set()


def test_every_upstream_error_type_has_a_row() -> None:
    for kind in get_args(UpstreamErrorType):
        assert f"| `{kind}` |" in DOC, kind
    assert "attempts_exhausted" in (ROOT / "worker" / "jobs" / "queries.sql").read_text()
    assert "`attempts_exhausted`" in DOC


def test_realtime_reasons_are_the_ones_the_publisher_reacts_to() -> None:
    for reason in (*RATE_LIMIT_MESSAGES, *RATE_LIMIT_JOIN_CODES):
        assert reason in DOC, reason


def test_metrics_and_checks_named_exist() -> None:
    for name in re.findall(r"`(relay_[a-z_]+_total)", DOC):
        assert any(
            getattr(m, "_name", "") + "_total" == name or getattr(m, "_name", "") == name
            for m in vars(metrics).values()
        ), name
    checks = {v for k, v in vars(diagnosis).items() if k.startswith("CHECK_")}
    for name in re.findall(r"^\| `([a-z_]+)` \| ", DOC.split("## Where an error shows")[0], re.M):
        assert name in checks, name
