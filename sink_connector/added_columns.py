"""What the rows a target table already holds get in a column the source added while streaming.

The first event carrying a new column is all the sink sees of its ADD COLUMN: the rows no event has
written since hold, on the source, whatever the ALTER gave them, which no event carries. So the sink
reads the column on the source (`--source-dsn`) and

- when PostgreSQL stored that value as the column's fast default (`atthasmissing`: a constant, or a
  stable expression such as now(), evaluated once at the ALTER), adds the column with that value as
  its default (and NOT NULL if the source's is): every row the target holds gets what the source's
  rows got, and inserts replayed from events older than the ALTER get it too;
- when it did not (a volatile default such as random() or gen_random_uuid(), which rewrote the
  table with a value per row; a table rewritten since), but the column has a default or is NOT
  NULL, adds it nullable and asks the source's connector (`--slot`) for a snapshot of the table,
  through the source's WAL, as `cdc-source snapshot` does: every row then comes with its value;
- otherwise (no default, nullable: the rows read NULL on both sides) just adds it.

Without access to the source (or when the request is refused) the column is added as it comes and
one warning gives the command that fixes the rows.
"""

import logging
import shlex
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import psycopg2

from pg_kafka_cdc.common.catalog import ColumnFill, column_fills, read_table
from pg_kafka_cdc.common.errors import CdcError, SinkError
from pg_kafka_cdc.common.pg import connect_source, error_reason
from pg_kafka_cdc.common.tables import TableName
from schemas.signals import SNAPSHOT_PREFIX, snapshot_request
from sink_connector.user_types import add_missing_enum_values, create_missing_types

log = logging.getLogger("sink.target")

# Short enough that a batch transaction (idle_in_transaction_session_timeout = 10 s) waiting for an
# unreachable source outlives the wait; after a failure the source is left alone for a while.
CONNECT_TIMEOUT = 4
RETRY_AFTER = 60.0


class Fill(Enum):
    VALUE = "value"  # add the column with the source's missing value as its default
    SNAPSHOT = "snapshot"  # add it nullable, ask for a snapshot of the table
    PLAIN = "plain"  # add it nullable without a default: the rows read NULL on the source too


def fill_for(column: ColumnFill | None) -> Fill:
    """How to add a column, from what the source says of it (None: not there, dropped since)."""
    if column is None:
        return Fill.PLAIN
    if column.missing is not None:
        return Fill.VALUE
    if column.default is not None or column.not_null:
        return Fill.SNAPSHOT
    return Fill.PLAIN


def snapshot_command(slot: str | None, table: TableName) -> str:
    """The command that re-reads the table into its topic, ready for a shell (None: the slot unknown)."""
    slot_option = "" if slot is None else f" --slot {shlex.quote(slot)}"
    return f"cdc-source snapshot{slot_option} --tables {shlex.quote(str(table))}"


def asked_line(slot: str, table: TableName, columns: Iterable[str]) -> str:
    return (
        f"asked cdc-source (slot {slot}) to re-read {table}: column {', '.join(columns)} was added with a "
        "default whose values the stream does not carry"
    )


def refused_line(slot: str, table: TableName, columns: Iterable[str], reason: str) -> str:
    return (
        f"column {', '.join(columns)} of {table} was added on the source with a default whose values the "
        f"stream does not carry, and the sink could not ask for a snapshot ({reason}): until "
        f"`{snapshot_command(slot, table)}` is run, the target's rows not changed since read NULL there"
    )


def unknown_line(slot: str | None, table: TableName, columns: Iterable[str], reason: str) -> str:
    return (
        f"added column {', '.join(columns)} to {table} without reading the source ({reason}): if the source "
        "gave it a default, the target's rows not changed since read NULL where the source's have the "
        f"default; run `{snapshot_command(slot, table)}` to fix them"
    )


@dataclass
class SourceAccess:
    """The sink's way to the source (`--source-dsn`) and its connector's slot (`--slot`)."""

    dsn: str = field(repr=False)
    slot: str
    asked: set[tuple[TableName, str]] = field(default_factory=set)  # (table, column) snapshots asked for
    down_until: float = 0.0  # after a failed connection, not before then
    reason: str = ""  # why the last attempt failed

    def fills(self, table: TableName, names: Iterable[str]) -> dict[str, ColumnFill] | None:
        """The source's columns `names` of `table` (those it has); None when the source cannot be read."""
        conn = self._connect()
        if conn is None:
            return None
        try:
            return column_fills(conn, table, names)
        except psycopg2.Error as exc:
            self.reason = f"reading its catalog failed: {error_reason(exc)}"
            return None
        finally:
            conn.close()

    def ask_for_snapshot(self, table: TableName, columns: Iterable[str]) -> str | None:
        """Write the request for a snapshot of `table` to the source's WAL, for the connector of our
        slot (as `cdc-source snapshot` does), for the values of `columns`; None when done, else why not."""
        wanted = {(table, c) for c in columns}
        if wanted <= self.asked:
            return None  # a batch applied again (after a rollback) asks once per column
        conn = self._connect()
        if conn is None:
            return self.reason
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT pg_logical_emit_message(false, %s, %s)",
                    (SNAPSHOT_PREFIX, snapshot_request(self.slot, [table])),
                )
        except psycopg2.Error as exc:
            return error_reason(exc)
        finally:
            conn.close()
        self.asked |= wanted
        return None

    def create_types(self, cur: Any, table: TableName, names: Iterable[str]) -> str | None:
        """Create on the target (through `cur`, in its transaction) the user-defined types the source's
        columns `names` of `table` use that the target lacks (user_types.py); None when done, else
        why not."""
        conn = self._connect()
        if conn is None:
            return self.reason
        try:
            definition = read_table(conn, table)
            wanted = set(names)
            columns = [] if definition is None else [c for c in definition.columns if c.name in wanted]
            create_missing_types(conn, cur, table, columns)
        except psycopg2.Error as exc:
            return f"reading its catalog failed: {error_reason(exc)}"
        finally:
            conn.close()
        return None

    def add_enum_values(self, target_conn: Any, table: TableName, columns: dict[str, str]) -> list[str] | str:
        """Add to the target's enums the table's columns use the values the source's have (committed
        on target_conn, outside any batch: user_types.add_missing_enum_values); the values added, or
        why the source could not be read."""
        conn = self._connect()
        if conn is None:
            return self.reason
        try:
            return add_missing_enum_values(conn, target_conn, table, columns)
        except psycopg2.Error as exc:
            return f"reading its catalog failed: {error_reason(exc)}"
        finally:
            conn.close()

    def _connect(self) -> Any:
        if time.monotonic() < self.down_until:
            return None
        try:
            return connect_source(self.dsn, application_name="cdc-sink", connect_timeout=CONNECT_TIMEOUT)
        except CdcError as exc:
            self.down_until = time.monotonic() + RETRY_AFTER
            self.reason = str(exc)
            return None


_TYPE_CHECK = "SAVEPOINT cdc_type"
_TYPE_CHECK_UNDO = "ROLLBACK TO SAVEPOINT cdc_type"
_TYPE_CHECK_DONE = "RELEASE SAVEPOINT cdc_type"


def known_type(cur: Any, type_name: str) -> bool:
    """Whether the target knows the type (a name it cannot read counts as known: the DDL that uses
    it says why)."""
    cur.execute(_TYPE_CHECK)
    try:
        cur.execute("SELECT to_regtype(%s) IS NOT NULL", (type_name,))
        known = bool(cur.fetchone()[0])
    except psycopg2.Error:
        known = True
        cur.execute(_TYPE_CHECK_UNDO)
    cur.execute(_TYPE_CHECK_DONE)
    return known


def ensure_types(cur: Any, source: SourceAccess | None, table: TableName, columns: dict[str, str]) -> None:
    """The user-defined types of these columns (name -> type) that the target lacks, created in
    `cur`'s transaction from the source's catalog; one line naming the columns and the fix when
    they cannot be."""
    lacking = [name for name, type_name in columns.items() if not known_type(cur, type_name)]
    if not lacking:
        return
    why = "the sink was given no source access" if source is None else source.create_types(cur, table, lacking)
    if why is not None:
        raise SinkError(
            f"column {', '.join(lacking)} of {table} has a type that does not exist on the target, and the sink "
            f"cannot create it from the source's catalog ({why}): create it there first (e.g. from pg_dump "
            "--schema-only of the source), then restart the sink"
        )
