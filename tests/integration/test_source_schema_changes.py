"""cdc-source against the real stack: schema changes (ADD, RENAME, DROP COLUMN, a type change) read
from the stream and published as `s` events on every partition of the table's topic, just before the
first change with the new shape; a key change after a DROP COLUMN reads back the current columns only.
(The `reader` fixture keeps the envelopes a test read: see tests/source_events.py.)"""

import json
from collections.abc import Callable
from typing import Any

from tests.conftest import Databases
from tests.helpers import psql_rows
from tests.pipeline import BIG_TEXT, assert_same_rows, execute, run_sink, start_source
from tests.source_events import Event, EventReader, describe, new_slot, on, topic_of

ITEM_COLUMNS = {"id": "integer", "label": "text", "qty": "integer", "note": "text"}


def position(e: Event) -> tuple[int, int, int]:
    rank = {"s": -1, "d": 0, None: 1}.get(e.op, 2)
    return (int(e.source["commit_lsn"]), int(e.source["seq"]), rank) if e.value else (0, 0, 1)


def schema_events_at_least(topic: str, n: int) -> Callable[[list[Event]], bool]:
    return lambda events: len([e for e in on(events, topic) if e.op == "s"]) >= n


def no_change(**changes: Any) -> dict[str, Any]:
    return {"renamed": [], "retyped": [], "dropped": [], "added": [], "rewritten": False, **changes}


def test_schema_changes_are_published_on_every_partition_before_their_first_change(
    dbs: Databases, topic_prefix: str, reader: EventReader
) -> None:
    execute(dbs.source_dsn, "CREATE TABLE item (id int PRIMARY KEY, label text NOT NULL, qty int, note text)")
    process = start_source(dbs, topic_prefix, new_slot(), "--partitions", "3", streaming=True)
    items = topic_of(topic_prefix, "item")
    steps = [
        ["INSERT INTO item SELECT i, 'item ' || i, i, 'n' FROM generate_series(1, 5) i"],
        [
            "ALTER TABLE item ADD COLUMN score int NOT NULL DEFAULT 5",
            "INSERT INTO item VALUES (6, 'six', 6, 'n', 7)",
            "UPDATE item SET qty = 10 WHERE id = 1",
        ],
        [
            "ALTER TABLE item RENAME COLUMN label TO title",
            "UPDATE item SET title = 'two' WHERE id = 2",
            "INSERT INTO item VALUES (7, 'seven', 7, 'n', 8)",
        ],
        [
            "ALTER TABLE item DROP COLUMN note",
            "INSERT INTO item VALUES (8, 'eight', 8, 9)",
            "UPDATE item SET qty = 30 WHERE id = 3",
        ],
        [
            "ALTER TABLE item ALTER COLUMN qty TYPE bigint",
            "BEGIN; UPDATE item SET qty = 1099511627776 WHERE id = 4; INSERT INTO item VALUES (9, 'nine', 9, 10); "
            "COMMIT",
        ],
    ]
    # Each step once the one before is in the topic: the catalog the source completes a shape with is
    # then not ahead of the stream (see test_quick_alters_are_each_published for when it is).
    for n, statements in enumerate(steps):
        execute(dbs.source_dsn, *statements, separately=True)
        reader.wait_for([items], schema_events_at_least(items, 3 * n), f"step {n}", process)
    # 5 + 2 + 2 + 2 + 2 changes, 4 schema changes on 3 partitions; the type change rewrote the table,
    # so the source snapshots it again: 9 `r` events
    events = reader.wait_then_stop(
        [items],
        lambda ev: (
            len([e for e in on(ev, items) if e.op == "r"]) >= 9
            and len([e for e in on(ev, items) if e.op == "s"]) >= 12
        ),
        "the changes, the schema changes and the snapshot after the rewrite",
        process,
    )
    stderr = process.stderr_text()
    schema_events = [e for e in events if e.op == "s"]
    assert len(schema_events) == 12, describe(events)

    # each schema change is one event on every partition: same value, null key, `partitions` 3
    by_position: dict[tuple[int, int], list[Event]] = {}
    for e in schema_events:
        assert e.key is None
        assert (e.before, e.after, e.env["partitions"]) == (None, None, 3)
        by_position.setdefault((e.source["commit_lsn"], e.source["seq"]), []).append(e)
    assert len(by_position) == 4
    for group in by_position.values():
        assert sorted(e.partition for e in group) == [0, 1, 2]
        assert len({e.raw for e in group}) == 1, "the same value on every partition"
    ordered = [group[0] for _, group in sorted(by_position.items())]
    print("a schema-change event as published:", json.dumps(ordered[0].env))
    assert [e.env["schema_change"] for e in ordered] == [
        no_change(added=[{"name": "score", "type": "integer", "not_null": True, "default": "5", "missing": "5"}]),
        no_change(renamed=[{"from": "label", "to": "title"}]),
        no_change(dropped=["note"]),
        no_change(retyped=[{"name": "qty", "from": "integer", "to": "bigint"}], rewritten=True),
    ]
    shapes = [
        {**ITEM_COLUMNS, "score": "integer"},
        {"id": "integer", "title": "text", "qty": "integer", "note": "text", "score": "integer"},
        {"id": "integer", "title": "text", "qty": "integer", "score": "integer"},
        {"id": "integer", "title": "text", "qty": "bigint", "score": "integer"},
    ]
    assert [e.env["columns"] for e in ordered] == shapes
    assert all(e.env["key"] == ["id"] for e in ordered)
    assert all(e.source["table"] == "item" and e.source["snapshot"] is False for e in ordered)

    # each comes right before the first change with its shape, in that change's transaction
    changes = sorted((e for e in events if e.op in ("c", "u")), key=position)
    for s in ordered:
        first = next(e for e in changes if position(e) > position(s))
        assert (first.source["commit_lsn"], first.source["seq"]) == (s.source["commit_lsn"], s.source["seq"])
        assert first.source["txId"] == s.source["txId"]
        assert first.env["columns"] == s.env["columns"]

    # on every partition, each change carries the shape of the last schema change before it
    for partition in (0, 1, 2):
        shape = ITEM_COLUMNS
        for e in sorted((e for e in events if e.partition == partition and e.value), key=position):
            if e.op == "s":
                shape = e.env["columns"]
            elif e.op in ("c", "u"):
                assert e.env["columns"] == shape, describe([e])
                assert set(e.after or {}) == set(shape)

    after_retype = {e.after["id"]: e.after for e in changes if e.after and e.after["id"] in (4, 9)}
    assert after_retype[4]["qty"] == 1099511627776
    assert after_retype[9] == {"id": 9, "title": "nine", "qty": 9, "score": 10}
    snapshot = [e for e in events if e.op == "r"]
    assert sorted(e.after["id"] for e in snapshot if e.after) == list(range(1, 10))
    assert all(e.env["columns"] == shapes[-1] for e in snapshot)
    assert min(position(e) for e in snapshot) > position(ordered[-1])
    assert "was rewritten" in stderr and "asking for a snapshot" in stderr, stderr
    assert "schema change of public.item: renamed label -> title" in stderr, stderr
    reader.assert_valid()


def test_a_key_change_after_a_drop_column_reads_back_only_the_current_columns(
    dbs: Databases, topic_prefix: str, reader: EventReader
) -> None:
    execute(
        dbs.source_dsn,
        "CREATE TABLE doc (id int PRIMARY KEY, gone int NOT NULL, body text)",
        "ALTER TABLE doc ALTER COLUMN body SET STORAGE EXTERNAL",
        separately=True,
    )
    process = start_source(dbs, topic_prefix, new_slot(), streaming=True)
    docs = topic_of(topic_prefix, "doc")
    execute(
        dbs.source_dsn,
        f"INSERT INTO doc VALUES (1, 1, {BIG_TEXT})",
        "ALTER TABLE doc DROP COLUMN gone",
        # the key changes, the TOASTed body is left out: the source reads it back
        "UPDATE doc SET id = 2 WHERE id = 1",
        "UPDATE doc SET id = 3 WHERE id = 2",
        separately=True,
    )
    events = reader.wait_then_stop(
        [docs], lambda ev: len([e for e in on(ev, docs) if e.op == "c"]) >= 3, "both key changes", process
    )
    ops = [(e.key, e.op) for e in on(events, docs)]
    assert ops == [
        (b'{"id":1}', "c"),
        (None, "s"),
        (b'{"id":1}', "d"),
        (b'{"id":1}', None),
        (b'{"id":2}', "c"),
        (b'{"id":2}', "d"),
        (b'{"id":2}', None),
        (b'{"id":3}', "c"),
    ], describe(events)
    s = on(events, docs)[1]
    assert s.env["schema_change"] == no_change(dropped=["gone"])
    assert s.env["columns"] == {"id": "integer", "body": "text"}
    [(body,)] = psql_rows(dbs.source_dsn, "SELECT body FROM doc")
    assert len(body) > 20_000
    first, last = [e for e in on(events, docs) if e.op == "c"][1:]
    # the row of the first key change may be gone (changed again) when it is read back: then the
    # event says what it does not carry
    assert first.env.get("refetched", first.env.get("unchanged")) == ["body"], first.env
    assert last.after == {"id": 3, "body": body}
    assert last.env["refetched"] == ["body"]
    for created in (first, last):
        assert created.env["columns"] == {"id": "integer", "body": "text"}
        assert "gone" not in (created.after or {})
    assert "does not exist" not in process.stderr_text()
    reader.assert_valid()


def test_an_update_leaving_out_a_toasted_column_is_no_schema_change(
    dbs: Databases, topic_prefix: str, reader: EventReader
) -> None:
    execute(
        dbs.source_dsn,
        "CREATE TABLE doc (id int PRIMARY KEY, n int, body text)",
        "ALTER TABLE doc ALTER COLUMN body SET STORAGE EXTERNAL",
        separately=True,
    )
    process = start_source(dbs, topic_prefix, new_slot(), streaming=True)
    docs = topic_of(topic_prefix, "doc")
    execute(
        dbs.source_dsn,
        f"INSERT INTO doc VALUES (1, 1, {BIG_TEXT})",
        "UPDATE doc SET n = 2 WHERE id = 1",
        "ALTER TABLE doc DROP COLUMN n",
        "ALTER TABLE doc ADD COLUMN n int",  # the same name again: a new attnum
        "UPDATE doc SET n = 3 WHERE id = 1",
        separately=True,
    )
    events = reader.wait_then_stop(
        [docs], lambda ev: len([e for e in on(ev, docs) if e.op == "u"]) >= 2, "both updates", process
    )
    assert [e.op for e in on(events, docs)] == ["c", "u", "s", "u"], describe(events)
    first, s, second = on(events, docs)[1:]
    assert first.env["unchanged"] == ["body"] and second.env["unchanged"] == ["body"]
    assert s.env["schema_change"] == no_change(
        dropped=["n"],
        added=[{"name": "n", "type": "integer", "not_null": False, "default": None, "missing": None}],
    )
    assert s.env["columns"] == {"id": "integer", "body": "text", "n": "integer"}
    assert second.after == {"id": 1, "n": 3}
    reader.assert_valid()


def test_quick_alters_are_each_published(dbs: Databases, topic_prefix: str, reader: EventReader) -> None:
    """Two ALTERs before the source reads the first change between them: the catalog it completes the
    first new shape with is ahead of the stream; names and types still come from the stream."""
    execute(dbs.source_dsn, "CREATE TABLE item (id int PRIMARY KEY, label text, qty int)")
    process = start_source(dbs, topic_prefix, new_slot(), streaming=True)
    items = topic_of(topic_prefix, "item")
    execute(
        dbs.source_dsn,
        "BEGIN; ALTER TABLE item RENAME COLUMN label TO title; INSERT INTO item VALUES (1, 'one', 1); COMMIT",
        "BEGIN; ALTER TABLE item RENAME COLUMN title TO name; ALTER TABLE item ALTER COLUMN qty TYPE bigint; "
        "INSERT INTO item VALUES (2, 'two', 2); COMMIT",
        separately=True,
    )
    events = reader.wait_then_stop(
        [items], lambda ev: len([e for e in on(ev, items) if e.op == "c"]) >= 2, "both inserts", process
    )
    ops = [e.op for e in on(events, items)]
    assert ops[:4] == ["s", "c", "s", "c"], describe(events)
    first, c1, second, c2 = on(events, items)[:4]
    assert first.env["schema_change"]["renamed"] == [{"from": "label", "to": "title"}]
    assert first.env["columns"] == c1.env["columns"] == {"id": "integer", "title": "text", "qty": "integer"}
    assert c1.after == {"id": 1, "title": "one", "qty": 1}
    assert second.env["schema_change"]["renamed"] == [{"from": "title", "to": "name"}]
    assert second.env["schema_change"]["retyped"] == [{"name": "qty", "from": "integer", "to": "bigint"}]
    assert c2.env["columns"] == {"id": "integer", "name": "text", "qty": "bigint"}
    reader.assert_valid()


def test_a_ddl_made_while_cdc_source_is_stopped_is_published_with_the_next_change(
    dbs: Databases, topic_prefix: str, reader: EventReader
) -> None:
    """No change of the table older than the ALTERs is left in the slot: the restarted source still
    compares the stream with the shape it published (kept in its state topic), not with the catalog,
    and the sink applied before and after ends equal to the source."""
    execute(dbs.source_dsn, "CREATE TABLE item (id int PRIMARY KEY, label text NOT NULL, qty int, note text)")
    slot, group = new_slot(), f"g_{new_slot()}"
    items = topic_of(topic_prefix, "item")
    process = start_source(dbs, topic_prefix, slot, streaming=True)
    execute(dbs.source_dsn, "INSERT INTO item SELECT i, 'item ' || i, i, 'n' FROM generate_series(1, 3) i")
    reader.wait_then_stop([items], lambda ev: len([e for e in ev if e.op in ("c", "r")]) >= 3, "3 rows", process)
    first = run_sink(dbs, topic_prefix, slot, group, "--once", "--schema-changes", "drop")
    assert first.returncode == 0, first.stderr
    assert_same_rows(dbs, ["public.item"])

    execute(
        dbs.source_dsn,
        "ALTER TABLE item RENAME COLUMN label TO title",
        "ALTER TABLE item DROP COLUMN note",
        "ALTER TABLE item ADD COLUMN score int NOT NULL DEFAULT 5",
        "INSERT INTO item VALUES (4, 'four', 4, 9)",
        "UPDATE item SET qty = 11 WHERE id = 1",
        separately=True,
    )
    process = start_source(dbs, topic_prefix, slot, streaming=True)
    events = reader.wait_then_stop(
        [items], lambda ev: any(e.op == "u" for e in ev), "the insert and update after the ALTERs", process
    )
    stderr = process.stderr_text()
    assert "public.item changed since cdc-source last published it" in stderr, stderr
    [schema_event] = [e for e in events if e.op == "s"]
    assert schema_event.env["schema_change"] == no_change(
        renamed=[{"from": "label", "to": "title"}],
        dropped=["note"],
        added=[{"name": "score", "type": "integer", "not_null": True, "default": "5", "missing": "5"}],
    )
    assert schema_event.env["columns"] == {"id": "integer", "title": "text", "qty": "integer", "score": "integer"}
    inserted = next(e for e in events if e.op == "c" and e.after and e.after["id"] == 4)
    assert position(schema_event) < position(inserted)

    second = run_sink(dbs, topic_prefix, slot, group, "--once", "--schema-changes", "drop")
    assert second.returncode == 0, second.stderr
    assert_same_rows(dbs, ["public.item"])
    reader.assert_valid()
