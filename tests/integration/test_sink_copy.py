"""cdc-sink end to end: the bulk copy of tables that exist before the slot, while they change, and
keys deleted and created again before the copy."""

import random
import threading
import time

import psycopg2

from tests.conftest import Databases, Stack
from tests.helpers import psql_rows, wait_until
from tests.pipeline import (
    assert_same_rows,
    execute,
    start_sink,
    start_source,
    stop_cleanly,
    wait_for_output,
    wait_high_watermark,
    wait_identical,
    wait_while_running,
)
from tests.sink_runs import names_of, topic_of


class Churn:
    """Keeps updating, inserting and deleting rows of `public.big` in small transactions, in a
    background thread, until stopped."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.stopped = threading.Event()
        self.transactions = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="churn", daemon=True)

    def __enter__(self) -> "Churn":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the churn thread did not stop"
        if self.error is not None:
            raise AssertionError(f"the churn thread failed: {self.error}")

    def _run(self) -> None:
        rng = random.Random(7)
        next_id = 200_001
        try:
            conn = psycopg2.connect(self.dsn, connect_timeout=10)
            try:
                with conn.cursor() as cur:
                    while not self.stopped.is_set():
                        low = rng.randint(1, 99_000)
                        cur.execute(
                            "UPDATE public.big SET v = v + 1, t = md5(random()::text) WHERE id BETWEEN %s AND %s",
                            (low, low + 20),
                        )
                        cur.execute("DELETE FROM public.big WHERE id = %s", (rng.randint(1, 100_000),))
                        cur.execute(
                            "INSERT INTO public.big SELECT g, 0, md5(g::text) FROM generate_series(%s, %s) g",
                            (next_id, next_id + 4),
                        )
                        next_id += 5
                        conn.commit()
                        self.transactions += 1
                        time.sleep(0.01)
            finally:
                conn.close()
        except BaseException as exc:
            self.error = exc


def test_preexisting_table_is_copied_while_it_changes(dbs: Databases, topic_prefix: str) -> None:
    slot, group = names_of(dbs, topic_prefix)
    execute(
        dbs.source_dsn,
        "CREATE TABLE public.big (id integer PRIMARY KEY, v integer NOT NULL, t text)",
        "INSERT INTO public.big SELECT g, g % 97, md5(g::text) FROM generate_series(1, 100000) g",
    )
    with Churn(dbs.source_dsn) as churn:
        wait_until(lambda: churn.transactions > 0, timeout=30, message="the churn never wrote")
        source = start_source(dbs, topic_prefix, slot)
        wait_for_output(source, "created slot")
        # a transaction still open when the copy takes its snapshot, committed after the copy
        straddling = psycopg2.connect(dbs.source_dsn, connect_timeout=10)
        try:
            with straddling.cursor() as cur:
                cur.execute("UPDATE public.big SET v = -1, t = 'straddling' WHERE id BETWEEN 99001 AND 99500")
                cur.execute("DELETE FROM public.big WHERE id BETWEEN 98001 AND 98100")
                cur.execute(
                    "INSERT INTO public.big SELECT g, -2, 'straddling' FROM generate_series(150001, 150100) g"
                )
            sink = start_sink(dbs, topic_prefix, slot, group)
            wait_for_output(sink, "copied", timeout=120)
            straddling.commit()
        finally:
            straddling.close()
        copied_at = churn.transactions
        # changes keep coming after the copy, so the stream has to take over from it
        wait_while_running(
            lambda: churn.transactions > copied_at + 50,
            (source, sink),
            timeout=60,
            message="the churn stalled",
        )
    wait_identical(dbs, ["public.big"], timeout=120, processes=(source, sink))
    assert_same_rows(dbs, ["public.big"])
    stop_cleanly(sink, source)


def test_keys_deleted_and_created_again_before_the_copy_survive_their_tombstones(
    dbs: Databases, stack: Stack, topic_prefix: str
) -> None:
    """A delete, its tombstone and a new row of the same key, all committed before the sink's bulk
    copy: the copy holds the new row, and the tombstone must not delete it."""
    slot, group = names_of(dbs, topic_prefix)
    table = "public.reused"
    execute(
        dbs.source_dsn,
        f"CREATE TABLE {table} (id integer PRIMARY KEY, v text NOT NULL)",
        f"INSERT INTO {table} SELECT g, 'first ' || g FROM generate_series(1, 10) g",
    )
    source = start_source(dbs, topic_prefix, slot)
    wait_high_watermark(stack.bootstrap_servers, topic_of(topic_prefix, table), 10)
    execute(dbs.source_dsn, f"DELETE FROM {table} WHERE id <= 5")
    execute(dbs.source_dsn, f"INSERT INTO {table} SELECT g, 'again ' || g FROM generate_series(1, 5) g")
    execute(dbs.source_dsn, f"UPDATE {table} SET id = 106 WHERE id = 6")  # d + tombstone of 6, c of 106
    execute(dbs.source_dsn, f"UPDATE {table} SET id = 6, v = 'back' WHERE id = 106")  # and back to 6
    execute(dbs.source_dsn, f"DELETE FROM {table} WHERE id = 7", f"INSERT INTO {table} VALUES (7, 'same tx')")
    # 10 snapshot reads, 5 x (d, tombstone), 5 c, 2 x (d, tombstone, c), d, tombstone, c
    wait_high_watermark(stack.bootstrap_servers, topic_of(topic_prefix, table), 10 + 10 + 5 + 6 + 3)
    sink = start_sink(dbs, topic_prefix, slot, group)
    wait_identical(dbs, [table], processes=(source, sink))
    assert_same_rows(dbs, [table])
    [(skipped,)] = psql_rows(
        dbs.target_dsn, "SELECT changes FROM cdc_sink.tables WHERE group_id = %s", (group,)
    ) or [(0,)]
    assert skipped == 0, "changes the bulk copy already held were counted as applied"
    stop_cleanly(sink, source)
