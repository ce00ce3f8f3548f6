"""Changes the topics already hold, not published again when the stream reads them a second time.

The slot is confirmed only past what Kafka acknowledged, and a little behind it, so after a restart
(or a lost replication connection) the stream re-reads changes that are in Kafka already. Every
message has a position, strictly increasing along the stream and so along each partition:
(commit LSN, seq in its transaction, rank), where the rank orders the messages of one wal2json
change: a schema change shown by it (-1), a delete (0), its tombstone (1), then an insert, update,
snapshot read or truncate (2), as a key change gives a delete, a tombstone and a create. A message at or before the last position its
partition holds is skipped; once the stream passes the newest position any partition holds,
nothing is checked any more. Pure: the positions held are read from Kafka by the caller.
"""

from collections.abc import Callable, Mapping

from schemas.codec import Position, position
from schemas.partitioner import partition_for
from source_connector.events import Message

TopicPartition = tuple[str, int]


class Replay:
    """Skips the messages the topics hold already; `done` once the stream is past all of them."""

    def __init__(self, held: Mapping[TopicPartition, Position], partitions: Callable[[str], int]) -> None:
        self.held = dict(held)
        self.partitions = partitions
        self.high = max(self.held.values(), default=None)
        self.skipped = 0

    @property
    def done(self) -> bool:
        return self.high is None

    def keep(self, message: Message) -> bool:
        """Publish this message? False when its partition holds it already."""
        if self.high is None:
            return True
        topic, key, value, partition, headers = message
        here = position(value, headers)
        if here is None:
            return True
        if here > self.high:
            self.high = None  # the stream is past everything the topics hold
            return True
        if partition is None:
            partition = partition_for(key or b"", self.partitions(topic))
        last = self.held.get((topic, partition))
        if last is not None and here <= last:
            self.skipped += 1
            return False
        return True
