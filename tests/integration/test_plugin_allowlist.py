"""PostgreSQL's output-plugin allow-list (`output_plugin_libraries`) against the real server: a
source whose list lacks wal2json is refused with the one-line fix, for a superuser (who can read the
setting) and for a REPLICATION role (who cannot); a running connector that loses the permission
waits, says why on /healthz and in its log, and resumes from its slot once it is given back."""

import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
from psycopg2 import sql

from tests.conftest import Databases, Stack
from tests.helpers import psql_rows, run_cli
from tests.integration.test_errors import SECRET, Run, assert_mentions, fails, uri
from tests.kafka_broker import free_port
from tests.pg_cluster import PgCluster
from tests.pipeline import (
    execute,
    start_sink,
    start_source,
    stop_cleanly,
    wait_for_output,
    wait_identical,
    wait_while_running,
)

FIX = "output_plugin_libraries = 'pgoutput, test_decoding, wal2json'"


@pytest.fixture
def refusing_pg() -> Iterator[PgCluster]:
    """A private source cluster with the server's default allow-list, which refuses wal2json."""
    cluster = PgCluster("allowlist", password=SECRET, allow_wal2json=False)
    try:
        yield cluster.init().start()
    finally:
        cluster.remove()


@pytest.fixture
def allowing_pg() -> Iterator[PgCluster]:
    cluster = PgCluster("allowlist")
    try:
        yield cluster.init().start()
    finally:
        cluster.remove()


def assert_refusal_line(line: str) -> None:
    assert_mentions(line, "refuses wal2json", "output_plugin_libraries", FIX, "SELECT pg_reload_conf()")
    assert "REPLICATION" not in line, f"the line gives the advice for a role without REPLICATION: {line}"


def test_the_default_list_refuses_wal2json(refusing_pg: PgCluster) -> None:
    # What the connector is up against: the server's own refusal, for a superuser too.
    assert psql_rows(refusing_pg.admin_dsn, "SHOW output_plugin_libraries") == [("pgoutput, test_decoding",)]
    with pytest.raises(Exception, match="may not be used as an output plugin"):
        psql_rows(refusing_pg.admin_dsn, "SELECT pg_create_logical_replication_slot('probe', 'wal2json')")


def source_command(cluster: PgCluster, dsn: str, stack: Stack, prefix: str) -> list[str]:
    execute(cluster.admin_dsn, "CREATE TABLE IF NOT EXISTS item (id int PRIMARY KEY, label text)")
    return Run(dsn, stack.target_admin_dsn, stack.bootstrap_servers, prefix).command("cdc-source")


def test_superuser_is_refused_before_any_slot_with_the_fix(
    refusing_pg: PgCluster, stack: Stack, topic_prefix: str
) -> None:
    line = fails("cdc-source", source_command(refusing_pg, refusing_pg.admin_dsn, stack, topic_prefix))
    assert_refusal_line(line)
    assert "output_plugin_libraries = 'pgoutput, test_decoding')" in line, line  # what the server has
    assert psql_rows(refusing_pg.admin_dsn, "SELECT count(*) FROM pg_replication_slots") == [(0,)]


def test_replication_role_that_cannot_read_the_setting_gets_the_same_fix(
    refusing_pg: PgCluster, stack: Stack, topic_prefix: str
) -> None:
    role = f"t_repl_{uuid.uuid4().hex[:6]}"
    execute(
        refusing_pg.admin_dsn,
        "CREATE TABLE IF NOT EXISTS item (id int PRIMARY KEY, label text)",
        sql.SQL("CREATE ROLE {} LOGIN REPLICATION PASSWORD {}").format(sql.Identifier(role), sql.Literal(SECRET)),
        sql.SQL("GRANT SELECT ON item TO {}").format(sql.Identifier(role)),
    )
    dsn = uri(role, SECRET, "127.0.0.1", refusing_pg.port, "postgres")
    with pytest.raises(Exception, match="pg_read_all_settings"):
        psql_rows(dsn, "SHOW output_plugin_libraries")
    line = fails("cdc-source", source_command(refusing_pg, dsn, stack, topic_prefix))
    assert_refusal_line(line)


def test_status_names_the_refusal(refusing_pg: PgCluster, stack: Stack, topic_prefix: str) -> None:
    command = Run(refusing_pg.admin_dsn, stack.target_admin_dsn, stack.bootstrap_servers, topic_prefix)
    result = run_cli(command.command("cdc-status"), timeout=60)
    assert result.returncode == 1, f"cdc-status exited {result.returncode}:\n{result.stdout}{result.stderr}"
    text = " ".join(result.stdout.split())
    assert "refuses wal2json" in text and FIX in text, result.stdout


def health(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def set_allowlist(cluster: PgCluster, value: str) -> None:
    """Change the list and reload the configuration (a running walsender keeps what it loaded)."""
    psql_rows(cluster.admin_dsn, f"ALTER SYSTEM SET output_plugin_libraries = {value}")
    psql_rows(cluster.admin_dsn, "SELECT pg_reload_conf()")


def test_running_connector_waits_for_the_permission_and_loses_nothing(
    allowing_pg: PgCluster, stack: Stack, dbs: Databases, topic_prefix: str
) -> None:
    name = dbs.name
    source_dsn = allowing_pg.create_database(name)
    pipeline = Databases(name, source_dsn, dbs.target_dsn)
    execute(source_dsn, "CREATE TABLE item (id int PRIMARY KEY, label text)")
    execute(source_dsn, "INSERT INTO item SELECT g, 'before ' || g FROM generate_series(1, 100) g")
    slot, group, port = f"s_{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}", free_port()
    source = start_source(pipeline, topic_prefix, slot, "--tables", "public.item", "--metrics-port", str(port))
    sink = start_sink(pipeline, topic_prefix, slot, group, "--tables", "public.item")
    try:
        wait_for_output(source, "streaming from slot")
        wait_identical(pipeline, ["public.item"], processes=[source, sink])

        # The permission goes away: a reload, then the replication connection drops.
        set_allowlist(allowing_pg, "'pgoutput', 'test_decoding'")
        execute(source_dsn, "INSERT INTO item SELECT g, 'while refused ' || g FROM generate_series(101, 300) g")
        execute(
            source_dsn,
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = %s",
            params=(slot,),
        )
        wait_while_running(
            lambda: health(port)[0] == 503 and "refuses wal2json" in health(port)[1],
            [source, sink],
            timeout=60,
            message="/healthz never answered 503 with the reason",
        )
        assert FIX in health(port)[1], health(port)
        wait_for_output(source, FIX)
        execute(source_dsn, "UPDATE item SET label = 'updated while refused' WHERE id <= 50")
        execute(source_dsn, "DELETE FROM item WHERE id BETWEEN 51 AND 60")

        # Given back: the connector resumes from its slot by itself.
        set_allowlist(allowing_pg, "'pgoutput', 'test_decoding', 'wal2json'")
        wait_for_output(source, "allows wal2json again", timeout=60)
        wait_identical(pipeline, ["public.item"], processes=[source, sink])
        assert health(port)[0] == 200, health(port)
        assert psql_rows(dbs.target_dsn, "SELECT count(*) FROM item") == [(290,)]
    finally:
        stop_cleanly(source, sink)
    log = source.stderr_text()
    assert "Traceback" not in log, log[-5000:]
    assert log.count(FIX) <= 2, f"the fix was logged more than once a minute:\n{log[-5000:]}"
