"""cdc-source against the real stack: what lands in Kafka for each kind of change, exact values,
crash safety, slot handling and one-line errors.

Every envelope read from a topic in this module is also kept in ENVELOPES and validated against
schemas/envelope.schema.json at the end of each test.
"""

import json
import re
import signal
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from subprocess import CompletedProcess
from typing import Any

import psycopg2
from confluent_kafka import Consumer, TopicPartition
from jsonschema import Draft202012Validator
from psycopg2 import sql
from psycopg2.extensions import make_dsn

from pg_kafka_cdc.common.lsn import lsn_to_int
from schemas.partitioner import partition_for
from schemas.topics import state_topic
from tests.conftest import Databases, Stack, admin_client
from tests.helpers import REPO, CliProcess, psql_rows, run_cli, start_cli, stop_process, wait_until
from tests.kafka_read import read_topics

# --- envelopes and the contract --------------------------------------------------------------

SCHEMA: dict[str, Any] = json.loads((REPO / "schemas" / "envelope.schema.json").read_text())
Draft202012Validator.check_schema(SCHEMA)
VALIDATOR = Draft202012Validator(SCHEMA)

# Every envelope read by this module's tests, by (topic, partition, offset).
ENVELOPES: dict[tuple[str, int, int], dict[str, Any]] = {}


def assert_envelopes_valid() -> None:
    """Every envelope seen so far in this module validates against the JSON schema."""
    assert ENVELOPES, "no envelope was read"
    problems = []
    for (topic, partition, offset), env in ENVELOPES.items():
        for error in VALIDATOR.iter_errors(env):
            path = "/".join(str(p) for p in error.absolute_path)
            problems.append(f"{topic}[{partition}]@{offset} at /{path}: {error.message}")
    assert not problems, f"{len(problems)} schema violations, first ones:\n" + "\n".join(problems[:20])


def _no_floats(text: str) -> Any:
    raise AssertionError(f"an envelope holds the bare JSON number {text}: numbers other than integers are strings")


@dataclass(frozen=True)
class Event:
    """One message of a change topic; `value` None is a tombstone."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    raw: bytes | None
    value: dict[str, Any] | None

    @property
    def op(self) -> str | None:
        """c, u, d, r, t, or None for a tombstone."""
        return None if self.value is None else str(self.value["op"])

    @property
    def env(self) -> dict[str, Any]:
        assert self.value is not None, f"{self.topic}[{self.partition}]@{self.offset} is a tombstone"
        return self.value

    @property
    def after(self) -> dict[str, Any] | None:
        after: dict[str, Any] | None = self.env["after"]
        return after

    @property
    def before(self) -> dict[str, Any] | None:
        before: dict[str, Any] | None = self.env["before"]
        return before

    @property
    def source(self) -> dict[str, Any]:
        source: dict[str, Any] = self.env["source"]
        return source


def read_events(stack: Stack, topics: Iterable[str], quiet: float = 2.0) -> list[Event]:
    """Every message of `topics` from the beginning, sorted by (topic, partition, offset)."""
    events = []
    for r in read_topics(stack.bootstrap_servers, topics, quiet=quiet):
        value = None if r.value is None else json.loads(r.value, parse_float=_no_floats)
        if value is not None:
            assert isinstance(value, dict), f"{r.topic}@{r.offset}: the value is not a JSON object: {r.value!r}"
            ENVELOPES[(r.topic, r.partition, r.offset)] = value
        events.append(Event(r.topic, r.partition, r.offset, r.key, r.value, value))
    return events


def on(events: list[Event], topic: str) -> list[Event]:
    return [e for e in events if e.topic == topic]


def describe(events: list[Event]) -> str:
    return "\n".join(
        f"  {e.topic}[{e.partition}]@{e.offset} key={e.key!r} {e.op or 'tombstone'} "
        f"{'' if e.value is None else json.dumps({k: e.env[k] for k in ('before', 'after')})[:200]}"
        for e in events
    )


def wait_for_events(
    stack: Stack,
    topics: list[str],
    enough: Callable[[list[Event]], bool],
    what: str,
    process: CliProcess | None = None,
    timeout: float = 120,
) -> list[Event]:
    """Read the topics until `enough(events)`; fails with what was there after `timeout` seconds, or
    at once when the connector `process` exits."""
    seen: list[Event] = []

    def ready() -> list[Event]:
        if process is not None:
            assert process.poll() is None, f"cdc-source exited ({process.returncode}):\n{process.stderr_text()}"
        seen[:] = read_events(stack, topics)
        return list(seen) if enough(seen) else []

    try:
        return wait_until(ready, timeout=timeout, interval=0.5, message=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the topics hold:\n{describe(seen)}") from None


def wait_then_stop(
    stack: Stack,
    topics: list[str],
    enough: Callable[[list[Event]], bool],
    what: str,
    process: CliProcess,
    timeout: float = 120,
) -> list[Event]:
    """Wait until `enough(events)`, stop the connector (SIGTERM, exit 0), then read the topics once
    more: whatever it sent meanwhile is in what the test checks, so extra messages are caught too."""
    wait_for_events(stack, topics, enough, what, process, timeout)
    stop_source(process)
    return read_events(stack, topics)


def count(topic: str, n: int) -> Callable[[list[Event]], bool]:
    return lambda events: len(on(events, topic)) >= n


# --- the connector -------------------------------------------------------------------------


def new_slot() -> str:
    return f"test_{uuid.uuid4().hex[:12]}"


def topic_of(prefix: str, table: str) -> str:
    return f"{prefix}.public.{table}"


def source_command(stack: Stack, dbs: Databases, prefix: str, slot: str, *extra: str) -> list[str]:
    return [
        "cdc-source",
        "--source-dsn",
        dbs.source_dsn,
        "--bootstrap-servers",
        stack.bootstrap_servers,
        "--topic-prefix",
        prefix,
        "--slot",
        slot,
        "--log-format",
        "text",
        *extra,
    ]


def start_source(stack: Stack, dbs: Databases, prefix: str, slot: str, *extra: str) -> CliProcess:
    """Start cdc-source and wait until it streams (after its initial snapshot, if any)."""
    process = start_cli(source_command(stack, dbs, prefix, slot, *extra))
    wait_until(
        lambda: "streaming from slot" in process.stderr_text() or process.poll() is not None,
        timeout=120,
        message="cdc-source never started streaming",
    )
    assert process.poll() is None, f"cdc-source exited with {process.returncode}:\n{process.stderr_text()}"
    return process


def stop_source(process: CliProcess) -> str:
    """SIGTERM: cdc-source must finish cleanly with exit code 0; returns its stderr."""
    code = stop_process(process, timeout=60)
    stderr = process.stderr_text()
    assert code == 0, f"cdc-source exited with {code} on SIGTERM:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    return stderr


def execute(dbs: Databases, *statements: str) -> None:
    """Each statement in its own transaction (a statement may hold several, run as one transaction)."""
    for statement in statements:
        psql_rows(dbs.source_dsn, statement)


SESSION = "-c DateStyle=ISO -c TimeZone=UTC -c IntervalStyle=iso_8601 -c extra_float_digits=3"


def source_text_rows(
    dbs: Databases, table: str, key: str = "id", cast: bool = False
) -> dict[str, dict[str, str | None]]:
    """Every row of `table` as text (pinned session settings), by the text of its `key` column.

    By default each value as its type's output function prints it, which is what wal2json sends
    (`format('%s', col)`, NULL kept), booleans as `col::text` (true/false); with `cast`, `col::text`
    for every column, which differs from the output for character(n) (blanks trimmed) and inet
    (host mask added)."""
    columns = [
        (str(name), str(type_name))
        for name, type_name in psql_rows(
            dbs.source_dsn,
            "SELECT attname, format_type(atttypid, NULL) FROM pg_attribute WHERE attrelid = %s::regclass "
            "AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            (f"public.{table}",),
        )
    ]
    output = sql.SQL("CASE WHEN num_nonnulls({0}) = 1 THEN format('%s', {0}) END")
    query = sql.SQL("SELECT {} FROM {}").format(
        sql.SQL(", ").join(
            (sql.SQL("{}::text") if cast or type_name == "boolean" else output).format(sql.Identifier(name))
            for name, type_name in columns
        ),
        sql.Identifier("public", table),
    )
    rows = psql_rows(make_dsn(dbs.source_dsn, options=SESSION), query)
    names = [name for name, _ in columns]
    return {str(row[names.index(key)]): dict(zip(names, row, strict=True)) for row in rows}


def as_text(value: Any) -> str | None:
    """An envelope value as PostgreSQL's text: integers and booleans back to their text form."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def slot_row(dbs: Databases, slot: str) -> tuple[Any, ...] | None:
    rows = psql_rows(
        dbs.source_dsn,
        "SELECT active, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    )
    return rows[0] if rows else None


def state_records(stack: Stack, prefix: str, slot: str) -> list[dict[str, Any] | None]:
    """The connector's state records for `slot`, oldest first (None for a tombstone)."""
    found: list[dict[str, Any] | None] = []
    for r in read_topics(stack.bootstrap_servers, [state_topic(prefix)], quiet=1.0):
        if r.key is not None and json.loads(r.key)[2] == slot:
            found.append(None if r.value is None else json.loads(r.value))
    return found


LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO|WARNING|ERROR)\s+cdc-source  \S")


def error_line(result: CompletedProcess[str], alone: bool = True) -> str:
    """The failure's one line on stderr. `alone`: nothing else was printed; otherwise only log lines
    may precede it (no Traceback, no raw library output)."""
    assert result.returncode != 0, f"cdc-source should have failed:\n{result.stdout}{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert lines, "cdc-source failed without a word on stderr"
    errors = [line for line in lines if line.startswith("cdc-source: error: ")]
    assert len(errors) == 1, f"expected one error line, got {len(errors)}:\n{result.stderr}"
    assert lines[-1] == errors[0], f"the error is not the last line:\n{result.stderr}"
    if alone:
        assert len(lines) == 1, f"expected only the error line on stderr:\n{result.stderr}"
    else:
        stray = [line for line in lines[:-1] if not LOG_LINE.match(line)]
        assert not stray, "stderr holds lines that are neither log lines nor the error:\n" + "\n".join(stray[:10])
    return errors[0]


# --- 1. inserts, updates, deletes, keys ----------------------------------------------------


def test_inserts_updates_deletes_and_keys(stack: Stack, dbs: Databases, topic_prefix: str) -> None:
    execute(
        dbs,
        "CREATE TABLE item (id int PRIMARY KEY, label text NOT NULL, qty int)",
        # The key is (b, a): key order differs from column order.
        "CREATE TABLE pair (a int, b text, v text, PRIMARY KEY (b, a))",
    )
    slot = new_slot()
    process = start_source(stack, dbs, topic_prefix, slot)
    execute(
        dbs,
        "INSERT INTO item VALUES (1, 'one', 10)",
        "INSERT INTO item VALUES (2, 'two', NULL)",
        "UPDATE item SET label = 'uno', qty = 11 WHERE id = 1",
        "DELETE FROM item WHERE id = 2",
        "INSERT INTO pair VALUES (7, 'x', 'first')",
        "UPDATE pair SET v = 'second' WHERE b = 'x' AND a = 7",
        "DELETE FROM pair WHERE b = 'x' AND a = 7",
    )
    items, pairs = topic_of(topic_prefix, "item"), topic_of(topic_prefix, "pair")
    events = wait_then_stop(
        stack, [items, pairs], lambda ev: count(items, 5)(ev) and count(pairs, 4)(ev), "all changes", process
    )

    item_events = on(events, items)
    assert [(e.key, e.op) for e in item_events] == [
        (b'{"id":1}', "c"),
        (b'{"id":2}', "c"),
        (b'{"id":1}', "u"),
        (b'{"id":2}', "d"),
        (b'{"id":2}', None),
    ], describe(item_events)
    c1, c2, u1, d2, tombstone = item_events
    assert (c1.before, c1.after) == (None, {"id": 1, "label": "one", "qty": 10})
    assert (c2.before, c2.after) == (None, {"id": 2, "label": "two", "qty": None})
    # Default replica identity: `before` of an update is the key.
    assert (u1.before, u1.after) == ({"id": 1}, {"id": 1, "label": "uno", "qty": 11})
    assert "unchanged" not in u1.env
    assert (d2.before, d2.after) == ({"id": 2}, None)
    assert tombstone.raw is None and tombstone.key == b'{"id":2}'

    for e in (c1, c2, u1, d2):
        assert e.env["columns"] == {"id": "integer", "label": "text", "qty": "integer"}
        assert e.env["key"] == ["id"]
        src = e.source
        assert (src["version"], src["connector"], src["name"], src["db"]) == (
            "1",
            "cdc-source",
            topic_prefix,
            dbs.name,
        )
        assert (src["schema"], src["table"], src["slot"], src["snapshot"]) == ("public", "item", slot, False)
        assert isinstance(src["txId"], int) and src["txId"] > 0
        assert src["seq"] == 1, "one change per transaction"
        assert 0 < src["lsn"] <= src["commit_lsn"], src
        assert src["ts_ms"] == src["ts_us"] // 1000, src
    commits = [e.source["commit_lsn"] for e in (c1, c2, u1, d2)]
    assert commits == sorted(set(commits)), f"four transactions, in commit order: {commits}"

    pair_events = on(events, pairs)
    assert [(e.key, e.op) for e in pair_events] == [
        (b'{"b":"x","a":7}', "c"),
        (b'{"b":"x","a":7}', "u"),
        (b'{"b":"x","a":7}', "d"),
        (b'{"b":"x","a":7}', None),
    ], describe(pair_events)
    pc, pu, pd, _ = pair_events
    assert pc.after == {"a": 7, "b": "x", "v": "first"}
    assert (pu.before, pu.after) == ({"a": 7, "b": "x"}, {"a": 7, "b": "x", "v": "second"})
    assert pd.before == {"a": 7, "b": "x"} and pd.after is None
    for e in (pc, pu, pd):
        assert e.env["key"] == ["b", "a"]
        assert list(e.env["columns"].items()) == [("a", "integer"), ("b", "text"), ("v", "text")]
    assert_envelopes_valid()


# --- 2. primary-key change ----------------------------------------------------------------


def test_primary_key_change_is_delete_tombstone_then_create(
    stack: Stack, dbs: Databases, topic_prefix: str
) -> None:
    execute(
        dbs,
        "CREATE TABLE item (id int PRIMARY KEY, label text)",
        "CREATE TABLE pair (a int, b text, v text, PRIMARY KEY (b, a))",
    )
    process = start_source(stack, dbs, topic_prefix, new_slot())
    execute(
        dbs,
        "INSERT INTO item VALUES (1, 'a')",
        "UPDATE item SET id = 10, label = 'b' WHERE id = 1",
        "INSERT INTO pair VALUES (7, 'x', 'v1')",
        "UPDATE pair SET b = 'y' WHERE b = 'x' AND a = 7",
    )
    items, pairs = topic_of(topic_prefix, "item"), topic_of(topic_prefix, "pair")
    events = wait_then_stop(
        stack, [items, pairs], lambda ev: count(items, 4)(ev) and count(pairs, 4)(ev), "key changes", process
    )
    metadata = admin_client(stack.bootstrap_servers).list_topics(timeout=10)
    assert len(metadata.topics[items].partitions) == 1, "the default is one partition per topic"

    item_events = on(events, items)
    assert [(e.partition, e.key, e.op) for e in item_events] == [
        (0, b'{"id":1}', "c"),
        (0, b'{"id":1}', "d"),
        (0, b'{"id":1}', None),
        (0, b'{"id":10}', "c"),
    ], describe(item_events)
    _, delete, _, create = item_events
    assert (delete.before, delete.after) == ({"id": 1}, None)
    assert (create.before, create.after) == (None, {"id": 10, "label": "b"})
    assert delete.source["txId"] == create.source["txId"]
    assert delete.source["commit_lsn"] == create.source["commit_lsn"]

    pair_events = on(events, pairs)
    assert [(e.key, e.op) for e in pair_events] == [
        (b'{"b":"x","a":7}', "c"),
        (b'{"b":"x","a":7}', "d"),
        (b'{"b":"x","a":7}', None),
        (b'{"b":"y","a":7}', "c"),
    ], describe(pair_events)
    assert pair_events[1].before == {"a": 7, "b": "x"}
    assert pair_events[3].after == {"a": 7, "b": "y", "v": "v1"}
    assert_envelopes_valid()


# --- 3. unchanged TOASTed columns ------------------------------------------------------------

# About 22 kB of hex digits: pglz finds few repeats in it, so it stays large and goes out of line.
BIG_TEXT = "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 700))"


def test_unchanged_toast_column(stack: Stack, dbs: Databases, topic_prefix: str) -> None:
    execute(
        dbs,
        "CREATE TABLE doc (id int PRIMARY KEY, big text, n int NOT NULL)",
        "CREATE TABLE doc_full (id int PRIMARY KEY, big text, n int NOT NULL)",
        "ALTER TABLE doc_full REPLICA IDENTITY FULL",
    )
    process = start_source(stack, dbs, topic_prefix, new_slot())
    execute(dbs, f"INSERT INTO doc VALUES (1, {BIG_TEXT}, 0)", f"INSERT INTO doc_full VALUES (1, {BIG_TEXT}, 0)")
    for table in ("doc", "doc_full"):
        [(stored, length)] = psql_rows(dbs.source_dsn, f"SELECT pg_column_size(big), length(big) FROM {table}")
        assert length == 22400 and stored > 20000, f"{table}.big compressed to {stored} bytes: not a TOAST test"
        [(toast,)] = psql_rows(
            dbs.source_dsn, f"SELECT reltoastrelid::regclass::text FROM pg_class WHERE oid = '{table}'::regclass"
        )
        [(chunks,)] = psql_rows(dbs.source_dsn, f"SELECT count(*) FROM {toast}")
        assert chunks > 0, f"{table}.big is not stored out of line"
    execute(dbs, "UPDATE doc SET n = 1 WHERE id = 1", "UPDATE doc_full SET n = 1 WHERE id = 1")
    big = {
        table: str(psql_rows(dbs.source_dsn, f"SELECT big FROM {table}")[0][0]) for table in ("doc", "doc_full")
    }

    doc, full = topic_of(topic_prefix, "doc"), topic_of(topic_prefix, "doc_full")
    events = wait_then_stop(
        stack, [doc, full], lambda ev: count(doc, 2)(ev) and count(full, 2)(ev), "the updates", process
    )

    create, update = on(events, doc)
    assert (create.op, update.op) == ("c", "u")
    assert create.after == {"id": 1, "big": big["doc"], "n": 0}
    # Default replica identity: the unchanged TOASTed value is not in the WAL; it must be listed as
    # unchanged, never sent as null.
    assert update.after == {"id": 1, "n": 1}, "the update must not carry (or null) the unchanged big value"
    assert update.env["unchanged"] == ["big"]
    assert update.before == {"id": 1}
    assert update.env["columns"] == {"id": "integer", "big": "text", "n": "integer"}

    create, update = on(events, full)
    assert (create.op, update.op) == ("c", "u")
    assert create.after == {"id": 1, "big": big["doc_full"], "n": 0}
    # REPLICA IDENTITY FULL: the old row holds the value, so the new row is completed from it.
    assert update.after == {"id": 1, "big": big["doc_full"], "n": 1}
    assert "unchanged" not in update.env
    assert update.before == {"id": 1, "big": big["doc_full"], "n": 0}
    assert_envelopes_valid()


# --- 4. TRUNCATE ---------------------------------------------------------------------------


def test_truncate_reaches_every_partition_in_order(stack: Stack, dbs: Databases, topic_prefix: str) -> None:
    execute(dbs, "CREATE TABLE item (id int PRIMARY KEY, label text)")
    process = start_source(stack, dbs, topic_prefix, new_slot(), "--partitions", "3")
    ids = range(1, 31)
    assert {partition_for(f'{{"id":{i}}}'.encode(), 3) for i in ids} == {0, 1, 2}, "every partition gets rows"
    execute(
        dbs,
        "INSERT INTO item SELECT g, 'row ' || g FROM generate_series(1, 30) g",
        "TRUNCATE item",
        "INSERT INTO item VALUES (100, 'after')",
    )
    items = topic_of(topic_prefix, "item")
    events = wait_then_stop(stack, [items], count(items, 30 + 3 + 1), "rows, truncate, row", process)
    metadata = admin_client(stack.bootstrap_servers).list_topics(timeout=10)
    assert len(metadata.topics[items].partitions) == 3

    assert len(events) == 34, describe(events)
    for e in events:
        if e.key is not None:
            assert e.partition == partition_for(e.key, 3), f"{e.key!r} is not on Kafka's partition for it"
    truncates = [e for e in events if e.op == "t"]
    assert sorted(e.partition for e in truncates) == [0, 1, 2], describe(events)
    for t in truncates:
        assert t.key is None
        assert (t.before, t.after, t.env["partitions"]) == (None, None, 3)
        assert (t.source["table"], t.source["snapshot"]) == ("item", False)
        assert t.env["columns"] == {"id": "integer", "label": "text"}
    assert len({(t.source["txId"], t.source["commit_lsn"]) for t in truncates}) == 1, "one TRUNCATE, one tx"

    later = partition_for(b'{"id":100}', 3)
    for p in range(3):
        ops = [(e.op, e.key) for e in events if e.partition == p]
        expected_rows = [
            ("c", f'{{"id":{i}}}'.encode()) for i in ids if partition_for(f'{{"id":{i}}}'.encode(), 3) == p
        ]
        expected = [*expected_rows, ("t", None)]
        if p == later:
            expected.append(("c", b'{"id":100}'))
        assert ops == expected, f"partition {p}:\n{describe([e for e in events if e.partition == p])}"
    assert_envelopes_valid()


# --- 5. one transaction, two tables ---------------------------------------------------------


def test_multi_table_transaction_shares_tx_and_orders_seq(stack: Stack, dbs: Databases, topic_prefix: str) -> None:
    execute(
        dbs,
        "CREATE TABLE a (id int PRIMARY KEY, v text)",
        "CREATE TABLE b (id int PRIMARY KEY, v text)",
    )
    process = start_source(stack, dbs, topic_prefix, new_slot())
    execute(
        dbs,
        "INSERT INTO b VALUES (1, 'earlier')",
        "BEGIN; INSERT INTO a VALUES (1, 'a1'); INSERT INTO b VALUES (2, 'b2'); UPDATE a SET v = 'a1!' WHERE id = 1; "
        "DELETE FROM b WHERE id = 1; INSERT INTO a VALUES (2, 'a2'); COMMIT",
    )
    ta, tb = topic_of(topic_prefix, "a"), topic_of(topic_prefix, "b")
    events = wait_then_stop(
        stack, [ta, tb], lambda ev: count(ta, 3)(ev) and count(tb, 4)(ev), "the transaction", process
    )

    earlier = on(events, tb)[0]
    assert (earlier.key, earlier.op) == (b'{"id":1}', "c")
    changes = [e for e in events if e.value is not None and e is not earlier]
    assert len(changes) == 5, describe(events)
    assert len({e.source["txId"] for e in changes}) == 1, "one transaction, one txId"
    assert len({e.source["commit_lsn"] for e in changes}) == 1, "one transaction, one commit LSN"
    assert len({(e.source["ts_ms"], e.source["ts_us"]) for e in changes}) == 1, "one commit time"
    assert earlier.source["txId"] != changes[0].source["txId"]
    assert earlier.source["commit_lsn"] < changes[0].source["commit_lsn"]

    in_order = sorted(changes, key=lambda e: e.source["seq"])
    assert [(e.source["table"], e.op, e.key) for e in in_order] == [
        ("a", "c", b'{"id":1}'),
        ("b", "c", b'{"id":2}'),
        ("a", "u", b'{"id":1}'),
        ("b", "d", b'{"id":1}'),
        ("a", "c", b'{"id":2}'),
    ], describe(in_order)
    seqs = [e.source["seq"] for e in in_order]
    assert seqs == sorted(set(seqs)), f"seq must increase strictly across the transaction: {seqs}"
    lsns = [e.source["lsn"] for e in in_order]
    assert lsns == sorted(lsns) and lsns[-1] <= in_order[0].source["commit_lsn"], lsns
    assert_envelopes_valid()


# --- 6. initial snapshot -------------------------------------------------------------------


def test_initial_snapshot_then_changes(stack: Stack, dbs: Databases, topic_prefix: str) -> None:
    execute(
        dbs,
        "CREATE TABLE item (id int PRIMARY KEY, label text, flag boolean, n numeric(10,2))",
        "INSERT INTO item VALUES (1, 'one', true, 1.50), (2, 'two', false, NULL), (3, 'three', NULL, -2)",
    )
    slot = new_slot()
    process = start_source(stack, dbs, topic_prefix, slot)
    items = topic_of(topic_prefix, "item")
    wait_for_events(stack, [items], count(items, 3), "the snapshot", process)
    execute(
        dbs,
        "INSERT INTO item VALUES (4, 'four', true, 4)",
        "UPDATE item SET label = 'uno' WHERE id = 1",
        "DELETE FROM item WHERE id = 2",
    )
    events = wait_then_stop(stack, [items], count(items, 3 + 4), "the changes after the snapshot", process)

    reads, changes = events[:3], events[3:]
    assert {e.op for e in reads} == {"r"}, describe(events)
    assert {e.key: e.after for e in reads} == {
        b'{"id":1}': {"id": 1, "label": "one", "flag": True, "n": "1.50"},
        b'{"id":2}': {"id": 2, "label": "two", "flag": False, "n": None},
        b'{"id":3}': {"id": 3, "label": "three", "flag": None, "n": "-2.00"},
    }
    [state] = [s for s in state_records(stack, topic_prefix, slot) if s is not None][-1:]
    assert state["snapshot"] == "done"
    for e in reads:
        assert e.before is None
        src = e.source
        assert src["snapshot"] is True and src["txId"] is None
        assert src["lsn"] == src["commit_lsn"] == state["snapshot_lsn"], (
            "a snapshot row is at the consistent point"
        )
    assert sorted(e.source["seq"] for e in reads) == [1, 2, 3]
    assert [(e.key, e.op) for e in changes] == [
        (b'{"id":4}', "c"),
        (b'{"id":1}', "u"),
        (b'{"id":2}', "d"),
        (b'{"id":2}', None),
    ], describe(events)
    for e in changes[:3]:
        assert e.source["snapshot"] is False
        assert e.source["commit_lsn"] > state["snapshot_lsn"]
    assert changes[1].after == {"id": 1, "label": "uno", "flag": True, "n": "1.50"}

    # A restart resumes the slot: no second snapshot.
    process = start_source(stack, dbs, topic_prefix, slot)
    execute(dbs, "INSERT INTO item VALUES (5, 'five', false, 5)")
    events = wait_then_stop(stack, [items], count(items, 8), "the change after the restart", process)
    assert [(e.key, e.op) for e in events[7:]] == [(b'{"id":5}', "c")], describe(events)
    assert sum(e.op == "r" for e in events) == 3
    assert_envelopes_valid()


def test_snapshot_never_publishes_no_reads(stack: Stack, dbs: Databases, topic_prefix: str) -> None:
    execute(
        dbs,
        "CREATE TABLE item (id int PRIMARY KEY, label text)",
        "INSERT INTO item VALUES (1, 'old'), (2, 'old')",
    )
    slot = new_slot()
    process = start_source(stack, dbs, topic_prefix, slot, "--snapshot", "never")
    execute(dbs, "INSERT INTO item VALUES (3, 'new')", "UPDATE item SET label = 'changed' WHERE id = 1")
    items = topic_of(topic_prefix, "item")
    events = wait_then_stop(stack, [items], count(items, 2), "the changes", process)
    assert [(e.key, e.op) for e in events] == [(b'{"id":3}', "c"), (b'{"id":1}', "u")], describe(events)
    assert events[1].after == {"id": 1, "label": "changed"}
    states = [s for s in state_records(stack, topic_prefix, slot) if s is not None]
    assert states and states[-1]["snapshot"] == "skipped"
    assert_envelopes_valid()


# --- 7. exact values -----------------------------------------------------------------------

VALUE_COLUMNS = """
    id int PRIMARY KEY,
    n numeric(38,10), n30 numeric, bi bigint, si smallint, i int, o oid,
    r real, d double precision,
    b bytea, t text, vc varchar(20), ch char(4),
    j json, jb jsonb, ia int[], ta text[],
    ts timestamptz, tsn timestamp, dt date, tm time, iv interval,
    u uuid, ip inet, m mood, flag boolean
"""

VALUE_ROWS = r"""
INSERT INTO vals VALUES
(1, 12345678901234567890.0123456789, 123456789012345678901234567890, 9223372036854775807, 32767,
 2147483647, 4294967295, '3.4028235e+38', '1.7976931348623157e+308',
 '\x00ff10'::bytea, E'quote " apostrophe '' backslash \\ newline \n tab \t unicode \u00e9 \u2713 \U0001F389',
 'abc', 'ab', '{"a" : 1,  "a": [1, 2 ]  ,"b":"x\ty"}', '{"b": [1, 2.50, "x"], "a": null}',
 '{1,NULL,-3}', '{"a b","c,d","e\"f",NULL,"\\\\"}',
 '2024-02-29 23:59:59.999999+05:30', '2024-02-29 23:59:59.999999', '2024-02-29', '23:59:59.5',
 '1 year 2 months 3 days 04:05:06.789', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '192.168.0.1/24', 'happy', true),
(2, -0.0000000001, -123456789012345678901234567890, -9223372036854775808, -32768,
 -2147483648, 0, '1.4e-45', '5e-324',
 ''::bytea, '', '', '', '[]', '{}', '{}', '{}',
 '-infinity', 'infinity', '0001-01-01 BC', '00:00', '-1 days +02:00:00', '00000000-0000-0000-0000-000000000000',
 '::1', 'sad', false),
(3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
 NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
(4, 0, 0.000000000000000000000000000001, 0, 0, 0, 1, '-0', '-0',
 '\x'::bytea, ' ', ' ', ' ', 'null', '"str"', '{{1,2},{3,4}}', '{""}',
 '1970-01-01 00:00:00+00', '1970-01-01', '1970-01-01', '24:00', '0', 'ffffffff-ffff-ffff-ffff-ffffffffffff',
 '2001:db8::/32', 'ok', NULL)
"""

INTEGER_TYPES = {"smallint", "integer", "bigint", "oid"}


def expected_value(type_name: str, text: str | None) -> Any:
    """The envelope form of PostgreSQL's text: integers and booleans as JSON, the rest as the text."""
    if text is None:
        return None
    if type_name in INTEGER_TYPES:
        return int(text)
    if type_name == "boolean":
        return {"true": True, "false": False}[text]
    return text


def test_exact_values(stack: Stack, dbs: Databases, topic_prefix: str) -> None:
    execute(
        dbs,
        "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')",
        f"CREATE TABLE vals ({VALUE_COLUMNS})",
        VALUE_ROWS,  # rows 1-4 exist before the start: the snapshot path (`r`)
    )
    process = start_source(stack, dbs, topic_prefix, new_slot())
    names = [
        str(n)
        for (n,) in psql_rows(
            dbs.source_dsn,
            "SELECT attname FROM pg_attribute WHERE attrelid = 'vals'::regclass AND attnum > 1 ORDER BY attnum",
        )
    ]
    # The same values again, written while streaming: the wal2json path (`c`).
    execute(dbs, f"INSERT INTO vals SELECT id + 10, {', '.join(names)} FROM vals ORDER BY id")
    vals = topic_of(topic_prefix, "vals")
    events = wait_then_stop(stack, [vals], count(vals, 8), "the rows", process)

    rows = source_text_rows(dbs, "vals")
    cast_rows = source_text_rows(dbs, "vals", cast=True)
    # `col::text` is the text output, as the envelope carries it, except for two types whose cast to
    # text is a function of its own: character(n) trims the padding, inet adds a host mask.
    for ident, row in rows.items():
        differs = {c for c in row if row[c] != cast_rows[ident][c]}
        assert differs <= {"ch", "ip"}, (ident, differs)
    assert (rows["1"]["ch"], cast_rows["1"]["ch"]) == ("ab  ", "ab")
    assert (rows["2"]["ip"], cast_rows["2"]["ip"]) == ("::1", "::1/128")
    types = dict(
        psql_rows(
            dbs.source_dsn,
            "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = 'vals'::regclass AND attnum > 0 ORDER BY attnum",
        )
    )
    assert [(e.op, e.key) for e in events] == [
        *(("r", f'{{"id":{i}}}'.encode()) for i in (1, 2, 3, 4)),
        *(("c", f'{{"id":{i}}}'.encode()) for i in (11, 12, 13, 14)),
    ], describe(events)
    for e in events:
        assert e.env["columns"] == types, "`columns` is the catalog's format_type of every column"
        after = e.after
        assert after is not None
        source_row = rows[str(after["id"])]
        assert list(after) == list(source_row), "every column, in column order"
        for column, text in source_row.items():
            want = expected_value(types[column], text)
            got = after[column]
            assert got == want and type(got) is type(want), (
                f"{e.op} id={after['id']} column {column} ({types[column]}): got {got!r}, PostgreSQL prints {text!r}"
            )

    # The snapshot (`r`) and the stream (`c`) give the same value the same text.
    by_id = {e.env["after"]["id"]: e.env["after"] for e in events}
    for base in (1, 2, 3, 4):
        assert {**by_id[base], "id": 0} == {**by_id[base + 10], "id": 0}, f"rows {base} and {base + 10} differ"
    # The same facts, spelled out, for the values that are easiest to get wrong.
    for base in (1, 11):
        row = by_id[base]
        assert row["n"] == "12345678901234567890.0123456789"
        assert row["n30"] == "123456789012345678901234567890"
        assert row["bi"] == 9223372036854775807 and row["o"] == 4294967295
        assert row["r"] == "3.4028235e+38" and row["d"] == "1.7976931348623157e+308"
        assert row["b"] == "\\x00ff10"
        assert row["t"] == "quote \" apostrophe ' backslash \\ newline \n tab \t unicode \u00e9 \u2713 \U0001f389"
        assert row["j"] == r'{"a" : 1,  "a": [1, 2 ]  ,"b":"x\ty"}', "json keeps its exact text"
        assert row["jb"] == '{"a": null, "b": [1, 2.50, "x"]}'
        assert row["ts"] == "2024-02-29 18:29:59.999999+00"
        assert row["iv"] == "P1Y2M3DT4H5M6.789S"
        assert row["ch"] == "ab  " and row["ip"] == "192.168.0.1/24"
        assert row["flag"] is True
    for base in (2, 12):
        row = by_id[base]
        assert row["n"] == "-0.0000000001"
        assert row["bi"] == -9223372036854775808 and row["si"] == -32768
        assert row["r"] == "1e-45" and row["d"] == "5e-324"
        assert row["b"] == "\\x" and row["flag"] is False
        assert row["ip"] == "::1" and row["iv"] == "P-1DT2H"
    for base in (3, 13):
        assert all(v is None for k, v in by_id[base].items() if k != "id")
    for base in (4, 14):
        assert by_id[base]["r"] == "-0" and by_id[base]["d"] == "-0"
        assert by_id[base]["n30"] == "0.000000000000000000000000000001"
    # Integers really are JSON integers in the bytes on the wire, not strings or floats.
    raw = next(e.raw for e in events if e.op == "c" and e.key == b'{"id":11}')
    assert raw is not None and b'"bi":9223372036854775807,' in raw and b'"si":32767,' in raw
    assert_envelopes_valid()


# --- 8. NaN --------------------------------------------------------------------------------


def test_nan_in_not_null_column_arrives_as_null_with_one_warning(
    stack: Stack, dbs: Databases, topic_prefix: str
) -> None:
    execute(
        dbs,
        "CREATE TABLE nums (id int PRIMARY KEY, n numeric NOT NULL, d double precision NOT NULL, label text)",
        "INSERT INTO nums VALUES (0, 'NaN', 'Infinity', 'before')",  # read by the snapshot, as text
    )
    process = start_source(stack, dbs, topic_prefix, new_slot())
    execute(
        dbs,
        "INSERT INTO nums VALUES (1, 'NaN', 1.5, 'a')",
        "INSERT INTO nums VALUES (2, 'NaN', 'Infinity', 'b')",
        "INSERT INTO nums VALUES (3, 2.5, '-Infinity', 'c')",
        "INSERT INTO nums VALUES (4, 4.25, 4.25, 'd')",
    )
    nums = topic_of(topic_prefix, "nums")
    events = wait_then_stop(stack, [nums], count(nums, 5), "the rows", process)
    stderr = process.stderr_text()

    assert [e.after for e in events] == [
        {"id": 0, "n": "NaN", "d": "Infinity", "label": "before"},  # the snapshot reads the text: kept
        {"id": 1, "n": None, "d": "1.5", "label": "a"},  # wal2json 2.5 prints NaN as null: lost
        {"id": 2, "n": None, "d": None, "label": "b"},
        {"id": 3, "n": "2.5", "d": None, "label": "c"},
        {"id": 4, "n": "4.25", "d": "4.25", "label": "d"},
    ], describe(events)
    assert re.search(r"INFO .* wal2json (sends every number as a string|here is older than 2\.6)", stderr), (
        f"the start-up log must say whether NaN survives the stream:\n{stderr}"
    )
    warnings = [line for line in stderr.splitlines() if "NOT NULL but arrived as null" in line]
    assert len(warnings) == 2, f"one warning per table and column:\n{stderr}"
    for column, line in zip(("n", "d"), warnings, strict=True):
        assert " WARNING " in line and f"column {column} of public.nums " in line, line
    assert_envelopes_valid()


# --- 10. errors ----------------------------------------------------------------------------


def test_error_cannot_connect_wrong_port(stack: Stack, topic_prefix: str) -> None:
    result = run_cli(
        [
            "cdc-source",
            "--source-dsn",
            "postgresql://postgres:postgres@127.0.0.1:1/nowhere",
            "--bootstrap-servers",
            stack.bootstrap_servers,
            "--topic-prefix",
            topic_prefix,
            "--slot",
            new_slot(),
            "--log-format",
            "text",
        ],
        timeout=120,
    )
    line = error_line(result)
    assert "cannot connect to the source database" in line and "127.0.0.1:1" in line, line


def test_error_wrong_password_is_not_printed(stack: Stack, dbs: Databases, topic_prefix: str) -> None:
    secret = f"wrong-{uuid.uuid4().hex[:10]}"
    bad = Databases(dbs.name, make_dsn(dbs.source_dsn, password=secret), dbs.target_dsn)
    result = run_cli(source_command(stack, bad, topic_prefix, new_slot()), timeout=120)
    line = error_line(result)
    assert "cannot connect to the source database" in line and "password authentication failed" in line, line
    assert secret not in result.stdout + result.stderr, "the password leaked"


def test_error_missing_table(stack: Stack, dbs: Databases, topic_prefix: str) -> None:
    execute(dbs, "CREATE TABLE item (id int PRIMARY KEY)")
    result = run_cli(
        source_command(stack, dbs, topic_prefix, new_slot(), "--tables", "public.item,public.nosuch"), timeout=120
    )
    line = error_line(result)
    assert "public.nosuch" in line and "does not exist" in line and "--tables" in line, line


def test_error_table_without_primary_key(stack: Stack, dbs: Databases, topic_prefix: str) -> None:
    execute(dbs, "CREATE TABLE item (id int PRIMARY KEY)", "CREATE TABLE nopk (a int, b text)")
    for extra in (["--tables", "public.item,public.nopk"], []):  # named, and found among all tables
        result = run_cli(source_command(stack, dbs, topic_prefix, new_slot(), *extra), timeout=120)
        line = error_line(result)
        assert "public.nopk" in line and "primary key" in line and "REPLICA IDENTITY" in line, line
    assert not psql_rows(dbs.source_dsn, "SELECT 1 FROM pg_replication_slots WHERE database = %s", (dbs.name,))


def test_error_slot_in_use(stack: Stack, dbs: Databases, topic_prefix: str) -> None:
    execute(dbs, "CREATE TABLE item (id int PRIMARY KEY)")
    slot = new_slot()
    first = start_source(stack, dbs, topic_prefix, slot)
    second = run_cli(source_command(stack, dbs, topic_prefix, slot), timeout=180)
    line = error_line(second, alone=False)
    assert slot in line and "in use" in line, line
    assert first.poll() is None, f"the first connector died:\n{first.stderr_text()}"
    # drop-slot refuses too while the slot is in use.
    dropped = run_cli(drop_slot_command(stack, dbs, topic_prefix, slot), timeout=120)
    line = error_line(dropped)
    assert slot in line and "in use" in line, line
    # The first one is unharmed: it still streams.
    execute(dbs, "INSERT INTO item VALUES (1)")
    items = topic_of(topic_prefix, "item")
    events = wait_then_stop(stack, [items], count(items, 1), "the insert", first)
    assert [(e.key, e.op) for e in events] == [(b'{"id":1}', "c")]
    assert_envelopes_valid()


def test_error_kafka_unreachable(dbs: Databases, topic_prefix: str) -> None:
    execute(dbs, "CREATE TABLE item (id int PRIMARY KEY)")
    result = run_cli(
        [
            "cdc-source",
            "--source-dsn",
            dbs.source_dsn,
            "--bootstrap-servers",
            "127.0.0.1:1",
            "--kafka-timeout",
            "3",
            "--topic-prefix",
            topic_prefix,
            "--slot",
            new_slot(),
            "--log-format",
            "text",
        ],
        timeout=120,
    )
    line = error_line(result, alone=False)
    assert "Kafka is unreachable at 127.0.0.1:1" in line and "--bootstrap-servers" in line, line


# --- 11. crash safety ------------------------------------------------------------------------


def key_text(key: bytes | None) -> str:
    assert key is not None
    [value] = json.loads(key).values()
    return str(value)


def differences(stack: Stack, dbs: Databases, prefix: str) -> list[str]:
    """What the topics miss or have wrong compared with the source tables (empty: none)."""
    problems: list[str] = []
    topics = {table: topic_of(prefix, table) for table in ("person", "orders")}
    events = read_events(stack, topics.values())
    for table, topic in topics.items():
        rows = source_text_rows(dbs, table)
        last: dict[str, Event] = {}
        for e in on(events, topic):  # one partition: offsets order every key's events
            last[key_text(e.key)] = e
        for key, row in rows.items():
            found = last.get(key)
            if found is None:
                problems.append(f"{table} id={key}: in the source, never in {topic}")
            elif found.op not in ("c", "u", "r"):
                problems.append(
                    f"{table} id={key}: in the source, but its last event is {found.op or 'a tombstone'}"
                )
            elif {k: as_text(v) for k, v in (found.after or {}).items()} != row:
                problems.append(
                    f"{table} id={key}: last event {found.op}@{found.offset} {found.after} != source {row}"
                )
        for key, e in last.items():
            if e.op in ("c", "u", "r") and key not in rows:
                problems.append(f"{table} id={key}: deleted in the source, last event {e.op}@{e.offset}")
    return problems


def total(stack: Stack, topics: list[str]) -> int:
    """Messages in `topics` so far (the sum of their high watermarks: nothing is ever deleted)."""
    consumer = Consumer({"bootstrap.servers": stack.bootstrap_servers, "group.id": f"count-{uuid.uuid4().hex}"})
    try:
        metadata = consumer.list_topics(timeout=10)
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for topic in topics
            if topic in metadata.topics
            for p in metadata.topics[topic].partitions
        )
    finally:
        consumer.close()


def people(dbs: Databases) -> int:
    """Rows in the writer's person table (0 before the writer created it)."""
    found = psql_rows(dbs.source_dsn, "SELECT to_regclass('public.person') IS NOT NULL")
    return int(psql_rows(dbs.source_dsn, "SELECT count(*) FROM person")[0][0]) if found[0][0] else 0


def test_crash_safety_kill_9_loses_nothing(stack: Stack, dbs: Databases, topic_prefix: str) -> None:
    writer = start_cli(
        ["cdc-writer", "--source-dsn", dbs.source_dsn, "--rate", "0", "--batch", "20", "--log-format", "text"]
    )
    wait_until(
        lambda: writer.poll() is not None or people(dbs) >= 200,
        timeout=120,
        message="the writer never wrote 200 people",
    )
    assert writer.poll() is None, f"the writer exited:\n{writer.stderr_text()}"
    slot = new_slot()
    topics = [topic_of(topic_prefix, "person"), topic_of(topic_prefix, "orders")]

    # First kill: shortly after streaming began, with changes in flight.
    first = start_source(stack, dbs, topic_prefix, slot)
    seen = total(stack, topics)
    wait_until(lambda: total(stack, topics) > seen + 200, timeout=120, message="no changes streamed")
    assert stop_process(first, signal.SIGKILL) == -signal.SIGKILL

    # Second kill: later in a run, once it has confirmed positions of its own to the slot.
    before = slot_row(dbs, slot)
    assert before is not None
    second = start_source(stack, dbs, topic_prefix, slot)
    seen = total(stack, topics)

    def well_under_way() -> bool:
        assert second.poll() is None, f"the restarted connector exited:\n{second.stderr_text()}"
        row = slot_row(dbs, slot)
        assert row is not None
        return lsn_to_int(row[1]) > lsn_to_int(before[1]) and total(stack, topics) > seen + 3000

    wait_until(well_under_way, timeout=240, message="the restarted connector never confirmed a position")
    assert stop_process(second, signal.SIGKILL) == -signal.SIGKILL

    third = start_source(stack, dbs, topic_prefix, slot)
    seen = total(stack, topics)
    wait_until(lambda: total(stack, topics) > seen + 500, timeout=120, message="no changes after the last restart")
    # Under sustained writes the slot's confirmed position keeps moving (it must not wait for an
    # idle moment: the source keeps all WAL since the last confirmed position).
    positions: set[int] = set()

    def slot_moves() -> bool:
        assert writer.poll() is None, f"the writer exited:\n{writer.stderr_text()}"
        row = slot_row(dbs, slot)
        assert row is not None
        positions.add(lsn_to_int(row[1]))
        return len(positions) >= 4

    wait_until(slot_moves, timeout=120, interval=0.5, message="the slot's confirmed_flush_lsn did not advance")
    assert stop_process(writer) == 0, f"the writer did not stop cleanly:\n{writer.stderr_text()}"

    problems: list[str] = []

    def caught_up() -> bool:
        assert third.poll() is None, f"cdc-source exited:\n{third.stderr_text()}"
        problems[:] = differences(stack, dbs, topic_prefix)
        return not problems

    try:
        wait_until(caught_up, timeout=300, interval=1, message="the topics never matched the source")
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}: {len(problems)} differences, first ones:\n" + "\n".join(problems[:20])
        ) from None
    stop_source(third)
    assert differences(stack, dbs, topic_prefix) == []

    # The slot never ran ahead of what the state topic says was confirmed.
    row = slot_row(dbs, slot)
    assert row is not None and row[0] is False, row
    confirmed = lsn_to_int(row[1])
    states = state_records(stack, topic_prefix, slot)
    assert states and states[-1] is not None, states
    assert confirmed <= states[-1]["bound_lsn"], (row, states[-1])
    assert_envelopes_valid()


# --- 12. drop-slot, and slots that changed behind the connector's back -----------------------


def drop_slot_command(stack: Stack, dbs: Databases, prefix: str, slot: str) -> list[str]:
    command = source_command(stack, dbs, prefix, slot)
    return [command[0], "drop-slot", *command[1:]]


def test_own_connection_lost_mid_transaction_releases_the_slot_and_confirms_again(
    stack: Stack, dbs: Databases, topic_prefix: str
) -> None:
    """The connector's own connection is gone and cannot come back (the database refuses
    connections) when a transaction needs a table lookup: the replication connection is closed at
    once (its walsender would hold the slot, and a server shutdown, until wal_sender_timeout), and
    once connections are allowed again the cut transaction is streamed and confirmed."""
    execute(dbs, "CREATE TABLE item (id int PRIMARY KEY, label text)", "INSERT INTO item VALUES (1, 'a')")
    slot = new_slot()
    items = topic_of(topic_prefix, "item")
    process = start_source(stack, dbs, topic_prefix, slot)
    admin = stack.source_admin_dsn
    writer = psycopg2.connect(dbs.source_dsn, connect_timeout=10)  # opened while connections are allowed
    try:
        psql_rows(
            admin,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
            "AND application_name = 'cdc-source' AND backend_type = 'client backend'",
            (dbs.name,),
        )
        psql_rows(admin, sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(dbs.name)))
        try:
            with writer, writer.cursor() as cur:  # a new column: the source looks the table up again
                cur.execute("ALTER TABLE item ADD COLUMN extra integer")
                cur.execute("INSERT INTO item VALUES (2, 'b', 7)")
            wait_until(
                lambda: "cannot connect to the source database" in process.stderr_text(),
                timeout=30,
                message=f"the table lookup did not fail:\n{process.stderr_text()}",
            )
            wait_until(
                lambda: (
                    psql_rows(admin, "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,))
                    == [(False,)]
                ),
                timeout=10,
                message="the slot stays active: the replication connection was not closed",
            )
        finally:
            psql_rows(admin, sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(dbs.name)))
    finally:
        writer.close()
    [(now,)] = psql_rows(admin, "SELECT pg_current_wal_lsn()::text")
    wait_until(
        lambda: (row := slot_row(dbs, slot)) is not None and lsn_to_int(row[1]) >= lsn_to_int(now),
        timeout=60,
        message=f"the slot never confirmed {now} after the cut transaction",
    )
    events = wait_then_stop(stack, [items], count(items, 2), "the cut transaction", process)
    assert [(e.op, e.key) for e in events][-1] == ("c", b'{"id":2}'), describe(events)
    assert_envelopes_valid()


def test_drop_slot_then_new_snapshot(stack: Stack, dbs: Databases, topic_prefix: str) -> None:
    execute(
        dbs, "CREATE TABLE item (id int PRIMARY KEY, label text)", "INSERT INTO item VALUES (1, 'a'), (2, 'b')"
    )
    slot = new_slot()
    items = topic_of(topic_prefix, "item")
    process = start_source(stack, dbs, topic_prefix, slot)
    execute(dbs, "INSERT INTO item VALUES (3, 'c')")
    wait_for_events(stack, [items], count(items, 3), "snapshot and insert", process)
    stop_source(process)

    result = run_cli(drop_slot_command(stack, dbs, topic_prefix, slot), timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"slot {slot} dropped; connector state cleared" in result.stdout
    assert slot_row(dbs, slot) is None, "drop-slot left the slot"
    assert state_records(stack, topic_prefix, slot)[-1] is None, "the state record is cleared by a tombstone"

    process = start_source(stack, dbs, topic_prefix, slot)
    events = wait_then_stop(stack, [items], count(items, 6), "the new snapshot", process)
    assert [(e.op, e.key) for e in events] == [
        ("r", b'{"id":1}'),
        ("r", b'{"id":2}'),
        ("c", b'{"id":3}'),
        ("r", b'{"id":1}'),
        ("r", b'{"id":2}'),
        ("r", b'{"id":3}'),
    ], describe(events)
    assert events[3].source["lsn"] > events[0].source["lsn"], "the new snapshot is at the new slot's point"
    assert slot_row(dbs, slot) is not None

    result = run_cli(drop_slot_command(stack, dbs, topic_prefix, slot + "_none"), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "did not exist" in result.stdout
    assert_envelopes_valid()


def test_slot_dropped_while_stopped_is_refused(stack: Stack, dbs: Databases, topic_prefix: str) -> None:
    execute(dbs, "CREATE TABLE item (id int PRIMARY KEY)")
    slot = new_slot()
    process = start_source(stack, dbs, topic_prefix, slot)
    execute(dbs, "INSERT INTO item VALUES (1)")
    items = topic_of(topic_prefix, "item")
    wait_for_events(stack, [items], count(items, 1), "the insert", process)
    stop_source(process)

    psql_rows(dbs.source_dsn, "SELECT pg_drop_replication_slot(%s)", (slot,))
    result = run_cli(source_command(stack, dbs, topic_prefix, slot), timeout=120)
    line = error_line(result, alone=False)
    assert f"slot {slot} is gone" in line and f"cdc-source drop-slot --slot {slot}" in line, line
    assert slot_row(dbs, slot) is None, "a refused start must not create the slot"

    # The way out the message names works.
    result = run_cli(drop_slot_command(stack, dbs, topic_prefix, slot), timeout=120)
    assert result.returncode == 0 and "did not exist" in result.stdout, result.stderr
    process = start_source(stack, dbs, topic_prefix, slot)
    events = wait_then_stop(stack, [items], count(items, 2), "the new snapshot", process)
    assert [(e.op, e.key) for e in events] == [("c", b'{"id":1}'), ("r", b'{"id":1}')]
    assert_envelopes_valid()


def test_slot_recreated_while_stopped_is_refused(stack: Stack, dbs: Databases, topic_prefix: str) -> None:
    execute(dbs, "CREATE TABLE item (id int PRIMARY KEY)")
    slot = new_slot()
    process = start_source(stack, dbs, topic_prefix, slot)
    execute(dbs, "INSERT INTO item VALUES (1)")
    items = topic_of(topic_prefix, "item")
    wait_for_events(stack, [items], count(items, 1), "the insert", process)
    stop_source(process)

    execute(dbs, "INSERT INTO item VALUES (2)")  # a change the recreated slot will never show
    psql_rows(dbs.source_dsn, "SELECT pg_drop_replication_slot(%s)", (slot,))
    psql_rows(dbs.source_dsn, "SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (slot,))
    result = run_cli(source_command(stack, dbs, topic_prefix, slot), timeout=120)
    line = error_line(result, alone=False)
    assert "recreated" in line and "consumed by another client" in line, line
    assert f"cdc-source drop-slot --slot {slot}" in line, line
    assert_envelopes_valid()
    assert_envelopes_valid()


def replay(events: list[Event]) -> dict[str, Any]:
    """What a consumer replaying the topic from the start ends up with: the rows by key."""
    rows: dict[str, Any] = {}
    for e in events:
        if e.value is None or e.op == "d":
            rows.pop(key_text(e.key), None)
        elif e.op == "t":
            rows.clear()
        else:
            rows[key_text(e.key)] = e.after
    return rows


def test_snapshot_killed_half_way_is_replaced_not_mixed(stack: Stack, dbs: Databases, topic_prefix: str) -> None:
    """kill -9 during the initial snapshot, rows deleted meanwhile, restart: the new snapshot starts
    with a truncate, so replaying the topic gives today's table, not the deleted rows back."""
    execute(
        dbs,
        "CREATE TABLE public.big (id integer PRIMARY KEY, pad text)",
        "INSERT INTO public.big SELECT g, repeat('x', 200) FROM generate_series(1, 100000) g",
    )
    slot, topic = new_slot(), topic_of(topic_prefix, "big")
    first = start_cli(source_command(stack, dbs, topic_prefix, slot))
    probe = Consumer({"bootstrap.servers": stack.bootstrap_servers, "group.id": "probe", "log_level": 0})

    def published() -> int:
        if first.poll() is not None:
            raise AssertionError(f"cdc-source exited:\n{first.stderr_text()}")
        try:
            return int(probe.get_watermark_offsets(TopicPartition(topic, 0), timeout=2)[1])
        except Exception:
            return 0

    wait_until(lambda: published() > 0, timeout=120, interval=0.05, message="no snapshot row published")
    first.send_signal(signal.SIGKILL)
    probe.close()
    first.wait(30)
    execute(dbs, "DELETE FROM public.big WHERE id <= 500")
    again = start_source(stack, dbs, topic_prefix, slot)
    events = wait_then_stop(stack, [topic], count(topic, 100000 - 500), "the second snapshot", again, timeout=240)
    reads = [e for e in events if e.op == "r"]
    assert len(reads) > 100000 - 500, (
        f"the first snapshot did not publish anything before the kill ({len(reads)} reads)"
    )
    assert any(e.op == "t" for e in events), (
        f"the restarted snapshot did not begin with a truncate ({len(reads)} reads):\n{again.stderr_text()}"
    )
    replayed = replay(events)
    assert len(replayed) == 100000 - 500
    assert "1" not in replayed and "500" not in replayed and "501" in replayed
    assert_envelopes_valid()
