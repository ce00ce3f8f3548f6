"""pg_current_snapshot() text and the visibility of a transaction known by its 32-bit xid."""

from pg_kafka_cdc.common.snapshots import Snapshot, parse_snapshot
from pg_kafka_cdc.common.xid import widen


def visible(snapshot: str, xid: int) -> bool:
    return parse_snapshot(snapshot).visible(xid)


def test_parses_pg_current_snapshot_text() -> None:
    assert parse_snapshot("500:510:503,507") == Snapshot(500, 510, frozenset({503, 507}))
    assert parse_snapshot("42:42:") == Snapshot(42, 42, frozenset())
    big = (3 << 32) + 10
    assert parse_snapshot(f"{big}:{big + 5}:{big + 1}") == Snapshot(big, big + 5, frozenset({big + 1}))


def test_widen_takes_the_epoch_of_the_snapshot() -> None:
    assert widen(100, 200) == 100
    assert widen(100, (3 << 32) + 200) == (3 << 32) + 100


def test_widen_of_a_transaction_from_the_previous_epoch() -> None:
    # xmax just past a wraparound: an xid near 2^32 belongs to the epoch before.
    assert widen(4_294_967_000, (1 << 32) + 5) == 4_294_967_000


def test_visible_below_xmin() -> None:
    assert visible("500:510:", 499)


def test_not_visible_at_or_after_xmax() -> None:
    assert not visible("500:510:", 510)
    assert not visible("500:510:", 600)


def test_in_progress_list() -> None:
    assert not visible("500:510:503,507", 503)
    assert visible("500:510:503,507", 504)
    assert visible("500:510:", 505)


def test_in_progress_in_a_later_epoch() -> None:
    base = 7 << 32
    snapshot = f"{base + 500}:{base + 510}:{base + 503}"
    assert not visible(snapshot, 503)
    assert visible(snapshot, 502)
