"""`llm-relay probe`: placeholder until its issue lands it."""

from __future__ import annotations

import argparse
import sys

from worker.cli import Command
from worker.config import Settings


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def _run(args: argparse.Namespace, settings: Settings) -> int:
    print("llm-relay probe: not built yet", file=sys.stderr)
    return 1


COMMAND = Command("probe", "Stream one completion and print a JSON summary", _add_arguments, _run)
