"""What the topics hold already: the position of the last message in each partition, read from
Kafka when the connector starts on an existing slot (see replay.py)."""

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

from pg_kafka_cdc.common.errors import ConnectError
from pg_kafka_cdc.common.lsn import int_to_lsn
from pg_kafka_cdc.common.settings import Settings
from schemas.codec import Position, position
from source_connector.replay import Replay
from source_connector.transactions import tally

log = logging.getLogger("source")

READ_TIMEOUT = 10.0
# Messages read back first from a partition's end for the transaction counts, then 8 times more
# each time, up to TAIL_MOST at a time.
TAIL_FIRST = 16
TAIL_MOST = 65_536
SETTLE_FOR = 2.0  # seconds the end offsets must stay still before the last positions are read
SETTLE_MAX = 60.0
SETTLE_POLL = 0.5
# A tombstone written before tombstones carried their delete's seq: its delete, the message just
# before it in the same partition, gives the position.
LOOK_BACK = 2


def _message_at(consumer: Any, topic: str, partition: int, offset: int) -> Any:
    """The message at `offset`, which exists (below the high watermark). Not read in time, the
    partition cannot be taken for empty: its messages would be published again."""
    consumer.assign([TopicPartition(topic, partition, offset)])
    try:
        for msg in consumer.consume(1, timeout=READ_TIMEOUT):
            if msg.error() is None:
                return msg
    finally:
        consumer.unassign()
    raise ConnectError(
        f"cannot read the last messages of {topic}[{partition}] from Kafka within {READ_TIMEOUT:.0f} s "
        "(needed so that nothing is published twice)"
    )


def watermarks(consumer: Any, topic: str, partition: int) -> tuple[int, int]:
    """A partition's low and high offsets, waiting while it has no leader yet (a topic just created)."""
    deadline = time.monotonic() + READ_TIMEOUT
    while True:
        try:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=READ_TIMEOUT)
            return int(low), int(high)
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def last_position(consumer: Any, topic: str, partition: int) -> Position | None:
    low, high = watermarks(consumer, topic, partition)
    for offset in range(high - 1, max(low, high - LOOK_BACK) - 1, -1):
        msg = _message_at(consumer, topic, partition, offset)
        found = position(msg.value(), msg.headers())
        if found is not None:
            return found
    return None


def _reader(settings: Settings) -> Any:
    return Consumer(
        settings.kafka_config(
            **{
                "group.id": "cdc-source-position-reader",
                "enable.auto.commit": False,
                "enable.partition.eof": False,
                "isolation.level": "read_committed",
                # Each read is short and ends at a partition's end: a fetch left waiting there for
                # more data would hold up the next assignment for as long.
                "fetch.wait.max.ms": 10,
            }
        )
    )


def wait_settled(
    consumer: Any,
    partitions: Mapping[str, int],
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> float:
    """Until the partitions' end offsets have not moved for SETTLE_FOR seconds (at most SETTLE_MAX);
    the seconds waited. At a start, nothing but an earlier cdc-source writes to these topics: one
    killed with messages still on their way (a slow link) can have them appended after it died, and
    a last position read before they arrive would let them be published again."""
    started = clock()
    ends = _ends(consumer, partitions)
    still_since = started
    logged = False
    while clock() - still_since < SETTLE_FOR and clock() - started < SETTLE_MAX:
        sleep(SETTLE_POLL)
        now_ends = _ends(consumer, partitions)
        if now_ends != ends:
            ends, still_since = now_ends, clock()
            if not logged:
                logged = True
                log.info(
                    "the topics are still growing (an earlier cdc-source's last messages arriving): "
                    "waiting until they settle before reading their last positions"
                )
    return clock() - started


def _ends(consumer: Any, partitions: Mapping[str, int]) -> dict[tuple[str, int], int]:
    return {(t, p): watermarks(consumer, t, p)[1] for t, count in partitions.items() for p in range(count)}


def held_positions(
    settings: Settings, partitions: Mapping[str, int], settle: bool = False
) -> dict[tuple[str, int], Position]:
    """The last position each partition of `partitions` (topic -> partition count) holds; with
    `settle`, once the partitions stopped growing (see wait_settled)."""
    consumer = _reader(settings)
    held: dict[tuple[str, int], Position] = {}
    try:
        if settle:
            wait_settled(consumer, partitions)
        for topic, count in partitions.items():
            for p in range(count):
                position = last_position(consumer, topic, p)
                if position is not None:
                    held[(topic, p)] = position
    finally:
        consumer.close()
    return held


def topics_holding(settings: Settings, topics: Iterable[str]) -> set[str]:
    """The topics of `topics` that hold at least one message."""
    consumer = _reader(settings)
    found: set[str] = set()
    try:
        metadata = consumer.list_topics(timeout=READ_TIMEOUT).topics
        for topic in topics:
            for p in metadata[topic].partitions if topic in metadata else ():
                low, high = watermarks(consumer, topic, p)
                if high > low:
                    found.add(topic)
                    break
    finally:
        consumer.close()
    return found


def replay_of(
    settings: Settings, partitions: Mapping[str, int], count: Callable[[str], int], settle: bool = False
) -> Replay:
    """A Replay of what the topics hold now (`count`: a topic's partition count); `settle` at the
    process's first start of streaming (later ones follow a stream this process itself ended, after
    Kafka acknowledged everything it sent)."""
    replay = Replay(held_positions(settings, partitions, settle), count)
    if replay.high is not None:
        log.info(
            "the topics hold changes up to %s: those the slot sends again are not published twice",
            int_to_lsn(replay.high[0]),
        )
    return replay


def _count_between(
    consumer: Any, topic: str, partition: int, first: int, end: int, stream: str, since: int
) -> tuple[Counter[int], bool]:
    """tally() of the messages at offsets [first, end), which exist; not read (no progress for
    READ_TIMEOUT seconds), the END records' counts would be guesses."""
    consumer.assign([TopicPartition(topic, partition, first)])
    counts: Counter[int] = Counter()
    reached = False
    deadline = time.monotonic() + READ_TIMEOUT
    try:
        while time.monotonic() < deadline:
            for msg in consumer.consume(min(10_000, end - first), timeout=1.0):
                if msg.error() is not None:
                    continue
                deadline = time.monotonic() + READ_TIMEOUT
                offset = msg.offset()
                if offset < end:
                    reached = tally(counts, msg.value(), msg.headers(), stream, since) or reached
                if offset >= end - 1:
                    return counts, reached
    finally:
        consumer.unassign()
    raise ConnectError(
        f"cannot read the last messages of {topic}[{partition}] from Kafka within {READ_TIMEOUT:.0f} s "
        "(needed to count the transactions' messages in the topics)"
    )


def partition_transactions(consumer: Any, topic: str, partition: int, stream: str, since: int) -> Counter[int]:
    """Messages of each transaction of `stream` committed at or after `since` that the partition
    holds (by commit LSN), read back from its end in growing chunks until an older message."""
    low, high = watermarks(consumer, topic, partition)
    end, step = high, TAIL_FIRST
    counts: Counter[int] = Counter()
    while end > low:
        first = max(low, end - step)
        found, reached = _count_between(consumer, topic, partition, first, end, stream, since)
        counts.update(found)
        if reached:
            break
        end, step = first, min(step * 8, TAIL_MOST)
    return counts


def held_transactions(
    settings: Settings, partitions: Mapping[str, int], stream: str, since: int
) -> dict[int, Counter[str]]:
    """What the topics of `partitions` hold of the transactions of `stream` committed at or after
    `since`: commit LSN -> topic -> messages (see transactions.py)."""
    consumer = _reader(settings)
    held: dict[int, Counter[str]] = {}
    try:
        for topic, count in partitions.items():
            for p in range(count):
                for commit_lsn, n in partition_transactions(consumer, topic, p, stream, since).items():
                    held.setdefault(commit_lsn, Counter())[topic] += n
    finally:
        consumer.close()
    total = sum(sum(c.values()) for c in held.values())
    if total:
        log.info(
            "the topics hold %d messages of %d transactions from %s on: their END records count them",
            total,
            len(held),
            int_to_lsn(since),
        )
    return held
