"""Rate counter math, token checks and fault scheduling of the local Realtime server."""

from __future__ import annotations

import time

import pytest

from devstack.jwt import sign
from devstack.realtime.faults import AckOutcome, Faults
from devstack.realtime.ratecounter import RateCounter
from devstack.realtime.server import tenant_id_from_host
from devstack.realtime.tokens import TokenError, TokenProblem, verify_token

SECRET = "s" * 40


def test_no_bucket_means_zero_average() -> None:
    counter = RateCounter(limit=1)
    counter.add(1000)
    assert counter.avg == 0.0 and not counter.triggered


def test_average_is_sum_over_buckets_over_five() -> None:
    counter = RateCounter(limit=100)
    for n in (50, 150, 100):
        counter.add(n)
        counter.tick()
    assert counter.avg == pytest.approx(300 / 3 / 5)


def test_triggered_at_the_limit_and_cleared_below() -> None:
    counter = RateCounter(limit=2)
    counter.add(10)
    assert counter.tick() is True
    assert counter.times_triggered == 1
    counter.add(9)
    assert counter.tick() is False  # (10 + 9) / 2 buckets / 5 s = 1.9 < 2
    assert counter.avg == pytest.approx(1.9)
    counter.add(11)
    assert counter.tick() is True  # 30 / 3 / 5 = 2.0
    assert counter.times_triggered == 2


def test_only_twelve_buckets_are_kept() -> None:
    counter = RateCounter(limit=1000)
    for n in range(20):
        counter.add(n)
        counter.tick()
    assert list(counter.buckets) == list(range(8, 20))


@pytest.mark.parametrize(
    ("host", "tenant"),
    [
        ("proj.supabase.co", "proj"),
        ("proj.supabase.co:443", "proj"),
        ("127.0.0.1:54321", "127"),
        ("localhost", "localhost"),
    ],
)
def test_tenant_from_host(host: str, tenant: str) -> None:
    assert tenant_id_from_host(host) == tenant


def test_verify_token_problems() -> None:
    now = time.time()
    assert (
        verify_token(sign({"role": "anon", "exp": now + 60}, SECRET), SECRET, now)["role"] == "anon"
    )
    cases = [
        (None, TokenProblem.MISSING),
        ("", TokenProblem.MISSING),
        ("abc", TokenProblem.MALFORMED),
        (sign({"role": "anon", "exp": now + 60}, "t" * 40), TokenProblem.SIGNATURE),
        (sign({"role": "anon"}, SECRET), TokenProblem.CLAIMS),
        (sign({"exp": now + 60}, SECRET), TokenProblem.CLAIMS),
        (sign({"role": "anon", "exp": now - 42}, SECRET), TokenProblem.EXPIRED),
    ]
    for token, problem in cases:
        with pytest.raises(TokenError) as err:
            verify_token(token, SECRET, now)
        assert err.value.problem is problem
    with pytest.raises(TokenError) as expired:
        verify_token(sign({"role": "anon", "exp": int(now) - 42}, SECRET), SECRET, now)
    assert expired.value.expired_s_ago in (42, 43)
    assert expired.value.join_reason().startswith("InvalidJWTToken: Token has expired 4")
    assert expired.value.upgrade_message() == "Token has expired"


def test_scripted_outcomes_come_first_then_shares() -> None:
    faults = Faults()
    faults.script_acks("reject", AckOutcome.DELAY)
    faults.ack_shares(drop=1.0)
    assert [faults.next_ack_outcome() for _ in range(3)] == [
        AckOutcome.REJECT,
        AckOutcome.DELAY,
        AckOutcome.DROP,
    ]
    faults.clear()
    assert faults.next_ack_outcome() is AckOutcome.OK


def test_upgrade_refusals_count_down() -> None:
    faults = Faults(refuse_upgrades=2)
    assert [faults.take_upgrade_refusal() for _ in range(3)] == [True, True, False]
    faults.refuse_upgrades = -1
    assert all(faults.take_upgrade_refusal() for _ in range(5))
