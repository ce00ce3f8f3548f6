"""Transaction metadata (`cdc-source run --transaction-metadata`): the BEGIN and END records of each
source transaction on `<prefix>.transaction` (schemas/transactions.py), and the END's count of the
transaction's messages in each change topic. No I/O: the records and the change messages go to
the publisher's publish (`send`), in the stream loop's order (stream.py).

A transaction gets records only when it has at least one message in the change topics. BEGIN is
published just before its first message, END at its commit, both on partition 0 and through the
same publisher as the changes, so that the slot is confirmed only past acknowledged records.

The count of a topic is what a consumer will find there: the messages published now, plus, after a
restart, the messages of the transaction that an earlier run had published already (read from the
topics before streaming: held_transactions in held.py), which the replay does not publish twice.
A message is published, or the stream stops before the END (a message Kafka refuses as too large is
retried until a limit is raised; a stop meanwhile publishes nothing after it), so the END never
counts a message that is not in its topic.
"""

from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import orjson

from pg_kafka_cdc.common.errors import SourceError
from pg_kafka_cdc.common.lsn import int_to_lsn
from schemas.codec import BadMessage, Headers, Position, decode_tombstone
from schemas.topics import table_for
from schemas.transactions import encode_begin, encode_end, encode_key
from source_connector.events import Message, TxContext
from source_connector.flush import Transaction

TRANSACTION_PARTITION = 0
# (stream, commit LSN) of a transaction: how a consumer tells the messages of one from another's.
TransactionKey = tuple[str, int]
Send = Callable[[Transaction, Message], None]  # the publisher's publish


def message_transaction(value: bytes | None, headers: Headers | None) -> TransactionKey | None:
    """The transaction a change message belongs to (tombstones: their `cdc.source` header); None for
    a snapshot read (`r`, or an event of a snapshot: no txId) or a message without one."""
    try:
        if value is None:
            source = decode_tombstone(headers)
            if source is None:
                return None
            stream, commit_lsn, tx_id = source.get("stream"), source["commit_lsn"], source["txId"]
        else:
            doc = orjson.loads(value)
            source = doc["source"]
            if doc.get("op") == "r" or source.get("snapshot") is True:
                return None
            stream, commit_lsn, tx_id = source.get("stream"), source["commit_lsn"], source["txId"]
    except (BadMessage, orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None
    if type(stream) is not str or type(commit_lsn) is not int or tx_id is None:
        return None
    return stream, commit_lsn


class TransactionRecords:
    """The records of the transaction being read, and what the topics held of earlier runs.

    `publish` takes the place of the publisher's for the change messages the replay keeps: each is
    counted, and the transaction's BEGIN goes out just before the first. Records the transaction
    topic holds already (at or before its last position, read before streaming) are not sent again.
    """

    def __init__(self, prefix: str, topic: str, send: Send | None = None) -> None:
        self.prefix = prefix
        self.topic = topic
        self.send: Send = send or _unset
        self.stream = ""  # schemas.envelope.stream_id, once the connector knows it
        self.ctx: TxContext | None = None
        self.counts: Counter[str] = Counter()  # the open transaction's messages by topic
        self.begun = False  # its BEGIN is published (or held already)
        self.published = 0  # ENDs published
        # After a restart: commit LSN -> topic -> messages an earlier run published, for the
        # transactions at or after `since` (the position streaming starts from); the last
        # position the transaction topic holds.
        self.in_topics: dict[int, Counter[str]] = {}
        self.since: int | None = None
        self.held_at: Position | None = None
        self._collections: dict[str, str] = {}

    def held(
        self, in_topics: Mapping[int, Mapping[str, int]], since: int | None, held_at: Position | None
    ) -> None:
        """Before streaming from `since` (None: the topics hold nothing from there on): the messages
        the topics hold of each transaction after it, and the transaction topic's last position."""
        self.in_topics = {lsn: Counter(counts) for lsn, counts in in_topics.items()}
        self.since, self.held_at = since, held_at
        self.ctx, self.begun = None, False
        self.counts = Counter()

    def start(self, tx: Transaction, ctx: TxContext) -> None:
        """A transaction begins; its BEGIN goes out now when the topics hold messages of it already."""
        self.ctx, self.begun = ctx, False
        self.counts = Counter()
        if self.since is None:
            return
        commit_lsn = ctx.commit_lsn
        if commit_lsn is None or commit_lsn < self.since:
            raise SourceError(
                f"transaction {ctx.xid} committed at {int_to_lsn(commit_lsn or 0)} came before the position "
                f"streaming started from ({int_to_lsn(self.since)}): its messages in the topics are not known, "
                "so its END record cannot be counted; restart cdc-source"
            )
        held = self.in_topics.pop(commit_lsn, None)
        if held:
            self.counts.update(held)
            self._begin(tx)

    def publish(self, tx: Transaction, message: Message) -> None:
        """A change message of the open transaction: after its BEGIN, counted."""
        if not self.begun:
            self._begin(tx)
        self.counts[message[0]] += 1
        self.send(tx, message)

    def end(self, tx: Transaction) -> None:
        """The open transaction commits: its END, when it has messages in the topics."""
        ctx = self._open()
        self.ctx = None
        if not self.begun:
            return
        self.begun = False
        commit_lsn = ctx.commit_lsn or 0
        counts = {topic: (self.collection(topic), n) for topic, n in self.counts.items() if n}
        seq = ctx.seq + 1
        value = encode_end(self.stream, ctx.xid, commit_lsn, ctx.ts_us, seq, counts)
        if self._send((commit_lsn, seq, 0), tx, self._record(ctx, value)):
            self.published += 1

    def collection(self, topic: str) -> str:
        """The `schema.table` (unquoted) of a change topic."""
        name = self._collections.get(topic)
        if name is None:
            table = table_for(self.prefix, topic)
            name = self._collections[topic] = topic if table is None else f"{table.schema}.{table.name}"
        return name

    def _begin(self, tx: Transaction) -> None:
        ctx = self._open()
        self.begun = True
        commit_lsn = ctx.commit_lsn or 0
        value = encode_begin(self.stream, ctx.xid, commit_lsn, ctx.ts_us)
        self._send((commit_lsn, 0, 0), tx, self._record(ctx, value))

    def _record(self, ctx: TxContext, value: bytes) -> Message:
        return (self.topic, encode_key(ctx.xid, ctx.commit_lsn or 0), value, TRANSACTION_PARTITION, None)

    def _send(self, at: Position, tx: Transaction, record: Message) -> bool:
        """A record, unless the transaction topic holds it already (an earlier run published it)."""
        if self.held_at is not None and at <= self.held_at:
            return False
        self.send(tx, record)
        return True

    def _open(self) -> TxContext:
        if self.ctx is None:
            raise SourceError(
                "a transaction record outside a transaction: the stream is out of order; restart cdc-source"
            )
        return self.ctx


def _unset(tx: Transaction, message: Message) -> None:
    raise AssertionError("TransactionRecords.send is not set")


def tally(counts: Counter[int], value: bytes | None, headers: Headers | None, stream: str, since: int) -> bool:
    """One message of a partition read back from its end: counted (by commit LSN) when it belongs to
    a transaction of `stream` committed at or after `since`; True when it stands before those (an
    older transaction's message, an initial snapshot's row, another stream's), so that the messages
    before it need no reading: along a partition, positions increase."""
    key = message_transaction(value, headers)
    if key is None:
        snapshot = _snapshot_position(value)
        return snapshot is not None and (snapshot[0] != stream or snapshot[1] < since)
    if key[0] != stream or key[1] < since:
        return True
    counts[key[1]] += 1
    return False


def tail_counts(
    messages: Sequence[tuple[bytes | None, Headers | None]], stream: str, since: int
) -> tuple[Counter[int], bool]:
    """tally() over messages of one partition: the counts, and whether one stands before them."""
    counts: Counter[int] = Counter()
    reached = False
    for value, headers in messages:
        reached = tally(counts, value, headers, stream, since) or reached
    return counts, reached


def _snapshot_position(value: bytes | None) -> tuple[str, int] | None:
    """(stream, commit LSN) of a snapshot read: an initial snapshot's rows stand before the stream."""
    if value is None:
        return None
    try:
        source = orjson.loads(value)["source"]
        stream, commit_lsn = source.get("stream"), source["commit_lsn"]
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None
    if type(stream) is not str or type(commit_lsn) is not int:
        return None
    return stream, commit_lsn
