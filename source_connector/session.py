"""The source connector's own connection to the source (not the replication one): the catalog,
read-backs, heartbeats and slot checks use it. It is made again when it was lost, as the stream
reconnects by itself and so must this."""

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg2

from pg_kafka_cdc.common.pg import connect_source, is_connection_loss

T = TypeVar("T")


class SourceSession:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: Any = connect_source(dsn, application_name="cdc-source")
        self.on_reconnect: Callable[[Any], None] = lambda conn: None

    def run(self, work: Callable[[Any], T]) -> T:
        """`work(connection)`, once more on a new connection when the first attempt lost it."""
        for attempt in range(2):
            if self.conn.closed:
                self.conn = connect_source(self.dsn, application_name="cdc-source")
                self.on_reconnect(self.conn)
            try:
                return work(self.conn)
            except psycopg2.Error as exc:
                if attempt or not is_connection_loss(exc):
                    raise
                with contextlib.suppress(Exception):
                    self.conn.close()
        raise AssertionError("unreachable")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()
