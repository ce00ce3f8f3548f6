"""The target database connection of a sink: batch transactions (offsets, rows, dead-letter keys and
progress), table preparation in transactions of their own, reconnection."""

import contextlib
import logging
from collections.abc import Callable, Collection
from typing import Any

import psycopg2
from psycopg2 import sql

from pg_kafka_cdc.common.errors import CdcError, SinkError
from pg_kafka_cdc.common.pg import connect_target, error_reason, is_connection_loss, sqlstate
from pg_kafka_cdc.common.tables import TableName
from schemas.codec import Position
from sink_connector import schema_history
from sink_connector.added_columns import SourceAccess, asked_line, ensure_types, refused_line, snapshot_command
from sink_connector.apply import apply_table, can_stage
from sink_connector.bookkeeping import Bookkeeping, ConsistentPoint, StreamPartition, TopicPartition
from sink_connector.net_effect import TableBatch
from sink_connector.preparation import TableState
from sink_connector.refusals import explain_error
from sink_connector.replica_role import apply_as_replica, current_role, fallback_warning
from sink_connector.schema_changes import DEFAULT_MODE, SchemaEvent, ddl_for
from sink_connector.schema_history import SchemaHistory, record, stored
from sink_connector.target import TargetTable, load, reconcile
from sink_connector.user_types import is_missing_enum_value, missing_enum_value_line

log = logging.getLogger("sink")

# The consumer group's session timeout: a member silent for longer has lost its partitions.
SESSION_TIMEOUT_MS = 10_000

# Errors worth retrying the same batch for; other errors raised by a statement mean the data is bad.
RETRY_SQLSTATES = {"40001", "40P01", "55P03", "57014", "53100", "53200", "53300"}

_FROZEN_MEMBER_TIMEOUT = sql.SQL("SET LOCAL idle_in_transaction_session_timeout = {}").format(
    sql.Literal(SESSION_TIMEOUT_MS)
)
_PROBE = sql.SQL("SAVEPOINT cdc_probe")
_PROBE_DONE = sql.SQL("RELEASE SAVEPOINT cdc_probe")
_PROGRESS = sql.SQL("SAVEPOINT progress; SET LOCAL lock_timeout = '100ms'")
_PROGRESS_HELD = sql.SQL("ROLLBACK TO SAVEPOINT progress")
_PROGRESS_DONE = sql.SQL("RELEASE SAVEPOINT progress; SET LOCAL lock_timeout = DEFAULT")


def classify(exc: BaseException) -> str:
    """'connection', 'retry' or 'data' for an error raised while applying a batch."""
    if is_connection_loss(exc):
        return "connection"
    if (sqlstate(exc) or "") in RETRY_SQLSTATES:
        return "retry"
    return "data"


def _idents(history: SchemaHistory) -> set[tuple[TableName, int, tuple[str, int, int]]]:
    return {(table, oid, e.ident) for table, entries in history.entries.items() for oid, e in entries}


class TargetSession:
    def __init__(
        self,
        dsn: str,
        book: Bookkeeping,
        tables: dict[TableName, TableState],
        source: SourceAccess | None = None,
        schema_changes: str = DEFAULT_MODE,
    ) -> None:
        self.dsn = dsn
        self.book = book
        self.tables = tables  # the prepared ones (preparation.TablePreparer adds them)
        self.applied: dict[StreamPartition, Position] = {}  # of the claimed partitions, as committed
        self.storing: dict[StreamPartition, Position] = {}  # this transaction's, until it commits
        self.conn: Any = None
        self.cur: Any = None
        self.replica = False  # the session applies with session_replication_role = replica
        self.staged = True  # upserts go through COPY and a staging table (apply.can_stage)
        self.role = ""  # the target role, as SQL (for the fixes errors name)
        self.warned = False
        # The source's catalog and WAL, for the rows of a column added while streaming (reconcile).
        self.source = source
        # The schema changes applied (--schema-changes), loaded at install; the batch loop adds to
        # it what a committed batch applied.
        self.history = SchemaHistory(schema_changes)

    # --- connection ---------------------------------------------------------------------------

    def connect(self) -> None:
        self.conn = connect_target(
            self.dsn,
            application_name="cdc-sink",
            autocommit=False,
            # Safe for exactly-once: a batch's rows and its offsets commit together, so a target crash
            # that loses the last commits loses both, and the sink re-applies them from the older
            # offsets. (PostgreSQL's own subscriptions commit the same way by default.)
            options="-c synchronous_commit=off",
        )
        try:
            self._as_replica()
        except psycopg2.Error as exc:
            if not is_connection_loss(exc):
                raise
            # lost at once: the next batch fails on it and reconnects, setting the role again

    def _as_replica(self) -> None:
        """Once per connection, never per batch: the setting lasts as long as the session."""
        self.replica = apply_as_replica(self.conn)
        self.role = current_role(self.conn)
        self.staged = can_stage(self.conn)

    def writing(self) -> None:
        """Before the first write (a bulk copy or a batch): the one warning of a sink that applies as
        an ordinary session. (Not at connect: a start-up that fails before writing says only why.)"""
        if not self.replica and not self.warned:
            log.warning("%s", fallback_warning(self.role))
            self.warned = True

    def reconnect(self, exc: BaseException, delay: float, wait: Callable[[float], object]) -> None:
        log.warning("target connection lost (%s); reconnecting in %.1f s", error_reason(exc), delay)
        wait(delay)
        self.close()
        try:
            self.connect()
        except CdcError as again:
            log.warning("%s", again)

    def close(self) -> None:
        with contextlib.suppress(psycopg2.Error):
            self.conn.close()

    @property
    def closed(self) -> bool:
        return bool(self.conn.closed)

    def explain(self, exc: BaseException, table: TableName | None = None) -> str | None:
        """The constraint or trigger of the target that refused a write, with its fix; None for
        other errors."""
        return explain_error(exc, self.replica, self.role, table)

    # --- outside batches ----------------------------------------------------------------------

    def install(self) -> None:
        self.book.install(self.conn)
        with self.conn.cursor() as cur:
            loaded = schema_history.load(cur, self.book.schema, self.history.mode)
        self.conn.commit()
        self.history.entries = loaded.entries

    def parked(self) -> set[tuple[str, bytes]]:
        return self.book.parked(self.conn)

    def claim(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int | None]:
        """The stored offsets of partitions this member takes (and their source positions applied)."""
        offsets = self.book.claim(self.conn, partitions)
        with self.conn.cursor() as cur:
            positions = self.book.positions(cur, partitions)
        self.conn.commit()
        claimed = set(partitions)
        self.applied = {k: v for k, v in self.applied.items() if (k[0], k[1]) not in claimed}
        self.applied.update(positions)
        return offsets

    def all_offsets(self) -> dict[TopicPartition, int | None]:
        return self.book.all_offsets(self.conn)

    def consistent_point(self) -> ConsistentPoint | None:
        """--consistency transaction: the last source transaction the group applied whole."""
        with self.conn.cursor() as cur:
            point = self.book.consistency(cur)
        self.conn.commit()
        return point

    def store_consistency(self, point: ConsistentPoint) -> None:
        """In the batch's transaction."""
        self.book.store_consistency(self.cur, point)

    # --- one batch transaction ----------------------------------------------------------------

    def begin(self) -> None:
        self.writing()
        self.cur = self.conn.cursor()
        # A member frozen (SIGSTOP, a paused VM) inside this transaction holds its partitions'
        # offsets rows, which the member taking the partitions over needs: the server ends the
        # transaction once the member has been silent as long as the group waits for it.
        self.cur.execute(_FROZEN_MEMBER_TIMEOUT)

    def lock_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int | None]:
        return self.book.lock(self.cur, partitions)

    def apply(self, batch: TableBatch) -> None:
        state = self.tables.get(batch.table)
        if state is None:
            return
        if batch.schema_changes:
            state.target = self.change_schema(state.target, batch.schema_changes)
        if batch.columns:
            state.target = reconcile(self.conn, state.target, batch.columns, self.source)
        apply_table(self.cur, state.target, batch, self.staged)

    def change_schema(self, target: TargetTable, events: list[SchemaEvent]) -> TargetTable:
        """The DDL of the table's schema-change events, each recorded in the history, in the batch's
        transaction; the table as it is then. Events another sink recorded meanwhile are not applied
        again."""
        mode = self.history.mode
        done = stored(self.cur, self.book.schema, target.name, target.oid)
        table = str(target.name)
        for event in events:
            if event.ident in done:
                continue
            # the user-defined types of the columns it adds, from the source's catalog when missing
            ensure_types(self.cur, self.source, target.name, {a.name: a.type for a in event.added})
            ddl = ddl_for(event, target.name, target.columns, target.key, mode)
            for step in ddl.steps:
                self.cur.execute(step.statement)
                log.info("%s", step.done, extra={"table": table})
            record(self.cur, self.book.schema, target.name, target.oid, event, mode)
            refreshed = load(self.conn, target.name)
            assert refreshed is not None
            target = refreshed
            if ddl.snapshot:
                self.ask_for_snapshot(target, ddl.snapshot)
        return target

    def refresh_schema(self, failure: BaseException, tables: Collection[TableName]) -> bool:
        """After a batch of `tables` the target refused (outside its transaction): values the source
        added to an enum, added to the target's (else one line says how); the schema changes recorded
        and the prepared tables as they are now (another member of the group may have applied a
        schema change meanwhile). True when something changed: the batch is worth applying again."""
        if is_missing_enum_value(failure):
            return self.add_enum_values(failure, tables)
        try:
            with self.conn.cursor() as cur:
                loaded = schema_history.load(cur, self.book.schema, self.history.mode)
            changed = _idents(loaded) != _idents(self.history)
            self.history.entries = loaded.entries
            for name, state in self.tables.items():
                current = load(self.conn, name)
                if current is not None and (current.oid, current.columns, current.key) != (
                    state.target.oid,
                    state.target.columns,
                    state.target.key,
                ):
                    state.target = current
                    changed = True
            self.conn.commit()
        except psycopg2.Error:
            with contextlib.suppress(psycopg2.Error):
                self.conn.rollback()
            return False
        return changed

    def add_enum_values(self, failure: BaseException, tables: Collection[TableName]) -> bool:
        """A value an enum of the target lacks: added from the source's enum, for the batch's tables."""
        added = False
        for table in sorted(tables):
            state = self.tables.get(table)
            if state is None:
                continue
            if self.source is None:
                raise SinkError(missing_enum_value_line(table, failure))
            done = self.source.add_enum_values(self.conn, table, state.target.columns)
            if isinstance(done, str):
                log.warning("cannot read the source's enums for %s: %s", table, done, extra={"table": str(table)})
                raise SinkError(missing_enum_value_line(table, failure))
            added = added or bool(done)
        if not added:
            return False
        for state in self.tables.values():
            state.target.statements.clear()  # nothing in them depends on the labels, but be plain
        return True

    def ask_for_snapshot(self, target: TargetTable, columns: list[str]) -> None:
        """Columns added with a default whose values the stream does not carry: ask the source's
        connector for a snapshot of the table (as reconcile does), or say how to get one."""
        table = str(target.name)
        if self.source is None:
            log.warning(
                "column %s of %s was added on the source with a default whose values the stream does not carry, "
                "and the sink has no source access to ask for a snapshot: until `%s` is run, the target's rows "
                "not changed since read NULL there",
                ", ".join(columns),
                table,
                snapshot_command(None, target.name),
                extra={"table": table},
            )
            return
        refused = self.source.ask_for_snapshot(target.name, columns)
        if refused is None:
            log.warning("%s", asked_line(self.source.slot, target.name, columns), extra={"table": table})
        else:
            log.warning(
                "%s", refused_line(self.source.slot, target.name, columns, refused), extra={"table": table}
            )

    def probe(self, batch: TableBatch) -> str | None:
        self.cur.execute(_PROBE)
        try:
            self.apply(batch)
        except psycopg2.Error as exc:
            if classify(exc) != "data":
                raise
            return self.explain(exc, batch.table) or error_reason(exc)
        self.cur.execute(_PROBE_DONE)
        return None

    def park(self, topic: str, key: bytes, offset: int, reason: str) -> None:
        self.book.park(self.cur, topic, key, offset, reason)

    def store_offsets(self, positions: dict[TopicPartition, int]) -> None:
        self.book.store(self.cur, positions)

    def store_positions(self, positions: dict[StreamPartition, Position]) -> None:
        self.book.store_positions(self.cur, positions)
        self.storing = positions

    def save_progress(self, progress: list[tuple[TableName, int | None, int | None, int]]) -> bool:
        """The per-table progress rows are shared by the group's members: never wait for one that
        another member's open transaction holds (a frozen member would stall this one too); keep
        the figures for the next batch instead."""
        self.cur.execute(_PROGRESS)
        try:
            self.book.progress(self.cur, progress)
        except psycopg2.errors.LockNotAvailable:
            self.cur.execute(_PROGRESS_HELD)  # also undoes the lock_timeout
            return False
        self.cur.execute(_PROGRESS_DONE)
        return True

    def commit(self) -> None:
        self._end()
        self.conn.commit()
        self.applied.update(self.storing)
        self.storing = {}

    def rollback(self) -> None:
        self.storing = {}
        self._end()
        if not self.conn.closed:
            self.conn.rollback()

    def _end(self) -> None:
        if self.cur is not None:
            with contextlib.suppress(psycopg2.Error):
                self.cur.close()
            self.cur = None
