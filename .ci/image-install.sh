#!/bin/sh
# The image's install step (the Dockerfile's RUN), kept as a script so that it runs
# outside Docker too: tests/e2e/test_plain_install.py replays the Dockerfile's COPY
# lines into a fresh directory and runs this there, in a fresh venv, then relays a
# request through that install's `llm-relay run`. It builds the wheel from the copied
# sources and installs it with the worker's own dependencies only: no extras.
set -eu
python -m pip install --disable-pip-version-check .
