"""From Kafka messages to changes: each message decoded and checked (schemas.codec), in order; the
messages of a key parked behind a dead letter, and undecodable ones, set aside. Pure."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pg_kafka_cdc.common.tables import TableName
from schemas import codec
from schemas.codec import BadMessage, Headers

if TYPE_CHECKING:
    from sink_connector.ports import Message

TOMBSTONE = "tombstone"  # a null-valued message: delete of its key
SCHEMA_CHANGE = "s"  # a change of the table's columns (sink_connector/schema_changes.py)
FULL_ROW_OPS = frozenset({"c", "r"})
WHOLE_TOPIC_OPS = frozenset({"t", SCHEMA_CHANGE})  # sent to every partition, without a key
DELETE_OPS = frozenset({"d", TOMBSTONE})


@dataclass(slots=True)
class Change:
    topic: str
    partition: int
    offset: int
    key: bytes
    op: str  # c u d r t s, or TOMBSTONE for a null-valued message
    row: dict[str, Any] | None  # after (c, u, r) or the old key/row (d, x)
    columns: dict[str, str] | None
    key_columns: list[str] | None
    unchanged: list[str] | None = None
    xid: int | None = None
    lsn: int | None = None
    commit_lsn: int | None = None
    ts_us: int | None = None
    partitions: int | None = None  # t and s only
    seq: int | None = None
    stream: str | None = None  # schemas.envelope.stream_id (None: not carried)
    schema_change: dict[str, Any] | None = None  # s only: the envelope's `schema_change`


def decode(
    topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None, headers: Headers | None = None
) -> Change:
    """Parse and check one message (schemas.codec); BadMessage says why it is not a change event."""
    if value is None:
        return _tombstone(topic, partition, offset, key, headers)
    read = codec.decode_row_change(value)
    if read is not None:
        fast, columns = read
        if not key:
            raise BadMessage("change event without a key")
        src = fast.source
        seq, stream = src.seq, src.stream
        return Change(
            topic,
            partition,
            offset,
            key,
            fast.op,
            fast.before if fast.op == "d" else fast.after,
            columns,
            fast.key,
            fast.unchanged or None,
            src.txId,
            src.lsn,
            src.commit_lsn,
            src.ts_us,
            None,
            seq,
            stream,
        )
    env = codec.decode(value)
    op, source, columns, key_columns = env["op"], env["source"], env["columns"], env["key"]
    if op in WHOLE_TOPIC_OPS:
        row = None
        if key is None:
            key = b""
    else:
        row = env["before"] if op == "d" else env["after"]
        if not key:
            raise BadMessage("change event without a key")
    unchanged = env.get("unchanged") or None
    partitions = env.get("partitions") if op in WHOLE_TOPIC_OPS else None
    position = (source.get("txId"), source.get("lsn"), source.get("commit_lsn"), source.get("ts_us"))
    seq, stream = source.get("seq"), source.get("stream")
    schema_change = None
    if op == SCHEMA_CHANGE:
        schema_change = _schema_change(env)
        if type(position[2]) is not int or type(seq) is not int:
            raise BadMessage("schema-change event without a source position (commit_lsn and seq)")
    return Change(
        topic,
        partition,
        offset,
        key,
        op,
        row,
        columns,
        key_columns,
        unchanged,
        *position,
        partitions,
        seq if type(seq) is int else None,
        stream if type(stream) is str else None,
        schema_change,
    )


def _schema_change(env: Any) -> dict[str, Any]:
    """The `schema_change` of an `s` event (schemas.codec checks its form)."""
    found = env.get("schema_change")
    if not isinstance(found, dict):
        raise BadMessage("schema-change event without a `schema_change` object")
    return found


def _tombstone(topic: str, partition: int, offset: int, key: bytes | None, headers: Headers | None) -> Change:
    """A null-valued message: the delete of its key (at the position its header names, if any)."""
    if not key:
        raise BadMessage("tombstone without a key")
    key_row = codec.decode_key(key)
    change = Change(topic, partition, offset, key, TOMBSTONE, key_row, None, list(key_row))
    position = codec.decode_tombstone(headers)
    if position is not None:
        change.xid, change.lsn = position["txId"], position["lsn"]
        change.commit_lsn, change.ts_us = position["commit_lsn"], position["ts_us"]
        change.seq, change.stream = position.get("seq"), position.get("stream")
    return change


PARKED = "parked: an earlier change of this key is in the dead-letter topic"


@dataclass(frozen=True)
class Rejected:
    """A message sent to the dead-letter topic instead of the target, and why."""

    message: Message
    reason: str


@dataclass
class Decoded:
    """The changes of a batch's messages; with `bad` set, decoding stopped at that message."""

    changes: list[Change] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    bad: Message | None = None
    error: str = ""


def decode_batch(
    messages: Iterable[Message],
    table_of: Callable[[str], TableName],
    parked: set[tuple[str, bytes]],
    dead_letters: bool,
) -> Decoded:
    """Decode the messages in order. A message of a parked key is rejected; an undecodable one is
    rejected (and its key parked) with `dead_letters`, else it ends the batch as `bad`."""
    decoded = Decoded()
    # The column types and key of the topic's previous change: an equal one shares them (a batch's
    # changes mostly have their table's one shape, held once instead of once per change).
    shapes: dict[str, tuple[dict[str, str] | None, list[str] | None]] = {}
    for m in messages:
        topic, key = m.topic(), m.key()
        if parked and key is not None and (topic, key) in parked:
            decoded.rejected.append(Rejected(m, PARKED))
            continue
        try:
            table_of(topic)
            value = m.value()
            headers = None if value is not None else m.headers()
            change = decode(topic, m.partition(), m.offset(), key, value, headers)
            decoded.changes.append(change)
            columns, key_columns = shapes.get(topic, (None, None))
            if (change.columns is columns or change.columns == columns) and change.key_columns == key_columns:
                change.columns, change.key_columns = columns, key_columns
            else:
                shapes[topic] = (change.columns, change.key_columns)
        except BadMessage as exc:
            if not dead_letters:
                decoded.bad, decoded.error = m, str(exc)
                return decoded
            decoded.rejected.append(Rejected(m, f"undecodable: {exc}"))
            if key is not None:
                parked.add((topic, key))
    return decoded
