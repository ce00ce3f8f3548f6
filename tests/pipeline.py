"""Small helpers to run the whole pipeline in a test: start cdc-source and cdc-sink, wait until
cdc-verify says the target is identical, read tables as PostgreSQL text, talk to Kafka directly."""

import contextlib
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import psycopg2
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from psycopg2 import sql

from pg_kafka_cdc.common.tables import TableName, parse_tables
from tests.conftest import Databases
from tests.helpers import CliProcess, reap_started, run_cli, start_cli, stop_process, wait_until

# The settings under which both databases print values identically (as the pipeline's own
# connections do).
TEXT_SESSION = "-c DateStyle=ISO -c TimeZone=UTC -c IntervalStyle=iso_8601 -c extra_float_digits=3"

Table = TableName | str

# The tables cdc-writer writes.
WRITER_TABLES = ("public.person", "public.orders")

# About 22 kB of hex digits from md5: pglz finds few repeats in it, so compressed it still exceeds the
# TOAST threshold and is stored out of line; an update that does not touch it leaves it out of the WAL
# (REPLICA IDENTITY DEFAULT).
BIG_TEXT = "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 700))"


def table_name(table: Table) -> TableName:
    """`public.person`, `"a""b"."My Table"` or a TableName, as a TableName."""
    if isinstance(table, TableName):
        return table
    [parsed] = parse_tables(table)
    return parsed


def tables_option(tables: Iterable[Table]) -> str:
    """The --tables value naming `tables` (quoted as needed)."""
    return ",".join(str(table_name(t)) for t in tables)


# --- the programs ---------------------------------------------------------------------------------


def _subcommand(extra: Sequence[str], names: Sequence[str]) -> tuple[list[str], Sequence[str]]:
    """`extra` split into its leading subcommand (one of `names`; none: []) and the rest."""
    command = [extra[0]] if extra and extra[0] in names else []
    return command, extra[len(command) :]


def source_args(dbs: Databases, prefix: str, slot: str, *extra: str) -> list[str]:
    """cdc-source's arguments; `extra` may start with a subcommand (`drop-slot`)."""
    command, rest = _subcommand(extra, ("run", "drop-slot", "snapshot"))
    return [
        "cdc-source",
        *command,
        "--source-dsn",
        dbs.source_dsn,
        "--topic-prefix",
        prefix,
        "--slot",
        slot,
        "--log-format",
        "text",
        *rest,
    ]


def sink_args(dbs: Databases, prefix: str, slot: str, group: str, *extra: str) -> list[str]:
    """cdc-sink's arguments; `extra` may start with a subcommand (`rebuild`)."""
    command, rest = _subcommand(extra, ("run", "rebuild"))
    return [
        "cdc-sink",
        *command,
        "--source-dsn",
        dbs.source_dsn,
        "--target-dsn",
        dbs.target_dsn,
        "--topic-prefix",
        prefix,
        "--slot",
        slot,
        "--group",
        group,
        "--log-format",
        "text",
        *rest,
    ]


def start_source(dbs: Databases, prefix: str, slot: str, *extra: str, streaming: bool = False) -> CliProcess:
    """cdc-source in the background; with `streaming`, returned once it streams from the slot (after
    its initial snapshot, if any)."""
    process = start_cli(source_args(dbs, prefix, slot, *extra))
    if streaming:
        wait_for_output(process, "streaming from slot", timeout=120)
    return process


def start_sink(dbs: Databases, prefix: str, slot: str, group: str, *extra: str) -> CliProcess:
    """cdc-sink in the background."""
    return start_cli(sink_args(dbs, prefix, slot, group, *extra))


def run_sink(
    dbs: Databases, prefix: str, slot: str, group: str, *extra: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """cdc-sink to the end (with --once, or until it fails)."""
    return run_cli(sink_args(dbs, prefix, slot, group, *extra), timeout=timeout)


def writer_args(dbs: Databases, *extra: str) -> list[str]:
    return ["cdc-writer", "--source-dsn", dbs.source_dsn, "--log-format", "text", *extra]


def start_writer(dbs: Databases, *extra: str) -> CliProcess:
    """cdc-writer in the background, returned once it has created its tables and started writing."""
    process = start_cli(writer_args(dbs, *extra))
    wait_until(
        lambda: "writing to" in process.stderr_text() or process.poll() is not None,
        timeout=60,
        message="the writer never started writing",
    )
    assert process.poll() is None, f"the writer exited early:\n{process.stderr_text()}"
    return process


def run_writer(dbs: Databases, *extra: str) -> None:
    """cdc-writer to the end (give it --count)."""
    result = run_cli(writer_args(dbs, *extra), timeout=300)
    assert result.returncode == 0, f"cdc-writer failed:\n{result.stderr}"


def assert_running(*processes: CliProcess) -> None:
    for p in processes:
        assert p.poll() is None, f"{p.command} exited with {p.returncode}:\n{p.stderr_text()[-5000:]}"


def stop_cleanly(*processes: CliProcess) -> None:
    """SIGTERM each process (in order); each must exit 0."""
    for p in processes:
        code = stop_process(p, timeout=60)
        assert code == 0, f"{p.command} exited with {code} on SIGTERM:\n{p.stderr_text()[-5000:]}"


def while_running(processes: Sequence[CliProcess], predicate: Callable[[], object]) -> Callable[[], bool]:
    """`predicate` for wait_until, failing at once when one of `processes` has exited."""

    def check() -> bool:
        assert_running(*processes)
        return bool(predicate())

    return check


def wait_while_running(
    predicate: Callable[[], object],
    processes: Sequence[CliProcess],
    timeout: float = 60,
    message: str = "",
    interval: float = 0.2,
) -> None:
    """Until `predicate` holds; fails at once when one of `processes` exits meanwhile."""
    wait_until(while_running(processes, predicate), timeout=timeout, interval=interval, message=message)


def wait_for_output(process: CliProcess, text: str, timeout: float = 60) -> None:
    """Until `text` appears in the process's stderr (its log); fails if it exits first."""

    def seen() -> bool:
        if text in process.stderr_text():
            return True
        assert_running(process)
        return False

    wait_until(seen, timeout=timeout, message=f"{process.command!r} never logged {text!r}")


# --- failures ----------------------------------------------------------------------------------

# The exit code of an expected failure: cdc-verify and cdc-status keep 1 for "different"/"attention".
ERROR_EXIT = {"cdc-source": 1, "cdc-sink": 1, "cdc-writer": 1, "cdc-verify": 2, "cdc-status": 2}
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO|WARNING|ERROR)\s+(cdc-[a-z]+)  \S")


def error_lines(stderr: str, program: str = "cdc-sink") -> list[str]:
    """The `<program>: error: ...` lines of `stderr`."""
    return [line for line in stderr.splitlines() if line.startswith(f"{program}: error:")]


def error_line(
    program: str, result: subprocess.CompletedProcess[str], alone: bool = True, secret: str = ""
) -> str:
    """The text of the failure's one line (after `<program>: error: `). `alone`: nothing else on
    stderr; otherwise only well-formed log lines of the program may come before it. `secret` (a
    password) must appear nowhere in the output."""
    everything = result.stdout + result.stderr
    if secret:
        assert secret not in everything, f"the password leaked:\n{everything}"
    assert "Traceback" not in everything, f"{program} printed a stack trace:\n{everything}"
    assert result.returncode == ERROR_EXIT[program], (
        f"{program} exited with {result.returncode}, expected {ERROR_EXIT[program]}:\n{everything}"
    )
    lines = result.stderr.splitlines()
    assert lines, f"{program} failed without a word on stderr (stdout: {result.stdout!r})"
    prefix = f"{program}: error: "
    errors = [line for line in lines if line.startswith(prefix)]
    assert len(errors) == 1, f"expected one error line, got {len(errors)}:\n{result.stderr}"
    assert lines[-1] == errors[0], f"the error is not the last line:\n{result.stderr}"
    if alone:
        assert len(lines) == 1, f"expected only the error line on stderr:\n{result.stderr}"
    else:
        stray = [line for line in lines[:-1] if not (m := LOG_LINE.match(line)) or m.group(2) != program]
        assert not stray, "stderr holds lines that are neither log lines nor the error:\n" + "\n".join(stray[:10])
    return errors[0][len(prefix) :]


# --- comparing source and target --------------------------------------------------------------


def verify(dbs: Databases, tables: Iterable[Table] = (), *extra: str) -> subprocess.CompletedProcess[str]:
    """cdc-verify, to the end."""
    names = list(tables)
    args = ["cdc-verify", "--source-dsn", dbs.source_dsn, "--target-dsn", dbs.target_dsn, "--log-format", "text"]
    if names:
        args += ["--tables", tables_option(names)]
    return run_cli([*args, *extra], timeout=120)


def wait_identical(
    dbs: Databases, tables: Iterable[Table], timeout: float = 90, processes: Sequence[CliProcess] = ()
) -> None:
    """Run cdc-verify until it exits 0 (identical); fails on exit 2, on timeout, or when one of
    `processes` (the pipeline) dies meanwhile."""
    names = list(tables)
    last: list[subprocess.CompletedProcess[str]] = []

    def identical() -> bool:
        assert_running(*processes)
        result = verify(dbs, names)
        last[:] = [result]
        assert result.returncode in (0, 1), f"cdc-verify could not compare (exit {result.returncode}):\n{result}"
        return result.returncode == 0

    try:
        wait_until(identical, timeout=timeout, interval=0.5, message="the target never became identical")
    except AssertionError as exc:
        report = last[0].stdout if last else ""
        logs = "\n".join(f"--- {p.command}\n{p.stderr_text()[-3000:]}" for p in processes)
        raise AssertionError(f"{exc}\nlast cdc-verify report:\n{report}\n{logs}") from None


def connect_as_text(dsn: str) -> Any:
    conn = psycopg2.connect(dsn, connect_timeout=10, options=TEXT_SESSION)
    conn.autocommit = True
    return conn


def key_columns(conn: Any, table: TableName) -> list[str]:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT array(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) "
            "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum ORDER BY k.ord) "
            "FROM pg_index i WHERE i.indrelid = %s::regclass AND i.indisprimary",
            (sql.Identifier(table.schema, table.name).as_string(conn),),
        )
        row = cur.fetchone()
    assert row is not None, f"{table} has no primary key"
    return list(row[0])


def column_names(conn: Any, table: TableName) -> list[str]:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped "
            "ORDER BY attnum",
            (sql.Identifier(table.schema, table.name).as_string(conn),),
        )
        return [r[0] for r in cur.fetchall()]


def select_as_text(conn: Any, table: TableName, columns: list[str]) -> list[tuple[str | None, ...]]:
    """`columns` of every row of `table` on a connect_as_text connection, each value exactly as its
    type's output function printed it (a `::text` cast is not always that: xml::text is the stored
    text, bpchar::text drops the padding)."""
    select = sql.SQL("SELECT {} FROM {}").format(
        sql.SQL(", ").join(map(sql.Identifier, columns)), sql.Identifier(table.schema, table.name)
    )
    with conn.cursor() as cur:
        cur.execute(select + sql.SQL(" LIMIT 0"))
        oids = tuple({column.type_code for column in cur.description})
        as_text = psycopg2.extensions.new_type(oids, "AS_TEXT", lambda value, _cur: value)
        psycopg2.extensions.register_type(as_text, conn)
        cur.execute(select)
        return [tuple(r) for r in cur.fetchall()]


def rows_as_text(dsn: str, table: Table) -> list[dict[str, str | None]]:
    """Every row of `table` with every column as PostgreSQL prints it (its output function, under
    fixed session settings), ordered by the key (compared as text, so both servers sort alike)."""
    name = table_name(table)
    conn = connect_as_text(dsn)
    try:
        columns = column_names(conn, name)
        key = key_columns(conn, name)
        rows = [dict(zip(columns, r, strict=True)) for r in select_as_text(conn, name, columns)]
    finally:
        conn.close()
    return sorted(rows, key=lambda r: tuple(r[k] or "" for k in key))


def assert_same_rows(dbs: Databases, tables: Iterable[Table]) -> None:
    """Source and target hold the same rows, compared as text."""
    for table in tables:
        source, target = rows_as_text(dbs.source_dsn, table), rows_as_text(dbs.target_dsn, table)
        if source != target:
            src = {tuple(sorted(r.items())) for r in source}
            tgt = {tuple(sorted(r.items())) for r in target}
            only_source = sorted(src - tgt)[:5]
            only_target = sorted(tgt - src)[:5]
            raise AssertionError(
                f"{table}: {len(source)} source rows, {len(target)} target rows; "
                f"first rows only in the source: {only_source}; first only in the target: {only_target}"
            )


def execute(dsn: str, *statements: str | sql.Composable, params: Any = None, separately: bool = False) -> None:
    """Run statements in one transaction; with `separately`, each in a transaction of its own (a
    statement may then hold several, run as one transaction: `BEGIN; ...; COMMIT`)."""
    conn = psycopg2.connect(dsn, connect_timeout=10)
    try:
        if separately:
            conn.autocommit = True
            with conn.cursor() as cur:
                for statement in statements:
                    cur.execute(statement, params)
            return
        with conn, conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement, params)
    finally:
        conn.close()


# --- Kafka -------------------------------------------------------------------------------------


def high_watermark(bootstrap_servers: str, topic: str, partition: int = 0) -> int:
    """How many messages `topic`[partition] holds (0 while it does not exist)."""
    return partition_ends(bootstrap_servers, [topic]).get((topic, partition), 0)


def wait_high_watermark(bootstrap_servers: str, topic: str, expected: int, partition: int = 0) -> None:
    """Until `topic`[partition] holds exactly `expected` messages (fails if it gets more)."""

    def reached() -> bool:
        high = high_watermark(bootstrap_servers, topic, partition)
        assert high <= expected, f"{topic}[{partition}] has {high} messages, more than the {expected} expected"
        return high == expected

    wait_until(reached, timeout=60, message=f"{topic}[{partition}] never reached {expected} messages")


def produce(bootstrap_servers: str, topic: str, key: bytes | None, value: bytes | None) -> tuple[int, int]:
    """One message with the partitioner the source uses; returns its (partition, offset)."""
    producer = Producer({"bootstrap.servers": bootstrap_servers, "partitioner": "murmur2_random"})
    delivered: list[Any] = []
    producer.produce(topic, value, key, on_delivery=lambda err, msg: delivered.append((err, msg)))
    assert producer.flush(30) == 0, f"the test message for {topic} was not delivered"
    [(err, msg)] = delivered
    assert err is None, f"producing to {topic} failed: {err}"
    return int(msg.partition()), int(msg.offset())


def read_all(bootstrap_servers: str, topic: str, timeout: float = 60) -> list[Any]:
    """Every message of `topic` present now (all partitions), in (partition, offset) order."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap_servers,
            "group.id": f"test-reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    messages: list[Any] = []
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        assert topic in metadata.topics and metadata.topics[topic].error is None, f"no topic {topic}"
        ends = {}
        for p in metadata.topics[topic].partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = high
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        deadline = time.monotonic() + timeout
        while ends and time.monotonic() < deadline:
            for m in consumer.consume(1000, timeout=0.5):
                err = m.error()
                if err is not None:
                    assert err.code() == KafkaError._PARTITION_EOF, f"reading {topic}: {err}"
                    continue
                messages.append(m)
                if (m.offset() or 0) + 1 >= ends.get(m.partition() or 0, 0):
                    ends.pop(m.partition() or 0, None)
        assert not ends, f"reading {topic} did not finish in {timeout:g} s"
    finally:
        consumer.close()
    return sorted(messages, key=lambda m: (m.partition(), m.offset()))


def clone_table(source_dsn: str, target_dsn: str, table: Table) -> None:
    """Create `table` on the target with the source's columns, types, NOT NULLs and primary key
    (nothing else: no defaults, foreign keys or indexes)."""
    name = table_name(table)
    conn = connect_as_text(source_dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT attname, format_type(atttypid, atttypmod), attnotnull FROM pg_attribute "
                "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                (sql.Identifier(name.schema, name.name).as_string(conn),),
            )
            columns = cur.fetchall()
        key = key_columns(conn, name)
    finally:
        conn.close()
    execute(
        target_dsn,
        sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(name.schema)),
        sql.SQL("CREATE TABLE {} ({}, PRIMARY KEY ({}))").format(
            sql.Identifier(name.schema, name.name),
            sql.SQL(", ").join(
                sql.SQL("{} {}{}").format(sql.Identifier(c), sql.SQL(t), sql.SQL(" NOT NULL" if nn else ""))
                for c, t, nn in columns
            ),
            sql.SQL(", ").join(map(sql.Identifier, key)),
        ),
    )


def partition_ends(bootstrap_servers: str, topics: Iterable[str]) -> dict[tuple[str, int], int]:
    """The high watermark of every partition of `topics` (those that exist)."""
    consumer = Consumer({"bootstrap.servers": bootstrap_servers, "group.id": f"test-probe-{uuid.uuid4().hex}"})
    try:
        ends = {}
        metadata = consumer.list_topics(timeout=10)
        for topic in topics:
            if topic not in metadata.topics or metadata.topics[topic].error is not None:
                continue  # not created yet
            for p in metadata.topics[topic].partitions:
                _, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                ends[(topic, p)] = int(high)
        return ends
    finally:
        consumer.close()


def stored_offsets(dbs: Databases, group: str) -> dict[tuple[str, int], int | None]:
    """The sink's stored next offsets (cdc_sink.offsets) of `group`."""
    conn = psycopg2.connect(dbs.target_dsn, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass('cdc_sink.offsets') IS NOT NULL")
            row = cur.fetchone()
            if row is None or not row[0]:
                return {}
            cur.execute("SELECT topic, partition, next_offset FROM cdc_sink.offsets WHERE group_id = %s", (group,))
            return {(t, p): o for t, p, o in cur.fetchall()}
    finally:
        conn.close()


def wait_applied(
    dbs: Databases,
    bootstrap_servers: str,
    group: str,
    topics: Iterable[str],
    processes: Sequence[CliProcess] = (),
    timeout: float = 90,
) -> None:
    """Until the sink has stored, for every partition of `topics`, the offset at its end (what the
    topics held when this was called: let the source publish first)."""
    ends = {tp: high for tp, high in partition_ends(bootstrap_servers, topics).items() if high > 0}

    def applied() -> bool:
        assert_running(*processes)
        stored = stored_offsets(dbs, group)
        return all((stored.get(tp) or 0) >= high for tp, high in ends.items())

    wait_until(applied, timeout=timeout, message=f"the sink never reached the end of {sorted(ends)}")


@contextlib.contextmanager
def reaped_on_failure() -> Iterator[None]:
    """For a test expected to fail: the programs it started are killed when it fails, so the failure
    is reported once (not again as programs left running)."""
    try:
        yield
    except BaseException:
        reap_started()
        raise
