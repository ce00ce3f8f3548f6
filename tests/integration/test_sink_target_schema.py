"""cdc-sink end to end on a target with a schema of its own: tables made by `pg_dump --schema-only`
of the source (foreign key, indexes, a stored generated column) plus a user trigger, applied as a
replica (session_replication_role) so neither the foreign key nor the trigger fires; a unique index
of the target only, refused in one line naming it; a role that may not apply as a replica, warned
about at start-up, whose bulk copy a foreign key then stops in one line with the GRANT."""

import subprocess
import uuid
from collections.abc import Iterator

import pytest
from psycopg2 import sql
from psycopg2.extensions import make_dsn

from tests.conftest import Databases, Stack
from tests.helpers import psql_rows
from tests.integration.test_roles import drop_role, run_roles_sql
from tests.pipeline import (
    WRITER_TABLES,
    assert_same_rows,
    clone_table,
    error_line,
    execute,
    run_sink,
    run_writer,
    start_sink,
    start_source,
    start_writer,
    stop_cleanly,
    wait_high_watermark,
    wait_identical,
    wait_while_running,
)
from tests.sink_runs import names_of, target_count, topic_of

PG_DUMP = "/usr/lib/postgresql/15/bin/pg_dump"
NO_REPLICA = "may not set session_replication_role"

# On both sides (the target's from pg_dump): the target computes it, the sink never writes it.
GENERATED = (
    "ALTER TABLE public.person ADD COLUMN full_name text "
    "GENERATED ALWAYS AS (first_name || ' ' || last_name) STORED"
)

# An ordinary user trigger on the target, recording every time it fires.
USER_TRIGGER = (
    "CREATE SCHEMA audit",
    "CREATE TABLE audit.fired (tbl text NOT NULL, op text NOT NULL)",
    """CREATE FUNCTION audit.record() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO audit.fired VALUES (TG_TABLE_NAME, TG_OP);
        RETURN NULL;
    END $$""",
    *(
        f"CREATE TRIGGER record AFTER INSERT OR UPDATE OR DELETE ON {t} FOR EACH ROW EXECUTE FUNCTION audit.record()"
        for t in WRITER_TABLES
    ),
)


def dump_schema(dbs: Databases) -> None:
    """The writer's tables made on the target from `pg_dump --schema-only` of the source."""
    tables = [arg for t in WRITER_TABLES for arg in ("-t", t)]
    dump = subprocess.run(
        [PG_DUMP, "--schema-only", "--no-owner", *tables, "-d", dbs.source_dsn],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    load = subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dbs.target_dsn],
        input=dump.stdout,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert load.returncode == 0, f"loading the dump failed:\n{load.stderr}"


def foreign_keys(dsn: str) -> list[str]:
    return [r[0] for r in psql_rows(dsn, "SELECT conname FROM pg_constraint WHERE contype = 'f' ORDER BY 1")]


def test_a_pg_dump_target_replicates_the_workload_without_firing_its_triggers(
    dbs: Databases, topic_prefix: str
) -> None:
    slot, group = names_of(dbs, topic_prefix)
    run_writer(dbs, "--count", "0")  # creates the writer's tables
    execute(dbs.source_dsn, GENERATED)
    dump_schema(dbs)
    execute(dbs.target_dsn, *USER_TRIGGER)
    assert foreign_keys(dbs.target_dsn) == ["orders_person_id_fkey"]
    # rows for the bulk copy, which fills orders before person (topics in name order)
    run_writer(dbs, "--count", "500", "--rate", "0", "--batch", "10", "--seed", "11")
    source = start_source(dbs, topic_prefix, slot, streaming=True)
    sink = start_sink(dbs, topic_prefix, slot, group)
    writer = start_writer(
        dbs, "--rate", "300", "--batch", "10", "--key-change-ratio", "0.1", "--big-ratio", "0.05", "--seed", "12"
    )
    [(before,)] = psql_rows(dbs.source_dsn, "SELECT count(*) FROM public.person")
    wait_while_running(  # the stream applies while the writer writes
        lambda: target_count(dbs, "public.person") > before + 100,
        (source, sink, writer),
        timeout=90,
        message="the sink applied nothing",
    )
    stop_cleanly(writer)
    wait_identical(dbs, WRITER_TABLES, processes=(source, sink))
    assert_same_rows(dbs, WRITER_TABLES)  # full_name included: computed alike on both sides
    assert psql_rows(dbs.target_dsn, "SELECT count(*) FROM audit.fired") == [(0,)], "the user trigger fired"
    assert NO_REPLICA not in sink.stderr_text()
    assert foreign_keys(dbs.target_dsn) == ["orders_person_id_fkey"]
    stop_cleanly(sink, source)


def accounts(dbs: Databases) -> None:
    """public.accounts on the source; the same on the target, plus a unique index on email."""
    execute(
        dbs.source_dsn,
        "CREATE TABLE public.accounts (id integer PRIMARY KEY, email text NOT NULL)",
        "INSERT INTO public.accounts VALUES (1, 'a@example.org'), (2, 'b@example.org')",
    )
    clone_table(dbs.source_dsn, dbs.target_dsn, "public.accounts")
    execute(dbs.target_dsn, "CREATE UNIQUE INDEX accounts_email_uq ON public.accounts (email)")


# Changes the source accepts that the target's unique index refuses: a second account with the same
# email (refused by itself), or an email handed over within one batch (each change alone is accepted,
# the batch's net effect written in one statement is not).
CHANGES = {
    "one change": ("INSERT INTO public.accounts VALUES (3, 'a@example.org')",),
    "one batch": (
        "INSERT INTO public.accounts VALUES (3, 'q@example.org')",
        "UPDATE public.accounts SET email = 'z@example.org' WHERE id = 1",
        "UPDATE public.accounts SET email = 'a@example.org' WHERE id = 3",
    ),
}


@pytest.mark.parametrize("case", list(CHANGES))
def test_a_unique_index_of_the_target_only_stops_the_sink_naming_it(
    dbs: Databases, stack: Stack, topic_prefix: str, case: str
) -> None:
    slot, group = names_of(dbs, topic_prefix)
    accounts(dbs)
    source = start_source(dbs, topic_prefix, slot, streaming=True)
    first = run_sink(dbs, topic_prefix, slot, group, "--once")
    assert first.returncode == 0, first.stderr
    execute(dbs.source_dsn, *CHANGES[case], separately=True)
    wait_high_watermark(stack.bootstrap_servers, topic_of(topic_prefix, "public.accounts"), 2 + len(CHANGES[case]))
    # one batch: wait for all the changes before applying them
    result = run_sink(dbs, topic_prefix, slot, group, "--once", "--batch-wait-ms", "3000", timeout=60)
    line = error_line("cdc-sink", result, alone=False)
    for part in (
        'unique constraint "accounts_email_uq"',
        "public.accounts",
        "DROP INDEX public.accounts_email_uq",
    ):
        assert part in line, f"{part!r} is not in the error line: {line}"
    if case == "one batch":
        assert "no single change of it does" in line, line
    stop_cleanly(source)


# --- a role that may not apply as a replica -----------------------------------------------------

PASSWORD = "T4rget!pw-" + uuid.uuid4().hex[:6]


@pytest.fixture
def plain_role(stack: Stack, dbs: Databases) -> Iterator[Databases]:
    """The writer's tables with rows on the source and made by pg_dump on the target; the databases
    with the target logged into as a role of docs/roles.sql that may not set session_replication_role,
    with the rights on those tables it writes."""
    run_writer(dbs, "--count", "300", "--rate", "0", "--batch", "10", "--seed", "13")
    dump_schema(dbs)
    role = f"t_plain_{uuid.uuid4().hex[:8]}"
    try:
        result = run_roles_sql(
            dbs.target_dsn, part="target", target_role=role, target_password=PASSWORD, schemas="public"
        )
        assert result.returncode == 0, f"roles.sql failed on the target:\n{result.stdout}{result.stderr}"
        ident = sql.Identifier(role)
        execute(
            dbs.target_dsn,
            sql.SQL("REVOKE SET ON PARAMETER session_replication_role FROM {}").format(ident),
            *(
                sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON {} TO {}").format(
                    sql.Identifier(*t.split(".")), ident
                )
                for t in WRITER_TABLES
            ),
        )
        yield Databases(dbs.name, dbs.source_dsn, make_dsn(dbs.target_dsn, user=role, password=PASSWORD))
    finally:
        drop_role(stack.target_admin_dsn, dbs.name, role)


def test_a_role_without_the_replica_right_is_warned_and_a_foreign_key_stops_the_copy(
    dbs: Databases, topic_prefix: str, plain_role: Databases
) -> None:
    slot, group = names_of(dbs, topic_prefix)
    source = start_source(dbs, topic_prefix, slot, streaming=True)
    # The copy fills orders first (topics in name order): the foreign key finds no person.
    result = run_sink(plain_role, topic_prefix, slot, group, "--once")
    warnings = [line for line in result.stderr.splitlines() if " WARNING " in line and NO_REPLICA in line]
    assert len(warnings) == 1, result.stderr
    role = str(psql_rows(plain_role.target_dsn, "SELECT current_user")[0][0])
    assert f"GRANT SET ON PARAMETER session_replication_role TO {role}" in warnings[0]
    assert "foreign keys and triggers fire" in warnings[0]
    line = error_line("cdc-sink", result, alone=False)
    for part in (
        "bulk copy of public.orders",
        'foreign key constraint "orders_person_id_fkey"',
        f"GRANT SET ON PARAMETER session_replication_role TO {role}",
    ):
        assert part in line, f"{part!r} is not in the error line: {line}"
    assert target_count(dbs, "public.orders") == 0

    # The GRANT the line names is the fix.
    execute(
        dbs.target_dsn,
        sql.SQL("GRANT SET ON PARAMETER session_replication_role TO {}").format(sql.Identifier(role)),
    )
    again = run_sink(plain_role, topic_prefix, slot, group, "--once")
    assert again.returncode == 0, again.stderr
    assert NO_REPLICA not in again.stderr
    wait_identical(dbs, WRITER_TABLES, processes=(source,))
    stop_cleanly(source)
