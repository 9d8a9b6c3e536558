"""The relay refuses a recovery mode its contract cannot express, at start-up."""

import pytest

from worker.config import Settings
from worker.errors import ConfigError
from worker.relay.stream import check_relay_settings
from worker.service.runner import build_runner


def test_restart_recovery_is_refused_before_any_stream() -> None:
    settings = Settings(_env_file=None, relay_midstream_recovery="restart")
    with pytest.raises(ConfigError, match="restart"):
        check_relay_settings(settings)
    with pytest.raises(ConfigError, match="restart"):
        build_runner(settings)


@pytest.mark.parametrize("mode", ["stop", "continue"])
def test_stop_and_continue_are_accepted(mode: str) -> None:
    check_relay_settings(Settings(_env_file=None, relay_midstream_recovery=mode))
