"""The queue half of the short soak: `kill -9` of a worker process while it streams;
another worker takes over and every request ends done with the exact transcript."""

from __future__ import annotations

import pytest

from bench.soak_queue import QueueSoakConfig, run_queue_soak

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(150)]


async def test_kill_9_mid_run_loses_no_request(database_url: str) -> None:
    config = QueueSoakConfig(requests=48, tokens=80, delay_ms=10, concurrency=16, timeout_s=100)
    report = await run_queue_soak(database_url, config)
    summary = {k: v for k, v in report.to_dict().items() if k != "lost"}
    assert report.lost == [], (report.lost[:10], summary)
    assert report.done_exact == 48, summary
    assert report.killed_exit_code == -9, summary
    # The kill really hit streams in flight, and they were finished by another worker.
    assert report.running_on_killed_worker > 0 and report.taken_over > 0, summary
