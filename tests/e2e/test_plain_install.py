"""What the image installs works: the wheel with no extras, in a fresh venv, relays a
queued request through that install's `llm-relay run`.

There is no Docker engine on this machine, so the test replays the Dockerfile instead
of building it: its COPY lines into a fresh directory, its install RUN line (the script
`.ci/image-install.sh`) with a fresh venv's python, its ENV lines on the worker, its
ENTRYPOINT + CMD as the worker's command, and its HEALTHCHECK command as the readiness
probe. A RUN line the test does not know fails it, so the image cannot drift from what
is tested. The local stack (Postgres, Realtime, PostgREST, upstream) runs from the test's
own .venv, as it would beside a real deployment.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from devstack import jwt
from devstack.stack import DevStack
from tests.conftest import env_without_ours, running_stack
from worker.config import Settings
from worker.jobs.models import NewRequest
from worker.jobs.postgres import PostgresJobRepository
from worker.relay.watch import Watcher
from worker.service.submit import wait_for_end

# A fresh venv and a pip install come first: more than the suite's 120 s may pass.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
INSTALL_RUN = "sh .ci/image-install.sh"
# RUN lines that install nothing the worker imports; the test cannot run them as root
# of a container, and says so here rather than skipping them silently.
NOT_REPLAYED = {"useradd --system relay"}
# Bounds for a cold venv on a busy 2-core machine (pip reads its cache and the registry).
VENV_S, INSTALL_S, STARTUP_S, RELAY_S = 120, 420, 60, 60
TEXT = "Relayed by the plain install: no extras, café 東京 🚀, exactly.\n"


@dataclass
class Image:
    """The Dockerfile, read as the steps the test replays."""

    workdir: str = "/"
    copies: list[tuple[list[str], str]] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    healthcheck: str = ""


def read_dockerfile(path: Path = DOCKERFILE) -> Image:
    image = Image()
    logical = path.read_text().replace("\\\n", " ")
    for line in logical.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        rest = rest.strip()
        match instruction.upper():
            case "WORKDIR":
                image.workdir = rest
            case "COPY":
                *sources, dest = shlex.split(rest)
                image.copies.append((sources, dest))
            case "RUN":
                image.runs.append(rest)
            case "ENV":
                for pair in shlex.split(rest):
                    name, _, value = pair.partition("=")
                    image.env[name] = value
            case "ENTRYPOINT":
                image.entrypoint = json.loads(rest)
            case "CMD":
                image.cmd = json.loads(rest)
            case "HEALTHCHECK":
                image.healthcheck = rest.split(" CMD ", 1)[1]
    return image


def replay_copies(image: Image, context: Path) -> None:
    """COPY the sources (relative to the repository) into `context` (the WORKDIR)."""
    for sources, dest in image.copies:
        for source in sources:
            src = ROOT / source
            target = context / dest
            if dest.endswith("/"):
                target = target / src.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(src, target)


def test_the_dockerfile_is_made_of_steps_the_install_test_replays() -> None:
    image = read_dockerfile()
    assert image.runs, "no RUN line"
    unknown = [run for run in image.runs if run != INSTALL_RUN and run not in NOT_REPLAYED]
    assert not unknown, f"RUN lines the plain-install test does not replay: {unknown}"
    assert INSTALL_RUN in image.runs
    copied = {source for sources, _ in image.copies for source in sources}
    assert ".ci/image-install.sh" in copied
    assert all((ROOT / source).exists() for source in copied), copied
    assert image.entrypoint + image.cmd == ["llm-relay", "run"]
    # /metrics binds loopback by default: the image must open it to the host.
    assert image.env.get("RELAY_HTTP_HOST") == "0.0.0.0"
    assert "RELAY_HTTP_PORT" in image.env and image.healthcheck


def test_the_compose_file_runs_this_image_with_its_health_port_and_a_drain() -> None:
    # No YAML parser in the plain install or the dev tools: the few lines, read as text.
    compose = (ROOT / "docker-compose.yml").read_text()
    image = read_dockerfile()
    assert re.search(r"^\s+build: \.$", compose, re.M)
    port = re.search(r'RELAY_HTTP_PORT: "(\d+)"', compose)
    assert port and port.group(1) == image.env["RELAY_HTTP_PORT"]
    assert re.search(r"RELAY_HTTP_HOST: 0\.0\.0\.0", compose)
    grace = re.search(r"stop_grace_period: (\d+)s", compose)
    default_grace = Settings.model_fields["relay_grace_period_s"].default
    assert grace and int(grace.group(1)) > default_grace  # SIGKILL only after the drain


@dataclass
class PlainInstall:
    bin: Path
    image: Image
    scratch: Path  # an empty directory: no .env, no sources on the path

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            cwd=self.scratch,
            env=_venv_env(self.bin),
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def _venv_env(bin_dir: Path) -> dict[str, str]:
    env = env_without_ours()
    for name in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_NO_CACHE_DIR"):
        env.pop(name, None)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def plain_install(tmp_path_factory: pytest.TempPathFactory) -> PlainInstall:
    image = read_dockerfile()
    root = tmp_path_factory.mktemp("plain-install")
    context = root / "app"
    replay_copies(image, context)
    venv = root / "venv"
    # The base interpreter, not this .venv's packages: nothing of ours leaks in.
    subprocess.run(
        [sys.executable, "-m", "venv", str(venv)], check=True, timeout=VENV_S, capture_output=True
    )
    env = {**_venv_env(venv / "bin"), **image.env}
    env.pop("PIP_NO_CACHE_DIR", None)  # the image keeps no cache; the test reuses pip's
    for run in image.runs:
        if run in NOT_REPLAYED:
            continue
        done = subprocess.run(
            ["sh", "-c", run],
            cwd=context,
            env=env,
            capture_output=True,
            text=True,
            timeout=INSTALL_S,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    scratch = root / "scratch"
    scratch.mkdir()
    return PlainInstall(venv / "bin", image, scratch)


def test_the_plain_install_has_no_extras_and_its_cli_starts(plain_install: PlainInstall) -> None:
    where = plain_install.run("python", "-c", "import worker; print(worker.__file__)")
    assert "site-packages" in where.stdout, where  # the installed wheel, not a source tree
    no_aiohttp = plain_install.run("python", "-c", "import aiohttp")
    assert no_aiohttp.returncode != 0  # the devstack extra is really absent

    helped = plain_install.run("llm-relay", "--help")
    assert helped.returncode == 0, helped.stderr[-2000:]
    for name in ("run", "once", "watch", "probe", "submit"):
        assert f"    {name} " in helped.stdout
    for name in ("demo", "devstack"):
        refused = plain_install.run("llm-relay", name, "--once")
        assert refused.returncode == 2
        assert "pip install 'llm-token-relay[devstack]'" in refused.stderr, refused.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def stack() -> AsyncIterator[DevStack]:
    async with running_stack(upstream_text=TEXT, upstream_tokens_per_second=400) as devstack:
        yield devstack


@pytest.fixture
def worker_process(
    plain_install: PlainInstall, stack: DevStack, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, str], Path]]:
    image = plain_install.image
    env = {
        **_venv_env(plain_install.bin),
        **stack.env(),
        **image.env,
        "RELAY_HTTP_PORT": str(_free_port()),  # the image's port may be taken here
        "RELAY_POLL_INTERVAL_S": "0.2",
    }
    command = [str(plain_install.bin / image.entrypoint[0]), *image.entrypoint[1:], *image.cmd]
    log = tmp_path / "worker.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(command, cwd=plain_install.scratch, env=env, stderr=sink)
    try:
        yield proc, env, log
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


async def _healthy(image: Image, env: dict[str, str], proc: subprocess.Popen[bytes]) -> None:
    """Run the image's HEALTHCHECK command until it passes, as Docker would."""
    async with asyncio.timeout(STARTUP_S):
        while True:
            assert proc.poll() is None, "the worker exited"
            check = await asyncio.create_subprocess_exec(
                "sh", "-c", image.healthcheck, env=env, stderr=asyncio.subprocess.DEVNULL
            )
            if await asyncio.wait_for(check.wait(), 10) == 0:
                return
            await asyncio.sleep(0.2)


async def test_the_plain_install_relays_a_queued_request(
    plain_install: PlainInstall,
    stack: DevStack,
    worker_process: tuple[subprocess.Popen[bytes], dict[str, str], Path],
) -> None:
    proc, env, log = worker_process
    try:
        await _healthy(plain_install.image, env, proc)
    except (AssertionError, TimeoutError):
        pytest.fail(f"the installed worker never became ready:\n{log.read_text()[-3000:]}")

    assert stack.database_url is not None
    repository = PostgresJobRepository.from_url(stack.database_url, pool_size=1)
    user_id = str(uuid.uuid4())
    settings = Settings(_env_file=None)
    try:
        session = await repository.create_session_as(user_id)
        watcher = Watcher(
            realtime_url=f"{stack.api_url}/realtime/v1",
            token=jwt.user_token(user_id, stack.options.jwt_secret),
            topic=settings.topic_for(session),
            private=True,
        )
        await watcher.start()
        try:
            request = NewRequest(messages=[{"role": "user", "content": "hi"}], session_id=session)
            submitted = await repository.submit_as(user_id, request)
            await watcher.wait_finished(timeout_s=RELAY_S)
            record = await wait_for_end(repository, user_id, submitted.id, RELAY_S)
        finally:
            await watcher.close()
    finally:
        await repository.close()

    assert record is not None and record.status == "done", log.read_text()[-3000:]
    state = next(iter(watcher.reassembly.streams.values()))
    assert state.checksums_match()
    assert state.text() == (TEXT, "") == (record.snapshot.content, record.snapshot.reasoning)

    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 30) == 0, log.read_text()[-3000:]
    # The image's RELAY_LOG_JSON=true reached the installed worker: its lines are JSON.
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert lines and all(line.startswith("{") for line in lines), lines[:5]
