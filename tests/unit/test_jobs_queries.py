import pytest

from worker.jobs.queries import parse_queries, queries


def test_every_block_the_repository_runs_is_defined() -> None:
    names = set(queries())
    expected = {"claim", "sweep", "heartbeat", "checkpoint", "cancel_requested", "finish"}
    assert (
        expected
        | {"release", "get", "act_as_user", "create_session", "submit", "cancel"}
        | {"append_chunks", "read_chunks", "prune_chunks"}
        == names
    )


def test_blocks_are_split_on_name_headers() -> None:
    parsed = parse_queries("-- intro\n-- name: a\nSELECT 1;\n\n-- name: b_c\n-- why\nSELECT 2;\n")
    assert parsed == {"a": "SELECT 1;", "b_c": "-- why\nSELECT 2;"}


def test_duplicate_and_empty_blocks_are_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        parse_queries("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;\n")
    with pytest.raises(ValueError, match="empty"):
        parse_queries("-- name: a\n\n-- name: b\nSELECT 2;\n")
