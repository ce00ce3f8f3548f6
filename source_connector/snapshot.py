"""The initial snapshot: the rows that existed when the slot was created, read under the slot's
exported snapshot and published as `r` events before any change is streamed, so each topic holds
its table's complete history."""

import functools
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from psycopg2 import sql

from cdc_common.catalog import estimated_rows
from cdc_common.errors import CdcError
from cdc_common.lsn import int_to_lsn
from cdc_common.progress import RowProgress
from cdc_common.signals import StopFlag
from schemas.values import output_text
from source_connector.events import EventBuilder, TxContext, snapshot_values
from source_connector.flush import FlushTracker
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
    producer: Any,
    stop: StopFlag,
    counts: Counter[str] | None = None,
    restart: bool = False,
) -> int:
    """Read every table under the exported snapshot and publish it; returns the row count once
    Kafka acknowledged every row."""
    conn.set_session(isolation_level="REPEATABLE READ", readonly=True, autocommit=False)
    publisher = _Publisher(builder, producer, stop, consistent_lsn)
    total = 0
    with conn.cursor() as cur:
        cur.execute("SET TRANSACTION SNAPSHOT %s", (snapshot_name,))
        with RowProgress("snapshot") as progress:
            for info in tables:
                started = time.monotonic()
                task = progress.start(str(info.name), estimated_rows(cur, info.name))
                ctx = TxContext(None, consistent_lsn, int(time.time() * 1_000_000))
                if restart:
                    # An earlier attempt died half-way and its `r` events are in the topic: a `t` first,
                    # so a consumer replaying the topic drops them (a row deleted since would come back).
                    publisher.truncate(info, ctx)
                rows = publisher.rows(conn, info, ctx, functools.partial(progress.advance, task))
                progress.finish(task, rows)
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
    publisher.wait_acknowledged()
    return total


class _Publisher:
    """The snapshot's events, published as one transaction of a flush tracker: done when Kafka has
    acknowledged them all."""

    def __init__(self, builder: EventBuilder, producer: Any, stop: StopFlag, consistent_lsn: int) -> None:
        self.builder = builder
        self.producer = producer
        self.stop = stop
        self.lsn = consistent_lsn
        self.tracker = FlushTracker(consistent_lsn)
        self.tx = self.tracker.begin(None, consistent_lsn)

    def truncate(self, info: TableInfo, ctx: TxContext) -> None:
        doc = {"schema": info.name.schema, "table": info.name.name, "lsn": int_to_lsn(self.lsn)}
        for topic, key, value, partition, _ in self.builder.truncate(doc, ctx):
            self.tx.outstanding += 1
            self.producer.produce(topic, value, key, partition, on_delivery=self.tx.ack)

    def rows(self, conn: Any, info: TableInfo, ctx: TxContext, advance: Callable[[int], None]) -> int:
        """Publish every row of the table as an `r` event; returns how many."""
        names = info.columns
        select = sql.SQL("SELECT {} FROM {}").format(
            sql.SQL(", ").join(output_text(c, info.types[c]) for c in names),
            sql.Identifier(info.name.schema, info.name.name),
        )
        builder, producer, tx, lsn = self.builder, self.producer, self.tx, self.lsn
        rows = 0
        with conn.cursor(name=f"cdc_snapshot_{abs(hash(info.name))}") as named:
            named.itersize = FETCH_ROWS
            named.execute(select)
            for texts in named:
                topic, key, value, _, _ = builder.snapshot_row(info, snapshot_values(info, names, texts), ctx, lsn)
                tx.outstanding += 1
                while True:
                    try:
                        producer.produce(topic, value, key, on_delivery=tx.ack)
                        break
                    except BufferError:
                        producer.poll(0.1)
                rows += 1
                if rows % 1000 == 0:
                    producer.poll(0)
                    advance(1000)
                    self.check()
        return rows

    def check(self) -> None:
        if self.stop:
            raise SnapshotInterrupted("stopped during the initial snapshot; it starts over next time")
        if self.tracker.failures:
            raise_delivery_failure(self.tracker)

    def wait_acknowledged(self) -> None:
        tracker = self.tracker
        tracker.commit(self.tx)
        tracker.advance()
        while not tracker.idle():
            self.producer.poll(0.2)
            tracker.advance()
            if tracker.failures:
                raise_delivery_failure(tracker)
            if self.stop:
                raise SnapshotInterrupted("stopped during the initial snapshot; it starts over next time")


def raise_delivery_failure(tracker: FlushTracker) -> None:
    err, msg = tracker.failures[0]
    topic = msg.topic() if msg is not None else "?"
    raise CdcError(f"Kafka refused a message for topic {topic}: {err.str() if hasattr(err, 'str') else err}")
