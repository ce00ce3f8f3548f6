"""Kafka helpers: a scenario's topics and consumer groups, created and deleted by prefix."""

import logging
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

log = logging.getLogger("bench.kafka")


def admin(bootstrap: str) -> Any:
    return AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 10_000, "log_level": 3})


def create_topic(bootstrap: str, name: str, partitions: int = 1) -> None:
    client = admin(bootstrap)  # kept referenced until the futures resolve
    futures = client.create_topics([NewTopic(name, partitions, 1)], operation_timeout=30)
    for future in futures.values():
        future.result(timeout=60)


def topics_with_prefix(bootstrap: str, prefix: str) -> list[str]:
    existing = admin(bootstrap).list_topics(timeout=10).topics
    return sorted(t for t in existing if t.startswith(prefix + ".") or t == prefix)


def message_count(bootstrap: str, topic: str) -> int:
    """Messages in a topic (high minus low watermark over its partitions)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "cdc-bench-probe"})
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        total = 0
        for p in metadata.topics[topic].partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            total += high - low
        return total
    finally:
        consumer.close()


def delete_prefix(bootstrap: str, prefix: str, groups: tuple[str, ...] = ()) -> None:
    """Delete every topic under `prefix` and the named consumer groups; failures are logged."""
    client = admin(bootstrap)
    try:
        topics = topics_with_prefix(bootstrap, prefix)
        if topics:
            for topic, future in client.delete_topics(topics, operation_timeout=30).items():
                try:
                    future.result(timeout=60)
                except KafkaException as exc:
                    log.warning("deleting topic %s: %s", topic, exc)
    except KafkaException as exc:
        log.warning("listing topics of %s: %s", prefix, exc)
    if groups:
        for group, future in client.delete_consumer_groups(list(groups), request_timeout=30).items():
            try:
                future.result(timeout=60)
            except KafkaException as exc:  # a group that never committed does not exist
                log.debug("deleting group %s: %s", group, exc)
