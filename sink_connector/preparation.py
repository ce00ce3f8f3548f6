"""Making a target table ready to take changes: loaded as it is, created from the types events
carry, or created from the source catalog and bulk-copied (waiting for the source's slot first).
One sink process at a time does it per table (an advisory lock), recorded in cdc_sink.snapshots."""

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg2
from psycopg2 import sql

from pg_kafka_cdc.common.catalog import TableDef, read_table
from pg_kafka_cdc.common.errors import CdcError, SinkError
from pg_kafka_cdc.common.pg import connect_source
from pg_kafka_cdc.common.progress import RowProgress
from pg_kafka_cdc.common.settings import Settings
from pg_kafka_cdc.common.signals import StopFlag
from pg_kafka_cdc.common.tables import TableName
from schemas.topics import topic_for
from sink_connector.added_columns import SourceAccess, ensure_types
from sink_connector.bookkeeping import Bookkeeping
from sink_connector.bulk_copy import CopyResult, copy_table
from sink_connector.handover import CopySnapshot
from sink_connector.net_effect import TableBatch
from sink_connector.target import TargetTable, create_from_event, create_from_source, load

log = logging.getLogger("sink.prepare")


@dataclass
class TableState:
    target: TargetTable
    mode: str  # how it was first filled: copy, topic or never
    snapshot: CopySnapshot | None  # the copy's snapshot, for the hand-over


class Connected(Protocol):
    conn: Any

    def explain(self, exc: BaseException, table: TableName | None = None) -> str | None:
        """The target's constraint or trigger that refused a write, with its fix; None for other errors."""

    def writing(self) -> None:
        """Called before the first write: warns once when the session cannot apply as a replica."""


@dataclass
class TablePreparer:
    settings: Settings
    book: Bookkeeping
    snapshot_mode: str  # the first fill of a table: copy, topic or never
    rebuild: tuple[TableName, ...]
    slot: str
    stop: StopFlag
    session: Connected  # the target connection (session.TargetSession), current after reconnects
    tables: dict[TableName, TableState] = field(default_factory=dict)
    copied_rows: Counter[str] = field(default_factory=Counter)
    source: SourceAccess | None = None  # for the user-defined types of a table created from events

    def prepare(self, table: TableName, batch: TableBatch | None) -> TableState | None:
        """The target table ready to take changes, in a transaction of its own: bulk-copied, created
        or loaded. None when it does not exist and the batch says nothing about its columns (only
        deletes)."""
        state = self.tables.get(table)
        if state is not None:
            return state
        conn = self.session.conn
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"cdc-sink {table}",))
            record = self.book.initialized(cur, table)
            target = load(conn, table)
            if record is None:
                mode = "topic" if table in self.rebuild else self.snapshot_mode
                snapshot = None
                if mode == "copy":
                    target, snapshot = self._copy(conn, cur, table, target)
                else:
                    if target is None:
                        if batch is None or not batch.columns:
                            conn.rollback()
                            return None
                        target = self._create_from_event(conn, cur, table, batch)
                    self.book.record_initialized(cur, table, mode, None, None, 0, self.topic(table))
            else:
                self._check_filled_from(cur, table)
                mode, snapshot = record
                if target is None:
                    if batch is None or not batch.columns:
                        conn.rollback()
                        return None
                    target = self._create_from_event(conn, cur, table, batch)
        conn.commit()
        state = TableState(target, mode, snapshot)
        self.tables[table] = state
        return state

    def _create_from_event(self, conn: Any, cur: Any, table: TableName, batch: TableBatch) -> TargetTable:
        """The table created from the columns its events carry; the user-defined types they name that
        the target lacks are created first from the source's catalog."""
        ensure_types(cur, self.source, table, batch.columns)
        return create_from_event(conn, table, batch.columns, batch.key_columns)

    def topic(self, table: TableName) -> str:
        return topic_for(self.settings.topic_prefix, table)

    def _check_filled_from(self, cur: Any, table: TableName) -> None:
        """A table another stream filled is not merged with this one's changes: its rows would
        include changes this stream never saw (rows deleted on the source since, kept for good)."""
        filled, mine = self.book.filled_from(cur, table), self.topic(table)
        if filled is not None and filled != mine:
            raise SinkError(
                f"target table {table} was filled from topic {filled}, not from {mine}, which this sink "
                f"consumes: to fill it from {mine}, run `cdc-sink rebuild --tables {table}` with this sink's "
                "settings (it empties the table and replays the topic), or point the sink at the pipeline "
                "that filled it"
            )

    def _wait_for_slot(self, source: Any) -> None:
        """The copy must start after the source's slot exists, or changes in between would be lost."""
        announced = False
        while True:
            with source.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (self.slot,))
                if cur.fetchone() is not None:
                    return
            if self.stop:
                raise CdcError("stopped while waiting for the source's replication slot")
            if not announced:
                log.info(
                    "waiting for the source connector to create slot %s before copying (is cdc-source running?)",
                    self.slot,
                    extra={"slot": self.slot},
                )
                announced = True
            self.stop.wait(1.0)

    def _copy(
        self, conn: Any, cur: Any, table: TableName, target: TargetTable | None
    ) -> tuple[TargetTable, CopySnapshot]:
        """Create and fill the table from the source, in the caller's transaction."""
        source = connect_source(
            self.settings.source_dsn,
            application_name="cdc-sink",
        )
        try:
            definition = read_table(source, table)
            if definition is None:
                raise SinkError(
                    f"table {table} does not exist on the source, so it cannot be copied (check --tables)"
                )
            if not definition.key:
                raise SinkError(f"table {table} has no primary key on the source; it cannot be replicated")
            self._wait_for_slot(source)
            if target is None:
                target = create_from_source(source, conn, definition)
            else:
                cur.execute(sql.SQL("SELECT EXISTS (SELECT FROM {})").format(target.ident))
                if cur.fetchone()[0]:
                    raise SinkError(
                        f"target table {table} already has rows but was never filled by this sink: empty it to "
                        "let the bulk snapshot fill it, or start with --snapshot topic (or never)"
                    )
            started = time.monotonic()
            result = self._fill(cur, target, definition)
            self.book.record_initialized(
                cur, table, "copy", result.snapshot, result.lsn, result.rows, self.topic(table)
            )
            self.copied_rows[str(table)] += result.rows
            elapsed = time.monotonic() - started
            log.info(
                "copied %d rows of %s in %.1f s (%.0f rows/s, %s COPY)",
                result.rows,
                table,
                elapsed,
                result.rows / max(elapsed, 1e-9),
                "binary" if result.binary else "text",
                extra={"table": str(table)},
            )
            recorded = self.book.initialized(cur, table)
            assert recorded is not None and recorded[1] is not None
            return target, recorded[1]
        finally:
            source.close()

    def _fill(self, cur: Any, target: TargetTable, definition: TableDef) -> CopyResult:
        """The bulk copy; a row the target's constraints or triggers refuse stops the sink with the
        constraint, the table and the fix."""
        self.session.writing()
        try:
            with RowProgress("copy") as progress:
                return copy_table(self.settings.source_dsn, cur, definition, progress, target.generated)
        except psycopg2.Error as exc:
            explained = self.session.explain(exc, definition.name)
            if explained is None:
                raise
            raise SinkError(f"the bulk copy of {definition.name} into the target failed: {explained}") from None
