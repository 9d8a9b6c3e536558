"""`python -m devstack.realtime --port N --jwt-secret S ...`: the local Realtime alone."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from dataclasses import fields

from devstack.jwt import DEFAULT_JWT_SECRET, api_key

from .limits import RealtimeLimits
from .server import RealtimeServer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m devstack.realtime", description="Local Supabase Realtime (broadcast)."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=54321)
    parser.add_argument("--jwt-secret", default=DEFAULT_JWT_SECRET)
    parser.add_argument("--database-url", default=None, help="Postgres for private channels")
    parser.add_argument("--time-scale", type=float, default=1.0)
    for f in fields(RealtimeLimits):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", default=f.default)
        else:
            parser.add_argument(flag, type=int, default=f.default)
    return parser


def limits_from_args(args: argparse.Namespace) -> RealtimeLimits:
    return RealtimeLimits(**{f.name: getattr(args, f.name) for f in fields(RealtimeLimits)})


async def serve(args: argparse.Namespace) -> None:
    server = RealtimeServer(
        host=args.host,
        port=args.port,
        jwt_secret=args.jwt_secret,
        limits=limits_from_args(args),
        database_url=args.database_url,
        time_scale=args.time_scale,
    )
    await server.start()
    print(f"SUPABASE_URL={server.url}", flush=True)
    print(f"SUPABASE_ANON_KEY={api_key('anon', args.jwt_secret)}", flush=True)
    print(f"SUPABASE_SERVICE_ROLE_KEY={api_key('service_role', args.jwt_secret)}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
