"""User-defined types on the target, against the real source and target servers: created from the
source's catalog (enums, domains, composites, ranges, arrays of them, dependencies first) equal to
the source's as the catalog describes them, values of each round-tripping as text; enum values the
source added since, added at the same place in the order; the types the sink cannot create refused
with one line."""

from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
from psycopg2 import sql

from pg_kafka_cdc.common.catalog import read_table
from pg_kafka_cdc.common.errors import SinkError
from pg_kafka_cdc.common.pg import connect_source, connect_target
from pg_kafka_cdc.common.tables import TableName
from sink_connector.user_types import (
    add_missing_enum_values,
    create_missing_types,
    is_missing_enum_value,
    missing_enum_value_line,
)
from tests.conftest import Databases
from tests.helpers import psql_rows
from tests.pipeline import (
    assert_same_rows,
    execute,
    reaped_on_failure,
    rows_as_text,
    start_sink,
    start_source,
    stop_cleanly,
    wait_identical,
)
from tests.sink_runs import names_of

TABLE = TableName("public", "things")

SOURCE_TYPES = [
    "CREATE SCHEMA kinds",
    """CREATE TYPE kinds.mood AS ENUM ('sad', 'ok', 'it''s "happy"')""",
    "CREATE DOMAIN kinds.good_mood AS kinds.mood DEFAULT 'ok' NOT NULL CHECK (VALUE <> 'sad')",
    "CREATE DOMAIN public.posint AS integer CHECK (VALUE > 0) CONSTRAINT below_million CHECK (VALUE < 1000000)",
    "CREATE DOMAIN public.small_posint AS public.posint CHECK (VALUE < 100)",
    """CREATE DOMAIN public.code AS varchar(8) COLLATE "C" CHECK (VALUE ~ '^[A-Z]')""",
    "ALTER DOMAIN public.code ADD CONSTRAINT not_x CHECK (VALUE <> 'X') NOT VALID",
    """CREATE TYPE public.address AS (street text COLLATE "C", num public.small_posint,
           mood kinds.good_mood, tags kinds.mood[], price numeric(8,2))""",
    "CREATE TYPE public.floatrange AS RANGE (SUBTYPE = float8, SUBTYPE_DIFF = float8mi)",
    """CREATE TYPE public.textrange AS RANGE (SUBTYPE = text, COLLATION = "C",
           MULTIRANGE_TYPE_NAME = public.textranges)""",
    "CREATE TYPE public.patternrange AS RANGE (SUBTYPE = text, SUBTYPE_OPCLASS = text_pattern_ops)",
    "CREATE TYPE public.moodrange AS RANGE (SUBTYPE = kinds.mood)",
    "CREATE DOMAIN public.moods AS kinds.mood[] CHECK (cardinality(VALUE) < 5)",
    "CREATE TYPE kinds.level AS ENUM ('low', 'high')",
    "CREATE DOMAIN kinds.level_d AS kinds.level",
    'CREATE SCHEMA "Odd Schema"',
    """CREATE TYPE "Odd Schema"."Mood Type" AS ENUM ('A', 'b c')""",
    'CREATE DOMAIN "Odd Schema"."Über" AS "Odd Schema"."Mood Type"[]',
]

COLUMNS = {
    "id": "integer",
    "m": "kinds.mood",
    "ms": "kinds.mood[]",
    "gm": "kinds.good_mood",
    "p": "public.posint",
    "sp": "public.small_posint",
    "sps": "public.small_posint[]",
    "c": "public.code",
    "a": "public.address",
    "aa": "public.address[]",
    "fr": "public.floatrange",
    "fmr": "public.floatmultirange",
    "tr": "public.textrange",
    "tmr": "public.textranges",
    "pr": "public.patternrange",
    "mr": "public.moodrange",
    "mds": "public.moods",
    "lv": "kinds.level_d",
    "odd": '"Odd Schema"."Mood Type"',
    "uber": '"Odd Schema"."Über"',
}

ROWS: list[dict[str, str | None]] = [
    {
        "id": "1",
        "m": 'it\'s "happy"',
        "ms": '{sad,NULL,"it\'s \\"happy\\""}',
        "gm": "ok",
        "p": "999999",
        "sp": "99",
        "sps": "{1,NULL,99}",
        "c": "ABC",
        "a": '(" Main, St ",7,ok,"{sad,ok}",12.50)',
        "aa": '{"(x,1,ok,{},1.00)",NULL,"(,,ok,,)"}',
        "fr": "[1.5,2.25)",
        "fmr": "{[1,2),[3,4]}",
        "tr": "[B,a)",
        "tmr": "{[B,a)}",
        "pr": "[a,b]",
        "mr": "[sad,ok]",
        "mds": "{ok,sad}",
        "lv": "high",
        "odd": "b c",
        "uber": '{A,"b c"}',
    },
    {"id": "2", "gm": "ok", "fr": "empty", "mr": '(,"it\'s \\"happy\\"")', "a": "(,,ok,,)"},
]

# Every user-defined type of the database (composites standing alone, not tables' row types), as the
# catalog describes it, printed as text under search_path pg_catalog (every name qualified).
DESCRIBE_TYPES = """
SELECT n.nspname, t.typname, t.typtype,
       format_type(t.typbasetype, t.typtypmod), t.typnotnull, pg_get_expr(t.typdefaultbin, 0),
       (SELECT co.collname FROM pg_collation co WHERE co.oid = t.typcollation),
       format_type(t.typarray, NULL),
       (SELECT string_agg(e.enumlabel, ' | ' ORDER BY e.enumsortorder) FROM pg_enum e WHERE e.enumtypid = t.oid),
       (SELECT string_agg(c.conname || ' ' || pg_get_constraintdef(c.oid) || ' ' || c.convalidated::text, ' | '
                          ORDER BY c.conname)
        FROM pg_constraint c WHERE c.contypid = t.oid),
       (SELECT string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || ' '
                          || coalesce(co.collname, '-'), ' | ' ORDER BY a.attnum)
        FROM pg_attribute a LEFT JOIN pg_collation co ON co.oid = a.attcollation
        WHERE a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped),
       (SELECT format_type(r.rngsubtype, NULL) || ' ' || opc.opcname || ' ' || coalesce(co.collname, '-') || ' '
               || r.rngsubdiff::text || ' ' || r.rngcanonical::text || ' ' || format_type(r.rngmultitypid, NULL)
        FROM pg_range r JOIN pg_opclass opc ON opc.oid = r.rngsubopc
        LEFT JOIN pg_collation co ON co.oid = r.rngcollation
        WHERE r.rngtypid = t.oid)
FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
LEFT JOIN pg_class c ON c.oid = t.typrelid
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
  AND t.typtype IN ('e', 'd', 'c', 'r', 'm') AND coalesce(c.relkind, 'c') = 'c'
ORDER BY 1, 2
"""


def describe_types(dsn: str) -> list[tuple[Any, ...]]:
    conn = psycopg2.connect(dsn, connect_timeout=10, options="-c search_path=pg_catalog")
    try:
        with conn.cursor() as cur:
            cur.execute(DESCRIBE_TYPES)
            return list(cur.fetchall())
    finally:
        conn.close()


def labels(dsn: str, type_name: str) -> list[str]:
    return [
        r[0]
        for r in psql_rows(
            dsn, "SELECT enumlabel FROM pg_enum WHERE enumtypid = %s::regtype ORDER BY enumsortorder", (type_name,)
        )
    ]


@pytest.fixture
def conns(dbs: Databases) -> Iterator[tuple[Any, Any]]:
    """The pipeline's kind of connections: the source's autocommit, the target's in a transaction."""
    source = connect_source(dbs.source_dsn, application_name="test-user-types")
    target = connect_target(dbs.target_dsn, application_name="test-user-types", autocommit=False)
    try:
        yield source, target
    finally:
        source.close()
        target.close()


def create_table_on_source(dbs: Databases, table: TableName, columns: dict[str, str]) -> None:
    execute(
        dbs.source_dsn,
        sql.SQL("CREATE TABLE {} ({}, PRIMARY KEY (id))").format(
            sql.Identifier(table.schema, table.name),
            sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(t)) for n, t in columns.items()),
        ),
    )


def create_like_sink(source: Any, target: Any, table: TableName) -> list[str]:
    """What create_from_source does: the types, then CREATE TABLE with the source's column types."""
    definition = read_table(source, table)
    assert definition is not None
    with target.cursor() as cur:
        created = create_missing_types(source, cur, table, definition.columns)
        cur.execute(
            sql.SQL("CREATE TABLE {} ({}, PRIMARY KEY ({}))").format(
                sql.Identifier(table.schema, table.name),
                sql.SQL(", ").join(
                    sql.SQL("{} {}{}").format(
                        sql.Identifier(c.name), sql.SQL(c.type), sql.SQL(" NOT NULL" if c.not_null else "")
                    )
                    for c in definition.columns
                ),
                sql.SQL(", ").join(map(sql.Identifier, definition.key)),
            )
        )
    target.commit()
    return created


def insert(dsn: str, table: TableName, row: dict[str, str | None]) -> None:
    execute(
        dsn,
        sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
            sql.Identifier(table.schema, table.name),
            sql.SQL(", ").join(map(sql.Identifier, row)),
            sql.SQL(", ").join(sql.Placeholder() * len(row)),
        ),
        params=list(row.values()),
    )


def copy_rows_as_text(dbs: Databases, table: TableName) -> None:
    """Every source row into the target, each value as the source prints it."""
    for row in rows_as_text(dbs.source_dsn, table):
        insert(dbs.target_dsn, table, {k: v for k, v in row.items() if v is not None})


def test_types_created_on_the_target_equal_the_sources(dbs: Databases, conns: tuple[Any, Any]) -> None:
    source, target = conns
    execute(dbs.source_dsn, *SOURCE_TYPES)
    create_table_on_source(dbs, TABLE, COLUMNS)
    for row in ROWS:
        insert(dbs.source_dsn, TABLE, row)

    with source.cursor() as cur:
        cur.execute('SET search_path = public, "$user"')
    created = create_like_sink(source, target, TABLE)
    with source.cursor() as cur:
        cur.execute("SHOW search_path")
        assert cur.fetchone() == ('public, "$user"',)  # the source session's own, restored

    assert describe_types(dbs.target_dsn) == describe_types(dbs.source_dsn)
    assert len(created) == len(set(created))
    assert set(created) == {
        "enum kinds.mood",
        "domain kinds.good_mood",
        "domain public.posint",
        "domain public.small_posint",
        "domain public.code",
        "composite public.address",
        "range public.floatrange",
        "range public.textrange",
        "range public.patternrange",
        "range public.moodrange",
        "domain public.moods",
        "enum kinds.level",
        "domain kinds.level_d",
        'enum "Odd Schema"."Mood Type"',
        'domain "Odd Schema"."Über"',
    }
    # dependencies first
    assert created.index("enum kinds.mood") < created.index("domain kinds.good_mood")
    assert created.index("domain public.posint") < created.index("domain public.small_posint")
    assert created.index("domain public.small_posint") < created.index("composite public.address")
    assert created.index("domain kinds.good_mood") < created.index("composite public.address")

    copy_rows_as_text(dbs, TABLE)
    assert rows_as_text(dbs.target_dsn, TABLE) == rows_as_text(dbs.source_dsn, TABLE)

    # the constraints hold on the target too
    for column, bad in [("sp", "100"), ("p", "0"), ("gm", "sad"), ("c", "abc"), ("mds", "{ok,ok,ok,ok,ok}")]:
        with pytest.raises(psycopg2.errors.CheckViolation):
            insert(dbs.target_dsn, TABLE, {"id": "3", "gm": "ok", column: bad})
    with pytest.raises(psycopg2.errors.NotNullViolation):
        insert(dbs.target_dsn, TABLE, {"id": "3", "gm": None})

    # creating again finds everything there
    with target.cursor() as cur:
        definition = read_table(source, TABLE)
        assert definition is not None
        assert create_missing_types(source, cur, TABLE, definition.columns) == []
    target.rollback()


def test_only_the_missing_types_are_created(dbs: Databases, conns: tuple[Any, Any]) -> None:
    source, target = conns
    execute(dbs.source_dsn, *SOURCE_TYPES[:3])
    create_table_on_source(dbs, TABLE, {"id": "integer", "gm": "kinds.good_mood", "ms": "kinds.mood[]"})
    execute(
        dbs.target_dsn, "CREATE SCHEMA kinds", "CREATE TYPE kinds.mood AS ENUM ('sad', 'ok', 'it''s \"happy\"')"
    )

    assert create_like_sink(source, target, TABLE) == ["domain kinds.good_mood"]
    assert describe_types(dbs.target_dsn) == describe_types(dbs.source_dsn)


def test_a_type_of_an_extension_is_refused_with_the_extension_to_create(
    dbs: Databases, conns: tuple[Any, Any]
) -> None:
    source, target = conns
    execute(
        dbs.source_dsn,
        "CREATE EXTENSION citext",
        "CREATE DOMAIN public.email AS public.citext CHECK (VALUE LIKE '%@%')",
    )
    create_table_on_source(dbs, TABLE, {"id": "integer", "name": "public.citext[]"})
    definition = read_table(source, TABLE)
    assert definition is not None
    with target.cursor() as cur, pytest.raises(SinkError) as raised:
        create_missing_types(source, cur, TABLE, definition.columns)
    target.rollback()
    line = str(raised.value)
    assert "\n" not in line
    assert "column name of public.things has type citext[]" in line
    assert "CREATE EXTENSION citext" in line

    # through a domain: the line names the type the domain needs
    other = TableName("public", "others")
    create_table_on_source(dbs, other, {"id": "integer", "mail": "public.email"})
    definition = read_table(source, other)
    assert definition is not None
    with target.cursor() as cur, pytest.raises(SinkError) as raised:
        create_missing_types(source, cur, other, definition.columns)
    target.rollback()
    assert "column mail of public.others has type email, which needs type public.citext" in str(raised.value)
    assert "CREATE EXTENSION citext" in str(raised.value)

    # once the extension is there, the domain over its type is created
    execute(dbs.target_dsn, "CREATE EXTENSION citext")
    assert create_like_sink(source, target, other) == ["domain public.email"]
    assert describe_types(dbs.target_dsn) == describe_types(dbs.source_dsn)


def test_a_tables_row_type_is_refused(dbs: Databases, conns: tuple[Any, Any]) -> None:
    source, target = conns
    execute(dbs.source_dsn, "CREATE TABLE public.point3 (x int, y int, z int)")
    create_table_on_source(dbs, TABLE, {"id": "integer", "at": "public.point3"})
    definition = read_table(source, TABLE)
    assert definition is not None
    with target.cursor() as cur, pytest.raises(SinkError) as raised:
        create_missing_types(source, cur, TABLE, definition.columns)
    target.rollback()
    assert "column at of public.things has type point3 (the row type of table public.point3)" in str(raised.value)
    assert "create table public.point3 on the target first" in str(raised.value)


def test_a_check_calling_a_function_the_target_lacks_stops_with_one_line(
    dbs: Databases, conns: tuple[Any, Any]
) -> None:
    source, target = conns
    execute(
        dbs.source_dsn,
        "CREATE FUNCTION public.is_even(integer) RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT $1 % 2 = 0'",
        "CREATE DOMAIN public.even AS integer CHECK (public.is_even(VALUE))",
    )
    create_table_on_source(dbs, TABLE, {"id": "integer", "e": "public.even"})
    definition = read_table(source, TABLE)
    assert definition is not None
    with target.cursor() as cur, pytest.raises(SinkError) as raised:
        create_missing_types(source, cur, TABLE, definition.columns)
    target.rollback()
    line = str(raised.value)
    assert "\n" not in line
    assert "column e of public.things has type even, which needs domain public.even" in line
    assert "function public.is_even(integer) does not exist" in line
    assert "pg_dump --schema-only" in line


# --- enum values ---------------------------------------------------------------------------------

ENUM_TYPES = [
    "CREATE SCHEMA kinds",
    "CREATE TYPE kinds.mood AS ENUM ('sad', 'ok', 'happy')",
    "CREATE DOMAIN kinds.good_mood AS kinds.mood CHECK (VALUE <> 'sad')",
    "CREATE TYPE kinds.level AS ENUM ('low', 'high')",
    "CREATE TYPE kinds.pair AS (a kinds.level, b int)",
    "CREATE TYPE kinds.untouched AS ENUM ('x')",
]

ENUM_COLUMNS = {
    "id": "integer",
    "m": "kinds.mood",
    "gm": "kinds.good_mood[]",
    "pr": "kinds.pair",
    "u": "kinds.untouched",
}


def target_columns(dsn: str, table: TableName) -> dict[str, str]:
    """The table's columns as the target's format_type prints them (as TargetTable.columns)."""
    return {
        name: type_name
        for name, type_name in psql_rows(
            dsn,
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            (str(table),),
        )
    }


def test_enum_values_added_on_the_source_are_added_in_the_sources_order(
    dbs: Databases, conns: tuple[Any, Any]
) -> None:
    source, target = conns
    execute(dbs.source_dsn, *ENUM_TYPES)
    create_table_on_source(dbs, TABLE, ENUM_COLUMNS)
    create_like_sink(source, target, TABLE)
    execute(
        dbs.source_dsn,
        "ALTER TYPE kinds.mood ADD VALUE 'ecstatic'",
        "ALTER TYPE kinds.mood ADD VALUE 'meh' BEFORE 'ok'",
        "ALTER TYPE kinds.mood ADD VALUE 'awful' BEFORE 'sad'",
        "ALTER TYPE kinds.mood ADD VALUE 'fine' AFTER 'meh'",
        "ALTER TYPE kinds.level ADD VALUE 'mid' BEFORE 'high'",
        """ALTER TYPE kinds.level ADD VALUE 'it''s "top"'""",
        separately=True,
    )
    insert(dbs.source_dsn, TABLE, {"id": "1", "m": "meh", "gm": "{ecstatic,fine}", "pr": "(mid,1)"})

    # what the sink meets: the value is no label of the target's enum
    with pytest.raises(psycopg2.Error) as raised:
        insert(dbs.target_dsn, TABLE, {"id": "1", "m": "meh"})
    assert is_missing_enum_value(raised.value)
    line = missing_enum_value_line(TABLE, raised.value)
    assert "\n" not in line
    assert "public.things" in line
    assert "ALTER TYPE kinds.mood ADD VALUE 'meh'" in line
    assert "restart the sink" in line

    added = add_missing_enum_values(source, target, TABLE, target_columns(dbs.target_dsn, TABLE))
    assert sorted(added) == sorted(
        [
            "kinds.mood: 'ecstatic'",
            "kinds.mood: 'meh'",
            "kinds.mood: 'awful'",
            "kinds.mood: 'fine'",
            "kinds.level: 'mid'",
            """kinds.level: 'it''s "top"'""",
        ]
    )
    for type_name in ("kinds.mood", "kinds.level", "kinds.untouched"):
        assert labels(dbs.target_dsn, type_name) == labels(dbs.source_dsn, type_name)
    assert labels(dbs.target_dsn, "kinds.mood") == ["awful", "sad", "meh", "fine", "ok", "happy", "ecstatic"]
    # committed: usable from another session, and sorted as on the source
    copy_rows_as_text(dbs, TABLE)
    assert rows_as_text(dbs.target_dsn, TABLE) == rows_as_text(dbs.source_dsn, TABLE)
    order = "SELECT array_agg(v ORDER BY v)::text FROM unnest(enum_range(NULL::kinds.mood)) v"
    assert psql_rows(dbs.target_dsn, order) == psql_rows(dbs.source_dsn, order)

    # nothing left to add
    assert add_missing_enum_values(source, target, TABLE, target_columns(dbs.target_dsn, TABLE)) == []


def test_enum_values_in_another_order_on_the_target_stop_with_one_line(
    dbs: Databases, conns: tuple[Any, Any]
) -> None:
    source, target = conns
    execute(dbs.source_dsn, "CREATE TYPE public.mood AS ENUM ('sad', 'ok', 'happy')")
    execute(dbs.target_dsn, "CREATE TYPE public.mood AS ENUM ('ok', 'sad')")
    create_table_on_source(dbs, TABLE, {"id": "integer", "m": "public.mood"})
    create_like_sink(source, target, TABLE)
    with pytest.raises(SinkError) as raised:
        add_missing_enum_values(source, target, TABLE, target_columns(dbs.target_dsn, TABLE))
    line = str(raised.value)
    assert "\n" not in line
    assert "enum type public.mood of table public.things orders its values differently" in line
    assert labels(dbs.target_dsn, "public.mood") == ["ok", "sad"]
    # the target connection is usable afterwards
    with target.cursor() as cur:
        cur.execute("SELECT 1")
    target.rollback()


def test_an_enum_the_source_lacks_stops_with_one_line(dbs: Databases, conns: tuple[Any, Any]) -> None:
    source, target = conns
    execute(dbs.target_dsn, "CREATE TYPE public.local_mood AS ENUM ('ok')")
    execute(dbs.target_dsn, "CREATE TABLE public.things (id integer PRIMARY KEY, m public.local_mood)")
    with pytest.raises(SinkError) as raised:
        add_missing_enum_values(source, target, TABLE, target_columns(dbs.target_dsn, TABLE))
    line = str(raised.value)
    assert "\n" not in line
    assert "enum type public.local_mood of table public.things" in line
    assert "no enum of that name on the source" in line


# --- end to end ----------------------------------------------------------------------------------


def test_pipeline_creates_the_types_and_adds_enum_values(dbs: Databases, topic_prefix: str) -> None:
    """cdc-sink creating the table from the source (bulk copy) creates every type it uses; an enum value
    the source adds while the pipeline runs is added on the target, and the rows using it arrive.
    (Without the quoted type names: wal2json prints `"type":"Odd Schema"."Mood Type"` in its messages,
    which is no JSON, so cdc-source cannot read changes of such a column.)"""
    slot, group = names_of(dbs, topic_prefix)
    execute(dbs.source_dsn, *(statement for statement in SOURCE_TYPES if "Odd Schema" not in statement))
    plain = {name: type_name for name, type_name in COLUMNS.items() if '"' not in type_name}
    create_table_on_source(dbs, TABLE, plain)
    for row in ROWS:
        insert(dbs.source_dsn, TABLE, {k: v for k, v in row.items() if k in plain})
    with reaped_on_failure():
        source = start_source(dbs, topic_prefix, slot)
        sink = start_sink(dbs, topic_prefix, slot, group, "--snapshot", "copy")
        wait_identical(dbs, [TABLE], processes=(source, sink))
        assert_same_rows(dbs, [TABLE])
        assert describe_types(dbs.target_dsn) == describe_types(dbs.source_dsn)

        execute(
            dbs.source_dsn,
            "ALTER TYPE kinds.mood ADD VALUE 'meh' BEFORE 'ok'",
            "ALTER TYPE kinds.mood ADD VALUE 'ecstatic'",
            "ALTER TYPE kinds.level ADD VALUE 'mid' BEFORE 'high'",
            separately=True,
        )
        insert(
            dbs.source_dsn,
            TABLE,
            {
                "id": "3",
                "m": "meh",
                "ms": "{ecstatic}",
                "gm": "meh",
                "a": "(,,ecstatic,{meh},)",
                "lv": "mid",
            },
        )
        execute(dbs.source_dsn, "UPDATE public.things SET m = 'ecstatic', mr = '[meh,ecstatic)' WHERE id = 1")
        wait_identical(dbs, [TABLE], processes=(source, sink))
        assert_same_rows(dbs, [TABLE])
        assert describe_types(dbs.target_dsn) == describe_types(dbs.source_dsn)
        stop_cleanly(sink, source)
