"""cdc-sink end to end: the kinds of change that are hard to apply: updates that leave a TOASTed
value out, primary-key changes, TRUNCATE, and hostile identifiers."""

import orjson
import pytest
from psycopg2 import sql

from pg_kafka_cdc.common.tables import TableName
from tests.conftest import Databases, Stack
from tests.helpers import psql_rows
from tests.pipeline import (
    BIG_TEXT,
    assert_same_rows,
    execute,
    high_watermark,
    read_all,
    reaped_on_failure,
    start_sink,
    start_source,
    stop_cleanly,
    tables_option,
    wait_applied,
    wait_high_watermark,
    wait_identical,
)
from tests.sink_runs import names_of, topic_of


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
        f"INSERT INTO {table} SELECT g, 0, {BIG_TEXT} FROM generate_series(1, 3) g",  # copied in bulk
    )
    source = start_source(dbs, topic_prefix, slot)
    sink = start_sink(dbs, topic_prefix, slot, group)
    wait_identical(dbs, [table], processes=(source, sink))

    # inserted while streaming, then partial updates, each applied in a batch of its own
    execute(dbs.source_dsn, f"INSERT INTO {table} SELECT g, 0, {BIG_TEXT} FROM generate_series(4, 6) g")
    wait_identical(dbs, [table], processes=(source, sink))
    for n in range(1, 3):
        execute(dbs.source_dsn, f"UPDATE {table} SET small = small + {n}")
        wait_identical(dbs, [table], processes=(source, sink))
    assert_same_rows(dbs, [table])

    # the same kinds of changes piled up while the sink is stopped, so one batch merges them
    stop_cleanly(sink)
    execute(dbs.source_dsn, f"INSERT INTO {table} SELECT g, 0, {BIG_TEXT} FROM generate_series(7, 8) g")
    execute(dbs.source_dsn, f"UPDATE {table} SET small = small + 10 WHERE id IN (1, 7)")
    execute(dbs.source_dsn, f"UPDATE {table} SET small = small + 100 WHERE id IN (1, 2, 7)")
    execute(dbs.source_dsn, f"UPDATE {table} SET big = {BIG_TEXT} WHERE id = 2")
    execute(dbs.source_dsn, f"UPDATE {table} SET small = -1 WHERE id IN (2, 3)")
    execute(dbs.source_dsn, f"INSERT INTO {table} VALUES (9, 0, NULL)")
    execute(dbs.source_dsn, f"UPDATE {table} SET big = {BIG_TEXT} WHERE id = 9")
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
    execute(dbs.source_dsn, f"UPDATE {table} SET id = id + 1000, big = {BIG_TEXT} WHERE id = 1")
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
        f"INSERT INTO {table} SELECT g, 'v' || g, {BIG_TEXT} FROM generate_series(1, 3) g",
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
