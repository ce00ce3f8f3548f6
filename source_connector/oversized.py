"""A message too large for Kafka: which limit refused it, the one line naming it and its fix, and the
retry schedule. Pure: the publisher (publisher.py) sends, reads the limits and sleeps.

Three limits apply to one message, the smallest wins: the producer's `message.max.bytes` and
`queue.buffering.max.kbytes` (refused by produce(), at once; raised only by a restart with the new
setting), and the topic's `max.message.bytes` (refused by the broker in the delivery report; the
broker's `message.max.bytes` when the topic does not set it; raised while cdc-source runs).
"""

import math
from dataclasses import dataclass
from typing import Any

import orjson
from confluent_kafka import KafkaError

from source_connector.ports import Headers

# librdkafka's own defaults, for a producer configured without them.
LIBRDKAFKA_MESSAGE_MAX_BYTES = 1_000_000
LIBRDKAFKA_QUEUE_MAX_KBYTES = 1_048_576
# Kafka's default broker message.max.bytes: assumed for a topic whose setting cannot be read.
KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588
# Above what a request may carry by default (the brokers' socket.request.max.bytes).
KAFKA_DEFAULT_SOCKET_REQUEST_MAX_BYTES = 104_857_600
# Record and batch framing over the key, value and headers (librdkafka counts ~40 bytes).
FRAMING_BYTES = 512
# Values up to this size are sent without a look at the limits (a topic accepting less would
# refuse the producer's batches of small messages anyway).
CHECK_ABOVE = 16 * 1024
# The producer settings an operator may set in the --kafka-config file to raise the producer's limits.
PRODUCER_SIZE_SETTINGS = ("message.max.bytes", "queue.buffering.max.kbytes")

RETRY_FIRST = 1.0  # seconds before the first retry of a refused message
RETRY_CAP = 60.0  # the longest wait between retries
REPEAT_LINE = 600.0  # seconds between repeats of the line while the message stays refused

MIB = 1024 * 1024

PRODUCER, QUEUE, TOPIC = "producer", "queue", "topic"  # which limit refused a message


def message_size(key: bytes | None, value: bytes | None, headers: Headers | None) -> int:
    """What a message weighs against a limit: its key, value and headers, framing included."""
    size = FRAMING_BYTES + (len(key) if key else 0) + (len(value) if value else 0)
    for name, data in headers or ():
        size += len(name) + (len(data) if data else 0)
    return size


def is_too_large(err: Any) -> bool:
    """A Kafka error meaning the message (or its batch) is over a size limit."""
    code = err.code() if hasattr(err, "code") else None
    return code in TOO_LARGE_CODES


TOO_LARGE_CODES = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})


@dataclass(frozen=True)
class Limits:
    """The limits one message meets: the producer's (bytes) and its topic's (None: unknown)."""

    message_max_bytes: int
    queue_max_kbytes: int
    topic_max_bytes: int | None
    topic_from_broker: bool = False  # the topic does not set it: the broker's message.max.bytes

    @property
    def producer(self) -> int:
        return min(self.message_max_bytes, self.queue_max_kbytes * 1024)

    def smallest(self) -> int:
        """The most a message may weigh to go out with the others."""
        topic = KAFKA_DEFAULT_MAX_MESSAGE_BYTES if self.topic_max_bytes is None else self.topic_max_bytes
        return min(self.producer, topic)


def may_be_refused(size: int, limits: Limits) -> bool:
    """Could a limit refuse a message of `size`? Such a message is sent alone (see publisher.py)."""
    return size > limits.smallest()


def producer_side(size: int, limits: Limits) -> str:
    """Which producer setting refused a message produce() did not take: PRODUCER or QUEUE."""
    return QUEUE if size > limits.queue_max_kbytes * 1024 and size <= limits.message_max_bytes else PRODUCER


def suggested_limit(size: int) -> int:
    """A limit with room for `size`: the next whole MiB above it and 64 KiB."""
    return math.ceil((size + 64 * 1024) / MIB) * MIB


def suggested_queue_kbytes(limit: int, current: int) -> int:
    """queue.buffering.max.kbytes holding two messages of `limit` bytes."""
    return max(current, 2 * limit // 1024)


@dataclass(frozen=True)
class Refusal:
    """One message Kafka refused as too large."""

    table: str
    key: str
    topic: str
    size: int
    side: str  # PRODUCER, QUEUE or TOPIC
    limits: Limits
    bootstrap: str = "<broker:9092>"

    @property
    def needs_restart(self) -> bool:
        return self.side != TOPIC

    @property
    def message(self) -> tuple[str, str, int]:
        """Which message: its topic, key and size."""
        return self.topic, self.key, self.size


def raised_meanwhile(r: Refusal) -> bool:
    """The topic's limit, read after the refusal, takes the message now: the retry will tell."""
    return r.side == TOPIC and r.limits.topic_max_bytes is not None and r.limits.topic_max_bytes >= r.size


def table_of(value: bytes | None, topic: str) -> str:
    """The schema.table a change message is about (its envelope's source), else its topic."""
    if value is not None:
        try:
            source = orjson.loads(value).get("source") or {}
            if source.get("schema") and source.get("table"):
                return f"{source['schema']}.{source['table']}"
        except (orjson.JSONDecodeError, AttributeError):
            pass
    return f"(topic {topic})"


def key_text(key: bytes | None, most: int = 200) -> str:
    if key is None:
        return "(none)"
    text = key.decode("utf-8", "replace")
    return text if len(text) <= most else text[:most] + "..."


def _topic_limit_text(limits: Limits) -> str:
    if limits.topic_max_bytes is None:
        return "max.message.bytes unknown (not readable with the admin client)"
    where = " (the broker's message.max.bytes: the topic does not set it)" if limits.topic_from_broker else ""
    return f"max.message.bytes {limits.topic_max_bytes}{where}"


def _topic_command(r: Refusal, limit: int) -> str:
    return (
        f"kafka-configs.sh --bootstrap-server {r.bootstrap} --alter --entity-type topics "
        f"--entity-name {r.topic} --add-config max.message.bytes={limit}"
    )


def _request_note(limit: int) -> str:
    if limit <= KAFKA_DEFAULT_SOCKET_REQUEST_MAX_BYTES:
        return ""
    return f"; the brokers' socket.request.max.bytes (default {KAFKA_DEFAULT_SOCKET_REQUEST_MAX_BYTES}) must exceed it too"


def fix_text(r: Refusal) -> str:
    """How to let the message through."""
    limit = suggested_limit(r.size)
    topic = _topic_command(r, limit)
    if r.side == TOPIC:
        return (
            f"raise the topic's limit, no restart needed (cdc-source retries by itself): {topic}"
            + _request_note(limit)
        )
    settings = [f"message.max.bytes={max(limit, r.limits.message_max_bytes)}"]
    if r.limits.queue_max_kbytes * 1024 < 2 * limit:
        settings.append(f"queue.buffering.max.kbytes={suggested_queue_kbytes(limit, r.limits.queue_max_kbytes)}")
    topic_too = (
        ""
        if r.limits.topic_max_bytes is not None and r.limits.topic_max_bytes >= r.size
        else f", and let the topic take it: {topic}"
    )
    return (
        f"add {' and '.join(settings)} to the properties file given with --kafka-config (KAFKA_CONFIG) and "
        f"restart cdc-source: a producer setting takes effect only at a restart{topic_too}" + _request_note(limit)
    )


def refusal_line(r: Refusal, retry_in: float) -> str:
    """The one line of a refused message: what, how big, which limits, what cdc-source does, the fix."""
    limits = r.limits
    if r.side == TOPIC:
        over = f"over topic {r.topic}'s {_topic_limit_text(limits)}"
    elif r.side == QUEUE:
        over = f"over the producer's queue.buffering.max.kbytes {limits.queue_max_kbytes} (KiB)"
    else:
        over = f"over the producer's message.max.bytes {limits.message_max_bytes}"
    others = []
    if r.side != PRODUCER:
        others.append(f"producer message.max.bytes {limits.message_max_bytes}")
    if r.side != TOPIC:
        others.append(f"topic {r.topic} {_topic_limit_text(limits)}")
    return (
        f"Kafka refuses a message as too large: table {r.table}, key {r.key}, {r.size} bytes, {over} "
        f"({'; '.join(others)}). The slot stays at this change, nothing after it is sent or confirmed, and "
        f"cdc-source retries it (next in {retry_in:.0f} s, then up to every {RETRY_CAP:.0f} s): {fix_text(r)}"
    )


def health_text(r: Refusal, seconds: float) -> str:
    """/healthz while a refused message blocks the stream."""
    what = "restart with a larger producer limit" if r.needs_restart else "raise the topic's max.message.bytes"
    return (
        f"stuck for {seconds:.0f} s: Kafka refuses a {r.size}-byte message of table {r.table} (topic {r.topic}) "
        f"as too large ({r.side} limit); {what} (see the log)"
    )


def unexpected_refusal_line(topic: str, count: int) -> str:
    """Messages refused in the delivery report that were sent with others (each within the limits
    known): a batch over the topic's limit, or a limit lowered while cdc-source ran."""
    return (
        f"Kafka refused {count} message(s) for topic {topic} as too large (MSG_SIZE_TOO_LARGE) though each was "
        "within the limits cdc-source read: a batch of them is over the topic's max.message.bytes (below the "
        "producer's batch.size), or the limit was lowered while cdc-source ran; nothing past them is confirmed. "
        f"Raise it: kafka-configs.sh --bootstrap-server <broker:9092> --alter --entity-type topics --entity-name "
        f"{topic} --add-config max.message.bytes={suggested_limit(1024 * 1024)}"
    )


def retry_delay(attempt: int) -> float:
    """Seconds before retry `attempt` (0 first): 1, 2, 4 ... up to 60."""
    return min(RETRY_CAP, RETRY_FIRST * 2.0 ** min(attempt, 16))
