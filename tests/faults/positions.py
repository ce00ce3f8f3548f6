"""The change topics as positions: every message of a topic read with its headers (a tombstone's
position is in its `cdc.source` header), repeated positions
within a partition counted, and end offsets polled cheaply while a transaction is being published.

A position is schemas.codec.position(value, headers): (commit LSN, seq, rank). The source never
publishes one twice in a partition, also after a crash (README, "Nothing published twice"), so a
repeat is a message published again; messages without a position (another producer's, an old
tombstone) say nothing and are left out."""

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson
from confluent_kafka import Consumer, TopicPartition

from schemas.codec import Position, position
from tests.kafka_read import read_topics


class Positioned(NamedTuple):
    """One message of a change topic: where it is, its key, its op ("tombstone" for a null value)
    and its position (None: the message has none)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    op: str
    position: Position | None


def _op(value: bytes | None) -> str:
    if value is None:
        return "tombstone"
    try:
        return str(orjson.loads(value).get("op"))
    except (orjson.JSONDecodeError, AttributeError):
        return "?"


def read_positioned(
    bootstrap_servers: str, topics: Iterable[str], quiet: float = 0.5, timeout: float = 600.0
) -> list[Positioned]:
    """Every message of `topics` (tests.kafka_read.read_topics) with its op and position, in
    (topic, partition, offset) order."""
    return [
        Positioned(r.topic, r.partition, r.offset, r.key, _op(r.value), position(r.value, r.headers))
        for r in read_topics(bootstrap_servers, topics, quiet=quiet, timeout=timeout)
    ]


@dataclass
class Repeat:
    """A message whose position an earlier message of its partition has already."""

    message: Positioned
    first: Positioned  # the earlier message at that position

    def describe(self) -> str:
        m, f = self.message, self.first
        return (
            f"{m.topic}[{m.partition}]@{m.offset} {m.op} key={(m.key or b'').decode(errors='replace')} "
            f"position={m.position} repeats @{f.offset} {f.op}"
        )


def repeated_positions(messages: Iterable[Positioned]) -> list[Repeat]:
    """Messages whose position repeats within their partition (messages without one ignored)."""
    seen: dict[tuple[str, int, Position], Positioned] = {}
    repeats = []
    for m in messages:
        if m.position is None:
            continue
        where = (m.topic, m.partition, m.position)
        first = seen.get(where)
        if first is None:
            seen[where] = m
        else:
            repeats.append(Repeat(m, first))
    return repeats


def out_of_order(messages: Iterable[Positioned]) -> list[Positioned]:
    """Messages whose position is below the one before them in their partition (with a position)."""
    last: dict[tuple[str, int], Position] = {}
    found = []
    for m in messages:
        if m.position is None:
            continue
        before = last.get((m.topic, m.partition))
        if before is not None and m.position < before:
            found.append(m)
        last[(m.topic, m.partition)] = m.position
    return found


class EndOffsets:
    """The summed high watermarks of some topics, read again and again through one consumer (a
    fresh consumer per read, as tests.pipeline.partition_ends makes, is too slow to catch a
    transaction half-published)."""

    def __init__(self, bootstrap_servers: str, topics: Iterable[str]) -> None:
        names = list(dict.fromkeys(topics))
        self.consumer: Any = Consumer(
            {"bootstrap.servers": bootstrap_servers, "group.id": f"test-ends-{uuid.uuid4().hex}"}
        )
        metadata = self.consumer.list_topics(timeout=10)
        self.partitions = [
            TopicPartition(topic, p)
            for topic in names
            if topic in metadata.topics
            for p in sorted(metadata.topics[topic].partitions)
        ]
        assert self.partitions, f"none of {names} exists"

    def total(self) -> int:
        return sum(int(self.consumer.get_watermark_offsets(tp, timeout=10)[1]) for tp in self.partitions)

    def close(self) -> None:
        self.consumer.close()
