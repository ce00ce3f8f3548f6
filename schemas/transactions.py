"""Transaction metadata: where a source transaction begins and ends, and how many messages it put in
each change topic, so a consumer can tell when it holds all of a transaction.

With `cdc-source --transaction-metadata`, every source transaction that publishes at least one
change message also gets a BEGIN record, before its first message, and an END record, after its
last, on the topic `<prefix>.transaction` (one partition, so in commit order), keyed by
`{"id": "<txId>:<commit_lsn>"}`. The records follow Debezium's transaction metadata (`status`,
`id`, `ts_ms`, `event_count`, `data_collections`), with two additions: each data collection names
its `topic`, and `source` gives the record's stream and position.

`event_count` counts every message the transaction put in the topic: its row events, the
tombstone after each delete, and its truncate and schema-change events on each partition. Snapshot
reads (`r`) belong to no transaction and get no records.

Positions (see envelope.py): BEGIN stands at (commit_lsn, 0, 0), before the transaction's changes
(their seqs start at 1); END at (commit_lsn, seq, 0) with seq one past its transaction's last
change, after all of them. They strictly increase along the topic within one `stream`, and the
source never publishes one twice, also after a crash.

schemas/transaction.schema.json describes the same bytes.
"""

from collections.abc import Mapping
from typing import Any, Literal, TypedDict, cast

import orjson

from schemas.codec import BadMessage, Position

TRANSACTION_TOPIC_SUFFIX = "transaction"
BEGIN = "BEGIN"
END = "END"

Status = Literal["BEGIN", "END"]


class DataCollection(TypedDict):
    data_collection: str  # `schema.table`, as Debezium names it (unquoted)
    topic: str  # the table's change topic
    event_count: int  # the transaction's messages in that topic


class TransactionSource(TypedDict):
    stream: str  # schemas.envelope.stream_id
    txId: int | None
    commit_lsn: int
    ts_us: int | None  # commit time, microseconds since the epoch
    seq: int  # BEGIN: 0; END: one past the seq of its transaction's last change


class TransactionRecord(TypedDict):
    """The value of a record on the transaction topic."""

    status: Status
    id: str  # `<txId>:<commit_lsn>`, both decimal
    ts_ms: int | None  # commit time, milliseconds since the epoch
    event_count: int | None  # END: the messages of the transaction in all topics; BEGIN: null
    data_collections: list[DataCollection] | None  # END: per topic, in topic order; BEGIN: null
    source: TransactionSource


def transaction_topic(prefix: str) -> str:
    """The topic of the transaction records of the change topics under `prefix`."""
    return f"{prefix}.{TRANSACTION_TOPIC_SUFFIX}"


def transaction_id(tx_id: int | None, commit_lsn: int) -> str:
    return f"{'' if tx_id is None else tx_id}:{commit_lsn}"


def encode_key(tx_id: int | None, commit_lsn: int) -> bytes:
    return orjson.dumps({"id": transaction_id(tx_id, commit_lsn)})


def encode_begin(stream: str, tx_id: int | None, commit_lsn: int, ts_us: int | None) -> bytes:
    """The value of a BEGIN record."""
    return orjson.dumps(
        {
            "status": BEGIN,
            "id": transaction_id(tx_id, commit_lsn),
            "ts_ms": None if ts_us is None else ts_us // 1000,
            "event_count": None,
            "data_collections": None,
            "source": {"stream": stream, "txId": tx_id, "commit_lsn": commit_lsn, "ts_us": ts_us, "seq": 0},
        }
    )


def encode_end(
    stream: str,
    tx_id: int | None,
    commit_lsn: int,
    ts_us: int | None,
    seq: int,
    counts: Mapping[str, tuple[str, int]],
) -> bytes:
    """The value of an END record; `counts` maps each topic to (data collection, messages), `seq`
    is one past the seq of the transaction's last change."""
    collections = [
        {"data_collection": name, "topic": topic, "event_count": n} for topic, (name, n) in sorted(counts.items())
    ]
    return orjson.dumps(
        {
            "status": END,
            "id": transaction_id(tx_id, commit_lsn),
            "ts_ms": None if ts_us is None else ts_us // 1000,
            "event_count": sum(n for _, n in counts.values()),
            "data_collections": collections,
            "source": {"stream": stream, "txId": tx_id, "commit_lsn": commit_lsn, "ts_us": ts_us, "seq": seq},
        }
    )


def decode(value: bytes | None) -> TransactionRecord:
    """A transaction record, checked; BadMessage names the first thing wrong."""
    if value is None:
        raise BadMessage("transaction record without a value")
    try:
        doc: Any = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise BadMessage(f"transaction record is not JSON: {exc}") from None
    if type(doc) is not dict:
        raise BadMessage("transaction record is not a JSON object")
    status = doc.get("status")
    if status not in (BEGIN, END):
        raise BadMessage(f"transaction record with status {status!r} (want BEGIN or END)")
    source = doc.get("source")
    if type(source) is not dict:
        raise BadMessage("transaction record without a `source` object")
    if type(source.get("stream")) is not str:
        raise BadMessage("transaction record without a `source.stream`")
    if type(source.get("commit_lsn")) is not int or type(source.get("seq")) is not int:
        raise BadMessage("transaction record without a position (`source.commit_lsn` and `source.seq`)")
    if type(source.get("txId")) not in (int, type(None)) or type(source.get("ts_us")) not in (int, type(None)):
        raise BadMessage("transaction record whose `source.txId` or `source.ts_us` is not an integer or null")
    if type(doc.get("id")) is not str:
        raise BadMessage("transaction record without an `id`")
    if status == END:
        collections = doc.get("data_collections")
        if type(collections) is not list:
            raise BadMessage("END record without `data_collections`")
        for item in collections:
            if not (
                type(item) is dict
                and type(item.get("topic")) is str
                and type(item.get("data_collection")) is str
                and type(item.get("event_count")) is int
                and item["event_count"] >= 0
            ):
                raise BadMessage(f"END record with a malformed data collection: {item!r}")
        if type(doc.get("event_count")) is not int:
            raise BadMessage("END record without an `event_count`")
    return cast(TransactionRecord, doc)


def counts(record: TransactionRecord) -> dict[str, int]:
    """An END record's messages per topic."""
    return {c["topic"]: c["event_count"] for c in record["data_collections"] or ()}


def position(record: TransactionRecord) -> Position:
    source = record["source"]
    return source["commit_lsn"], source["seq"], 0
