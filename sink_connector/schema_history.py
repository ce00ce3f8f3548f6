"""The schema changes the sink applied to each target table, kept in the state schema (table
`schema_changes`, created by bookkeeping.Bookkeeping.install) in the transaction of their DDL, and in
memory for planning batches.

An entry is keyed by the target table's oid and the event's (stream, commit LSN, seq): the same
event arrives on every partition of the table's topic, and again when a topic is replayed (`cdc-sink
rebuild` keeps the history of the tables it empties), and is applied once. The entries of a table
whose oid is not the target table's any more (dropped and created again) are ignored, and deleted
when the new table gets its first entry.
"""

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from psycopg2 import sql

from pg_kafka_cdc.common.tables import TableName
from sink_connector.schema_changes import DEFAULT_MODE, EventId, SchemaEvent, TableShapes, parse_document

TABLE = "schema_changes"

DDL = """CREATE TABLE IF NOT EXISTS {schema}.schema_changes (
        table_oid   oid NOT NULL,
        schema_name text NOT NULL,
        table_name  text NOT NULL,
        stream      text NOT NULL,
        commit_lsn  bigint NOT NULL,
        seq         bigint NOT NULL,
        mode        text NOT NULL,
        event       jsonb NOT NULL,
        applied_at  timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (table_oid, stream, commit_lsn, seq))"""


@dataclass
class SchemaHistory:
    """The schema changes applied, per table (and its oid), in memory; `mode` is --schema-changes."""

    mode: str = DEFAULT_MODE
    entries: dict[TableName, list[tuple[int, SchemaEvent]]] = field(default_factory=dict)

    @property
    def applies(self) -> bool:
        """Whether schema-change events are applied at all (not --schema-changes none)."""
        return self.mode != "none"

    def of(self, table: TableName, oid: int) -> list[SchemaEvent]:
        return [e for o, e in self.entries.get(table, ()) if o == oid]

    def known(self, table: TableName, oid: int) -> set[EventId]:
        return {e.ident for o, e in self.entries.get(table, ()) if o == oid}

    def superseded(self, table: TableName, oid: int, event: SchemaEvent) -> bool:
        """An event older than one applied to the table already (same stream): the shape it tells of
        is past. (A source restarted after a DDL, with older changes still to stream, first tells of
        the shape back to the old one: when part of that reaches a partition only after the real
        change was applied from another, it is not applied again.)"""
        return any(
            o == oid and e.stream == event.stream and e.position > event.position
            for o, e in self.entries.get(table, ())
        )

    def shapes(self, table: TableName, oid: int, batch: Iterable[SchemaEvent] = ()) -> TableShapes | None:
        """For translating the table's changes: its history and the batch's new events (None: none)."""
        events = [*self.of(table, oid), *batch]
        if not events:
            return None
        return TableShapes(events, self.mode == "drop")

    def add(self, table: TableName, oid: int, events: Iterable[SchemaEvent]) -> None:
        """Events committed to the target table (of this oid): entries of another oid go."""
        kept = [(o, e) for o, e in self.entries.get(table, ()) if o == oid]
        known = {e.ident for _, e in kept}
        kept += [(oid, e) for e in events if e.ident not in known]
        self.entries[table] = kept


def _t(schema: str) -> sql.Identifier:
    return sql.Identifier(schema, TABLE)


def load(cur: Any, schema: str, mode: str) -> SchemaHistory:
    """Every entry of the state schema's history."""
    cur.execute(
        sql.SQL(
            "SELECT table_oid, schema_name, table_name, stream, commit_lsn, seq, event FROM {} "
            "ORDER BY schema_name, table_name, stream, commit_lsn, seq"
        ).format(_t(schema))
    )
    history = SchemaHistory(mode)
    for oid, schema_name, table_name, stream, commit_lsn, seq, event in cur.fetchall():
        doc = event if isinstance(event, dict) else orjson.loads(event)
        history.entries.setdefault(TableName(schema_name, table_name), []).append(
            (int(oid), parse_document(stream, int(commit_lsn), int(seq), doc))
        )
    return history


def record(cur: Any, schema: str, table: TableName, oid: int, event: SchemaEvent, mode: str) -> None:
    """In the transaction of the event's DDL: the entry, and the end of those of an older table of
    the same name."""
    cur.execute(
        sql.SQL("DELETE FROM {} WHERE schema_name = %s AND table_name = %s AND table_oid <> %s").format(
            _t(schema)
        ),
        (table.schema, table.name, oid),
    )
    cur.execute(
        sql.SQL(
            "INSERT INTO {} (table_oid, schema_name, table_name, stream, commit_lsn, seq, mode, event) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s::jsonb) ON CONFLICT DO NOTHING"
        ).format(_t(schema)),
        (
            oid,
            table.schema,
            table.name,
            event.stream,
            event.commit_lsn,
            event.seq,
            mode,
            orjson.dumps(event.document()).decode(),
        ),
    )


def stored(cur: Any, schema: str, table: TableName, oid: int) -> set[EventId]:
    """The events of the table recorded by now (by any sink)."""
    cur.execute(
        sql.SQL(
            "SELECT stream, commit_lsn, seq FROM {} WHERE table_oid = %s AND schema_name = %s AND table_name = %s"
        ).format(_t(schema)),
        (oid, table.schema, table.name),
    )
    return {(s, int(c), int(q)) for s, c, q in cur.fetchall()}
