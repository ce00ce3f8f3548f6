"""The sink's target sessions apply as a replica (`session_replication_role = replica`), as
PostgreSQL's own logical replication does: the target's foreign keys and ordinary triggers do not
fire for the rows the source already checked (each table has its own topic, so an order may come
before its person), while triggers enabled ALWAYS or REPLICA still do. A role that may not set it
applies as an ordinary session; the sink then says so once."""

import logging
from typing import Any

import psycopg2.errors
from psycopg2 import sql

from pg_kafka_cdc.common.tables import quote_if_needed
from sink_connector.refusals import replica_grant

log = logging.getLogger("sink")

_SET_REPLICA = sql.SQL("SET SESSION session_replication_role = replica")


def fallback_warning(role: str) -> str:
    """What applying as an ordinary session means, and the fix (`role` as SQL)."""
    return (
        f"the target role {role} may not set session_replication_role, so the sink applies as an ordinary "
        "session: the target tables' foreign keys and triggers fire, and a row may be applied before the "
        "row it references (each table has its own topic), which a foreign key then rejects; to apply as "
        f"PostgreSQL's logical replication does, run as an administrator on the target: {replica_grant(role)}"
    )


def current_role(conn: Any) -> str:
    """The session's role, quoted as SQL where needed."""
    with conn.cursor() as cur:
        cur.execute("SELECT current_user")
        name = str(cur.fetchone()[0])
    conn.rollback()
    return quote_if_needed(name)


def apply_as_replica(conn: Any) -> bool:
    """Set the session's replication role to replica, for the life of the connection (committed, so a
    batch rolled back later keeps it). False when the role may not."""
    try:
        with conn.cursor() as cur:
            cur.execute(_SET_REPLICA)
    except psycopg2.errors.InsufficientPrivilege:
        conn.rollback()
        return False
    conn.commit()
    return True
