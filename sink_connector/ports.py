"""What the sink's batch loop needs of Kafka, of the target database and of the dead-letter topic.
consumer.KafkaLog, session.TargetSession, preparation.TablePreparer and dlq.DeadLetters are the
real ones."""

from collections.abc import Sequence
from typing import Any, Protocol

from confluent_kafka import TopicPartition as KafkaPartition

from pg_kafka_cdc.common.tables import TableName
from schemas.codec import Position
from sink_connector.bookkeeping import StreamPartition, TopicPartition
from sink_connector.net_effect import TableBatch
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

    def seek(self, tp: TopicPartition, offset: int | None) -> bool:
        """Read `tp` again from `offset` (None: from its start); False when the consumer refused."""


class GroupOffsets(Protocol):
    """Where the group's offsets are committed in Kafka (confluent_kafka.Consumer.commit)."""

    def commit(self, *, offsets: list[KafkaPartition], asynchronous: bool) -> object: ...


class Preparer(Protocol):
    def prepare(self, table: TableName, hint: TableBatch | None) -> object:
        """Create or bulk-copy a table first seen, in a transaction of its own."""


class Target(Protocol):
    """The target database as one batch transaction at a time sees it."""

    tables: dict[TableName, TableState]
    applied: dict[StreamPartition, Position]  # committed; store_positions adds to it on commit

    def claim(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int | None]:
        """The stored offsets of these partitions; loads their source positions applied into `applied`."""

    def begin(self) -> None: ...

    def lock_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int | None]: ...

    def apply(self, batch: TableBatch) -> None: ...

    def probe(self, batch: TableBatch) -> str | None:
        """Apply in a savepoint and undo it: why the target rejects the batch, or None."""

    def park(self, topic: str, key: bytes, offset: int, reason: str) -> None: ...

    def store_offsets(self, positions: dict[TopicPartition, int]) -> None: ...

    def store_positions(self, positions: dict[StreamPartition, Position]) -> None: ...

    def save_progress(self, progress: list[tuple[TableName, int | None, int | None, int]]) -> bool:
        """False when another member holds the progress rows (the figures wait for a later batch)."""

    def commit(self) -> None: ...

    def rollback(self) -> None: ...


class DeadLetterSink(Protocol):
    sent: int

    def send(self, message: Message, reason: str) -> None:
        """Send the message on to its dead-letter topic, with the reason."""

    def flush(self) -> None: ...
