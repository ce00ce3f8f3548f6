"""What the sink's batch loop needs of Kafka, of the target database and of the dead-letter topic.
consumer.KafkaLog, session.TargetSession and dlq.DeadLetters are the real ones."""

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from pg_kafka_cdc.common.tables import TableName
from sink_connector.bookkeeping import TopicPartition
from sink_connector.changes import TableBatch
from sink_connector.preparation import TableState

Headers = list[tuple[str, bytes | None]]


class Payload(Protocol):
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...


class Message(Payload, Protocol):
    """A consumed Kafka message (confluent_kafka.Message)."""

    def topic(self) -> str: ...
    def partition(self) -> int: ...
    def offset(self) -> int: ...
    def headers(self) -> Headers | None: ...
    def error(self) -> Any: ...


class MessageLog(Protocol):
    """The consumer side of the batch loop."""

    def consume(self, count: int, wait: float) -> Sequence[Message]: ...

    def seek(self, tp: TopicPartition, offset: int | None) -> None:
        """Read `tp` again from `offset` (None: from its start)."""

    def commit(self, positions: Mapping[TopicPartition, int]) -> None:
        """Record the next offsets in Kafka too (for the tools that show a group's lag)."""


class Target(Protocol):
    """The target database as one batch transaction at a time sees it."""

    tables: dict[TableName, TableState]

    def prepare(self, table: TableName, hint: TableBatch) -> None:
        """Create or bulk-copy a table first seen, in a transaction of its own."""

    def begin(self) -> None: ...

    def lock_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int | None]: ...

    def apply(self, batch: TableBatch) -> None: ...

    def probe(self, batch: TableBatch) -> str | None:
        """Apply in a savepoint and undo it: why the target rejects the batch, or None."""

    def park(self, topic: str, key: bytes, offset: int, reason: str) -> None: ...

    def store_offsets(self, positions: dict[TopicPartition, int]) -> None: ...

    def save_progress(self, progress: list[tuple[TableName, int | None, int | None, int]]) -> bool:
        """False when another member holds the progress rows (the figures wait for a later batch)."""

    def commit(self) -> None: ...

    def rollback(self) -> None: ...


class DeadLetterSink(Protocol):
    sent: int

    def send(self, message: Message, reason: str) -> None:
        """Send the message on to its dead-letter topic, with the reason."""

    def flush(self) -> None: ...
