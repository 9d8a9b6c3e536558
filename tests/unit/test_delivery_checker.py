"""The end-to-end checker must catch exactly what it claims to catch."""

import pytest

from tests.delivery import DeliveryError, Received

TOKENS = ["Hel", "lo", ",", " wor", "ld", " ", "✓", "!"]


def batches(size: int) -> list[dict[str, object]]:
    return [{"offset": i, "tokens": TOKENS[i : i + size]} for i in range(0, len(TOKENS), size)]


def test_exact_stream_passes() -> None:
    Received(batches(3)).check_exact("".join(TOKENS))


def test_a_lost_batch_fails() -> None:
    payloads = batches(3)
    del payloads[1]
    with pytest.raises(DeliveryError, match="gap"):
        Received(payloads).check_exact("".join(TOKENS))


def test_a_lost_last_batch_fails() -> None:
    with pytest.raises(DeliveryError, match="text differs"):
        Received(batches(3)[:-1]).check_exact("".join(TOKENS))


def test_reordered_batches_fail() -> None:
    payloads = batches(2)
    payloads[1], payloads[2] = payloads[2], payloads[1]
    with pytest.raises(DeliveryError):
        Received(payloads).check_exact("".join(TOKENS))


def test_duplicates_fail_unless_expected() -> None:
    payloads = batches(3)
    payloads.insert(2, payloads[1])
    with pytest.raises(DeliveryError, match="duplicate"):
        Received(payloads).check_exact("".join(TOKENS))
    Received(payloads).check_exact("".join(TOKENS), allow_duplicates=True)
