"""The hand-over from the bulk copy to the stream: which streamed events the copy already holds."""

from hypothesis import given
from hypothesis import strategies as st

from pg_kafka_cdc.common.xid import EPOCH as XID_EPOCH
from sink_connector.changes import TOMBSTONE
from sink_connector.handover import CopySnapshot

COPY_LSN = 5000
SNAPSHOT = CopySnapshot.parse("500:510:503,507", COPY_LSN)


def test_parses_pg_current_snapshot_text() -> None:
    assert CopySnapshot.parse("500:510:503,507", COPY_LSN) == CopySnapshot(
        500, 510, frozenset({503, 507}), COPY_LSN
    )
    assert CopySnapshot.parse("42:42:", 7) == CopySnapshot(42, 42, frozenset(), 7)
    big = (3 << 32) + 10
    assert CopySnapshot.parse(f"{big}:{big + 5}:{big + 1}", 1).xip == frozenset({big + 1})


def test_visible_below_xmin() -> None:
    assert SNAPSHOT.visible(499)
    assert SNAPSHOT.visible(3)


def test_not_visible_at_or_after_xmax() -> None:
    assert not SNAPSHOT.visible(510)
    assert not SNAPSHOT.visible(600)


def test_running_transactions_are_not_visible() -> None:
    assert SNAPSHOT.visible(500)  # xmin itself is not running unless it is in xip
    assert not SNAPSHOT.visible(503)
    assert SNAPSHOT.visible(504)
    assert not SNAPSHOT.visible(507)
    assert SNAPSHOT.visible(509)


def test_widen_takes_the_epoch_of_the_snapshot() -> None:
    base = 7 << 32
    snapshot = CopySnapshot(base + 100, base + 200, frozenset(), 0)
    assert snapshot.widen(150) == base + 150
    assert snapshot.widen(300) == base + 300


def test_widen_an_xid_of_the_previous_epoch() -> None:
    """Just past a wraparound, an xid near 2^32 is from the epoch before."""
    base = 7 << 32
    snapshot = CopySnapshot(base + 3, base + 5, frozenset(), 0)
    assert snapshot.widen(XID_EPOCH - 10) == base - 10
    assert snapshot.visible(XID_EPOCH - 10)
    assert not snapshot.visible(5)


def test_widen_an_xid_of_the_next_epoch() -> None:
    """Just before a wraparound, a small xid is from the epoch after."""
    base = 7 << 32
    snapshot = CopySnapshot(base + XID_EPOCH - 20, base + XID_EPOCH - 10, frozenset({base + XID_EPOCH - 15}), 0)
    assert snapshot.widen(3) == base + XID_EPOCH + 3
    assert not snapshot.visible(3)
    assert not snapshot.visible(XID_EPOCH - 15)
    assert snapshot.visible(XID_EPOCH - 14)
    assert snapshot.visible(XID_EPOCH - 21)


def test_a_running_transaction_across_a_wraparound() -> None:
    base = 7 << 32
    snapshot = CopySnapshot(base - 5, base + 5, frozenset({base - 2, base + 1}), 0)
    assert not snapshot.visible(XID_EPOCH - 2)
    assert snapshot.visible(XID_EPOCH - 3)
    assert not snapshot.visible(1)
    assert snapshot.visible(2)
    assert snapshot.visible(XID_EPOCH - 6)


def test_streamed_change_visible_in_the_snapshot_is_in_the_copy() -> None:
    assert SNAPSHOT.contains("c", 504, 4000, 4100)
    assert SNAPSHOT.contains("u", 499, 100, 200)
    assert SNAPSHOT.contains("d", 504, None, None)
    assert SNAPSHOT.contains(TOMBSTONE, 504, 4000, 4100)  # the delete's position, from its header


def test_streamed_change_not_visible_in_the_snapshot_is_applied() -> None:
    assert not SNAPSHOT.contains("c", 503, 4000, 4100)  # running when the copy started
    assert not SNAPSHOT.contains("u", 510, 4000, 4100)  # started after it
    assert not SNAPSHOT.contains("d", 600, 4000, 4100)


def test_a_commit_at_or_after_the_copy_position_is_applied_whatever_its_xid() -> None:
    assert not SNAPSHOT.contains("c", 499, 4000, COPY_LSN)
    assert not SNAPSHOT.contains("c", 504, 4000, COPY_LSN + 1)
    assert SNAPSHOT.contains("c", 504, 4000, COPY_LSN - 1)


def test_a_change_without_xid_is_applied() -> None:
    assert not SNAPSHOT.contains("c", None, 100, 200)
    assert not SNAPSHOT.contains("d", None, 100, None)
    assert not SNAPSHOT.contains(TOMBSTONE, None, None, None)  # a tombstone without the header


def test_a_truncate_with_a_transaction_is_a_change_like_the_others() -> None:
    assert SNAPSHOT.contains("t", 504, 4000, 4100)
    assert not SNAPSHOT.contains("t", 503, 4000, 4100)
    assert not SNAPSHOT.contains("t", 499, 4000, COPY_LSN)


def test_snapshot_reads_older_than_the_copy_are_in_it() -> None:
    assert SNAPSHOT.contains("r", None, COPY_LSN - 1, None)
    assert SNAPSHOT.contains("r", None, None, None)
    assert SNAPSHOT.contains("r", 600, 100, None)  # not the visibility test: the slot was created before


def test_snapshot_reads_of_a_slot_created_after_the_copy_are_applied() -> None:
    assert not SNAPSHOT.contains("r", None, COPY_LSN + 1, None)
    assert not SNAPSHOT.contains("r", 504, COPY_LSN + 100, COPY_LSN - 1)  # not the visibility test either


def test_a_truncate_without_xid_is_a_snapshot_restart_like_r() -> None:
    for lsn in (None, 0, COPY_LSN - 1, COPY_LSN + 1, COPY_LSN + 100):
        assert SNAPSHOT.contains("t", None, lsn, None) == SNAPSHOT.contains("r", None, lsn, None)
    assert SNAPSHOT.contains("t", None, COPY_LSN - 1, None)
    assert not SNAPSHOT.contains("t", None, COPY_LSN + 1, None)


def reference_visible(xmin: int, xmax: int, xip: frozenset[int], full: int) -> bool:
    """PostgreSQL's rule on 64-bit xids."""
    return full < xmin or (full < xmax and full not in xip)


@st.composite
def snapshots_and_xids(draw: st.DrawFn) -> tuple[CopySnapshot, int]:
    """A snapshot anywhere in the 64-bit xid space and a transaction within 2^31 of its xmax."""
    xmax = draw(st.integers(3, 1 << 40))
    xmin = draw(st.integers(max(3, xmax - 1000), xmax))
    xip = frozenset(draw(st.lists(st.integers(xmin, xmax - 1), max_size=5)) if xmax > xmin else [])
    half = XID_EPOCH // 2
    full = draw(
        st.one_of(
            st.integers(max(0, xmax - half + 1), xmax + half - 1),
            st.integers(max(0, xmin - 3), xmax + 3),
            st.sampled_from(sorted(xip)) if xip else st.just(xmin),
        )
    )
    return CopySnapshot(xmin, xmax, xip, 0), full


@given(snapshots_and_xids())
def test_widen_recovers_the_64_bit_xid(case: tuple[CopySnapshot, int]) -> None:
    snapshot, full = case
    assert snapshot.widen(full % XID_EPOCH) == full
    assert snapshot.visible(full % XID_EPOCH) == reference_visible(
        snapshot.xmin, snapshot.xmax, snapshot.xip, full
    )
