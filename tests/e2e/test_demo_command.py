"""`llm-relay demo --once` runs the whole path (queue, worker process, private topic) and
shows the text an independent subscriber received, equal to the stored transcript."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from devstack.demo import DEMO_TEXT
from tests.conftest import env_without_ours

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_demo_once_streams_exact_text_to_a_subscriber() -> None:
    env = env_without_ours()
    # As root without a login session (CI, a container): platformdirs would warn here.
    env.pop("XDG_RUNTIME_DIR", None)
    with tempfile.TemporaryDirectory(prefix="llm-relay-demo-") as data_dir:
        proc = subprocess.run(
            [
                *(sys.executable, "-m", "worker", "demo", "--once", "--port", "0"),
                *("--upstream-port", "0", "--tokens-per-second", "400", "--data-dir", data_dir),
            ],
            cwd=data_dir,  # no .env there
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr, proc.stderr  # a first screen without noise
    out = proc.stdout
    assert DEMO_TEXT.strip() in out  # the answer, as the subscriber reassembled it
    assert "exact (llm-done checksum)   yes" in out
    assert "stored transcript = screen  yes" in out
    assert "request status              done" in out


def test_ctrl_c_right_after_the_demo_says_so_stops_it_cleanly() -> None:
    """The page's "Ctrl-C stops" line came before the signal handlers: a Ctrl-C in
    between was a KeyboardInterrupt and exit 130, the worker left to its grace period."""
    env = env_without_ours()
    env.pop("XDG_RUNTIME_DIR", None)
    with tempfile.TemporaryDirectory(prefix="llm-relay-demo-") as data_dir:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "worker", "demo", "--no-prompt", "--port", "0"),
                *("--upstream-port", "0", "--tokens-per-second", "400", "--data-dir", data_dir),
            ],
            cwd=data_dir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:  # bounded by the demo's own 60 s readiness wait
                if "Ctrl-C stops" in line:
                    proc.send_signal(signal.SIGINT)  # at once, as an impatient user would
                    break
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err[-3000:]
