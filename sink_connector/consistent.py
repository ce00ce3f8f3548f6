"""`cdc-sink --consistency transaction`: one target transaction never holds part of a source
transaction, and source transactions reach the target in commit order.

The sink also consumes the transaction topic (`<prefix>.transaction`, written by `cdc-source
--transaction-metadata`), feeds every change and transaction record to the gate
(transaction_gate.py), and applies what it releases through the same plan as the default mode
(plan.plan_batch: the position filter, the hand-over from the bulk copy, schema changes, the net
effect). A cut that completes transactions commits them with the next offsets of every partition
it moved (the transaction topic's included), the source positions, the tables' progress and the
consistent point: the last source transaction applied whole. A large transaction comes in pieces,
applied in one open target transaction that commits with the cut completing it.

Any failure while a target transaction is open rolls it back, forgets what the gate holds and reads
every partition again from the offsets stored (or expected) for it.
"""

import contextlib
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import psycopg2

from pg_kafka_cdc.common.errors import SinkError
from pg_kafka_cdc.common.logs import Every
from pg_kafka_cdc.common.lsn import int_to_lsn
from pg_kafka_cdc.common.pg import error_reason
from pg_kafka_cdc.common.retry import Backoff
from pg_kafka_cdc.common.signals import StopFlag
from pg_kafka_cdc.common.tables import TableName
from schemas import transactions
from schemas.codec import BadMessage, Position
from sink_connector.batch import UNSYNCED
from sink_connector.bookkeeping import ConsistentPoint, StreamPartition, TopicPartition
from sink_connector.changes import decode_batch
from sink_connector.commit import Fenced, commit_to_kafka, fence_warning
from sink_connector.consumer import EndOffsets, KafkaLog, batch_count
from sink_connector.metrics import SinkStats
from sink_connector.plan import Progress, TopicTables, merge_progress, new_tables, plan_batch
from sink_connector.ports import Message, Preparer
from sink_connector.schema_history import SchemaHistory
from sink_connector.session import TargetSession, classify
from sink_connector.transaction_gate import Cut, Transaction, TransactionGate

log = logging.getLogger("sink")

PAUSE_AT = 20_000  # messages the gate holds before partitions waiting for later transactions pause


class NewTables(Exception):
    """Tables first seen while a target transaction is open: prepared outside it, then read again."""

    def __init__(self, tables: Collection[TableName]) -> None:
        super().__init__("new tables")
        self.tables = tables


@dataclass
class OpenTransaction:
    """What the open target transaction holds so far: stored when it commits."""

    positions: dict[TopicPartition, int] = field(default_factory=dict)
    applied: dict[StreamPartition, Position] = field(default_factory=dict)
    progress: list[Progress] = field(default_factory=list)
    schema_changed: bool = False
    pieces: int = 0


def point_text(point: ConsistentPoint) -> str:
    """`source commit 0/1A2B3C at 2026-12-01T22:00:00.123456Z`."""
    at = "an unknown time"
    if point.ts_us is not None:
        at = datetime.fromtimestamp(point.ts_us / 1e6, UTC).isoformat().replace("+00:00", "Z")
    return f"source commit {int_to_lsn(point.commit_lsn)} at {at}"


@dataclass
class TransactionLoop:
    target: TargetSession
    preparer: Preparer
    kafka: KafkaLog
    topic_tables: TopicTables
    stats: SinkStats
    gate: TransactionGate
    reconnect: Callable[[BaseException, float], None]
    watch: Callable[[], None]
    batch_size: int
    batch_bytes: int
    batch_wait: float
    schema: SchemaHistory = field(default_factory=SchemaHistory)
    refresh_schema: Callable[[BaseException, Collection[TableName]], bool] | None = None
    backoff: Backoff = field(default_factory=lambda: Backoff(base=0.5, cap=15.0))
    point: ConsistentPoint | None = None  # as committed
    open: OpenTransaction | None = None
    unsaved_progress: list[Progress] = field(default_factory=list)
    paused: set[TopicPartition] = field(default_factory=set)
    generation: int = -1
    refreshed: bool = False
    pause_at: int = PAUSE_AT
    schema_stale: bool = False  # a rollback undid schema changes the history and tables still show
    point_log: Every = field(default_factory=lambda: Every(5.0))
    logged: ConsistentPoint | None = None
    waiting_since: float | None = None  # messages buffered, no transaction record to apply them by
    head_tx: Transaction | None = None  # the head transaction, waiting since head_since
    head_since: float = 0.0
    outside: dict[str, int] = field(default_factory=dict)  # applied without this mode, per stream (done())
    waiting_log: Every = field(default_factory=lambda: Every(30.0))
    duplicates_log: Every = field(default_factory=lambda: Every(10.0))
    duplicates_unlogged: int = 0

    @property
    def tx_topic(self) -> TopicPartition:
        return self.gate.tx_topic

    def done(self) -> dict[str, int]:
        """The last source transaction applied, per stream. A group that never committed in this
        mode (it applied in row mode before) counts as done up to the newest change it applied:
        what comes of the transactions up to there is applied as it comes, consistent from the next."""
        if self.point is not None:
            return {self.point.stream: self.point.commit_lsn}
        found: dict[str, int] = {}
        for (_, _, stream), (commit_lsn, _, _) in self.target.applied.items():
            found[stream] = max(found.get(stream, commit_lsn), commit_lsn)
        if found and found != self.outside:
            self.outside = dict(found)
            log.warning(
                "group %s applied changes up to source commit %s without --consistency transaction: the "
                "transactions up to it are applied as their messages come, and the target is consistent from the "
                "first transaction after it",
                self.kafka.group,
                ", ".join(int_to_lsn(lsn) for lsn in found.values()),
            )
        return found

    # --- the loop -----------------------------------------------------------------------------

    def run(self, stop: StopFlag, once: EndOffsets | None) -> None:
        self.point = self.target.consistent_point()
        self.stats.consistency = self.point
        self.gate.reset(self.done())
        count = min(self.batch_size, 500)
        while not stop:
            if once is not None and self.open is None and once.reached():
                log.info("caught up with the end offsets seen at start-up; exiting (--once)")
                return
            messages = self.kafka.consume(count, self.batch_wait)
            self.watch()
            if self.kafka.generation != self.generation:
                self.reassigned(messages)
                continue
            if messages:
                count = batch_count(messages, self.batch_size, self.batch_bytes)
                self.feed(self.kafka.usable(messages))
            if not self.drain(stop):
                return
            self.flow()
            now = time.monotonic()
            self.log_point(now)
            self.check_waiting(now)
        self.rollback()

    def reassigned(self, messages: Sequence[Message]) -> None:
        """A rebalance: what was consumed before it may not be this member's any more. The new
        assignment starts from the stored offsets; the partitions of the messages dropped here,
        read since, are sought back to them."""
        self.rollback()
        self.generation = self.kafka.generation
        # Kafka keeps a partition paused through a rebalance: every partition assigned now goes on
        self.kafka.pause(sorted(self.kafka.expected), resume=True)
        self.paused.clear()
        self.restart(seek=False)
        expected = self.kafka.expected
        for tp in {(m.topic(), m.partition()) for m in messages}:
            if tp in expected and not self.kafka.seek(tp, expected[tp]):
                expected[tp] = UNSYNCED

    def feed(self, messages: Sequence[Message]) -> None:
        tx_topic = self.tx_topic[0]
        changes = [m for m in messages if m.topic() != tx_topic]
        for m in messages:
            if m.topic() == tx_topic:
                try:
                    record = transactions.decode(m.value())
                except BadMessage as exc:
                    raise SinkError(
                        f"cannot decode transaction record {tx_topic}[{m.partition()}] at offset {m.offset()}: "
                        f"{exc}; nothing past it was applied"
                    ) from None
                self.gate.push_record(m.offset(), record)
        if not changes:
            return
        decoded = decode_batch(changes, self.topic_tables.table_of, set(), False)
        if decoded.bad is not None:
            bad = decoded.bad
            raise SinkError(
                f"cannot decode message {bad.topic()}[{bad.partition()}] at offset {bad.offset()}: {decoded.error}; "
                "the source transactions from it on were not applied (inspect it)"
            )
        for m, change in zip(changes, decoded.changes, strict=True):
            self.gate.push(change, len(m.value() or b"") + len(m.key() or b""))

    def drain(self, stop: StopFlag) -> bool:
        """Apply every cut the gate releases; False when stopped while retrying."""
        while True:
            try:
                cut = self.gate.cut()
            except SinkError:
                self.rollback()
                raise
            if self.gate.dropped:
                self.dropped()
            if cut is None:
                return True
            if not self.apply(cut, stop):
                return False

    def dropped(self) -> None:
        """Transactions whose messages lie before the offsets the group started from: not held back."""
        found, self.gate.dropped = self.gate.dropped, []
        log.warning(
            "%s%s: part of %s lies before the offsets this group started from (applied before in row mode or by "
            "cdc-sink rebuild, or deleted by retention); what the topics hold of %s is applied without "
            "waiting for the rest",
            found[0].describe(),
            f" and {len(found) - 1} later" if len(found) > 1 else "",
            "it" if len(found) == 1 else "them",
            "it" if len(found) == 1 else "them",
        )

    def flow(self) -> None:
        """Pause the partitions whose head waits for a later transaction while the gate holds many
        messages; go on with them once they can be applied (or the gate holds few)."""
        gate = self.gate
        wanted: set[TopicPartition] = set()
        # not below PAUSE_AT: a resumed partition waits for a fetch from the broker
        if gate.buffered > max(2 * self.batch_size, self.pause_at):
            wanted = set(gate.blocked())
        elif gate.buffered > max(self.batch_size, self.pause_at // 2):
            wanted = self.paused & set(gate.blocked())
        head = gate.head
        if head is not None and head.end_offset is not None and len(gate.records) > 4 * self.batch_size:
            wanted.add(self.tx_topic)
        self.kafka.pause(sorted(wanted - self.paused))
        self.kafka.pause(sorted(self.paused - wanted), resume=True)
        self.paused = wanted

    # --- one cut ------------------------------------------------------------------------------

    def apply(self, cut: Cut, stop: StopFlag) -> bool:
        """Apply a cut, committing it unless partial; on failure, start over from the stored offsets.
        False when stopped while waiting to retry."""
        try:
            self.apply_cut(cut)
            self.backoff.reset()
            return True
        except Fenced as fenced:
            self.rollback()
            self.resync(fenced.stored)
            return True
        except NewTables as new:
            self.rollback()
            self.restart(seek=True)
            found = new_tables(cut.changes, self.topic_tables, self.target.tables, self.schema.applies)
            for table in new.tables:
                self.preparer.prepare(table, found.get(table))
            return True
        except psycopg2.Error as exc:
            tables = {self.topic_tables[c.topic] for c in cut.changes}
            self.rollback()
            self.restart(seek=True)
            kind = classify(exc)
            if kind == "data":
                if not self.refreshed and self.refresh_schema is not None and self.refresh_schema(exc, tables):
                    self.refreshed = True  # the target's tables changed meanwhile: read again
                    return True
                raise SinkError(f"applying {self.failing(cut)} failed: {self.reason(exc)}") from None
            delay = self.backoff.next_delay(time.monotonic()) or 1.0
            if kind == "connection":
                self.reconnect(exc, delay)
            else:
                stop.wait(delay)
            return not stop

    def failing(self, cut: Cut) -> str:
        pending = self.gate.head
        if cut.transactions:
            first = cut.transactions[0]
            more = len(cut.transactions) - 1
            return first.describe() + (f" (or one of the {more} after it)" if more else "")
        if pending is not None:
            return pending.tx.describe()
        return "changes that belong to no source transaction"

    def reason(self, exc: BaseException) -> str:
        return self.target.explain(exc) or error_reason(exc)

    def apply_cut(self, cut: Cut) -> None:
        if self.schema_stale and self.open is None:
            self.reload_schema()
        found = new_tables(cut.changes, self.topic_tables, self.target.tables, self.schema.applies)
        if found:
            if self.open is not None:
                raise NewTables(list(found))
            for table, hint in found.items():
                self.preparer.prepare(table, hint)
        started = time.monotonic()
        is_open = self.open
        applied: Mapping[StreamPartition, Position] = self.target.applied
        if is_open is not None and is_open.applied:
            applied = {**self.target.applied, **is_open.applied}
        plan = plan_batch(
            cut.changes, [], cut.positions, self.topic_tables, self.target.tables, applied, self.schema
        )
        if is_open is None:
            self.target.begin()
            self.fence()
            is_open = self.open = OpenTransaction()
        for batch in plan.tables:
            self.target.apply(batch)
            state = self.target.tables.get(batch.table)
            if batch.schema_changes and state is not None:
                self.schema.add(batch.table, state.target.oid, batch.schema_changes)
                is_open.schema_changed = True
        is_open.positions.update(cut.positions)
        is_open.applied.update(plan.applied)
        is_open.progress = merge_progress(is_open.progress, plan.progress)
        is_open.pieces += 1
        self.stats.committed(plan, started)
        self.duplicates_unlogged += plan.duplicates
        if cut.partial:
            return
        point = self.point_after(cut.transactions)
        self.target.store_offsets(is_open.positions)
        if is_open.applied:
            self.target.store_positions(is_open.applied)
        progress = merge_progress(self.unsaved_progress, is_open.progress)
        saved = bool(progress) and self.target.save_progress(progress)
        if point is not self.point and point is not None:
            self.target.store_consistency(point)
        self.target.commit()
        self.open = None
        self.refreshed = False
        self.unsaved_progress = [] if saved else progress
        self.kafka.expected.update(is_open.positions)
        self.committed(point, len(cut.transactions))
        commit_to_kafka(self.kafka.consumer, is_open.positions)

    def fence(self) -> None:
        """At the first piece: every assigned partition's stored offset is still the one expected."""
        expected = self.kafka.expected
        stored = self.target.lock_offsets(list(expected))
        if any(stored.get(tp) != offset for tp, offset in expected.items()):
            self.target.rollback()
            raise Fenced(stored)

    def point_after(self, done: list[Transaction]) -> ConsistentPoint | None:
        """The consistent point once `done` are applied: reached when no bulk copy of a table holds a
        transaction after the last one (each copy was taken at its own snapshot)."""
        if not done:
            return self.point
        last = done[-1]
        copies = [s.snapshot for s in self.target.tables.values() if s.snapshot is not None]
        reached = not any(c.contains("c", last.tx_id, None, last.commit_lsn) for c in copies)
        total = (0 if self.point is None else self.point.transactions) + len(done)
        return ConsistentPoint(last.stream, last.tx_id, last.commit_lsn, last.ts_us, total, reached)

    def committed(self, point: ConsistentPoint | None, transactions_done: int) -> None:
        was = self.point
        self.point = point
        self.stats.consistency = point
        self.stats.transactions_applied += transactions_done
        now = time.monotonic()
        if self.duplicates_unlogged and self.duplicates_log.due(now):
            log.info(
                "skipped %d changes the target already had (the topics hold them twice, or they were read again)",
                self.duplicates_unlogged,
            )
            self.duplicates_unlogged = 0
        if point is not was:
            self.log_point(now)

    def check_waiting(self, now: float) -> None:
        """Messages that have waited long for their transaction's records, or a transaction that has
        waited long for its messages: said every 30 s."""
        head = self.gate.head
        if head is not None:
            if head.tx is not self.head_tx:
                self.head_tx, self.head_since = head.tx, now
            elif now - self.head_since >= 30 and self.waiting_log.due(now):
                lacking = self.gate.lacking()
                what = (
                    "its END record is not read yet"
                    if lacking is None
                    else "it still lacks " + ", ".join(f"{n} messages in {t}" for t, n in sorted(lacking.items()))
                )
                log.warning(
                    "%s has waited %.0f s to be applied whole: %s (is cdc-source running, with --transaction-metadata?)",
                    head.tx.describe(),
                    now - self.head_since,
                    what,
                )
        if not self.gate.buffered or head is not None:
            self.waiting_since = None
            return
        if self.waiting_since is None:
            self.waiting_since = now
        elif now - self.waiting_since >= 30 and self.waiting_log.due(now):
            log.warning(
                "%d messages have waited %.0f s for the records of their source transactions on %s: is cdc-source "
                "running with --transaction-metadata?",
                self.gate.buffered,
                now - self.waiting_since,
                self.tx_topic[0],
            )

    def log_point(self, now: float) -> None:
        """The consistent point, at most every few seconds (and the last one once it stands still)."""
        point = self.point
        if point is None or point is self.logged or not self.point_log.due(now):
            return
        self.logged = point
        if point.reached:
            log.info("consistent as of %s (%d source transactions applied)", point_text(point), point.transactions)
        else:
            log.info(
                "catching up with the bulk copies: applied up to %s, not consistent yet (a copy holds later "
                "transactions)",
                point_text(point),
            )

    # --- starting over ------------------------------------------------------------------------

    def rollback(self) -> None:
        """End the open target transaction, if any, undoing its pieces."""
        was = self.open
        self.open = None
        with contextlib.suppress(psycopg2.Error):
            self.target.rollback()
        if was is not None and was.schema_changed:
            self.schema_stale = True
            self.reload_schema()

    def reload_schema(self) -> None:
        """The schema changes recorded and the tables as they are on the target, after a rollback
        undid some: read again now, or (the connection lost) before the next cut."""
        if self.refresh_schema is not None:
            with contextlib.suppress(psycopg2.Error):
                self.refresh_schema(RuntimeError("rolled back"), ())
        self.schema_stale = self.target.closed

    def restart(self, seek: bool) -> None:
        """Forget what the gate holds; read every assigned partition again from its expected offset."""
        self.gate.reset(self.done())
        if not seek:
            return
        expected = self.kafka.expected
        for tp, offset in list(expected.items()):
            if offset == UNSYNCED:
                continue
            if not self.kafka.seek(tp, offset):
                expected[tp] = UNSYNCED
        if self.paused:
            self.kafka.pause(sorted(self.paused), resume=True)
            self.paused = set()

    def resync(self, stored: dict[TopicPartition, int | None]) -> None:
        """After a fencing conflict: continue every partition from what is stored."""
        self.stats.fenced += 1
        expected = self.kafka.expected
        log.warning("%s", fence_warning(stored, expected))
        with contextlib.suppress(psycopg2.Error):
            self.target.claim(list(expected))
        for tp in list(expected):
            expected[tp] = stored.get(tp, expected[tp])
        with contextlib.suppress(psycopg2.Error):
            self.point = self.target.consistent_point()
        self.restart(seek=True)
