"""Gathering the pipeline's state from the three services: the slot on the source, the topics in
Kafka, the sink's applied offsets and progress on the target."""

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaException, TopicPartition
from psycopg2 import sql

from pg_kafka_cdc.common.errors import ConnectError
from pg_kafka_cdc.common.kafka import kafka_reason, wait_for_kafka
from pg_kafka_cdc.common.lsn import int_to_lsn
from pg_kafka_cdc.common.settings import Settings
from pg_kafka_cdc.common.tables import TableName
from schemas.topics import table_for, topic_for
from sink_connector.bookkeeping import Bookkeeping, ConsistentPoint, TableProgress, installed
from source_connector.plugin_allowlist import allows, refused
from source_connector.slot import plugin_setting


@dataclass
class SlotStatus:
    name: str
    exists: bool = False
    active: bool = False
    active_pid: int | None = None
    plugin: str | None = None
    database: str | None = None
    confirmed_flush_lsn: str | None = None
    retained_wal_bytes: int | None = None
    wal_status: str | None = None
    safe_wal_size: int | None = None


@dataclass
class PartitionStatus:
    partition: int
    end_offset: int
    applied_offset: int | None
    lag_messages: int
    lag_seconds: float


@dataclass
class TableStatus:
    table: str
    topic: str
    partitions: list[PartitionStatus] = field(default_factory=list)
    last_applied_commit: str | None = None
    applied_at: str | None = None
    changes_applied: int = 0

    @property
    def lag_messages(self) -> int:
        return sum(p.lag_messages for p in self.partitions)

    @property
    def lag_seconds(self) -> float:
        return max((p.lag_seconds for p in self.partitions), default=0.0)


@dataclass
class ConsistencyStatus:
    """`cdc-sink --consistency transaction`: the last source transaction applied whole."""

    stream: str
    txid: int | None
    commit_lsn: str
    committed_at: str | None
    transactions: int
    reached: bool  # false while bulk copies taken at later snapshots are caught up with

    def line(self) -> str:
        at = f"source commit {self.commit_lsn} at {self.committed_at or 'an unknown time'}"
        if self.reached:
            return f"consistent as of {at}"
        return f"catching up with the bulk copies (applied up to {at}): not consistent yet"


def consistency_status(point: ConsistentPoint | None) -> ConsistencyStatus | None:
    if point is None:
        return None
    committed = None
    if point.ts_us is not None:
        committed = datetime.fromtimestamp(point.ts_us / 1e6, UTC).isoformat().replace("+00:00", "Z")
    return ConsistencyStatus(
        point.stream, point.txid, int_to_lsn(point.commit_lsn), committed, int(point.transactions), point.reached
    )


@dataclass
class Status:
    slot: SlotStatus
    group: str
    tables: list[TableStatus]
    problems: list[str]
    consistency: ConsistencyStatus | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "problems": self.problems,
            "slot": vars(self.slot),
            "sink": {
                "group": self.group,
                "lag_messages": sum(t.lag_messages for t in self.tables),
                "lag_seconds": max((t.lag_seconds for t in self.tables), default=0.0),
                "consistency": None
                if self.consistency is None
                else {**vars(self.consistency), "line": self.consistency.line()},
            },
            "tables": [
                {
                    "table": t.table,
                    "topic": t.topic,
                    "partitions": len(t.partitions),
                    "end_offsets": {str(p.partition): p.end_offset for p in t.partitions},
                    "applied_offsets": {str(p.partition): p.applied_offset for p in t.partitions},
                    "lag_messages": t.lag_messages,
                    "lag_seconds": round(t.lag_seconds, 3),
                    "last_applied_commit": t.last_applied_commit,
                    "applied_at": t.applied_at,
                    "changes_applied": t.changes_applied,
                }
                for t in self.tables
            ],
        }


_SLOT = """
SELECT plugin, database, active, active_pid, confirmed_flush_lsn::text,
       pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, wal_status, safe_wal_size
FROM pg_replication_slots WHERE slot_name = %s
"""


def slot_status(source: Any, name: str) -> SlotStatus:
    with source.cursor() as cur:
        cur.execute(_SLOT, (name,))
        row = cur.fetchone()
    if row is None:
        return SlotStatus(name)
    plugin, database, active, pid, confirmed, retained, wal_status, safe = row
    return SlotStatus(name, True, active, pid, plugin, database, confirmed, retained, wal_status, safe)


def sink_progress(
    target: Any, schema: str, group: str
) -> tuple[dict[tuple[str, int], int | None], dict[str, TableProgress]]:
    """(applied offsets by topic/partition, progress by table) from the sink's tables, if any."""
    book = Bookkeeping(schema, group)
    with target.cursor() as cur:
        if not installed(cur, schema):
            return {}, {}
        offsets = book.applied_offsets(cur)
        tables = {f"{t.schema}.{t.name}": p for t, p in book.table_progress(cur).items()}
    return offsets, tables


def sink_consistency(target: Any, schema: str, group: str) -> ConsistencyStatus | None:
    """The consistent point of a sink run with --consistency transaction (None: never run so)."""
    with target.cursor() as cur:
        if not installed(cur, schema):
            return None
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (sql.Identifier(schema, "consistency").as_string(cur),))
        if not cur.fetchone()[0]:
            return None
        return consistency_status(Bookkeeping(schema, group).consistency(cur))


def message_time(consumer: Any, topic: str, partition: int, offset: int) -> float | None:
    """The source commit time (seconds) of the change at `offset`, when it can be read."""
    consumer.assign([TopicPartition(topic, partition, offset)])
    try:
        for msg in consumer.consume(1, timeout=5):
            if msg.error() is None and msg.value():
                ts = orjson.loads(msg.value()).get("source", {}).get("ts_us")
                return None if ts is None else ts / 1e6
    except (orjson.JSONDecodeError, AttributeError):
        return None
    finally:
        consumer.unassign()
    return None


def slot_problems(slot: str, state: SlotStatus, max_slot_lag: float) -> list[str]:
    if not state.exists:
        return [f"slot {slot} does not exist on the source (is cdc-source running?)"]
    problems = []
    retained = state.retained_wal_bytes or 0
    if not state.active and retained > max_slot_lag:
        problems.append(
            f"slot {slot} is inactive and holds {retained / 2**20:.1f} MiB of WAL "
            f"(more than {max_slot_lag / 2**20:.0f} MiB): start cdc-source, or drop the slot"
        )
    if state.wal_status in ("extended", "unreserved", "lost"):
        problems.append(
            f"slot {slot} has wal_status {state.wal_status}: "
            + ("its WAL is gone, changes were lost" if state.wal_status == "lost" else "it is close to losing WAL")
        )
    return problems


def partition_status(
    consumer: Any, topic: str, partition: int, applied: int | None, now: float
) -> PartitionStatus:
    low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
    lag = max(0, high - (low if applied is None else applied))
    lag_seconds = 0.0
    if lag:
        ts = message_time(consumer, topic, partition, low if applied is None else applied)
        lag_seconds = max(0.0, now - ts) if ts is not None else 0.0
    return PartitionStatus(partition, high, applied, lag, lag_seconds)


def table_status(
    consumer: Any,
    partitions: list[int],
    table: TableName | None,
    topic: str,
    offsets: dict[tuple[str, int], int | None],
    progress: dict[str, TableProgress],
) -> TableStatus:
    """One topic's table: end offsets, what the sink applied, lag in messages and in seconds."""
    status = TableStatus(str(table), topic)
    applied = progress.get(f"{table.schema}.{table.name}" if table else "")
    if applied is not None:
        commit_at, applied_at, changes = applied
        status.last_applied_commit = commit_at.isoformat() if commit_at else None
        status.applied_at = applied_at.isoformat() if applied_at else None
        status.changes_applied = int(changes)
    now = time.time()
    status.partitions = [partition_status(consumer, topic, p, offsets.get((topic, p)), now) for p in partitions]
    return status


def kafka_tables(
    settings: Settings, group: str, offsets: dict[tuple[str, int], int | None], progress: dict[str, TableProgress]
) -> list[TableStatus]:
    wait_for_kafka(settings, timeout=10)
    consumer = Consumer(settings.kafka_config(**{"group.id": group + "-status", "enable.auto.commit": False}))
    try:
        try:
            metadata = consumer.list_topics(timeout=10)
        except KafkaException as exc:
            raise ConnectError(
                f"Kafka is unreachable at {settings.bootstrap_servers} ({kafka_reason(exc)}); check "
                "--bootstrap-servers / KAFKA_BOOTSTRAP_SERVERS, the security settings, and that the broker runs"
            ) from None
        if settings.tables:
            topics = [topic_for(settings.topic_prefix, t) for t in settings.tables]
        else:
            topics = sorted(t for t in metadata.topics if table_for(settings.topic_prefix, t) is not None)
        return [
            table_status(
                consumer,
                sorted(metadata.topics[topic].partitions) if topic in metadata.topics else [],
                table_for(settings.topic_prefix, topic),
                topic,
                offsets,
                progress,
            )
            for topic in topics
        ]
    finally:
        consumer.close()


def gather(
    settings: Settings, source: Any, target: Any, slot: str, group: str, schema: str, quotas: dict[str, float]
) -> Status:
    problems: list[str] = []
    slot_state = slot_status(source, slot)
    plugins = plugin_setting(source)
    if not allows(plugins):
        problems.append(refused(plugins))
    problems += slot_problems(slot, slot_state, quotas["max_slot_lag"])
    offsets, progress = sink_progress(target, schema, group)
    tables = kafka_tables(settings, group, offsets, progress)
    for t in tables:
        if t.lag_messages > quotas["max_lag_messages"] or t.lag_seconds > quotas["max_lag_seconds"]:
            problems.append(
                f"sink group {group} is behind on {t.table}: {t.lag_messages} messages, {t.lag_seconds:.0f} s "
                "(is cdc-sink running?)"
            )
    return Status(slot_state, group, tables, problems, sink_consistency(target, schema, group))
