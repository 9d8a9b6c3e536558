"""A Python frontend of the relay, for a FastAPI or Streamlit app: ask, get the text.

It does what the browser helper (examples/frontend) does, with the Python clients:
supabase-py for Auth (an anonymous sign-in, or the app user's access token) and
PostgREST (the session and request rows, under RLS, like supabase-js), realtime-py
(`worker.relay.watch.Watcher`) for the session's private topic, reassembled by offset.
It subscribes before it inserts, so no token can be missed.

    async with await RelayClient.connect(SUPABASE_URL, SUPABASE_ANON_KEY) as relay:
        answer = await relay.ask("Hello!", on_text=lambda kind, text: print(text, end=""))
        print(answer.content, answer.status, answer.exact)

It never holds the service-role key: what it may do is what RLS lets the user do.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast

import httpx

from supabase import AsyncClient, AsyncClientOptions, acreate_client
from worker.errors import ConfigError
from worker.relay.watch import Watcher

DEFAULT_TOPIC_TEMPLATE = "llm-token:{session_id}"  # the migrations' llm_sessions.topic
FINAL = ("done", "failed", "cancelled")
ROW_FINAL_WAIT_S = 10.0  # after llm-done, how long `ask` waits for the row to be final


@dataclass(frozen=True)
class Answer:
    """One request's end, as the subscriber reassembled it and as its row stores it."""

    request_id: str
    session_id: str
    content: str
    reasoning: str
    exact: bool  # the llm-done checksums match the reassembled text
    status: str  # the row's status ("done", "failed", ...)
    finish_reason: str | None
    error: dict[str, Any] | None


class RelayClient:
    """One signed-in user; `ask()` as often as needed; close (or `async with`) after."""

    def __init__(
        self,
        supabase: AsyncClient,
        http: httpx.AsyncClient,
        *,
        url: str,
        access_token: str,
        anon_key: str | None = None,
    ) -> None:
        self.supabase = supabase
        self._http = http
        self._realtime_url = url.rstrip("/") + "/realtime/v1"
        self._rest_url = url.rstrip("/") + "/rest/v1"
        self._anon_key = anon_key
        self._access_token = access_token

    @classmethod
    async def connect(
        cls,
        url: str,
        anon_key: str,
        *,
        access_token: str | None = None,
        http_timeout_s: float = 30.0,
    ) -> RelayClient:
        """Sign in anonymously, or act as the user whose `access_token` is given."""
        # Our own httpx client: supabase-py's timeout option warns that it is deprecated.
        http = httpx.AsyncClient(timeout=http_timeout_s)
        try:
            supabase = await acreate_client(
                url, anon_key, options=AsyncClientOptions(httpx_client=http)
            )
            if access_token is None:
                response = await supabase.auth.sign_in_anonymously()
                if response.session is None:
                    raise ConfigError("anonymous sign-in returned no session")
                access_token = response.session.access_token
            else:
                supabase.postgrest.auth(access_token)
        except BaseException:
            await http.aclose()
            raise
        return cls(supabase, http, url=url, access_token=access_token, anon_key=anon_key)

    async def new_session(self, session_id: str | None = None) -> str:
        """A session this user owns: its topic is theirs alone to join (RLS)."""
        session_id = session_id or str(uuid.uuid4())
        await self.supabase.table("llm_sessions").insert({"id": session_id}).execute()
        return session_id

    async def ask(
        self,
        prompt: str | list[dict[str, Any]],
        *,
        session_id: str | None = None,
        on_text: Callable[[str, str], None] | None = None,
        params: dict[str, Any] | None = None,
        timeout_s: float = 300.0,
        topic_template: str = DEFAULT_TOPIC_TEMPLATE,
    ) -> Answer:
        """Insert a request and return its reassembled text when it ends.

        `on_text(kind, text)` sees each piece as it is applied (kind: "content" or
        "reasoning"), in order; raises TimeoutError after `timeout_s`.
        """
        session_id = session_id or await self.new_session()
        watcher = Watcher(
            realtime_url=self._realtime_url,
            token=self._access_token,
            topic=topic_template.format(session_id=session_id),
            private=True,
            on_text=(lambda _stream, kind, text: on_text(kind, text)) if on_text else None,
            # A gap (a worker died, a message lost) is filled from the token log.
            rest_url=self._rest_url,
            apikey=self._anon_key,
        )
        await watcher.start()
        try:
            request_id, _ = await self.submit(prompt, session_id=session_id, params=params)
            await watcher.wait_finished(timeout_s=timeout_s)
        finally:
            await watcher.close()
        state = next(iter(watcher.reassembly.streams.values()))
        content, reasoning = state.text()
        # llm-done reaches the subscriber before the worker has its ack and writes the
        # row's end: read the row until it says so too (briefly; then as it stands).
        try:
            stored = await self.wait(request_id, timeout_s=ROW_FINAL_WAIT_S, poll_s=0.05)
        except TimeoutError:
            stored = await self.result(request_id)
        return Answer(
            request_id=request_id,
            session_id=session_id,
            content=content,
            reasoning=reasoning,
            exact=state.checksums_match(),
            status=str(stored["status"]),
            finish_reason=stored.get("finish_reason"),
            error=stored.get("error"),
        )

    async def submit(
        self,
        prompt: str | list[dict[str, Any]],
        *,
        session_id: str | None = None,
        provider: str | None = None,
        model: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> tuple[str, str]:
        """Insert a request row (without subscribing); returns (request id, session id).

        Without `session_id` the row's default makes a new session the user owns.
        """
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        row: dict[str, Any] = {"messages": messages}
        optional = {"session_id": session_id, "provider": provider, "model": model}
        row.update({k: v for k, v in optional.items() if v is not None})
        if params:
            row["params"] = params
        inserted = await self.supabase.table("llm_requests").insert(row).execute()
        created = cast(list[dict[str, Any]], inserted.data)[0]
        return str(created["id"]), str(created["session_id"])

    async def cancel(self, request_id: str) -> str | None:
        """Ask to cancel; the request's status after asking (None: not this user's)."""
        response = await self.supabase.rpc(
            "cancel_llm_request", {"request_id": request_id}
        ).execute()
        return None if response.data is None else str(response.data)

    async def wait(
        self, request_id: str, *, timeout_s: float = 300.0, poll_s: float = 0.2
    ) -> dict[str, Any]:
        """Read the row until it is finished (no subscription: for scripts and jobs)."""
        async with asyncio.timeout(timeout_s):
            while True:
                row = await self.result(request_id)
                if row["status"] in FINAL:
                    return row
                await asyncio.sleep(poll_s)

    async def result(self, request_id: str) -> dict[str, Any]:
        """The request's row as this user may read it (the snapshot: text so far)."""
        response = await (
            self.supabase.table("llm_requests")
            .select(
                "id,session_id,status,attempts,content,reasoning,next_offset,"
                "finish_reason,usage,error"
            )
            .eq("id", request_id)
            .single()
            .execute()
        )
        return cast(dict[str, Any], response.data)

    async def close(self) -> None:
        try:
            await self.supabase.auth.sign_out()
        finally:
            await self._http.aclose()

    async def __aenter__(self) -> RelayClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
