"""What the target holds already: per partition, the last source position applied of each change
stream, stored in the batch's transaction (bookkeeping's `positions` table). A change at or before
it was applied before (the topic holds it twice: written by an older source that crashed, copied,
or read again by a new consumer group) and is skipped, so no row is written twice and no key steps
back in time. Pure.

A position is (commit LSN, seq, rank), as schemas.envelope defines it; it orders the messages of one
stream (`source.stream`) along a partition. Messages of another stream (another slot or server)
are compared only with that stream's own positions; messages without a position (another
producer's) are always applied.
"""

from collections.abc import Iterable, Mapping

from schemas.codec import RANKS, TOMBSTONE_RANK, Position
from sink_connector.bookkeeping import StreamPartition
from sink_connector.changes import TOMBSTONE, Change

# (topic, partition, stream) -> the last position applied; stream "" for messages that name none
Positions = Mapping[StreamPartition, Position]


def position_of(change: Change) -> Position | None:
    if change.commit_lsn is None or change.seq is None:
        return None
    rank = TOMBSTONE_RANK if change.op == TOMBSTONE else RANKS.get(change.op, 2)
    return change.commit_lsn, change.seq, rank


def new_changes(
    changes: Iterable[Change], applied: Positions
) -> tuple[list[Change], int, dict[StreamPartition, Position]]:
    """The changes past what `applied` holds (and past the batch's own earlier ones), how many were
    not, and the positions to store for the partitions they move."""
    kept: list[Change] = []
    moved: dict[StreamPartition, Position] = {}
    skipped = 0
    for c in changes:
        here = position_of(c)
        if here is None:
            kept.append(c)
            continue
        where = (c.topic, c.partition, c.stream or "")
        last = moved.get(where) or applied.get(where)
        if last is not None and here <= last:
            skipped += 1
            continue
        moved[where] = here
        kept.append(c)
    return kept, skipped, moved
