"""The CLI imports only the command it runs; a command it cannot import says how to
get it, and a broken module of ours is never disguised as a missing extra."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import EntryPoint

import pytest

from worker.cli import ENTRY_POINT_GROUP, Command, Unavailable, command_name, load_command

HEAVY = ("devstack", "devstack.demo", "devstack.stack", "aiohttp", "pgserver")


def imported_after(argv: list[str]) -> list[str]:
    """The heavy modules a fresh interpreter holds after `llm-relay <argv>`."""
    code = (
        "import json, sys\n"
        "from worker.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("name", ["run", "once", "watch", "probe", "submit"])
def test_a_worker_command_does_not_import_the_devstack(name: str) -> None:
    assert imported_after(["--log-level", "DEBUG", name, "--help"]) == []


def test_the_demo_imports_what_it_needs_when_it_runs() -> None:
    assert "aiohttp" in imported_after(["demo", "--help"])


def test_the_command_name_skips_global_options() -> None:
    assert command_name(["--log-level", "INFO", "--log-json", "run", "--concurrency", "2"]) == "run"
    assert command_name(["--log-level=INFO", "probe"]) == "probe"
    assert command_name(["--help"]) is None


def test_a_missing_dependency_makes_the_command_unavailable_with_the_fix() -> None:
    ep = EntryPoint("ghost", "llm_relay_no_such_module:COMMAND", ENTRY_POINT_GROUP)
    loaded = load_command(ep)
    assert isinstance(loaded, Unavailable)
    assert "'llm_relay_no_such_module'" in loaded.reason and "install" in loaded.reason


def test_a_broken_module_of_ours_is_not_called_a_missing_extra() -> None:
    ep = EntryPoint("broken", "worker.no_such_module:COMMAND", ENTRY_POINT_GROUP)
    with pytest.raises(ModuleNotFoundError):
        load_command(ep)


def test_registered_commands_load_as_commands() -> None:
    ep = EntryPoint("run", "worker.service.run:COMMAND", ENTRY_POINT_GROUP)
    assert isinstance(load_command(ep), Command)
