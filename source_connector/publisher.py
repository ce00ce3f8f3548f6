"""Handing events to Kafka, for the stream and the snapshot alike: each message is counted against
its source transaction (whose position is confirmed only once Kafka acknowledged all of them), and
a full producer queue pauses the caller (backpressure: no WAL is read meanwhile, the slot keeps it)."""

import logging
import time
from collections.abc import Callable

from pg_kafka_cdc.common.errors import CdcError
from pg_kafka_cdc.common.logs import Every
from pg_kafka_cdc.common.signals import StopFlag
from source_connector.events import Message
from source_connector.flush import FlushTracker, Transaction
from source_connector.ports import KafkaProducer

log = logging.getLogger("source.publisher")

STALL_LOG_INTERVAL = 10.0  # seconds between "Kafka is not keeping up" lines
STOP_WHILE_FULL = 30.0  # seconds a stop waits for room before giving up on what is unsent


class Publisher:
    def __init__(self, producer: KafkaProducer, stop: StopFlag) -> None:
        self.producer = producer
        self.stop = stop
        self.stalled_since: float | None = None  # while the producer's queue is full
        # Called while waiting for room: the stream keeps confirming and answering the server.
        self.while_full: Callable[[], None] = lambda: None

    def publish(self, tx: Transaction, message: Message) -> None:
        topic, key, value, partition, headers = message
        tx.outstanding += 1
        try:
            self.producer.produce(
                topic, value, key, -1 if partition is None else partition, on_delivery=tx.ack, headers=headers
            )
        except BufferError:
            self._when_room(tx, message)

    def _when_room(self, tx: Transaction, message: Message) -> None:
        topic, key, value, partition, headers = message
        started = time.monotonic()
        stalled = Every(STALL_LOG_INTERVAL, STALL_LOG_INTERVAL, started)
        self.stalled_since = started
        try:
            while True:
                self.producer.poll(0.1)
                try:
                    self.producer.produce(
                        topic,
                        value,
                        key,
                        -1 if partition is None else partition,
                        on_delivery=tx.ack,
                        headers=headers,
                    )
                    return
                except BufferError:
                    pass
                self.while_full()
                now = time.monotonic()
                if stalled.due(now):
                    log.warning(
                        "Kafka is not keeping up: %d messages waiting for acknowledgement for %.0f s; "
                        "WAL reading is paused (the slot keeps the WAL)",
                        len(self.producer),
                        now - started,
                    )
                if self.stop and now - started > STOP_WHILE_FULL:
                    raise CdcError(
                        "stopped while Kafka was not accepting messages; unacknowledged changes will be re-read"
                    )
        finally:
            self.stalled_since = None


def raise_delivery_failure(tracker: FlushTracker) -> None:
    err, msg = tracker.failures[0]
    topic = msg.topic() if msg is not None else "?"
    raise CdcError(f"Kafka refused a message for topic {topic}: {err.str() if hasattr(err, 'str') else err}")
