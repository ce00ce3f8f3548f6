"""A fault of timing rather than of a service: a transaction whose commit is in the WAL (so logical
decoding hands it to cdc-source) but not yet visible to other sessions. PostgreSQL makes a commit
visible only after its WAL is flushed, and after the wait for synchronous standbys; the scenarios'
workload meets this window now and then, and a source with synchronous replication widens it to the
standby's round trip. Here the window is held open: the
private source cluster names a synchronous standby that never connects, the transaction asks for
synchronous commit, and the test cancels the wait once cdc-source says it is waiting for it: the
read-back of the unchanged TOASTed column must happen in a snapshot that sees the key change."""

import threading
import uuid
from collections.abc import Callable

import psycopg2

from tests.conftest import Databases, Stack
from tests.faults.harness import (
    Pipeline,
    ScenarioReport,
    check_writes,
    compare_rows,
    describe_events,
    key_events,
    prepare_tables,
    wait_applied_all,
    wait_published,
)
from tests.helpers import psql_rows
from tests.pg_cluster import PgCluster
from tests.pipeline import execute, stop_cleanly, wait_for_output

BIG_NOTE = (
    "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 700))"  # ~22 kB, stored out of line
)


def test_key_change_of_a_toasted_row_decoded_before_it_is_visible(
    stack: Stack, topic_prefix: str, pg_cluster: Callable[..., PgCluster], report: ScenarioReport
) -> None:
    source_pg = pg_cluster("source")
    source_dsn = source_pg.create_database("faults")
    # A synchronous standby that never connects; only transactions that ask for it wait for it.
    execute(source_pg.admin_dsn, "ALTER DATABASE faults SET synchronous_commit = local")
    for statement in (
        "ALTER SYSTEM SET synchronous_standby_names = 'faults_never_connects'",
        "SELECT pg_reload_conf()",
    ):
        psql_rows(source_pg.admin_dsn, statement)
    target_pg = pg_cluster("target")
    dbs = Databases("faults", source_dsn, target_pg.create_database("faults"))
    pipeline = Pipeline(dbs, stack.bootstrap_servers, topic_prefix)
    prepare_tables(dbs.source_dsn, dbs.target_dsn)
    old, new = str(uuid.uuid4()), str(uuid.uuid4())
    execute(
        dbs.source_dsn,
        "INSERT INTO public.person (id, first_name, last_name, email) VALUES (1, 'Ada', 'L', 'ada@example.org')",
        "INSERT INTO public.orders (id, person_id, amount, currency, status, items, note) "
        f"VALUES ('{old}', 1, 10, 'EUR', 'new', '[]', {BIG_NOTE})",
    )
    source = pipeline.start_source()
    wait_for_output(source, "streaming from slot")
    sink = pipeline.start_sink()
    wait_applied_all(pipeline, [source, sink])

    # The key change commits locally, then waits for the standby: decoded, but not yet visible.
    conn = psycopg2.connect(dbs.source_dsn, connect_timeout=10)
    pid = conn.get_backend_pid()
    errors: list[BaseException] = []

    def key_change() -> None:
        try:
            with conn, conn.cursor() as cur:
                cur.execute("SET LOCAL synchronous_commit = on")
                cur.execute(f"UPDATE public.orders SET id = '{new}', status = 'paid' WHERE id = '{old}'")
        except BaseException as exc:  # the cancelled wait is only a warning; anything else is reported
            errors.append(exc)

    thread = threading.Thread(target=key_change, daemon=True)
    thread.start()
    try:
        # cdc-source decodes the commit, then waits for it to become visible before reading the
        # row back: nothing of the key change may be published meanwhile.
        wait_for_output(source, "is decoded but not visible", timeout=60)
        assert not key_events(pipeline, "public.orders", {new})[new], "published before it was visible"
        report.add("commit decoded before it is visible (synchronous standby wait)", down=10.0)
    finally:
        psql_rows(source_pg.admin_dsn, "SELECT pg_cancel_backend(%s)", (pid,))  # commits locally, visible now
        thread.join(30)
        conn.close()
    assert not errors, errors
    assert psql_rows(
        dbs.source_dsn, "SELECT count(*) FROM public.orders WHERE id = %s AND note IS NOT NULL", (new,)
    ) == [(1,)]

    wait_published(pipeline, [source, sink])
    wait_applied_all(pipeline, [source, sink])
    stop_cleanly(sink, source)
    differences = compare_rows(dbs, ["public.orders"])
    report.rows_lost = len(differences)
    failures = check_writes(pipeline, report)
    assert not differences, "\n".join(
        [d.describe() for d in differences] + describe_events(key_events(pipeline, "public.orders", {new})[new])
    )
    assert not failures, "\n\n".join(failures)
