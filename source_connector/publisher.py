"""Handing events to Kafka, for the stream and the snapshot alike: each message is counted against
its source transaction (whose position is confirmed only once Kafka acknowledged all of them), and
a full producer queue pauses the caller (backpressure: no WAL is read meanwhile, the slot keeps it).

A message a size limit may refuse is sent alone: once Kafka acknowledged everything before it, and
nothing after it until Kafka took it. Refused (too large), it is retried with backoff until a limit
is raised, the whole stream waiting: per-key order is kept, and nothing past it is confirmed. Were it
sent among the others, the broker would refuse it and keep the messages after it, out of order.
"""

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import ConfigResource, ResourceType  # type: ignore[attr-defined]

from pg_kafka_cdc.common.errors import CdcError
from pg_kafka_cdc.common.logs import Every
from pg_kafka_cdc.common.signals import StopFlag
from source_connector.events import Message
from source_connector.flush import FlushTracker, Transaction
from source_connector.oversized import (
    CHECK_ABOVE,
    LIBRDKAFKA_MESSAGE_MAX_BYTES,
    LIBRDKAFKA_QUEUE_MAX_KBYTES,
    QUEUE,
    REPEAT_LINE,
    TOPIC,
    Limits,
    Refusal,
    health_text,
    is_too_large,
    key_text,
    may_be_refused,
    message_size,
    producer_side,
    raised_meanwhile,
    refusal_line,
    retry_delay,
    table_of,
    unexpected_refusal_line,
)
from source_connector.ports import KafkaProducer

log = logging.getLogger("source.publisher")

STALL_LOG_INTERVAL = 10.0  # seconds between "Kafka is not keeping up" lines
STOP_WHILE_FULL = 30.0  # seconds a stop waits for room before giving up on what is unsent
TOPIC_LIMIT_TTL = 300.0  # seconds a topic's max.message.bytes is trusted before it is read again
DYNAMIC_TOPIC_CONFIG = 1  # librdkafka's ConfigSource of a setting the topic itself sets


class SizeLimits:
    """The producer's size limits (from its configuration) and each topic's max.message.bytes, read
    with the admin client (None without one, or when it cannot be read)."""

    def __init__(self, admin: Any = None, config: Mapping[str, Any] | None = None) -> None:
        config = config or {}
        self.admin = admin
        self.message_max_bytes = int(config.get("message.max.bytes", LIBRDKAFKA_MESSAGE_MAX_BYTES))
        self.queue_max_kbytes = int(config.get("queue.buffering.max.kbytes", LIBRDKAFKA_QUEUE_MAX_KBYTES))
        self.bootstrap = str(config.get("bootstrap.servers", "<broker:9092>")).split(",")[0]
        self.topics: dict[str, tuple[float, int | None, bool]] = {}

    def of(self, topic: str, fresh: bool = False) -> Limits:
        now = time.monotonic()
        known = self.topics.get(topic)
        if fresh or known is None or known[0] < now:
            limit, from_broker = self._read(topic)
            known = self.topics[topic] = (now + TOPIC_LIMIT_TTL, limit, from_broker)
        return Limits(self.message_max_bytes, self.queue_max_kbytes, known[1], known[2])

    def _read(self, topic: str) -> tuple[int | None, bool]:
        if self.admin is None:
            return None, False
        resource = ConfigResource(ResourceType.TOPIC, topic)
        try:
            entries = self.admin.describe_configs([resource], request_timeout=10)[resource].result(timeout=15)
            entry = entries["max.message.bytes"]
            return int(entry.value), entry.source != DYNAMIC_TOPIC_CONFIG
        except (KafkaException, KeyError, ValueError, TypeError, TimeoutError) as exc:
            log.debug("cannot read max.message.bytes of topic %s: %s", topic, exc)
            return None, False


@dataclass(frozen=True)
class Outcome:
    """One attempt at a message sent alone: delivered (err None), failed otherwise, or refused as
    too large by `refused_by` (PRODUCER, QUEUE or TOPIC)."""

    err: Any
    msg: Any
    refused_by: str | None = None


class Report:
    """The delivery report of a message sent alone. When the sender unwinds before it came (a lost
    connection), the report settles the message's count in its transaction by itself: the stream
    then waits for it, and reads the change again from the confirmed position."""

    def __init__(self, tx: Transaction) -> None:
        self.tx = tx
        self.produced = False
        self.result: tuple[Any, Any] | None = None
        self.left = False

    def __call__(self, err: Any, msg: Any) -> None:
        if self.left:
            self.tx.outstanding -= 1
        else:
            self.result = (err, msg)

    def leave(self) -> bool:
        """The sender unwinds: True when the report is still to come (and settles the count)."""
        self.left = self.produced and self.result is None
        return self.left


class Publisher:
    def __init__(self, producer: KafkaProducer, stop: StopFlag, limits: SizeLimits | None = None) -> None:
        self.producer = producer
        self.stop = stop
        self.limits = limits or SizeLimits()
        self.stalled_since: float | None = None  # while the producer's queue is full
        # Called while waiting for room: the stream keeps confirming and answering the server.
        self.while_full: Callable[[], None] = lambda: None
        self.refused: Refusal | None = None  # the message refused as too large, while it blocks
        self.refused_since = 0.0
        self.oversized: Counter[str] = Counter()  # messages refused as too large, by table
        self.abandoned = False  # stopped while a message was refused: nothing more is sent
        self._counted: tuple[str, str, int] | None = None  # the message refused last
        self._logged: Refusal | None = None
        self._line_due = 0.0

    def publish(self, tx: Transaction, message: Message) -> None:
        topic, key, value, partition, headers = message
        tx.outstanding += 1
        if self.abandoned:
            tx.tracker.abandoned += 1
            return
        if (
            value is not None
            and len(value) > CHECK_ABOVE
            and may_be_refused(message_size(key, value, headers), self.limits.of(topic))
        ):
            self._alone(tx, message)
            return
        try:
            self.producer.produce(
                topic, value, key, -1 if partition is None else partition, on_delivery=tx.ack, headers=headers
            )
        except BufferError:
            self._when_room(tx, message)
        except KafkaException as exc:
            if not is_too_large(exc.args[0]):
                raise
            self._alone(tx, message)

    def problem(self) -> str | None:
        """Why the stream cannot go on, while a message is refused as too large."""
        refused = self.refused
        if refused is None:
            return None
        return health_text(refused, time.monotonic() - self.refused_since)

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

    # --- a message sent alone -------------------------------------------------------------------

    def _alone(self, tx: Transaction, message: Message) -> None:
        """Send `message` by itself, retrying while it is refused as too large; a stop meanwhile
        leaves it (and everything after it) unsent, for the next start to read again."""
        topic, key, value, _, headers = message
        size = message_size(key, value, headers)
        handed = False
        attempt = 0
        try:
            while True:
                self._drain()
                report = Report(tx)
                try:
                    outcome = self._send_alone(message, size, report)
                except BaseException:
                    handed = report.leave()
                    raise
                if outcome.refused_by is None:
                    handed = True
                    tx.ack(outcome.err, outcome.msg)
                    if self.refused is not None:
                        log.info(
                            "Kafka took the %d-byte message of table %s after %.0f s; streaming goes on",
                            size,
                            self.refused.table,
                            time.monotonic() - self.refused_since,
                        )
                    return
                limits = self.limits.of(topic, fresh=True)
                refusal = Refusal(
                    table_of(value, topic),
                    key_text(key),
                    topic,
                    size,
                    outcome.refused_by,
                    limits,
                    self.limits.bootstrap,
                )
                delay = retry_delay(attempt)
                attempt += 1
                self._refused(refusal, delay)
                if not self._wait(delay):
                    handed = True
                    self._abandon(tx, refusal)
                    return
        finally:
            if not handed:
                tx.outstanding -= 1  # unwound (a lost connection) with no report to come
            self.refused = None

    def _drain(self) -> None:
        """Until Kafka acknowledged everything handed to the producer."""
        while len(self.producer):
            self.producer.poll(0.1)
            self.while_full()

    def _send_alone(self, message: Message, size: int, report: Report) -> Outcome:
        topic, key, value, partition, headers = message
        limits = self.limits.of(topic)
        while True:
            try:
                self.producer.produce(
                    topic,
                    value,
                    key,
                    -1 if partition is None else partition,
                    on_delivery=report,
                    headers=headers,
                )
                report.produced = True
                break
            except KafkaException as exc:
                if not is_too_large(exc.args[0]):
                    raise
                return Outcome(exc.args[0], None, producer_side(size, limits))
            except BufferError:
                if not len(self.producer):
                    return Outcome(None, None, QUEUE)  # the message alone is over the queue's size
                self.producer.poll(0.1)
                self.while_full()
        while report.result is None:
            self.producer.poll(0.1)
            self.while_full()
        err, msg = report.result
        if err is not None and is_too_large(err):
            return Outcome(err, msg, TOPIC)
        return Outcome(err, msg)

    def _refused(self, refusal: Refusal, delay: float) -> None:
        now = time.monotonic()
        if self.refused is None:
            self.refused_since = now
        self.refused = refusal
        if refusal.message != self._counted:
            self._counted = refusal.message
            self.oversized[refusal.table] += 1
            self._line_due = now
        if refusal != self._logged:
            self._line_due = min(self._line_due, now)
        if now >= self._line_due and not raised_meanwhile(refusal):
            self._logged = refusal
            self._line_due = now + REPEAT_LINE
            log.error(refusal_line(refusal, delay), extra={"table": refusal.table, "topic": refusal.topic})

    def _wait(self, seconds: float) -> bool:
        """Wait `seconds`, the stream still confirming; False when stopped meanwhile."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.stop:
                return False
            self.producer.poll(0.1)
            self.while_full()
        return not self.stop

    def _abandon(self, tx: Transaction, refusal: Refusal) -> None:
        self.abandoned = True
        tx.tracker.abandoned += 1
        log.warning(
            "stopping while Kafka refuses the %d-byte message of table %s as too large: it and the changes after "
            "it stay in the slot, read again at the next start",
            refusal.size,
            refusal.table,
        )


def raise_delivery_failure(tracker: FlushTracker) -> None:
    err, msg = tracker.failures[0]
    topic = msg.topic() if msg is not None else "?"
    if is_too_large(err):
        raise CdcError(unexpected_refusal_line(topic, len(tracker.failures)))
    raise CdcError(f"Kafka refused a message for topic {topic}: {err.str() if hasattr(err, 'str') else err}")
