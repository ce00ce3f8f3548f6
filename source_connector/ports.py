"""What the source connector needs of its I/O, as small protocols: the replication cursor it reads
wal2json messages from and the Kafka producer it hands events to. psycopg2's
ReplicationCursor and confluent-kafka's Producer are the real ones; the unit tests use fakes."""

from collections.abc import Callable
from typing import Any, Protocol

Headers = list[tuple[str, bytes]]
DeliveryCallback = Callable[[Any, Any], None]


class ReplicationMessage(Protocol):
    @property
    def payload(self) -> bytes: ...

    @property
    def data_start(self) -> int: ...


class ReplicationCursor(Protocol):
    @property
    def wal_end(self) -> int: ...

    def read_message(self) -> ReplicationMessage | None: ...

    def send_feedback(self, write_lsn: int = 0, flush_lsn: int = 0, force: bool = False) -> None: ...

    def fileno(self) -> int: ...


class KafkaProducer(Protocol):
    def produce(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int = -1,
        on_delivery: DeliveryCallback | None = None,
        headers: Headers | None = None,
    ) -> None: ...

    def poll(self, timeout: float = 0) -> int: ...

    def flush(self, timeout: float = -1) -> int: ...

    def __len__(self) -> int: ...
