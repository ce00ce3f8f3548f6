"""The sink's Kafka consumer: its configuration, the rebalance callbacks (a partition starts from
the offset stored in the target), message errors, batch sizing, lag and --once's end offsets."""

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from pg_kafka_cdc.common.errors import SinkError
from pg_kafka_cdc.common.settings import Settings
from sink_connector.bookkeeping import TopicPartition as TP
from sink_connector.metrics import SinkStats
from sink_connector.ports import Message, Payload
from sink_connector.session import SESSION_TIMEOUT_MS

log = logging.getLogger("sink")

Claim = Callable[[list[TP]], dict[TP, int | None]]


def batch_count(messages: Sequence[Payload], most: int, budget: int) -> int:
    """How many messages to ask for next: `most`, or fewer when messages like these (sampled)
    would make a batch of more than `budget` bytes (memory grows with the bytes, not the count)."""
    sample = messages[:: max(1, len(messages) // 64)]
    size = sum(len(m.value() or b"") + len(m.key() or b"") for m in sample) / len(sample)
    return max(1, min(most, int(budget // max(size, 1.0))))


IDLE_WAIT = 0.1  # seconds an idle sink waits for a message before it looks after other things


@dataclass
class KafkaLog:
    """A consumer of the change topics whose partitions start from the target's stored offsets."""

    settings: Settings
    group: str
    instance_id: str | None
    claim: Claim
    stats: SinkStats
    # The next offset this member expects per assigned partition (None: nothing applied yet).
    expected: dict[TP, int | None] = field(default_factory=dict)
    down_since: float | None = None  # monotonic time Kafka became unreachable
    consumer: Any = None
    generation: int = 0  # counts the assignments and revocations (a loop that buffers starts over)
    # called first in both rebalance callbacks: the batch whose commit is under way ends first
    before_rebalance: Callable[[], None] = lambda: None

    def config(self) -> dict[str, Any]:
        static = {"group.instance.id": self.instance_id} if self.instance_id else {}
        return self.settings.kafka_config(
            **static,
            **{
                "group.id": self.group,
                "client.id": "cdc-sink",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "partition.assignment.strategy": "roundrobin",
                "session.timeout.ms": SESSION_TIMEOUT_MS,
                "heartbeat.interval.ms": 2_000,
                "max.poll.interval.ms": 900_000,
                "topic.metadata.refresh.interval.ms": 5_000,
                # librdkafka's share of the sink's memory (a plain consumer of the benchmark's topic
                # peaked at 184 MB RSS with 16 MB / 16 MB / 4 MB, 87 MB with these); fetching again
                # 10 ms after the queue drains below its bound, not 1 s, keeps it fed (81,000
                # messages/s at most with the default, 1.1 million with 10 ms)
                "queued.max.messages.kbytes": 4_096,
                "fetch.max.bytes": 4_194_304,
                "max.partition.fetch.bytes": 1_048_576,
                "fetch.queue.backoff.ms": 10,
                "error_cb": self.on_error,
            },
        )

    def on_error(self, err: Any) -> None:
        self.stats.errors["kafka_" + err.name().lstrip("_").lower()] += 1
        if err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT) and self.down_since is None:
            self.down_since = time.monotonic()
        log.warning("Kafka: %s", err.str())

    def subscribe(self, subscription: list[str]) -> None:
        self.consumer = Consumer(self.config())
        self.consumer.subscribe(subscription, on_assign=self.on_assign, on_revoke=self.on_revoke)

    def on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        self.before_rebalance()
        self.generation += 1
        stored = self.claim([(p.topic, p.partition) for p in partitions])
        for p in partitions:
            offset = stored.get((p.topic, p.partition))
            p.offset = OFFSET_BEGINNING if offset is None else offset
            self.expected[(p.topic, p.partition)] = offset
        consumer.assign(partitions)
        if partitions:
            log.info(
                "assigned %s",
                ", ".join(f"{p.topic}[{p.partition}]@{'start' if p.offset < 0 else p.offset}" for p in partitions),
            )

    def on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        self.before_rebalance()
        self.generation += 1
        for p in partitions:
            self.expected.pop((p.topic, p.partition), None)
        consumer.unassign()
        if partitions:
            log.info("revoked %s", ", ".join(f"{p.topic}[{p.partition}]" for p in partitions))

    def consume(self, count: int, wait: float) -> list[Message]:
        """Up to `count` messages: the first as soon as there is one (None for IDLE_WAIT seconds
        gives an empty list), then as many more as come within `wait` seconds of it."""
        first: list[Message] = self.consumer.consume(1, IDLE_WAIT)
        if not first:
            return first
        self.down_since = None
        if count == 1:
            return first
        more: list[Message] = self.consumer.consume(count - 1, wait)
        return first + more if more else first

    def usable(self, messages: list[Message]) -> list[Message]:
        """The messages without errors (the errors are logged, or stop the sink when fatal)."""
        batch = [m for m in messages if m.error() is None]
        if len(batch) != len(messages):
            for m in messages:
                if m.error() is not None:
                    self.check(m)
        return batch

    def check(self, message: Message) -> None:
        err = message.error()
        if err.code() == KafkaError._PARTITION_EOF:
            return
        if err.code() == KafkaError._FATAL or err.fatal():
            if self.instance_id and "group.instance.id" in err.str():
                raise SinkError(
                    f"another cdc-sink joined group {self.group} with --instance-id "
                    f"{self.instance_id}, so Kafka stopped this one: give each sink its own id"
                )
            raise SinkError(f"Kafka stopped this consumer: {err.str()}")
        if err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            log.info("waiting for topic %s to exist", message.topic())
            return
        log.warning("Kafka: %s", err.str())

    def seek(self, tp: TP, offset: int | None) -> bool:
        try:
            self.consumer.seek(TopicPartition(tp[0], tp[1], OFFSET_BEGINNING if offset is None else offset))
        except KafkaException as exc:  # the partition is gone, or Kafka stopped this consumer
            log.debug("seek of %s[%d] refused: %s", tp[0], tp[1], exc)
            return False
        return True

    def pause(self, partitions: list[TP], resume: bool = False) -> None:
        """Stop (or go on) fetching these partitions; a partition no longer assigned is left alone."""
        if not partitions:
            return
        parts = [TopicPartition(t, p) for t, p in partitions]
        try:
            (self.consumer.resume if resume else self.consumer.pause)(parts)
        except KafkaException as exc:
            log.debug("%s refused: %s", "resume" if resume else "pause", exc)

    def lag(self) -> dict[TP, int]:
        """Messages not applied yet, per assigned partition; and whether Kafka is back."""
        lag = {}
        for tp, position in list(self.expected.items()):
            try:
                low, high = self.consumer.get_watermark_offsets(TopicPartition(tp[0], tp[1]), cached=True)
            except Exception:
                continue
            if high >= 0:
                lag[tp] = max(0, high - (low if position is None else position))
        if self.down_since is not None:
            try:
                self.consumer.list_topics(timeout=2)
                self.down_since = None
            except Exception:
                pass
        return lag

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close()


def end_offsets(settings: Settings, group: str, topics: list[str]) -> dict[TP, int]:
    """--once: the end of every partition when the sink started."""
    probe = Consumer(settings.kafka_config(**{"group.id": group + "-once-probe"}))
    try:
        ends: dict[TP, int] = {}
        metadata = probe.list_topics(timeout=10)
        for topic in topics:
            for p in metadata.topics[topic].partitions:
                _, high = probe.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                ends[(topic, p)] = high
        return ends
    finally:
        probe.close()


class EndOffsets:
    """--once: whether every partition's applied offset reached its end at start-up. Our own
    partitions are known here; others' (another member's) are read from the target now and then."""

    def __init__(
        self, ends: dict[TP, int], expected: Mapping[TP, int | None], stored: Callable[[], Mapping[TP, int | None]]
    ) -> None:
        self.ends = ends
        self.expected = expected
        self.stored = stored
        self.next_check = 0.0

    def reached_here(self, ahead: Mapping[TP, int]) -> bool:
        """Whether our own partitions reach their ends once the offsets `ahead` (a batch being
        committed) are applied, and no other member's partition is needed (nothing read from the
        target)."""
        return all(
            tp in self.expected and max(self.expected.get(tp) or 0, ahead.get(tp, 0)) >= high
            for tp, high in self.ends.items()
            if high
        )

    def reached(self) -> bool:
        pending = [tp for tp, high in self.ends.items() if high and (self.expected.get(tp) or 0) < high]
        if not pending:
            return True
        if all(tp in self.expected for tp in pending) or time.monotonic() < self.next_check:
            return False
        self.next_check = time.monotonic() + 1.0
        stored = self.stored()
        return all((stored.get(tp) or 0) >= self.ends[tp] for tp in pending)
