"""Schema changes on the source while the writer streams 500 changes/s, against the real stack (issue
15): columns added (constant and volatile default), dropped (kept nullable, or dropped with
`--schema-changes drop`), renamed, widened, an enum value added, user-defined types the target lacks,
each ending with the target equal to the source on the source's columns, row by row as text; the
same sequence replayed from the topic by `cdc-sink rebuild`; and a narrowing type change stopping the
sink with one line that holds the statement to run."""

import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest
from psycopg2 import sql

from pg_kafka_cdc.common.tables import TableName
from tests.conftest import Databases, Stack
from tests.helpers import CliProcess, psql_rows, wait_until
from tests.integration.test_sink_added_columns import column_of, rows_before
from tests.pipeline import (
    BIG_TEXT,
    WRITER_TABLES,
    Table,
    assert_running,
    column_names,
    connect_as_text,
    error_line,
    execute,
    key_columns,
    reaped_on_failure,
    run_sink,
    select_as_text,
    start_sink,
    start_source,
    start_writer,
    stop_cleanly,
    table_name,
    wait_identical,
    wait_while_running,
)
from tests.sink_runs import target_count
from tests.source_events import EventReader, new_slot, stop_source, topic_of

TABLES = ",".join(WRITER_TABLES)
PERSON = "public.person"
# Seconds of the writer's changes after each ALTER (the source sees a new shape at the next row change).
SETTLE = 2.0


# --- the pipeline under load --------------------------------------------------------------------


@dataclass
class Pipeline:
    slot: str
    group: str
    source: CliProcess
    sink: CliProcess
    writer: CliProcess

    @property
    def running(self) -> list[CliProcess]:
        return [self.source, self.sink]


def streaming(
    dbs: Databases,
    topic_prefix: str,
    prepare: Sequence[str | sql.Composable] = (),
    sink_extra: Sequence[str] = (),
    partitions: int = 1,
) -> Pipeline:
    """The writer's tables filled, then `prepare` run on the source (types, columns and values that
    exist before the pipeline starts), then source and sink streaming under the writer at 500/s, once
    the sink's bulk copy of person is done."""
    rows = rows_before(dbs)
    if prepare:
        execute(dbs.source_dsn, *prepare, separately=True)
    slot, group = new_slot(), f"g-{topic_prefix}"
    source = start_source(
        dbs, topic_prefix, slot, "--tables", TABLES, "--partitions", str(partitions), streaming=True
    )
    sink = start_sink(dbs, topic_prefix, slot, group, *sink_extra)
    writer = start_writer(dbs, "--rate", "500", "--batch", "5")
    wait_while_running(
        lambda: target_count(dbs, PERSON) >= rows,
        [source, sink, writer],
        timeout=120,
        message="the sink's copy of public.person never ended",
    )
    time.sleep(1)
    return Pipeline(slot, group, source, sink, writer)


def alter(dbs: Databases, pipeline: Pipeline, *statements: str | sql.Composable, together: bool = False) -> None:
    """Run DDL (and writes) on the source, each statement in its own transaction unless `together`,
    then let the writer's changes flow for SETTLE seconds; source and sink must still run."""
    execute(dbs.source_dsn, *statements, separately=not together)
    time.sleep(SETTLE)
    assert_running(*pipeline.running, pipeline.writer)


def settle(dbs: Databases, pipeline: Pipeline, tables: Sequence[Table] = WRITER_TABLES) -> None:
    """Stop the writer, then wait until cdc-verify finds the target identical (on the source's
    columns), the pipeline running throughout."""
    stop_cleanly(pipeline.writer)
    wait_identical(dbs, tables, processes=pipeline.running, timeout=120)


def finish(pipeline: Pipeline) -> None:
    stop_cleanly(pipeline.sink)
    stop_source(pipeline.source)


# --- comparing on the source's columns ------------------------------------------------------------


def columns_with_types(dsn: str, table: Table) -> list[tuple[str, str]]:
    """(name, format_type) of each live column of `table`, in attnum order."""
    name = table_name(table)
    return [
        (str(n), str(t))
        for n, t in psql_rows(
            dsn,
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = %s::regclass "
            "AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            (str(name),),
        )
    ]


def _rows_by_key(
    dsn: str, table: TableName, columns: list[str], key: list[str]
) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    """`columns` of every row of `table`, each value as its type's output function prints it (as
    rows_as_text reads them), by the key's text."""
    conn = connect_as_text(dsn)
    try:
        rows = select_as_text(conn, table, columns)
    finally:
        conn.close()
    at = [columns.index(k) for k in key]
    return {tuple(row[i] for i in at): tuple(row) for row in rows}


def assert_same_on_source_columns(dbs: Databases, tables: Sequence[Table] = WRITER_TABLES) -> None:
    """The target has every column of the source, and every row holds, in each of the source's
    columns, the same text as on the source (the target may hold more columns: dropped ones kept)."""
    for table in tables:
        name = table_name(table)
        conn = connect_as_text(dbs.source_dsn)
        try:
            columns = column_names(conn, name)
            key = key_columns(conn, name)
        finally:
            conn.close()
        conn = connect_as_text(dbs.target_dsn)
        try:
            have = column_names(conn, name)
        finally:
            conn.close()
        absent = [c for c in columns if c not in have]
        assert not absent, f"{name}: the target lacks the source's columns {absent} (it has {have})"
        source = _rows_by_key(dbs.source_dsn, name, columns, key)
        target = _rows_by_key(dbs.target_dsn, name, columns, key)
        only_source = sorted(set(source) - set(target), key=str)
        only_target = sorted(set(target) - set(source), key=str)
        differing: Counter[str] = Counter()
        examples: dict[str, str] = {}
        for k in source.keys() & target.keys():
            for column, s, t in zip(columns, source[k], target[k], strict=True):
                if s != t:
                    differing[column] += 1
                    examples.setdefault(column, f"key {k}: source {s!r}, target {t!r}")
        problems = []
        if only_source or only_target:
            problems.append(
                f"{len(only_source)} keys only in the source (first {only_source[:5]}), "
                f"{len(only_target)} only in the target (first {only_target[:5]})"
            )
        problems += [f"column {c}: {n} rows differ, e.g. {examples[c][:300]}" for c, n in differing.most_common()]
        assert not problems, f"{name} ({len(source)} source rows, {len(target)} target rows): " + "; ".join(
            problems
        )


def changed_rows(dsn: str, *statements: str) -> int:
    """Run `statements` in one transaction; the rows the last one changed."""
    conn = psycopg2.connect(dsn, connect_timeout=10)
    try:
        with conn, conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
            return int(cur.rowcount)
    finally:
        conn.close()


def nulls(dsn: str, table: str, column: str) -> int:
    [(n,)] = psql_rows(
        dsn, sql.SQL("SELECT count(*) FROM {} WHERE {} IS NULL").format(sql.SQL(table), sql.Identifier(column))
    )
    return int(n)


def enum_labels_of(dsn: str, type_name: str) -> list[str]:
    return [
        str(label)
        for (label,) in psql_rows(
            dsn, "SELECT enumlabel FROM pg_enum WHERE enumtypid = %s::regtype ORDER BY enumsortorder", (type_name,)
        )
    ]


# --- the tests --------------------------------------------------------------------------------------

# person gains, before the pipeline starts, an enum column and a NOT NULL column with values of its own
# (the writer names its columns, so the columns changed here are the test's, not the writer's).
SEQUENCE_PREPARE = (
    "CREATE TYPE mood AS ENUM ('sad', 'ok')",
    "ALTER TABLE person ADD COLUMN mood mood NOT NULL DEFAULT 'ok'",
    "ALTER TABLE person ADD COLUMN legacy text NOT NULL DEFAULT 'old'",
    "UPDATE person SET legacy = 'legacy ' || id, mood = (CASE WHEN id % 2 = 0 THEN 'sad' ELSE 'ok' END)::mood",
)


# With 3 partitions, changes older than a schema change the sink applied (from another partition not
# yet past it) are translated to the new shape.
@pytest.mark.parametrize("partitions", [1, 3])
def test_a_sequence_of_schema_changes_under_load_ends_equal_and_replays_from_the_topic(
    stack: Stack, dbs: Databases, topic_prefix: str, reader: EventReader, partitions: int
) -> None:
    with reaped_on_failure():
        pipeline = streaming(dbs, topic_prefix, SEQUENCE_PREPARE, partitions=partitions)
        alter(dbs, pipeline, "ALTER TABLE person ADD COLUMN score int NOT NULL DEFAULT 5")
        alter(dbs, pipeline, "ALTER TABLE person ADD COLUMN token uuid DEFAULT gen_random_uuid()")
        alter(
            dbs,
            pipeline,
            "ALTER TABLE person RENAME COLUMN score TO points",
            "UPDATE person SET points = id % 1000 WHERE id % 10 = 0",
        )
        alter(dbs, pipeline, "ALTER TABLE person DROP COLUMN legacy")
        alter(
            dbs,
            pipeline,
            "ALTER TABLE person ALTER COLUMN points TYPE bigint",
            "UPDATE person SET points = 3000000000 + id WHERE id % 10 = 1",  # only a bigint holds it
        )
        alter(
            dbs,
            pipeline,
            "ALTER TYPE mood ADD VALUE 'great'",
            "UPDATE person SET mood = 'great' WHERE id % 5 = 0",
        )
        settle(dbs, pipeline)
        assert_same_on_source_columns(dbs)

        target_columns = columns_with_types(dbs.target_dsn, PERSON)
        names = [n for n, _ in target_columns]
        assert "points" in names and "score" not in names, target_columns
        assert dict(target_columns)["points"] == "bigint", target_columns
        assert column_of(dbs.target_dsn, "person", "points") == (True, "5")  # renamed, NOT NULL DEFAULT kept
        # dropped on the source, kept on the target (the default, keep): nullable and without default
        assert column_of(dbs.target_dsn, "person", "legacy") == (False, None)
        assert enum_labels_of(dbs.target_dsn, "mood") == enum_labels_of(dbs.source_dsn, "mood")
        stderr = pipeline.sink.stderr_text()
        assert "Traceback" not in stderr, stderr[-5000:]

        # the same sequence, replayed from the topic alone
        finish(pipeline)
        result = run_sink(
            dbs, topic_prefix, pipeline.slot, pipeline.group, "rebuild", "--tables", PERSON, "--once", timeout=180
        )
        assert result.returncode == 0, f"cdc-sink rebuild exited {result.returncode}:\n{result.stderr[-5000:]}"
        assert "Traceback" not in result.stderr, result.stderr[-5000:]
        assert "rebuilt public.person" in result.stderr, result.stderr[-5000:]
        assert_same_on_source_columns(dbs, [PERSON])
        assert columns_with_types(dbs.target_dsn, PERSON) == target_columns

        # one schema-change event per shape change, on every partition, valid against the schema
        events = reader.read([topic_of(topic_prefix, "person")])
        changes = [e for e in events if e.op == "s"]
        assert changes, "no schema-change event in the topic of person"
        assert {int(e.env["partitions"]) for e in changes} == {partitions}, changes[0].env
        by_partition: dict[int, list[dict[str, Any]]] = {}
        for e in changes:
            by_partition.setdefault(e.partition, []).append(
                {k: v for k, v in e.env["schema_change"].items() if v and k != "added"}
                | {"added": [a["name"] for a in e.env["schema_change"]["added"]]}
            )
        expected = [
            {"added": ["score"]},
            {"added": ["token"]},
            {"renamed": [{"from": "score", "to": "points"}], "added": []},
            {"dropped": ["legacy"], "added": []},
            {"retyped": [{"name": "points", "from": "integer", "to": "bigint"}], "added": []},
        ]
        for p in range(partitions):
            got = [{k: v for k, v in c.items() if k != "rewritten"} for c in by_partition.get(p, [])]
            assert got == expected, f"partition {p}: {by_partition.get(p)}"
        reader.assert_valid()


def test_columns_added_with_a_constant_and_a_volatile_default_end_equal(
    stack: Stack, dbs: Databases, topic_prefix: str
) -> None:
    with reaped_on_failure():
        pipeline = streaming(dbs, topic_prefix)
        alter(dbs, pipeline, "ALTER TABLE person ADD COLUMN score int NOT NULL DEFAULT 5")
        alter(dbs, pipeline, "ALTER TABLE person ADD COLUMN token uuid DEFAULT gen_random_uuid()")
        settle(dbs, pipeline)
        assert_same_on_source_columns(dbs)
        assert column_of(dbs.target_dsn, "person", "score") == (True, "5")
        assert nulls(dbs.target_dsn, PERSON, "token") == nulls(dbs.source_dsn, PERSON, "token") == 0
        finish(pipeline)


DROP_PREPARE = (
    "ALTER TABLE person ADD COLUMN legacy text NOT NULL DEFAULT 'old'",
    "UPDATE person SET legacy = 'legacy ' || id",
    # TOASTed values a key change leaves out of the WAL: cdc-source reads the row back
    f"UPDATE person SET address = {BIG_TEXT} WHERE id % 50 = 0",
)


@pytest.mark.parametrize("mode", ["keep", "drop"])
def test_a_dropped_not_null_column_and_key_changes_after_it(
    stack: Stack, dbs: Databases, topic_prefix: str, mode: str
) -> None:
    with reaped_on_failure():
        pipeline = streaming(dbs, topic_prefix, DROP_PREPARE, sink_extra=("--schema-changes", mode))
        # the key change is the first change of person after the DROP (same transaction)
        moved = changed_rows(
            dbs.source_dsn,
            "ALTER TABLE person DROP COLUMN legacy",
            "UPDATE person SET id = id + 1000000 WHERE id % 100 = 0 AND id < 1000000",
        )
        time.sleep(SETTLE)
        moved += changed_rows(
            dbs.source_dsn, "UPDATE person SET id = id + 1000000 WHERE id % 100 = 50 AND id < 1000000"
        )
        assert moved > 10, moved
        time.sleep(SETTLE)  # the writer changes and deletes the moved rows too (its picks land on them)
        settle(dbs, pipeline)
        assert_same_on_source_columns(dbs)
        names = [n for n, _ in columns_with_types(dbs.target_dsn, PERSON)]
        if mode == "drop":
            assert "legacy" not in names, names
        else:
            assert column_of(dbs.target_dsn, "person", "legacy") == (False, None)
        source_log = pipeline.source.stderr_text()
        assert "does not exist" not in source_log, source_log[-5000:]
        finish(pipeline)


RENAME_PREPARE = (
    "ALTER TABLE person ADD COLUMN nick text NOT NULL DEFAULT 'n'",
    "ALTER TABLE person ADD COLUMN motto text",
    "UPDATE person SET nick = 'nick ' || id, motto = CASE WHEN id % 4 <> 0 THEN 'motto ' || id END",
)


def test_renamed_not_null_and_nullable_columns_keep_their_values(
    stack: Stack, dbs: Databases, topic_prefix: str
) -> None:
    with reaped_on_failure():
        pipeline = streaming(dbs, topic_prefix, RENAME_PREPARE)
        alter(dbs, pipeline, "ALTER TABLE person RENAME COLUMN nick TO handle")
        alter(dbs, pipeline, "ALTER TABLE person RENAME COLUMN motto TO slogan")
        alter(dbs, pipeline, "UPDATE person SET handle = handle || '!', slogan = 'new ' || id WHERE id % 10 = 0")
        settle(dbs, pipeline)
        assert_same_on_source_columns(dbs)
        names = [n for n, _ in columns_with_types(dbs.target_dsn, PERSON)]
        assert "handle" in names and "slogan" in names, names
        assert "nick" not in names and "motto" not in names, names
        assert nulls(dbs.target_dsn, PERSON, "handle") == 0
        assert nulls(dbs.target_dsn, PERSON, "slogan") == nulls(dbs.source_dsn, PERSON, "slogan")
        assert column_of(dbs.target_dsn, "person", "handle")[0], "handle lost its NOT NULL on the target"
        finish(pipeline)


ENUM_PREPARE = (
    "CREATE TYPE mood AS ENUM ('sad', 'ok')",
    "ALTER TABLE person ADD COLUMN mood mood NOT NULL DEFAULT 'ok'",
    "UPDATE person SET mood = 'sad' WHERE id % 2 = 0",
)


def test_enum_values_added_on_the_source_are_added_on_the_target(
    stack: Stack, dbs: Databases, topic_prefix: str
) -> None:
    with reaped_on_failure():
        pipeline = streaming(dbs, topic_prefix, ENUM_PREPARE)
        assert enum_labels_of(dbs.target_dsn, "mood") == ["sad", "ok"]  # created by the sink
        alter(
            dbs,
            pipeline,
            "ALTER TYPE mood ADD VALUE 'great'",
            "ALTER TYPE mood ADD VALUE 'meh' BEFORE 'ok'",
            "UPDATE person SET mood = 'great' WHERE id % 5 = 0",
            "UPDATE person SET mood = 'meh' WHERE id % 5 = 1",
        )
        settle(dbs, pipeline)
        assert_same_on_source_columns(dbs)
        assert enum_labels_of(dbs.target_dsn, "mood") == ["sad", "meh", "ok", "great"]
        stderr = pipeline.sink.stderr_text()
        assert "invalid input value" not in stderr, stderr[-5000:]
        finish(pipeline)


TYPES_PREPARE = (
    "CREATE SCHEMA kinds",
    "CREATE TYPE kinds.mood AS ENUM ('sad', 'it''s \"ok\"')",
    "CREATE DOMAIN kinds.posint AS integer CHECK (VALUE > 0)",
    "CREATE TYPE kinds.pair AS (n integer, label text, m kinds.mood)",
    "ALTER TABLE person ADD COLUMN grade kinds.posint NOT NULL DEFAULT 1",
    "ALTER TABLE person ADD COLUMN feeling kinds.mood",
    "ALTER TABLE person ADD COLUMN spot kinds.pair",
    "UPDATE person SET grade = id % 9 + 1, feeling = 'sad', spot = ROW(id, 'p, \"' || id, 'sad')::kinds.pair "
    "WHERE id % 3 = 0",
)


def test_columns_of_a_domain_an_enum_and_a_composite_the_target_lacks(
    stack: Stack, dbs: Databases, topic_prefix: str
) -> None:
    with reaped_on_failure():
        pipeline = streaming(dbs, topic_prefix, TYPES_PREPARE)
        alter(
            dbs,
            pipeline,
            "UPDATE person SET grade = 7, feeling = 'it''s \"ok\"', spot = ROW(-id, NULL, 'it''s \"ok\"')::kinds.pair "
            "WHERE id % 7 = 0",
        )
        settle(dbs, pipeline)
        assert_same_on_source_columns(dbs)
        types = dict(columns_with_types(dbs.target_dsn, PERSON))
        assert (types["grade"], types["feeling"], types["spot"]) == ("kinds.posint", "kinds.mood", "kinds.pair")
        assert enum_labels_of(dbs.target_dsn, "kinds.mood") == ["sad", 'it\'s "ok"']
        check = "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE contypid = 'kinds.posint'::regtype"
        assert psql_rows(dbs.target_dsn, check) == psql_rows(dbs.source_dsn, check)
        fields = (
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = 'kinds.pair'::regclass ORDER BY attnum"
        )
        assert psql_rows(dbs.target_dsn, fields) == psql_rows(dbs.source_dsn, fields)
        finish(pipeline)


def test_a_narrowing_type_change_stops_the_sink_with_the_statement_to_run(
    stack: Stack, dbs: Databases, topic_prefix: str
) -> None:
    with reaped_on_failure():
        pipeline = streaming(dbs, topic_prefix, ("ALTER TABLE person ADD COLUMN code bigint NOT NULL DEFAULT 7",))
        execute(dbs.source_dsn, "ALTER TABLE person ALTER COLUMN code TYPE integer")
        sink = pipeline.sink
        wait_until(lambda: sink.poll() is not None, timeout=90, message="the sink did not stop on the narrowing")
        result = subprocess.CompletedProcess(sink.args, sink.returncode, sink.stdout_text(), sink.stderr_text())
        line = error_line("cdc-sink", result, alone=False)
        assert "public.person" in line and "code" in line, line
        assert "bigint -> integer" in line, line
        assert "ALTER TABLE public.person ALTER COLUMN code TYPE integer" in line, line
        assert dict(columns_with_types(dbs.target_dsn, PERSON))["code"] == "bigint"  # nothing applied
        stop_cleanly(pipeline.writer)
        stop_source(pipeline.source)
