"""cdc-sink --consistency transaction against the real Kafka and target: messages made by hand
(schemas.codec for the changes, schemas.transactions for BEGIN and END) and produced straight to the
topics, so each test decides what the sink has read when.

Every transaction here sets `v` of every row of two tables to its own number: a reader of the target
that ever sees two values of `v` at once saw part of a transaction.
"""

import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg2
import pytest
from confluent_kafka import Producer
from confluent_kafka.cimpl import NewTopic  # confluent_kafka.admin re-exports it without declaring so
from prometheus_client.parser import text_string_to_metric_families

from pg_kafka_cdc.common.lsn import int_to_lsn
from schemas import codec, transactions
from schemas.envelope import Source, TombstoneSource
from schemas.partitioner import partition_for
from tests.conftest import Databases, Stack, admin_client
from tests.helpers import CliProcess, psql_rows, run_cli, wait_until
from tests.kafka_broker import free_port
from tests.pipeline import error_line, execute, sink_args, start_sink, stop_cleanly, wait_for_output

STREAM = "7000000000000000001:slot_t:16B3748"
TABLES = {"a": 3, "b": 2}  # table -> partitions of its topic
ROWS = {"a": 24, "b": 12}
COLUMNS = {"id": "integer", "v": "integer"}
TARGET_TABLES = (
    "CREATE TABLE public.a (id integer PRIMARY KEY, v integer NOT NULL)",
    "CREATE TABLE public.b (id integer PRIMARY KEY, v integer NOT NULL)",
    "CREATE SCHEMA audit",
    "CREATE TABLE audit.writes (tab text NOT NULL, op text NOT NULL, id integer NOT NULL, v integer)",
    """CREATE FUNCTION audit.count_write() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'DELETE' THEN
            INSERT INTO audit.writes VALUES (TG_TABLE_NAME, 'd', OLD.id, NULL);
        ELSE
            INSERT INTO audit.writes VALUES (TG_TABLE_NAME, lower(left(TG_OP, 1)), NEW.id, NEW.v);
        END IF;
        RETURN NULL;
    END $$""",
    "CREATE TRIGGER count_write AFTER INSERT OR UPDATE OR DELETE ON public.a "
    "FOR EACH ROW EXECUTE FUNCTION audit.count_write()",
    "ALTER TABLE public.a ENABLE ALWAYS TRIGGER count_write",
    "CREATE TRIGGER count_write AFTER INSERT OR UPDATE OR DELETE ON public.b "
    "FOR EACH ROW EXECUTE FUNCTION audit.count_write()",
    "ALTER TABLE public.b ENABLE ALWAYS TRIGGER count_write",
)

Record = tuple[str, int, bytes | None, bytes | None, list[tuple[str, bytes]] | None]


@dataclass
class Transaction:
    """One source transaction's messages: BEGIN, the changes (topic, partition, key, value, headers), END."""

    begin: Record
    changes: list[Record]
    end: Record

    def of(self, table: str) -> list[Record]:
        return [r for r in self.changes if r[0].endswith(f".public.{table}")]


@dataclass
class Topics:
    """The change topics of tables a and b and the transaction topic of a prefix, and the messages a
    source would write to them."""

    bootstrap: str
    prefix: str
    producer: Any = None
    commit_lsn: int = 0x1000000
    xid: int = 700

    def __post_init__(self) -> None:
        admin = admin_client(self.bootstrap)
        new = [NewTopic(self.topic(t), n, 1) for t, n in TABLES.items()]
        new.append(NewTopic(transactions.transaction_topic(self.prefix), 1, 1))
        for future in admin.create_topics(new, operation_timeout=30).values():
            future.result()
        self.producer = Producer({"bootstrap.servers": self.bootstrap, "enable.idempotence": True, "linger.ms": 1})

    def topic(self, table: str) -> str:
        return f"{self.prefix}.public.{table}"

    @property
    def tx_topic(self) -> str:
        return transactions.transaction_topic(self.prefix)

    def transaction(
        self, v: int, ids: dict[str, range], op: str = "u", delete: dict[str, range] | None = None
    ) -> Transaction:
        """A transaction writing `v` into the rows `ids` (op c or u), deleting the rows `delete`."""
        self.commit_lsn += 0x1000
        self.xid += 1
        lsn, xid, ts_us = self.commit_lsn, self.xid, int(time.time() * 1e6)
        changes: list[Record] = []
        counts: dict[str, tuple[str, int]] = {}
        seq = 0
        for table, keys in ids.items():
            for i in keys:
                seq += 1
                changes.append(self._change(table, i, op, {"id": i, "v": v}, lsn, xid, ts_us, seq))
        for table, keys in (delete or {}).items():
            for i in keys:
                seq += 1
                change = self._change(table, i, "d", {"id": i, "v": 0}, lsn, xid, ts_us, seq)
                position: TombstoneSource = {"txId": xid, "lsn": lsn - 8, "commit_lsn": lsn, "ts_us": ts_us}
                position["seq"], position["stream"] = seq, STREAM
                tombstone = (
                    change[0],
                    change[1],
                    change[2],
                    None,
                    [("cdc.source", codec.encode_tombstone(position))],
                )
                changes += [change, tombstone]
        for topic, *_ in changes:
            name = topic.split(".", 1)[1]
            counts[topic] = (name, counts.get(topic, (name, 0))[1] + 1)
        key = transactions.encode_key(xid, lsn)
        begin = (self.tx_topic, 0, key, transactions.encode_begin(STREAM, xid, lsn, ts_us), None)
        end = (self.tx_topic, 0, key, transactions.encode_end(STREAM, xid, lsn, ts_us, seq + 1, counts), None)
        return Transaction(begin, changes, end)

    def _change(
        self, table: str, i: int, op: str, row: dict[str, int], lsn: int, xid: int, ts_us: int, seq: int
    ) -> Record:
        source: Source = {
            "version": "1",
            "connector": "cdc-source",
            "name": self.prefix,
            "db": "src",
            "schema": "public",
            "table": table,
            "slot": "slot_t",
            "lsn": lsn - 16,
            "commit_lsn": lsn,
            "txId": xid,
            "ts_ms": ts_us // 1000,
            "ts_us": ts_us,
            "seq": seq,
            "snapshot": False,
            "stream": STREAM,
        }
        before, after = (row, None) if op == "d" else (None, row)
        value = codec.encode(before, after, op, ts_us // 1000, source, COLUMNS, ["id"])  # type: ignore[arg-type]
        key = codec.encode_key(row, ["id"])
        return self.topic(table), partition_for(key, TABLES[table]), key, value, None

    def send(self, *records: Record) -> None:
        for topic, partition, key, value, headers in records:
            self.producer.produce(topic, value, key, partition, headers=headers)
        assert self.producer.flush(30) == 0

    def send_whole(self, tx: Transaction) -> None:
        self.send(tx.begin, *tx.changes, tx.end)


def every_row() -> dict[str, range]:
    """The rows of the first transaction."""
    return {t: range(1, n + 1) for t, n in ROWS.items()}


def values(dbs: Databases) -> list[tuple[int, int, int]]:
    """(rows, min v, max v) of both tables, read in one statement."""
    return [
        (int(n), int(lo or 0), int(hi or 0))
        for n, lo, hi in psql_rows(
            dbs.target_dsn,
            "SELECT count(*), min(v), max(v) FROM (SELECT v FROM public.a UNION ALL SELECT v FROM public.b) x",
        )
    ]


def wait_for_value(dbs: Databases, v: int, sink: CliProcess, rows: int = sum(ROWS.values())) -> None:
    def reached() -> bool:
        assert sink.poll() is None, f"the sink exited:\n{sink.stderr_text()[-3000:]}"
        return values(dbs) == [(rows, v, v)]

    wait_until(reached, timeout=60, interval=0.1, message=f"the target never held v = {v} everywhere")


@dataclass
class Reader:
    """Reads the target many times a second; every observation of two values of `v` at once is kept."""

    dsn: str
    broken: list[tuple[int, int, int]] = field(default_factory=list)
    reads: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        conn = psycopg2.connect(self.dsn, connect_timeout=10)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                while not self.done.is_set():
                    try:
                        cur.execute(
                            "SELECT count(*), min(v), max(v) FROM (SELECT v FROM public.a UNION ALL SELECT v FROM "
                            "public.b) x"
                        )
                    except psycopg2.errors.UndefinedTable:  # not created yet
                        time.sleep(0.05)
                        continue
                    row = cur.fetchone()
                    assert row is not None
                    n, lo, hi = row
                    self.reads += 1
                    if lo != hi:
                        self.broken.append((n, lo, hi))
                    time.sleep(0.005)
        finally:
            conn.close()


@pytest.fixture
def reader(dbs: Databases) -> Iterator[Reader]:
    found = Reader(dbs.target_dsn)
    thread = threading.Thread(target=found.run, daemon=True)
    thread.start()
    yield found
    found.done.set()
    thread.join(10)


def sink_options(*extra: str) -> tuple[str, ...]:
    return ("--snapshot", "topic", "--consistency", "transaction", "--batch-wait-ms", "5", *extra)


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {s.name: float(s.value) for f in text_string_to_metric_families(text) for s in f.samples}


def status_json(dbs: Databases, prefix: str, group: str) -> dict[str, Any]:
    result = run_cli(
        [
            "cdc-status",
            "--source-dsn",
            dbs.source_dsn,
            "--target-dsn",
            dbs.target_dsn,
            "--topic-prefix",
            prefix,
            "--group",
            group,
            "--json",
            "--log-format",
            "text",
        ],
        timeout=60,
    )
    assert result.returncode in (0, 1), result.stderr
    doc: dict[str, Any] = orjson.loads(result.stdout)
    return doc


def test_a_transaction_read_in_pieces_is_committed_at_once(
    dbs: Databases, stack: Stack, topic_prefix: str, reader: Reader
) -> None:
    execute(dbs.target_dsn, *TARGET_TABLES)
    topics = Topics(stack.bootstrap_servers, topic_prefix)
    topics.send_whole(topics.transaction(0, every_row(), op="c"))
    group, port = f"group_{topic_prefix}", free_port()
    sink = start_sink(dbs, topic_prefix, "slot_t", group, *sink_options("--metrics-port", str(port)))
    wait_for_value(dbs, 0, sink)

    # the change topics first, the transaction's END last, in separate consumes
    t1 = topics.transaction(1, every_row())
    topics.send(t1.begin, *t1.of("a"))
    time.sleep(1.5)
    assert values(dbs) == [(36, 0, 0)], "part of a transaction was applied"
    topics.send(*t1.of("b"))
    time.sleep(1.0)
    assert values(dbs) == [(36, 0, 0)], "a transaction was applied before its END was read"
    topics.send(t1.end)
    wait_for_value(dbs, 1, sink)

    # many transactions, their records read before or after their changes
    for v in range(2, 40):
        tx = topics.transaction(v, every_row())
        if v % 2:
            topics.send(tx.begin, tx.end, *tx.changes)
        else:
            topics.send(tx.begin, *tx.of("b"), *tx.of("a"), tx.end)  # (each partition in order)
    # and one that deletes rows (their tombstones count too)
    topics.send_whole(topics.transaction(40, {"a": range(1, 20), "b": range(1, 13)}, delete={"a": range(20, 25)}))
    wait_for_value(dbs, 40, sink, rows=36 - 5)

    assert reader.reads > 50, f"the reader only read {reader.reads} times"
    assert not reader.broken, f"readers saw part of a transaction: {reader.broken[:5]}"

    lsn = int_to_lsn(topics.commit_lsn)
    wait_for_output(sink, f"consistent as of source commit {lsn}", timeout=15)
    metrics = scrape(port)
    assert metrics["cdc_sink_consistent_commit_lsn"] == topics.commit_lsn
    assert metrics["cdc_sink_source_transactions_applied_total"] == 41
    assert abs(metrics["cdc_sink_consistent_commit_timestamp_seconds"] - time.time()) < 120
    point = status_json(dbs, topic_prefix, group)["sink"]["consistency"]
    assert point["commit_lsn"] == lsn and point["reached"] is True and point["transactions"] == 41, point
    assert point["line"].startswith(f"consistent as of source commit {lsn} at "), point
    stop_cleanly(sink)


def writes(dbs: Databases, v: int) -> list[tuple[str, int, int]]:
    """(table, id, times) of the row writes that wrote `v`, written more than once."""
    return [
        (str(t), int(i), int(n))
        for t, i, n in psql_rows(
            dbs.target_dsn,
            "SELECT tab, id, count(*) FROM audit.writes WHERE v = %s GROUP BY 1, 2 HAVING count(*) > 1",
            (v,),
        )
    ]


def idle_in_transaction(dbs: Databases) -> bool:
    rows = psql_rows(
        dbs.target_dsn,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'cdc-sink' "
        "AND state = 'idle in transaction'",
    )
    return bool(rows[0][0])


def test_a_sink_killed_inside_a_large_transaction_applies_it_once(
    dbs: Databases, stack: Stack, topic_prefix: str, reader: Reader
) -> None:
    execute(dbs.target_dsn, *TARGET_TABLES)
    topics = Topics(stack.bootstrap_servers, topic_prefix)
    topics.send_whole(topics.transaction(0, every_row(), op="c"))
    group = f"group_{topic_prefix}"
    options = sink_options("--batch-size", "200")
    sink = start_sink(dbs, topic_prefix, "slot_t", group, *options)
    wait_for_value(dbs, 0, sink)

    # 3,000 rows written by one transaction (36 updated, the others inserted); its END held back
    big = {"a": range(1, 2001), "b": range(1, 1001)}
    large = topics.transaction(1, big)
    topics.send(large.begin, *large.changes)
    wait_until(
        lambda: idle_in_transaction(dbs), timeout=30, message="the sink never opened a transaction for the pieces"
    )
    assert values(dbs) == [(36, 0, 0)], "pieces of a transaction were committed"
    sink.send_signal(signal.SIGKILL)
    sink.wait(10)
    assert psql_rows(dbs.target_dsn, "SELECT count(*) FROM audit.writes WHERE v = 1") == [(0,)]

    topics.send(large.end)
    after = topics.transaction(2, big)
    topics.send_whole(after)
    again = start_sink(dbs, topic_prefix, "slot_t", group, *options)
    wait_for_value(dbs, 2, again, rows=3000)
    assert not reader.broken, f"readers saw part of a transaction: {reader.broken[:5]}"
    assert writes(dbs, 1) == [] and writes(dbs, 2) == [], "a change was written twice"
    [(ones,)] = psql_rows(dbs.target_dsn, "SELECT count(*) FROM audit.writes WHERE v = 1")
    assert ones == 3000, f"{ones} rows written by the large transaction, not 3000"
    stop_cleanly(again)


def test_what_transaction_consistency_refuses(dbs: Databases, stack: Stack, topic_prefix: str) -> None:
    group = f"group_{topic_prefix}"
    dlq = run_cli(sink_args(dbs, topic_prefix, "slot_t", group, *sink_options("--on-error", "dlq")), timeout=60)
    assert dlq.returncode == 2, dlq.stderr
    assert dlq.stderr.strip().splitlines() == [
        "cdc-sink: error: --on-error dlq cannot be used with --consistency transaction: a dead letter would "
        "apply part of a source transaction; use --on-error fail"
    ], dlq.stderr

    # change topics without the transaction topic: a source without --transaction-metadata
    lone = f"{topic_prefix}x"
    admin = admin_client(stack.bootstrap_servers)
    for future in admin.create_topics([NewTopic(f"{lone}.public.a", 1, 1)], operation_timeout=30).values():
        future.result()
    try:
        missing = run_cli(sink_args(dbs, lone, "slot_t", group, *sink_options("--kafka-timeout", "3")), timeout=60)
        line = error_line("cdc-sink", missing, alone=False)
        assert line == (
            f"topic {lone}.transaction does not exist: run cdc-source with --transaction-metadata (needed by "
            "--consistency transaction)"
        ), line
    finally:
        for future in admin.delete_topics([f"{lone}.public.a"], operation_timeout=30).values():
            future.result()

    # a second sink in the group
    execute(dbs.target_dsn, *TARGET_TABLES)
    topics = Topics(stack.bootstrap_servers, topic_prefix)
    topics.send_whole(topics.transaction(0, every_row(), op="c"))
    first = start_sink(dbs, topic_prefix, "slot_t", group, *sink_options())
    wait_for_value(dbs, 0, first)
    second = run_cli(sink_args(dbs, topic_prefix, "slot_t", group, *sink_options()), timeout=90)
    line = error_line("cdc-sink", second, alone=False)
    assert line.startswith(
        f"--consistency transaction needs one cdc-sink to hold every partition: group {group} has another member "
        f"holding {topic_prefix}."
    ), line
    assert line.endswith("; run a single cdc-sink in this group"), line
    topics.send_whole(topics.transaction(1, every_row()))
    wait_for_value(dbs, 1, first)  # the first one goes on
    stop_cleanly(first)


def test_sinks_started_together_do_not_share_the_partitions(
    dbs: Databases, stack: Stack, topic_prefix: str
) -> None:
    """Both pass the check before joining; the assignment splits the partitions between them, and
    each one that finds the other holding some refuses; the target never gets a piece."""
    group = f"group_{topic_prefix}"
    execute(dbs.target_dsn, *TARGET_TABLES)
    topics = Topics(stack.bootstrap_servers, topic_prefix)
    topics.send_whole(topics.transaction(0, every_row(), op="c"))
    sinks = [start_sink(dbs, topic_prefix, "slot_t", group, *sink_options()) for _ in range(2)]
    wait_until(lambda: any(p.poll() is not None for p in sinks), timeout=60, message="both sinks run together")
    refused = [p for p in sinks if p.poll() is not None]
    for p in refused:
        assert p.returncode == 1, p.stderr_text()[-2000:]
        assert (
            f"--consistency transaction needs one cdc-sink to hold every partition: group {group} has another "
            "member holding "
        ) in p.stderr_text(), p.stderr_text()[-2000:]
    running = [p for p in sinks if p.poll() is None]
    if running:
        # The other one may have checked while the first still held its share, and refuses too; or it
        # got every partition once the first had left, and applies the whole transaction.
        rows = sum(ROWS.values())
        wait_until(
            lambda: running[0].poll() is not None or values(dbs) == [(rows, 0, 0)],
            timeout=60,
            interval=0.1,
            message="the second sink neither refused nor applied the transaction",
        )
        if running[0].poll() is not None:
            assert running[0].returncode == 1 and "needs one cdc-sink to hold every partition" in (
                running[0].stderr_text()
            ), running[0].stderr_text()[-2000:]
            assert values(dbs) == [(0, 0, 0)], "a refusing sink applied nothing"
        else:
            stop_cleanly(*running)
