"""The local stack: idempotent start, a logical-decoding source with wal2json, a target, a broker."""

import json
import re
import subprocess
import time
import uuid
from collections.abc import Callable

import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer
from confluent_kafka.cimpl import NewTopic  # confluent_kafka.admin re-exports it without declaring so
from psycopg2.extensions import parse_dsn

from tests.conftest import Databases, Stack, admin_client
from tests.helpers import REPO, psql_rows, wait_until


def test_stack_up_again_is_quick_and_reports_every_service(
    stack: Stack, record_property: Callable[[str, object], None]
) -> None:
    started = time.monotonic()
    result = subprocess.run(
        ["bash", "stack/stack.sh", "up"], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    elapsed = time.monotonic() - started
    record_property("stack_up_again_seconds", round(elapsed, 2))
    assert result.returncode == 0, f"stack.sh up failed the second time:\n{result.stdout}{result.stderr}"
    for pattern in (
        r"source PostgreSQL ready on \S+",
        r"target PostgreSQL ready on \S+",
        r"Kafka \S+ ready on \S+",
    ):
        assert re.search(pattern, result.stdout), f"stack.sh up did not report {pattern!r}:\n{result.stdout}"
    # Not a performance check: a second `up` must find everything running, not reinstall or re-create.
    assert elapsed < 60, f"a second stack.sh up took {elapsed:.1f} s; it should only check the services"


def test_source_has_logical_wal_level(stack: Stack) -> None:
    [(level,)] = psql_rows(stack.source_admin_dsn, "SHOW wal_level")
    assert level == "logical", f"the source runs with wal_level={level}; logical decoding needs 'logical'"


def test_wal2json_slot_decodes_a_change(dbs: Databases) -> None:
    slot = f"test_{uuid.uuid4().hex[:12]}"
    psql_rows(dbs.source_dsn, "SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (slot,))
    try:
        [(plugin, database)] = psql_rows(
            dbs.source_dsn, "SELECT plugin, database FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        )
        assert (plugin, database) == ("wal2json", dbs.name)
        psql_rows(dbs.source_dsn, "CREATE TABLE probe (id int PRIMARY KEY, label text)")
        psql_rows(dbs.source_dsn, "INSERT INTO probe VALUES (1, 'hello')")
        rows = psql_rows(
            dbs.source_dsn,
            "SELECT data FROM pg_logical_slot_peek_changes(%s, NULL, NULL, 'format-version', '2')",
            (slot,),
        )
        changes = [json.loads(data) for (data,) in rows]
        inserts = [c for c in changes if c.get("action") == "I" and c.get("table") == "probe"]
        assert inserts, f"wal2json did not report the insert into probe: {changes}"
        assert {"name": "label", "type": "text", "value": "hello"} in inserts[0]["columns"]
    finally:
        psql_rows(dbs.source_dsn, "SELECT pg_drop_replication_slot(%s)", (slot,))


def test_target_answers(stack: Stack) -> None:
    expected_port = int(parse_dsn(stack.target_admin_dsn).get("port", "5432"))  # 5433 by default
    [(port, version)] = psql_rows(
        stack.target_admin_dsn, "SELECT inet_server_port(), current_setting('server_version_num')"
    )
    assert port == expected_port, f"the target answered on port {port}, not {expected_port}"
    assert int(version) >= 150000, f"the target is PostgreSQL {version}; 15 or newer is expected"
    [(source_id,)] = psql_rows(stack.source_admin_dsn, "SELECT system_identifier FROM pg_control_system()")
    [(target_id,)] = psql_rows(stack.target_admin_dsn, "SELECT system_identifier FROM pg_control_system()")
    assert source_id != target_id, "the source and target DSNs reach the same PostgreSQL cluster"


def _delivery_recorder(errors: list[KafkaError | None]) -> Callable[[KafkaError | None, Message], None]:
    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        errors.append(err)

    return on_delivery


def test_kafka_topic_produce_and_consume(stack: Stack, topic_prefix: str) -> None:
    admin = admin_client(stack.bootstrap_servers)
    assert admin.list_topics(timeout=10).brokers, "the Kafka metadata lists no broker"

    topic = f"{topic_prefix}.smoke"
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(timeout=30)
    wait_until(
        lambda: topic in admin.list_topics(timeout=10).topics, timeout=30, message=f"{topic} never appeared"
    )

    payload = f"hello {uuid.uuid4()}".encode()
    deliveries: list[KafkaError | None] = []
    producer = Producer({"bootstrap.servers": stack.bootstrap_servers, "acks": "all"})
    producer.produce(topic, key=b"k", value=payload, on_delivery=_delivery_recorder(deliveries))
    assert producer.flush(30) == 0, "the producer could not deliver within 30 s"
    assert deliveries == [None], f"delivery failed: {deliveries}"

    consumer = Consumer(
        {
            "bootstrap.servers": stack.bootstrap_servers,
            "group.id": f"{topic_prefix}-group",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    received: list[bytes] = []
    try:
        consumer.subscribe([topic])

        def got_it() -> bool:
            msg = consumer.poll(0.5)
            if msg is not None:
                assert msg.error() is None, f"consumer error: {msg.error()}"
                received.append(msg.value() or b"")
            return payload in received

        wait_until(got_it, timeout=60, interval=0, message=f"the message never came back from {topic}")
    finally:
        consumer.close()
    assert received == [payload]

    admin.delete_topics([topic], operation_timeout=30)[topic].result(timeout=60)


@pytest.mark.parametrize("setting", ["max_replication_slots", "max_wal_senders"])
def test_source_allows_replication(stack: Stack, setting: str) -> None:
    [(value,)] = psql_rows(stack.source_admin_dsn, f"SHOW {setting}")
    assert int(value) >= 10, f"the source has {setting}={value}; the tests need several slots at once"
