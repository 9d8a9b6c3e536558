"""`llm-relay once`: placeholder until its issue lands it."""

from __future__ import annotations

import argparse
import sys

from worker.cli import Command
from worker.config import Settings


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def _run(args: argparse.Namespace, settings: Settings) -> int:
    print("llm-relay once: not built yet", file=sys.stderr)
    return 1


COMMAND = Command("once", "Relay one generation directly (no queue)", _add_arguments, _run)
