"""Small pure parts of the publisher's shells: server reason strings, the key check."""

from __future__ import annotations

import pytest

from worker.config import Settings
from worker.errors import ConfigError
from worker.relay.link import reason_of
from worker.relay.publisher import Publisher


@pytest.mark.parametrize(
    ("err", "reason"),
    [
        (None, ""),
        (Exception('{"reason": "Unauthorized: nope"}'), "Unauthorized: nope"),
        (Exception('{"message": "Too many messages per second"}'), "Too many messages per second"),
        (Exception("received 1011 (internal error)"), "received 1011 (internal error)"),
        (
            Exception('{"reason": "ChannelRateLimitReached: Too many channels"}'),
            "ChannelRateLimitReached: Too many channels",
        ),
    ],
)
def test_reason_of(err: Exception | None, reason: str) -> None:
    assert reason_of(err) == reason


def test_publisher_needs_a_key() -> None:
    with pytest.raises(ConfigError):
        Publisher(Settings(supabase_service_role_key=None))


def test_a_new_publisher_is_not_behind_and_flushes_at_the_budget_share() -> None:
    settings = Settings(supabase_service_role_key="k", relay_messages_per_second=100.0)
    pub = Publisher(settings)
    assert not pub.behind and pub.lag_s == 0.0 and pub.links == 0
    # 100 msg/s x 0.8 utilisation / 2 (one subscriber each) x 0.9 headroom = 36 msg/s.
    assert pub.min_interval_s(0.0) == pytest.approx(1 / 36)


def test_a_late_loop_makes_streams_flush_less_often_and_the_worker_wait() -> None:
    settings = Settings(
        supabase_service_role_key="k", relay_messages_per_second=1e6, relay_max_lag_s=1.0
    )
    pub = Publisher(settings)
    quiet = pub.min_interval_s(0.0)
    pub.loop_lag_s = 0.1  # as measured by the loop-delay probe
    assert pub.min_interval_s(0.0) == pytest.approx(0.2) and quiet < 0.001
    # A stream the starved loop reads at 40 tokens/s flushes every 10 / 40 s: about ten
    # tokens per message however slow, so messages per token fall as load rises ...
    assert pub.min_interval_s(0.0, token_rate=40.0) == pytest.approx(0.25)
    # ... but never waits more than half the lag bound: that wait alone would break it.
    assert pub.min_interval_s(0.0, token_rate=4.0) == pytest.approx(0.5)
    pub.loop_lag_s = 0.0
    assert pub.min_interval_s(0.0, token_rate=0.5) == quiet  # no overload: no pacing
    pub.loop_lag_s = 5.0
    assert pub.min_interval_s(0.0) == pytest.approx(0.5)  # capped: latency stays bounded
    assert pub.behind and pub.lag_s == 5.0
    # The bound is the setting's: a worker allowed 4 s of lag batches up to 2 s.
    patient = Publisher(settings.model_copy(update={"relay_max_lag_s": 4.0}))
    patient.loop_lag_s = 5.0
    assert patient.min_interval_s(0.0) == pytest.approx(2.0)
