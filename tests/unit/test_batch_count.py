"""batch_count: how many messages the sink asks for, so that a batch stays within its byte budget."""

from dataclasses import dataclass

from pg_kafka_cdc.common.tables import TableName
from sink_connector.consumer import batch_count
from sink_connector.plan import merge_progress

BUDGET = 8 << 20


@dataclass(frozen=True)
class Msg:
    """What batch_count reads of a consumed message."""

    payload: bytes | None
    key_bytes: bytes | None = b'{"id": 1}'

    def value(self) -> bytes | None:
        return self.payload

    def key(self) -> bytes | None:
        return self.key_bytes


def test_small_messages_get_the_most() -> None:
    assert batch_count([Msg(b"x" * 200)] * 500, 10_000, BUDGET) == 10_000
    assert batch_count([Msg(b"x" * 200)], 10_000, BUDGET) == 10_000


def test_4_kb_messages_fit_about_2000_in_8_mib() -> None:
    count = batch_count([Msg(b"x" * 4096)] * 10_000, 10_000, BUDGET)
    assert 1900 <= count <= 2048
    assert count == BUDGET // (4096 + len(b'{"id": 1}'))


def test_keys_count_too() -> None:
    assert batch_count([Msg(b"", b"k" * 1024)] * 10, 10_000, 1 << 20) == 1024


def test_tombstones_count_zero_bytes_of_value() -> None:
    assert batch_count([Msg(None)] * 100, 10_000, BUDGET) == 10_000
    assert batch_count([Msg(None, b"k" * 1000)] * 100, 10_000, 100_000) == 100
    assert batch_count([Msg(None, None)] * 100, 10_000, 10) == 10  # an empty message counts one byte


def test_the_sample_averages_mixed_sizes() -> None:
    messages = [Msg(b"x" * 8192, None), Msg(None, None)] * 1000  # 4 KiB on average
    assert 1800 <= batch_count(messages, 10_000, BUDGET) <= 2300


def test_never_below_one() -> None:
    assert batch_count([Msg(b"x" * (16 << 20))], 10_000, BUDGET) == 1
    assert batch_count([Msg(b"x" * 100)], 10_000, 0) == 1
    assert batch_count([Msg(b"x")] * 3, 0, BUDGET) == 1


def test_never_above_the_most() -> None:
    assert batch_count([Msg(None, None)] * 64, 7, BUDGET) == 7


def test_unsaved_progress_merges_with_the_next_batch() -> None:
    person, orders = TableName("public", "person"), TableName("public", "orders")
    merged = merge_progress(
        [(person, 100, 7, 3), (orders, None, None, 1)], [(person, 90, 9, 2), (orders, 50, 4, 5)]
    )
    assert merged == [(person, 100, 9, 5), (orders, 50, 4, 6)]
    assert merge_progress([], [(person, 1, 2, 3)]) == [(person, 1, 2, 3)]
