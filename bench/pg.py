"""PostgreSQL helpers for the benchmark: scratch databases, slots, LSNs, small queries."""

import contextlib
import logging
import time
from typing import Any

import psycopg2
from psycopg2 import sql

from bench.config import Endpoints
from pg_kafka_cdc.common.lsn import lsn_to_int

log = logging.getLogger("bench.pg")


def connect(dsn: str, autocommit: bool = True, application_name: str = "cdc-bench") -> Any:
    conn = psycopg2.connect(dsn, application_name=application_name, options="-c TimeZone=UTC")
    conn.autocommit = autocommit
    return conn


def scalar(conn: Any, query: str | sql.Composable, params: tuple[Any, ...] | None = None) -> Any:
    with conn.cursor() as cur:
        cur.execute(query, params)
        row = cur.fetchone()
    return None if row is None else row[0]


def execute(conn: Any, query: str | sql.Composable, params: tuple[Any, ...] | None = None) -> None:
    with conn.cursor() as cur:
        cur.execute(query, params)


def create_database(admin_dsn: str, name: str) -> None:
    with contextlib.closing(connect(admin_dsn)) as conn:
        execute(conn, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def drop_slots(admin_dsn: str, database: str | None = None, names: tuple[str, ...] = ()) -> None:
    """Drop the replication slots of `database` (and those named), ending their walsenders first."""
    with contextlib.closing(connect(admin_dsn)) as conn:
        for _ in range(50):
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT slot_name, active_pid FROM pg_replication_slots "
                    "WHERE database = %s OR slot_name = ANY(%s)",
                    (database, list(names)),
                )
                slots = cur.fetchall()
            if not slots:
                return
            for name, pid in slots:
                try:
                    if pid is not None:
                        execute(conn, "SELECT pg_terminate_backend(%s)", (pid,))
                        time.sleep(0.1)
                    execute(conn, "SELECT pg_drop_replication_slot(%s)", (name,))
                except psycopg2.Error as exc:  # still active for a moment: try again
                    log.debug("dropping slot %s: %s", name, exc)
            time.sleep(0.2)
        log.warning("could not drop every replication slot of %s", database)


def drop_database(admin_dsn: str, name: str) -> None:
    drop_slots(admin_dsn, name)
    with contextlib.closing(connect(admin_dsn)) as conn:
        execute(conn, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def create_logical_slot(conn: Any, name: str, plugin: str) -> int:
    """A logical slot in conn's database; returns its starting LSN."""
    return lsn_to_int(
        scalar(conn, "SELECT lsn::text FROM pg_create_logical_replication_slot(%s, %s)", (name, plugin))
    )


def confirmed_flush(conn: Any, slot: str) -> int | None:
    text = scalar(conn, "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (slot,))
    return None if text is None else lsn_to_int(text)


def slot_exists(conn: Any, slot: str) -> bool:
    return bool(scalar(conn, "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (slot,)))


def current_lsn(conn: Any) -> int:
    return lsn_to_int(scalar(conn, "SELECT pg_current_wal_lsn()::text"))


def server_version(dsn: str) -> str:
    with contextlib.closing(connect(dsn)) as conn:
        return str(scalar(conn, "SHOW server_version"))


class Scratch:
    """Databases (and slots) created for one scenario, dropped again by cleanup() whatever happened."""

    def __init__(self, endpoints: Endpoints) -> None:
        self.endpoints = endpoints
        self.source_dbs: list[str] = []
        self.target_dbs: list[str] = []
        self.subscriptions: list[tuple[str, str]] = []  # (target database, subscription)

    def source_db(self, name: str) -> str:
        create_database(self.endpoints.source("postgres"), name)
        self.source_dbs.append(name)
        return self.endpoints.source(name)

    def target_db(self, name: str) -> str:
        create_database(self.endpoints.target("postgres"), name)
        self.target_dbs.append(name)
        return self.endpoints.target(name)

    def cleanup(self) -> None:
        for database, subscription in self.subscriptions:
            try:
                with contextlib.closing(connect(self.endpoints.target(database))) as conn:
                    ident = sql.Identifier(subscription)
                    execute(conn, sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(ident))
                    execute(conn, sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(ident))
                    execute(conn, sql.SQL("DROP SUBSCRIPTION {}").format(ident))
            except psycopg2.Error as exc:
                log.warning("dropping subscription %s: %s", subscription, exc)
        for name in self.target_dbs:
            try:
                drop_database(self.endpoints.target("postgres"), name)
            except psycopg2.Error as exc:
                log.warning("dropping target database %s: %s", name, exc)
        for name in self.source_dbs:
            try:
                drop_database(self.endpoints.source("postgres"), name)
            except psycopg2.Error as exc:
                log.warning("dropping source database %s: %s", name, exc)
        self.subscriptions.clear()
        self.target_dbs.clear()
        self.source_dbs.clear()
