"""One batch of messages, from consumed to committed: decode (changes.py), prepare the tables first
seen, each in a transaction of its own (preparation.py), plan (plan.py), commit (commit.py); a batch
the target rejects is searched for its poison (poison.py); a fenced batch is read again from the
stored offsets."""

import contextlib
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import psycopg2

from pg_kafka_cdc.common.errors import SinkError
from pg_kafka_cdc.common.logs import Every
from pg_kafka_cdc.common.retry import Backoff
from pg_kafka_cdc.common.signals import StopFlag
from pg_kafka_cdc.common.tables import TableName
from sink_connector.bookkeeping import TopicPartition
from sink_connector.changes import Change, Decoded, Rejected, decode_batch
from sink_connector.commit import BatchCommit, Fenced, fence_warning
from sink_connector.metrics import SinkStats
from sink_connector.net_effect import TableBatch
from sink_connector.plan import (
    BatchPlan,
    TopicTables,
    before,
    new_tables,
    plan_batch,
    positions_of,
    positions_of_changes,
)
from sink_connector.poison import ErrorPolicy, find_poison
from sink_connector.ports import Message, Preparer, Target
from sink_connector.schema_history import SchemaHistory
from sink_connector.session import classify

log = logging.getLogger("sink")

UNSYNCED = -2  # an expected offset no stored offset equals


@dataclass
class BatchProcessor:
    target: Target
    preparer: Preparer
    commit: BatchCommit
    policy: ErrorPolicy
    topic_tables: TopicTables
    stats: SinkStats
    reconnect: Callable[[BaseException, float], None]
    backoff: Backoff = field(default_factory=lambda: Backoff(base=0.5, cap=15.0))
    duplicates_log: Every = field(default_factory=lambda: Every(10.0))
    duplicates_unlogged: int = 0
    # the schema changes applied to the tables (session.TargetSession.history): read when planning,
    # added to once a batch that applied some has committed
    schema: SchemaHistory = field(default_factory=SchemaHistory)
    # after a batch of these tables the target refused with this error: enum values the source added,
    # another member's schema changes; True when something changed (session.TargetSession.refresh_schema)
    refresh_schema: Callable[[BaseException, Collection[TableName]], bool] | None = None

    def run(self, messages: Sequence[Message], stop: StopFlag) -> bool:
        """Apply the batch, retrying it while the target is unreachable or busy. False when the
        sink was stopped meanwhile."""
        while True:
            try:
                self.process(messages)
                self.backoff.reset()
                return True
            except Fenced as fenced:
                self.resync(fenced.stored, messages)
                return True
            except psycopg2.Error as exc:
                self.target.rollback()
                kind = classify(exc)
                if kind == "data":
                    raise SinkError(f"applying a batch failed: {self.policy.reason(exc)}") from None
                delay = self.backoff.next_delay(time.monotonic()) or 1.0
                if kind == "connection":
                    self.reconnect(exc, delay)
                else:
                    stop.wait(delay)
                if stop:
                    return False

    def decode(self, messages: Sequence[Message]) -> Decoded:
        """The batch's changes (pure: nothing of the target is read)."""
        return decode_batch(messages, self.topic_tables.table_of, self.policy.parked, self.policy.dead_letters)

    def planned(self, decoded: Decoded, messages: Sequence[Message]) -> BatchPlan:
        """The plan of a decoded batch without a bad message, its new tables prepared."""
        self.prepare(decoded.changes)
        return self.plan(decoded.changes, decoded.rejected, positions_of(messages))

    def planned_after(self, decoded: Decoded, messages: Sequence[Message], earlier: BatchPlan) -> BatchPlan | None:
        """The plan of a decoded batch as it will be once `earlier`, being committed, has committed:
        against the source positions that commit stores. None when that cannot be known before:
        the batch has tables to prepare (which takes the connection), or `earlier` changes schemas."""
        if decoded.bad is not None or any(b.schema_changes for b in earlier.tables):
            return None
        tables, topic_tables = self.target.tables, self.topic_tables
        if any(topic_tables[topic] not in tables for topic in {c.topic for c in decoded.changes}):
            return None
        applied = {**self.target.applied, **earlier.applied}
        return plan_batch(
            decoded.changes, decoded.rejected, positions_of(messages), topic_tables, tables, applied, self.schema
        )

    def process(self, messages: Sequence[Message]) -> None:
        decoded = self.decode(messages)
        if decoded.bad is not None:
            bad = decoded.bad
            self.commit_prefix(before(decoded.changes, bad.topic(), bad.partition(), bad.offset()))
            raise self.policy.undecodable(bad, decoded.error)
        changes, rejected = decoded.changes, decoded.rejected
        self.prepare(changes)
        positions = positions_of(messages)
        refreshed = False
        while True:
            try:
                self.apply(self.plan(changes, rejected, positions))
                return
            except psycopg2.Error as exc:
                if classify(exc) != "data":
                    raise
                self.target.rollback()
                # another member may have changed a table's schema meanwhile: planned again with it
                tables = {self.topic_tables[c.topic] for c in changes}
                if not refreshed and self.refresh_schema is not None and self.refresh_schema(exc, tables):
                    refreshed = True
                    continue
                changes, set_aside = self.without_poison(changes, messages, exc)
                rejected = [*rejected, *set_aside]

    def prepare(self, changes: list[Change]) -> None:
        """Tables first seen in this batch: created or bulk-copied before the batch's transaction."""
        found = new_tables(changes, self.topic_tables, self.target.tables, self.schema.applies)
        for table, hint in found.items():
            self.preparer.prepare(table, hint)

    def plan(
        self, changes: list[Change], rejected: list[Rejected], positions: dict[TopicPartition, int]
    ) -> BatchPlan:
        return plan_batch(
            changes, rejected, positions, self.topic_tables, self.target.tables, self.target.applied, self.schema
        )

    def plan_one(self, change: Change) -> list[TableBatch]:
        return plan_batch([change], [], {}, self.topic_tables, self.target.tables, {}, self.schema).tables

    def apply(self, plan: BatchPlan, to_kafka: bool = True) -> None:
        started = time.monotonic()
        self.commit.run(plan, to_kafka)
        for batch in plan.tables:
            state = self.target.tables.get(batch.table)
            if batch.schema_changes and state is not None:
                self.schema.add(batch.table, state.target.oid, batch.schema_changes)
        self.stats.committed(plan, started)
        self.duplicates_unlogged += plan.duplicates
        if self.duplicates_unlogged and self.duplicates_log.due(started):
            log.info(
                "skipped %d changes the target already had (the topics hold them twice, or they were read again)",
                self.duplicates_unlogged,
            )
            self.duplicates_unlogged = 0

    def commit_prefix(self, changes: list[Change]) -> None:
        """--on-error fail: apply and commit what came before the bad message (the sink stops next)."""
        if changes:
            self.prepare(changes)
            self.apply(self.plan(changes, [], positions_of_changes(changes)))

    def without_poison(
        self, changes: list[Change], messages: Sequence[Message], failure: BaseException
    ) -> tuple[list[Change], list[Rejected]]:
        """Find the change the target rejects: stop after the changes before it (fail), or set it
        and the later changes of its key aside as dead letters (dlq). `failure`: the batch's error."""
        found = find_poison(self.target, changes, self.plan_one)
        if found is None:
            raise self.policy.unapplicable(failure) from None
        index, reason = found
        poison = changes[index]
        if not self.policy.dead_letters:
            self.commit_prefix(changes[:index])
            raise self.policy.rejected(poison, reason) from None
        return self.policy.set_aside(changes, poison, reason, messages)

    def resync(self, stored: dict[TopicPartition, int | None], messages: Sequence[Message]) -> None:
        """After a fencing conflict: continue every partition of the batch from what is stored."""
        self.stats.fenced += 1
        expected = self.commit.expected
        log.warning("%s", fence_warning(stored, expected))
        mine = [tp for tp in {(m.topic(), m.partition()) for m in messages} if tp in expected]
        with contextlib.suppress(psycopg2.Error):  # lost connection: the next batch reconnects
            self.target.claim(mine)  # the source positions the other member applied, too
        for tp in mine:
            offset = stored.get(tp, expected[tp])
            # A refused seek (the partition was just taken away, or Kafka stopped this consumer, which
            # the next consume reports) leaves the partition expected nowhere: its next batch is
            # fenced and sought again, never applied from where the consumer happens to be.
            expected[tp] = offset if self.commit.messages.seek(tp, offset) else UNSYNCED
