"""cdc-source against the real stack: which tables it replicates, and as what. A partitioned table is
replicated as its root (snapshot, streamed changes of every leaf, rows moving between partitions, a
partition attached while streaming), in --tables and in the default scope; UNLOGGED tables are
refused or left out; a slot whose creation waits for an open transaction says which.
(The `reader` fixture keeps the envelopes a test read: see tests/source_events.py.)"""

import re
import time

import psycopg2

from tests.conftest import Databases, Stack, admin_client
from tests.helpers import psql_rows, run_cli
from tests.pipeline import (
    assert_same_rows,
    error_line,
    execute,
    source_args,
    start_sink,
    start_source,
    stop_cleanly,
    wait_for_output,
    wait_identical,
)
from tests.source_events import EventReader, count, describe, new_slot, on, slot_row, stop_source, topic_of

MEASURE = "public.measure"

PARTITIONED = (
    "CREATE TABLE measure (id int, day date, v text, PRIMARY KEY (id, day)) PARTITION BY RANGE (day)",
    "CREATE TABLE measure_jan PARTITION OF measure FOR VALUES FROM ('2026-01-01') TO ('2026-02-01')",
    "CREATE TABLE measure_feb PARTITION OF measure FOR VALUES FROM ('2026-02-01') TO ('2026-03-01')",
    "CREATE TABLE measure_mar PARTITION OF measure FOR VALUES FROM ('2026-03-01') TO ('2026-04-01')",
)


def change_topics(stack: Stack, prefix: str) -> set[str]:
    """The change topics of `prefix` (its state topic left out)."""
    topics = admin_client(stack.bootstrap_servers).list_topics(timeout=10).topics
    return {t for t in topics if t.startswith(prefix + ".") and not t.startswith(prefix + "._")}


def test_a_partitioned_table_is_replicated_as_its_root(
    stack: Stack, dbs: Databases, topic_prefix: str, reader: EventReader
) -> None:
    execute(
        dbs.source_dsn,
        *PARTITIONED,
        "INSERT INTO measure SELECT g, date '2026-01-01' + (g * 3 % 90), 'snapshot ' || g FROM generate_series(1, 30) g",
        separately=True,
    )
    slot, group = new_slot(), f"g-{topic_prefix}"
    source = start_source(dbs, topic_prefix, slot, "--tables", MEASURE, streaming=True)
    sink = start_sink(dbs, topic_prefix, slot, group)
    execute(
        dbs.source_dsn,
        "INSERT INTO measure SELECT g, date '2026-01-01' + (g * 7 % 90), 'streamed ' || g "
        "FROM generate_series(31, 60) g",
        # rows moving to the next month's partition: a delete from one leaf, an insert into the next
        "UPDATE measure SET day = day + 31, v = 'moved' WHERE id % 4 = 0 AND day < '2026-03-01'",
        "UPDATE measure SET v = 'updated in place' WHERE id % 5 = 0",
        "DELETE FROM measure WHERE id % 7 = 0",
        # moved and updated again in one transaction
        "BEGIN; UPDATE measure SET day = '2026-03-15' WHERE id = 1; UPDATE measure SET v = 'twice' WHERE id = 1; "
        "COMMIT",
        separately=True,
    )
    # A partition attached while streaming, under a name the stream has already found out of scope:
    # a change of it is read (with a marker row of the root in the same transaction) before it is attached.
    root = topic_of(topic_prefix, "measure")
    execute(
        dbs.source_dsn,
        "CREATE TABLE measure_apr (id int NOT NULL, day date NOT NULL, v text, PRIMARY KEY (id, day))",
        "BEGIN; INSERT INTO measure_apr VALUES (1000, '2026-04-02', 'not a partition yet'); "
        "INSERT INTO measure VALUES (999, '2026-01-20', 'marker'); COMMIT",
        separately=True,
    )
    reader.wait_for([root], lambda ev: any((e.after or {}).get("id") == 999 for e in ev if e.value), "the marker")
    execute(
        dbs.source_dsn,
        "DELETE FROM measure_apr",
        "ALTER TABLE measure ATTACH PARTITION measure_apr FOR VALUES FROM ('2026-04-01') TO ('2026-05-01')",
        "INSERT INTO measure SELECT g, date '2026-04-01' + g % 30, 'april ' || g FROM generate_series(61, 70) g",
        "UPDATE measure SET day = day + 30, v = 'to april' WHERE id IN (20, 22) AND day >= '2026-03-01'",
        separately=True,
    )
    wait_identical(dbs, [MEASURE], processes=(source, sink))
    assert_same_rows(dbs, [MEASURE])
    stop_cleanly(sink, source)

    assert change_topics(stack, topic_prefix) == {root}, "a leaf's changes went to a topic of its own"
    events = reader.read([root])
    assert {e.source["table"] for e in events if e.value is not None} == {"measure"}
    assert len([e for e in events if e.op == "r"]) == 30, "the snapshot reads the root: every partition's rows"
    # the row moved in the first UPDATE: its old key's delete and tombstone, then its new key's create
    moved = [e for e in events if e.op in ("d", "c") and (e.before or e.after or {}).get("id") == 4]
    assert [e.op for e in moved] == ["d", "c"], describe(moved)
    delete, create = moved
    assert delete.source["txId"] == create.source["txId"] and delete.source["seq"] < create.source["seq"]
    assert delete.offset + 1 == next(e.offset for e in events if e.value is None and e.key == delete.key)
    reader.assert_valid()


def test_the_default_scope_replicates_a_partitioned_table_as_one(
    stack: Stack, dbs: Databases, topic_prefix: str, reader: EventReader
) -> None:
    execute(
        dbs.source_dsn,
        *PARTITIONED,
        "CREATE TABLE item (id int PRIMARY KEY, label text)",
        "CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY)",
        "INSERT INTO measure VALUES (1, '2026-01-05', 'a'), (2, '2026-02-05', 'b')",
        separately=True,
    )
    source = start_source(dbs, topic_prefix, new_slot(), streaming=True)
    execute(
        dbs.source_dsn,
        "INSERT INTO measure VALUES (3, '2026-03-05', 'c')",
        "UPDATE measure SET day = '2026-03-06' WHERE id = 1",
        "INSERT INTO item VALUES (1, 'one')",
        "INSERT INTO scratch VALUES (1)",
        separately=True,
    )
    root, items = topic_of(topic_prefix, "measure"), topic_of(topic_prefix, "item")
    events = reader.wait_then_stop(
        [root, items], lambda ev: count(root, 6)(ev) and count(items, 1)(ev), "the changes", source
    )
    assert change_topics(stack, topic_prefix) == {root, items}
    assert [(e.op, e.key) for e in on(events, root)] == [
        ("r", b'{"id":1,"day":"2026-01-05"}'),
        ("r", b'{"id":2,"day":"2026-02-05"}'),
        ("c", b'{"id":3,"day":"2026-03-05"}'),
        ("d", b'{"id":1,"day":"2026-01-05"}'),
        (None, b'{"id":1,"day":"2026-01-05"}'),
        ("c", b'{"id":1,"day":"2026-03-06"}'),
    ], describe(on(events, root))
    log = source.stderr_text()
    assert "replicating 2 tables of" in log and "public.item, public.measure" in log, log
    assert re.search(r"table public\.scratch is UNLOGGED.*ALTER TABLE public\.scratch SET LOGGED.*left out", log)
    reader.assert_valid()


def test_an_unlogged_table_in_tables_is_refused(dbs: Databases, topic_prefix: str) -> None:
    execute(dbs.source_dsn, "CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY)")
    slot = new_slot()
    result = run_cli(source_args(dbs, topic_prefix, slot, "--tables", "public.scratch"), timeout=120)
    line = error_line("cdc-source", result, alone=False)
    assert line == (
        "table public.scratch is UNLOGGED: its changes never reach the WAL, so they cannot be streamed. "
        "Fix: ALTER TABLE public.scratch SET LOGGED"
    ), line
    assert slot_row(dbs, slot) is None, "a refused start must not create the slot"


def test_a_leaf_named_with_its_root_is_refused(dbs: Databases, topic_prefix: str) -> None:
    execute(dbs.source_dsn, *PARTITIONED, separately=True)
    result = run_cli(
        source_args(dbs, topic_prefix, new_slot(), "--tables", "public.measure,public.measure_feb"), timeout=120
    )
    line = error_line("cdc-source", result, alone=False)
    assert line.startswith("table public.measure_feb is a partition of public.measure, which --tables names"), line
    assert "remove public.measure_feb from --tables" in line, line


def test_slot_creation_names_the_open_transaction_it_waits_for(dbs: Databases, topic_prefix: str) -> None:
    execute(dbs.source_dsn, "CREATE TABLE item (id int PRIMARY KEY)")
    blocker = psycopg2.connect(dbs.source_dsn, connect_timeout=10)
    try:
        with blocker.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            [(pid,)] = cur.fetchall()
            cur.execute("INSERT INTO item VALUES (1)")  # takes an xid: the slot waits for its end
        began = time.monotonic()
        source = start_source(dbs, topic_prefix, new_slot(), "--tables", "public.item")
        wait_for_output(source, f"pid {pid}, open for", timeout=20)
        assert time.monotonic() - began < 15, "the first waiting line came late"
        [line] = [x for x in source.stderr_text().splitlines() if f"pid {pid}," in x][:1]
        assert "waiting for" in line and "idle in transaction: INSERT INTO item VALUES (1)" in line, line
        assert "streaming from slot" not in source.stderr_text()
        blocker.commit()
    finally:
        blocker.close()
    wait_for_output(source, "streaming from slot", timeout=60)
    waits = source.stderr_text().count("open for")
    time.sleep(6)
    assert source.stderr_text().count("open for") == waits, "the waiting lines go on after the slot exists"
    stop_source(source)
    assert psql_rows(dbs.source_dsn, "SELECT count(*) FROM item") == [(1,)]
