"""applied.py: a change at or before the last position applied of its stream and partition is
skipped; everything past it is kept, in order."""

from hypothesis import given
from hypothesis import strategies as st

from sink_connector.applied import new_changes, position_of
from sink_connector.changes import TOMBSTONE, Change

changes = st.lists(
    st.tuples(st.integers(0, 1), st.sampled_from(["", "A", "B"]), st.integers(1, 4), st.integers(0, 3)),
    max_size=40,
)


def change(partition: int, stream: str, commit_lsn: int, seq: int, op: str = "c") -> Change:
    c = Change("t", partition, 0, b"k", op, {}, None, None, commit_lsn=commit_lsn)
    c.seq, c.stream = seq, stream or None
    return c


@given(changes)
def test_what_is_kept_moves_forward_and_a_second_reading_keeps_nothing(
    items: list[tuple[int, str, int, int]],
) -> None:
    batch = [change(*item) for item in items]
    kept, skipped, moved = new_changes(batch, {})
    assert len(kept) + skipped == len(batch)
    last: dict[tuple[int, str], tuple[int, int, int]] = {}
    for c in kept:
        here = position_of(c)
        assert here is not None
        where = (c.partition, c.stream or "")
        assert where not in last or here > last[where]
        last[where] = here
    assert moved == {("t", p, s): pos for (p, s), pos in last.items()}
    again, skipped_again, _ = new_changes(batch, moved)
    assert again == [] and skipped_again == len(batch)


def test_a_delete_its_tombstone_and_a_create_of_one_change_are_three_positions() -> None:
    batch = [change(0, "A", 10, 1, "d"), change(0, "A", 10, 1, TOMBSTONE), change(0, "A", 10, 1, "c")]
    kept, skipped, _ = new_changes(batch, {})
    assert [c.op for c in kept] == ["d", TOMBSTONE, "c"] and skipped == 0


def test_a_change_without_a_position_is_always_kept() -> None:
    c = Change("t", 0, 0, b"k", "c", {}, None, None)
    assert new_changes([c, c], {("t", 0, ""): (99, 99, 2)})[0] == [c, c]
