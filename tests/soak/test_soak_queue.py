"""The queue half of the short soak, through the real worker: `llm-relay run` processes
(real runner) relay to the local Realtime server through the fault proxy, with ack
faults, upstream 429s and resets; one worker is killed with SIGKILL while it streams,
another takes over. The upstream continues in its own words (as a real model does), so
a continued or taken-over transcript differs from the upstream's text: every request
must end done with its row equal to its write-ahead token log, and every independent
subscriber (live messages plus catch-up reads of the log) must have exactly the stored
transcript, with no offset ever broadcast with two different tokens and no gap left."""

from __future__ import annotations

import pytest

from bench.soak_queue import QueueSoakConfig, run_queue_soak

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.timeout(150),
]


async def test_kill_9_mid_run_loses_no_request_and_every_stream_is_exact(
    database_url: str,
) -> None:
    config = QueueSoakConfig(requests=40, tokens=100, concurrency=16, timeout_s=100, real=True)
    report = await run_queue_soak(database_url, config)
    summary = {k: v for k, v in report.to_dict().items() if k not in ("lost", "config")}
    assert report.lost == [], (report.lost[:10], summary)
    assert report.subscriber_not_exact == [], (report.subscriber_not_exact[:10], summary)
    assert report.done_exact == 40, summary
    assert report.subscriber_exact_live + report.subscriber_exact_after_catch_up == 40, summary
    assert report.conflicting_offsets == 0 and report.gaps_left == 0, summary
    # The own-words continuations really happened (after the kill and the resets).
    assert report.continued_in_own_words > 0, summary
    # The chaos really happened: the kill hit streams in flight, another worker finished
    # them, the proxy cut connections, the server and the upstream injected faults.
    assert report.killed_exit_code == -9, summary
    assert report.running_on_killed_worker > 0 and report.taken_over > 0, summary
    assert report.proxy_cuts > 0 and sum(report.server_ack_faults.values()) > 0, summary
    assert report.upstream_requests > 40, summary
