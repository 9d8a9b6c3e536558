"""The queue's SQL, loaded once from `queries.sql` (named blocks, procrastinate style).

A block starts with a line `-- name: <key>`; everything up to the next such line
is its statement (comments included, which Postgres ignores). Nothing outside
`worker/jobs` sees SQL.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

QUERIES_FILE = Path(__file__).with_name("queries.sql")
_HEADER = re.compile(r"^-- name: ([a-z_]+)\s*$", re.MULTILINE)


def parse_queries(text: str) -> dict[str, str]:
    """Split the text of a queries file into {name: statement}."""
    queries: dict[str, str] = {}
    headers = list(_HEADER.finditer(text))
    for header, following in zip(headers, [*headers[1:], None], strict=True):
        end = following.start() if following else len(text)
        name = header.group(1)
        if name in queries:
            raise ValueError(f"query {name!r} defined twice")
        body = text[header.end() : end].strip()
        if not body:
            raise ValueError(f"query {name!r} is empty")
        queries[name] = body
    return queries


@cache
def queries() -> dict[str, str]:
    return parse_queries(QUERIES_FILE.read_text(encoding="utf-8"))


def query(name: str) -> str:
    """One named statement; a typo is a programmer error (KeyError)."""
    return queries()[name]
