"""pgbench's tables and its built-in TPC-B-like transactions, generated inside PostgreSQL (as
bench/workload.py does for the person table), for the scenario of source transactions applied whole.

The tables are pgbench's (`pgbench -i` at the given scale: 100,000 accounts, 10 tellers and 1 branch
per unit of scale, balances 0), with `pgbench_history` given a primary key (`hid bigserial`), which
pgbench leaves without one. Transaction i does what pgbench's `tpcb-like` script writes: the same
delta (-5000..5000) added to one account, one teller and one branch, and a history row; its account,
teller and branch are chosen independently, as pgbench does, from hashes of i instead of random
numbers, so every run (and every target) sees the same WAL. That is 4 row changes per transaction,
on 4 tables, and `sum(abalance) = sum(tbalance) = sum(bbalance)` after every transaction.
"""

import time
from dataclasses import dataclass
from typing import Any

from psycopg2 import sql

from bench.config import TPCB_CHANGES_PER_TRANSACTION, TpcbWorkload
from bench.pg import execute, scalar
from bench.workload import wal_end_after_commit
from pg_kafka_cdc.common.lsn import lsn_to_int

TABLES = ("pgbench_accounts", "pgbench_branches", "pgbench_history", "pgbench_tellers")
QUALIFIED = ",".join(f"public.{t}" for t in TABLES)
CHANGES_PER_TRANSACTION = TPCB_CHANGES_PER_TRANSACTION  # 3 updates and 1 insert

DDL = """
CREATE TABLE public.pgbench_branches (
    bid integer PRIMARY KEY, bbalance integer NOT NULL, filler char(88)
);
CREATE TABLE public.pgbench_tellers (
    tid integer PRIMARY KEY, bid integer NOT NULL, tbalance integer NOT NULL, filler char(84)
);
CREATE TABLE public.pgbench_accounts (
    aid integer PRIMARY KEY, bid integer NOT NULL, abalance integer NOT NULL, filler char(84)
);
CREATE TABLE public.pgbench_history (
    tid integer, bid integer, aid integer, delta integer, mtime timestamp, filler char(22),
    hid bigserial PRIMARY KEY
);
"""

# pgbench -i: accounts have a blank filler, tellers and branches none
FILL = """
INSERT INTO public.pgbench_branches (bid, bbalance) SELECT b, 0 FROM generate_series(1, %s) AS b;
INSERT INTO public.pgbench_tellers (tid, bid, tbalance)
    SELECT t, (t - 1) / 10 + 1, 0 FROM generate_series(1, 10 * %s) AS t;
INSERT INTO public.pgbench_accounts (aid, bid, abalance, filler)
    SELECT a, (a - 1) / 100000 + 1, 0, '' FROM generate_series(1, 100000 * %s) AS a;
"""

PROCEDURE = """
CREATE PROCEDURE bench_tpcb(first bigint, n bigint, scale integer) LANGUAGE plpgsql AS $$
DECLARE
    a integer;
    t integer;
    b integer;
    d integer;
BEGIN
    FOR i IN first .. first + n - 1 LOOP
        a := 1 + (hashint8extended(i, 1) % (100000 * scale) + 100000 * scale) % (100000 * scale);
        t := 1 + (hashint8extended(i, 2) % (10 * scale) + 10 * scale) % (10 * scale);
        b := 1 + (hashint8extended(i, 3) % scale + scale) % scale;
        d := (hashint8extended(i, 4) % 10001 + 10001) % 10001 - 5000;
        UPDATE public.pgbench_accounts SET abalance = abalance + d WHERE aid = a;
        UPDATE public.pgbench_tellers SET tbalance = tbalance + d WHERE tid = t;
        UPDATE public.pgbench_branches SET bbalance = bbalance + d WHERE bid = b;
        INSERT INTO public.pgbench_history (tid, bid, aid, delta, mtime) VALUES (t, b, a, d, CURRENT_TIMESTAMP);
        COMMIT;
    END LOOP;
END
$$"""

FINGERPRINT = """
SELECT (SELECT count(*) FROM public.pgbench_history),
       (SELECT coalesce(sum(delta), 0) FROM public.pgbench_history),
       (SELECT coalesce(sum(aid::bigint * abalance), 0) FROM public.pgbench_accounts),
       (SELECT coalesce(sum(tid::bigint * tbalance), 0) FROM public.pgbench_tellers),
       (SELECT coalesce(sum(bid::bigint * bbalance), 0) FROM public.pgbench_branches),
       (SELECT coalesce(sum(abalance), 0) FROM public.pgbench_accounts),
       (SELECT coalesce(sum(tbalance), 0) FROM public.pgbench_tellers),
       (SELECT coalesce(sum(bbalance), 0) FROM public.pgbench_branches)
"""


@dataclass(frozen=True)
class Generated:
    start_lsn: int
    end_lsn: int
    seconds: float
    transactions: int

    @property
    def changes(self) -> int:
        return self.transactions * CHANGES_PER_TRANSACTION

    def describe(self) -> dict[str, Any]:
        return {
            "transactions": self.transactions,
            "changes": self.changes,
            "changes_per_transaction": CHANGES_PER_TRANSACTION,
            "wal_bytes": self.end_lsn - self.start_lsn,
            "generation_seconds": round(self.seconds, 2),
            "generation_transactions_per_s": round(self.transactions / max(self.seconds, 1e-9)),
        }


def create_tables(conn: Any, scale: int, publication: str | None = None) -> None:
    """pgbench's tables at `scale`, filled as `pgbench -i` leaves them (on the source and on every
    target: the benchmark's targets start from the same rows without copying them)."""
    execute(conn, DDL)
    execute(conn, FILL, (scale, scale, scale))
    execute(conn, "VACUUM (ANALYZE) public.pgbench_branches, public.pgbench_tellers, public.pgbench_accounts")
    if publication is not None:
        execute(
            conn,
            sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                sql.Identifier(publication), sql.SQL(", ").join(sql.Identifier("public", t) for t in TABLES)
            ),
        )


def generate(conn: Any, workload: TpcbWorkload) -> Generated:
    """workload.transactions TPC-B-like transactions, one commit each; the end is the WAL position
    right after the last commit."""
    execute(conn, PROCEDURE)
    execute(conn, "SET synchronous_commit = off")  # the WAL is the same; only the fsync waits go
    start = lsn_to_int(scalar(conn, "SELECT pg_current_wal_lsn()::text"))
    started = time.monotonic()
    execute(conn, "CALL bench_tpcb(0, %s, %s)", (workload.transactions, workload.scale))
    seconds = time.monotonic() - started
    execute(conn, "RESET synchronous_commit")
    end = wal_end_after_commit(conn)
    rows = int(scalar(conn, "SELECT count(*) FROM public.pgbench_history"))
    if rows != workload.transactions:
        raise RuntimeError(f"the workload left {rows} history rows, expected {workload.transactions}")
    balanced = fingerprint(conn)
    if not balanced[5] == balanced[6] == balanced[7]:
        raise RuntimeError(f"the workload left unequal balance sums {balanced[5:]}")
    return Generated(start, end, seconds, workload.transactions)


def fingerprint(conn: Any) -> tuple[int, ...]:
    """History rows and deltas, the key-weighted balances of each table and their plain sums: a
    cheap check that two copies agree."""
    with conn.cursor() as cur:
        cur.execute(FINGERPRINT)
        row = cur.fetchone()
    return tuple(int(x) for x in row)
