"""A batch of messages as data: what to apply per table, what to dead-letter, which offsets to store.
Pure: no connection, no consumer.

plan_batch drops the changes the target already has (applied.py) and those the bulk copy holds (the
hand-over), sets the schema-change events aside (each applied once per table, before the table's
rows, unless the history says it was already: schema_history.py), translates the changes older than
a schema change to the table's current shape (schema_changes.TableShapes), coalesces the rest per
table (net_effect.coalesce) and names the offsets and source positions the batch moves its
partitions to.
"""

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from pg_kafka_cdc.common.tables import TableName
from schemas.codec import BadMessage, Position
from schemas.topics import table_for
from sink_connector.applied import Positions, new_changes
from sink_connector.bookkeeping import StreamPartition, TopicPartition
from sink_connector.changes import SCHEMA_CHANGE, Change, Rejected
from sink_connector.net_effect import TableBatch, coalesce
from sink_connector.ports import Message
from sink_connector.preparation import TableState
from sink_connector.schema_changes import SchemaEvent, TableShapes, event_of
from sink_connector.schema_history import SchemaHistory

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
    schema_skipped: int = 0  # schema-change events not applied (--schema-changes none)

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
    history: SchemaHistory | None = None,
) -> BatchPlan:
    """The batch as one plan: the changes the target already has left out, then the hand-over
    filter, then the schema changes and the net effect per table."""
    new, duplicates, moved = new_changes(changes, applied)
    kept = [c for c in new if not in_copy(c, tables.get(topic_tables[c.topic]))]
    rows, events, skipped = schema_changes_of(kept, topic_tables, tables, history)
    batches = coalesce(rows, dict(topic_tables))
    for table, found in events.items():
        batch = batches.get(table)
        if batch is None:
            batch = batches[table] = TableBatch(table)
        batch.schema_changes = found
    plan = BatchPlan(list(batches.values()), rejected, positions, kept, len(new) - len(kept), moved, duplicates)
    plan.schema_skipped = skipped
    return plan


def schema_changes_of(
    changes: list[Change],
    topic_tables: Mapping[str, TableName],
    tables: Mapping[TableName, TableState],
    history: SchemaHistory | None,
) -> tuple[list[Change], dict[TableName, list[SchemaEvent]], int]:
    """The row changes (those older than a schema change translated to the table's current shape),
    the schema changes to apply per table (each event once, none the history holds, in the order of
    their positions), and how many schema-change events are skipped (--schema-changes none)."""
    if history is None or not history.applies:
        rows = [c for c in changes if c.op != SCHEMA_CHANGE]
        return rows, {}, len(changes) - len(rows)
    events: dict[TableName, list[SchemaEvent]] = {}
    seen: dict[TableName, set[tuple[str, int, int]]] = {}
    for c in changes:
        if c.op != SCHEMA_CHANGE:
            continue
        table = topic_tables[c.topic]
        state = tables.get(table)
        if state is None:  # no target table (nothing to change): created later from the new shape
            continue
        known = seen.get(table)
        if known is None:
            known = seen[table] = history.known(table, state.target.oid)
        event = event_of(c)
        if event.ident not in known and not history.superseded(table, state.target.oid, event):
            known.add(event.ident)
            events.setdefault(table, []).append(event)
    for found in events.values():
        found.sort(key=lambda e: (e.stream, e.position))
    if not events and not history.entries:  # the common case: nothing to translate
        return [c for c in changes if c.op != SCHEMA_CHANGE], events, 0
    shapes: dict[TableName, TableShapes | None] = {}
    rows = []
    for c in changes:
        if c.op == SCHEMA_CHANGE:
            continue
        table = topic_tables[c.topic]
        if table not in shapes:
            state = tables.get(table)
            shapes[table] = (
                None if state is None else history.shapes(table, state.target.oid, events.get(table, ()))
            )
        table_shapes = shapes[table]
        rows.append(c if table_shapes is None else table_shapes.translate(c))
    return rows, events, 0


def new_tables(
    changes: Iterable[Change],
    topic_tables: Mapping[str, TableName],
    known: Collection[TableName],
    schema_changes: bool = True,
) -> dict[TableName, TableBatch]:
    """Tables of these changes not prepared yet, each with the columns of its first change that
    carries them (what creating the table from its events needs): of a row, else of a schema-change
    event (the table's new shape), unless they are not applied (`schema_changes` false)."""
    found: dict[TableName, TableBatch] = {}
    shapes: dict[TableName, Change] = {}
    for c in changes:
        table = topic_tables[c.topic]
        if table in known:
            continue
        pending = found.setdefault(table, TableBatch(table))
        if c.op == SCHEMA_CHANGE:
            if schema_changes and c.columns and c.key_columns:
                shapes.setdefault(table, c)
        elif c.columns and not pending.columns:
            pending.add(c)
    for table, shape in shapes.items():
        if not found[table].columns:
            found[table].add(shape)
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
