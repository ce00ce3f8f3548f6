"""The pipeline with least-privilege roles made by docs/roles.sql (the exact script, run with psql):
on the source a LOGIN REPLICATION role that may SELECT the replicated tables and nothing else, on
the target a LOGIN role that creates (and so owns) the replicated tables and owns the sink's schema.
cdc-source, cdc-sink, cdc-verify and cdc-status run end to end with them (the writer as postgres),
and the target ends identical; the roles cannot read what is outside the replicated set.
"""

import contextlib
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import orjson
import psycopg2
import pytest
from psycopg2 import sql
from psycopg2.extensions import make_dsn

from tests.conftest import Databases, Stack
from tests.helpers import REPO, CliProcess, psql_rows, run_cli, start_cli, wait_until
from tests.kafka_broker import free_port
from tests.pipeline import (
    assert_running,
    run_writer,
    sink_args,
    source_args,
    start_writer,
    stop_cleanly,
    wait_applied,
    wait_for_output,
    wait_identical,
)

ROLES_SQL = REPO / "docs" / "roles.sql"
TABLES = ("public.person", "public.orders")
SOURCE_PASSWORD = "S0urce!pw-" + uuid.uuid4().hex[:6]
TARGET_PASSWORD = "T4rget!pw-" + uuid.uuid4().hex[:6]


@dataclass(frozen=True)
class Roles:
    source: str
    target: str
    dbs: Databases  # DSNs that log in as the roles
    admin: Databases  # the same databases as postgres


def run_roles_sql(dsn: str, **variables: str) -> subprocess.CompletedProcess[str]:
    """docs/roles.sql through psql, with `variables` as -v name=value."""
    args = ["psql", "-X", "-q", "-d", dsn, "-f", str(ROLES_SQL)]
    for name, value in variables.items():
        args += ["-v", f"{name}={value}"]
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def drop_role(admin_dsn: str, database: str, role: str) -> None:
    """Drop what the role owns in the test database, its grants, then the role."""
    in_db = make_dsn(admin_dsn, dbname=database)
    exists = psql_rows(admin_dsn, "SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
    if not exists:
        return
    psql_rows(in_db, sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(role)))
    psql_rows(admin_dsn, sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.fixture
def roles(stack: Stack, dbs: Databases) -> Iterator[Roles]:
    """The writer's tables (and a table outside the replicated set) on the source, then the roles
    made by docs/roles.sql on both servers."""
    run_writer(dbs, "--count", "200", "--rate", "0", "--seed", "3")
    psql_rows(dbs.source_dsn, "CREATE TABLE public.payroll (id int PRIMARY KEY, salary numeric)")
    psql_rows(dbs.source_dsn, "INSERT INTO public.payroll VALUES (1, 100000)")
    source_role, target_role = f"t_src_{uuid.uuid4().hex[:8]}", f"t_snk_{uuid.uuid4().hex[:8]}"
    try:
        result = run_roles_sql(
            dbs.source_dsn,
            part="source",
            source_role=source_role,
            source_password=SOURCE_PASSWORD,
            tables=",".join(TABLES),
        )
        assert result.returncode == 0, f"roles.sql failed on the source:\n{result.stdout}{result.stderr}"
        result = run_roles_sql(
            dbs.target_dsn,
            part="target",
            target_role=target_role,
            target_password=TARGET_PASSWORD,
            schemas="public",
        )
        assert result.returncode == 0, f"roles.sql failed on the target:\n{result.stdout}{result.stderr}"
        yield Roles(
            source_role,
            target_role,
            Databases(
                dbs.name,
                make_dsn(dbs.source_dsn, user=source_role, password=SOURCE_PASSWORD),
                make_dsn(dbs.target_dsn, user=target_role, password=TARGET_PASSWORD),
            ),
            dbs,
        )
    finally:
        # The programs are stopped by now; the slot goes with the database (conftest).
        drop_role(stack.source_admin_dsn, dbs.name, source_role)
        drop_role(stack.target_admin_dsn, dbs.name, target_role)


# --- what the roles are -------------------------------------------------------------------------


def role_attributes(admin_dsn: str, role: str) -> dict[str, bool]:
    [row] = psql_rows(
        admin_dsn,
        "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls, rolinherit, rolcanlogin "
        "FROM pg_roles WHERE rolname = %s",
        (role,),
    )
    names = ("super", "createdb", "createrole", "replication", "bypassrls", "inherit", "login")
    return dict(zip(names, row, strict=True))


def member_of(admin_dsn: str, role: str) -> list[str]:
    return [
        r[0]
        for r in psql_rows(
            admin_dsn,
            "SELECT b.rolname FROM pg_auth_members m JOIN pg_roles b ON b.oid = m.roleid "
            "JOIN pg_roles u ON u.oid = m.member WHERE u.rolname = %s",
            (role,),
        )
    ]


def table_privileges(dsn: str, role: str) -> dict[str, set[str]]:
    """Privileges `role` holds on every table of the database (only those it holds any on)."""
    found: dict[str, set[str]] = {}
    kinds = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
    for (table,) in psql_rows(
        dsn,
        "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables "
        "WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
    ):
        held = {
            kind
            for kind in kinds
            if psql_rows(dsn, "SELECT has_table_privilege(%s, %s, %s)", (role, table, kind))[0][0]
        }
        if held:
            found[table] = held
    return found


def test_roles_hold_only_what_the_script_grants(stack: Stack, roles: Roles) -> None:
    admin = roles.admin
    source = role_attributes(stack.source_admin_dsn, roles.source)
    assert source == {
        "super": False,
        "createdb": False,
        "createrole": False,
        "replication": True,
        "bypassrls": False,
        "inherit": True,
        "login": True,
    }, source
    target = role_attributes(stack.target_admin_dsn, roles.target)
    assert target == {**source, "replication": False}, target
    assert member_of(stack.source_admin_dsn, roles.source) == []
    assert member_of(stack.target_admin_dsn, roles.target) == []
    # Source: SELECT on the replicated tables, nothing on any other table.
    assert table_privileges(admin.source_dsn, roles.source) == {t: {"SELECT"} for t in TABLES}
    # Target: nothing on any table yet (it will own those it creates), its schema, CREATE in public.
    assert table_privileges(admin.target_dsn, roles.target) == {}
    [(owner,)] = psql_rows(
        admin.target_dsn, "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'cdc_sink'"
    )
    assert owner == roles.target
    [(usage, create)] = psql_rows(
        admin.target_dsn,
        "SELECT has_schema_privilege(%s, 'public', 'USAGE'), has_schema_privilege(%s, 'public', 'CREATE')",
        (roles.target, roles.target),
    )
    assert usage and create
    # The script can be run again for a longer table list only after the role exists: it says so.
    again = run_roles_sql(
        admin.source_dsn, part="source", source_role=roles.source, source_password="x", tables="public.person"
    )
    assert again.returncode != 0 and "already exists" in again.stderr, again


def test_the_roles_cannot_read_outside_the_replicated_set(stack: Stack, roles: Roles) -> None:
    with pytest.raises(psycopg2.errors.InsufficientPrivilege, match="permission denied for table payroll"):
        psql_rows(roles.dbs.source_dsn, "SELECT * FROM public.payroll")
    with pytest.raises(psycopg2.errors.InsufficientPrivilege):
        psql_rows(roles.dbs.source_dsn, "DELETE FROM public.person")
    # On the target a table the sink did not create stays closed to it.
    psql_rows(roles.admin.target_dsn, "CREATE TABLE public.audit (id int PRIMARY KEY)")
    with pytest.raises(psycopg2.errors.InsufficientPrivilege, match="permission denied for table audit"):
        psql_rows(roles.dbs.target_dsn, "SELECT * FROM public.audit")


def scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return str(response.read().decode())
    except OSError:
        return ""


def metric(text: str, name: str) -> float:
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(name + " ") or line.startswith(name + "{")
    )


def test_pipeline_end_to_end_with_the_roles(stack: Stack, roles: Roles, topic_prefix: str) -> None:
    dbs, admin = roles.dbs, roles.admin
    slot, group = f"t_roles_{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    tables = ("--tables", ",".join(TABLES))
    port = free_port()
    source = start_cli(
        source_args(dbs, topic_prefix, slot, *tables, "--heartbeat-interval", "1", "--metrics-port", str(port))
    )
    wait_for_output(source, "streaming from slot", timeout=90)
    sink = start_cli(sink_args(dbs, topic_prefix, slot, group, *tables))
    writer = start_writer(admin, "--rate", "50", "--seed", "4", "--key-change-ratio", "0.1", "--big-ratio", "0.2")
    try:
        topics = [f"{topic_prefix}.public.person", f"{topic_prefix}.public.orders"]
        # Heartbeats go through pg_logical_emit_message with the source role's rights alone.
        wait_until(
            lambda: metric(scrape(port), "cdc_source_heartbeats_total") >= 2,
            timeout=60,
            message="no heartbeat read back from the WAL",
        )
        wait_applied(dbs, stack.bootstrap_servers, group, topics, processes=[source, sink])
    finally:
        stop_cleanly(writer)
    wait_identical(dbs, TABLES, processes=[source, sink])
    wait_applied(dbs, stack.bootstrap_servers, group, topics, processes=[source, sink])  # and the tombstones
    assert_running(source, sink)

    # cdc-status with the roles: everything applied, exit 0.
    status = run_cli(
        [
            "cdc-status",
            "--source-dsn",
            dbs.source_dsn,
            "--target-dsn",
            dbs.target_dsn,
            "--topic-prefix",
            topic_prefix,
            "--slot",
            slot,
            "--group",
            group,
            "--json",
            "--log-format",
            "text",
        ]
    )
    assert status.returncode == 0, status
    report = orjson.loads(status.stdout)
    assert report["ok"] and report["slot"]["active"], report
    assert {t["table"] for t in report["tables"]} == set(TABLES), report
    assert all(t["lag_messages"] == 0 for t in report["tables"]), report
    stop_cleanly(source, sink)
    logs = source.stderr_text() + sink.stderr_text()
    assert "permission denied" not in logs and "heartbeat failed" not in logs, logs

    # The sink created the tables and owns them and its bookkeeping; it holds nothing else.
    owners = psql_rows(
        admin.target_dsn,
        "SELECT format('%I.%I', schemaname, tablename), tableowner FROM pg_tables "
        "WHERE schemaname IN ('public', 'cdc_sink') ORDER BY 1",
    )
    assert {t: o for t, o in owners} == {
        "public.orders": roles.target,
        "public.person": roles.target,
        "cdc_sink.consistency": roles.target,
        "cdc_sink.offsets": roles.target,
        "cdc_sink.parked": roles.target,
        "cdc_sink.positions": roles.target,
        "cdc_sink.schema_changes": roles.target,
        "cdc_sink.snapshots": roles.target,
        "cdc_sink.tables": roles.target,
    }
    # And the verify run by the roles agrees with one by the administrator.
    result = run_cli(
        [
            "cdc-verify",
            "--source-dsn",
            admin.source_dsn,
            "--target-dsn",
            admin.target_dsn,
            "--tables",
            ",".join(TABLES),
            "--log-format",
            "text",
        ]
    )
    assert result.returncode == 0 and "identical: 2 of 2 tables match" in result.stdout, result


def test_sink_without_create_on_the_database(stack: Stack, roles: Roles, topic_prefix: str) -> None:
    admin = roles.admin
    psql_rows(
        admin.target_dsn,
        sql.SQL("REVOKE CREATE ON DATABASE {} FROM {}").format(
            sql.Identifier(admin.name), sql.Identifier(roles.target)
        ),
    )
    with pipeline_as(roles, topic_prefix) as processes:
        wait_identical(roles.dbs, TABLES, timeout=60, processes=processes)


@contextlib.contextmanager
def pipeline_as(roles: Roles, topic_prefix: str) -> Iterator[list[CliProcess]]:
    """cdc-source and cdc-sink logged in as the roles, streaming the writer's tables; stopped after."""
    slot, group = f"t_roles_{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    tables = ("--tables", ",".join(TABLES))
    source = start_cli(source_args(roles.dbs, topic_prefix, slot, *tables))
    processes = [source]
    try:
        wait_for_output(source, "streaming from slot", timeout=90)
        processes.append(start_cli(sink_args(roles.dbs, topic_prefix, slot, group, *tables)))
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait(60)


def test_sink_without_temporary_on_the_database_applies_changes_all_the_same(
    stack: Stack, roles: Roles, topic_prefix: str
) -> None:
    # upserts go through a temporary staging table; a role that may not create one upserts from JSON
    admin = roles.admin
    database = sql.Identifier(admin.name)
    for grantee in ("PUBLIC", roles.target):
        who = sql.SQL(grantee) if grantee == "PUBLIC" else sql.Identifier(grantee)
        psql_rows(admin.target_dsn, sql.SQL("REVOKE TEMPORARY ON DATABASE {} FROM {}").format(database, who))
    allowed = psql_rows(roles.dbs.target_dsn, "SELECT has_database_privilege(current_database(), 'TEMPORARY')")
    assert allowed == [(False,)], allowed
    with pipeline_as(roles, topic_prefix) as processes:
        wait_identical(roles.dbs, TABLES, timeout=60, processes=processes)
        run_writer(admin, "--count", "300", "--rate", "0", "--seed", "4")  # inserts, updates, deletes
        wait_identical(roles.dbs, TABLES, timeout=60, processes=processes)
        assert "Traceback" not in processes[1].stderr_text()


def one_line_error(program: str, result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, f"{program} printed a stack trace:\n{result.stderr[-3000:]}"
    lines = result.stderr.splitlines()
    assert lines and lines[-1].startswith(f"{program}: error: "), result.stderr
    return lines[-1]


def test_source_role_without_select_on_a_named_table(stack: Stack, roles: Roles, topic_prefix: str) -> None:
    slot = f"t_roles_{uuid.uuid4().hex[:8]}"
    result = run_cli(source_args(roles.dbs, topic_prefix, slot, "--tables", "public.person,public.payroll"))
    line = one_line_error("cdc-source", result)
    assert "public.payroll" in line and "GRANT SELECT" in line, line


def test_sink_role_missing_a_privilege_is_one_line(stack: Stack, roles: Roles, topic_prefix: str) -> None:
    # a state schema the role may not create (it has no CREATE on the database): refused in one line
    args = ("--tables", "public.person", "--state-schema", "not_granted")
    result = run_cli(sink_args(roles.dbs, topic_prefix, "t_roles_unused", "g-unused", *args))
    line = one_line_error("cdc-sink", result)
    assert "permission denied" in line, line
