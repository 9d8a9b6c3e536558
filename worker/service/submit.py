"""`llm-relay submit`: insert a request the way a frontend does.

The insert runs as PostgREST would run it for the user's JWT: role
`authenticated` and `request.jwt.claims` for the transaction, so the same RLS
policies and defaults apply (the owner is auth.uid(), status and outputs cannot
be chosen). Prints one JSON object: id, session_id, topic. `--wait` then reads
the row as the same user until it is finished and prints its final state;
`--cancel ID` asks to cancel instead.

`--access-token JWT` or `--anonymous` take the frontend's own path instead, with
supabase-py (`worker.client`): Supabase Auth, then PostgREST under that user's RLS;
it needs only SUPABASE_URL and SUPABASE_ANON_KEY, no database connection.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from typing import Any

from worker.cli import Command
from worker.config import Settings
from worker.errors import ConfigError, QueueError
from worker.jobs.models import JobRecord, NewRequest
from worker.jobs.postgres import PostgresJobRepository
from worker.jobs.repository import JobRepository

WAIT_POLL_S = 0.2
FINAL = ("done", "failed", "cancelled")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument(
        "--user", help="the submitting user's id (auth.uid()): straight to DATABASE_URL"
    )
    who.add_argument(
        "--access-token",
        metavar="JWT",
        help="a user's access token: through Auth and PostgREST (SUPABASE_URL, "
        "SUPABASE_ANON_KEY) with supabase-py, as a frontend does",
    )
    who.add_argument(
        "--anonymous",
        action="store_true",
        help="sign in anonymously through Auth, then as --access-token",
    )
    parser.add_argument("--session", help="session id (default: a new session)")
    parser.add_argument("--provider", choices=("openai", "groq"))
    parser.add_argument("--model")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--system", help="a system message before the prompt")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="the user message")
    source.add_argument("--messages", help="the chat messages as a JSON array")
    source.add_argument("--cancel", metavar="REQUEST_ID", help="ask to cancel a request")
    source.add_argument(
        "--new-session", action="store_true", help="only create a session (to subscribe first)"
    )
    parser.add_argument("--wait", action="store_true", help="wait for the end and print it")
    parser.add_argument("--timeout", type=float, default=300.0, help="--wait limit, seconds")


def build_request(args: argparse.Namespace) -> NewRequest:
    if args.messages is not None:
        try:
            messages: Any = json.loads(args.messages)
        except ValueError as exc:
            raise ConfigError(f"--messages is not JSON: {exc}") from exc
    elif args.prompt is not None:
        messages = [{"role": "user", "content": args.prompt}]
        if args.system:
            messages.insert(0, {"role": "system", "content": args.system})
    else:
        raise ConfigError("give --prompt or --messages (or --cancel)")
    params: dict[str, Any] = {}
    if args.max_tokens is not None:
        params["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        params["temperature"] = args.temperature
    return NewRequest(
        messages=messages,
        provider=args.provider,
        model=args.model,
        params=params,
        session_id=args.session,
    )


def record_json(record: JobRecord) -> dict[str, Any]:
    snap = record.snapshot
    return {
        "id": record.id,
        "session_id": record.session_id,
        "status": record.status,
        "attempts": record.attempts,
        "content": snap.content,
        "reasoning": snap.reasoning,
        "next_offset": snap.next_offset,
        "finish_reason": record.finish_reason,
        "usage": record.usage,
        "error": record.error,
    }


async def wait_for_end(
    repository: JobRepository, user_id: str, job_id: str, timeout_s: float
) -> JobRecord | None:
    """Poll the row as the user until it is finished (None: not visible to them)."""
    async with asyncio.timeout(timeout_s):
        while True:
            record = await repository.get_as(user_id, job_id)
            if record is None or record.status in FINAL:
                return record
            await asyncio.sleep(WAIT_POLL_S)


async def submit(args: argparse.Namespace, repository: JobRepository, settings: Settings) -> int:
    try:
        user_id = str(uuid.UUID(args.user))
    except ValueError as exc:
        raise ConfigError(f"--user {args.user!r} is not a UUID") from exc
    if args.cancel:
        status = await repository.cancel_as(user_id, args.cancel)
        print(json.dumps({"id": args.cancel, "status": status}))
        return 0 if status else 1
    if args.new_session:
        session_id = await repository.create_session_as(user_id, args.session)
        print(json.dumps({"session_id": session_id, "topic": settings.topic_for(session_id)}))
        return 0
    submitted = await repository.submit_as(user_id, build_request(args))
    print(
        json.dumps(
            {
                "id": submitted.id,
                "session_id": submitted.session_id,
                "topic": settings.topic_for(submitted.session_id),
            }
        ),
        flush=True,
    )
    if not args.wait:
        return 0
    try:
        record = await wait_for_end(repository, user_id, submitted.id, args.timeout)
    except TimeoutError:
        print(f"llm-relay submit: not finished after {args.timeout:g}s", file=sys.stderr)
        return 1
    if record is None:
        return 1
    print(json.dumps(record_json(record)))
    return 0 if record.status == "done" else 1


def row_json(row: dict[str, Any]) -> dict[str, Any]:
    """A request row read through PostgREST, in `record_json`'s shape."""
    return {key: row.get(key) for key in RECORD_KEYS}


RECORD_KEYS = (
    "id",
    "session_id",
    "status",
    "attempts",
    "content",
    "reasoning",
    "next_offset",
    "finish_reason",
    "usage",
    "error",
)


async def submit_rest(args: argparse.Namespace, settings: Settings) -> int:
    """The frontend's path: supabase-py signs in (or takes the JWT), PostgREST writes."""
    from worker.client import RelayClient  # supabase-py: paid only on this path

    if settings.supabase_anon_key is None:
        raise ConfigError("SUPABASE_ANON_KEY is not set (a frontend's key, for Auth + PostgREST)")
    anon_key = settings.supabase_anon_key.get_secret_value()
    async with await RelayClient.connect(
        settings.supabase_url, anon_key, access_token=args.access_token
    ) as relay:
        if args.cancel:
            status = await relay.cancel(args.cancel)
            print(json.dumps({"id": args.cancel, "status": status}))
            return 0 if status else 1
        if args.new_session:
            session_id = await relay.new_session(args.session)
            print(json.dumps({"session_id": session_id, "topic": settings.topic_for(session_id)}))
            return 0
        request = build_request(args)
        request_id, session_id = await relay.submit(
            request.messages,
            session_id=request.session_id,
            provider=request.provider,
            model=request.model,
            params=request.params,
        )
        topic = settings.topic_for(session_id)
        print(json.dumps({"id": request_id, "session_id": session_id, "topic": topic}), flush=True)
        if not args.wait:
            return 0
        try:
            row = await relay.wait(request_id, timeout_s=args.timeout)
        except TimeoutError:
            print(f"llm-relay submit: not finished after {args.timeout:g}s", file=sys.stderr)
            return 1
        print(json.dumps(row_json(row)))
        return 0 if row["status"] == "done" else 1


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.access_token or args.anonymous:
        return await submit_rest(args, settings)
    if not settings.database_url:
        raise ConfigError("DATABASE_URL is not set")
    repository = PostgresJobRepository.from_url(settings.database_url, pool_size=1)
    try:
        return await submit(args, repository, settings)
    except QueueError as exc:
        print(f"llm-relay submit: {exc.message}", file=sys.stderr)
        return 1
    finally:
        await repository.close()


COMMAND = Command(
    "submit",
    "Insert a generation request as a user (RLS applies) and print its id and session",
    _add_arguments,
    _run,
)
