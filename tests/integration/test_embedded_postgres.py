import psycopg
import pytest

pytestmark = pytest.mark.integration


def test_supabase_shim_gives_rls_the_claims(database_url: str) -> None:
    """auth.uid() and realtime.topic() read what Realtime / PostgREST set per transaction."""
    with psycopg.connect(database_url) as conn:
        conn.execute("SET LOCAL role authenticated")
        conn.execute(
            "SELECT set_config('request.jwt.claims', %s, true)",
            ('{"sub":"6f1b1c1e-0000-4000-8000-000000000001","role":"authenticated"}',),
        )
        conn.execute("SELECT set_config('realtime.topic', 'llm-token:s1', true)")
        row = conn.execute("SELECT auth.uid()::text, auth.role(), realtime.topic()").fetchone()
    assert row == ("6f1b1c1e-0000-4000-8000-000000000001", "authenticated", "llm-token:s1")


def test_each_test_gets_its_own_database(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE only_here (x int)")
        names = conn.execute("SELECT count(*) FROM pg_database").fetchone()
    assert names is not None and names[0] >= 3
