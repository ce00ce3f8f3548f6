"""What the topics hold (source_connector/held.py): the last position of a partition, and a partition
whose last message cannot be read in time never taken for empty (its messages would be published
again)."""

from typing import Any

import orjson
import pytest

from pg_kafka_cdc.common.errors import ConnectError
from source_connector import held


class FakeMessage:
    def __init__(self, value: bytes | None) -> None:
        self._value = value

    def error(self) -> None:
        return None

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> None:
        return None


class FakeConsumer:
    """A partition holding `messages` at offsets 0..n-1; offsets in `slow` are never delivered."""

    def __init__(self, messages: list[bytes | None], slow: frozenset[int] = frozenset()) -> None:
        self.messages = messages
        self.slow = slow
        self.at: int | None = None

    def get_watermark_offsets(self, tp: Any, timeout: float) -> tuple[int, int]:
        return 0, len(self.messages)

    def assign(self, partitions: list[Any]) -> None:
        self.at = partitions[0].offset

    def unassign(self) -> None:
        self.at = None

    def consume(self, n: int, timeout: float) -> list[FakeMessage]:
        assert self.at is not None
        return [] if self.at in self.slow else [FakeMessage(self.messages[self.at])]


def change(commit_lsn: int, seq: int) -> bytes:
    return orjson.dumps({"op": "c", "source": {"commit_lsn": commit_lsn, "seq": seq}})


def test_the_last_message_gives_the_position() -> None:
    assert held.last_position(FakeConsumer([change(10, 1), change(20, 3)]), "t", 0) == (20, 3, 2)


def test_a_message_without_a_position_looks_back_one() -> None:
    assert held.last_position(FakeConsumer([change(10, 1), b"{}"]), "t", 0) == (10, 1, 2)


def test_an_empty_partition_holds_nothing() -> None:
    assert held.last_position(FakeConsumer([]), "t", 0) is None


def test_a_last_message_not_read_in_time_is_an_error_not_an_empty_partition(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(held, "READ_TIMEOUT", 0.01)
    with pytest.raises(ConnectError, match=r"t\[0\]"):
        held.last_position(FakeConsumer([change(10, 1), change(20, 3)], slow=frozenset({1})), "t", 0)


class GrowingConsumer:
    """A partition whose end offset grows by one at each of the first `grows` reads."""

    def __init__(self, grows: int) -> None:
        self.end = 10
        self.grows = grows

    def get_watermark_offsets(self, tp: Any, timeout: float) -> tuple[int, int]:
        if self.grows:
            self.grows -= 1
            self.end += 1
        return 0, self.end


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_the_last_positions_wait_until_the_partitions_stop_growing() -> None:
    clock = Clock()
    waited = held.wait_settled(GrowingConsumer(grows=6), {"t": 1}, clock, clock.sleep)
    # six reads saw it grow (3 s at 0.5 s a read), then it stayed still for SETTLE_FOR
    assert waited == pytest.approx(2.5 + held.SETTLE_FOR)
    clock = Clock()
    assert held.wait_settled(GrowingConsumer(grows=1), {"t": 1}, clock, clock.sleep) == held.SETTLE_FOR


def test_a_partition_that_keeps_growing_is_waited_for_at_most_settle_max() -> None:
    clock = Clock()
    assert held.wait_settled(GrowingConsumer(grows=10_000), {"t": 1}, clock, clock.sleep) == held.SETTLE_MAX
