"""Row-level security of the migrations, checked the way PostgREST and Realtime check it.

PostgREST runs a user's request with `role` and `request.jwt.claims` set for the
transaction. Realtime authorizes a private join by inserting a probe row into
realtime.messages as the privileged connection, then SELECTing it under RLS with
`role`, `request.jwt.claims` and `realtime.topic` set (reference §5).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from psycopg import errors

pytestmark = pytest.mark.integration

USER_A = "6f1b1c1e-0000-4000-8000-00000000000a"
USER_B = "6f1b1c1e-0000-4000-8000-00000000000b"


@contextmanager
def as_role(
    conn: psycopg.Connection, role: str, user: str | None = None, topic: str | None = None
) -> Iterator[psycopg.Connection]:
    """One transaction as `role` (with a user's claims), rolled back afterwards."""
    with conn.transaction(force_rollback=True):
        claims = {"role": role} | ({"sub": user} if user else {})
        conn.execute(
            "SELECT set_config('role', %s, true), set_config('request.jwt.claims', %s, true),"
            " set_config('realtime.topic', %s, true)",
            (role, json.dumps(claims), topic or ""),
        )
        yield conn


def insert_request(
    conn: psycopg.Connection, user: str, session: str | None = None
) -> tuple[str, str]:
    """Insert as the user, committed, the way a frontend would."""
    with conn.transaction():
        conn.execute(
            "SELECT set_config('role', 'authenticated', true),"
            " set_config('request.jwt.claims', %s, true)",
            (json.dumps({"role": "authenticated", "sub": user}),),
        )
        row = conn.execute(
            "INSERT INTO llm_requests (session_id, messages) VALUES"
            " (coalesce(%s::uuid, gen_random_uuid()), '[]') RETURNING id, session_id",
            (session,),
        ).fetchone()
    assert row is not None
    return str(row[0]), str(row[1])


def can_join(conn: psycopg.Connection, topic: str, user: str | None) -> bool:
    """Realtime's read check for a private channel: is the probe row visible?"""
    with conn.transaction(force_rollback=True):
        probe = conn.execute(
            "INSERT INTO realtime.messages (topic, extension) VALUES (%s, 'broadcast')"
            " RETURNING id",
            (topic,),
        ).fetchone()
        assert probe is not None
        role = "authenticated" if user else "anon"
        claims = {"role": role} | ({"sub": user} if user else {})
        conn.execute(
            "SELECT set_config('role', %s, true), set_config('request.jwt.claims', %s, true),"
            " set_config('request.jwt.claim.sub', %s, true),"
            " set_config('realtime.topic', %s, true)",
            (role, json.dumps(claims), user or "", topic),
        )
        rows = conn.execute(
            "SELECT id FROM realtime.messages WHERE id = %s AND topic = %s", (probe[0], topic)
        ).fetchall()
    return len(rows) == 1


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as connection:
        yield connection


def test_owners_read_only_their_own_requests(conn: psycopg.Connection) -> None:
    _, session_a = insert_request(conn, USER_A)
    insert_request(conn, USER_B)
    with as_role(conn, "authenticated", USER_A):
        rows = conn.execute("SELECT owner::text, session_id::text FROM llm_requests").fetchall()
        sessions = conn.execute("SELECT id::text FROM llm_sessions").fetchall()
    assert rows == [(USER_A, session_a)]
    assert sessions == [(session_a,)]
    with as_role(conn, "anon"), pytest.raises(errors.InsufficientPrivilege):
        conn.execute("SELECT * FROM llm_requests")


def test_users_cannot_write_status_outputs_or_owner(conn: psycopg.Connection) -> None:
    insert_request(conn, USER_A)
    with as_role(conn, "authenticated", USER_A), pytest.raises(errors.InsufficientPrivilege):
        conn.execute("UPDATE llm_requests SET status = 'done', content = 'forged'")
    with as_role(conn, "authenticated", USER_A), pytest.raises(errors.InsufficientPrivilege):
        conn.execute(
            "INSERT INTO llm_requests (messages, status, content) VALUES ('[]', 'done', 'x')"
        )
    with as_role(conn, "authenticated", USER_A), pytest.raises(errors.InsufficientPrivilege):
        conn.execute("INSERT INTO llm_requests (messages, owner) VALUES ('[]', %s)", (USER_B,))
    with as_role(conn, "authenticated", USER_A), pytest.raises(errors.InsufficientPrivilege):
        conn.execute("DELETE FROM llm_requests")


def test_b_cannot_attach_a_request_to_a_session_of_a(conn: psycopg.Connection) -> None:
    _, session_a = insert_request(conn, USER_A)
    with pytest.raises(errors.InsufficientPrivilege, match="belongs to another user"):
        insert_request(conn, USER_B, session=session_a)


def test_cancel_is_the_only_write_a_user_can_make(conn: psycopg.Connection) -> None:
    request_id = insert_request(conn, USER_A)[:1]
    with as_role(conn, "authenticated", USER_B):
        row = conn.execute("SELECT public.cancel_llm_request(%s)", (request_id[0],)).fetchone()
        assert row == (None,)
    with as_role(conn, "anon"), pytest.raises(errors.InsufficientPrivilege):
        conn.execute("SELECT public.cancel_llm_request(%s)", (request_id[0],))
    with conn.transaction():
        conn.execute(
            "SELECT set_config('role', 'authenticated', true),"
            " set_config('request.jwt.claims', %s, true)",
            (json.dumps({"role": "authenticated", "sub": USER_A}),),
        )
        row = conn.execute("SELECT public.cancel_llm_request(%s)", (request_id[0],)).fetchone()
    assert row == ("cancelled",)
    state = conn.execute(
        "SELECT status, cancel_requested FROM llm_requests WHERE id = %s", (request_id[0],)
    ).fetchone()
    assert state == ("cancelled", True)


def test_only_the_session_owner_can_join_its_topic(conn: psycopg.Connection) -> None:
    _, session_a = insert_request(conn, USER_A)
    topic = f"llm-token:{session_a}"
    assert can_join(conn, topic, USER_A)
    assert not can_join(conn, topic, USER_B)
    assert not can_join(conn, topic, None)  # anon
    assert not can_join(conn, f"llm-token:{uuid.uuid4()}", USER_A)  # no such session
    assert not can_join(conn, "llm-token:not-a-uuid", USER_A)
    assert not can_join(conn, f"other:{session_a}", USER_A)


def test_a_session_created_before_any_request_can_be_joined(conn: psycopg.Connection) -> None:
    session = str(uuid.uuid4())
    with conn.transaction():
        conn.execute(
            "SELECT set_config('role', 'authenticated', true),"
            " set_config('request.jwt.claims', %s, true)",
            (json.dumps({"role": "authenticated", "sub": USER_A}),),
        )
        conn.execute("INSERT INTO llm_sessions (id) VALUES (%s)", (session,))
    assert can_join(conn, f"llm-token:{session}", USER_A)
    assert not can_join(conn, f"llm-token:{session}", USER_B)


def test_users_cannot_broadcast_on_token_topics(conn: psycopg.Connection) -> None:
    """Realtime's write check: INSERT under RLS; denied (42501) for users."""
    _, session_a = insert_request(conn, USER_A)
    topic = f"llm-token:{session_a}"
    with (
        as_role(conn, "authenticated", USER_A, topic=topic),
        pytest.raises(errors.InsufficientPrivilege),
    ):
        conn.execute(
            "INSERT INTO realtime.messages (topic, extension) VALUES (%s, 'broadcast')", (topic,)
        )
    with as_role(conn, "service_role", topic=topic):
        conn.execute(
            "INSERT INTO realtime.messages (topic, extension) VALUES (%s, 'broadcast')", (topic,)
        )


def test_presence_is_not_granted(conn: psycopg.Connection) -> None:
    _, session_a = insert_request(conn, USER_A)
    topic = f"llm-token:{session_a}"
    with conn.transaction(force_rollback=True):
        probe = conn.execute(
            "INSERT INTO realtime.messages (topic, extension) VALUES (%s, 'presence') RETURNING id",
            (topic,),
        ).fetchone()
        assert probe is not None
        conn.execute(
            "SELECT set_config('role', 'authenticated', true),"
            " set_config('request.jwt.claims', %s, true), set_config('realtime.topic', %s, true)",
            (json.dumps({"role": "authenticated", "sub": USER_A}), topic),
        )
        rows = conn.execute("SELECT id FROM realtime.messages WHERE id = %s", (probe[0],))
        assert rows.fetchall() == []


def test_a_broadcast_row_is_not_readable_from_another_topics_context(
    conn: psycopg.Connection,
) -> None:
    """Issue 12: the policy checked the joined topic only, so a row of session B's topic
    was readable by A from the context of A's own topic."""
    _, session_a = insert_request(conn, USER_A)
    _, session_b = insert_request(conn, USER_B)
    topic_a, topic_b = f"llm-token:{session_a}", f"llm-token:{session_b}"
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO realtime.messages (topic, extension, event, payload)"
            " VALUES (%s, 'broadcast', 'llm-token', '{}') RETURNING id",
            (topic_b,),
        ).fetchone()
    assert row is not None
    with as_role(conn, "authenticated", USER_A, topic=topic_a):
        leaked = conn.execute("SELECT id FROM realtime.messages WHERE id = %s", (row[0],))
        assert leaked.fetchall() == []
    with as_role(conn, "authenticated", USER_B, topic=topic_b):
        own = conn.execute("SELECT id FROM realtime.messages WHERE id = %s", (row[0],))
        assert len(own.fetchall()) == 1
    assert can_join(conn, topic_a, USER_A)
    assert not can_join(conn, topic_b, USER_A)
