"""cdc-sink end to end with schema-change events (`s`, see schemas/envelope.py): hand-made events and
changes in a real Kafka topic of two partitions, applied by cdc-sink (--snapshot topic, --once) to the
real target, per --schema-changes mode: renames with older changes of the other partition arriving
after the event, drops (keep, drop), widening and narrowing type changes, a column added with the
source's missing value, a replay by `cdc-sink rebuild`, and mode none (the events skipped)."""

import subprocess
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Producer
from confluent_kafka.cimpl import NewTopic  # confluent_kafka.admin re-exports it without declaring so

from pg_kafka_cdc.common.tables import TableName
from schemas import codec
from schemas.envelope import SchemaChange, Source
from schemas.partitioner import partition_for
from schemas.topics import topic_for
from tests.conftest import Databases, Stack, admin_client
from tests.helpers import psql_rows
from tests.pipeline import error_line, execute, rows_as_text, run_sink
from tests.sink_runs import names_of

TABLE = TableName("public", "t")
PARTITIONS = 2
STREAM = "7300000000000000001:test_slot:1A2B3C"


def schema_change(**fields: Any) -> SchemaChange:
    change: dict[str, Any] = {"renamed": [], "retyped": [], "dropped": [], "added": [], "rewritten": False}
    change.update(fields)
    return change  # type: ignore[return-value]


@dataclass
class Topic:
    """The table's change topic (two partitions), written as cdc-source would."""

    stack: Stack
    prefix: str
    key: tuple[str, ...] = ("id",)
    producer: Producer = field(init=False)

    def __post_init__(self) -> None:
        self.name = topic_for(self.prefix, TABLE)
        admin = admin_client(self.stack.bootstrap_servers)
        for future in admin.create_topics([NewTopic(self.name, PARTITIONS, 1)]).values():
            future.result()
        self.producer = Producer({"bootstrap.servers": self.stack.bootstrap_servers})

    def source(self, lsn: int, seq: int) -> Source:
        return {
            "version": "1",
            "connector": "cdc-source",
            "name": self.prefix,
            "db": "db",
            "schema": TABLE.schema,
            "table": TABLE.name,
            "slot": "test_slot",
            "lsn": lsn,
            "commit_lsn": lsn,
            "txId": 1000 + lsn,
            "ts_ms": 1_700_000_000_000 + lsn,
            "ts_us": 1_700_000_000_000_000 + lsn * 1000,
            "seq": seq,
            "snapshot": False,
            "stream": STREAM,
        }

    @staticmethod
    def partition_of(i: int, key: str = "id") -> int:
        return partition_for(codec.encode_key({key: i}, [key]), PARTITIONS)

    def upsert(self, row: dict[str, Any], columns: dict[str, str], lsn: int, seq: int, op: str = "c") -> int:
        """An insert (or update) of `row`, in the partition of its key; returns the partition."""
        key = codec.encode_key(row, self.key)
        partition = partition_for(key, PARTITIONS)
        value = codec.encode(None, row, op, 0, self.source(lsn, seq), columns, list(self.key))  # type: ignore[arg-type]
        self.producer.produce(self.name, value, key, partition)
        return partition

    def schema(
        self,
        change: SchemaChange,
        columns: dict[str, str],
        lsn: int,
        seq: int,
        partitions: tuple[int, ...] = (0, 1),
    ) -> None:
        """The schema-change event, to `partitions` (cdc-source sends it to every partition)."""
        value = codec.encode(
            None,
            None,
            "s",
            0,
            self.source(lsn, seq),
            columns,
            list(self.key),
            partitions=PARTITIONS,
            schema_change=change,
        )
        for p in partitions:
            self.producer.produce(self.name, value, None, p)

    def flush(self) -> None:
        assert self.producer.flush(30) == 0, "test messages not delivered"


def ids_in(partition: int, count: int, start: int = 1) -> list[int]:
    """`count` ids whose keys go to `partition`."""
    found: list[int] = []
    i = start
    while len(found) < count:
        if Topic.partition_of(i) == partition:
            found.append(i)
        i += 1
    return found


def sink(dbs: Databases, prefix: str, mode: str, *extra: str) -> subprocess.CompletedProcess[str]:
    slot, group = names_of(dbs, prefix)
    fill = () if extra[:1] == ("rebuild",) else ("--snapshot", "topic")  # a rebuild fills from the topic
    return run_sink(dbs, prefix, slot, group, *extra, *fill, "--once", "--schema-changes", mode, timeout=120)


def sink_ok(dbs: Databases, prefix: str, mode: str, *extra: str) -> str:
    result = sink(dbs, prefix, mode, *extra)
    assert result.returncode == 0, f"cdc-sink exited with {result.returncode}:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr


def target_columns(dbs: Databases) -> dict[str, tuple[str, bool, str | None]]:
    """name -> (type, NOT NULL, default) of the target table's columns."""
    rows = psql_rows(
        dbs.target_dsn,
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid) "
        "FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
        "WHERE a.attrelid = 'public.t'::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
    )
    return {name: (type_name, bool(not_null), default) for name, type_name, not_null, default in rows}


def target_rows(dbs: Databases) -> list[dict[str, str | None]]:
    return rows_as_text(dbs.target_dsn, TABLE)


def history(dbs: Databases) -> list[tuple[Any, ...]]:
    return psql_rows(
        dbs.target_dsn,
        "SELECT stream, commit_lsn, seq, mode FROM cdc_sink.schema_changes ORDER BY commit_lsn, seq",
    )


OLD = {"id": "bigint", "n": "text"}
NEW = {"id": "bigint", "name": "text"}
RENAME = schema_change(renamed=[{"from": "n", "to": "name"}])


def test_a_rename_applies_once_and_older_changes_of_the_other_partition_follow_it(
    stack: Stack, dbs: Databases, topic_prefix: str
) -> None:
    topic = Topic(stack, topic_prefix)
    p0, p1 = ids_in(0, 3), ids_in(1, 3)
    for seq, i in enumerate([*p0, *p1]):
        topic.upsert({"id": i, "n": f"v{i}"}, OLD, lsn=100, seq=seq)
    topic.flush()
    sink_ok(dbs, topic_prefix, "keep")
    assert list(target_columns(dbs)) == ["id", "n"]

    # partition 0 gets past the rename; partition 1 has not yet (its older update comes later)
    topic.schema(RENAME, NEW, lsn=300, seq=1, partitions=(0,))
    topic.upsert({"id": p0[0], "name": "renamed"}, NEW, lsn=300, seq=2, op="u")
    topic.flush()
    stderr = sink_ok(dbs, topic_prefix, "keep")
    assert "renamed column n of public.t to name, as on the source" in stderr
    assert list(target_columns(dbs)) == ["id", "name"]

    topic.upsert({"id": p1[0], "n": "older"}, OLD, lsn=200, seq=0, op="u")  # before the rename
    topic.schema(RENAME, NEW, lsn=300, seq=1, partitions=(1,))
    topic.upsert({"id": p1[1], "name": "newer"}, NEW, lsn=300, seq=3, op="u")
    topic.flush()
    stderr = sink_ok(dbs, topic_prefix, "keep")
    assert "renamed column" not in stderr and "added column" not in stderr, stderr
    assert list(target_columns(dbs)) == ["id", "name"], "the older change re-added the old name"
    names = {int(r["id"] or 0): r["name"] for r in target_rows(dbs)}
    assert names == {
        p0[0]: "renamed",
        p0[1]: f"v{p0[1]}",
        p0[2]: f"v{p0[2]}",
        p1[0]: "older",
        p1[1]: "newer",
        p1[2]: f"v{p1[2]}",
    }
    assert history(dbs) == [(STREAM, 300, 1, "keep")]


def drop_sequence(topic: Topic) -> tuple[list[int], list[int]]:
    """Rows with `gone`, the drop on partition 0 with inserts after it, then partition 1's older
    insert (with `gone`), the drop and a newer insert."""
    columns = {"id": "bigint", "v": "text", "gone": "text"}
    p0, p1 = ids_in(0, 3), ids_in(1, 3)
    topic.upsert({"id": p0[0], "v": "a", "gone": "x"}, columns, lsn=100, seq=0)
    topic.upsert({"id": p1[0], "v": "b", "gone": "y"}, columns, lsn=100, seq=1)
    topic.schema(schema_change(dropped=["gone"]), {"id": "bigint", "v": "text"}, lsn=300, seq=1, partitions=(0,))
    topic.upsert({"id": p0[1], "v": "c"}, {"id": "bigint", "v": "text"}, lsn=300, seq=2)
    topic.flush()
    return p0, p1


def test_a_dropped_column_is_kept_nullable_in_keep_mode(stack: Stack, dbs: Databases, topic_prefix: str) -> None:
    execute(dbs.target_dsn, "CREATE TABLE t (id bigint PRIMARY KEY, v text, gone text NOT NULL DEFAULT 'z')")
    topic = Topic(stack, topic_prefix)
    p0, p1 = drop_sequence(topic)
    stderr = sink_ok(dbs, topic_prefix, "keep")  # the insert after the drop lacks `gone`: NOT NULL gone
    assert "column gone of public.t was dropped on the source: kept on the target" in stderr
    assert target_columns(dbs)["gone"] == ("text", False, None)
    topic.upsert({"id": p1[1], "v": "d", "gone": "older"}, {"id": "bigint", "v": "text", "gone": "text"}, 200, 0)
    topic.schema(schema_change(dropped=["gone"]), {"id": "bigint", "v": "text"}, lsn=300, seq=1, partitions=(1,))
    topic.flush()
    sink_ok(dbs, topic_prefix, "keep")
    gone = {int(r["id"] or 0): r["gone"] for r in target_rows(dbs)}
    assert gone == {p0[0]: "x", p1[0]: "y", p0[1]: None, p1[1]: "older"}


def test_a_dropped_column_is_dropped_in_drop_mode(stack: Stack, dbs: Databases, topic_prefix: str) -> None:
    execute(dbs.target_dsn, "CREATE TABLE t (id bigint PRIMARY KEY, v text, gone text NOT NULL DEFAULT 'z')")
    topic = Topic(stack, topic_prefix)
    p0, p1 = drop_sequence(topic)
    stderr = sink_ok(dbs, topic_prefix, "drop")
    assert "dropped column gone of public.t, as on the source (--schema-changes drop)" in stderr
    assert list(target_columns(dbs)) == ["id", "v"]
    # partition 1's older insert still carries the column: left out, not added back
    topic.upsert({"id": p1[1], "v": "d", "gone": "older"}, {"id": "bigint", "v": "text", "gone": "text"}, 200, 0)
    topic.flush()
    stderr = sink_ok(dbs, topic_prefix, "drop")
    assert "added column" not in stderr, stderr
    assert list(target_columns(dbs)) == ["id", "v"]
    assert {int(r["id"] or 0): r["v"] for r in target_rows(dbs)} == {
        p0[0]: "a",
        p1[0]: "b",
        p0[1]: "c",
        p1[1]: "d",
    }


def test_a_widening_type_change_is_applied_and_a_narrowing_one_stops_with_the_statement(
    stack: Stack, dbs: Databases, topic_prefix: str
) -> None:
    topic = Topic(stack, topic_prefix)
    small, wide = {"id": "bigint", "v": "integer"}, {"id": "bigint", "v": "bigint"}
    p0, p1 = ids_in(0, 2), ids_in(1, 2)
    topic.upsert({"id": p0[0], "v": 1}, small, lsn=100, seq=0)
    topic.upsert({"id": p1[0], "v": 2}, small, lsn=100, seq=1)
    topic.flush()
    sink_ok(dbs, topic_prefix, "keep")
    retype = schema_change(retyped=[{"name": "v", "from": "integer", "to": "bigint"}])
    topic.schema(retype, wide, lsn=300, seq=1, partitions=(0,))
    topic.upsert({"id": p0[1], "v": 2**40}, wide, lsn=300, seq=2)
    topic.upsert({"id": p1[1], "v": 3}, small, lsn=200, seq=0)  # older, of the other partition
    topic.schema(retype, wide, lsn=300, seq=1, partitions=(1,))
    topic.flush()
    stderr = sink_ok(dbs, topic_prefix, "keep")
    assert "changed the type of column v of public.t from integer to bigint, as on the source" in stderr
    assert target_columns(dbs)["v"] == ("bigint", False, None)
    values = {int(r["id"] or 0): r["v"] for r in target_rows(dbs)}
    assert values == {p0[0]: "1", p1[0]: "2", p0[1]: str(2**40), p1[1]: "3"}

    narrow = schema_change(retyped=[{"name": "v", "from": "bigint", "to": "smallint"}])
    topic.schema(narrow, {"id": "bigint", "v": "smallint"}, lsn=400, seq=1)
    topic.flush()
    for _ in range(2):  # and again at the same place when restarted
        result = sink(dbs, topic_prefix, "keep")
        line = error_line("cdc-sink", result, alone=False)
        assert line == (
            "column v of public.t changed type on the source (bigint -> smallint), which the sink does not apply "
            "by itself: run ALTER TABLE public.t ALTER COLUMN v TYPE smallint USING v::smallint on the target, "
            "then restart the sink"
        )
    assert target_columns(dbs)["v"] == ("bigint", False, None)
    execute(dbs.target_dsn, "DELETE FROM public.t WHERE v > 32767")  # what the source's narrowing refused
    execute(dbs.target_dsn, "ALTER TABLE public.t ALTER COLUMN v TYPE smallint USING v::smallint")
    sink_ok(dbs, topic_prefix, "keep")  # the fix the line names lets it go on
    assert target_columns(dbs)["v"] == ("smallint", False, None)


def test_a_column_added_with_a_missing_value_fills_the_untouched_rows(
    stack: Stack, dbs: Databases, topic_prefix: str
) -> None:
    topic = Topic(stack, topic_prefix)
    before, after = {"id": "bigint", "v": "text"}, {"id": "bigint", "v": "text", "score": "integer"}
    p0, p1 = ids_in(0, 3), ids_in(1, 3)
    for seq, i in enumerate([*p0[:2], *p1[:2]]):
        topic.upsert({"id": i, "v": "old"}, before, lsn=100, seq=seq)
    topic.flush()
    sink_ok(dbs, topic_prefix, "keep")
    add = schema_change(
        added=[{"name": "score", "type": "integer", "not_null": True, "default": "5", "missing": "5"}]
    )
    topic.schema(add, after, lsn=300, seq=1, partitions=(0,))
    topic.upsert({"id": p0[2], "v": "new", "score": 7}, after, lsn=300, seq=2)
    topic.upsert({"id": p1[2], "v": "older insert"}, before, lsn=200, seq=0)  # other partition, before the ADD
    topic.schema(add, after, lsn=300, seq=1, partitions=(1,))
    topic.flush()
    stderr = sink_ok(dbs, topic_prefix, "keep")
    assert (
        "added column score integer to public.t, NOT NULL as on the source, and with the value the source's rows "
        "got at its ADD COLUMN as its default"
    ) in stderr
    assert "re-read" not in stderr and "snapshot" not in stderr, stderr
    assert target_columns(dbs)["score"] == ("integer", True, "5")
    scores = {int(r["id"] or 0): r["score"] for r in target_rows(dbs)}
    assert scores == {p0[0]: "5", p0[1]: "5", p1[0]: "5", p1[1]: "5", p0[2]: "7", p1[2]: "5"}


def test_a_rebuild_replays_the_sequence_into_the_same_table(
    stack: Stack, dbs: Databases, topic_prefix: str
) -> None:
    topic = Topic(stack, topic_prefix)
    shape = {"id": "bigint", "n": "text", "v": "integer", "gone": "text"}
    p0, p1 = ids_in(0, 4), ids_in(1, 4)
    for seq, i in enumerate([*p0[:2], *p1[:2]]):
        topic.upsert({"id": i, "n": f"n{i}", "v": i, "gone": "g"}, shape, lsn=100, seq=seq)
    change = schema_change(
        renamed=[{"from": "n", "to": "name"}],
        retyped=[{"name": "v", "from": "integer", "to": "bigint"}],
        dropped=["gone"],
        added=[{"name": "score", "type": "integer", "not_null": True, "default": "5", "missing": "5"}],
    )
    new = {"id": "bigint", "name": "text", "v": "bigint", "score": "integer"}
    topic.schema(change, new, lsn=300, seq=1, partitions=(0,))
    topic.upsert({"id": p0[2], "name": "new", "v": 2**40, "score": 1}, new, lsn=300, seq=2)
    topic.upsert({"id": p1[2], "n": "older", "v": 3, "gone": "g"}, shape, lsn=200, seq=0)
    topic.schema(change, new, lsn=300, seq=1, partitions=(1,))
    topic.upsert({"id": p1[3], "name": "newer", "v": 4, "score": 2}, new, lsn=300, seq=3)
    topic.flush()
    sink_ok(dbs, topic_prefix, "drop")
    columns, rows = target_columns(dbs), target_rows(dbs)
    assert list(columns) == ["id", "name", "v", "score"]
    assert len(rows) == 7

    # replayed into the emptied table: the history says the event is applied, older changes follow it
    stderr = sink_ok(dbs, topic_prefix, "drop", "rebuild", "--tables", str(TABLE))
    assert "renamed column" not in stderr and "added column" not in stderr, stderr
    assert target_columns(dbs) == columns
    assert target_rows(dbs) == rows
    # replayed into a table created again from the events (another oid: the event is applied again)
    execute(dbs.target_dsn, "DROP TABLE public.t")
    stderr = sink_ok(dbs, topic_prefix, "drop", "rebuild", "--tables", str(TABLE))
    assert "renamed column n of public.t to name" in stderr, stderr
    assert target_rows(dbs) == rows
    assert list(target_columns(dbs)) == ["id", "name", "v", "score"]
    assert len(history(dbs)) == 1


def test_mode_none_skips_the_events_and_adds_the_columns_events_carry(
    stack: Stack, dbs: Databases, topic_prefix: str
) -> None:
    topic = Topic(stack, topic_prefix)
    p0 = ids_in(0, 2)
    topic.upsert({"id": p0[0], "n": "a"}, OLD, lsn=100, seq=0)
    topic.schema(RENAME, NEW, lsn=300, seq=1)
    topic.upsert({"id": p0[1], "name": "b"}, NEW, lsn=300, seq=2)
    topic.flush()
    stderr = sink_ok(dbs, topic_prefix, "none")
    assert "renamed column" not in stderr
    assert "added column name" in stderr  # today's behaviour: a new column, the old one left
    assert list(target_columns(dbs)) == ["id", "n", "name"]
    assert psql_rows(dbs.target_dsn, "SELECT count(*) FROM cdc_sink.schema_changes") == [(0,)]
    # a type change stops the sink with the statement, as before
    retype = schema_change(retyped=[{"name": "name", "from": "text", "to": "integer"}])
    topic.schema(retype, {"id": "bigint", "name": "integer"}, lsn=400, seq=1)
    topic.upsert({"id": p0[0], "name": 5}, {"id": "bigint", "name": "integer"}, lsn=400, seq=2, op="u")
    topic.flush()
    line = error_line("cdc-sink", sink(dbs, topic_prefix, "none"), alone=False)
    assert line.startswith("column name of public.t changed type on the source (text -> integer)"), line
    assert "ALTER TABLE public.t ALTER COLUMN name TYPE integer USING name::integer" in line


def test_a_table_created_from_events_gets_its_user_defined_types_created_from_the_source(
    stack: Stack, dbs: Databases, topic_prefix: str
) -> None:
    """The first event the sink reads of a table already names a user-defined type (a row of the new
    shape, or the schema-change event on a partition with no older row): the type comes from the
    source's catalog before the table is created from the event."""
    execute(
        dbs.source_dsn,
        "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')",
        "CREATE TABLE t (id bigint PRIMARY KEY, v text, m mood, ms mood[])",
    )
    topic = Topic(stack, topic_prefix)
    columns = {"id": "bigint", "v": "text", "m": "mood", "ms": "mood[]"}
    [i] = ids_in(0, 1)
    topic.upsert({"id": i, "v": "x", "m": "ok", "ms": "{sad,happy}"}, columns, lsn=100, seq=0)
    topic.flush()
    stderr = sink_ok(dbs, topic_prefix, "keep")
    assert "created enum public.mood on the target (for column m of public.t)" in stderr, stderr
    assert target_columns(dbs)["ms"][0] == "mood[]"
    assert {int(r["id"] or 0): (r["m"], r["ms"]) for r in target_rows(dbs)} == {i: ("ok", "{sad,happy}")}


def test_a_column_added_with_a_user_defined_type_gets_the_type_created_from_the_source(
    stack: Stack, dbs: Databases, topic_prefix: str
) -> None:
    execute(
        dbs.source_dsn,
        "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')",
        "CREATE TABLE t (id bigint PRIMARY KEY, v text, m mood)",
    )
    topic = Topic(stack, topic_prefix)
    before, after = {"id": "bigint", "v": "text"}, {"id": "bigint", "v": "text", "m": "mood"}
    [i, j] = ids_in(0, 2)
    topic.upsert({"id": i, "v": "old"}, before, lsn=100, seq=0)
    add = schema_change(added=[{"name": "m", "type": "mood", "not_null": False, "default": None, "missing": None}])
    topic.schema(add, after, lsn=300, seq=1)
    topic.upsert({"id": j, "v": "new", "m": "happy"}, after, lsn=300, seq=2)
    topic.flush()
    stderr = sink_ok(dbs, topic_prefix, "keep")
    assert "created enum public.mood on the target (for column m of public.t)" in stderr, stderr
    assert "added column m mood to public.t" in stderr
    assert {int(r["id"] or 0): r["m"] for r in target_rows(dbs)} == {i: None, j: "happy"}
