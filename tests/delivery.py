"""An independent check of what a subscriber received: exact, in order, nothing lost."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class DeliveryError(AssertionError):
    pass


@dataclass
class Received:
    """Raw `llm-token` payloads in arrival order, as a subscriber saw them."""

    payloads: list[dict[str, Any]]

    def check_exact(self, expected_text: str, *, allow_duplicates: bool = False) -> None:
        """Fail unless the messages tile offsets 0..N in arrival order and spell the text.

        A lost batch leaves a hole; a reordered one arrives below or above the next
        offset; a duplicate repeats one (tolerated only when retries are expected:
        the client rule drops them).
        """
        next_offset = 0
        pieces: list[str] = []
        for payload in self.payloads:
            offset, tokens = payload["offset"], payload["tokens"]
            end = offset + len(tokens)
            if offset > next_offset:
                raise DeliveryError(f"gap or reorder: expected offset {next_offset}, got {offset}")
            if offset < next_offset:
                if not allow_duplicates:
                    raise DeliveryError(f"duplicate or reorder at offset {offset}")
                if end > next_offset:
                    pieces.extend(tokens[next_offset - offset :])
                    next_offset = end
                continue
            pieces.extend(tokens)
            next_offset = end
        text = "".join(pieces)
        if text != expected_text:
            raise DeliveryError(
                f"text differs: got {len(text)} chars, expected {len(expected_text)}"
            )
