"""The shapes each table was published as, kept beside the connector's state record in its compacted
topic: one record per table and slot, written when the table is first published and at each schema
change. At a restart the stream is compared with the shape as of the position it resumes from, not
with the catalog as it is now, so an ALTER TABLE run while cdc-source was stopped is published with
the table's next insert or update, as one run while it streams is.

A shape is kept with the commit LSN of the transaction whose change first showed it (0: from the
start of the stream). A record is produced before the state record that confirms any position past
its LSN, on the same partition, so the record is in Kafka before PostgreSQL may forget that
transaction. A restart re-reads the transactions after the position it resumes from, and with them
the schema changes at LSNs past it: the shape as of that position is the newest one kept at or
below it. Pure, but for reading and producing the records."""

import logging
from dataclasses import dataclass
from typing import Any

import orjson

from pg_kafka_cdc.common.errors import SourceError
from pg_kafka_cdc.common.tables import TableName
from source_connector.state import SourceState
from source_connector.table_info import TableInfo

log = logging.getLogger("source")

HISTORY = 16  # shapes kept per table, the newest last


@dataclass(frozen=True)
class Published:
    lsn: int  # the commit LSN of the transaction from which the shape holds (0: from the start)
    fields: dict[str, Any]  # fields_of(info)


def fields_of(info: TableInfo) -> dict[str, Any]:
    """What a TableInfo is made of (its name and topic aside), as JSON."""
    return {
        "columns": list(info.columns),
        "types": dict(info.types),
        "key": list(info.key),
        "replica_identity": info.replica_identity,
        "not_null": sorted(info.not_null),
        "key_from_pk": info.key_from_pk,
        "attnums": list(info.attnums),
        "relfilenode": info.relfilenode,
    }


def info_from(fields: dict[str, Any], name: TableName, topic: str) -> TableInfo:
    return TableInfo(
        name=name,
        topic=topic,
        columns=tuple(fields["columns"]),
        types=dict(fields["types"]),
        key=tuple(fields["key"]),
        replica_identity=fields["replica_identity"],
        not_null=frozenset(fields["not_null"]),
        key_from_pk=fields["key_from_pk"],
        attnums=tuple(fields["attnums"]),
        relfilenode=fields["relfilenode"],
    )


def shape_key(state: SourceState, table: TableName) -> bytes:
    """The record's key: the slot as its state record names it, the slot's start (a slot made again
    under the same name starts elsewhere, and so with no shapes), and the table."""
    return orjson.dumps(
        ["shape", state.system_id, state.database, state.slot, state.snapshot_lsn, table.schema, table.name]
    )


def is_shape_key(key: bytes | None, state: SourceState) -> bool:
    prefix = orjson.dumps(["shape", state.system_id, state.database, state.slot, state.snapshot_lsn])[:-1] + b","
    return key is not None and key.startswith(prefix)


def encode(table: TableName, history: list[Published]) -> bytes:
    return orjson.dumps({"table": [table.schema, table.name], "shapes": [[p.lsn, p.fields] for p in history]})


def decode(value: bytes) -> tuple[TableName, list[Published]]:
    doc = orjson.loads(value)
    schema, name = doc["table"]
    return TableName(schema, name), [Published(int(lsn), fields) for lsn, fields in doc["shapes"]]


def as_of(history: list[Published], lsn: int) -> Published | None:
    """The shape the changes of transactions committed after `lsn` were published with (None when
    none kept is that old)."""
    found = None
    for p in history:
        if p.lsn <= lsn:
            found = p
    return found


def appended(history: list[Published], lsn: int, info: TableInfo) -> list[Published]:
    """The history with `info` holding from `lsn` (replacing what it held from there: a schema change
    read again after a restart, or a later one of the same transaction)."""
    kept = [p for p in history if p.lsn < lsn]
    return [*kept, Published(lsn, fields_of(info))][-HISTORY:]


class PublishedShapes:
    """The tables' shape histories of one slot, and producing their records."""

    def __init__(self, producer: Any, topic: str, state: SourceState) -> None:
        self.producer = producer
        self.topic = topic
        self.state = state
        self.histories: dict[TableName, list[Published]] = {}

    def load(self, records: dict[bytes, bytes | None]) -> None:
        """The histories from the state topic's records (latest value by key)."""
        for key, value in records.items():
            if value is not None and is_shape_key(key, self.state):
                table, history = decode(value)
                self.histories[table] = history

    def as_published(self, info: TableInfo, resumed_at: int | None) -> TableInfo:
        """The table as its changes after `resumed_at` were published, where that differs from the
        catalog's `info` (a schema change while cdc-source was stopped); `info` itself otherwise. A
        table with no history gets one, from `info`."""
        history = self.histories.get(info.name)
        if not history:
            self.record(info, 0)
            return info
        published = None if resumed_at is None else as_of(history, resumed_at)
        if published is None:
            return info
        was = info_from(published.fields, info.name, info.topic)
        if was.shape == info.shape:  # other differences (the key, NOT NULL) are the catalog's to tell
            return info
        log.info(
            "%s changed since cdc-source last published it (columns then: %s; now: %s): the schema change is "
            "published with the table's next insert or update",
            info.name,
            ", ".join(f"{n} {was.types[n]}" for n in was.columns),
            ", ".join(f"{n} {info.types[n]}" for n in info.columns),
            extra={"table": info.label},
        )
        return was

    def record(self, info: TableInfo, lsn: int) -> None:
        """Keep `info` as the table's shape from `lsn` on, and queue its record."""
        history = appended(self.histories.get(info.name, []), lsn, info)
        self.histories[info.name] = history
        value = encode(info.name, history)
        while True:
            try:
                self.producer.produce(self.topic, value, shape_key(self.state, info.name))
                return
            except BufferError:
                self.producer.poll(0.1)

    def flush(self, timeout: float = 30) -> None:
        if self.producer.flush(timeout) > 0:
            raise SourceError(f"Kafka did not acknowledge the tables' shape records within {timeout:.0f} s")
