"""The bulk snapshot: `COPY ... TO STDOUT` on the source piped into `COPY ... FROM STDIN` on the
target, streaming through an OS pipe (constant memory), in binary when both ends share the types.

The source side runs in a REPEATABLE READ transaction; its snapshot and the WAL position right after
it are returned, so the stream can skip exactly the changes the copy already holds (handover.py).
"""

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, BinaryIO

from psycopg2 import sql

from pg_kafka_cdc.common.catalog import TableDef, estimated_rows
from pg_kafka_cdc.common.errors import CdcError
from pg_kafka_cdc.common.pg import connect_source, error_reason
from pg_kafka_cdc.common.progress import RowProgress

log = logging.getLogger("sink.copy")

PIPE_BUFFER = 1 << 20


@dataclass(frozen=True)
class CopyResult:
    snapshot: str  # pg_snapshot text
    lsn: str  # WAL insert position right after the snapshot
    rows: int
    binary: bool


def binary_safe(definition: TableDef) -> bool:
    """Binary COPY embeds type OIDs for arrays and composites, which differ between two servers
    for user-defined types: use text then."""
    return not any(c.kind == "c" or c.element_oid >= 16384 for c in definition.columns)


def copy_statements(
    definition: TableDef, binary: bool, generated: frozenset[str]
) -> tuple[sql.Composed, sql.Composed]:
    """COPY out of the source and into the target, of the columns the target does not generate."""
    table = sql.Identifier(definition.name.schema, definition.name.name)
    fmt = sql.SQL("binary" if binary else "text")
    columns = sql.SQL(", ").join(sql.Identifier(c.name) for c in definition.columns if c.name not in generated)
    copy_out = sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT (FORMAT {})").format(columns, table, fmt)
    copy_in = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT {})").format(table, columns, fmt)
    return copy_out, copy_in


class _CountingWriter:
    """psycopg2 writes one COPY row per call: count them for the progress bar."""

    def __init__(self, raw: BinaryIO, progress: RowProgress, task: int) -> None:
        self.raw = raw
        self.rows = 0
        self.progress = progress
        self.task = task

    def write(self, data: bytes) -> int:
        self.rows += 1
        if self.rows % 10_000 == 0:
            self.progress.advance(self.task, 10_000)
        return self.raw.write(data)


def copy_table(
    source_dsn: str,
    target_cur: Any,
    definition: TableDef,
    progress: RowProgress,
    generated: frozenset[str] = frozenset(),
) -> CopyResult:
    """Copy the source table into the (empty) target table, inside the caller's target transaction.
    `generated`: the target's generated columns, left out (the target computes them)."""
    table = definition.name
    source = connect_source(source_dsn, application_name="cdc-sink copy")
    try:
        source.set_session(isolation_level="REPEATABLE READ", readonly=True, autocommit=False)
        src = source.cursor()
        # The first statement of the transaction takes its snapshot; the WAL position is read after it.
        src.execute("SELECT pg_current_snapshot()::text, pg_current_wal_insert_lsn()::text")
        snapshot_text, lsn_text = src.fetchone()
        task = progress.start(str(table), estimated_rows(src, table))
        binary = binary_safe(definition)
        copy_out, copy_in = copy_statements(definition, binary, generated)
        read_fd, write_fd = os.pipe()
        failure: list[BaseException] = []

        def produce() -> None:
            with os.fdopen(write_fd, "wb", buffering=PIPE_BUFFER) as raw:
                try:
                    src.copy_expert(copy_out.as_string(source), _CountingWriter(raw, progress, task))
                except BrokenPipeError:
                    pass  # the target side failed and closed the pipe; its error is the one reported
                except BaseException as exc:
                    failure.append(exc)

        thread = threading.Thread(target=produce, name=f"copy {table}", daemon=True)
        thread.start()
        try:
            with os.fdopen(read_fd, "rb", buffering=PIPE_BUFFER) as reader:
                target_cur.copy_expert(copy_in.as_string(target_cur), reader, size=PIPE_BUFFER)
        finally:
            thread.join()
        if failure:
            raise CdcError(f"reading {table} from the source failed during the copy: {error_reason(failure[0])}")
        rows = target_cur.rowcount
        progress.finish(task, rows)
        source.commit()
        return CopyResult(snapshot_text, lsn_text, rows, binary)
    finally:
        source.close()
