"""Reading a row back from the source: a key change that did not carry an unchanged TOASTed column
needs that column's current value. Read in a snapshot that sees the key change's transaction, as
decoding can hand a transaction over before it is visible (a synchronous standby not answering).
The catalog is read the same way when a change's shape is checked against it (a column dropped in
the change's own transaction)."""

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

from psycopg2 import sql

from pg_kafka_cdc.common.errors import SourceError
from pg_kafka_cdc.common.logs import Every
from pg_kafka_cdc.common.signals import StopFlag
from pg_kafka_cdc.common.snapshots import parse_snapshot
from pg_kafka_cdc.common.tables import TableName
from schemas.values import output_text
from source_connector.events import snapshot_values
from source_connector.session import SourceSession
from source_connector.table_info import TableInfo

log = logging.getLogger("source.readback")

T = TypeVar("T")

FIRST_WAIT_LOG = 10.0  # seconds of waiting for visibility before the first warning
WAIT_LOG_INTERVAL = 30.0


def read_if_visible(conn: Any, query: sql.Composable, xid: int | None) -> list[Any] | None:
    """`[row]` (row None when there is none) read by `query` in a snapshot that sees transaction
    `xid`, or None when that transaction is not visible yet."""

    def fetch(conn: Any) -> Any:
        with conn.cursor() as cur:
            cur.execute(query)
            return cur.fetchone()

    return run_if_visible(conn, fetch, xid)


def run_if_visible(conn: Any, work: Callable[[Any], T], xid: int | None) -> list[T] | None:
    """`[work(conn)]` run in a snapshot that sees transaction `xid`, or None when that transaction is
    not visible yet (decoded, its commit in the WAL, but not yet seen by other sessions)."""
    with conn.cursor() as cur:
        cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        try:
            cur.execute("SELECT pg_current_snapshot()::text")
            if xid is not None and not parse_snapshot(cur.fetchone()[0]).visible(xid):
                return None
            return [work(conn)]
        finally:
            if not conn.closed:
                cur.execute("ROLLBACK")


def row_query(info: TableInfo, key: dict[str, Any], columns: list[str]) -> sql.Composable:
    # Literals, not parameters: output_text() holds a '%s' of its own.
    return sql.SQL("SELECT {} FROM {} WHERE {}").format(
        sql.SQL(", ").join(output_text(c, info.types[c]) for c in columns),
        sql.Identifier(info.name.schema, info.name.name),
        sql.SQL(" AND ").join(
            sql.SQL("{} = {}::{}").format(
                sql.Identifier(k),
                sql.Literal(key[k] if isinstance(key[k], bool) else str(key[k])),
                sql.SQL(info.types[k]),
            )
            for k in info.key
        ),
    )


class ReadBack:
    def __init__(self, session: SourceSession, stop: StopFlag) -> None:
        self.session = session
        self.stop = stop
        self.counts: Counter[str] = Counter()  # by table, for the metrics

    def __call__(
        self, info: TableInfo, key: dict[str, Any], columns: list[str], xid: int | None
    ) -> dict[str, Any] | None:
        """The current values of `columns` in the row with `key`; None when the row is gone by now."""
        self.counts[str(info.name)] += 1
        query = row_query(info, key, columns)
        found = self.visible(
            lambda conn: read_if_visible(conn, query, xid), xid, f"the read-back of a key change of {info.name}"
        )
        [row] = found
        return None if row is None else snapshot_values(info, tuple(columns), row)

    def catalog(self, read: Callable[[Any], T], xid: int | None, table: TableName) -> T:
        """`read(conn)` of the catalog in a snapshot that sees transaction `xid` (a DDL of it, such as
        the DROP COLUMN before a change of the same transaction, must be seen)."""
        [found] = self.visible(lambda conn: run_if_visible(conn, read, xid), xid, f"the catalog read of {table}")
        return found

    def visible(self, attempt: Callable[[Any], list[T] | None], xid: int | None, what: str) -> list[T]:
        """Run `attempt` on the session until transaction `xid` is visible to it."""
        started = time.monotonic()
        waiting = Every(WAIT_LOG_INTERVAL, FIRST_WAIT_LOG, started)
        while (found := self.session.run(attempt)) is None:
            if self.stop:
                raise SourceError(
                    f"stopped while waiting for transaction {xid} to become visible; it will be re-read"
                )
            now = time.monotonic()
            if waiting.due(now):
                log.warning(
                    "transaction %s is decoded but not visible for %.0f s (waiting for a synchronous "
                    "standby?): %s waits for it",
                    xid,
                    now - started,
                    what,
                )
            self.stop.wait(0.05)
        return found
