"""The benchmark's table and its workloads, generated inside PostgreSQL (fast, and no client in the
way): N changes in a fixed 70/20/10 insert/update/delete pattern, or a filled table for the snapshot.

Change i (0-based) belongs to cycle c = i / 10 at position p = i % 10: positions 0-6 insert id 7c+p+1,
7-8 update id 2c+p-6, 9 deletes id c+1. Every update and delete hits a row that exists at that point
whatever the transaction size (inserts, then updates, then deletes within a transaction), and no id
is touched after its delete, so the source, the sink's target and a native subscriber all end with
the same rows.
"""

import time
from dataclasses import dataclass
from typing import Any

from psycopg2 import sql

from bench.config import Workload
from bench.pg import current_lsn, execute, scalar
from pg_kafka_cdc.common.lsn import lsn_to_int

TABLE = "person"
QUALIFIED = "public.person"

DDL = """
CREATE TABLE public.person (
    id          bigint PRIMARY KEY,
    first_name  text NOT NULL,
    last_name   text NOT NULL,
    email       text NOT NULL,
    age         integer,
    balance     numeric(12,2) NOT NULL,
    active      boolean NOT NULL,
    profile     jsonb,
    pad         text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);
-- the extra text of the ~4 KB rows stays inline and uncompressed, so every change carries it
ALTER TABLE public.person ALTER COLUMN pad SET STORAGE PLAIN;
"""

FUNCTIONS = (
    # `len` characters of hex text that differ from row to row (so Kafka's lz4 cannot fold them)
    """
CREATE FUNCTION bench_pad(seed bigint, len integer) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN len <= 0 THEN '' ELSE left(string_agg(md5((seed * 1000 + k)::text), ''), len) END
    FROM generate_series(1, greatest((len + 31) / 32, 1)) AS k
$$""",
    # row i of the table (a set-returning SQL function, so the planner inlines it)
    """
CREATE FUNCTION bench_person(i bigint, pad integer) RETURNS SETOF public.person LANGUAGE sql STABLE AS $$
    SELECT i, 'fn' || (i % 997), 'ln' || (i % 991), 'u' || i || '@ex.org', (18 + i % 60)::integer,
           ((i * 7919) % 1000000) / 100.0, i % 5 <> 0, jsonb_build_object('n', i, 'g', i % 3),
           bench_pad(i, pad), now(), now()
$$""",
    """
CREATE PROCEDURE bench_generate(n bigint, tx_size integer, pad integer) LANGUAGE plpgsql AS $$
DECLARE
    s bigint := 0;
    e bigint;
BEGIN
    WHILE s < n LOOP
        e := least(s + tx_size, n);
        INSERT INTO public.person
            SELECT p.* FROM generate_series(s, e - 1) AS i, bench_person(7 * (i / 10) + i % 10 + 1, pad) AS p
            WHERE i % 10 < 7;
        IF e - s > 1 OR s % 10 IN (7, 8) THEN
            UPDATE public.person
               SET balance = balance + 1.25, age = age + 1, updated_at = clock_timestamp()
             WHERE id IN (SELECT 2 * (i / 10) + i % 10 - 6 FROM generate_series(s, e - 1) AS i
                          WHERE i % 10 IN (7, 8));
        END IF;
        IF e - s > 1 OR s % 10 = 9 THEN
            DELETE FROM public.person
             WHERE id IN (SELECT i / 10 + 1 FROM generate_series(s, e - 1) AS i WHERE i % 10 = 9);
        END IF;
        COMMIT;
        s := e;
    END LOOP;
END
$$""",
)


@dataclass(frozen=True)
class Generated:
    start_lsn: int
    end_lsn: int
    seconds: float
    changes: int
    inserts: int
    updates: int
    deletes: int
    final_rows: int
    avg_row_bytes: float

    def describe(self) -> dict[str, Any]:
        return {
            "changes": self.changes,
            "inserts": self.inserts,
            "updates": self.updates,
            "deletes": self.deletes,
            "final_rows": self.final_rows,
            "avg_row_bytes": round(self.avg_row_bytes, 1),
            "wal_bytes": self.end_lsn - self.start_lsn,
            "generation_seconds": round(self.seconds, 2),
            "generation_changes_per_s": round(self.changes / max(self.seconds, 1e-9)),
        }


def counts(n: int) -> tuple[int, int, int]:
    """(inserts, updates, deletes) among the first n changes."""
    full, rest = divmod(n, 10)
    return 7 * full + min(rest, 7), 2 * full + max(0, min(rest, 9) - 7), full


def create_schema(conn: Any, publication: str | None = None) -> None:
    """The table (and its helpers) in conn's database; a publication for it when asked."""
    execute(conn, DDL)
    for statement in FUNCTIONS:
        execute(conn, statement)
    if publication is not None:
        execute(conn, sql.SQL("CREATE PUBLICATION {} FOR TABLE public.person").format(sql.Identifier(publication)))


def create_table_only(conn: Any) -> None:
    """The same table on a target (a native subscriber, the COPY pipe's destination)."""
    execute(conn, DDL)


def generate(conn: Any, workload: Workload) -> Generated:
    """Run the workload in transactions of workload.tx_size changes; the end is the WAL position
    right after the last commit."""
    execute(conn, "SET synchronous_commit = off")  # the WAL is the same; only the fsync waits go
    start = current_lsn(conn)
    started = time.monotonic()
    execute(conn, "CALL bench_generate(%s, %s, %s)", (workload.changes, workload.tx_size, workload.pad_bytes))
    seconds = time.monotonic() - started
    execute(conn, "RESET synchronous_commit")
    end = wal_end_after_commit(conn)
    inserts, updates, deletes = counts(workload.changes)
    rows = int(scalar(conn, "SELECT count(*) FROM public.person"))
    if rows != inserts - deletes:
        raise RuntimeError(f"the workload left {rows} rows, expected {inserts - deletes}")
    avg = float(scalar(conn, "SELECT coalesce(avg(pg_column_size(p.*)), 0) FROM public.person AS p") or 0)
    return Generated(start, end, seconds, workload.changes, inserts, updates, deletes, rows, avg)


def wal_end_after_commit(conn: Any) -> int:
    """pg_current_wal_lsn() once it covers everything inserted so far: with synchronous_commit off
    the last commit record may not be written yet when the procedure returns."""
    inserted = lsn_to_int(scalar(conn, "SELECT pg_current_wal_insert_lsn()::text"))
    while (written := current_lsn(conn)) < inserted:
        time.sleep(0.01)
    return written


def fill(conn: Any, rows: int) -> float:
    """A table of `rows` rows for the snapshot scenario, vacuumed (hint bits set, statistics known);
    returns the average row size."""
    execute(conn, "SET synchronous_commit = off")
    execute(
        conn,
        "INSERT INTO public.person SELECT p.* FROM generate_series(1, %s) AS i, bench_person(i, 0) AS p",
        (rows,),
    )
    execute(conn, "VACUUM (ANALYZE) public.person")
    return float(scalar(conn, "SELECT avg(pg_column_size(p.*)) FROM public.person AS p"))


def fingerprint(conn: Any) -> tuple[int, int, str]:
    """(count, sum of ids, sum of balances): a cheap check that two copies of the table agree."""
    with conn.cursor() as cur:
        cur.execute("SELECT count(*), coalesce(sum(id), 0), coalesce(sum(balance), 0)::text FROM public.person")
        count, ids, balances = cur.fetchone()
    return int(count), int(ids), str(balances)
