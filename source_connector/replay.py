"""Changes the topics already hold, not published again when the stream reads them a second time.

The slot is confirmed only past what Kafka acknowledged, and a little behind it, so after a restart
(or a lost replication connection) the stream re-reads changes that are in Kafka already. Every
message has a position, strictly increasing along the stream and so along each partition:
(commit LSN, seq in its transaction, rank), where the rank orders the messages of one wal2json
change: a delete (0), its tombstone (1), then an insert, update, snapshot read or truncate (2), as a
key change gives a delete, a tombstone and a create. A message at or before the last position its
partition holds is skipped; once the stream passes the newest position any partition holds,
nothing is checked any more. Pure: the positions held are read from Kafka by the caller.
"""

from collections.abc import Callable, Mapping

import orjson

from schemas.envelope import TOMBSTONE_HEADER
from schemas.partitioner import partition_for
from source_connector.events import Headers, Message

Position = tuple[int, int, int]  # (commit LSN, seq, rank)
TopicPartition = tuple[str, int]
RANKS = {"d": 0, "c": 2, "u": 2, "r": 2, "t": 2}
TOMBSTONE_RANK = 1


def value_position(value: bytes) -> Position | None:
    """The position of a change event (None for a value that is not one of this connector's)."""
    try:
        doc = orjson.loads(value)
        source = doc["source"]
        commit_lsn, seq = source["commit_lsn"], source["seq"]
        rank = RANKS[doc["op"]]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    if not isinstance(commit_lsn, int) or not isinstance(seq, int):
        return None
    return commit_lsn, seq, rank


def tombstone_position(headers: Headers | None) -> Position | None:
    """A tombstone's position from its `cdc.source` header (None without a seq in it)."""
    for name, raw in headers or ():
        if name == TOMBSTONE_HEADER:
            try:
                header = orjson.loads(raw)
                commit_lsn, seq = header["commit_lsn"], header.get("seq")
            except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
                return None
            if isinstance(commit_lsn, int) and isinstance(seq, int):
                return commit_lsn, seq, TOMBSTONE_RANK
    return None


def message_position(value: bytes | None, headers: Headers | None) -> Position | None:
    return tombstone_position(headers) if value is None else value_position(value)


class Replay:
    """Skips the messages the topics hold already; `done` once the stream is past all of them."""

    def __init__(
        self,
        held: Mapping[TopicPartition, Position],
        partitions: Callable[[str], int],
        everywhere: Position | None = None,
    ) -> None:
        self.held = dict(held)
        self.partitions = partitions
        # Held by every partition (what this process published before its connection was lost).
        self.everywhere = everywhere
        self.high = max([*self.held.values(), *([everywhere] if everywhere else [])], default=None)
        self.skipped = 0

    @property
    def done(self) -> bool:
        return self.high is None

    def keep(self, message: Message) -> bool:
        """Publish this message? False when its partition holds it already."""
        if self.high is None:
            return True
        topic, key, value, partition, headers = message
        position = message_position(value, headers)
        if position is None:
            return True
        if position > self.high:
            self.high = None  # the stream is past everything the topics hold
            return True
        if self.everywhere is not None and position <= self.everywhere:
            self.skipped += 1
            return False
        if partition is None:
            partition = partition_for(key or b"", self.partitions(topic))
        last = self.held.get((topic, partition))
        if last is not None and position <= last:
            self.skipped += 1
            return False
        return True
