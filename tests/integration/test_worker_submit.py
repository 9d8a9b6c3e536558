"""`llm-relay submit` and `llm-relay run` as commands (subprocesses) on real Postgres."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from worker.config import Settings
from worker.errors import ConfigError
from worker.jobs import PostgresJobRepository
from worker.service.run import parse_options, run_worker
from worker.service.testing import ScriptedRunner, scripted_text
from worker.service.worker import Worker

pytestmark = pytest.mark.integration

USER_A = "6f1b1c1e-0000-4000-8000-00000000000a"
USER_B = "6f1b1c1e-0000-4000-8000-00000000000b"
TIMEOUT_S = 60.0


async def relay(
    cwd: Path, *args: str, database_url: str | None = None, **extra_env: str
) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"} | extra_env
    if database_url:
        env["DATABASE_URL"] = database_url
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        *args,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT_S)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_submit_inserts_as_the_user_and_cancel_asks_as_the_user(
    database_url: str, repo: PostgresJobRepository, tmp_path: Path
) -> None:
    code, out, err = await relay(
        tmp_path,
        "submit",
        "--user",
        USER_A,
        "--prompt",
        "hi",
        "--system",
        "be brief",
        "--max-tokens",
        "5",
        database_url=database_url,
    )
    assert code == 0, err
    printed = json.loads(out)
    assert printed["topic"] == f"llm-token:{printed['session_id']}"
    record = await repo.get(printed["id"])
    assert record is not None
    assert (record.owner, record.status, record.session_id) == (
        USER_A,
        "queued",
        printed["session_id"],
    )
    seen = await repo.get_as(USER_A, printed["id"])
    assert seen is not None and seen.id == printed["id"]

    code, out, err = await relay(
        tmp_path,
        "submit",
        "--user",
        USER_B,
        "--session",
        printed["session_id"],
        "--prompt",
        "mine now",
        database_url=database_url,
    )
    assert code == 1 and "belongs to another user" in err

    code, out, _ = await relay(
        tmp_path, "submit", "--user", USER_B, "--cancel", printed["id"], database_url=database_url
    )
    assert (code, json.loads(out)) == (1, {"id": printed["id"], "status": None})
    code, out, _ = await relay(
        tmp_path, "submit", "--user", USER_A, "--cancel", printed["id"], database_url=database_url
    )
    assert (code, json.loads(out)) == (0, {"id": printed["id"], "status": "cancelled"})


async def test_submit_wait_prints_the_finished_request(
    database_url: str, repo: PostgresJobRepository, tmp_path: Path
) -> None:
    settings = Settings(_env_file=None, database_url=database_url, relay_poll_interval_s=0.2)
    worker = Worker(repo, ScriptedRunner(tokens=12, delay_s=0.001), settings)
    running = asyncio.create_task(worker.run())
    try:
        code, out, err = await relay(
            tmp_path,
            "submit",
            "--user",
            USER_A,
            "--prompt",
            "hi",
            "--wait",
            database_url=database_url,
        )
    finally:
        worker.stop()
        await asyncio.wait_for(running, TIMEOUT_S)
    assert code == 0, err
    submitted, final = (json.loads(line) for line in out.splitlines())
    assert final["id"] == submitted["id"]
    assert (final["status"], final["content"], final["next_offset"]) == (
        "done",
        scripted_text(0, 12),
        12,
    )


async def test_run_refuses_bad_configuration(database_url: str, tmp_path: Path) -> None:
    code, _, err = await relay(tmp_path, "run")  # the CLI maps ConfigError to exit 2
    assert code == 2 and "DATABASE_URL" in err

    def settings(**values: Any) -> Settings:
        return Settings(_env_file=None, database_url=database_url, **values)

    with pytest.raises(ConfigError, match="cannot load the stream runner"):
        await run_worker(settings(), "no.such:thing", {})
    with pytest.raises(ConfigError, match="rejected its options"):
        await run_worker(settings(), "worker.service.testing:scripted", {"colour": "blue"})
    with pytest.raises(ConfigError, match="must exceed two RELAY_HEARTBEAT_INTERVAL_S"):
        await run_worker(
            settings(relay_lease_s=5, relay_heartbeat_interval_s=5),
            "worker.service.testing:scripted",
            {},
        )
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_options(["tokens"])
