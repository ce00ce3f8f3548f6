"""Snapshots taken while streaming, against the real stack: a table added to --tables later gets its
rows into its topic while its changes (and the other tables') keep streaming, and its topic alone
then rebuilds it; `cdc-source snapshot` re-reads a table under 1,000 changes/s, the target ends
identical and no row the target had already is written again; a cdc-source killed half-way goes on
from the last chunk Kafka acknowledged."""

import random
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg2
from psycopg2 import sql

from tests.conftest import Databases, Stack
from tests.helpers import psql_rows, run_cli, stop_process
from tests.kafka_read import read_topics
from tests.pipeline import (
    assert_same_rows,
    execute,
    run_sink,
    run_writer,
    source_args,
    start_sink,
    start_source,
    start_writer,
    stop_cleanly,
    wait_for_output,
    wait_identical,
)
from tests.source_events import EventReader, new_slot, stop_source, topic_of

LATER = "public.later"


@contextmanager
def changing(dsn: str, table: str, keys: int, rate: float = 400.0) -> Iterator[list[int]]:
    """Updates, deletes and inserts of `table` (id, v) at about `rate` per second until the block
    ends; yields the running count of changes made."""
    stop = threading.Event()
    made = [0]
    name = sql.Identifier(table)

    def run() -> None:
        rng = random.Random(7)
        conn = psycopg2.connect(dsn)
        conn.autocommit = True
        with conn.cursor() as cur:
            while not stop.is_set():
                key = rng.randrange(1, keys + 1)
                what = rng.random()
                if what < 0.6:
                    cur.execute(sql.SQL("UPDATE {} SET v = v || '+' WHERE id = %s").format(name), (key,))
                elif what < 0.8:
                    cur.execute(sql.SQL("DELETE FROM {} WHERE id = %s").format(name), (key,))
                else:
                    cur.execute(
                        sql.SQL(
                            "INSERT INTO {} VALUES (%s, 'new') ON CONFLICT (id) DO UPDATE SET v = 'again'"
                        ).format(name),
                        (key,),
                    )
                made[0] += 1
                time.sleep(1 / rate)
        conn.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield made
    finally:
        stop.set()
        thread.join(30)


def test_a_table_added_later_is_snapshotted_while_streaming_and_rebuilt_from_its_topic(
    stack: Stack, dbs: Databases, topic_prefix: str, reader: EventReader
) -> None:
    execute(
        dbs.source_dsn,
        "CREATE TABLE early (id int PRIMARY KEY, v text)",
        "CREATE TABLE later (id int PRIMARY KEY, v text)",
        "INSERT INTO later SELECT g, 'row ' || g FROM generate_series(1, 10000) g",
        separately=True,
    )
    slot, group = new_slot(), f"g-{topic_prefix}"
    source = start_source(dbs, topic_prefix, slot, "--tables", "public.early", "--partitions", "2", streaming=True)
    sink = start_sink(dbs, topic_prefix, slot, group)
    execute(dbs.source_dsn, "INSERT INTO early SELECT g, 'e' FROM generate_series(1, 100) g")
    stop_source(source)

    with changing(dbs.source_dsn, "later", 10_000) as made:
        source = start_source(
            dbs, topic_prefix, slot, "--tables", f"public.early,{LATER}", "--partitions", "2", streaming=True
        )
        execute(dbs.source_dsn, "INSERT INTO early SELECT g, 'e' FROM generate_series(101, 200) g")
        wait_for_output(source, f"snapshot of {LATER} done", timeout=180)
        time.sleep(1)
    assert made[0] > 100, made
    stderr = source.stderr_text()
    assert f"{LATER} is new in the scope" in stderr, stderr
    wait_identical(dbs, ["public.early", LATER], processes=[source, sink])

    events = reader.read([topic_of(topic_prefix, "later")])
    reads = [e for e in events if e.op == "r"]
    keys = [e.key for e in reads]
    assert len(keys) == len(set(keys)), "a row was published twice by the snapshot"
    assert 9000 <= len(reads) <= 10_000, len(reads)
    # rows of chunks published at a high watermark: a position per chunk, after the earlier changes
    assert all(e.source["snapshot"] for e in reads)
    assert len({e.source["commit_lsn"] for e in reads}) >= 3, "expected at least 3 chunks"

    stop_cleanly(sink)
    # the topic alone rebuilds the table
    result = run_sink(dbs, topic_prefix, slot, group, "rebuild", "--tables", LATER, "--once", timeout=180)
    assert result.returncode == 0, result.stderr
    assert_same_rows(dbs, [LATER, "public.early"])
    stop_source(source)


def test_a_table_snapshotted_on_demand_under_load_ends_identical_without_rewriting_rows(
    stack: Stack, dbs: Databases, topic_prefix: str
) -> None:
    run_writer(dbs, "--count", "6000", "--rate", "0", "--batch", "50")
    slot, group = new_slot(), f"g-{topic_prefix}"
    source = start_source(
        dbs, topic_prefix, slot, "--partitions", "3", "--tables", "public.person,public.orders", streaming=True
    )
    sink = start_sink(dbs, topic_prefix, slot, group)
    wait_identical(dbs, ["public.person", "public.orders"], processes=[source, sink], timeout=120)
    # every row write from here on, on both sides
    for dsn in (dbs.source_dsn, dbs.target_dsn):
        execute(
            dsn,
            "CREATE TABLE writes (n bigint)",
            "CREATE FUNCTION count_write() RETURNS trigger LANGUAGE plpgsql AS "
            "$$BEGIN INSERT INTO writes VALUES (1); RETURN NULL; END$$",
            "CREATE TRIGGER count_write AFTER INSERT OR UPDATE OR DELETE ON person "
            "FOR EACH ROW EXECUTE FUNCTION count_write()",
            "ALTER TABLE person ENABLE ALWAYS TRIGGER count_write",
            separately=True,
        )
    writer = start_writer(dbs, "--rate", "1000", "--batch", "5")
    time.sleep(2)
    asked = run_cli(source_args(dbs, topic_prefix, slot, "snapshot", "--tables", "public.person"), timeout=60)
    assert asked.returncode == 0, asked.stderr
    assert "asked the cdc-source of slot" in asked.stdout, asked.stdout
    wait_for_output(source, "snapshot of public.person done", timeout=180)
    time.sleep(2)
    stop_cleanly(writer)
    wait_identical(dbs, ["public.person", "public.orders"], processes=[source, sink], timeout=120)
    [(source_writes,)] = psql_rows(dbs.source_dsn, "SELECT count(*) FROM writes")
    [(target_writes,)] = psql_rows(dbs.target_dsn, "SELECT count(*) FROM writes")
    [(rows,)] = psql_rows(dbs.source_dsn, "SELECT count(*) FROM person")
    assert rows > 2000, rows
    # the snapshot re-read every row; the target wrote only the writer's changes (fewer when a batch merged some)
    assert 0 < target_writes <= source_writes, (source_writes, target_writes)

    stop_cleanly(sink)
    result = run_sink(
        dbs, topic_prefix, slot, group, "rebuild", "--tables", "public.person", "--once", timeout=180
    )
    assert result.returncode == 0, result.stderr
    assert_same_rows(dbs, ["public.person"])
    stop_source(source)


def snapshot_keys(stack: Stack, topic: str) -> list[bytes | None]:
    """The keys of the `r` events in `topic`, in order (read as bytes: there are many)."""
    return [r.key for r in read_topics(stack.bootstrap_servers, [topic]) if r.value and b'"op":"r"' in r.value]


def test_a_snapshot_interrupted_by_kill_goes_on_from_the_last_acknowledged_chunk(
    stack: Stack, dbs: Databases, topic_prefix: str
) -> None:
    rows = 400_000
    execute(
        dbs.source_dsn,
        "CREATE TABLE early (id int PRIMARY KEY, v text)",
        "CREATE TABLE later (id int PRIMARY KEY, v text)",
        f"INSERT INTO later SELECT g, g::text FROM generate_series(1, {rows}) g",
        separately=True,
    )
    slot, group = new_slot(), f"g-{topic_prefix}"
    source = start_source(dbs, topic_prefix, slot, "--tables", "public.early", streaming=True)
    stop_source(source)
    source = start_source(dbs, topic_prefix, slot, "--tables", f"public.early,{LATER}", streaming=True)
    wait_for_output(source, f"snapshot of {LATER}: ", timeout=120)  # the first progress line
    stop_process(source, signal.SIGKILL)
    topic = topic_of(topic_prefix, "later")
    before = snapshot_keys(stack, topic)
    assert 0 < len(before) < rows, f"{len(before)} rows published before the kill"
    source = start_source(dbs, topic_prefix, slot, "--tables", f"public.early,{LATER}", streaming=True)
    wait_for_output(source, f"snapshot of {LATER} done", timeout=240)
    assert f"{LATER} is new in the scope" not in source.stderr_text()
    keys = snapshot_keys(stack, topic)
    assert len(set(keys)) == rows, len(set(keys))
    # read again: at most the chunks not yet acknowledged at the kill (a few of 4,096 rows)
    assert len(keys) - rows <= 8 * 4096, f"{len(keys) - rows} rows read twice"
    sink = start_sink(dbs, topic_prefix, slot, group, "--snapshot", "topic")
    wait_identical(dbs, [LATER], processes=[source, sink], timeout=180)
    stop_cleanly(sink)
    stop_source(source)
