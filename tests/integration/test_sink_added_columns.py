"""Columns the source adds with a default while streaming, against the real stack: the rows no event
has written since the ALTER get on the target what they hold on the source, from PostgreSQL's fast
default (a constant, now() at the ALTER, carried by the schema-change event) or, for a volatile
default, from the snapshot the source takes of the table it saw rewritten. With --schema-changes
none the sink reads the source's catalog itself and asks the source's connector for that snapshot;
without access to the source it says how to fix the rows."""

import time

from psycopg2 import sql
from psycopg2.extensions import make_dsn

from pg_kafka_cdc.common.catalog import read_table
from pg_kafka_cdc.common.pg import connect_source, connect_target
from pg_kafka_cdc.common.tables import TableName
from sink_connector.target import create_from_source
from tests.conftest import Databases, Stack
from tests.helpers import CliProcess, psql_rows, run_cli, wait_until
from tests.pipeline import (
    WRITER_TABLES,
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
from tests.sink_runs import target_count
from tests.source_events import new_slot, stop_source

TABLES = ",".join(WRITER_TABLES)

# A column's default and NOT NULL on a server.
_COLUMN = """
SELECT a.attnotnull, pg_get_expr(d.adbin, d.adrelid)
FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = %s::regclass AND a.attname = %s
"""


def column_of(dsn: str, table: str, column: str) -> tuple[bool, str | None]:
    [(not_null, default)] = psql_rows(dsn, _COLUMN, (table, column))
    return bool(not_null), default


def rows_before(dbs: Databases) -> int:
    """Fill the writer's tables with rows that exist before any ALTER (their events lack the columns)."""
    run_writer(dbs, "--count", "6000", "--rate", "0", "--batch", "50")
    [(rows,)] = psql_rows(dbs.source_dsn, "SELECT count(*) FROM person")
    assert rows > 1000, rows
    return int(rows)


def streaming_under_load(dbs: Databases, topic_prefix: str) -> tuple[str, str, CliProcess, CliProcess, CliProcess]:
    """Rows from before any ALTER, then source and sink streaming them under the writer at 500/s,
    once the bulk copy is done: (slot, group, source, sink, writer)."""
    rows = rows_before(dbs)
    slot, group = new_slot(), f"g-{topic_prefix}"
    source = start_source(dbs, topic_prefix, slot, "--tables", TABLES, streaming=True)
    sink = start_sink(dbs, topic_prefix, slot, group)
    writer = start_writer(dbs, "--rate", "500", "--batch", "5")
    wait_until(lambda: target_count(dbs, "public.person") >= rows, timeout=120, message="the copy never ended")
    time.sleep(1)
    return slot, group, source, sink, writer


def test_columns_added_with_a_constant_or_a_now_default_read_the_sources_value_in_every_target_row(
    stack: Stack, dbs: Databases, topic_prefix: str
) -> None:
    slot, group, source, sink, writer = streaming_under_load(dbs, topic_prefix)
    execute(dbs.source_dsn, "ALTER TABLE person ADD COLUMN score int NOT NULL DEFAULT 5")
    time.sleep(1)
    execute(dbs.source_dsn, "ALTER TABLE person ADD COLUMN noted timestamptz DEFAULT now()")
    time.sleep(2)
    stop_cleanly(writer)
    wait_identical(dbs, WRITER_TABLES, processes=[source, sink], timeout=120)
    assert_same_rows(dbs, WRITER_TABLES)  # row by row, every column as text

    # the rows from before the ALTERs, which no event wrote since, hold the ALTER's values
    [(alter_time,)] = psql_rows(
        dbs.source_dsn,
        "SELECT (attmissingval::text::timestamptz[])[1] FROM pg_attribute "
        "WHERE attrelid = 'person'::regclass AND attname = 'noted'",
    )
    [(untouched,)] = psql_rows(
        dbs.target_dsn, "SELECT count(*) FROM person WHERE score = 5 AND noted = %s", (alter_time,)
    )
    assert untouched > 500, untouched
    assert column_of(dbs.target_dsn, "person", "score") == (True, "5")
    not_null, default = column_of(dbs.target_dsn, "person", "noted")
    assert not not_null and default is not None and default.endswith("::timestamp with time zone"), default
    stderr = sink.stderr_text()
    assert "added column score integer to public.person, NOT NULL as on the source, and with the value" in stderr
    assert "re-read" not in stderr and "without reading the source" not in stderr, stderr

    stop_cleanly(sink)
    # replayed from the topic: the inserts from before the ALTERs lack the columns and get the defaults
    result = run_sink(
        dbs, topic_prefix, slot, group, "rebuild", "--tables", "public.person", "--once", timeout=180
    )
    assert result.returncode == 0, result.stderr
    assert_same_rows(dbs, ["public.person"])
    # and into a table the replay creates from the events, whose columns come later
    execute(dbs.target_dsn, "DROP TABLE person")
    result = run_sink(
        dbs, topic_prefix, slot, group, "rebuild", "--tables", "public.person", "--once", timeout=180
    )
    assert result.returncode == 0, result.stderr
    assert_same_rows(dbs, ["public.person"])
    stop_source(source)


def test_a_column_added_with_a_volatile_default_is_snapshotted_by_the_source_that_saw_the_rewrite(
    stack: Stack, dbs: Databases, topic_prefix: str
) -> None:
    _, _, source, sink, writer = streaming_under_load(dbs, topic_prefix)
    execute(dbs.source_dsn, "ALTER TABLE person ADD COLUMN token uuid DEFAULT gen_random_uuid()")
    wait_for_output(
        source,
        "public.person was rewritten (its storage changed) with a schema change: asking for a snapshot of it",
    )
    wait_for_output(
        sink,
        "added column token uuid to public.person, nullable: the source re-reads the table it rewrote",
    )
    wait_for_output(source, "snapshot of public.person done", timeout=180)
    time.sleep(1)
    stop_cleanly(writer)
    wait_identical(dbs, WRITER_TABLES, processes=[source, sink], timeout=120)
    assert_same_rows(dbs, WRITER_TABLES)
    assert column_of(dbs.target_dsn, "person", "token") == (False, None)
    assert "to re-read public.person" not in sink.stderr_text(), "the sink does not ask a second time"
    assert source.stderr_text().count("asking for a snapshot of it") == 1
    stop_cleanly(sink)
    stop_source(source)


def test_without_the_source_the_sink_adds_the_column_and_names_the_command_that_fixes_its_rows(
    stack: Stack, dbs: Databases, topic_prefix: str
) -> None:
    execute(
        dbs.source_dsn,
        "CREATE TABLE t (id int PRIMARY KEY, v text)",
        "INSERT INTO t SELECT g, 'v' FROM generate_series(1, 100) g",
    )
    slot, group = new_slot(), f"g-{topic_prefix}"
    source = start_source(dbs, topic_prefix, slot, "--tables", "public.t", streaming=True)
    # filled from the topic, so that it needs the source for nothing else
    unreachable = "postgresql://postgres:postgres@127.0.0.1:1/nowhere"
    sink = start_sink(
        dbs,
        topic_prefix,
        slot,
        group,
        "--snapshot",
        "topic",
        "--source-dsn",
        unreachable,
        "--schema-changes",
        "none",
    )
    wait_until(lambda: target_count(dbs, "public.t") == 100, timeout=120, message="the table never filled")
    execute(dbs.source_dsn, "ALTER TABLE t ADD COLUMN c int DEFAULT 5", "UPDATE t SET v = 'w' WHERE id = 1")
    command = f"cdc-source snapshot --slot {slot} --tables public.t"
    wait_for_output(sink, f"run `{command}` to fix them")
    warnings = [line for line in sink.stderr_text().splitlines() if "without reading the source" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0], warnings
    assert "added column c to public.t without reading the source (cannot connect" in warnings[0], warnings
    assert "postgres:postgres" not in sink.stderr_text()
    [(nulls,)] = psql_rows(dbs.target_dsn, "SELECT count(*) FROM t WHERE c IS NULL")
    assert nulls == 99  # as the line says

    asked = run_cli(source_args(dbs, topic_prefix, slot, "snapshot", "--tables", "public.t"), timeout=60)
    assert asked.returncode == 0, asked.stderr
    wait_for_output(source, "snapshot of public.t done")
    time.sleep(1)  # applied by the sink (cdc-verify asks to run again when rows change under it)
    wait_identical(dbs, ["public.t"], processes=[source, sink], timeout=120)
    stop_cleanly(sink)
    stop_source(source)


def test_a_refused_snapshot_request_names_the_command_that_fixes_the_rows(
    stack: Stack, dbs: Databases, topic_prefix: str
) -> None:
    role = f"{dbs.name}_reader"
    execute(
        dbs.source_dsn,
        "CREATE TABLE t (id int PRIMARY KEY, v text)",
        "INSERT INTO t SELECT g, 'v' FROM generate_series(1, 100) g",
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'reader'").format(sql.Identifier(role)),
        sql.SQL("GRANT SELECT ON t TO {}").format(sql.Identifier(role)),
        # in this database only: the sink's source role may read, not write to the WAL
        "REVOKE EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) FROM PUBLIC",
    )
    try:
        slot, group = new_slot(), f"g-{topic_prefix}"
        source = start_source(dbs, topic_prefix, slot, "--tables", "public.t", streaming=True)
        reader = make_dsn(dbs.source_dsn, user=role, password="reader")
        sink = start_sink(
            dbs,
            topic_prefix,
            slot,
            group,
            "--snapshot",
            "topic",
            "--source-dsn",
            reader,
            "--schema-changes",
            "none",
        )
        wait_until(lambda: target_count(dbs, "public.t") == 100, timeout=120, message="the table never filled")
        execute(
            dbs.source_dsn,
            "ALTER TABLE t ADD COLUMN token uuid DEFAULT gen_random_uuid()",
            "UPDATE t SET v = 'w' WHERE id = 1",
        )
        command = f"cdc-source snapshot --slot {slot} --tables public.t"
        wait_for_output(sink, f"until `{command}` is run, the target's rows not changed since read NULL there")
        [line] = [line for line in sink.stderr_text().splitlines() if "could not ask for a snapshot" in line]
        assert "WARNING" in line and "column token of public.t" in line, line
        assert "permission denied for function pg_logical_emit_message" in line, line
        assert "password=reader" not in sink.stderr_text()
        asked = run_cli(source_args(dbs, topic_prefix, slot, "snapshot", "--tables", "public.t"), timeout=60)
        assert asked.returncode == 0, asked.stderr
        wait_for_output(source, "snapshot of public.t done")
        time.sleep(1)
        wait_identical(dbs, ["public.t"], processes=[source, sink], timeout=120)
        stop_cleanly(sink)
        stop_source(source)
    finally:
        execute(dbs.source_dsn, sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        execute(dbs.source_dsn, sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def created_from_source(dbs: Databases, table: TableName) -> None:
    """What the sink does with a table the target lacks: CREATE TABLE from the source's catalog."""
    source = connect_source(dbs.source_dsn, application_name="test")
    target = connect_target(dbs.target_dsn, application_name="test", autocommit=False)
    try:
        definition = read_table(source, table)
        assert definition is not None
        create_from_source(source, target, definition)
        target.commit()
    finally:
        source.close()
        target.close()


def test_a_table_created_from_the_source_catalog_gets_the_missing_values_as_defaults(
    stack: Stack, dbs: Databases
) -> None:
    execute(
        dbs.source_dsn,
        "CREATE TABLE t (id int PRIMARY KEY)",
        "INSERT INTO t VALUES (1), (2)",
        "ALTER TABLE t ADD COLUMN label text NOT NULL DEFAULT 'a,b \"q\" \\ {x}'",
        "ALTER TABLE t ADD COLUMN box box DEFAULT '((0,0),(1,1))'",
        "ALTER TABLE t ADD COLUMN at timestamptz DEFAULT now()",
        "ALTER TABLE t ADD COLUMN plain int",
        "ALTER TABLE t ADD COLUMN later int",
        "ALTER TABLE t ALTER COLUMN later SET DEFAULT 7",  # no missing value: the rows hold NULL
        separately=True,
    )
    created_from_source(dbs, TableName("public", "t"))
    execute(dbs.target_dsn, "INSERT INTO t (id) VALUES (1), (2)")  # as inserts replayed from before the ALTERs
    assert_same_rows(dbs, ["public.t"])
    assert column_of(dbs.target_dsn, "t", "label") == (True, "'a,b \"q\" \\ {x}'::text")
    assert column_of(dbs.target_dsn, "t", "plain") == (False, None)
    assert column_of(dbs.target_dsn, "t", "later") == (False, None)
    [(default,)] = psql_rows(
        dbs.target_dsn,
        "SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef WHERE adrelid = 't'::regclass AND adnum = 4",
    )
    assert default.endswith("::timestamp with time zone"), default


def test_a_table_created_from_the_source_stores_its_columns_as_the_source_does(dbs: Databases) -> None:
    execute(
        dbs.source_dsn,
        "CREATE TABLE stored (id int PRIMARY KEY, pad text, doc jsonb, note text, n numeric)",
        "ALTER TABLE stored ALTER COLUMN pad SET STORAGE PLAIN",
        "ALTER TABLE stored ALTER COLUMN doc SET STORAGE EXTERNAL",
        "ALTER TABLE stored ALTER COLUMN n SET STORAGE EXTENDED",  # numeric's own default is MAIN
        separately=True,
    )
    created_from_source(dbs, TableName("public", "stored"))
    query = "SELECT attname, attstorage FROM pg_attribute WHERE attrelid = 'stored'::regclass AND attnum > 0"
    assert psql_rows(dbs.target_dsn, query) == psql_rows(dbs.source_dsn, query)
    assert dict(psql_rows(dbs.target_dsn, query)) == {"id": "p", "pad": "p", "doc": "e", "note": "x", "n": "x"}
