"""The sink's own tables in the target database (schema `cdc_sink` by default), written in the same
transaction as the rows they describe:

- offsets:   the next Kafka offset to apply, per group, topic and partition (exactly-once effect,
             and fencing: a batch commits only if the stored offset is the one it started from);
- snapshots: how each table was first filled (bulk copy, topic replay or not at all), from which
             topic, and, for a copy, the snapshot it was taken under (stream hand-over);
- positions: per topic partition and source change stream, the last source position applied
             (applied.py: what a topic holds twice is never applied twice);
- tables:    per table, the newest source commit applied and when (lag, status);
- parked:    keys whose changes are held back behind a message sent to the dead-letter topic;
- schema_changes: per target table (by oid), the source's schema changes applied to it
             (schema_history.py).

cdc-status and cdc-verify read them through the functions here too.
"""

import datetime as dt
from typing import Any, NamedTuple

from psycopg2 import sql

from pg_kafka_cdc.common.lsn import int_to_lsn, lsn_to_int
from pg_kafka_cdc.common.tables import TableName
from schemas.codec import Position
from sink_connector.handover import CopySnapshot
from sink_connector.schema_history import DDL as SCHEMA_CHANGES_DDL
from sink_connector.target import ensure_schema

TopicPartition = tuple[str, int]
StreamPartition = tuple[str, int, str]  # topic, partition, source change stream (see applied.py)


class TableProgress(NamedTuple):
    last_commit_at: dt.datetime | None  # the newest source commit applied
    applied_at: dt.datetime  # when the sink last applied a change of the table
    changes: int  # applied so far


_TABLES = [
    """CREATE TABLE IF NOT EXISTS {schema}.offsets (
        group_id    text NOT NULL,
        topic       text NOT NULL,
        partition   integer NOT NULL,
        next_offset bigint,
        updated_at  timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (group_id, topic, partition))""",
    """CREATE TABLE IF NOT EXISTS {schema}.snapshots (
        schema_name text NOT NULL,
        table_name  text NOT NULL,
        mode        text NOT NULL,
        snapshot    text,
        lsn         pg_lsn,
        rows        bigint NOT NULL DEFAULT 0,
        copied_at   timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (schema_name, table_name))""",
    "ALTER TABLE {schema}.snapshots ADD COLUMN IF NOT EXISTS topic text",
    """CREATE TABLE IF NOT EXISTS {schema}.tables (
        group_id        text NOT NULL,
        schema_name     text NOT NULL,
        table_name      text NOT NULL,
        last_commit_at  timestamptz,
        last_commit_lsn pg_lsn,
        applied_at      timestamptz NOT NULL DEFAULT now(),
        changes         bigint NOT NULL DEFAULT 0,
        PRIMARY KEY (group_id, schema_name, table_name))""",
    # the last position applied (commit_lsn, seq, rank) of each stream per partition, for any group
    """CREATE TABLE IF NOT EXISTS {schema}.positions (
        topic text NOT NULL, partition integer NOT NULL, stream text NOT NULL,
        commit_lsn bigint NOT NULL, seq bigint NOT NULL, rank smallint NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (topic, partition, stream))""",
    """CREATE TABLE IF NOT EXISTS {schema}.parked (
        group_id    text NOT NULL,
        topic       text NOT NULL,
        key         bytea NOT NULL,
        first_offset bigint NOT NULL,
        reason      text NOT NULL,
        parked_at   timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (group_id, topic, key))""",
    SCHEMA_CHANGES_DDL,
    # --consistency transaction: the last source transaction whose effect is complete on the target
    """CREATE TABLE IF NOT EXISTS {schema}.consistency (
        group_id     text PRIMARY KEY,
        stream       text NOT NULL,
        txid         bigint,
        commit_lsn   bigint NOT NULL,
        committed_at timestamptz,
        transactions bigint NOT NULL DEFAULT 0,
        reached      boolean NOT NULL,
        updated_at   timestamptz NOT NULL DEFAULT now())""",
]


class ConsistentPoint(NamedTuple):
    """The last source transaction applied whole (--consistency transaction); `reached`: the target
    is consistent as of its commit (false while bulk copies taken at later snapshots are caught up with)."""

    stream: str
    txid: int | None
    commit_lsn: int
    ts_us: int | None
    transactions: int  # applied so far by the group
    reached: bool


def installed(cur: Any, schema: str) -> bool:
    """Whether the sink's tables exist in `schema` (it has run against this database). The tables are
    created together, in one transaction."""
    cur.execute("SELECT to_regclass(%s) IS NOT NULL", (sql.Identifier(schema, "offsets").as_string(cur),))
    return bool(cur.fetchone()[0])


def initialized_tables(cur: Any, schema: str) -> list[TableName]:
    """The tables the sink has filled (copied, replayed or taken as they were), in name order."""
    cur.execute(
        sql.SQL("SELECT schema_name, table_name FROM {} ORDER BY 1, 2").format(sql.Identifier(schema, "snapshots"))
    )
    return [TableName(s, t) for s, t in cur.fetchall()]


def groups_of(cur: Any, schema: str, topics: list[str]) -> list[str]:
    """The consumer groups that have applied (or claimed) a partition of `topics`, in name order."""
    if not installed(cur, schema):
        return []
    cur.execute(
        sql.SQL("SELECT DISTINCT group_id FROM {} WHERE topic = ANY(%s) ORDER BY 1").format(
            sql.Identifier(schema, "offsets")
        ),
        (topics,),
    )
    return [g for (g,) in cur.fetchall()]


class Bookkeeping:
    def __init__(self, schema: str, group: str) -> None:
        self.schema = schema
        self.group = group
        self.s = sql.Identifier(schema)

    def _t(self, name: str) -> sql.Identifier:
        return sql.Identifier(self.schema, name)

    def install(self, conn: Any) -> None:
        with conn.cursor() as cur:
            # Sinks starting together would race to create the same schema and tables: one at a time.
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"cdc-sink install {self.schema}",))
            ensure_schema(cur, self.schema)
            for statement in _TABLES:
                cur.execute(sql.SQL(statement).format(schema=self.s))
        conn.commit()

    # --- offsets ------------------------------------------------------------------------------

    def claim(self, conn: Any, partitions: list[TopicPartition]) -> dict[TopicPartition, int | None]:
        """Make sure every partition has an offsets row (so a batch can lock it) and return the
        stored next offsets (None: nothing applied yet)."""
        if not partitions:
            return {}
        topics = [t for t, _ in partitions]
        numbers = [p for _, p in partitions]
        with conn.cursor() as cur:
            cur.execute(
                sql.SQL(
                    "INSERT INTO {} (group_id, topic, partition) SELECT %s, t, p FROM unnest(%s::text[], %s::int[]) "
                    "AS x(t, p) ON CONFLICT DO NOTHING"
                ).format(self._t("offsets")),
                (self.group, topics, numbers),
            )
            stored = self._offsets_of(cur, partitions, sql.SQL(""))
        conn.commit()
        return stored

    def lock(self, cur: Any, partitions: list[TopicPartition]) -> dict[TopicPartition, int | None]:
        """Inside a batch: lock the partitions' rows and return what they hold."""
        return self._offsets_of(cur, partitions, sql.SQL(" FOR UPDATE"))

    def _offsets_of(
        self, cur: Any, partitions: list[TopicPartition], locking: sql.Composable
    ) -> dict[TopicPartition, int | None]:
        cur.execute(
            sql.SQL(
                "SELECT topic, partition, next_offset FROM {} WHERE group_id = %s "
                "AND (topic, partition) IN (SELECT * FROM unnest(%s::text[], %s::int[])){}"
            ).format(self._t("offsets"), locking),
            (self.group, [t for t, _ in partitions], [p for _, p in partitions]),
        )
        return {(t, p): o for t, p, o in cur.fetchall()}

    def store(self, cur: Any, positions: dict[TopicPartition, int]) -> None:
        cur.execute(
            sql.SQL(
                "INSERT INTO {} (group_id, topic, partition, next_offset) "
                "SELECT %s, t, p, o FROM unnest(%s::text[], %s::int[], %s::bigint[]) AS x(t, p, o) "
                "ON CONFLICT (group_id, topic, partition) DO UPDATE "
                "SET next_offset = EXCLUDED.next_offset, updated_at = now()"
            ).format(self._t("offsets")),
            (
                self.group,
                [t for t, _ in positions],
                [p for _, p in positions],
                list(positions.values()),
            ),
        )

    def positions(self, cur: Any, partitions: list[TopicPartition]) -> dict[StreamPartition, Position]:
        """The last source position applied per stream, of these partitions (whichever group applied it:
        the target's rows do not depend on the group)."""
        cur.execute(
            sql.SQL(
                "SELECT topic, partition, stream, commit_lsn, seq, rank FROM {} "
                "WHERE (topic, partition) IN (SELECT * FROM unnest(%s::text[], %s::int[]))"
            ).format(self._t("positions")),
            ([t for t, _ in partitions], [p for _, p in partitions]),
        )
        return {(t, p, s): (c, q, r) for t, p, s, c, q, r in cur.fetchall()}

    def store_positions(self, cur: Any, positions: dict[StreamPartition, Position]) -> None:
        items = list(positions.items())
        cur.execute(
            sql.SQL(
                "INSERT INTO {} (topic, partition, stream, commit_lsn, seq, rank) "
                "SELECT * FROM unnest(%s::text[], %s::int[], %s::text[], %s::bigint[], %s::bigint[], %s::smallint[]) "
                "ON CONFLICT (topic, partition, stream) DO UPDATE SET commit_lsn = EXCLUDED.commit_lsn, "
                "seq = EXCLUDED.seq, rank = EXCLUDED.rank, updated_at = now()"
            ).format(self._t("positions")),
            (
                [t for (t, _, _), _ in items],
                [p for (_, p, _), _ in items],
                [s for (_, _, s), _ in items],
                [c for _, (c, _, _) in items],
                [q for _, (_, q, _) in items],
                [r for _, (_, _, r) in items],
            ),
        )

    def applied_offsets(self, cur: Any) -> dict[TopicPartition, int | None]:
        """The group's next offsets, every partition it has a row for."""
        cur.execute(
            sql.SQL("SELECT topic, partition, next_offset FROM {} WHERE group_id = %s").format(self._t("offsets")),
            (self.group,),
        )
        return {(t, p): o for t, p, o in cur.fetchall()}

    def all_offsets(self, conn: Any) -> dict[TopicPartition, int | None]:
        with conn.cursor() as cur:
            offsets = self.applied_offsets(cur)
        conn.commit()
        return offsets

    def reset(self, cur: Any, topics: list[str]) -> None:
        """Replay from the start: forget the applied offsets and source positions of `topics`."""
        cur.execute(
            sql.SQL(
                "UPDATE {} SET next_offset = NULL, updated_at = now() WHERE group_id = %s AND topic = ANY(%s)"
            ).format(self._t("offsets")),
            (self.group, topics),
        )
        cur.execute(sql.SQL("DELETE FROM {} WHERE topic = ANY(%s)").format(self._t("positions")), (topics,))

    # --- the consistent point ------------------------------------------------------------------

    def consistency(self, cur: Any) -> ConsistentPoint | None:
        cur.execute(
            sql.SQL(
                "SELECT stream, txid, commit_lsn, (extract(epoch FROM committed_at) * 1e6)::bigint, transactions, "
                "reached FROM {} WHERE group_id = %s"
            ).format(self._t("consistency")),
            (self.group,),
        )
        row = cur.fetchone()
        return None if row is None else ConsistentPoint(*row)

    def store_consistency(self, cur: Any, point: ConsistentPoint) -> None:
        cur.execute(
            sql.SQL(
                "INSERT INTO {} (group_id, stream, txid, commit_lsn, committed_at, transactions, reached) "
                "VALUES (%s, %s, %s, %s, to_timestamp(%s / 1e6), %s, %s) ON CONFLICT (group_id) DO UPDATE SET "
                "stream = EXCLUDED.stream, txid = EXCLUDED.txid, commit_lsn = EXCLUDED.commit_lsn, "
                "committed_at = EXCLUDED.committed_at, transactions = EXCLUDED.transactions, "
                "reached = EXCLUDED.reached, updated_at = now()"
            ).format(self._t("consistency")),
            (self.group, *point),
        )

    # --- per-table progress ---------------------------------------------------------------------

    def progress(self, cur: Any, tables: list[tuple[TableName, int | None, int | None, int]]) -> None:
        """(table, newest source commit time in µs, newest commit LSN, changes) for each table of a batch."""
        cur.execute(
            sql.SQL(
                "INSERT INTO {} AS t (group_id, schema_name, table_name, last_commit_at, last_commit_lsn, changes) "
                "SELECT %s, s, n, to_timestamp(ts / 1e6), lsn::pg_lsn, c "
                "FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::text[], %s::bigint[]) AS x(s, n, ts, lsn, c) "
                "ON CONFLICT (group_id, schema_name, table_name) DO UPDATE SET "
                "last_commit_at = greatest(t.last_commit_at, EXCLUDED.last_commit_at), "
                "last_commit_lsn = greatest(t.last_commit_lsn, EXCLUDED.last_commit_lsn), "
                "applied_at = now(), changes = t.changes + EXCLUDED.changes"
            ).format(self._t("tables")),
            (
                self.group,
                [t.schema for t, _, _, _ in tables],
                [t.name for t, _, _, _ in tables],
                [ts for _, ts, _, _ in tables],
                [None if lsn is None else int_to_lsn(lsn) for _, _, lsn, _ in tables],
                [n for _, _, _, n in tables],
            ),
        )

    def table_progress(self, cur: Any) -> dict[TableName, TableProgress]:
        """What the group has applied, per table."""
        cur.execute(
            sql.SQL(
                "SELECT schema_name, table_name, last_commit_at, applied_at, changes FROM {} WHERE group_id = %s"
            ).format(self._t("tables")),
            (self.group,),
        )
        return {TableName(s, n): TableProgress(c, a, k) for s, n, c, a, k in cur.fetchall()}

    # --- bulk copies ----------------------------------------------------------------------------

    def initialized(self, cur: Any, table: TableName) -> tuple[str, CopySnapshot | None] | None:
        """How the table was first filled, with the copy's snapshot; None when it never was."""
        cur.execute(
            sql.SQL("SELECT mode, snapshot, lsn::text FROM {} WHERE schema_name = %s AND table_name = %s").format(
                self._t("snapshots")
            ),
            (table.schema, table.name),
        )
        row = cur.fetchone()
        if row is None:
            return None
        mode, snapshot, lsn = row
        if mode != "copy" or snapshot is None:
            return mode, None
        return mode, CopySnapshot.parse(snapshot, lsn_to_int(lsn))

    def record_initialized(
        self,
        cur: Any,
        table: TableName,
        mode: str,
        snapshot_text: str | None,
        lsn: str | None,
        rows: int,
        topic: str | None = None,
    ) -> None:
        cur.execute(
            sql.SQL(
                "INSERT INTO {} (schema_name, table_name, mode, snapshot, lsn, rows, topic) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (schema_name, table_name) DO UPDATE SET mode = EXCLUDED.mode, "
                "snapshot = EXCLUDED.snapshot, lsn = EXCLUDED.lsn, rows = EXCLUDED.rows, "
                "topic = EXCLUDED.topic, copied_at = now()"
            ).format(self._t("snapshots")),
            (table.schema, table.name, mode, snapshot_text, lsn, rows, topic),
        )

    def filled_from(self, cur: Any, table: TableName) -> str | None:
        """The topic whose changes fill the table (None: not recorded, by a version before it was)."""
        cur.execute(
            sql.SQL("SELECT topic FROM {} WHERE schema_name = %s AND table_name = %s").format(
                self._t("snapshots")
            ),
            (table.schema, table.name),
        )
        row = cur.fetchone()
        return None if row is None else row[0]

    def forget_snapshot(self, cur: Any, table: TableName) -> None:
        cur.execute(
            sql.SQL("DELETE FROM {} WHERE schema_name = %s AND table_name = %s").format(self._t("snapshots")),
            (table.schema, table.name),
        )

    # --- parked keys ----------------------------------------------------------------------------

    def parked(self, conn: Any) -> set[tuple[str, bytes]]:
        with conn.cursor() as cur:
            cur.execute(
                sql.SQL("SELECT topic, key FROM {} WHERE group_id = %s").format(self._t("parked")), (self.group,)
            )
            rows = cur.fetchall()
        conn.commit()
        return {(t, bytes(k)) for t, k in rows}

    def park(self, cur: Any, topic: str, key: bytes, offset: int, reason: str) -> None:
        cur.execute(
            sql.SQL(
                "INSERT INTO {} (group_id, topic, key, first_offset, reason) VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT DO NOTHING"
            ).format(self._t("parked")),
            (self.group, topic, key, offset, reason),
        )

    def forget_parked(self, cur: Any, topics: list[str]) -> None:
        """Replay from the start: the group's keys parked on `topics` are parked again if still bad."""
        cur.execute(
            sql.SQL("DELETE FROM {} WHERE group_id = %s AND topic = ANY(%s)").format(self._t("parked")),
            (self.group, topics),
        )
