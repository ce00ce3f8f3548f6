"""--tables patterns and --exclude-tables against the real stack: the default scope takes every
non-system schema and leaves UNLOGGED tables out; a pattern with an exclusion publishes only the
tables it selects, a table created while streaming included; the sink's pattern subscription takes
only the matching topics; `cdc-sink rebuild` refuses a pattern."""

import re

from tests.conftest import Databases, Stack, admin_client
from tests.helpers import psql_rows, run_cli, wait_until
from tests.pipeline import (
    assert_same_rows,
    error_line,
    execute,
    sink_args,
    start_sink,
    start_source,
    stop_cleanly,
    stored_offsets,
    wait_identical,
)
from tests.source_events import EventReader, count, new_slot, on

TABLES = (
    "CREATE SCHEMA sales",
    "CREATE TABLE sales.orders (id int PRIMARY KEY, total numeric(10,2))",
    "CREATE TABLE sales.secret (id int PRIMARY KEY, code text)",
    "CREATE TABLE public.item (id int PRIMARY KEY, label text)",
    "INSERT INTO sales.orders SELECT g, g * 1.5 FROM generate_series(1, 20) g",
    "INSERT INTO sales.secret SELECT g, 'code ' || g FROM generate_series(1, 5) g",
    "INSERT INTO public.item SELECT g, 'item ' || g FROM generate_series(1, 10) g",
)


def change_topics(stack: Stack, prefix: str) -> set[str]:
    """The change topics of `prefix` (its state topic left out)."""
    topics = admin_client(stack.bootstrap_servers).list_topics(timeout=10).topics
    return {t for t in topics if t.startswith(prefix + ".") and not t.startswith(prefix + "._")}


def target_tables(dbs: Databases) -> set[str]:
    rows = psql_rows(
        dbs.target_dsn,
        "SELECT schemaname || '.' || tablename FROM pg_tables WHERE schemaname NOT IN "
        "('pg_catalog', 'information_schema', 'cdc_sink')",
    )
    return {r[0] for r in rows}


def test_the_default_scope_takes_every_schema_but_unlogged_tables(
    stack: Stack, dbs: Databases, topic_prefix: str, reader: EventReader
) -> None:
    execute(
        dbs.source_dsn,
        *TABLES,
        "CREATE UNLOGGED TABLE sales.scratch (id int PRIMARY KEY)",
        "CREATE SCHEMA cdc_sink",  # a source that is some sink's target too: its bookkeeping stays out
        "CREATE TABLE cdc_sink.offsets (id int PRIMARY KEY)",
        separately=True,
    )
    source = start_source(dbs, topic_prefix, new_slot(), streaming=True)
    execute(
        dbs.source_dsn,
        "INSERT INTO sales.orders VALUES (21, 1.25)",
        "INSERT INTO public.item VALUES (11, 'streamed')",
        "INSERT INTO sales.scratch VALUES (1)",
        "INSERT INTO cdc_sink.offsets VALUES (1)",
        separately=True,
    )
    orders, items, secret = (
        f"{topic_prefix}.sales.orders",
        f"{topic_prefix}.public.item",
        f"{topic_prefix}.sales.secret",
    )
    events = reader.wait_then_stop(
        [orders, items, secret],
        lambda ev: count(orders, 21)(ev) and count(items, 11)(ev),
        "the snapshot and the streamed rows",
        source,
    )
    assert change_topics(stack, topic_prefix) == {orders, items, secret}
    assert [e.op for e in on(events, orders)] == ["r"] * 20 + ["c"]
    assert len(on(events, secret)) == 5
    log = source.stderr_text()
    assert "replicating 3 tables of" in log and "public.item, sales.orders, sales.secret" in log, log
    warnings = [line for line in log.splitlines() if "scratch" in line]
    assert len(warnings) == 1, warnings
    assert re.search(
        r"table sales\.scratch is UNLOGGED.*ALTER TABLE sales\.scratch SET LOGGED.*left out", warnings[0]
    )
    assert "cdc_sink" not in log
    reader.assert_valid()


def test_a_pattern_with_an_exclusion_follows_a_table_created_while_streaming(
    stack: Stack, dbs: Databases, topic_prefix: str, reader: EventReader
) -> None:
    execute(dbs.source_dsn, *TABLES, separately=True)
    scope = ("--tables", "sales.*", "--exclude-tables", "sales.secret")
    slot, group = new_slot(), f"g-{topic_prefix}"
    source = start_source(dbs, topic_prefix, slot, *scope, streaming=True)
    sink = start_sink(dbs, topic_prefix, slot, group, *scope)
    execute(
        dbs.source_dsn,
        "UPDATE sales.orders SET total = total + 1 WHERE id % 3 = 0",
        "DELETE FROM sales.orders WHERE id % 7 = 0",
        "INSERT INTO sales.secret VALUES (6, 'never published')",
        "INSERT INTO public.item VALUES (11, 'never published')",
        "CREATE TABLE sales.later (id int PRIMARY KEY, note text)",
        "INSERT INTO sales.later SELECT g, 'later ' || g FROM generate_series(1, 15) g",
        "BEGIN; UPDATE sales.later SET note = 'changed' WHERE id <= 5; DELETE FROM sales.later WHERE id > 12; "
        "INSERT INTO sales.orders VALUES (100, 9.99); COMMIT",
        separately=True,
    )
    orders, later = f"{topic_prefix}.sales.orders", f"{topic_prefix}.sales.later"
    wait_identical(dbs, ["sales.orders", "sales.later"], processes=(source, sink))
    assert_same_rows(dbs, ["sales.orders", "sales.later"])
    assert psql_rows(
        dbs.target_dsn, "SELECT count(*), count(*) FILTER (WHERE note = 'changed') FROM sales.later"
    ) == [(12, 5)]
    stop_cleanly(sink, source)

    assert change_topics(stack, topic_prefix) == {orders, later}, "the excluded and unmatched tables have no topic"
    assert target_tables(dbs) == {"sales.orders", "sales.later"}
    events = reader.read([later])
    assert [e.op for e in events if e.value is not None][:15] == ["c"] * 15, "the new table's rows, from its first"
    log = source.stderr_text()
    assert "table sales.later is new and in scope" in log, log
    assert "replicating 1 tables of" in log and ": sales.orders" in log, log
    assert {t for t, _ in stored_offsets(dbs, group)} == {orders, later}
    reader.assert_valid()

    # Restarted, the source knows its topic holds the table from its first row: no snapshot of it.
    source = start_source(dbs, topic_prefix, slot, *scope, streaming=True)
    # Its topic alone rebuilds it.
    result = run_cli(sink_args(dbs, topic_prefix, slot, group, "rebuild", "--tables", "sales.later", "--once"))
    assert result.returncode == 0, result.stderr
    wait_identical(dbs, ["sales.later"], processes=(source,))
    assert "is new in the scope" not in source.stderr_text(), source.stderr_text()
    stop_cleanly(source)


def test_the_sink_subscribes_to_the_topics_a_pattern_matches(
    stack: Stack, dbs: Databases, topic_prefix: str
) -> None:
    execute(dbs.source_dsn, *TABLES, separately=True)
    slot, group = new_slot(), f"g-{topic_prefix}"
    source = start_source(dbs, topic_prefix, slot, streaming=True)  # every table: four topics
    sink = start_sink(dbs, topic_prefix, slot, group, "--tables", "sales.*", "--exclude-tables", "sales.secret")
    execute(
        dbs.source_dsn,
        "INSERT INTO sales.orders VALUES (21, 2.5)",
        "INSERT INTO sales.secret VALUES (6, 'x')",
        "INSERT INTO public.item VALUES (11, 'x')",
        "CREATE TABLE sales.later (id int PRIMARY KEY)",
        "INSERT INTO sales.later SELECT generate_series(1, 3)",
        separately=True,
    )
    orders, later = f"{topic_prefix}.sales.orders", f"{topic_prefix}.sales.later"
    wait_identical(dbs, ["sales.orders", "sales.later"], processes=(source, sink))
    wait_until(
        lambda: {t for t, _ in stored_offsets(dbs, group)} >= {orders, later},
        timeout=60,
        message="the sink never stored offsets of both matching topics",
    )
    stop_cleanly(sink, source)
    assert {f"{topic_prefix}.sales.secret", f"{topic_prefix}.public.item", orders, later} <= change_topics(
        stack, topic_prefix
    )
    assert {t for t, _ in stored_offsets(dbs, group)} == {orders, later}
    assert target_tables(dbs) == {"sales.orders", "sales.later"}
    consuming = [line for line in sink.stderr_text().splitlines() if "consuming ^" in line]
    assert len(consuming) == 1 and f"consuming ^{topic_prefix}\\." in consuming[0], consuming


def test_rebuild_refuses_a_pattern(dbs: Databases, topic_prefix: str) -> None:
    result = run_cli(sink_args(dbs, topic_prefix, new_slot(), "g", "rebuild", "--tables", "public.a,sales.*"))
    assert error_line("cdc-sink", result) == (
        "cdc-sink rebuild needs exact table names in --tables / TABLES, not the pattern sales.*: "
        "name each table (schema.table)"
    )
