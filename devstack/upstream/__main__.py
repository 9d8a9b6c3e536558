"""`python -m devstack.upstream --port 8090`: run the simulated upstream alone."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from devstack.upstream.server import DEFAULT_TEXT, SimulatedUpstream


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m devstack.upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--provider", choices=["openai", "groq"], default="openai")
    parser.add_argument("--text", default=DEFAULT_TEXT)
    parser.add_argument("--reasoning-text", default="")
    parser.add_argument("--tokens-per-second", type=float, default=20.0)
    parser.add_argument("--api-key", default="sk-devstack", help="empty: accept any key")
    parser.add_argument(
        "--continuation",
        choices=["exact", "own_words"],
        default="exact",
        help="how a continuation request is answered (own_words: as a real model would)",
    )
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    upstream = SimulatedUpstream(
        args.host,
        args.port,
        provider=args.provider,
        text=args.text,
        reasoning_text=args.reasoning_text,
        tokens_per_second=args.tokens_per_second,
        api_key=args.api_key or None,
        continuation=args.continuation,
    )
    await upstream.start()
    print(f"simulated {args.provider} upstream on {upstream.base_url}", flush=True)
    print(f"faults: POST http://{upstream.host}:{upstream.port}/_control/faults", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await upstream.stop()


def main(argv: list[str] | None = None) -> None:
    asyncio.run(_serve(_parse(argv)))


if __name__ == "__main__":
    main()
