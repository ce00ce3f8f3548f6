"""Every user-facing error of the five programs, as an operator meets it: exactly one line
`<program>: error: ...` on stderr (with --log-format text), a non-zero exit, no Traceback and never
the password. Log lines may precede the error only where a connector retries first (Kafka
unreachable, a slot busy in another process).

The connections use a role of their own whose password (`S3cr3t!pw`) appears nowhere else, so a
leak cannot hide behind the stack's `postgres:postgres`. Source servers that the shared stack cannot
imitate (wal_level not logical, no wal2json) are private PostgreSQL clusters made by the tests.
"""

import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg2
import pytest
from psycopg2 import sql

from tests.conftest import Databases, Stack
from tests.helpers import psql_rows, run_cli, start_cli, stop_process
from tests.pg_cluster import PgCluster
from tests.pipeline import error_line, execute, start_source, wait_for_output
from tests.source_events import EventReader, count, topic_of

SECRET = "S3cr3t!pw"
WRONG_SECRET = SECRET + "-wrong"
PROGRAMS = ("cdc-source", "cdc-sink", "cdc-writer", "cdc-verify", "cdc-status")
EMPTY_LIBDIR = "<the cluster's empty folder>"


def uri(user: str, password: str, host: str, port: int | str, database: str) -> str:
    return f"postgresql://{quote(user, safe='')}:{quote(password, safe='!')}@{host}:{port}/{quote(database)}"


# --- the role with the distinctive password ----------------------------------------------------


@pytest.fixture(scope="module")
def secret_role(stack: Stack) -> Iterator[str]:
    """A login role on both servers (REPLICATION on the source) whose password is SECRET; dropped
    at the end of the module, after the tests' databases are gone."""
    name = f"t_err_{uuid.uuid4().hex[:8]}"
    statements = {
        stack.source_admin_dsn: "CREATE ROLE {} LOGIN REPLICATION PASSWORD {}",
        stack.target_admin_dsn: "CREATE ROLE {} LOGIN PASSWORD {}",
    }
    for admin, statement in statements.items():
        psql_rows(admin, sql.SQL(statement).format(sql.Identifier(name), sql.Literal(SECRET)))
    yield name
    for admin in statements:
        psql_rows(admin, sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture
def owned(stack: Stack, dbs: Databases, secret_role: str) -> Databases:
    """The test's databases, owned by the secret role, with DSNs that log in as it."""
    for admin in (stack.source_admin_dsn, stack.target_admin_dsn):
        psql_rows(
            admin,
            sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(dbs.name), sql.Identifier(secret_role)),
        )
    source_port = psycopg2.extensions.parse_dsn(stack.source_admin_dsn).get("port", "5432")
    target_port = psycopg2.extensions.parse_dsn(stack.target_admin_dsn).get("port", "5433")
    return Databases(
        dbs.name,
        uri(secret_role, SECRET, "127.0.0.1", source_port, dbs.name),
        uri(secret_role, SECRET, "127.0.0.1", target_port, dbs.name),
    )


# --- running a program and reading its one line --------------------------------------------------


@dataclass(frozen=True)
class Run:
    source_dsn: str
    target_dsn: str
    bootstrap: str
    prefix: str
    slot: str = ""
    group: str = ""
    kafka_timeout: str = "10"

    def command(self, program: str, *extra: str, sub: str | None = None) -> list[str]:
        args = [
            program,
            *([sub] if sub else []),
            "--source-dsn",
            self.source_dsn,
            "--target-dsn",
            self.target_dsn,
            "--bootstrap-servers",
            self.bootstrap,
            "--topic-prefix",
            self.prefix,
            "--log-format",
            "text",
        ]
        if program in ("cdc-source", "cdc-sink", "cdc-status"):
            args += ["--slot", self.slot or f"t_err_{uuid.uuid4().hex[:8]}"]
        if program in ("cdc-sink", "cdc-status"):
            args += ["--group", self.group or f"g-{uuid.uuid4().hex[:8]}"]
        if program in ("cdc-source", "cdc-sink"):
            args += ["--kafka-timeout", self.kafka_timeout]
        if program == "cdc-writer":
            args += ["--count", "1"]
        return [*args, *extra]


def base_run(stack: Stack, dbs: Databases, prefix: str) -> Run:
    return Run(dbs.source_dsn, dbs.target_dsn, stack.bootstrap_servers, prefix)


def fails(program: str, command: list[str], alone: bool = True, timeout: float = 120) -> str:
    return error_line(program, run_cli(command, timeout=timeout), alone, secret=SECRET)


def assert_mentions(line: str, *fragments: str) -> None:
    missing = [f for f in fragments if f not in line]
    assert not missing, f"the error line lacks {missing}: {line}"


# --- connection problems -------------------------------------------------------------------------

# (program, which DSN is wrong): every program that connects to that database.
DSN_USERS = [
    ("cdc-source", "source"),
    ("cdc-writer", "source"),
    ("cdc-sink", "target"),
    ("cdc-sink", "source"),  # read by the bulk copy
    ("cdc-verify", "source"),
    ("cdc-verify", "target"),
    ("cdc-status", "source"),
    ("cdc-status", "target"),
]


def broken(run: Run, side: str, dsn: str) -> Run:
    if side == "source":
        return Run(dsn, run.target_dsn, run.bootstrap, run.prefix)
    return Run(run.source_dsn, dsn, run.bootstrap, run.prefix)


def with_item_table(owned: Databases) -> list[str]:
    """A replicable table (for cdc-sink, whose bulk copy is where it reads the source)."""
    execute(owned.source_dsn, "CREATE TABLE item (id int PRIMARY KEY, label text)")
    return ["--tables", "public.item"]


def sink_needs_source(program: str, side: str) -> bool:
    return program == "cdc-sink" and side == "source"


@pytest.mark.parametrize(("program", "side"), DSN_USERS)
@pytest.mark.parametrize(
    ("host", "port"), [("127.0.0.1", 1), ("127.0.0.2", None)], ids=["wrong-port", "wrong-host"]
)
def test_unreachable_database(
    stack: Stack,
    owned: Databases,
    secret_role: str,
    topic_prefix: str,
    program: str,
    side: str,
    host: str,
    port: int | None,
) -> None:
    run = base_run(stack, owned, topic_prefix)
    good = owned.source_dsn if side == "source" else owned.target_dsn
    real_port = psycopg2.extensions.parse_dsn(good)["port"]
    bad = uri(secret_role, SECRET, host, port or real_port, owned.name)
    extra = with_item_table(owned) if sink_needs_source(program, side) else []
    line = fails(program, broken(run, side, bad).command(program, *extra))
    assert_mentions(
        line,
        f"cannot connect to the {side} database at {secret_role}@{host}:{port or real_port}/{owned.name}",
        "Connection refused",
        f"--{side}-dsn / {side.upper()}_DSN",
    )


@pytest.mark.parametrize(("program", "side"), DSN_USERS)
def test_wrong_password(
    stack: Stack, owned: Databases, secret_role: str, topic_prefix: str, program: str, side: str
) -> None:
    run = base_run(stack, owned, topic_prefix)
    good = owned.source_dsn if side == "source" else owned.target_dsn
    bad = good.replace(quote(SECRET, safe="!"), quote(WRONG_SECRET, safe="!"))
    assert bad != good
    extra = with_item_table(owned) if sink_needs_source(program, side) else []
    line = fails(program, broken(run, side, bad).command(program, *extra))
    assert_mentions(
        line,
        f"cannot connect to the {side} database",
        f'password authentication failed for user "{secret_role}"',
        f"--{side}-dsn",
    )


@pytest.mark.parametrize(("program", "side"), DSN_USERS)
def test_unknown_database(
    stack: Stack, owned: Databases, secret_role: str, topic_prefix: str, program: str, side: str
) -> None:
    run = base_run(stack, owned, topic_prefix)
    good = owned.source_dsn if side == "source" else owned.target_dsn
    missing = f"nosuch_{uuid.uuid4().hex[:6]}"
    bad = good.rsplit("/", 1)[0] + "/" + missing
    extra = with_item_table(owned) if sink_needs_source(program, side) else []
    line = fails(program, broken(run, side, bad).command(program, *extra))
    assert_mentions(line, f"cannot connect to the {side} database", f'database "{missing}" does not exist')


# --- Kafka --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "program",
    [
        "cdc-source",
        "cdc-sink",
        "cdc-status",
    ],
)
def test_kafka_unreachable(stack: Stack, owned: Databases, topic_prefix: str, program: str) -> None:
    execute(owned.source_dsn, "CREATE TABLE item (id int PRIMARY KEY)")
    run = Run(owned.source_dsn, owned.target_dsn, "127.0.0.1:1", topic_prefix, kafka_timeout="3")
    line = fails(program, run.command(program), alone=False)
    assert_mentions(line, "Kafka is unreachable at 127.0.0.1:1", "--bootstrap-servers")


# --- tables ------------------------------------------------------------------------------------


@pytest.mark.parametrize("program", ["cdc-source", "cdc-sink", "cdc-verify"])
def test_missing_table(stack: Stack, owned: Databases, topic_prefix: str, program: str) -> None:
    execute(owned.source_dsn, "CREATE TABLE item (id int PRIMARY KEY)")
    line = fails(program, base_run(stack, owned, topic_prefix).command(program, "--tables", "nosuch,public.item"))
    assert_mentions(line, "public.nosuch", "does not exist", "--tables")


# cdc-source refuses such a table when named and when found among all tables; cdc-sink replicates
# the tables that have topics, so only a named one reaches it.
@pytest.mark.parametrize(
    ("program", "named"),
    [("cdc-source", True), ("cdc-source", False), ("cdc-sink", True)],
    ids=["source-named", "source-all-tables", "sink-named"],
)
def test_table_without_primary_key(
    stack: Stack, owned: Databases, topic_prefix: str, program: str, named: bool
) -> None:
    execute(owned.source_dsn, "CREATE TABLE item (id int PRIMARY KEY)", "CREATE TABLE nopk (a int, b text)")
    # Named first: cdc-sink copies the tables in order, and waits for the slot before the first copy.
    extra = ["--tables", "public.nopk,public.item"] if named else []
    line = fails(program, base_run(stack, owned, topic_prefix).command(program, *extra))
    assert_mentions(line, "public.nopk", "primary key")
    if program == "cdc-source":
        assert_mentions(line, "ALTER TABLE public.nopk ADD PRIMARY KEY", "REPLICA IDENTITY")
    assert not psql_rows(
        stack.source_admin_dsn, "SELECT 1 FROM pg_replication_slots WHERE database = %s", (owned.name,)
    ), "a refused start left a replication slot behind"


def test_verify_reports_a_table_without_primary_key(stack: Stack, owned: Databases, topic_prefix: str) -> None:
    """Not an error for cdc-verify: a report line (exit 1, "different"), nothing on stderr."""
    execute(owned.source_dsn, "CREATE TABLE nopk (a int, b text)")
    execute(owned.target_dsn, "CREATE TABLE nopk (a int, b text)")
    result = run_cli(base_run(stack, owned, topic_prefix).command("cdc-verify", "--tables", "public.nopk"))
    assert result.returncode == 1, result
    assert result.stderr == "", result.stderr
    assert "public.nopk: DIFFERENT: the table has no key on the source" in result.stdout, result.stdout
    assert SECRET not in result.stdout


# --- the slot ----------------------------------------------------------------------------------


def test_slot_in_use(stack: Stack, owned: Databases, topic_prefix: str, reader: EventReader) -> None:
    execute(owned.source_dsn, "CREATE TABLE item (id int PRIMARY KEY)")
    slot = f"t_err_{uuid.uuid4().hex[:8]}"
    run = Run(owned.source_dsn, owned.target_dsn, stack.bootstrap_servers, topic_prefix, slot=slot)
    first = start_cli(run.command("cdc-source"))
    try:
        wait_for_output(first, "streaming from slot", timeout=90)
        # The second one waits a little for the slot (a previous run's walsender may be exiting),
        # logging why, then gives up with the reason.
        line = fails("cdc-source", run.command("cdc-source"), alone=False, timeout=180)
        assert_mentions(line, f"replication slot {slot} is in use by another process", "--slot / SOURCE_SLOT")
        line = fails("cdc-source", run.command("cdc-source", sub="drop-slot"))
        assert_mentions(line, f"replication slot {slot} is in use by process", "stop the cdc-source")
        assert first.poll() is None, f"the first connector died:\n{first.stderr_text()}"
        # The first one is unharmed: it still streams.
        execute(owned.source_dsn, "INSERT INTO item VALUES (1)")
        items = topic_of(topic_prefix, "item")
        events = reader.wait_then_stop([items], count(items, 1), "the insert", first)
        assert [(e.key, e.op) for e in events] == [(b'{"id":1}', "c")]
        reader.assert_valid()
    finally:
        assert stop_process(first) == 0, first.stderr_text()
    assert SECRET not in first.stderr_text() + first.stdout_text()


# --- malformed settings ------------------------------------------------------------------------


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize(
    ("tables", "fragment"),
    [
        ("public.a.b", "table names are schema.table; got 'public.a.b'"),
        ('public."Order', "unterminated quoted identifier in table list"),
        ("public.,x", "empty name in table list"),
        ('"a"b.c', "unexpected 'b' after a quoted identifier in table list"),
    ],
    ids=["three-parts", "unterminated-quote", "empty-name", "junk-after-quote"],
)
def test_malformed_tables(
    stack: Stack, owned: Databases, topic_prefix: str, program: str, tables: str, fragment: str
) -> None:
    line = fails(program, base_run(stack, owned, topic_prefix).command(program, "--tables", tables))
    assert_mentions(line, fragment)


MALFORMED_DSNS = {
    "missing-equals": (f"host=127.0.0.1 password={SECRET} dbname", 'missing "=" after "dbname"'),
    "unknown-option": (f"host=127.0.0.1 password={SECRET} colour=blue", 'invalid connection option "colour"'),
    "unterminated-quote": (f"host=127.0.0.1 password='{SECRET}", "unterminated quoted string"),
    "bad-uri-parameter": (
        f"postgresql://u:{SECRET}@127.0.0.1:5432/db?colour=blue",
        'invalid URI query parameter: "colour"',
    ),
}


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize("side", ["source", "target"])
@pytest.mark.parametrize("case", sorted(MALFORMED_DSNS))
def test_malformed_dsn(
    stack: Stack, owned: Databases, topic_prefix: str, program: str, side: str, case: str
) -> None:
    dsn, fragment = MALFORMED_DSNS[case]
    line = fails(program, broken(base_run(stack, owned, topic_prefix), side, dsn).command(program))
    assert_mentions(
        line, f"--{side}-dsn / {side.upper()}_DSN is not a valid PostgreSQL connection string", fragment
    )


@pytest.mark.parametrize("program", PROGRAMS)
def test_missing_kafka_config_file(stack: Stack, owned: Databases, topic_prefix: str, program: str) -> None:
    path = f"/nonexistent/{uuid.uuid4().hex}/client.properties"
    line = fails(program, base_run(stack, owned, topic_prefix).command(program, "--kafka-config", path))
    assert_mentions(line, f"cannot read the Kafka properties file {path}", "No such file or directory")


@pytest.mark.parametrize("program", PROGRAMS)
def test_malformed_kafka_config_file(
    stack: Stack, owned: Databases, topic_prefix: str, program: str, tmp_path: Path
) -> None:
    path = tmp_path / "client.properties"
    path.write_text(f"security.protocol=SASL_SSL\nsasl.password={SECRET}\nthis line has no equals sign\n")
    line = fails(program, base_run(stack, owned, topic_prefix).command(program, "--kafka-config", str(path)))
    assert_mentions(line, f"{path}:3: expected key=value")


@pytest.mark.parametrize(
    ("mix", "fragment"),
    [
        ("1,2", "--mix takes three non-negative numbers"),
        ("a,b,c", "--mix takes three whole numbers insert,update,delete"),
        ("0,0,0", "not all 0"),
        ("70,-20,10", "--mix takes three non-negative numbers"),
    ],
)
def test_writer_malformed_mix(owned: Databases, mix: str, fragment: str) -> None:
    command = [
        "cdc-writer",
        "--source-dsn",
        owned.source_dsn,
        "--log-format",
        "text",
        "--count",
        "1",
        "--mix",
        mix,
    ]
    line = fails("cdc-writer", command)
    assert_mentions(line, fragment, repr(mix))
    assert not psql_rows(owned.source_dsn, "SELECT 1 FROM pg_tables WHERE tablename IN ('person', 'orders')"), (
        "the writer created its tables before refusing --mix"
    )


# --- source servers the shared stack cannot imitate ---------------------------------------------


@pytest.fixture
def private_pg(request: pytest.FixtureRequest) -> Iterator[PgCluster]:
    """A private cluster (password SECRET) with the settings given by indirect parametrization;
    EMPTY_LIBDIR stands for an empty folder of the cluster's own."""
    cluster = PgCluster("errors", password=SECRET)
    empty = cluster.dir / "empty-libdir"
    cluster.settings = {
        "wal_level": "logical",
        **{k: f"'{empty}'" if v == EMPTY_LIBDIR else v for k, v in dict(request.param).items()},
    }
    try:
        cluster.init()
        empty.mkdir()
        yield cluster.start()
    finally:
        cluster.remove()


def source_on(cluster: PgCluster, stack: Stack, prefix: str) -> list[str]:
    execute(cluster.admin_dsn, "CREATE TABLE IF NOT EXISTS item (id int PRIMARY KEY, label text)")
    return Run(cluster.admin_dsn, stack.target_admin_dsn, stack.bootstrap_servers, prefix).command("cdc-source")


@pytest.mark.parametrize("private_pg", [{"wal_level": "replica"}], indirect=True)
def test_wal_level_not_logical(private_pg: PgCluster, stack: Stack, topic_prefix: str) -> None:
    assert psql_rows(private_pg.admin_dsn, "SHOW wal_level") == [("replica",)]
    line = fails("cdc-source", source_on(private_pg, stack, topic_prefix))
    assert_mentions(
        line,
        "wal_level = replica",  # the problem
        "logical decoding needs wal_level = logical",
        "ALTER SYSTEM SET wal_level = logical",  # the fix
        "restart PostgreSQL",
    )


@pytest.mark.parametrize(
    "private_pg", [{"wal_level": "logical", "dynamic_library_path": EMPTY_LIBDIR}], indirect=True
)
@pytest.mark.parametrize(
    "strict_one_line",
    [
        False,
        True,
    ],
    ids=["message", "only-line"],
)
def test_wal2json_missing(private_pg: PgCluster, stack: Stack, topic_prefix: str, strict_one_line: bool) -> None:
    # Output plugins are looked up by bare name in dynamic_library_path only: an empty folder there
    # hides the wal2json.so that the package installed in $libdir.
    assert psql_rows(private_pg.admin_dsn, "SHOW dynamic_library_path") == [
        (str(private_pg.dir / "empty-libdir"),)
    ]
    assert not any((private_pg.dir / "empty-libdir").iterdir())
    with pytest.raises(psycopg2.errors.UndefinedFile, match='could not access file "wal2json"'):
        psql_rows(private_pg.admin_dsn, "SELECT pg_create_logical_replication_slot('probe', 'wal2json')")
    line = fails("cdc-source", source_on(private_pg, stack, topic_prefix), alone=strict_one_line)
    assert_mentions(
        line,
        "the wal2json output plugin is not installed on the source server",  # the problem
        "apt-get install postgresql-15-wal2json",  # the fix
    )
    assert psql_rows(private_pg.admin_dsn, "SELECT count(*) FROM pg_replication_slots") == [(0,)]


def test_a_type_name_wal2json_prints_as_invalid_json(stack: Stack, owned: Databases, topic_prefix: str) -> None:
    """wal2json 2.5 does not escape the quotes of a type name it prints schema-qualified and quoted
    (`"type":"Odd Schema"."Mood"`): the source stops with one line naming the table and the fix,
    not a stack trace."""
    execute(
        owned.source_dsn,
        'CREATE SCHEMA "Odd Schema"',
        "CREATE TYPE \"Odd Schema\".\"Mood\" AS ENUM ('a', 'b')",
        'CREATE TABLE odd (id int PRIMARY KEY, m "Odd Schema"."Mood")',
    )
    source = start_source(
        owned, topic_prefix, f"odd_{uuid.uuid4().hex[:8]}", "--tables", "public.odd", streaming=True
    )
    try:
        execute(owned.source_dsn, "INSERT INTO odd VALUES (1, 'a')")
        source.wait(timeout=60)
    finally:
        stop_process(source)
    result = subprocess.CompletedProcess(
        source.args, source.returncode, source.stdout_text(), source.stderr_text()
    )
    line = error_line("cdc-source", result, alone=False)
    assert_mentions(line, "public.odd", "not valid JSON", "ALTER TYPE")
