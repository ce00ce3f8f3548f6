"""In-memory stand-ins for the sink batch loop's Kafka consumer, target database and dead-letter
topic (the Protocols of sink_connector/ports.py), for unit tests of the loop."""

import copy
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg2
from confluent_kafka import TopicPartition as KafkaPartition

from pg_kafka_cdc.common.tables import TableName
from schemas.codec import Position
from sink_connector.bookkeeping import StreamPartition, TopicPartition
from sink_connector.handover import CopySnapshot
from sink_connector.net_effect import TableBatch
from sink_connector.ports import Headers, Message
from sink_connector.preparation import TableState
from sink_connector.target import TargetTable

PREFIX = "cdc"
COLUMNS = {"id": "bigint", "n": "text"}


def topic_of(table: str) -> str:
    return f"{PREFIX}.public.{table}"


@dataclass
class FakeMessage:
    topic_name: str
    partition_number: int
    offset_number: int
    key_bytes: bytes | None
    value_bytes: bytes | None
    header_list: Headers | None = None

    def topic(self) -> str:
        return self.topic_name

    def partition(self) -> int:
        return self.partition_number

    def offset(self) -> int:
        return self.offset_number

    def key(self) -> bytes | None:
        return self.key_bytes

    def value(self) -> bytes | None:
        return self.value_bytes

    def headers(self) -> Headers | None:
        return self.header_list

    def error(self) -> Any:
        return None


class Partitions:
    """Builds a stream of change messages, with offsets per partition."""

    def __init__(self) -> None:
        self.next: dict[TopicPartition, int] = {}

    def _message(self, table: str, partition: int, key: bytes | None, value: bytes | None) -> FakeMessage:
        tp = (topic_of(table), partition)
        offset = self.next.get(tp, 0)
        self.next[tp] = offset + 1
        return FakeMessage(tp[0], partition, offset, key, value)

    def upsert(
        self,
        table: str,
        i: int,
        n: str,
        partition: int = 0,
        op: str = "c",
        xid: int = 900,
        seq: int | None = None,
        stream: str = "S1",
        commit_lsn: int = 9100,
        row: dict[str, Any] | None = None,
        columns: dict[str, str] | None = None,
    ) -> FakeMessage:
        """An upsert; with `seq`, at the source position (commit_lsn, seq) of `stream`; `row` and
        `columns` in place of {"id": i, "n": n} and COLUMNS."""
        source: dict[str, Any] = {
            "txId": xid,
            "lsn": 9000,
            "commit_lsn": commit_lsn,
            "ts_us": 1_700_000_000_000_000 + i,
        }
        if seq is not None:
            source.update(seq=seq, stream=stream)
        env = {
            "op": op,
            "before": None,
            "after": {"id": i, "n": n} if row is None else row,
            "source": source,
            "columns": COLUMNS if columns is None else columns,
            "key": ["id"],
        }
        return self._message(table, partition, orjson.dumps({"id": i}), orjson.dumps(env))

    def schema_change(
        self,
        table: str,
        change: dict[str, Any],
        columns: dict[str, str],
        partition: int = 0,
        seq: int = 1,
        commit_lsn: int = 9100,
        stream: str = "S1",
        partitions: int = 2,
    ) -> FakeMessage:
        """A schema-change event (`s`): `change` completes the empty `schema_change`."""
        env = {
            "op": "s",
            "before": None,
            "after": None,
            "ts_ms": 0,
            "source": {
                "txId": 900,
                "lsn": 9000,
                "commit_lsn": commit_lsn,
                "ts_us": 1_700_000_000_000_000,
                "seq": seq,
                "stream": stream,
            },
            "columns": columns,
            "key": ["id"],
            "partitions": partitions,
            "schema_change": {
                "renamed": [],
                "retyped": [],
                "dropped": [],
                "added": [],
                "rewritten": False,
                **change,
            },
        }
        return self._message(table, partition, None, orjson.dumps(env))

    def delete(self, table: str, i: int, partition: int = 0) -> FakeMessage:
        return self._message(table, partition, orjson.dumps({"id": i}), None)

    def garbage(self, table: str, i: int, partition: int = 0) -> FakeMessage:
        return self._message(table, partition, orjson.dumps({"id": i}), b"{not json")


@dataclass
class FakeLog:
    """The consumer: records seeks and Kafka offset commits."""

    events: list[str]
    seeks: list[tuple[TopicPartition, int | None]] = field(default_factory=list)
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    refuse_seeks: bool = False  # a consumer Kafka stopped, or that lost the partition meanwhile

    def consume(self, count: int, wait: float) -> list[FakeMessage]:
        return []

    def seek(self, tp: TopicPartition, offset: int | None) -> bool:
        self.seeks.append((tp, offset))
        return not self.refuse_seeks

    def commit(self, *, offsets: list[KafkaPartition], asynchronous: bool) -> None:
        self.events.append("kafka commit")
        self.committed.update({(o.topic, o.partition): o.offset for o in offsets})


@dataclass
class FakeDeadLetters:
    events: list[str]
    letters: list[tuple[str, int, int, str]] = field(default_factory=list)
    sent: int = 0

    def send(self, message: Message, reason: str) -> None:
        self.letters.append((message.topic(), message.partition(), message.offset(), reason))
        self.sent += 1

    def flush(self) -> None:
        self.events.append("dead letters")


@dataclass
class Database:
    """What the target holds: rows per table, offsets, parked keys, progress."""

    rows: dict[TableName, dict[Any, dict[str, Any]]] = field(default_factory=dict)
    offsets: dict[TopicPartition, int | None] = field(default_factory=dict)
    parked: dict[tuple[str, bytes], str] = field(default_factory=dict)
    progress: dict[TableName, int] = field(default_factory=dict)
    positions: dict[StreamPartition, Position] = field(default_factory=dict)


class FakeTarget:
    """The target database in memory, one transaction at a time. A row whose `n` is "bad" is
    rejected like a value its column's type refuses."""

    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.tables: dict[TableName, TableState] = {}
        self.applied: dict[StreamPartition, Position] = {}
        self.snapshots: dict[TableName, CopySnapshot] = {}  # tables to "bulk-copy" when prepared
        self.db = Database()
        self.tx: Database | None = None
        self.progress_locked = False
        self.lose_connection = 0  # commits to fail with a lost connection
        self.reject_batches = False  # every batch fails, though no change of it alone does

    def claim(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int | None]:
        for tp in partitions:
            self.db.offsets.setdefault(tp, None)
        self.applied.update({k: v for k, v in self.db.positions.items() if (k[0], k[1]) in partitions})
        return {tp: self.db.offsets[tp] for tp in partitions}

    def prepare(self, table: TableName, hint: TableBatch | None) -> None:
        assert self.tx is None, "a table is prepared outside the batch's transaction"
        self.events.append(f"prepare {table}")
        snapshot = self.snapshots.get(table)
        self.db.rows.setdefault(table, {})
        target = TargetTable(table, dict(COLUMNS), ("id",))
        self.tables[table] = TableState(target, "copy" if snapshot else "topic", snapshot)

    def _open(self) -> Database:
        assert self.tx is not None, "outside a transaction"
        return self.tx

    def begin(self) -> None:
        assert self.tx is None
        self.events.append("begin")
        self.tx = copy.deepcopy(self.db)

    def lock_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int | None]:
        self.events.append("fence")
        tx = self._open()
        return {tp: tx.offsets[tp] for tp in partitions if tp in tx.offsets}

    def apply(self, batch: TableBatch) -> None:
        self.events.append(f"apply {batch.table}")
        rows = self._open().rows.setdefault(batch.table, {})
        for event in batch.schema_changes:  # renames and drops of the rows held
            self.events.append(f"schema change {batch.table} at {event.position}")
            names = dict(event.renamed)
            for key, row in list(rows.items()):
                rows[key] = {names.get(k, k): v for k, v in row.items() if k not in event.dropped}
        if self.reject_batches:
            raise psycopg2.DataError("no single change")
        for row in [*batch.replaced, *(u.row for u in batch.upserts.values())]:
            if row.get("n") == "bad":
                raise psycopg2.DataError(f'invalid input syntax for type bigint: "{row["id"]}"')
        for row, _ in batch.deletes.values():
            rows.pop(row["id"], None)
        for upsert in batch.upserts.values():
            rows[upsert.row["id"]] = {**rows.get(upsert.row["id"], {}), **upsert.row}

    def probe(self, batch: TableBatch) -> str | None:
        if self.reject_batches:
            return None
        saved = copy.deepcopy(self._open())
        try:
            self.apply(batch)
        except psycopg2.DataError as exc:
            self.tx = saved
            return str(exc)
        return None

    def park(self, topic: str, key: bytes, offset: int, reason: str) -> None:
        self.events.append("park")
        self._open().parked.setdefault((topic, key), reason)

    def store_offsets(self, positions: dict[TopicPartition, int]) -> None:
        self.events.append("store offsets")
        self._open().offsets.update(positions)

    def store_positions(self, positions: dict[StreamPartition, Position]) -> None:
        self.events.append("store positions")
        self._open().positions.update(positions)

    def save_progress(self, progress: list[tuple[TableName, int | None, int | None, int]]) -> bool:
        self.events.append("store progress")
        if self.progress_locked:
            return False
        tx = self._open()
        for table, _, _, changes in progress:
            tx.progress[table] = tx.progress.get(table, 0) + changes
        return True

    def commit(self) -> None:
        if self.lose_connection:
            self.lose_connection -= 1
            self.tx = None
            raise psycopg2.OperationalError("server closed the connection unexpectedly")
        self.events.append("commit")
        self.db, self.tx = self._open(), None
        self.applied.update(self.db.positions)

    def rollback(self) -> None:
        if self.tx is not None:
            self.events.append("rollback")
        self.tx = None


@dataclass
class FakeError:
    """A consumed message's error (confluent_kafka.KafkaError)."""

    number: int

    def code(self) -> int:
        return self.number

    def fatal(self) -> bool:
        return False

    def str(self) -> str:
        return f"error {self.number}"


@dataclass
class ErrorMessage(FakeMessage):
    failure: FakeError | None = None

    def error(self) -> Any:
        return self.failure


@dataclass
class FakeConsumer:
    """confluent_kafka.Consumer as KafkaLog uses it: hands out the batches in turn, then nothing
    (KafkaLog.consume asks for one message, then for the rest: a batch's first message, then the
    others of that batch)."""

    batches: list[list[FakeMessage]]
    ends: dict[TopicPartition, int] = field(default_factory=dict)
    rest: list[FakeMessage] | None = None  # the batch whose first message was handed out

    def consume(self, num_messages: int, timeout: float) -> list[FakeMessage]:
        if self.rest is not None:
            rest, self.rest = self.rest, None
            return rest
        batch = self.batches.pop(0) if self.batches else []
        if num_messages == 1 and batch:
            self.rest = batch[1:]
            return batch[:1]
        return batch

    def get_watermark_offsets(self, partition: Any, cached: bool = False) -> tuple[int, int]:
        return 0, self.ends.get((partition.topic, partition.partition), 0)

    def list_topics(self, timeout: float) -> None:
        return None


class FakeRebalancingConsumer:
    """The consumer a rebalance callback is handed."""

    def assign(self, partitions: list[Any]) -> None:
        pass

    def unassign(self) -> None:
        pass
