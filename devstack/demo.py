"""`llm-relay demo`: the whole path on this machine, visible.

Starts the local stack (embedded Postgres, the Realtime stand-in, the simulated
upstream — or a real provider when its key is in the environment), subscribes an
independent realtime-py watcher to the session's topic, relays one generation, and
prints the text as the *watcher* receives it, then a summary. Without `--once` it
keeps the stack up for the demo page until Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from dataclasses import dataclass

from devstack.cli import add_stack_arguments, stack_options, wait_for_stop_signal
from devstack.stack import DevStack
from worker.cli import Command
from worker.config import Settings
from worker.logs import configure_logging
from worker.relay.once import relay_once
from worker.relay.stream import RelayResult
from worker.relay.watch import Watcher

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
    """Which provider the demo streams from, and how it says so."""

    label: str
    overrides: dict[str, object]


def choose_upstream(settings: Settings, stack: DevStack) -> Upstream:
    """A real provider when its key is configured, else the simulated one."""
    if settings.groq_api_key is not None:
        return Upstream(f"Groq at {settings.groq_base_url}", {"relay_provider": "groq"})
    if settings.openai_api_key is not None and "127.0.0.1" not in settings.openai_base_url:
        return Upstream(f"OpenAI at {settings.openai_base_url}", {"relay_provider": "openai"})
    env = stack.env()
    return Upstream(
        f"simulated OpenAI at {env['OPENAI_BASE_URL']}",
        {
            "relay_provider": "openai",
            "openai_base_url": env["OPENAI_BASE_URL"],
            "openai_api_key": env["OPENAI_API_KEY"],
        },
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


def print_summary(
    result: RelayResult, watcher: Watcher, started: float, live: LiveText, elapsed_s: float
) -> bool:
    state = next(iter(watcher.reassembly.streams.values()), None)
    exact = state is not None and state.checksums_match()
    tokens = result.content_tokens + result.reasoning_tokens
    first = (live.first_token_at - started) * 1000 if live.first_token_at else float("nan")
    rows = [
        ("tokens relayed", f"{tokens} ({result.reasoning_tokens} reasoning)"),
        ("messages", f"{result.messages} ({tokens / max(result.messages, 1):.1f} tokens each)"),
        ("batches", str(result.batches)),
        ("time", f"{elapsed_s:.2f} s, first token at the watcher after {first:.0f} ms"),
        (
            "retries / fallbacks / REST",
            f"{result.retries} / {result.fallbacks} / {result.rest_messages}",
        ),
        (
            "watcher",
            f"{watcher.received} messages, duplicates dropped "
            f"{state.duplicate_tokens if state else 0}, gaps {state.gaps if state else 0}",
        ),
        ("exact (llm-done checksum)", "yes" if exact else "NO"),
    ]
    if result.error is not None:
        rows.append(("error", f"{type(result.error).__name__}: {result.error.message}"))
    print("\n")
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    return exact and result.error is None


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stack_arguments(parser)
    parser.set_defaults(text=DEMO_TEXT, reasoning_text=DEMO_REASONING)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the one prompt to run")
    parser.add_argument("--once", action="store_true", help="exit after the generation")


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.log_level is None:
        # Keep the terminal for the streamed text; `--log-level INFO` shows the logs.
        configure_logging("WARNING", json=settings.relay_log_json)
    stack = DevStack(stack_options(args))
    print("Starting the local stack (Postgres, Realtime, upstream)...", flush=True)
    await stack.start()
    try:
        return await _demo(args, settings, stack)
    finally:
        await stack.stop()


async def _demo(args: argparse.Namespace, settings: Settings, stack: DevStack) -> int:
    env = stack.env()
    upstream = choose_upstream(settings, stack)
    # Init arguments outrank the environment: the demo's stack wins over `.env`.
    demo_settings = Settings(
        **{
            **settings.model_dump(),
            "supabase_url": env["SUPABASE_URL"],
            "supabase_service_role_key": env["SUPABASE_SERVICE_ROLE_KEY"],
            **upstream.overrides,
        }
    )
    session = f"demo-{uuid.uuid4().hex[:8]}"
    live = LiveText(sys.stdout.isatty())
    watcher = Watcher(
        realtime_url=demo_settings.realtime_url,
        token=env["SUPABASE_SERVICE_ROLE_KEY"],
        topic=demo_settings.topic_for(session),
        private=demo_settings.relay_private_channels,
        on_text=live,
    )
    print(f"Upstream: {upstream.label}")
    print(f"Realtime: {demo_settings.realtime_url}  topic {watcher.topic}")
    print(f"Prompt:   {args.prompt}\n")
    await watcher.start()
    try:
        started = time.monotonic()
        _, result = await relay_once(demo_settings, session_id=session, prompt=args.prompt)
        await watcher.wait_finished(timeout_s=30)
        ok = print_summary(result, watcher, started, live, time.monotonic() - started)
    finally:
        await watcher.close()
    if not args.once:
        print(f"\nThe stack stays up: {stack.api_url}  (Ctrl-C stops)")
        await wait_for_stop_signal()
    return 0 if ok else 1


COMMAND = Command(
    "demo",
    "Start the local stack and show one stream arriving at a subscriber",
    _add_arguments,
    _run,
)
