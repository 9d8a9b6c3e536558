"""The real stream runner: upstream client -> relay_stream -> publisher.

Interim: the upstream client and the relay land on main separately; until they
are wired here, `build_runner` refuses to start rather than pretend.
"""

from __future__ import annotations

from worker.config import Settings
from worker.errors import ConfigError
from worker.service.context import StreamRunner


def build_runner(settings: Settings, **options: str) -> StreamRunner:
    raise ConfigError(
        "the relay stream runner is not wired in this build yet; "
        "use --runner worker.service.testing:scripted for a dry run"
    )
