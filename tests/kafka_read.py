"""Read whole topics from the beginning with a plain consumer, for checking what a connector wrote."""

import time
import uuid
from collections.abc import Iterable
from typing import NamedTuple, cast

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from schemas.codec import Headers


class Record(NamedTuple):
    """One Kafka message as stored: where it is, its key and its value (None for a tombstone)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers | None = None  # as the producer wrote them: a tombstone's position is in one


def read_topics(
    bootstrap_servers: str, topics: Iterable[str], quiet: float = 2.0, timeout: float = 120.0
) -> list[Record]:
    """Every message of `topics` (those that exist), from the beginning: first everything below the
    high watermarks seen at the start, then whatever else arrives until nothing has come for `quiet`
    seconds. Sorted by (topic, partition, offset). A consumer error fails the caller's test."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap_servers,
            "group.id": f"test-reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
            "auto.offset.reset": "earliest",
        }
    )
    records: list[Record] = []
    try:
        metadata = consumer.list_topics(timeout=10)
        assigned = [
            TopicPartition(topic, p, OFFSET_BEGINNING)
            for topic in dict.fromkeys(topics)
            if topic in metadata.topics
            for p in sorted(metadata.topics[topic].partitions)
        ]
        if not assigned:
            return []
        # What is already there must be read in full, however long the first fetch takes.
        remaining = {}
        for tp in assigned:
            low, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=10)
            if high > low:
                remaining[(tp.topic, tp.partition)] = high
        consumer.assign(assigned)
        deadline = time.monotonic() + timeout
        last_arrival = time.monotonic()
        while time.monotonic() < deadline:
            batch = consumer.consume(1000, timeout=0.2)
            for msg in batch:
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise AssertionError(f"consumer error while reading {msg.topic()}: {err}")
                topic, partition, offset = msg.topic() or "", msg.partition() or 0, msg.offset() or 0
                headers = cast(Headers | None, msg.headers())  # a list of pairs when read, never a dict
                records.append(Record(topic, partition, offset, msg.key(), msg.value(), headers))
                if remaining.get((topic, partition), 0) <= offset + 1:
                    remaining.pop((topic, partition), None)
            if batch:
                last_arrival = time.monotonic()
            elif not remaining and time.monotonic() - last_arrival >= quiet:
                break
        else:
            raise AssertionError(f"reading {sorted({t.topic for t in assigned})} did not finish in {timeout:g} s")
    finally:
        consumer.close()
    return sorted(records, key=lambda r: (r.topic, r.partition, r.offset))
