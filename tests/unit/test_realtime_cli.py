"""`python -m devstack.realtime` options map onto RealtimeLimits and the server."""

from __future__ import annotations

from devstack.realtime.__main__ import build_parser, limits_from_args
from devstack.realtime.limits import RealtimeLimits


def test_defaults_are_the_free_plan() -> None:
    args = build_parser().parse_args([])
    assert limits_from_args(args) == RealtimeLimits()
    assert args.time_scale == 1.0 and args.database_url is None


def test_every_limit_is_an_option() -> None:
    args = build_parser().parse_args(
        ["--max-events-per-second", "500", "--max-channels-per-client", "3", "--private-only"]
    )
    limits = limits_from_args(args)
    assert limits.max_events_per_second == 500
    assert limits.max_channels_per_client == 3
    assert limits.private_only is True
