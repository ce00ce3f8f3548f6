"""cdc-source against the real stack with a value larger than Kafka accepts. Over the topic's
max.message.bytes: it stays up, logs one line naming the table, key, size, limits and fix, answers
/healthz with 503, counts the message, publishes and confirms nothing after it (the changes of
another table wait too: per-key order is kept by holding the whole stream), and once the limit is
raised everything goes through in order, without a restart, and the target ends identical. A stop
while stuck exits cleanly and keeps the change in the slot. Over the producer's message.max.bytes
(set in --kafka-config): the line says to restart with a larger one, and the restart delivers it.
(The `reader` fixture keeps the envelopes a test read: see tests/source_events.py.)"""

import re
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg2
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
    ResourceType,
)

from tests.conftest import Databases, Stack, admin_client
from tests.helpers import wait_until
from tests.kafka_broker import free_port
from tests.pipeline import (
    execute,
    start_sink,
    start_source,
    stop_cleanly,
    wait_for_output,
    wait_identical,
    wait_while_running,
)
from tests.source_events import EventReader, new_slot, slot_row, stop_source, topic_of

BLOB = "public.blob"
SIDE = "public.blob_side"  # another table, written all along: its changes wait too
LINE = "Kafka refuses a message as too large"
SMALL_LIMIT = 200_000
# About 1 MB of md5 text, which lz4 does not compress below the limit.
BIG_ROW = (
    "INSERT INTO blob SELECT 100, string_agg(md5(g::text || random()::text), '') FROM generate_series(1, 32000) g"
)


class SideWriter(threading.Thread):
    """Inserts into the side table, one row a transaction, until stopped."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.done = threading.Event()
        self.rows = 0

    def run(self) -> None:
        conn = psycopg2.connect(self.dsn, connect_timeout=10)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                while not self.done.wait(0.05):
                    self.rows += 1
                    cur.execute("INSERT INTO blob_side VALUES (%s, md5(%s::text))", (self.rows, self.rows))
        finally:
            conn.close()

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=30)


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status), str(response.read().decode())
    except urllib.error.HTTPError as exc:
        return int(exc.code), str(exc.read().decode())
    except OSError:
        return 0, ""


def create_small_topic(stack: Stack, topic: str) -> None:
    admin = admin_client(stack.bootstrap_servers)
    futures = admin.create_topics([NewTopic(topic, 1, 1, config={"max.message.bytes": str(SMALL_LIMIT)})])
    futures[topic].result(timeout=30)


def raise_topic_limit(stack: Stack, topic: str, limit: int) -> None:
    admin = admin_client(stack.bootstrap_servers)
    entry = ConfigEntry("max.message.bytes", str(limit), incremental_operation=AlterConfigOpType.SET)
    resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[entry])
    admin.incremental_alter_configs([resource])[resource].result(timeout=30)


def lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) + int(low, 16)


def confirmed_lsn(dbs: Databases, slot: str) -> int:
    row = slot_row(dbs, slot)
    assert row is not None, f"slot {slot} is gone"
    return lsn(row[1])


def big_commit(reader: EventReader, topic: str) -> int:
    """The commit LSN of the big row's transaction."""
    event = next(e for e in reader.read([topic]) if e.op == "c" and (e.after or {})["id"] == 100)
    return int(event.source["commit_lsn"])


def oversized_count(port: int) -> float:
    status, text = http_get(port, "/metrics")
    assert status == 200, text
    found = re.search(r'^cdc_source_oversized_messages_total\{table="public.blob"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def blob_ids(reader: EventReader, topic: str) -> list[tuple[str | None, int]]:
    return [(e.op, (e.after or e.before or {})["id"]) for e in reader.read([topic]) if e.value is not None]


def test_a_value_over_the_topics_limit_waits_for_the_limit_and_loses_nothing(
    stack: Stack, dbs: Databases, topic_prefix: str, reader: EventReader
) -> None:
    execute(
        dbs.source_dsn,
        "CREATE TABLE blob (id int PRIMARY KEY, v text)",
        "CREATE TABLE blob_side (id int PRIMARY KEY, v text)",
        "INSERT INTO blob SELECT g, 'snapshot ' || g FROM generate_series(1, 5) g",
        separately=True,
    )
    topic = topic_of(topic_prefix, "blob")
    create_small_topic(stack, topic)
    writer = SideWriter(dbs.source_dsn)
    writer.start()
    slot, group, port = new_slot(), f"g-{topic_prefix}", free_port()
    tables = ",".join([BLOB, SIDE])
    source = start_source(dbs, topic_prefix, slot, "--tables", tables, "--metrics-port", str(port), streaming=True)
    sink = start_sink(dbs, topic_prefix, slot, group, "--tables", tables)
    try:
        execute(dbs.source_dsn, "INSERT INTO blob VALUES (6, 'small, before the big one')")
        execute(
            dbs.source_dsn,
            BIG_ROW,
            "UPDATE blob SET v = 'after the big one' WHERE id = 1",
            "UPDATE blob SET v = 'the big one, changed' WHERE id = 100",  # the same key: its order matters
            "INSERT INTO blob SELECT g, 'after ' || g FROM generate_series(200, 220) g",
            separately=True,
        )
        wait_for_output(source, LINE, timeout=60)
        wait_while_running(
            lambda: http_get(port, "/healthz")[0] == 503, [source, sink], message="/healthz never answered 503"
        )
        _, reason = http_get(port, "/healthz")
        assert "too large" in reason and "public.blob" in reason, reason
        assert oversized_count(port) == 1.0
        time.sleep(8)  # a few retries (1 s, 2 s, 4 s): still up, still held, still one line
        assert source.poll() is None, source.stderr_text()[-5000:]
        log = source.stderr_text()
        lines = [line for line in log.splitlines() if LINE in line]
        assert len(lines) == 1, "\n".join(lines)
        for part in (
            "table public.blob",
            'key {"id":100}',
            f"over topic {topic}'s max.message.bytes {SMALL_LIMIT}",
            "producer message.max.bytes 67108864",
            "no restart needed",
            f"--alter --entity-type topics --entity-name {topic} --add-config max.message.bytes=",
        ):
            assert part in lines[0], f"{part!r} not in {lines[0]}"
        size = int(re.search(r"(\d+) bytes", lines[0]).group(1))  # type: ignore[union-attr]
        assert 1_000_000 < size < 1_100_000, lines[0]
        assert "Traceback" not in log, log[-5000:]
        assert blob_ids(reader, topic) == [("r", i) for i in range(1, 6)] + [("c", 6)]
        held = confirmed_lsn(dbs, slot)
        time.sleep(3)
        assert confirmed_lsn(dbs, slot) == held, "the slot moved while the message was refused"
        assert oversized_count(port) == 1.0  # one message, however many retries

        raise_topic_limit(stack, topic, 4 * 1024 * 1024)
        wait_for_output(source, "Kafka took the", timeout=90)
        execute(dbs.source_dsn, "INSERT INTO blob VALUES (300, 'after the limit was raised')")
        writer.stop()
        wait_identical(dbs, [BLOB, SIDE], timeout=180, processes=(source, sink))
        wait_until(lambda: http_get(port, "/healthz")[0] == 200, timeout=30, message="/healthz stayed 503")
    finally:
        writer.stop()
        stop_cleanly(sink)
    stop_source(source)
    ids = blob_ids(reader, topic)
    expected_after = [("c", 100), ("u", 1), ("u", 100), *[("c", i) for i in range(200, 221)], ("c", 300)]
    assert ids[6:] == expected_after, ids
    assert held <= big_commit(reader, topic), "the slot was confirmed past the refused change"
    reader.assert_valid()


def test_a_stop_while_a_message_is_refused_exits_cleanly_and_keeps_it(
    stack: Stack, dbs: Databases, topic_prefix: str, reader: EventReader
) -> None:
    execute(dbs.source_dsn, "CREATE TABLE blob (id int PRIMARY KEY, v text)", "INSERT INTO blob VALUES (1, 'one')")
    topic = topic_of(topic_prefix, "blob")
    create_small_topic(stack, topic)
    slot = new_slot()
    source = start_source(dbs, topic_prefix, slot, "--tables", BLOB, streaming=True)
    execute(dbs.source_dsn, "INSERT INTO blob VALUES (2, 'two')")
    execute(dbs.source_dsn, BIG_ROW, "INSERT INTO blob VALUES (3, 'three')", separately=True)
    wait_for_output(source, LINE, timeout=60)
    log = stop_source(source)
    assert "stay in the slot" in log and "stopped" in log, log[-3000:]
    held = confirmed_lsn(dbs, slot)
    assert blob_ids(reader, topic) == [("r", 1), ("c", 2)]

    # Started again once the topic takes it: the refused change and the one after it arrive, in order.
    raise_topic_limit(stack, topic, 4 * 1024 * 1024)
    again = start_source(dbs, topic_prefix, slot, "--tables", BLOB, streaming=True)
    wait_until(lambda: len(blob_ids(reader, topic)) >= 4, timeout=60, message="the held changes never arrived")
    stop_source(again)
    assert blob_ids(reader, topic) == [("r", 1), ("c", 2), ("c", 100), ("c", 3)]
    assert held <= big_commit(reader, topic), "the slot was confirmed past the refused change"
    reader.assert_valid()


def test_a_value_over_the_producers_limit_says_to_restart_with_a_larger_one(
    stack: Stack, dbs: Databases, topic_prefix: str, reader: EventReader, tmp_path: Path
) -> None:
    execute(dbs.source_dsn, "CREATE TABLE blob (id int PRIMARY KEY, v text)", "INSERT INTO blob VALUES (1, 'one')")
    topic = topic_of(topic_prefix, "blob")
    properties = tmp_path / "kafka.properties"
    properties.write_text("message.max.bytes=500000\n")
    slot, port = new_slot(), free_port()
    options = ("--tables", BLOB, "--kafka-config", str(properties))
    source = start_source(dbs, topic_prefix, slot, *options, "--metrics-port", str(port), streaming=True)
    execute(dbs.source_dsn, BIG_ROW, "INSERT INTO blob VALUES (3, 'three')", separately=True)
    wait_for_output(source, LINE, timeout=60)
    line = next(line for line in source.stderr_text().splitlines() if LINE in line)
    for part in (
        'key {"id":100}',
        "over the producer's message.max.bytes 500000",
        f"topic {topic} max.message.bytes 67108864",
        "add message.max.bytes=2097152 to the properties file given with --kafka-config (KAFKA_CONFIG) and restart",
    ):
        assert part in line, f"{part!r} not in {line}"
    status, reason = http_get(port, "/healthz")
    assert status == 503 and "restart with a larger producer limit" in reason, (status, reason)
    held = confirmed_lsn(dbs, slot)
    stop_source(source)
    assert blob_ids(reader, topic) == [("r", 1)]

    properties.write_text("message.max.bytes=2097152\n")
    again = start_source(dbs, topic_prefix, slot, *options, streaming=True)
    wait_until(lambda: len(blob_ids(reader, topic)) >= 3, timeout=60, message="the held changes never arrived")
    stop_source(again)
    assert blob_ids(reader, topic) == [("r", 1), ("c", 100), ("c", 3)]
    assert held <= big_commit(reader, topic), "the slot was confirmed past the refused change"
    reader.assert_valid()
