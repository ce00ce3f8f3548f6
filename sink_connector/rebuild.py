"""`cdc-sink rebuild`: empty the named target tables and replay their topics from the start, so the
target is rebuilt from Kafka alone (with the source's initial snapshot events)."""

import logging
from typing import Any

from psycopg2 import sql

from pg_kafka_cdc.common.catalog import table_exists
from pg_kafka_cdc.common.tables import TableName
from schemas.topics import topic_for
from sink_connector.bookkeeping import Bookkeeping

log = logging.getLogger("sink.rebuild")


def reset_tables(conn: Any, book: Bookkeeping, prefix: str, tables: tuple[TableName, ...]) -> None:
    """In one transaction: empty the tables, forget how they were filled and their offsets."""
    with conn.cursor() as cur:
        for table in tables:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"cdc-sink {table}",))
            if table_exists(conn, table):
                cur.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(table.schema, table.name)))
            book.forget_snapshot(cur, table)
        book.reset(cur, [topic_for(prefix, t) for t in tables])
    conn.commit()
    log.info("emptied %s; replaying their topics from the start", ", ".join(map(str, tables)))
