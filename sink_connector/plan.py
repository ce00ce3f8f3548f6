"""A batch of messages as data: what to apply per table, what to dead-letter, which offsets to store.
Pure: no connection, no consumer.

plan_batch drops the changes the target already has (applied.py) and those the bulk copy holds (the
hand-over), coalesces the rest per table (net_effect.coalesce) and names the offsets and source
positions the batch moves its partitions to.
"""

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from pg_kafka_cdc.common.tables import TableName
from schemas.codec import BadMessage, Position
from schemas.topics import table_for
from sink_connector.applied import Positions, new_changes
from sink_connector.bookkeeping import StreamPartition, TopicPartition
from sink_connector.changes import Change, Rejected
from sink_connector.net_effect import TableBatch, coalesce
from sink_connector.ports import Message
from sink_connector.preparation import TableState

Progress = tuple[TableName, int | None, int | None, int]  # table, newest commit µs, newest commit LSN, changes


@dataclass
class BatchPlan:
    """One target transaction: per-table net effects, dead letters, and the offsets to store."""

    tables: list[TableBatch]
    rejected: list[Rejected]
    positions: dict[TopicPartition, int]
    changes: list[Change]  # applied (after the hand-over filter), in message order
    skipped: int  # changes the bulk copy already held
    applied: dict[StreamPartition, Position] = field(default_factory=dict)  # the source positions to store
    duplicates: int = 0  # changes the target already had (applied.py)

    @property
    def progress(self) -> list[Progress]:
        return [(b.table, b.max_ts_us, b.max_commit_lsn, b.changes) for b in self.tables]


def positions_of(messages: Iterable[Message]) -> dict[TopicPartition, int]:
    """The next offset of every partition the messages come from."""
    positions: dict[TopicPartition, int] = {}
    for m in messages:
        positions[(m.topic(), m.partition())] = m.offset() + 1
    return positions


def positions_of_changes(changes: Iterable[Change]) -> dict[TopicPartition, int]:
    """The next offset past the changes, per partition (a batch cut short stores only these)."""
    positions: dict[TopicPartition, int] = {}
    for c in changes:
        tp = (c.topic, c.partition)
        positions[tp] = max(positions.get(tp, 0), c.offset + 1)
    return positions


def before(changes: Iterable[Change], topic: str, partition: int, offset: int) -> list[Change]:
    """The changes a message at (topic, partition, offset) does not precede."""
    return [c for c in changes if (c.topic, c.partition) != (topic, partition) or c.offset < offset]


def in_copy(change: Change, state: TableState | None) -> bool:
    """The hand-over: the table's bulk copy already holds this change, or snapshot reads are not
    wanted for a table filled by nothing (--snapshot never)."""
    if state is None:
        return False
    if state.snapshot is not None and state.snapshot.contains(
        change.op, change.xid, change.lsn, change.commit_lsn
    ):
        return True
    return change.op == "r" and state.mode == "never"


def plan_batch(
    changes: list[Change],
    rejected: list[Rejected],
    positions: dict[TopicPartition, int],
    topic_tables: Mapping[str, TableName],
    tables: Mapping[TableName, TableState],
    applied: Positions,
) -> BatchPlan:
    """The batch as one plan: the changes the target already has left out, then the hand-over
    filter, then the net effect per table."""
    new, duplicates, moved = new_changes(changes, applied)
    kept = [c for c in new if not in_copy(c, tables.get(topic_tables[c.topic]))]
    batches = coalesce(kept, dict(topic_tables))
    return BatchPlan(list(batches.values()), rejected, positions, kept, len(new) - len(kept), moved, duplicates)


def new_tables(
    changes: Iterable[Change], topic_tables: Mapping[str, TableName], known: Collection[TableName]
) -> dict[TableName, TableBatch]:
    """Tables of these changes not prepared yet, each with the columns of its first change that
    carries them (what creating the table from its events needs)."""
    found: dict[TableName, TableBatch] = {}
    for c in changes:
        table = topic_tables[c.topic]
        if table in known:
            continue
        pending = found.setdefault(table, TableBatch(table))
        if c.columns and not pending.columns:
            pending.add(c)
    return found


def merge_progress(earlier: list[Progress], later: list[Progress]) -> list[Progress]:
    """Progress figures not written yet, combined with a new batch's: newest times, summed counts."""

    def newest(a: int | None, b: int | None) -> int | None:
        return a if b is None else b if a is None else max(a, b)

    merged: dict[TableName, Progress] = {}
    for item in [*earlier, *later]:
        table = item[0]
        old = merged.get(table)
        merged[table] = (
            item if old is None else (table, newest(old[1], item[1]), newest(old[2], item[2]), old[3] + item[3])
        )
    return list(merged.values())


class TopicTables(dict[str, TableName]):
    """The table of each change topic seen so far."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def table_of(self, topic: str) -> TableName:
        table = self.get(topic)
        if table is None:
            table = table_for(self.prefix, topic)
            if table is None:
                raise BadMessage(f"topic {topic} is not a change topic of prefix {self.prefix}")
            self[topic] = table
        return table
