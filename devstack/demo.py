"""`llm-relay demo`: the whole path on this machine, visible.

Starts the local stack (embedded Postgres, the Realtime / PostgREST / Auth stand-ins
behind one gateway, the demo page, the simulated upstream — or the provider the
environment names, exactly as `llm-relay run` would use it) and a worker process
(`llm-relay run`). Then, as a
frontend would: a user creates a session, subscribes to its private topic (RLS
decides), and inserts a request; the worker claims it and relays the tokens. The
terminal prints the text *as that subscriber reassembled it*, then a summary, and
checks it against the transcript the worker stored. Without `--once` everything
stays up for the demo page (each prompt typed there goes through the same path)
until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from typing import get_args

import httpx
import psycopg

from devstack import jwt
from devstack.cli import add_stack_arguments, stack_options, stop_signals
from devstack.stack import SIMULATED_API_KEY, DevStack
from worker.cli import Command
from worker.config import GROQ_DEFAULT_BASE_URL, OPENAI_DEFAULT_BASE_URL, Provider, Settings
from worker.errors import ConfigError
from worker.jobs.models import JobRecord, NewRequest
from worker.jobs.postgres import PostgresJobRepository
from worker.logs import configure_logging
from worker.relay.watch import Watcher
from worker.service.submit import wait_for_end

DEFAULT_PROMPT = "How do tokens travel from an LLM to a browser?"
# What the simulated upstream answers (a real provider answers the prompt instead).
DEMO_REASONING = (
    "The user asks about the path of a token. I should name each hop: provider, "
    "worker, Realtime, browser — and what keeps the text exact."
)
DEMO_TEXT = (
    "A token starts its trip at the provider, which streams it as one Server-Sent "
    "Event among hundreds. The relay worker parses each chunk, byte-exact (even "
    "multi-byte text such as café, naïve, 東京 or 🚀), and gathers tokens into batches "
    "of 20, or fewer when 100 ms pass first. Each batch becomes one Realtime broadcast "
    "on the topic of the session, and the worker waits for the server's ack; a send "
    "that fails is retried three times with exponential backoff, then split token by "
    "token, and kept until the channel is back.\n\nIn the browser, supabase-js hands "
    "every message to a small reassembler that applies tokens by offset: duplicates "
    "are dropped, gaps are held until they fill, and a late subscriber catches up "
    "from the snapshot in Postgres. The text you read is exactly the text the model "
    "wrote — no token lost, duplicated or reordered.\n"
)
DIM, RESET = "\x1b[2m", "\x1b[0m"


@dataclass
class Upstream:
    """Which provider the demo's worker streams from, and how it says so."""

    label: str
    env: dict[str, str]


PROVIDER_NAMES: dict[Provider, str] = {"openai": "OpenAI", "groq": "Groq"}


def _configured(settings: Settings, provider: Provider) -> bool:
    """Configured as `llm-relay run` sees it, less the devstack's own simulator lines
    (`llm-relay devstack > .env` leaves them behind; they point at another stack)."""
    key = settings.api_key_for(provider)
    secret = key.get_secret_value() if key is not None else ""
    if secret == SIMULATED_API_KEY:
        return False
    public = {"openai": OPENAI_DEFAULT_BASE_URL, "groq": GROQ_DEFAULT_BASE_URL}[provider]
    if not secret and settings.base_url_for(provider).rstrip("/") == public:
        return False  # the public API without a key (a copy of .env.example): cannot answer
    return settings.provider_configured(provider)


def choose_upstream(settings: Settings, simulator: dict[str, str]) -> Upstream:
    """The provider the environment names, used exactly as `llm-relay run` uses it
    (its key, base URL and model, untouched); the simulated one when none is configured.

    RELAY_PROVIDER decides when it is set; otherwise the first configured provider.
    `simulator` is the stack's simulated-upstream settings (`DevStack.simulator_env()`).
    """
    why = "no provider set"
    if "relay_provider" in settings.model_fields_set:
        provider: Provider | None = settings.relay_provider
        if not _configured(settings, settings.relay_provider):
            # A copy of .env.example names openai with neither key nor URL: not a choice.
            upper = settings.relay_provider.upper()
            why = f"RELAY_PROVIDER={provider} has no {upper}_API_KEY or {upper}_BASE_URL"
            provider = None
    else:
        provider = next((p for p in get_args(Provider) if _configured(settings, p)), None)
    if provider is None:
        return Upstream(f"simulated OpenAI at {simulator['OPENAI_BASE_URL']} ({why})", simulator)
    base_url = settings.base_url_for(provider)
    name = PROVIDER_NAMES[provider]
    if base_url != {"openai": OPENAI_DEFAULT_BASE_URL, "groq": GROQ_DEFAULT_BASE_URL}[provider]:
        name = f"{name}-compatible server"
    key = settings.api_key_for(provider)
    has_key = "API key set" if key is not None and key.get_secret_value() else "no API key"
    return Upstream(
        f"{name} at {base_url} (model {settings.model_for(provider)}, {has_key})",
        {"RELAY_PROVIDER": provider},
    )


class LiveText:
    """Writes what the watcher applies, as it arrives; reasoning dimmed."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.first_token_at: float | None = None
        self._kind: str | None = None

    def __call__(self, stream: str, kind: str, text: str) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if kind != self._kind:
            # Reasoning and answer are kept apart, as the demo page shows them.
            sys.stdout.write(("\n\n" if self._kind else "") + f"[{kind}]\n")
            self._kind = kind
        if kind == "reasoning" and self.tty:
            text = f"{DIM}{text}{RESET}"
        sys.stdout.write(text)
        sys.stdout.flush()


@dataclass
class Outcome:
    exact: bool
    stored_equal: bool
    status: str


def print_summary(
    watcher: Watcher, record: JobRecord | None, started: float, live: LiveText
) -> Outcome:
    state = next(iter(watcher.reassembly.streams.values()), None)
    exact = state is not None and state.checksums_match()
    content, reasoning = state.text() if state else ("", "")
    stored = record is not None and (record.snapshot.content, record.snapshot.reasoning) == (
        content,
        reasoning,
    )
    tokens = state.next_offset if state else 0
    messages = max(watcher.received, 1)
    first = (live.first_token_at - started) * 1000 if live.first_token_at else float("nan")
    rows = [
        ("tokens", f"{tokens}"),
        ("messages received", f"{watcher.received} ({tokens / messages:.1f} tokens each)"),
        ("time", f"{time.monotonic() - started:.2f} s; first token on screen after {first:.0f} ms"),
        (
            "duplicates dropped / gaps",
            f"{state.duplicate_tokens if state else 0} / {state.gaps if state else 0}",
        ),
        ("exact (llm-done checksum)", "yes" if exact else "NO"),
        ("stored transcript = screen", "yes" if stored else "NO"),
        ("request status", record.status if record else "not visible"),
    ]
    if state is not None and state.error is not None:
        rows.append(("error", f"{state.error.type}: {state.error.message}"))
    print("\n")
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    return Outcome(exact, stored, record.status if record else "missing")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stack_arguments(parser)
    parser.set_defaults(text=DEMO_TEXT, reasoning_text=DEMO_REASONING)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt run at start")
    parser.add_argument("--no-prompt", action="store_true", help="only serve the page")
    parser.add_argument("--once", action="store_true", help="exit after the prompt")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds for the prompt")


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.log_level is None:
        # Keep the terminal for the streamed text; `--log-level INFO` shows the logs.
        configure_logging("WARNING", json=settings.relay_log_json)
    stack = DevStack(stack_options(args))
    print("Starting the local stack (Postgres, Realtime, PostgREST, upstream)...", flush=True)
    await stack.start()
    try:
        return await _with_worker(args, settings, stack)
    finally:
        await stack.stop()


async def _with_worker(args: argparse.Namespace, settings: Settings, stack: DevStack) -> int:
    upstream = choose_upstream(settings, stack.simulator_env())
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RELAY_HTTP")},
        **stack.supabase_env(),
        **upstream.env,
        "RELAY_HTTP_HOST": "127.0.0.1",
        "RELAY_HTTP_PORT": str(health_port := _free_port()),
        "RELAY_LOG_LEVEL": args.log_level or "WARNING",
    }
    worker = await asyncio.create_subprocess_exec(sys.executable, "-m", "worker", "run", env=env)
    print(f"Upstream: {upstream.label}")
    print(f"Worker:   llm-relay run (pid {worker.pid}, http://127.0.0.1:{health_port}/metrics)")
    print(f"Page:     {stack.demo_page_url}")
    try:
        await _wait_ready(f"http://127.0.0.1:{health_port}/readyz", worker, timeout_s=60)
        code = 0
        if not args.no_prompt:
            code = await _one_prompt(args, settings, stack)
        if not args.once:
            with stop_signals() as stop:
                print(f"\nThe demo page is up: {stack.demo_page_url}  (Ctrl-C stops)", flush=True)
                assert stack.database_url is not None
                view = asyncio.create_task(terminal_view(stack.database_url), name="demo-view")
                try:
                    await stop.wait()
                finally:
                    view.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await view
        return code
    finally:
        await _stop_worker(worker, settings.relay_grace_period_s)


VIEW_POLL_S = 0.5
_VIEW_QUERY = """
SELECT id::text, status, next_offset, finish_reason, error->>'type'
FROM public.llm_requests
WHERE updated_at > now() - interval '1 hour'
ORDER BY created_at
"""


async def terminal_view(database_url: str) -> None:
    """One line per change of any stream (page prompts included): status and tokens.

    Reads the request table the worker checkpoints about once a second, as the
    operator's superuser connection (the demo's own database).
    """
    seen: dict[str, tuple[str, int]] = {}
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        while True:
            for rid, status, offset, finish, error in await (
                await conn.execute(_VIEW_QUERY)
            ).fetchall():
                if seen.get(rid) == (status, offset):
                    continue
                seen[rid] = (status, offset)
                tail = f" finish={finish}" if finish else ""
                tail += f" error={error}" if error else ""
                stamp = time.strftime("%H:%M:%S")
                print(f"  {stamp}  stream {rid[:8]}  {status:<9} {offset:>6} tokens{tail}")
            await asyncio.sleep(VIEW_POLL_S)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _wait_ready(url: str, worker: asyncio.subprocess.Process, *, timeout_s: float) -> None:
    """Poll the worker's /readyz, so that timings start when it can serve."""
    async with httpx.AsyncClient(timeout=2.0) as http, asyncio.timeout(timeout_s):
        while True:
            if worker.returncode is not None:
                raise ConfigError(f"the worker exited with status {worker.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(url)).status_code == 200:
                    return
            await asyncio.sleep(0.1)


async def _stop_worker(worker: asyncio.subprocess.Process, grace_s: float) -> None:
    if worker.returncode is None:
        worker.send_signal(signal.SIGTERM)  # drains: finish or checkpoint and release
        try:
            await asyncio.wait_for(worker.wait(), grace_s + 5)
        except TimeoutError:
            worker.kill()
            await worker.wait()


async def _one_prompt(args: argparse.Namespace, settings: Settings, stack: DevStack) -> int:
    assert stack.database_url is not None
    repository = PostgresJobRepository.from_url(stack.database_url, pool_size=2)
    user_id = str(uuid.uuid4())
    token = jwt.user_token(user_id, stack.options.jwt_secret)
    try:
        # A frontend subscribes before it asks, so the first token cannot be missed.
        session = await repository.create_session_as(user_id)
        live = LiveText(sys.stdout.isatty())
        watcher = Watcher(
            realtime_url=f"{stack.api_url}/realtime/v1",
            token=token,
            topic=settings.topic_for(session),
            private=True,
            on_text=live,
        )
        print(f"Session:  {session} (private topic {watcher.topic}, joined as its owner)")
        print(f"Prompt:   {args.prompt}\n", flush=True)
        await watcher.start()
        try:
            started = time.monotonic()
            request = NewRequest(
                messages=[{"role": "user", "content": args.prompt}], session_id=session
            )
            submitted = await repository.submit_as(user_id, request)
            await watcher.wait_finished(timeout_s=args.timeout)
            record = await wait_for_end(repository, user_id, submitted.id, args.timeout)
            outcome = print_summary(watcher, record, started, live)
        finally:
            await watcher.close()
        print(
            f"\n  replay it in the page: {stack.demo_page_url}#session={session}"
            f"&stream={submitted.id}&token={token}"
        )
    finally:
        await repository.close()
    return 0 if outcome.exact and outcome.stored_equal and outcome.status == "done" else 1


COMMAND = Command(
    "demo",
    "Start the local stack and a worker; stream one prompt to a subscriber; serve the page",
    _add_arguments,
    _run,
)
