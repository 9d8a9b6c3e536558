"""Per-row decoding of a claimed request's JSON columns (pure).

The claim returns `messages` and `params` as text and each row is decoded here, one
at a time, so a row that cannot be decoded (nested too deep, not JSON) becomes an
`Undecodable` value for validation to fail with its own reason; it can no longer
break the claim's fetch, and with it every other row of the claim.
"""

from __future__ import annotations

import json
from typing import Any

from worker.errors import bounded
from worker.jobs.models import Undecodable

# Chat messages nest about five levels (messages -> message -> content parts -> part
# -> image_url); anything far deeper is hostile and would recurse in every consumer.
MAX_JSON_DEPTH = 64


def decode_column(field: str, text: str | None, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The decoded value of one jsonb column, or `Undecodable` naming why not."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except RecursionError:
        return Undecodable(field, f"{field} is nested too deeply", bounded(text, 60))
    except json.JSONDecodeError as exc:
        return Undecodable(field, f"{field} is not valid JSON ({exc.msg})", bounded(text, 60))
    depth = json_depth(value)
    if depth > max_depth:
        return Undecodable(
            field, f"{field} is nested too deeply ({depth} > {max_depth} levels)", bounded(text, 60)
        )
    return value


def json_depth(value: Any) -> int:
    """Nesting depth of decoded JSON, without recursion (linear in its size)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest
