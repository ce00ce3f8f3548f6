"""`cdc-sink rebuild`: empty the named target tables and replay their topics from the start, so the
target is rebuilt from Kafka alone (with the source's initial snapshot events).

A sink that applied the tables before the reset keeps, in memory, how it filled them (a bulk copy's
snapshot, whose hand-over skips the replayed `r` events) and the source positions it applied: were
it to apply the replay, the tables would keep only part of their rows. So nothing else applies them
while they are rebuilt:

- the rebuild holds, per table, an advisory lock of the target (two keys: `cdc-sink rebuild` and the
  table's name) from before it checks the consumer groups until the replay has reached the end
  offsets seen at start;
- with the locks held, it refuses while a live member of its own group, or a member holding a
  partition of the tables' topics in another group that applied them to this target, is in its
  group (first waiting up to the session timeout, for a member stopped a moment ago);
- a sink assigned a partition of a locked table's topic stops with one line (`check_not_rebuilding`,
  at every assignment), so a sink started or rebalanced meanwhile never applies the replay.

A member that joined before the locks were taken is in its group when the rebuild looks; one that
joins after finds the locks at its assignment.
"""

import datetime as dt
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import psycopg2
from confluent_kafka import KafkaException
from psycopg2 import sql

from pg_kafka_cdc.common.catalog import table_exists
from pg_kafka_cdc.common.errors import ConfigError, SinkError
from pg_kafka_cdc.common.kafka import kafka_reason
from pg_kafka_cdc.common.pg import connect_target
from pg_kafka_cdc.common.tables import TableName
from schemas.topics import table_for, topic_for
from sink_connector.bookkeeping import Bookkeeping, TopicPartition, groups_of
from sink_connector.group_members import Member, blocking_members, describe, refusal, wait_for_members
from sink_connector.session import SESSION_TIMEOUT_MS

log = logging.getLogger("sink.rebuild")

LOCK_CLASS = "cdc-sink rebuild"  # the first key of a table's rebuild lock; the second is its name
APPLICATION_NAME = "cdc-sink rebuild"
# How long a member stopped a moment ago may stay in its group: the session timeout, and a margin.
MEMBER_GRACE = SESSION_TIMEOUT_MS / 1000 + 3.0

_TRY_LOCK = sql.SQL("SELECT pg_try_advisory_lock(hashtext({}), hashtext(%s))").format(sql.Literal(LOCK_CLASS))
_HOLDERS = sql.SQL(
    "SELECT t.name, l.pid, a.application_name, host(a.client_addr), a.backend_start "
    "FROM unnest(%s::text[]) AS t(name) "
    "JOIN pg_locks l ON l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 "
    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND l.classid = hashtext({})::oid AND l.objid = hashtext(t.name)::oid "
    "LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
    "WHERE l.pid <> pg_backend_pid() ORDER BY t.name"
).format(sql.Literal(LOCK_CLASS))
_HOLDS = sql.SQL(
    "SELECT count(*) FROM unnest(%s::text[]) AS t(name) "
    "JOIN pg_locks l ON l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 "
    "AND l.classid = hashtext({})::oid AND l.objid = hashtext(t.name)::oid AND l.pid = pg_backend_pid()"
).format(sql.Literal(LOCK_CLASS))


class Holder(NamedTuple):
    table: str
    pid: int
    application: str | None
    client: str | None
    since: dt.datetime | None


def reset_tables(conn: Any, book: Bookkeeping, prefix: str, tables: tuple[TableName, ...]) -> None:
    """In one transaction: empty the tables, record them as filled from their topics (forgetting a
    bulk copy's snapshot), forget their offsets, the source positions applied of their topics and
    the group's keys parked on them. The schema changes applied to them (schema_history.py) are kept:
    the tables keep their columns, the replayed schema-change events are known as applied, and the
    changes older than them are translated to the tables' current shape. (A table dropped before the
    rebuild is created again from the events, and its schema changes applied again.)"""
    topics = [topic_for(prefix, t) for t in tables]
    with conn.cursor() as cur:
        for table in tables:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"cdc-sink {table}",))
            if table_exists(conn, table):
                cur.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(table.schema, table.name)))
            # filled from its topic from now on: a sink preparing the table meanwhile does not copy it
            book.forget_snapshot(cur, table)
            book.record_initialized(cur, table, "topic", None, None, 0, topic_for(prefix, table))
        book.reset(cur, topics)
        book.forget_parked(cur, topics)
    conn.commit()
    log.info("emptied %s; replaying their topics from the start", ", ".join(map(str, tables)))


# --- the locks --------------------------------------------------------------------------------


def holder_text(holder: Holder) -> str:
    """`cdc-sink rebuild (target pid 1234, from 10.0.0.5, since 2026-12-01 15:40:01 UTC)`."""
    details = [f"target pid {holder.pid}"]
    if holder.client:
        details.append(f"from {holder.client}")
    if holder.since is not None:
        details.append(f"since {holder.since.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S} UTC")
    return f"{holder.application or 'a session'} ({', '.join(details)})"


def holders(conn: Any, tables: Iterable[TableName]) -> list[Holder]:
    """The other sessions holding the rebuild lock of one of `tables`."""
    with conn.cursor() as cur:
        cur.execute(_HOLDERS, ([str(t) for t in tables],))
        rows = cur.fetchall()
    conn.commit()
    return [Holder(*row) for row in rows]


def check_not_rebuilding(conn: Any, prefix: str, topics: Iterable[str], exempt: Sequence[TableName] = ()) -> None:
    """At a sink's assignment: stop when `cdc-sink rebuild` is rebuilding the table of one of `topics`
    (other than `exempt`, the rebuild's own)."""
    named = {table_for(prefix, topic) for topic in topics}
    tables = sorted(t for t in named if t is not None and t not in exempt)
    if not tables:
        return
    found = holders(conn, tables)
    if found:
        first = found[0]
        raise SinkError(
            f"target table {first.table} is being rebuilt by {holder_text(first)}: this sink stops so that "
            "it does not apply the replay; start it again once the rebuild has finished"
        )


@dataclass
class RebuildLocks:
    """The rebuild locks of `tables`, held by a target session of their own until released."""

    dsn: str
    tables: tuple[TableName, ...]
    conn: Any = None

    def connect(self) -> Any:
        self.conn = connect_target(self.dsn, application_name=APPLICATION_NAME, autocommit=False)
        return self.conn

    def take(self) -> None:
        taken = []
        with self.conn.cursor() as cur:
            for table in self.tables:
                cur.execute(_TRY_LOCK, (str(table),))
                if cur.fetchone()[0]:
                    taken.append(table)
        self.conn.commit()
        if len(taken) < len(self.tables):
            others = holders(self.conn, self.tables)
            self.release()
            busy = ", ".join(sorted({h.table for h in others})) or "a table"
            by = holder_text(others[0]) if others else "another session"
            raise SinkError(f"{busy} is being rebuilt already, by {by}: wait until it has finished")

    def held(self) -> bool:
        """Whether this session still holds every lock (its connection may have dropped)."""
        try:
            with self.conn.cursor() as cur:
                cur.execute(_HOLDS, ([str(t) for t in self.tables],))
                count = int(cur.fetchone()[0])
            self.conn.commit()
        except psycopg2.Error:
            return False
        return count == len(self.tables)

    def release(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()  # a session's advisory locks end with it
            finally:
                self.conn = None


# --- who else runs ----------------------------------------------------------------------------


def sink_groups(conn: Any, schema: str, group: str, topics: list[str]) -> list[str]:
    """The groups other than `group` whose sinks applied `topics` to this target."""
    with conn.cursor() as cur:
        found = groups_of(cur, schema, topics)
    conn.commit()
    return [g for g in found if g != group]


def refuse_while_sinks_run(
    admin: Any, group: str, others: Sequence[str], tables: Sequence[TableName], topics: Sequence[str], wait: float
) -> None:
    """Refuse (one line) while members of `group`, or members of the `others` groups assigned
    `topics`, run; waits up to `wait` seconds for members stopped a moment ago to leave."""

    def announce(members: list[Member]) -> None:
        log.info(
            "waiting up to %.0f s for %d member(s) of the consumer groups to leave: %s",
            wait,
            len(members),
            "; ".join(f"group {m.group}: {describe(m, topics)}" for m in members),
        )

    def read() -> list[Member]:
        try:
            return blocking_members(admin, group, others, topics)
        except KafkaException as exc:
            raise SinkError(
                f"cannot tell whether sinks apply {', '.join(map(str, tables))}: describing consumer groups "
                f"{', '.join([group, *others])} failed ({kafka_reason(exc)}); the role needs Describe on them"
            ) from None

    members = wait_for_members(read, time.monotonic() + wait, time.monotonic, time.sleep, announce)
    if members:
        raise SinkError(refusal(members, group, tables, topics))


def missing_topics(existing: Iterable[str], topics: Sequence[str]) -> list[str]:
    have = set(existing)
    return [t for t in topics if t not in have]


def check_topics(existing: Iterable[str], prefix: str, tables: Sequence[TableName]) -> list[str]:
    """The tables' topics; a table without one cannot be rebuilt (nothing would fill it)."""
    topics = [topic_for(prefix, t) for t in tables]
    missing = missing_topics(existing, topics)
    if missing:
        raise ConfigError(
            f"topic {', '.join(missing)} does not exist, so nothing can rebuild its table "
            "(check --tables and --topic-prefix; the source publishes a table's topic when it starts)"
        )
    return topics


def unfinished(ends: Mapping[TopicPartition, int], stored: Mapping[TopicPartition, int | None]) -> list[str]:
    """The partitions whose applied offset has not reached the end seen at start, as text."""
    return [
        f"{t}[{p}] at {stored.get((t, p)) or 0} of {end}"
        for (t, p), end in sorted(ends.items())
        if end > 0 and (stored.get((t, p)) or 0) < end
    ]
