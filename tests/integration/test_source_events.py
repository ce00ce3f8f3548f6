"""cdc-source against the real stack: what lands in Kafka for each kind of change (inserts,
updates, deletes and their keys, primary-key changes, unchanged TOASTed columns, TRUNCATE, one
transaction over two tables).
(The `reader` fixture keeps the envelopes a test read: see tests/source_events.py.)"""

from schemas.partitioner import partition_for
from tests.conftest import Databases, Stack, admin_client
from tests.helpers import psql_rows
from tests.pipeline import (
    BIG_TEXT,
    execute,
    start_source,
)
from tests.source_events import (
    EventReader,
    count,
    describe,
    new_slot,
    on,
    topic_of,
)

# --- 1. inserts, updates, deletes, keys ----------------------------------------------------


def test_inserts_updates_deletes_and_keys(dbs: Databases, topic_prefix: str, reader: EventReader) -> None:
    execute(
        dbs.source_dsn,
        "CREATE TABLE item (id int PRIMARY KEY, label text NOT NULL, qty int)",
        # The key is (b, a): key order differs from column order.
        "CREATE TABLE pair (a int, b text, v text, PRIMARY KEY (b, a))",
        separately=True,
    )
    slot = new_slot()
    process = start_source(dbs, topic_prefix, slot, streaming=True)
    execute(
        dbs.source_dsn,
        "INSERT INTO item VALUES (1, 'one', 10)",
        "INSERT INTO item VALUES (2, 'two', NULL)",
        "UPDATE item SET label = 'uno', qty = 11 WHERE id = 1",
        "DELETE FROM item WHERE id = 2",
        "INSERT INTO pair VALUES (7, 'x', 'first')",
        "UPDATE pair SET v = 'second' WHERE b = 'x' AND a = 7",
        "DELETE FROM pair WHERE b = 'x' AND a = 7",
        separately=True,
    )
    items, pairs = topic_of(topic_prefix, "item"), topic_of(topic_prefix, "pair")
    events = reader.wait_then_stop(
        [items, pairs], lambda ev: count(items, 5)(ev) and count(pairs, 4)(ev), "all changes", process
    )

    item_events = on(events, items)
    assert [(e.key, e.op) for e in item_events] == [
        (b'{"id":1}', "c"),
        (b'{"id":2}', "c"),
        (b'{"id":1}', "u"),
        (b'{"id":2}', "d"),
        (b'{"id":2}', None),
    ], describe(item_events)
    c1, c2, u1, d2, tombstone = item_events
    assert (c1.before, c1.after) == (None, {"id": 1, "label": "one", "qty": 10})
    assert (c2.before, c2.after) == (None, {"id": 2, "label": "two", "qty": None})
    # Default replica identity: `before` of an update is the key.
    assert (u1.before, u1.after) == ({"id": 1}, {"id": 1, "label": "uno", "qty": 11})
    assert "unchanged" not in u1.env
    assert (d2.before, d2.after) == ({"id": 2}, None)
    assert tombstone.raw is None and tombstone.key == b'{"id":2}'

    for e in (c1, c2, u1, d2):
        assert e.env["columns"] == {"id": "integer", "label": "text", "qty": "integer"}
        assert e.env["key"] == ["id"]
        src = e.source
        assert (src["version"], src["connector"], src["name"], src["db"]) == (
            "1",
            "cdc-source",
            topic_prefix,
            dbs.name,
        )
        assert (src["schema"], src["table"], src["slot"], src["snapshot"]) == ("public", "item", slot, False)
        assert isinstance(src["txId"], int) and src["txId"] > 0
        assert src["seq"] == 1, "one change per transaction"
        assert 0 < src["lsn"] <= src["commit_lsn"], src
        assert src["ts_ms"] == src["ts_us"] // 1000, src
    commits = [e.source["commit_lsn"] for e in (c1, c2, u1, d2)]
    assert commits == sorted(set(commits)), f"four transactions, in commit order: {commits}"

    pair_events = on(events, pairs)
    assert [(e.key, e.op) for e in pair_events] == [
        (b'{"b":"x","a":7}', "c"),
        (b'{"b":"x","a":7}', "u"),
        (b'{"b":"x","a":7}', "d"),
        (b'{"b":"x","a":7}', None),
    ], describe(pair_events)
    pc, pu, pd, _ = pair_events
    assert pc.after == {"a": 7, "b": "x", "v": "first"}
    assert (pu.before, pu.after) == ({"a": 7, "b": "x"}, {"a": 7, "b": "x", "v": "second"})
    assert pd.before == {"a": 7, "b": "x"} and pd.after is None
    for e in (pc, pu, pd):
        assert e.env["key"] == ["b", "a"]
        assert list(e.env["columns"].items()) == [("a", "integer"), ("b", "text"), ("v", "text")]
    reader.assert_valid()


# --- 2. primary-key change ----------------------------------------------------------------


def test_primary_key_change_is_delete_tombstone_then_create(
    stack: Stack, dbs: Databases, topic_prefix: str, reader: EventReader
) -> None:
    execute(
        dbs.source_dsn,
        "CREATE TABLE item (id int PRIMARY KEY, label text)",
        "CREATE TABLE pair (a int, b text, v text, PRIMARY KEY (b, a))",
        separately=True,
    )
    process = start_source(dbs, topic_prefix, new_slot(), streaming=True)
    execute(
        dbs.source_dsn,
        "INSERT INTO item VALUES (1, 'a')",
        "UPDATE item SET id = 10, label = 'b' WHERE id = 1",
        "INSERT INTO pair VALUES (7, 'x', 'v1')",
        "UPDATE pair SET b = 'y' WHERE b = 'x' AND a = 7",
        separately=True,
    )
    items, pairs = topic_of(topic_prefix, "item"), topic_of(topic_prefix, "pair")
    events = reader.wait_then_stop(
        [items, pairs], lambda ev: count(items, 4)(ev) and count(pairs, 4)(ev), "key changes", process
    )
    metadata = admin_client(stack.bootstrap_servers).list_topics(timeout=10)
    assert len(metadata.topics[items].partitions) == 1, "the default is one partition per topic"

    item_events = on(events, items)
    assert [(e.partition, e.key, e.op) for e in item_events] == [
        (0, b'{"id":1}', "c"),
        (0, b'{"id":1}', "d"),
        (0, b'{"id":1}', None),
        (0, b'{"id":10}', "c"),
    ], describe(item_events)
    _, delete, _, create = item_events
    assert (delete.before, delete.after) == ({"id": 1}, None)
    assert (create.before, create.after) == (None, {"id": 10, "label": "b"})
    assert delete.source["txId"] == create.source["txId"]
    assert delete.source["commit_lsn"] == create.source["commit_lsn"]

    pair_events = on(events, pairs)
    assert [(e.key, e.op) for e in pair_events] == [
        (b'{"b":"x","a":7}', "c"),
        (b'{"b":"x","a":7}', "d"),
        (b'{"b":"x","a":7}', None),
        (b'{"b":"y","a":7}', "c"),
    ], describe(pair_events)
    assert pair_events[1].before == {"a": 7, "b": "x"}
    assert pair_events[3].after == {"a": 7, "b": "y", "v": "v1"}
    reader.assert_valid()


# --- 3. unchanged TOASTed columns ------------------------------------------------------------


def test_unchanged_toast_column(dbs: Databases, topic_prefix: str, reader: EventReader) -> None:
    execute(
        dbs.source_dsn,
        "CREATE TABLE doc (id int PRIMARY KEY, big text, n int NOT NULL)",
        "CREATE TABLE doc_full (id int PRIMARY KEY, big text, n int NOT NULL)",
        "ALTER TABLE doc_full REPLICA IDENTITY FULL",
        separately=True,
    )
    process = start_source(dbs, topic_prefix, new_slot(), streaming=True)
    execute(
        dbs.source_dsn,
        f"INSERT INTO doc VALUES (1, {BIG_TEXT}, 0)",
        f"INSERT INTO doc_full VALUES (1, {BIG_TEXT}, 0)",
        separately=True,
    )
    for table in ("doc", "doc_full"):
        [(stored, length)] = psql_rows(dbs.source_dsn, f"SELECT pg_column_size(big), length(big) FROM {table}")
        assert length == 22400 and stored > 20000, f"{table}.big compressed to {stored} bytes: not a TOAST test"
        [(toast,)] = psql_rows(
            dbs.source_dsn, f"SELECT reltoastrelid::regclass::text FROM pg_class WHERE oid = '{table}'::regclass"
        )
        [(chunks,)] = psql_rows(dbs.source_dsn, f"SELECT count(*) FROM {toast}")
        assert chunks > 0, f"{table}.big is not stored out of line"
    execute(
        dbs.source_dsn,
        "UPDATE doc SET n = 1 WHERE id = 1",
        "UPDATE doc_full SET n = 1 WHERE id = 1",
        separately=True,
    )
    big = {
        table: str(psql_rows(dbs.source_dsn, f"SELECT big FROM {table}")[0][0]) for table in ("doc", "doc_full")
    }

    doc, full = topic_of(topic_prefix, "doc"), topic_of(topic_prefix, "doc_full")
    events = reader.wait_then_stop(
        [doc, full], lambda ev: count(doc, 2)(ev) and count(full, 2)(ev), "the updates", process
    )

    create, update = on(events, doc)
    assert (create.op, update.op) == ("c", "u")
    assert create.after == {"id": 1, "big": big["doc"], "n": 0}
    # Default replica identity: the unchanged TOASTed value is not in the WAL; it must be listed as
    # unchanged, never sent as null.
    assert update.after == {"id": 1, "n": 1}, "the update must not carry (or null) the unchanged big value"
    assert update.env["unchanged"] == ["big"]
    assert update.before == {"id": 1}
    assert update.env["columns"] == {"id": "integer", "big": "text", "n": "integer"}

    create, update = on(events, full)
    assert (create.op, update.op) == ("c", "u")
    assert create.after == {"id": 1, "big": big["doc_full"], "n": 0}
    # REPLICA IDENTITY FULL: the old row holds the value, so the new row is completed from it.
    assert update.after == {"id": 1, "big": big["doc_full"], "n": 1}
    assert "unchanged" not in update.env
    assert update.before == {"id": 1, "big": big["doc_full"], "n": 0}
    reader.assert_valid()


# --- 4. TRUNCATE ---------------------------------------------------------------------------


def test_truncate_reaches_every_partition_in_order(
    stack: Stack, dbs: Databases, topic_prefix: str, reader: EventReader
) -> None:
    execute(dbs.source_dsn, "CREATE TABLE item (id int PRIMARY KEY, label text)")
    process = start_source(dbs, topic_prefix, new_slot(), "--partitions", "3", streaming=True)
    ids = range(1, 31)
    assert {partition_for(f'{{"id":{i}}}'.encode(), 3) for i in ids} == {0, 1, 2}, "every partition gets rows"
    execute(
        dbs.source_dsn,
        "INSERT INTO item SELECT g, 'row ' || g FROM generate_series(1, 30) g",
        "TRUNCATE item",
        "INSERT INTO item VALUES (100, 'after')",
        separately=True,
    )
    items = topic_of(topic_prefix, "item")
    events = reader.wait_then_stop([items], count(items, 30 + 3 + 1), "rows, truncate, row", process)
    metadata = admin_client(stack.bootstrap_servers).list_topics(timeout=10)
    assert len(metadata.topics[items].partitions) == 3

    assert len(events) == 34, describe(events)
    for e in events:
        if e.key is not None:
            assert e.partition == partition_for(e.key, 3), f"{e.key!r} is not on Kafka's partition for it"
    truncates = [e for e in events if e.op == "t"]
    assert sorted(e.partition for e in truncates) == [0, 1, 2], describe(events)
    for t in truncates:
        assert t.key is None
        assert (t.before, t.after, t.env["partitions"]) == (None, None, 3)
        assert (t.source["table"], t.source["snapshot"]) == ("item", False)
        assert t.env["columns"] == {"id": "integer", "label": "text"}
    assert len({(t.source["txId"], t.source["commit_lsn"]) for t in truncates}) == 1, "one TRUNCATE, one tx"

    later = partition_for(b'{"id":100}', 3)
    for p in range(3):
        ops = [(e.op, e.key) for e in events if e.partition == p]
        expected_rows = [
            ("c", f'{{"id":{i}}}'.encode()) for i in ids if partition_for(f'{{"id":{i}}}'.encode(), 3) == p
        ]
        expected = [*expected_rows, ("t", None)]
        if p == later:
            expected.append(("c", b'{"id":100}'))
        assert ops == expected, f"partition {p}:\n{describe([e for e in events if e.partition == p])}"
    reader.assert_valid()


# --- 5. one transaction, two tables ---------------------------------------------------------


def test_multi_table_transaction_shares_tx_and_orders_seq(
    dbs: Databases, topic_prefix: str, reader: EventReader
) -> None:
    execute(
        dbs.source_dsn,
        "CREATE TABLE a (id int PRIMARY KEY, v text)",
        "CREATE TABLE b (id int PRIMARY KEY, v text)",
        separately=True,
    )
    process = start_source(dbs, topic_prefix, new_slot(), streaming=True)
    execute(
        dbs.source_dsn,
        "INSERT INTO b VALUES (1, 'earlier')",
        "BEGIN; INSERT INTO a VALUES (1, 'a1'); INSERT INTO b VALUES (2, 'b2'); UPDATE a SET v = 'a1!' WHERE id = 1; "
        "DELETE FROM b WHERE id = 1; INSERT INTO a VALUES (2, 'a2'); COMMIT",
        separately=True,
    )
    ta, tb = topic_of(topic_prefix, "a"), topic_of(topic_prefix, "b")
    events = reader.wait_then_stop(
        [ta, tb], lambda ev: count(ta, 3)(ev) and count(tb, 4)(ev), "the transaction", process
    )

    earlier = on(events, tb)[0]
    assert (earlier.key, earlier.op) == (b'{"id":1}', "c")
    changes = [e for e in events if e.value is not None and e is not earlier]
    assert len(changes) == 5, describe(events)
    assert len({e.source["txId"] for e in changes}) == 1, "one transaction, one txId"
    assert len({e.source["commit_lsn"] for e in changes}) == 1, "one transaction, one commit LSN"
    assert len({(e.source["ts_ms"], e.source["ts_us"]) for e in changes}) == 1, "one commit time"
    assert earlier.source["txId"] != changes[0].source["txId"]
    assert earlier.source["commit_lsn"] < changes[0].source["commit_lsn"]

    in_order = sorted(changes, key=lambda e: e.source["seq"])
    assert [(e.source["table"], e.op, e.key) for e in in_order] == [
        ("a", "c", b'{"id":1}'),
        ("b", "c", b'{"id":2}'),
        ("a", "u", b'{"id":1}'),
        ("b", "d", b'{"id":1}'),
        ("a", "c", b'{"id":2}'),
    ], describe(in_order)
    seqs = [e.source["seq"] for e in in_order]
    assert seqs == sorted(set(seqs)), f"seq must increase strictly across the transaction: {seqs}"
    lsns = [e.source["lsn"] for e in in_order]
    assert lsns == sorted(lsns) and lsns[-1] <= in_order[0].source["commit_lsn"], lsns
    reader.assert_valid()
