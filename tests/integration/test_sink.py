"""cdc-sink end to end: source PostgreSQL -> cdc-source -> Kafka -> cdc-sink -> target PostgreSQL,
against the real local stack; the target is compared with the source by cdc-verify and row by row
as PostgreSQL text. The last test checks cdc-verify itself on a deliberately broken target."""

import dataclasses
import random
import re
import signal
import threading
import time
from typing import Any

import orjson
import psycopg2
import pytest
from psycopg2 import sql

from pg_kafka_cdc.common.tables import TableName
from schemas.topics import topic_for
from tests.conftest import Databases, Stack, admin_client
from tests.helpers import CliProcess, psql_rows, stop_process, wait_until
from tests.pipeline import (
    assert_same_rows,
    clone_table,
    execute,
    high_watermark,
    partition_ends,
    produce,
    read_all,
    reaped_on_failure,
    rows_as_text,
    run_sink,
    run_writer,
    start_sink,
    start_source,
    start_writer,
    stop_cleanly,
    stored_offsets,
    table_name,
    tables_option,
    verify,
    wait_applied,
    wait_for_output,
    wait_high_watermark,
    wait_identical,
    wait_while_running,
)

WRITER_TABLES = ("public.person", "public.orders")


def names_of(dbs: Databases, prefix: str) -> tuple[str, str]:
    """A replication slot and a consumer group of this test only."""
    return f"slot_{dbs.name}", f"group_{prefix}"


def target_count(dbs: Databases, table: str) -> int:
    found = psql_rows(dbs.target_dsn, "SELECT to_regclass(%s) IS NOT NULL", (table,))
    if not found[0][0]:
        return 0
    [(n,)] = psql_rows(dbs.target_dsn, f"SELECT count(*) FROM {table}")
    return int(n)


@pytest.mark.parametrize("first", ["source", "sink"])
def test_writer_load_reaches_identical_target(dbs: Databases, topic_prefix: str, first: str) -> None:
    slot, group = names_of(dbs, topic_prefix)
    writer = start_writer(dbs, "--rate", "200", "--batch", "5")
    if first == "source":
        source = start_source(dbs, topic_prefix, slot)
        wait_for_output(source, "created slot")
        sink = start_sink(dbs, topic_prefix, slot, group)
    else:
        sink = start_sink(dbs, topic_prefix, slot, group)
        wait_for_output(sink, "consuming")
        source = start_source(dbs, topic_prefix, slot)
    # the sink applies while the writer is still writing
    wait_while_running(
        lambda: target_count(dbs, "public.person") >= 200,
        (source, sink, writer),
        timeout=90,
        message="the sink applied nothing",
    )
    stop_cleanly(writer)
    wait_identical(dbs, WRITER_TABLES, processes=(source, sink))
    assert_same_rows(dbs, WRITER_TABLES)
    stop_cleanly(sink, source)


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


# An AFTER INSERT trigger per row counting the inserts of every key, in a schema nothing replicates.
INSERT_COUNTER = [
    "CREATE SCHEMA audit",
    "CREATE TABLE audit.inserts (tbl text NOT NULL, key text NOT NULL, n integer NOT NULL, PRIMARY KEY (tbl, key))",
    """CREATE FUNCTION audit.count_insert() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO audit.inserts VALUES (TG_TABLE_NAME, NEW.id::text, 1)
        ON CONFLICT (tbl, key) DO UPDATE SET n = audit.inserts.n + 1;
        RETURN NULL;
    END $$""",
    "CREATE TRIGGER count_insert AFTER INSERT ON public.person FOR EACH ROW EXECUTE FUNCTION audit.count_insert()",
    "CREATE TRIGGER count_insert AFTER INSERT ON public.orders FOR EACH ROW EXECUTE FUNCTION audit.count_insert()",
]


def insert_counts(dsn: str) -> dict[tuple[str, str], int]:
    return {(t, k): n for t, k, n in psql_rows(dsn, "SELECT tbl, key, n FROM audit.inserts")}


def applied_offsets(dbs: Databases, group: str) -> int:
    """The sum of the next offsets the sink has stored for its group (0 before it stored any)."""
    found = psql_rows(dbs.target_dsn, "SELECT to_regclass('cdc_sink.offsets') IS NOT NULL")
    if not found[0][0]:
        return 0
    [(total,)] = psql_rows(
        dbs.target_dsn, "SELECT coalesce(sum(next_offset), 0) FROM cdc_sink.offsets WHERE group_id = %s", (group,)
    )
    return int(total)


def test_kill_9_mid_apply_loses_and_repeats_nothing(dbs: Databases, stack: Stack, topic_prefix: str) -> None:
    slot, group = names_of(dbs, topic_prefix)
    run_writer(dbs, "--count", "0")  # creates the writer's tables
    execute(dbs.source_dsn, *INSERT_COUNTER)
    for table in WRITER_TABLES:  # empty tables of the same definition: the bulk copy accepts them
        clone_table(dbs.source_dsn, dbs.target_dsn, table)
    execute(dbs.target_dsn, *INSERT_COUNTER)
    run_writer(dbs, "--count", "2000", "--rate", "0", "--batch", "10")  # rows for the bulk copy

    source = start_source(dbs, topic_prefix, slot)
    writer = start_writer(dbs, "--count", "40000", "--rate", "0", "--batch", "10")  # a backlog
    topics = [topic_of(topic_prefix, t) for t in WRITER_TABLES]

    def caught_up() -> bool:  # nothing left to apply (only once the writer is done)
        if writer.poll() is None:
            return False
        stored = stored_offsets(dbs, group)
        return all(
            (stored.get(tp) or 0) >= end for tp, end in partition_ends(stack.bootstrap_servers, topics).items()
        )

    rng = random.Random()
    for _ in range(3):
        sink = start_sink(dbs, topic_prefix, slot, group, "--batch-size", "200")
        before = applied_offsets(dbs, group)
        wait_while_running(
            lambda: applied_offsets(dbs, group) > before or caught_up(),  # noqa: B023
            (source, sink),
            timeout=60,
            message="the restarted sink applied nothing",
        )
        time.sleep(rng.uniform(0.05, 1.0))  # a random moment of the apply loop
        assert stop_process(sink, signal.SIGKILL) == -signal.SIGKILL
    sink = start_sink(dbs, topic_prefix, slot, group, "--batch-size", "200")
    assert writer.wait(timeout=300) == 0, writer.stderr_text()
    wait_identical(dbs, WRITER_TABLES, timeout=180, processes=(source, sink))
    assert_same_rows(dbs, WRITER_TABLES)
    stop_cleanly(sink, source)

    source_counts, target_counts = insert_counts(dbs.source_dsn), insert_counts(dbs.target_dsn)
    assert target_counts, "the target counted no insert at all"
    unknown = sorted(k for k in target_counts if k not in source_counts)
    assert not unknown, f"the target inserted keys the source never inserted: {unknown[:10]}"
    repeated = sorted((k, n, source_counts[k]) for k, n in target_counts.items() if n > source_counts[k])
    assert not repeated, (
        f"rows inserted more often on the target than on the source (key, target, source): {repeated[:10]}"
    )


def test_two_sinks_share_a_group_through_rebalances(dbs: Databases, topic_prefix: str) -> None:
    slot, group = names_of(dbs, topic_prefix)
    writer = start_writer(dbs, "--rate", "300", "--batch", "5")
    source = start_source(dbs, topic_prefix, slot, "--partitions", "4")
    first = start_sink(dbs, topic_prefix, slot, group)
    wait_while_running(
        lambda: applied_offsets(dbs, group) > 0,
        (source, first, writer),
        timeout=90,
        message="the first sink applied nothing",
    )
    second = start_sink(dbs, topic_prefix, slot, group)
    wait_for_output(second, "assigned")  # the group rebalanced over both members
    applied = applied_offsets(dbs, group)
    wait_while_running(
        lambda: applied_offsets(dbs, group) > applied + 500,
        (source, first, second, writer),
        timeout=60,
        message="the two sinks applied nothing together",
    )
    reassigned = [line for line in first.stderr_text().splitlines() if " assigned " in line]
    assert len(reassigned) >= 2, "the first sink kept all its partitions when the second one joined"
    stop_cleanly(first)  # the second sink takes over every partition
    wait_while_running(
        lambda: second.stderr_text().count("assigned") >= 2,
        (second,),
        timeout=60,
        message="the second sink was never given the first one's partitions",
    )
    applied = applied_offsets(dbs, group)
    wait_while_running(
        lambda: applied_offsets(dbs, group) > applied + 500,
        (source, second, writer),
        timeout=60,
        message="the remaining sink applied nothing",
    )
    stop_cleanly(writer)
    wait_identical(dbs, WRITER_TABLES, processes=(source, second))
    assert_same_rows(dbs, WRITER_TABLES)
    stop_cleanly(second, source)


def test_static_member_comes_back_after_kill_9_and_a_duplicate_id_is_refused(
    dbs: Databases, stack: Stack, topic_prefix: str
) -> None:
    slot, group = names_of(dbs, topic_prefix)
    writer = start_writer(dbs, "--rate", "300", "--batch", "5")
    source = start_source(dbs, topic_prefix, slot, "--partitions", "2")
    first = start_sink(dbs, topic_prefix, slot, group, "--instance-id", "sink-1")
    wait_while_running(
        lambda: applied_offsets(dbs, group) > 0, (source, first, writer), timeout=90, message="nothing applied"
    )
    assert stop_process(first, signal.SIGKILL) == -signal.SIGKILL
    again = start_sink(dbs, topic_prefix, slot, group, "--instance-id", "sink-1")
    wait_for_output(again, "assigned")
    applied = applied_offsets(dbs, group)
    wait_while_running(
        lambda: applied_offsets(dbs, group) > applied + 300,
        (source, again, writer),
        timeout=60,
        message="the restarted static member applied nothing",
    )
    admin = admin_client(stack.bootstrap_servers)  # kept referenced until its future resolves
    [described] = admin.describe_consumer_groups([group], request_timeout=30)[group].result(timeout=60).members
    assert described.group_instance_id == "sink-1"

    # a second sink with the same id takes the membership over; the older one stops with one clear line
    duplicate = start_sink(dbs, topic_prefix, slot, group, "--instance-id", "sink-1")
    assert again.wait(timeout=60) != 0
    text = again.stderr_text()
    assert "with --instance-id sink-1, so Kafka stopped this one: give each sink its own id" in text, text
    assert "Traceback" not in text, text
    stop_cleanly(writer)
    wait_identical(dbs, WRITER_TABLES, processes=(source, duplicate))
    assert_same_rows(dbs, WRITER_TABLES)
    stop_cleanly(duplicate, source)


def test_rebuild_restores_the_target_from_the_topics_alone(dbs: Databases, topic_prefix: str) -> None:
    slot, group = names_of(dbs, topic_prefix)
    run_writer(dbs, "--count", "500", "--rate", "0", "--batch", "10")  # for the initial snapshot's `r` events
    source = start_source(dbs, topic_prefix, slot)
    sink = start_sink(dbs, topic_prefix, slot, group)
    wait_for_output(sink, "assigned", timeout=90)  # copy done: what follows reaches the target through Kafka
    run_writer(dbs, "--count", "1000", "--rate", "0", "--batch", "10", "--big-ratio", "0.1")  # streamed changes
    wait_identical(dbs, WRITER_TABLES, processes=(source, sink))
    stop_cleanly(sink, source)

    once = run_sink(dbs, topic_prefix, slot, group, "--once", timeout=60)
    assert once.returncode == 0, f"cdc-sink --once when caught up: exit {once.returncode}\n{once.stderr}"
    assert "caught up" in once.stderr, once.stderr

    execute(dbs.target_dsn, "DELETE FROM public.orders", "DELETE FROM public.person")
    assert verify(dbs, WRITER_TABLES).returncode == 1, "cdc-verify did not notice the emptied target"
    # from Kafka alone: the rebuild is not even given a reachable source database
    no_source = dataclasses.replace(dbs, source_dsn="postgresql://nobody:none@127.0.0.1:1/none")
    rebuilt = run_sink(
        no_source,
        topic_prefix,
        slot,
        group,
        "rebuild",
        "--tables",
        tables_option(WRITER_TABLES),
        "--once",
        timeout=180,
    )
    assert rebuilt.returncode == 0, f"cdc-sink rebuild exit {rebuilt.returncode}:\n{rebuilt.stderr}"
    result = verify(dbs, WRITER_TABLES)
    assert result.returncode == 0, f"not identical after the rebuild:\n{result.stdout}"
    assert_same_rows(dbs, WRITER_TABLES)

    again = run_sink(dbs, topic_prefix, slot, group, "--once", timeout=60)
    assert again.returncode == 0, f"cdc-sink --once after the rebuild: exit {again.returncode}\n{again.stderr}"
    assert_same_rows(dbs, WRITER_TABLES)


# ~22 kB of hex digits from md5: compressed it still exceeds the TOAST threshold, so it is stored
# out of line and an update that does not touch it leaves it out of the WAL (REPLICA IDENTITY DEFAULT).
BIG = "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 700))"


def topic_of(prefix: str, table: str) -> str:
    return topic_for(prefix, table_name(table))


@pytest.mark.parametrize("identity", ["DEFAULT", "FULL"])
def test_partial_toast_updates_keep_the_big_value(
    dbs: Databases, stack: Stack, topic_prefix: str, identity: str
) -> None:
    slot, group = names_of(dbs, topic_prefix)
    table = "public.toasty"
    execute(
        dbs.source_dsn,
        f"CREATE TABLE {table} (id integer PRIMARY KEY, small integer NOT NULL, big text)",
        f"ALTER TABLE {table} REPLICA IDENTITY {identity}",
        f"INSERT INTO {table} SELECT g, 0, {BIG} FROM generate_series(1, 3) g",  # copied in bulk
    )
    source = start_source(dbs, topic_prefix, slot)
    sink = start_sink(dbs, topic_prefix, slot, group)
    wait_identical(dbs, [table], processes=(source, sink))

    # inserted while streaming, then partial updates, each applied in a batch of its own
    execute(dbs.source_dsn, f"INSERT INTO {table} SELECT g, 0, {BIG} FROM generate_series(4, 6) g")
    wait_identical(dbs, [table], processes=(source, sink))
    for n in range(1, 3):
        execute(dbs.source_dsn, f"UPDATE {table} SET small = small + {n}")
        wait_identical(dbs, [table], processes=(source, sink))
    assert_same_rows(dbs, [table])

    # the same kinds of changes piled up while the sink is stopped, so one batch merges them
    stop_cleanly(sink)
    execute(dbs.source_dsn, f"INSERT INTO {table} SELECT g, 0, {BIG} FROM generate_series(7, 8) g")
    execute(dbs.source_dsn, f"UPDATE {table} SET small = small + 10 WHERE id IN (1, 7)")
    execute(dbs.source_dsn, f"UPDATE {table} SET small = small + 100 WHERE id IN (1, 2, 7)")
    execute(dbs.source_dsn, f"UPDATE {table} SET big = {BIG} WHERE id = 2")
    execute(dbs.source_dsn, f"UPDATE {table} SET small = -1 WHERE id IN (2, 3)")
    execute(dbs.source_dsn, f"INSERT INTO {table} VALUES (9, 0, NULL)")
    execute(dbs.source_dsn, f"UPDATE {table} SET big = {BIG} WHERE id = 9")
    execute(dbs.source_dsn, f"UPDATE {table} SET small = 5 WHERE id = 9")
    sink = start_sink(dbs, topic_prefix, slot, group)
    wait_identical(dbs, [table], processes=(source, sink))
    assert_same_rows(dbs, [table])
    [(short,)] = psql_rows(
        dbs.target_dsn, f"SELECT count(*) FROM {table} WHERE length(big) IS DISTINCT FROM 22400"
    )
    assert short == 0, "a big value was lost on the target"
    stop_cleanly(sink, source)

    if identity == "DEFAULT":  # the partial path was really taken: updates came without the big column
        messages = read_all(stack.bootstrap_servers, topic_of(topic_prefix, table))
        events = [orjson.loads(m.value()) for m in messages if m.value() is not None]
        assert any(e.get("unchanged") == ["big"] for e in events), "no update event left out the big value"


@pytest.mark.parametrize("identity", ["DEFAULT", "FULL"])
def test_primary_key_changes(dbs: Databases, topic_prefix: str, identity: str) -> None:
    slot, group = names_of(dbs, topic_prefix)
    table = "public.keyed"
    execute(
        dbs.source_dsn,
        f"CREATE TABLE {table} (id integer PRIMARY KEY, v text NOT NULL, big text)",
        f"ALTER TABLE {table} REPLICA IDENTITY {identity}",
        f"INSERT INTO {table} SELECT g, 'v' || g, NULL FROM generate_series(1, 20) g",
    )
    source = start_source(dbs, topic_prefix, slot)
    sink = start_sink(dbs, topic_prefix, slot, group)
    wait_identical(dbs, [table], processes=(source, sink))

    execute(dbs.source_dsn, f"UPDATE {table} SET id = id + 1000 WHERE id BETWEEN 5 AND 10")
    wait_identical(dbs, [table], processes=(source, sink))
    execute(dbs.source_dsn, f"UPDATE {table} SET id = id - 500, v = v || '!' WHERE id > 1000")
    execute(dbs.source_dsn, f"UPDATE {table} SET id = id + 1000, big = {BIG} WHERE id = 1")
    wait_identical(dbs, [table], processes=(source, sink))
    assert_same_rows(dbs, [table])

    # key changes piled up for one batch: a key moving away and back, a freed key taken again
    stop_cleanly(sink)
    execute(dbs.source_dsn, f"INSERT INTO {table} VALUES (30, 'thirty', NULL)")
    execute(dbs.source_dsn, f"UPDATE {table} SET id = 31 WHERE id = 30")
    execute(dbs.source_dsn, f"UPDATE {table} SET v = 'moved' WHERE id = 31")
    execute(dbs.source_dsn, f"UPDATE {table} SET id = 30 WHERE id = 31")
    execute(
        dbs.source_dsn,
        f"UPDATE {table} SET id = 40 WHERE id = 2",
        f"INSERT INTO {table} VALUES (2, 'new two', NULL)",
    )
    execute(dbs.source_dsn, f"UPDATE {table} SET id = id + 100 WHERE id BETWEEN 11 AND 15")
    execute(dbs.source_dsn, f"UPDATE {table} SET id = id - 100 WHERE id BETWEEN 111 AND 113")
    sink = start_sink(dbs, topic_prefix, slot, group)
    wait_identical(dbs, [table], processes=(source, sink))
    assert_same_rows(dbs, [table])
    stop_cleanly(sink, source)


@pytest.mark.parametrize(
    "identity",
    [
        "DEFAULT",
        "FULL",
    ],
)
def test_key_change_keeps_an_unchanged_toasted_value(
    dbs: Databases, stack: Stack, topic_prefix: str, identity: str
) -> None:
    slot, group = names_of(dbs, topic_prefix)
    table = "public.keyed"
    topic = topic_of(topic_prefix, table)
    execute(
        dbs.source_dsn,
        f"CREATE TABLE {table} (id integer PRIMARY KEY, v text NOT NULL, big text)",
        f"ALTER TABLE {table} REPLICA IDENTITY {identity}",
        f"INSERT INTO {table} SELECT g, 'v' || g, {BIG} FROM generate_series(1, 3) g",
    )
    source = start_source(dbs, topic_prefix, slot)
    sink = start_sink(dbs, topic_prefix, slot, group)
    wait_high_watermark(stack.bootstrap_servers, topic, 3)  # the initial snapshot's `r` events
    wait_identical(dbs, [table], processes=(source, sink))
    before = high_watermark(stack.bootstrap_servers, topic)
    execute(dbs.source_dsn, f"UPDATE {table} SET id = id + 1000 WHERE id = 1")  # big not touched
    execute(dbs.source_dsn, f"UPDATE {table} SET id = id + 1000, v = 'changed' WHERE id = 2")
    # each key change is a delete, its tombstone and an insert; then wait for the sink to apply them
    wait_high_watermark(stack.bootstrap_servers, topic, before + 6)
    wait_applied(dbs, stack.bootstrap_servers, group, [topic], processes=(source, sink))
    stop_cleanly(sink, source)
    [(nulls,)] = psql_rows(dbs.target_dsn, f"SELECT count(*) FROM {table} WHERE big IS NULL")
    assert nulls == 0, f"{nulls} rows lost their big value on the target after a key change"
    assert_same_rows(dbs, [table])


@pytest.mark.parametrize("partitions", [1, 3])
def test_truncate(dbs: Databases, topic_prefix: str, partitions: int) -> None:
    slot, group = names_of(dbs, topic_prefix)
    tables = ["public.tr_int", "public.tr_text"]
    execute(
        dbs.source_dsn,
        "CREATE TABLE public.tr_int (id integer PRIMARY KEY, v text)",
        "CREATE TABLE public.tr_text (k text PRIMARY KEY, v integer)",
        "INSERT INTO public.tr_int SELECT g, 'v' || g FROM generate_series(1, 50) g",
        "INSERT INTO public.tr_text SELECT 'key ' || g, g FROM generate_series(1, 50) g",
    )

    def change(first: int, last: int) -> list[str]:
        return [
            f"INSERT INTO public.tr_int SELECT g, 'v' || g FROM generate_series({first}, {last}) g",
            f"INSERT INTO public.tr_text SELECT 'key ' || g, g FROM generate_series({first}, {last}) g",
            "UPDATE public.tr_int SET v = v || '+' WHERE id % 3 = 0",
            "UPDATE public.tr_text SET v = -v WHERE v % 3 = 0",
            f"DELETE FROM public.tr_int WHERE id = {first}",
            f"DELETE FROM public.tr_text WHERE k = 'key {first}'",
        ]

    truncate = "TRUNCATE public.tr_int, public.tr_text"
    source = start_source(dbs, topic_prefix, slot, "--partitions", str(partitions))
    sink = start_sink(dbs, topic_prefix, slot, group)
    wait_identical(dbs, tables, processes=(source, sink))

    # a truncate alone, then changes after it, in later batches
    execute(dbs.source_dsn, truncate)
    wait_identical(dbs, tables, processes=(source, sink))
    execute(dbs.source_dsn, *change(100, 140))
    wait_identical(dbs, tables, processes=(source, sink))
    # changes before and after a truncate in one transaction
    execute(dbs.source_dsn, *change(200, 230), truncate, *change(300, 320))
    wait_identical(dbs, tables, processes=(source, sink))
    assert_same_rows(dbs, tables)

    # transactions before and after truncates piled up while the sink is stopped: one batch
    stop_cleanly(sink)
    execute(dbs.source_dsn, *change(400, 440))
    execute(dbs.source_dsn, truncate)
    execute(dbs.source_dsn, *change(500, 540))
    execute(dbs.source_dsn, "TRUNCATE public.tr_text")
    execute(dbs.source_dsn, *change(600, 610))
    sink = start_sink(dbs, topic_prefix, slot, group)
    wait_identical(dbs, tables, processes=(source, sink))
    assert_same_rows(dbs, tables)
    assert psql_rows(dbs.target_dsn, "SELECT count(*) FROM public.tr_int")[0][0] > 0
    stop_cleanly(sink, source)


HOSTILE = ['a"b', "select", "My Table", "ünïcödé", "x; drop table y"]
ASCII_HOSTILE = [n for n in HOSTILE if n.isascii()]


@pytest.mark.parametrize(
    ("schema", "names", "listed"),
    [
        pytest.param('a"b', ASCII_HOSTILE, True, id="schema-a-quote-b-listed-in-tables"),
        pytest.param("public", HOSTILE, False, id="public-all-tables"),
        pytest.param(
            'a"b',
            HOSTILE,
            True,
            id="unicode-table-listed-in-tables",
        ),
    ],
)
def test_hostile_identifiers(
    dbs: Databases, topic_prefix: str, schema: str, names: list[str], listed: bool
) -> None:
    slot, group = names_of(dbs, topic_prefix)
    tables = [TableName(schema, name) for name in names]
    key, *others = HOSTILE  # every column name is hostile too, unicode included
    # `y` as an injected `drop table y` would find it; on the source only when not replicated itself
    canaries = ["CREATE TABLE public.y (id integer PRIMARY KEY)", "INSERT INTO public.y VALUES (1)"]
    statements: list[sql.Composable] = [sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema))]
    for table in tables:
        statements.append(
            sql.SQL("CREATE TABLE {} ({} integer PRIMARY KEY, {})").format(
                sql.Identifier(table.schema, table.name),
                sql.Identifier(key),
                sql.SQL(", ").join(sql.SQL("{} text").format(sql.Identifier(c)) for c in others),
            )
        )
    execute(dbs.source_dsn, *(canaries if listed else []), *statements)
    execute(dbs.target_dsn, *canaries)

    def write(first: int, last: int) -> None:
        k = sql.Identifier(key)
        for table in tables:
            ident = sql.Identifier(table.schema, table.name)
            values = sql.SQL(", ").join(sql.Literal(f"{c}'); DROP TABLE y; --") for c in others)
            columns = sql.SQL(", ").join(map(sql.Identifier, HOSTILE))
            execute(
                dbs.source_dsn,
                sql.SQL("INSERT INTO {} ({}) SELECT g, {} FROM generate_series(%s, %s) g").format(
                    ident, columns, values
                ),
                params=(first, last),
            )
            execute(
                dbs.source_dsn,
                sql.SQL("UPDATE {} SET {} = {} || '\"', {} = NULL WHERE {} % 2 = 0").format(
                    ident, sql.Identifier("select"), sql.Identifier("My Table"), sql.Identifier("ünïcödé"), k
                ),
            )
            execute(dbs.source_dsn, sql.SQL("DELETE FROM {} WHERE {} = %s").format(ident, k), params=(first,))
            execute(
                dbs.source_dsn,
                sql.SQL("UPDATE {} SET {} = {} + 1000 WHERE {} = %s").format(ident, k, k, k),
                params=(first + 1,),
            )

    write(1, 10)  # before the slot: the bulk copy
    listing = ["--tables", tables_option(tables)] if listed else []
    with reaped_on_failure():
        source = start_source(dbs, topic_prefix, slot, *listing)
        sink = start_sink(dbs, topic_prefix, slot, group)
        wait_identical(dbs, tables, timeout=60, processes=(source, sink))
        write(20, 30)  # streamed
        wait_identical(dbs, tables, processes=(source, sink))
        assert_same_rows(dbs, tables)
        stop_cleanly(sink, source)
    for dsn in (dbs.source_dsn, dbs.target_dsn) if listed else (dbs.target_dsn,):
        assert psql_rows(dsn, "SELECT id FROM public.y") == [(1,)], "the canary table was touched"
    for table in tables:
        [(count,)] = psql_rows(
            dbs.target_dsn, sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table.schema, table.name))
        )
        assert count == 19, f"{table}: {count} rows"


POISON_KEY = b'{"id":3}'  # a key as the source writes it (compact JSON of the key columns)
POISON_REASON = {"not-json": "not JSON", "bad-value": 'invalid input syntax for type integer: "abc"'}


@dataclasses.dataclass
class Poisoned:
    """A topic holding: the table's snapshot, changes A, the poison message at `offset`, changes B."""

    topic: str
    offset: int
    value: bytes
    before: list[dict[str, str | None]]  # the source's rows when the poison was produced


def poison_topic(dbs: Databases, stack: Stack, prefix: str, kind: str) -> Poisoned:
    """With cdc-source running and a first sink run done: changes A, the poison, changes B (none of
    them to the poison's key)."""
    table = "public.p"
    topic = topic_of(prefix, table)
    execute(
        dbs.source_dsn,
        "INSERT INTO public.p SELECT g, g, 't' || g FROM generate_series(11, 15) g",
        "UPDATE public.p SET n = 100 WHERE id = 1",
        "DELETE FROM public.p WHERE id = 2",
    )
    wait_high_watermark(stack.bootstrap_servers, topic, 10 + 8)  # 5 inserts, 1 update, delete + tombstone
    before = rows_as_text(dbs.source_dsn, table)
    if kind == "not-json":
        value = b'{"op": "u", "after": {"id": 3, "n": 3} this is not JSON'
    else:  # a real envelope (of the insert of 15) turned into an update of key 3 with a bad integer
        [real] = [m for m in read_all(stack.bootstrap_servers, topic) if m.key() == b'{"id":15}']
        envelope = orjson.loads(real.value())
        envelope.update(op="u", before=None, after={"id": 3, "n": "abc", "t": "poison"})
        value = orjson.dumps(envelope)
    assert produce(stack.bootstrap_servers, topic, POISON_KEY, value) == (0, 18)
    execute(
        dbs.source_dsn,
        "INSERT INTO public.p SELECT g, g, 't' || g FROM generate_series(16, 17) g",
        "UPDATE public.p SET n = 400 WHERE id = 4",
        "DELETE FROM public.p WHERE id = 5",
    )
    wait_high_watermark(stack.bootstrap_servers, topic, 19 + 5)
    return Poisoned(topic, 18, value, before)


def start_with_table_p(dbs: Databases, stack: Stack, prefix: str, group: str, *mode: str) -> CliProcess:
    """Table p with 10 rows, cdc-source running, and a first sink run (bulk copy) to the end."""
    slot, _ = names_of(dbs, prefix)
    execute(
        dbs.source_dsn,
        "CREATE TABLE public.p (id integer PRIMARY KEY, n integer, t text)",
        "INSERT INTO public.p SELECT g, g, 't' || g FROM generate_series(1, 10) g",
    )
    source = start_source(dbs, prefix, slot)
    wait_high_watermark(stack.bootstrap_servers, topic_of(prefix, "public.p"), 10)
    first = run_sink(dbs, prefix, slot, group, *mode, "--once")
    assert first.returncode == 0, first.stderr
    return source


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("cdc-sink: error:")]


def dead_letters(stack: Stack, topic: str) -> list[Any]:
    dlq = topic + ".dlq"
    if not partition_ends(stack.bootstrap_servers, [dlq]):
        return []
    return read_all(stack.bootstrap_servers, dlq)


@pytest.mark.parametrize("kind", ["not-json", "bad-value"])
def test_poison_message_stops_the_sink_at_its_offset(
    dbs: Databases, stack: Stack, topic_prefix: str, kind: str
) -> None:
    slot, group = names_of(dbs, topic_prefix)
    source = start_with_table_p(dbs, stack, topic_prefix, group)
    poisoned = poison_topic(dbs, stack, topic_prefix, kind)
    for _ in range(2):  # and again at the same place when restarted
        result = run_sink(dbs, topic_prefix, slot, group, "--once", timeout=60)
        assert result.returncode == 1, f"exit {result.returncode}:\n{result.stderr}"
        assert "Traceback" not in result.stderr, result.stderr
        [line] = error_lines(result.stderr)
        for part in (f"{poisoned.topic}[0]", f"offset {poisoned.offset}", POISON_REASON[kind]):
            assert part in line, f"{part!r} is not in the error line: {line}"
        assert stored_offsets(dbs, group) == {(poisoned.topic, 0): poisoned.offset}
        assert rows_as_text(dbs.target_dsn, "public.p") == poisoned.before, (
            "not exactly what came before the poison"
        )
    stop_cleanly(source)


@pytest.mark.parametrize("kind", ["not-json", "bad-value"])
def test_poison_message_goes_to_the_dead_letter_topic(
    dbs: Databases, stack: Stack, topic_prefix: str, kind: str
) -> None:
    slot, group = names_of(dbs, topic_prefix)
    source = start_with_table_p(dbs, stack, topic_prefix, group, "--on-error", "dlq")
    poisoned = poison_topic(dbs, stack, topic_prefix, kind)
    result = run_sink(dbs, topic_prefix, slot, group, "--on-error", "dlq", "--once", timeout=60)
    assert result.returncode == 0, result.stderr
    assert verify(dbs, ["public.p"]).returncode == 0, "the changes around the poison were not all applied"
    [letter] = dead_letters(stack, poisoned.topic)
    assert (letter.key(), letter.value()) == (POISON_KEY, poisoned.value), "not the original bytes"
    headers = {k: v.decode() for k, v in letter.headers()}
    assert POISON_REASON[kind] in headers["cdc.reason"], headers
    assert headers["cdc.origin.topic"] == poisoned.topic
    assert headers["cdc.origin.partition"] == "0"
    assert headers["cdc.origin.offset"] == str(poisoned.offset)

    # later changes of the poison's key are parked in the dead-letter topic too, the others applied
    execute(
        dbs.source_dsn,
        "UPDATE public.p SET n = 300 WHERE id = 3",
        "UPDATE public.p SET n = 600 WHERE id = 6",
        "INSERT INTO public.p VALUES (18, 18, 't18')",
    )
    wait_high_watermark(stack.bootstrap_servers, poisoned.topic, 24 + 3)
    result = run_sink(dbs, topic_prefix, slot, group, "--on-error", "dlq", "--once", timeout=60)
    assert result.returncode == 0, result.stderr
    stop_cleanly(source)
    expected = [
        next(r for r in poisoned.before if r["id"] == "3") if row["id"] == "3" else row
        for row in rows_as_text(dbs.source_dsn, "public.p")
    ]
    assert rows_as_text(dbs.target_dsn, "public.p") == expected
    first, parked = dead_letters(stack, poisoned.topic)
    assert first.offset() == letter.offset()
    headers = {k: v.decode() for k, v in parked.headers()}
    assert parked.key() == POISON_KEY
    assert orjson.loads(parked.value())["after"]["n"] == 300, "not the original bytes"
    assert "parked" in headers["cdc.reason"], headers
    assert (headers["cdc.origin.partition"], headers["cdc.origin.offset"]) == ("0", "24")
    assert stored_offsets(dbs, group) == {(poisoned.topic, 0): 27}
    parked_keys = psql_rows(
        dbs.target_dsn,
        "SELECT topic, convert_from(key, 'UTF8'), first_offset FROM cdc_sink.parked WHERE group_id = %s",
        (group,),
    )
    assert parked_keys == [(poisoned.topic, POISON_KEY.decode(), poisoned.offset)]


@pytest.mark.parametrize("on_error", ["fail", "dlq"])
def test_poison_followed_by_a_change_of_its_key_in_one_batch(
    dbs: Databases, stack: Stack, topic_prefix: str, on_error: str
) -> None:
    slot, group = names_of(dbs, topic_prefix)
    mode = ("--on-error", on_error)
    source = start_with_table_p(dbs, stack, topic_prefix, group, *mode)
    topic = topic_of(topic_prefix, "public.p")
    [real] = [m for m in read_all(stack.bootstrap_servers, topic) if m.key() == POISON_KEY]
    envelope = orjson.loads(real.value())
    envelope.update(op="u", before=None, after={"id": 3, "n": "abc", "t": "poison"})
    assert produce(stack.bootstrap_servers, topic, POISON_KEY, orjson.dumps(envelope)) == (0, 10)
    execute(dbs.source_dsn, "UPDATE public.p SET n = 300 WHERE id = 3")
    wait_high_watermark(stack.bootstrap_servers, topic, 12)
    result = run_sink(dbs, topic_prefix, slot, group, *mode, "--once", timeout=60)
    stop_cleanly(source)
    assert psql_rows(dbs.target_dsn, "SELECT n FROM public.p WHERE id = 3") == [(3,)], "applied past the poison"
    if on_error == "fail":
        assert result.returncode == 1, f"exit {result.returncode}: the poison went unnoticed"
    else:
        assert len(dead_letters(stack, topic)) == 2, "the poison and the change behind it were not dead-lettered"


TYPES_PREREQUISITES = [
    """CREATE TYPE public.mood AS ENUM ('happy', 'sad', 'it''s "ok"')""",
    "CREATE DOMAIN public.posint AS integer CHECK (VALUE > 0)",
]

TYPE_COLUMNS = {
    "c_numeric": "numeric(38,10)",
    "c_numeric_free": "numeric",
    "c_real": "real",
    "c_double": "double precision",
    "c_smallint": "smallint",
    "c_integer": "integer",
    "c_bigint": "bigint",
    "c_bytea": "bytea",
    "c_text": "text",
    "c_char": "char(5)",
    "c_varchar": "varchar(10)",
    "c_json": "json",
    "c_jsonb": "jsonb",
    "c_int_array": "integer[]",
    "c_text_array": "text[]",
    "c_timestamp": "timestamp",
    "c_timestamptz": "timestamptz",
    "c_date": "date",
    "c_time": "time",
    "c_timetz": "timetz",
    "c_interval": "interval",
    "c_uuid": "uuid",
    "c_inet": "inet",
    "c_cidr": "cidr",
    "c_macaddr": "macaddr",
    "c_enum": "public.mood",
    "c_enum_array": "public.mood[]",
    "c_bool": "boolean",
    "c_money": "money",
    "c_bit": "bit(8)",
    "c_varbit": "varbit",
    "c_tsvector": "tsvector",
    "c_point": "point",
    "c_int4range": "int4range",
    "c_domain": "public.posint",
    "c_xml": "xml",
}

# Row values as SQL literals, in TYPE_COLUMNS order: extremes, other extremes, odd corners, NULLs.
TYPE_ROWS = [
    [
        "1234567890123456789012345678.1234567890",
        "1234567890123456789012345678901234567890",
        "3.4028235e+38",
        "1.7976931348623157e+308",
        "32767",
        "2147483647",
        "9223372036854775807",
        r"'\x00ff00de5c27'::bytea",
        r"""E'unicode \u2713 \u00fcn\u00efc\u00f6d\u00e9 \U0001F600 "double" ''single'' back\\slash\ttab\nnew\r\nline'""",
        "'ab'",
        "'abcdefghij'",
        """'{ "a" : 1,  "a":2 , "b" :[1 ,2 ],"c":"\\u00e9\\"" }'""",
        """'{"x": [1, "two", null, {"y": true}], "z": "\u00e9 \\\\ \\""}'""",
        "'{1,NULL,3}'",
        r"""'{"a\"b",NULL,"c,d","NULL","back\\slash","", " sp "}'""",
        "'2024-02-29 23:59:59.999999'",
        "'2024-06-01 12:00:00.123456+05:30'",
        "'2024-02-29'",
        "'23:59:59.999999'",
        "'12:34:56.789+05:30'",
        "'1 year 2 mons 3 days 04:05:06.789'",
        "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'",
        "'192.168.0.1/24'",
        "'10.0.0.0/8'",
        "'08:00:2b:01:02:03'",
        """'it''s "ok"'""",
        """'{happy,NULL,"it''s \\"ok\\""}'""",
        "true",
        "'92233720368547758.07'",
        "B'10101010'",
        "B'101'",
        """'a fat:1 cat:2A ''it''''s'':3'""",
        "'(1.5,-2.25)'",
        "'[1,10)'",
        "2147483647",
        """'<a b="c">d &amp; e<!-- x --></a>'""",
    ],
    [
        "-9999999999999999999999999999.9999999999",
        "-0.0000000000000000000000000000000000000001",
        "-0",
        "5e-324",
        "-32768",
        "-2147483648",
        "-9223372036854775808",
        r"'\x'::bytea",
        "''",
        "''",
        "''",
        "'[]'",
        "'null'",
        "'{}'",
        "'{}'",
        "'infinity'",
        "'-infinity'",
        "'4713-01-01 BC'",
        "'00:00'",
        "'00:00:00+14'",
        "'-1 days +02:03:04'",
        "'00000000-0000-0000-0000-000000000000'",
        "'::1'",
        "'2001:db8::/32'",
        "'ff:ff:ff:ff:ff:ff'",
        "'happy'",
        "'{}'",
        "false",
        "'-92233720368547758.08'",
        "B'00000000'",
        "B''",
        "''",
        "'(0,0)'",
        "'empty'",
        "1",
        "''",
    ],
    [
        "0",
        "0.5",
        "1.17549435e-38",
        "-0",
        "0",
        "0",
        "0",
        r"'\x00'::bytea",
        "' leading and trailing  '",
        "'a b'",
        "' '",
        "'\"just a string\"'",
        "'[{}, [], 0.1e1, -0, 1e400]'",
        "'{{1,2},{3,NULL}}'",
        '\'{{"a","b"},{NULL,"}"}}\'',
        "'2000-01-01 00:00:00'",
        "'1999-12-31 23:59:59.5-08'",
        "'infinity'",
        "'24:00:00'",
        "'23:59:59-15:59'",
        "'-178000000 years -11 mons -2000000000 days -2562047788:00:54.775807'",
        "'ffffffff-ffff-ffff-ffff-ffffffffffff'",
        "'2001:db8::1/64'",
        "'0.0.0.0/0'",
        "'00:00:00:00:00:00'",
        "'sad'",
        "'{sad,sad}'",
        "true",
        "'0'",
        "B'11111111'",
        "B'0000000000000000000000000000000000000000000000000000000000000000001'",
        "'x:1,2,3 y:4B'",
        "'(-1e+300,1e-300)'",
        "'(,5]'",
        "42",
        "'<?xml version=\"1.0\"?><r/>'",
    ],
    ["NULL"] * len(TYPE_COLUMNS),
]


def insert_type_rows(dsn: str, first_id: int) -> None:
    columns = ", ".join(TYPE_COLUMNS)
    execute(
        dsn,
        *(
            f"INSERT INTO public.types (id, {columns}) VALUES ({first_id + i}, {', '.join(row)})"
            for i, row in enumerate(TYPE_ROWS)
        ),
    )


@pytest.mark.parametrize("snapshot", ["copy", "topic"])
def test_every_common_type_round_trips(dbs: Databases, topic_prefix: str, snapshot: str) -> None:
    slot, group = names_of(dbs, topic_prefix)
    table = "public.types"
    columns = ", ".join(f"{name} {type_name}" for name, type_name in TYPE_COLUMNS.items())
    execute(dbs.source_dsn, *TYPES_PREREQUISITES, f"CREATE TABLE {table} (id integer PRIMARY KEY, {columns})")
    # A domain must exist on the target beforehand; so must an enum when the table is created from
    # its events (--snapshot topic). The bulk copy creates the enum from the source catalog itself.
    execute(dbs.target_dsn, *(TYPES_PREREQUISITES if snapshot == "topic" else TYPES_PREREQUISITES[1:]))
    insert_type_rows(dbs.source_dsn, 1)  # before the slot: bulk copy, or snapshot `r` events
    source = start_source(dbs, topic_prefix, slot)
    sink = start_sink(dbs, topic_prefix, slot, group, "--snapshot", snapshot)
    wait_identical(dbs, [table], processes=(source, sink))
    assert_same_rows(dbs, [table])

    insert_type_rows(dbs.source_dsn, 11)  # streamed
    names = ", ".join(TYPE_COLUMNS)
    execute(
        dbs.source_dsn,
        # every column from another row, both ways round
        f"UPDATE {table} AS t SET ({names}) = (SELECT {names} FROM {table} WHERE id = 2) WHERE t.id IN (1, 14)",
        f"UPDATE {table} AS t SET ({names}) = (SELECT {names} FROM {table} WHERE id = 11) WHERE t.id IN (4, 12)",
        f"UPDATE {table} SET c_text = c_text || E'\\n+', c_numeric = -c_numeric, c_jsonb = NULL WHERE id IN (3, 13)",
        f"DELETE FROM {table} WHERE id IN (2, 11)",
    )
    wait_identical(dbs, [table], processes=(source, sink))
    assert_same_rows(dbs, [table])
    stop_cleanly(sink, source)
    [(count,)] = psql_rows(dbs.target_dsn, f"SELECT count(*) FROM {table}")
    assert count == 6


def test_verify_names_the_differing_keys(dbs: Databases) -> None:
    table = "public.v"
    for dsn in (dbs.source_dsn, dbs.target_dsn):
        execute(
            dsn,
            f"CREATE TABLE {table} (id integer PRIMARY KEY, name text, amount numeric(12,2))",
            f"INSERT INTO {table} SELECT g, 'name ' || g, g * 1.5 FROM generate_series(1, 3000) g",
        )
    same = verify(dbs, [table])
    assert same.returncode == 0, same.stdout + same.stderr

    execute(
        dbs.target_dsn,
        f"DELETE FROM {table} WHERE id = 17",
        f"UPDATE {table} SET amount = amount + 0.01 WHERE id = 2500",
        f"INSERT INTO {table} VALUES (9001, 'extra', 0)",
    )
    result = verify(dbs, [table])
    assert result.returncode == 1, result.stdout + result.stderr
    report = result.stdout
    for kind, key in (("missing in target", "(17)"), ("changed", "(2500)"), ("extra in target", "(9001)")):
        assert re.search(rf"^\s+1 {kind}: {re.escape(key)}$", report, re.MULTILINE), f"{kind} {key}:\n{report}"
    assert "DIFFERENT" in report

    as_json = verify(dbs, [table], "--json")
    assert as_json.returncode == 1, as_json.stdout + as_json.stderr
    [found] = orjson.loads(as_json.stdout)
    assert found["identical"] is False
    assert found["counts"] == {"missing": 1, "extra": 1, "changed": 1}
    assert (found["source_rows"], found["target_rows"]) == (3000, 3000)
    assert (found["missing"], found["changed"], found["extra"]) == (["(17)"], ["(2500)"], ["(9001)"])
