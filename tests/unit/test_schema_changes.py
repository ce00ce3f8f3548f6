"""Schema-change events on the sink side (sink_connector/schema_changes.py, schema_history.py and the
batch path of batch.py/plan.py with `s` events): which type changes widen, the DDL of an event per
--schema-changes mode, and the translation of changes older than an applied schema change."""

from collections.abc import Collection
from typing import Any

import orjson
import pytest
from psycopg2 import sql

from pg_kafka_cdc.common.errors import SinkError
from pg_kafka_cdc.common.signals import StopFlag
from pg_kafka_cdc.common.tables import TableName
from schemas.codec import BadMessage
from sink_connector.batch import BatchProcessor
from sink_connector.changes import Change, decode
from sink_connector.commit import BatchCommit
from sink_connector.metrics import SinkStats
from sink_connector.plan import TopicTables, new_tables
from sink_connector.poison import ErrorPolicy
from sink_connector.schema_changes import (
    Added,
    SchemaEvent,
    TableShapes,
    ddl_for,
    parse_document,
    translate,
    widens,
)
from sink_connector.schema_history import SchemaHistory
from tests.unit.sink_fakes import PREFIX, FakeLog, FakeTarget, Partitions, topic_of

T = TableName("public", "person")


def statements(
    event: SchemaEvent, columns: dict[str, str], mode: str = "keep", key: tuple[str, ...] = ("id",)
) -> list[str]:
    """The DDL of `event` as text (psycopg2.sql rendered without a connection)."""
    return [_render(step.statement) for step in ddl_for(event, T, columns, key, mode).steps]


def _render(composable: sql.Composable) -> str:
    if isinstance(composable, sql.Composed):
        return "".join(_render(part) for part in composable.seq)
    if isinstance(composable, sql.Identifier):
        return ".".join(f'"{s}"' for s in composable.strings)
    if isinstance(composable, sql.Literal):
        return f"'{composable.wrapped}'"
    assert isinstance(composable, sql.SQL)
    return composable.string


def event(seq: int = 5, commit_lsn: int = 100, stream: str = "S1", **fields: Any) -> SchemaEvent:
    return SchemaEvent(stream, commit_lsn, seq, **fields)


# --- widening ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("smallint", "integer"),
        ("integer", "bigint"),
        ("smallint", "bigint"),
        ("integer", "numeric"),
        ("bigint", "numeric(20,0)"),
        ("integer", "numeric(12,2)"),
        ("numeric(10,2)", "numeric(12,2)"),
        ("numeric(10,2)", "numeric(12,3)"),
        ("numeric(10,2)", "numeric"),
        ("character varying(10)", "character varying(20)"),
        ("character varying(10)", "character varying"),
        ("character varying(10)", "text"),
        ("character varying", "text"),
        ("character(3)", "text"),
        ("real", "double precision"),
        ("integer[]", "bigint[]"),
        ('"Mood"', "Mood"),
        ("text", "text"),
    ],
)
def test_widening_type_changes(old: str, new: str) -> None:
    assert widens(old, new)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("bigint", "integer"),
        ("integer", "smallint"),
        ("integer", "numeric(5,0)"),
        ("numeric(12,2)", "numeric(10,2)"),
        ("numeric(10,2)", "numeric(10,3)"),
        ("numeric", "numeric(12,2)"),
        ("numeric", "bigint"),
        ("character varying(20)", "character varying(10)"),
        ("text", "character varying(10)"),
        ("character varying", "character varying(10)"),
        ("double precision", "real"),
        ("integer", "text"),
        ("text", "integer"),
        ("integer[]", "bigint"),
        ("timestamp without time zone", "timestamp with time zone"),
    ],
)
def test_other_type_changes_do_not_widen(old: str, new: str) -> None:
    assert not widens(old, new)


# --- DDL ------------------------------------------------------------------------------------------


def test_a_rename_renames_the_column_or_nothing_when_done() -> None:
    renamed = event(renamed=(("n", "name"),))
    assert statements(renamed, {"id": "bigint", "n": "text"}) == [
        'ALTER TABLE "public"."person" RENAME COLUMN "n" TO "name"'
    ]
    assert statements(renamed, {"id": "bigint", "name": "text"}) == []  # done already
    assert statements(renamed, {"id": "bigint"}) == []  # nothing to rename


def test_a_rename_to_a_column_the_target_has_stops_with_the_fix() -> None:
    with pytest.raises(SinkError) as stop:
        ddl_for(event(renamed=(("n", "name"),)), T, {"id": "bigint", "n": "text", "name": "text"}, ("id",), "keep")
    line = str(stop.value)
    assert "\n" not in line
    assert "renamed column n of public.person to name, but the target has both columns" in line
    assert "ALTER TABLE public.person DROP COLUMN name" in line
    assert "cdc-source snapshot --tables public.person" in line


def test_a_widening_retype_is_applied_by_its_new_name_after_the_rename() -> None:
    change = event(renamed=(("n", "m"),), retyped=(("m", "integer", "bigint"),))
    assert statements(change, {"id": "bigint", "n": "integer"}) == [
        'ALTER TABLE "public"."person" RENAME COLUMN "n" TO "m"',
        'ALTER TABLE "public"."person" ALTER COLUMN "m" TYPE bigint',
    ]
    assert statements(change, {"id": "bigint", "m": "bigint"}) == []  # the target has the type already


def test_a_narrowing_retype_stops_with_the_exact_statement() -> None:
    with pytest.raises(SinkError) as stop:
        ddl_for(event(retyped=(("n", "bigint", "integer"),)), T, {"id": "bigint", "n": "bigint"}, ("id",), "keep")
    assert str(stop.value) == (
        "column n of public.person changed type on the source (bigint -> integer), which the sink does not "
        "apply by itself: run ALTER TABLE public.person ALTER COLUMN n TYPE integer USING n::integer on the "
        "target, then restart the sink"
    )


def test_a_drop_keeps_the_column_without_not_null_and_default_or_drops_it() -> None:
    dropped = event(dropped=("gone",))
    columns = {"id": "bigint", "gone": "text"}
    assert statements(dropped, columns, "keep") == [
        'ALTER TABLE "public"."person" ALTER COLUMN "gone" DROP NOT NULL, ALTER COLUMN "gone" DROP DEFAULT'
    ]
    assert statements(dropped, columns, "drop") == ['ALTER TABLE "public"."person" DROP COLUMN IF EXISTS "gone"']
    assert statements(dropped, {"id": "bigint"}, "drop") == []


def test_an_added_column_gets_the_missing_value_as_default_and_not_null() -> None:
    added = event(added=(Added("score", "integer", True, "5", "5"),))
    ddl = ddl_for(added, T, {"id": "bigint"}, ("id",), "keep")
    assert [_render(s.statement) for s in ddl.steps] == [
        """ALTER TABLE "public"."person" ADD COLUMN IF NOT EXISTS "score" integer NOT NULL DEFAULT '5'::integer"""
    ]
    assert ddl.snapshot == []
    assert "NOT NULL as on the source" in ddl.steps[0].done


def test_an_added_column_without_missing_value_is_nullable_and_asks_for_a_snapshot_unless_rewritten() -> None:
    volatile = Added("token", "uuid", False, "gen_random_uuid()", None)
    ddl = ddl_for(event(added=(volatile,)), T, {"id": "bigint"}, ("id",), "keep")
    assert [_render(s.statement) for s in ddl.steps] == [
        'ALTER TABLE "public"."person" ADD COLUMN IF NOT EXISTS "token" uuid'
    ]
    assert ddl.snapshot == ["token"]
    assert ddl_for(event(added=(volatile,), rewritten=True), T, {"id": "bigint"}, ("id",), "keep").snapshot == []
    plain = Added("note", "text", False, None, None)
    assert ddl_for(event(added=(plain,)), T, {"id": "bigint"}, ("id",), "keep").snapshot == []


def test_an_added_column_the_target_has_with_another_type_stops() -> None:
    with pytest.raises(SinkError, match="rename or drop it on the target"):
        ddl_for(
            event(added=(Added("x", "integer", False, None, None),)),
            T,
            {"id": "bigint", "x": "text"},
            ("id",),
            "keep",
        )


def test_the_document_stored_in_the_history_reads_back_as_the_event() -> None:
    original = event(
        renamed=(("a", "b"),),
        retyped=(("b", "integer", "bigint"),),
        dropped=("c",),
        added=(Added("d", "text", True, "'x'::text", "x"),),
        rewritten=True,
        columns={"id": "bigint", "b": "bigint", "d": "text"},
        key=("id",),
    )
    assert parse_document("S1", 100, 5, orjson.loads(orjson.dumps(original.document()))) == original


# --- translation -----------------------------------------------------------------------------------


def change(seq: int, row: dict[str, Any], columns: dict[str, str], op: str = "c", stream: str = "S1") -> Change:
    return Change(
        topic_of("person"),
        0,
        seq,
        orjson.dumps({"id": row["id"]}),
        op,
        row,
        columns,
        ["id"],
        commit_lsn=100,
        seq=seq,
        stream=stream,
    )


def test_an_older_change_is_renamed_retyped_and_loses_dropped_columns_in_drop_mode() -> None:
    history = [
        event(seq=5, renamed=(("n", "name"),), retyped=(("age", "integer", "bigint"),)),
        event(seq=7, dropped=("gone",)),
    ]
    old = change(
        3,
        {"id": 1, "n": "a", "age": 3, "gone": "x"},
        {"id": "bigint", "n": "text", "age": "integer", "gone": "text"},
    )
    dropped = TableShapes(history, drop=True).translate(old)
    assert dropped.row == {"id": 1, "name": "a", "age": 3}
    assert dropped.columns == {"id": "bigint", "name": "text", "age": "bigint"}
    assert old.row == {"id": 1, "n": "a", "age": 3, "gone": "x"}, "the change itself is left as it was"
    kept = TableShapes(history, drop=False).translate(old)
    assert kept.row == {"id": 1, "name": "a", "age": 3, "gone": "x"}
    # between the two events: only the later one applies
    middle = change(6, {"id": 1, "name": "a", "gone": "x"}, {"id": "bigint", "name": "text", "gone": "text"})
    assert TableShapes(history, drop=True).translate(middle).row == {"id": 1, "name": "a"}


def test_newer_changes_and_other_streams_are_left_alone() -> None:
    shapes = TableShapes([event(seq=5, renamed=(("n", "name"),))], drop=True)
    newer = change(6, {"id": 1, "n": "a new column n"}, {"id": "bigint", "n": "text"})
    assert shapes.translate(newer) is newer
    other = change(3, {"id": 1, "n": "a"}, {"id": "bigint", "n": "text"}, stream="S2")
    assert shapes.translate(other) is other
    untouched = change(3, {"id": 1, "m": "a"}, {"id": "bigint", "m": "text"})
    assert shapes.translate(untouched) is untouched  # no retired name in it: no work


def test_a_renamed_key_column_gives_the_change_its_new_key() -> None:
    old = change(3, {"id": 1, "n": "a"}, {"id": "bigint", "n": "text"})
    translated = translate(old, [event(renamed=(("id", "ident"),))], drop=False)
    assert translated.key_columns == ["ident"]
    assert translated.key == b'{"ident":1}'


def test_unchanged_columns_are_renamed_too() -> None:
    old = change(3, {"id": 1}, {"id": "bigint", "big": "text"}, op="u")
    old.unchanged = ["big"]
    assert translate(old, [event(renamed=(("big", "large"),))], drop=False).unchanged == ["large"]


# --- the batch path --------------------------------------------------------------------------------

PERSON = TableName("public", "person")
P0, P1 = (topic_of("person"), 0), (topic_of("person"), 1)
OLD = {"id": "bigint", "n": "text"}
NEW = {"id": "bigint", "name": "text"}
RENAME = {"renamed": [{"from": "n", "to": "name"}]}


class Loop:
    def __init__(self, mode: str = "keep") -> None:
        self.events: list[str] = []
        self.target = FakeTarget(self.events)
        self.log = FakeLog(self.events)
        self.stats = SinkStats()
        self.stream = Partitions()
        self.expected: dict[tuple[str, int], int | None] = {}
        self.history = SchemaHistory(mode)
        commit = BatchCommit(self.target, self.log, self.log, None, self.expected)
        self.processor = BatchProcessor(
            self.target,
            self.target,
            commit,
            ErrorPolicy("fail", set()),
            TopicTables(PREFIX),
            self.stats,
            lambda exc, delay: None,
            schema=self.history,
        )
        self.expected.update(self.target.claim([P0, P1]))

    def rows(self) -> dict[int, dict[str, Any]]:
        return self.target.db.rows.get(PERSON, {})


def test_a_schema_change_event_decodes_with_its_change_and_no_key() -> None:
    message = Partitions().schema_change("person", RENAME, NEW)
    decoded = decode(message.topic(), 0, 0, message.key(), message.value())
    assert decoded.op == "s" and decoded.key == b"" and decoded.row is None
    assert decoded.schema_change is not None and decoded.schema_change["renamed"] == [{"from": "n", "to": "name"}]
    assert decoded.partitions == 2 and decoded.columns == NEW


def test_the_event_of_every_partition_is_applied_once_and_older_changes_of_another_partition_are_translated() -> (
    None
):
    loop = Loop()
    s = loop.stream
    batch = [
        s.upsert("person", 1, "a", partition=0, seq=1, commit_lsn=50),
        s.schema_change("person", RENAME, NEW, partition=0, seq=1, commit_lsn=100),
        s.upsert("person", 2, "", partition=0, seq=2, commit_lsn=100, row={"id": 2, "name": "b"}, columns=NEW),
    ]
    assert loop.processor.run(batch, StopFlag())
    assert [e for e in loop.events if e.startswith("schema change")] == [f"schema change {PERSON} at (100, 1)"]
    assert loop.rows() == {1: {"id": 1, "name": "a"}, 2: {"id": 2, "name": "b"}}
    assert loop.target.tables[PERSON].target is not None
    # partition 1 is not past the event yet: its older change is translated, then the event is known
    loop.events.clear()
    later = [
        s.upsert("person", 3, "c", partition=1, seq=3, commit_lsn=60),
        s.schema_change("person", RENAME, NEW, partition=1, seq=1, commit_lsn=100),
        s.upsert("person", 4, "", partition=1, seq=3, commit_lsn=100, row={"id": 4, "name": "d"}, columns=NEW),
    ]
    assert loop.processor.run(later, StopFlag())
    assert not [e for e in loop.events if e.startswith("schema change")]
    assert loop.rows()[3] == {"id": 3, "name": "c"}
    assert loop.rows()[4] == {"id": 4, "name": "d"}
    assert loop.stats.schema_changes == {"public.person": 1}


def test_both_partitions_events_in_one_batch_are_one_schema_change() -> None:
    loop = Loop()
    s = loop.stream
    batch = [
        s.schema_change("person", RENAME, NEW, partition=0),
        s.upsert("person", 1, "a", partition=1, seq=0, commit_lsn=90),
        s.schema_change("person", RENAME, NEW, partition=1),
    ]
    assert loop.processor.run(batch, StopFlag())
    assert [e for e in loop.events if e.startswith("schema change")] == [f"schema change {PERSON} at (9100, 1)"]
    assert loop.rows() == {1: {"id": 1, "name": "a"}}
    assert loop.target.db.offsets == {P0: 1, P1: 2}


def test_a_batch_rolled_back_leaves_the_history_as_it_was() -> None:
    loop = Loop()
    loop.target.lose_connection = 1
    s = loop.stream
    assert loop.processor.run([s.schema_change("person", RENAME, NEW)], StopFlag())
    # retried after the lost commit: applied once, known once
    assert [ident for _, e in loop.history.entries[PERSON] for ident in [e.ident]] == [("S1", 9100, 1)]


def test_mode_none_skips_and_counts_schema_change_events() -> None:
    loop = Loop("none")
    s = loop.stream
    batch = [
        s.schema_change("person", RENAME, NEW, partition=0),
        s.upsert("person", 1, "a", partition=1, seq=0, commit_lsn=90),
        s.schema_change("person", RENAME, NEW, partition=1),
    ]
    assert loop.processor.run(batch, StopFlag())
    assert not [e for e in loop.events if e.startswith("schema change")]
    assert loop.rows() == {1: {"id": 1, "n": "a"}}  # as it came
    assert loop.stats.schema_skipped == 2
    assert loop.target.db.offsets == {P0: 1, P1: 2}


def test_a_schema_change_event_without_a_position_is_not_a_change() -> None:
    message = Partitions().schema_change("person", RENAME, NEW)
    env = orjson.loads(message.value() or b"")
    del env["source"]["seq"]
    with pytest.raises(BadMessage, match="without a source position"):
        decode(message.topic(), 0, 0, None, orjson.dumps(env))


def test_a_new_table_is_created_from_a_row_change_before_a_schema_change_events_shape() -> None:
    s = Partitions()
    topics = TopicTables(PREFIX)
    event_first = [s.schema_change("person", RENAME, NEW, partition=1), s.upsert("person", 1, "a")]
    changes = [decode(m.topic(), m.partition(), m.offset(), m.key(), m.value()) for m in event_first]
    for c in changes:
        topics.table_of(c.topic)
    assert new_tables(changes, topics, set())[PERSON].columns == OLD
    assert new_tables(changes[:1], topics, set())[PERSON].columns == NEW
    assert new_tables(changes[:1], topics, set(), schema_changes=False)[PERSON].columns == {}


def test_the_history_of_a_table_created_again_is_ignored_then_replaced() -> None:
    history = SchemaHistory("keep")
    history.add(PERSON, 10, [event(seq=5, renamed=(("n", "name"),))])
    assert history.known(PERSON, 10) == {("S1", 100, 5)}
    assert history.known(PERSON, 11) == set() and history.shapes(PERSON, 11) is None
    history.add(PERSON, 11, [event(seq=6)])
    assert [(oid, e.seq) for oid, e in history.entries[PERSON]] == [(11, 6)]


def test_a_refused_batch_is_applied_again_once_the_schema_is_refreshed() -> None:
    loop = Loop()
    calls: list[tuple[str, set[TableName]]] = []

    def refresh(failure: BaseException, tables: Collection[TableName]) -> bool:
        calls.append((str(failure), set(tables)))
        loop.target.reject_batches = False  # e.g. the enum value added, another member's rename seen
        return True

    loop.processor.refresh_schema = refresh
    loop.target.reject_batches = True
    assert loop.processor.run([loop.stream.upsert("person", 1, "a")], StopFlag())
    assert calls == [("no single change", {PERSON})]
    assert loop.rows() == {1: {"id": 1, "n": "a"}}


def test_an_event_older_than_one_applied_is_superseded() -> None:
    """A restarted source may tell of a shape change back to the old shape before the real one; a
    partition that gets that part only after the real change was applied does not apply it."""
    history = SchemaHistory("keep")
    history.add(PERSON, 10, [event(seq=5, commit_lsn=200, retyped=(("n", "integer", "bigint"),))])
    stale = event(seq=3, commit_lsn=150, retyped=(("n", "bigint", "integer"),))
    assert history.superseded(PERSON, 10, stale)
    assert not history.superseded(PERSON, 10, event(seq=1, commit_lsn=300))
    assert not history.superseded(PERSON, 10, event(seq=3, commit_lsn=150, stream="S2")), "another stream"
    assert not history.superseded(PERSON, 11, stale), "another table under that name"
