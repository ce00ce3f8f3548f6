"""The source connector's own record in a compacted Kafka topic: which slot it created, whether the
initial snapshot finished, and how far PostgreSQL may have been told it is confirmed."""

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from pg_kafka_cdc.common.errors import SourceError
from pg_kafka_cdc.common.settings import Settings

STATE_TOPIC_CONFIG = {"cleanup.policy": "compact", "retention.ms": "-1", "min.compaction.lag.ms": "0"}


@dataclass(frozen=True)
class SourceState:
    slot: str
    database: str
    system_id: str
    snapshot: str  # "started", "done" or "skipped"
    snapshot_lsn: int  # the slot's consistent point when this connector created it
    confirmed_lsn: int  # the newest position sent to PostgreSQL as flushed
    bound_lsn: int  # no position past this one was ever sent (see feedback.py)
    updated_ms: int = 0
    # [schema, name] of the tables whose topics hold their snapshot; None in records of older versions
    tables: list[list[str]] | None = None
    # snapshots taken while streaming, not finished: incremental.Request.encode() of each
    incremental: list[list[Any]] = field(default_factory=list)

    def key(self) -> bytes:
        return state_key(self.system_id, self.database, self.slot)

    def encode(self) -> bytes:
        return orjson.dumps(asdict(replace(self, updated_ms=int(time.time() * 1000))))


def state_key(system_id: str, database: str, slot: str) -> bytes:
    return orjson.dumps([system_id, database, slot])


def decode_state(value: bytes | None) -> SourceState | None:
    if value is None:
        return None
    return SourceState(**orjson.loads(value))


def read_records(settings: Settings, topic: str, timeout: float = 30) -> dict[bytes, bytes | None]:
    """The latest value of every key of the topic (None: cleared)."""
    consumer = Consumer(
        settings.kafka_config(
            **{
                "group.id": "cdc-source-state-reader",
                "enable.auto.commit": False,
                "enable.partition.eof": False,
                "logger": logging.getLogger("kafka.client"),  # not straight to stderr (see connector.py)
            }
        )
    )
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        partitions = list(metadata.topics[topic].partitions) if topic in metadata.topics else []
        latest: dict[bytes, bytes | None] = {}
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high <= low:
                continue
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING)])
            deadline = time.monotonic() + timeout
            position = low
            while position < high and time.monotonic() < deadline:
                for msg in consumer.consume(500, timeout=1):
                    if msg.error():
                        continue
                    position = (msg.offset() or 0) + 1
                    key = msg.key()
                    if key is not None:
                        latest[key] = msg.value()
            consumer.unassign()
        return latest
    finally:
        consumer.close()


def write_state(producer: Any, topic: str, state: SourceState, timeout: float = 30) -> None:
    """Write the record and wait until Kafka acknowledged it."""
    producer.produce(topic, state.encode(), state.key())
    if producer.flush(timeout) > 0:
        raise SourceError(f"Kafka did not acknowledge the connector's state record within {timeout:.0f} s")


def clear_state(producer: Any, topic: str, key: bytes, others: Sequence[bytes] = ()) -> None:
    """A tombstone: the next start begins from nothing (new slot, new snapshot); `others`: the keys of
    the slot's other records, cleared too."""
    for k in [*others, key]:
        producer.produce(topic, None, k)
    producer.flush(30)
