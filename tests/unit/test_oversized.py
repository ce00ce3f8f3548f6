"""A message too large for Kafka: the line naming it and its fix, the retry schedule, and the
publisher sending it alone, retrying it in place, holding everything after it, and a stop meanwhile
confirming only what Kafka acknowledged."""

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from confluent_kafka import KafkaError, KafkaException

from pg_kafka_cdc.common.signals import StopFlag
from source_connector import publisher as publisher_module
from source_connector.flush import FlushTracker
from source_connector.oversized import (
    FRAMING_BYTES,
    KAFKA_DEFAULT_MAX_MESSAGE_BYTES,
    PRODUCER,
    QUEUE,
    TOPIC,
    Limits,
    Refusal,
    health_text,
    is_too_large,
    key_text,
    may_be_refused,
    message_size,
    producer_side,
    refusal_line,
    retry_delay,
    suggested_limit,
    table_of,
)
from source_connector.ports import DeliveryCallback, Headers
from source_connector.publisher import Publisher, SizeLimits
from tests.unit.test_stream_loop import STATE_TOPIC, FakeConnection, FakeCursor, transaction
from tests.unit.test_stream_loop import stream_of as plain_stream_of

MIB = 1024 * 1024
LIMITS = Limits(64 * MIB, 65_536, 200_000)


def envelope(schema: str = "public", table: str = "big", size: int = 0) -> bytes:
    return orjson.dumps({"after": {"v": "x" * size}, "op": "c", "source": {"schema": schema, "table": table}})


def test_message_size_counts_key_value_headers_and_framing() -> None:
    assert message_size(b"k", b"vv", None) == FRAMING_BYTES + 3
    assert message_size(None, None, [("cdc.source", b"abc")]) == FRAMING_BYTES + 13


def test_a_message_over_the_smallest_limit_may_be_refused() -> None:
    assert may_be_refused(200_001, LIMITS)
    assert not may_be_refused(200_000, LIMITS)
    assert LIMITS.producer == 64 * MIB
    unknown_topic = Limits(64 * MIB, 65_536, None)
    assert unknown_topic.smallest() == KAFKA_DEFAULT_MAX_MESSAGE_BYTES
    small_queue = Limits(64 * MIB, 100, 64 * MIB)
    assert small_queue.smallest() == 100 * 1024


def test_which_producer_setting_refused() -> None:
    limits = Limits(100 * MIB, 65_536, None)
    assert producer_side(70 * MIB, limits) == QUEUE
    assert producer_side(70 * MIB, Limits(64 * MIB, 65_536, None)) == PRODUCER


def test_too_large_errors() -> None:
    assert is_too_large(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
    assert is_too_large(KafkaError(KafkaError.RECORD_LIST_TOO_LARGE))
    assert not is_too_large(KafkaError(KafkaError._MSG_TIMED_OUT))
    assert not is_too_large("not an error")


def test_retry_delay_doubles_from_one_second_to_a_minute() -> None:
    assert [retry_delay(n) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert retry_delay(10_000) == 60


def test_suggested_limit_is_a_whole_mib_with_room() -> None:
    assert suggested_limit(900_000) == MIB
    assert suggested_limit(1_000_000) == 2 * MIB
    assert suggested_limit(70_000_000) == 67 * MIB


def test_table_and_key_of_a_message() -> None:
    assert table_of(envelope("sales", "orders"), "cdc.sales.orders") == "sales.orders"
    assert table_of(b"not json", "cdc.x.y") == "(topic cdc.x.y)"
    assert table_of(None, "cdc.x.y") == "(topic cdc.x.y)"
    assert key_text(b'{"id":1}') == '{"id":1}'
    assert key_text(None) == "(none)"
    assert key_text(b"k" * 300).endswith("...") and len(key_text(b"k" * 300)) == 203


def refusal(side: str, size: int = 1_000_123, limits: Limits = LIMITS) -> Refusal:
    return Refusal("public.big", '{"id":7}', "cdc.public.big", size, side, limits, "127.0.0.1:9092")


def test_the_line_of_a_topic_refusal_names_everything_and_needs_no_restart() -> None:
    line = refusal_line(refusal(TOPIC), 1)
    for part in (
        "table public.big",
        'key {"id":7}',
        "1000123 bytes",
        "over topic cdc.public.big's max.message.bytes 200000",
        "producer message.max.bytes 67108864",
        "next in 1 s",
        "no restart needed",
        "kafka-configs.sh --bootstrap-server 127.0.0.1:9092 --alter --entity-type topics "
        "--entity-name cdc.public.big --add-config max.message.bytes=2097152",
    ):
        assert part in line, part
    assert "\n" not in line


def test_the_line_of_a_producer_refusal_says_to_restart_with_the_setting() -> None:
    limits = Limits(64 * MIB, 65_536, 64 * MIB, topic_from_broker=False)
    line = refusal_line(refusal(PRODUCER, 70_000_000, limits), 2)
    assert "over the producer's message.max.bytes 67108864" in line
    assert "message.max.bytes=70254592" in line
    assert "queue.buffering.max.kbytes=137216" in line
    assert "--kafka-config (KAFKA_CONFIG) and restart cdc-source" in line
    assert "--add-config max.message.bytes=70254592" in line  # the topic is too small as well
    assert "\n" not in line


def test_the_line_names_a_broker_default_and_a_queue_refusal() -> None:
    limits = Limits(100 * MIB, 65_536, 1_048_588, topic_from_broker=True)
    line = refusal_line(refusal(QUEUE, 70_000_000, limits), 1)
    assert "over the producer's queue.buffering.max.kbytes 65536" in line
    assert "the broker's message.max.bytes" in line
    assert "socket.request.max.bytes" not in line
    huge = refusal_line(refusal(TOPIC, 200 * MIB, Limits(300 * MIB, 700_000, 64 * MIB)), 1)
    assert "socket.request.max.bytes" in huge


def test_health_text() -> None:
    text = health_text(refusal(TOPIC), 12.4)
    assert "stuck for 12 s" in text and "raise the topic's max.message.bytes" in text
    assert "restart with a larger producer limit" in health_text(refusal(PRODUCER), 1)


# --- the publisher against a fake producer and admin client ---------------------------------------


@dataclass
class Broker:
    """A producer whose topic refuses values over `topic_limit` in the delivery report, and whose
    produce() refuses those over `producer_limit`."""

    topic_limit: int = 200_000
    producer_limit: int = 64 * MIB
    queued: list[tuple[str, bytes | None, DeliveryCallback | None]] = field(default_factory=list)
    delivered: list[tuple[str, bytes | None]] = field(default_factory=list)
    refused: int = 0
    paused: bool = False
    on_refused: Callable[["Broker"], None] = lambda broker: None

    def produce(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int = -1,
        on_delivery: DeliveryCallback | None = None,
        headers: Headers | None = None,
    ) -> None:
        if value is not None and len(value) > self.producer_limit:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
        self.queued.append((topic, value, on_delivery))

    def poll(self, timeout: float = 0) -> int:
        if self.paused:
            return 0
        done, self.queued = self.queued, []
        for topic, value, callback in done:
            if value is not None and len(value) > self.topic_limit:
                self.refused += 1
                self.on_refused(self)
                err: Any = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)
            else:
                self.delivered.append((topic, value))
                err = None
            if callback is not None:
                callback(err, None)
        return len(done)

    def flush(self, timeout: float = -1) -> int:
        self.poll()
        return 0

    def __len__(self) -> int:
        return len(self.queued)

    def values(self) -> list[bytes | None]:
        return [v for t, v in self.delivered if t != STATE_TOPIC]


@dataclass
class Entry:
    value: str
    source: int = 1


@dataclass
class Done:
    entries: dict[str, Entry]

    def result(self, timeout: float | None = None) -> dict[str, Entry]:
        return self.entries


@dataclass
class Admin:
    broker: Broker
    reads: int = 0

    def describe_configs(self, resources: list[Any], request_timeout: float = 0) -> dict[Any, Done]:
        self.reads += 1
        return {resources[0]: Done({"max.message.bytes": Entry(str(self.broker.topic_limit))})}


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(publisher_module, "retry_delay", lambda attempt: 0.05)


def publisher_of(broker: Broker, stop: StopFlag) -> Publisher:
    config = {"message.max.bytes": broker.producer_limit, "queue.buffering.max.kbytes": 65_536}
    return Publisher(broker, stop, SizeLimits(Admin(broker), config))


def message(value: bytes, key: bytes = b'{"id":1}') -> tuple[str, bytes, bytes, None, None]:
    return ("cdc.public.big", key, value, None, None)


def test_size_limits_read_the_topic_once_and_again_when_asked() -> None:
    broker = Broker()
    admin = Admin(broker)
    limits = SizeLimits(admin, {"message.max.bytes": 5_000_000, "bootstrap.servers": "a:1,b:2"})
    assert limits.of("t") == Limits(5_000_000, 1_048_576, 200_000, False)
    limits.of("t")
    assert admin.reads == 1
    broker.topic_limit = 300_000
    assert limits.of("t", fresh=True).topic_max_bytes == 300_000
    assert limits.bootstrap == "a:1"
    assert SizeLimits().of("t").topic_max_bytes is None


def test_a_refused_message_blocks_everything_after_it_until_the_topic_takes_it() -> None:
    seen: list[str | None] = []

    def raise_limit(broker: Broker) -> None:
        seen.append(publisher.problem())
        if broker.refused == 3:
            broker.topic_limit = 2 * MIB

    stop, broker = StopFlag(), Broker(on_refused=raise_limit)
    publisher = publisher_of(broker, stop)
    tracker = FlushTracker(0)
    tx = tracker.begin(1, 100)
    before, big, after = envelope(size=10), envelope(size=1_000_000), envelope(size=20)
    publisher.publish(tx, message(before))
    publisher.publish(tx, message(big))
    assert broker.values() == [before, big]  # the one before was acknowledged first, the big one alone
    publisher.publish(tx, message(after))
    broker.poll()
    tracker.commit(tx)
    assert broker.values() == [before, big, after]
    assert broker.refused == 3
    assert publisher.oversized == {"public.big": 1}  # one message, however many retries
    assert seen[0] is None or "stuck for" in seen[0]
    assert all(s is not None and "public.big" in s for s in seen[1:])
    assert publisher.problem() is None
    assert tracker.flushed_lsn == 100 and tracker.in_flight() == 0


def test_nothing_is_confirmed_past_a_refused_message_and_a_stop_leaves_it_in_the_slot() -> None:
    stop, broker = StopFlag(), Broker()
    publisher = publisher_of(broker, stop)
    tracker = FlushTracker(0)
    first = tracker.begin(1, 100)
    publisher.publish(first, message(envelope(size=10)))
    tracker.commit(first)
    second = tracker.begin(2, 200)
    threading.Timer(0.3, stop.set).start()
    publisher.publish(second, message(envelope(size=1_000_000)))
    assert publisher.abandoned
    publisher.publish(second, message(envelope(size=5)))  # the rest of the change: never sent
    tracker.commit(second)
    broker.poll()
    assert len(broker.values()) == 1
    assert tracker.advance() == 100
    assert tracker.in_flight() == 0  # a stop does not wait for what was never handed over


def test_a_message_over_the_producer_limit_is_retried_too() -> None:
    stop, broker = StopFlag(), Broker(producer_limit=500_000, topic_limit=64 * MIB)
    publisher = Publisher(broker, stop, SizeLimits(None, {"message.max.bytes": 64 * MIB}))  # limits unknown
    tracker = FlushTracker(0)
    tx = tracker.begin(1, 100)
    threading.Timer(0.3, stop.set).start()
    publisher.publish(tx, message(envelope(size=1_000_000)))
    assert publisher.oversized == {"public.big": 1}
    assert publisher.abandoned and broker.values() == []


def test_a_failure_while_waiting_unwinds_the_count() -> None:
    stop, broker = StopFlag(), Broker()
    publisher = publisher_of(broker, stop)

    def lost() -> None:
        raise ConnectionError("replication connection lost")

    publisher.while_full = lost
    tracker = FlushTracker(0)
    tx = tracker.begin(1, 100)
    with pytest.raises(ConnectionError):
        publisher.publish(tx, message(envelope(size=1_000_000)))
    assert tx.outstanding == 0 and publisher.problem() is None


# --- the stream: a stop while a message is refused ------------------------------------------------


def test_a_stop_while_refused_confirms_only_what_kafka_acknowledged(monkeypatch: pytest.MonkeyPatch) -> None:
    stop, broker = StopFlag(), Broker(topic_limit=30_000)
    stream = plain_stream_of(broker, stop)  # type: ignore[arg-type]
    stream.publisher.limits = SizeLimits(Admin(broker), {"message.max.bytes": 64 * MIB})
    broker.on_refused = lambda b: threading.Timer(0.5, stop.set).start() if b.refused == 1 else None
    small = list(transaction(731, 0x2000, [1]))
    monkeypatch.setattr("tests.unit.test_stream_loop.text", lambda value: orjson.dumps("y" * 40_000))
    big = list(transaction(732, 0x3000, [2]))
    cursor = FakeCursor([*small, *big], lambda: None)
    stream.run(FakeConnection(cursor))
    assert broker.refused >= 1
    assert [orjson.loads(v or b"null")["after"]["id"] for v in broker.values()] == [1]
    assert max(cursor.flushed()) == 0x2100  # the first transaction, not the refused one


def test_a_failure_before_the_report_came_leaves_the_count_to_the_report() -> None:
    stop, broker = StopFlag(), Broker(paused=True)
    publisher = publisher_of(broker, stop)

    def lost() -> None:
        raise ConnectionError("replication connection lost")

    publisher.while_full = lost
    tracker = FlushTracker(0)
    tx = tracker.begin(1, 100)
    with pytest.raises(ConnectionError):
        publisher.publish(tx, message(envelope(size=1_000_000)))
    assert tracker.in_flight() == 1  # in the producer's queue: a restart waits for it
    broker.paused = False
    broker.poll()
    assert tracker.in_flight() == 0 and not tracker.failures
