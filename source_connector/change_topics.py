"""The Kafka topics of the replicated tables: created when missing (with the history settings and
the connector's message size), their partition counts known, names that Kafka would confuse
refused."""

from typing import Any

from pg_kafka_cdc.common.errors import ConfigError
from pg_kafka_cdc.common.kafka import HISTORY_TOPIC_CONFIG, ensure_topics
from schemas.topics import collisions
from source_connector.table_info import TableInfo

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class ChangeTopics:
    def __init__(
        self, admin: Any, partitions: int, replication_factor: int, config: tuple[tuple[str, str], ...]
    ) -> None:
        self.admin = admin
        self.new_partitions = partitions
        self.replication_factor = replication_factor
        self.config = {**HISTORY_TOPIC_CONFIG, "max.message.bytes": str(MAX_MESSAGE_BYTES), **dict(config)}
        self.counts: dict[str, int] = {}
        self.transactions: str | None = None  # the transaction topic, with transaction metadata

    def ensure(self, infos: list[TableInfo]) -> None:
        """The tables' topics, created when missing."""
        existing = self.admin.list_topics(timeout=10).topics
        wanted = {i.topic: str(i.name) for i in infos}
        if self.transactions is not None:
            wanted[self.transactions] = "the transaction records"
        for a, b in collisions([*existing, *wanted]):
            if a in wanted or b in wanted:
                raise ConfigError(
                    f"topics {a} and {b} cannot both exist: Kafka treats '.' and '_' alike in topic names. "
                    "Rename one of the tables, or replicate them with separate --topic-prefix values"
                )
        self._create([i.topic for i in infos])
        if self.transactions is not None:
            self._create_transactions(self.transactions)

    def _create_transactions(self, topic: str) -> None:
        """The transaction topic: one partition (its records in commit order), the topics' settings."""
        count = ensure_topics(self.admin, [topic], 1, self.replication_factor, self.config)[topic]
        if count != 1:
            raise ConfigError(
                f"topic {topic} has {count} partitions: transaction records need a topic of one partition, "
                "in commit order. Delete it (cdc-source creates it again) or use another --topic-prefix"
            )
        self.counts[topic] = count

    def ensure_one(self, info: TableInfo) -> None:
        """A table first met in the stream: its topic, unless already known."""
        if info.topic not in self.counts:
            self._create([info.topic])

    def partitions(self, topic: str) -> int:
        """The topic's partition count as the broker has it now."""
        metadata = self.admin.list_topics(topic, timeout=10)
        if topic in metadata.topics and metadata.topics[topic].partitions:
            self.counts[topic] = len(metadata.topics[topic].partitions)
        return self.counts[topic]

    def _create(self, topics: list[str]) -> None:
        self.counts.update(
            ensure_topics(self.admin, topics, self.new_partitions, self.replication_factor, self.config)
        )
