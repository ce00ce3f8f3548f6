"""The initial snapshot: the rows that existed when the slot was created, read under the slot's
exported snapshot and published as `r` events before any change is streamed, so each topic holds
its table's complete history."""

import logging
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from psycopg2 import sql

from pg_kafka_cdc.common.catalog import estimated_rows
from pg_kafka_cdc.common.errors import CdcError
from pg_kafka_cdc.common.lsn import int_to_lsn
from pg_kafka_cdc.common.progress import RowProgress
from schemas.values import output_text
from source_connector.events import EventBuilder, snapshot_context, snapshot_values
from source_connector.flush import FlushTracker, Transaction
from source_connector.publisher import Publisher, raise_delivery_failure
from source_connector.table_info import TableInfo

log = logging.getLogger("source.snapshot")

FETCH_ROWS = 5000


class SnapshotInterrupted(CdcError):
    """The snapshot was stopped before it finished; it starts over on the next run."""


def publish_snapshot(
    conn: Any,
    snapshot_name: str,
    consistent_lsn: int,
    tables: list[TableInfo],
    builder: EventBuilder,
    publisher: Publisher,
    counts: Counter[str] | None = None,
    holding: Collection[str] = (),
) -> int:
    """Read every table under the exported snapshot and publish it; returns the row count once
    Kafka acknowledged every row. A table whose topic holds messages already (`holding`: an earlier
    attempt that died half-way, or an earlier slot's stream) gets a `t` first, so that a consumer
    replaying the topic drops what came before this snapshot (a row deleted since would come back)."""
    conn.set_session(isolation_level="REPEATABLE READ", readonly=True, autocommit=False)
    tracker = FlushTracker(consistent_lsn)
    tx = tracker.begin(None, consistent_lsn)
    snapshot = Snapshot(builder, publisher, tracker, tx, consistent_lsn)
    total = 0
    with conn.cursor() as cur:
        cur.execute("SET TRANSACTION SNAPSHOT %s", (snapshot_name,))
        with RowProgress("snapshot") as progress:
            for info in tables:
                started = time.monotonic()
                if info.topic in holding:
                    snapshot.truncate(info)
                rows = snapshot.table(
                    conn, info, progress, progress.start(str(info.name), estimated_rows(cur, info.name))
                )
                if counts is not None:
                    counts[info.label] += rows
                total += rows
                log.info(
                    "snapshot of %s: %d rows in %.1f s",
                    info.name,
                    rows,
                    time.monotonic() - started,
                    extra={"table": str(info.name)},
                )
    conn.commit()
    tracker.commit(tx)
    snapshot.wait_acknowledged()
    return total


@dataclass
class Snapshot:
    """The `r` events of one snapshot, all counted against one transaction at its consistent point."""

    builder: EventBuilder
    publisher: Publisher
    tracker: FlushTracker
    tx: Transaction
    lsn: int

    def __post_init__(self) -> None:
        self.ctx = snapshot_context(self.lsn)

    def truncate(self, info: TableInfo) -> None:
        """A `t` on every partition of the table's topic, at the snapshot's position."""
        doc = {"schema": info.name.schema, "table": info.name.name, "lsn": int_to_lsn(self.lsn)}
        for message in self.builder.truncate(doc, self.ctx):
            self.publisher.publish(self.tx, message)

    def table(self, conn: Any, info: TableInfo, progress: RowProgress, task: Any) -> int:
        names = info.columns
        select = sql.SQL("SELECT {} FROM {}").format(
            sql.SQL(", ").join(output_text(c, info.types[c]) for c in names),
            sql.Identifier(info.name.schema, info.name.name),
        )
        rows = 0
        with conn.cursor(name=f"cdc_snapshot_{abs(hash(info.name))}") as named:
            named.itersize = FETCH_ROWS
            named.execute(select)
            for texts in named:
                values = snapshot_values(info, names, texts)
                self.publisher.publish(self.tx, self.builder.snapshot_row(info, values, self.ctx, self.lsn))
                rows += 1
                if rows % 1000 == 0:
                    progress.advance(task, 1000)
                    self.check()
        progress.finish(task, rows)
        return rows

    def check(self) -> None:
        self.publisher.producer.poll(0)
        if self.publisher.stop:
            raise SnapshotInterrupted("stopped during the initial snapshot; it starts over next time")
        if self.tracker.failures:
            raise_delivery_failure(self.tracker)

    def wait_acknowledged(self) -> None:
        self.tracker.advance()
        while not self.tracker.idle():
            self.publisher.producer.poll(0.2)
            self.tracker.advance()
            self.check()
