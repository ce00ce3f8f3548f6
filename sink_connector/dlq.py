"""The dead-letter topic: messages the sink cannot apply, with the reason, the origin and the
original bytes, so that nothing is ever dropped without trace (`--on-error dlq`)."""

import logging
from typing import Any

from confluent_kafka import Producer

from pg_kafka_cdc.common.errors import SinkError
from pg_kafka_cdc.common.kafka import HISTORY_TOPIC_CONFIG, ensure_topics
from pg_kafka_cdc.common.settings import Settings
from schemas.topics import dlq_topic
from sink_connector.ports import Message

log = logging.getLogger("sink.dlq")


class DeadLetters:
    def __init__(self, settings: Settings, admin: Any, replication_factor: int = 1) -> None:
        self.producer = Producer(
            settings.kafka_config(
                **{"client.id": "cdc-sink-dlq", "enable.idempotence": True, "acks": "all", "message.timeout.ms": 0}
            )
        )
        self.admin = admin
        self.replication_factor = replication_factor
        self.known: set[str] = set()
        self.failures: list[str] = []
        self.sent = 0

    def send(self, message: Message, reason: str) -> None:
        """Send a message on to the dead-letter topic with its own headers (a tombstone's position)
        and the reason and origin."""
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        target = dlq_topic(topic)
        if target not in self.known:
            ensure_topics(self.admin, [target], 1, self.replication_factor, HISTORY_TOPIC_CONFIG)
            self.known.add(target)
        headers: list[tuple[str, str | bytes | None]] = [
            ("cdc.reason", reason.encode()),
            ("cdc.origin.topic", topic.encode()),
            ("cdc.origin.partition", str(partition).encode()),
            ("cdc.origin.offset", str(offset).encode()),
            *(message.headers() or ()),
        ]

        def delivered(err: Any, msg: Any) -> None:
            if err is not None:
                self.failures.append(f"{target}: {err}")

        self.producer.produce(target, message.value(), message.key(), headers=headers, on_delivery=delivered)
        self.sent += 1
        log.warning(
            "sent to %s: %s", target, reason, extra={"topic": topic, "partition": partition, "offset": offset}
        )

    def flush(self) -> None:
        """Every dead letter acknowledged before the offsets past them are committed."""
        while self.producer.flush(5) > 0:
            log.warning("waiting for Kafka to acknowledge dead letters")
        if self.failures:
            raise SinkError(f"Kafka refused a dead letter ({self.failures[0]}); nothing past it is committed")
