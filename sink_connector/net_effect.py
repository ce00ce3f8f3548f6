"""The net effect of a batch on each table. Pure.

A batch keeps the last change per key: a delete after an upsert wins, an upsert after a delete
re-creates the row, an update that leaves TOASTed columns `unchanged` is merged onto the row before
it. A TRUNCATE event (sent by the source to every partition) empties the rows of its partition:
the changes before it in that partition are dropped and the rows whose key hashes to that
partition are deleted before the rest of the batch is applied. A schema-change event (`s`) is not
part of the net effect: plan.py gives the table's batch the schema changes to apply before its rows.
"""

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pg_kafka_cdc.common.tables import TableName
from sink_connector.changes import DELETE_OPS, FULL_ROW_OPS, Change
from sink_connector.schema_changes import SchemaEvent


@dataclass
class Upsert:
    row: dict[str, Any]
    unchanged: set[str] | None
    partition: int
    # a snapshot read (`r`): written only where the target's row differs, as a snapshot taken while
    # streaming re-reads rows the target has already
    snapshot: bool = False


@dataclass
class TableBatch:
    """The net effect of a batch on one table."""

    table: TableName
    upserts: dict[bytes, Upsert] = field(default_factory=dict)
    deletes: dict[bytes, tuple[dict[str, Any], int]] = field(default_factory=dict)
    truncated: dict[int, int] = field(default_factory=dict)  # partition -> partition count
    # Rows a later change of the same key replaced: never written, but still checked by the target,
    # so a bad value cannot vanish behind a good one.
    replaced: list[dict[str, Any]] = field(default_factory=list)
    columns: dict[str, str] = field(default_factory=dict)
    key_columns: list[str] = field(default_factory=list)
    changes: int = 0
    ops: Counter[str] = field(default_factory=Counter)
    max_ts_us: int | None = None
    max_commit_lsn: int | None = None
    # applied (DDL) before the rows, in this order; the changes above are in the shape they give
    schema_changes: list[SchemaEvent] = field(default_factory=list)

    def add(self, change: Change) -> None:
        self.changes += 1
        self.ops[change.op] += 1
        columns = change.columns
        if columns is not None and columns is not self.columns:
            if not self.columns:
                self.columns = columns  # shared with the changes of that shape, never changed in place
            elif columns != self.columns:
                self.columns = {**self.columns, **columns}
            self.key_columns = change.key_columns or self.key_columns
        if change.ts_us is not None and (self.max_ts_us is None or change.ts_us > self.max_ts_us):
            self.max_ts_us = change.ts_us
        if change.commit_lsn is not None and (
            self.max_commit_lsn is None or change.commit_lsn > self.max_commit_lsn
        ):
            self.max_commit_lsn = change.commit_lsn
        op, key, row = change.op, change.key, change.row or {}
        if key in self.upserts:
            self.replaced.append(self.upserts[key].row)
        elif key in self.deletes:
            self.replaced.append(self.deletes[key][0])
        if op in FULL_ROW_OPS or (op == "u" and not change.unchanged):
            self.upserts[key] = Upsert(row, None, change.partition, op == "r")
            self.deletes.pop(key, None)
        elif op == "u":
            previous = self.upserts.get(key)
            missing = set(change.unchanged or ())
            if previous is not None:
                merged = {**previous.row, **row}
                missing |= previous.unchanged or set()
                missing -= merged.keys()
                self.upserts[key] = Upsert(merged, missing or None, change.partition)
            else:
                self.upserts[key] = Upsert(row, missing - row.keys() or None, change.partition)
                self.deletes.pop(key, None)
        elif op in DELETE_OPS:
            self.upserts.pop(key, None)
            self.deletes[key] = ({k: row[k] for k in (change.key_columns or row)}, change.partition)
        elif op == "t":  # the partition's rows go, so do the batch's earlier changes to them
            p = change.partition
            self.replaced += [u.row for u in self.upserts.values() if u.partition == p]
            self.replaced += [d[0] for d in self.deletes.values() if d[1] == p]
            self.upserts = {k: u for k, u in self.upserts.items() if u.partition != p}
            self.deletes = {k: d for k, d in self.deletes.items() if d[1] != p}
            self.truncated[p] = change.partitions or 1


def coalesce(changes: list[Change], tables: dict[str, TableName]) -> dict[TableName, TableBatch]:
    """Group a batch by table (in the order of the messages within each partition)."""
    batches: dict[TableName, TableBatch] = {}
    for change in changes:
        table = tables[change.topic]
        batch = batches.get(table)
        if batch is None:
            batch = batches[table] = TableBatch(table)
        batch.add(change)
    return batches
