"""cdc-sink: consume change topics in batches and apply them to the target, exactly once in effect.

Each batch is one target transaction that also moves the stored offsets of its partitions, after
checking they are still the ones this process started the batch from (a process that lost its
partitions while frozen cannot write behind its successor's back). Offsets are committed to Kafka
afterwards, for the tools that show a group's lag. A batch goes through batch.py, which decodes it
(changes.py), prepares the tables first seen (preparation.py), plans it (plan.py) and commits it
(commit.py).

With `--consistency transaction` the loop of consistent.py takes over: it also consumes the
transaction topic and commits whole source transactions in commit order (transaction_gate.py), with
a single member holding every partition (sole_member.py).
"""

import logging
import time
from dataclasses import dataclass
from typing import Any

from pg_kafka_cdc.common.errors import SinkError
from pg_kafka_cdc.common.kafka import admin_client, wait_for_kafka
from pg_kafka_cdc.common.service import serving
from pg_kafka_cdc.common.settings import Settings
from pg_kafka_cdc.common.signals import StopFlag
from pg_kafka_cdc.common.tables import TableName
from schemas.transactions import transaction_topic
from sink_connector.added_columns import SourceAccess
from sink_connector.batch import BatchProcessor
from sink_connector.bookkeeping import Bookkeeping, TopicPartition
from sink_connector.commit import BatchCommit
from sink_connector.consistent import TransactionLoop
from sink_connector.consumer import EndOffsets, KafkaLog, batch_count, end_offsets
from sink_connector.dlq import DeadLetters
from sink_connector.metrics import SinkStats, collect
from sink_connector.overlap import OverlappedBatches
from sink_connector.plan import TopicTables
from sink_connector.poison import ErrorPolicy
from sink_connector.preparation import TablePreparer, TableState
from sink_connector.rebuild import check_not_rebuilding
from sink_connector.session import TargetSession
from sink_connector.sole_member import check_alone_before_joining, check_assignment
from sink_connector.subscription import in_subscription, subscription_for
from sink_connector.transaction_gate import TransactionGate, consumed

log = logging.getLogger("sink")


@dataclass
class TopicWatch:
    """--consistency transaction: how long change topics have stood without the transaction topic."""

    topic: str
    timeout: float
    since: float | None = None

    def missing(self, now: float) -> bool:
        """Noted missing now; True once it has been for the timeout."""
        if self.since is None:
            self.since = now
            log.info("waiting for topic %s to exist (cdc-source --transaction-metadata creates it)", self.topic)
        return now - self.since >= self.timeout

    def refusal(self) -> str:
        return (
            f"topic {self.topic} does not exist: run cdc-source with --transaction-metadata (needed by "
            "--consistency transaction)"
        )


@dataclass(frozen=True)
class SinkOptions:
    group: str = "cdc-sink"
    snapshot: str = "copy"  # copy | topic | never
    on_error: str = "fail"  # fail | dlq
    slot: str = "cdc_slot"
    state_schema: str = "cdc_sink"
    batch_size: int = 10000
    batch_bytes: int = 12 << 20
    batch_wait: float = 0.02
    once: bool = False
    kafka_timeout: float = 60.0
    rebuild: tuple[TableName, ...] = ()
    metrics_port: int = 0
    instance_id: str | None = None  # static group membership (group.instance.id)
    schema_changes: str = "keep"  # keep | drop | none (schema_changes.py)
    consistency: str = "row"  # row | transaction (consistent.py)

    @property
    def transactional(self) -> bool:
        return self.consistency == "transaction"


class Sink:
    def __init__(self, settings: Settings, options: SinkOptions, stop: StopFlag) -> None:
        self.settings = settings
        self.options = options
        self.stop = stop
        self.stats = SinkStats()
        book = Bookkeeping(options.state_schema, options.group)
        tables: dict[TableName, TableState] = {}
        source = SourceAccess(settings.source_dsn, options.slot) if settings.source_dsn and options.slot else None
        self.target = TargetSession(settings.target_dsn, book, tables, source, options.schema_changes)
        self.preparer = TablePreparer(
            settings,
            book,
            options.snapshot,
            options.rebuild,
            options.slot,
            stop,
            self.target,
            tables,
            source=source,
        )
        self.topic_tables = TopicTables(settings.topic_prefix)
        self.kafka = KafkaLog(settings, options.group, options.instance_id, self._claim, self.stats)
        self.dead_letters: DeadLetters | None = None
        # Messages asked for at once (see batch_count); the first batch is small, until the size of
        # the messages is known.
        self.batch_count = min(options.batch_size, 500)
        self.next_lag_check = 0.0
        self.admin: Any = None
        self.tx_topic = transaction_topic(settings.topic_prefix)
        self.tx_topic_watch = TopicWatch(self.tx_topic, options.kafka_timeout)
        self.stats.consistency_mode = options.transactional

    def run(self) -> None:
        with serving(self.options.metrics_port, lambda: collect(self), self.health):
            self._run()

    def health(self) -> tuple[bool, str]:
        now = time.monotonic()
        down = self.stats.target_down_since
        if down is not None and now - down > 30:
            return False, f"target database unreachable for {now - down:.0f} s"
        if self.kafka.down_since is not None and now - self.kafka.down_since > 30:
            return False, f"Kafka unreachable for {now - self.kafka.down_since:.0f} s"
        return True, f"ok: {self.stats.batches} batches applied"

    # --- start-up -----------------------------------------------------------------------------

    def _run(self) -> None:
        self.target.connect()
        self.target.install()
        admin = self.admin = admin_client(self.settings)
        wait_for_kafka(self.settings, self.options.kafka_timeout, self.stop)
        if self.options.transactional:
            self._wait_for_transaction_topic(admin)
            check_alone_before_joining(admin, self.options.group, self.options.instance_id)
        policy = ErrorPolicy(self.options.on_error, self.target.parked(), self.target.explain)
        if policy.dead_letters:
            self.dead_letters = DeadLetters(self.settings, admin)
        topics = self._topics_in_scope(admin)
        self._copy_before_consuming(topics)
        once = None
        if self.options.once:
            ends_of = [*topics, self.tx_topic] if self.options.transactional else topics
            ends = end_offsets(self.settings, self.options.group, ends_of)
            once = EndOffsets(ends, self.kafka.expected, self.target.all_offsets)
        self._subscribe()
        if self.options.transactional:
            try:
                self.transaction_loop().run(self.stop, once)
            finally:
                self.kafka.close()
                self.target.close()
            return
        commit = BatchCommit(self.target, self.kafka, self.kafka.consumer, self.dead_letters, self.kafka.expected)
        processor = BatchProcessor(
            self.target,
            self.preparer,
            commit,
            policy,
            self.topic_tables,
            self.stats,
            self._reconnect,
            schema=self.target.history,
            refresh_schema=self.target.refresh_schema,
        )
        overlapped = OverlappedBatches(processor)
        self.kafka.before_rebalance = lambda: self._settle(overlapped)
        try:
            self.loop(overlapped, once)
        finally:
            overlapped.close()
            self.kafka.close()
            if self.dead_letters is not None:
                self.dead_letters.flush()
            self.target.close()

    def transaction_loop(self) -> TransactionLoop:
        subscription = subscription_for(self.settings.topic_prefix, self.settings.selection)
        gate = TransactionGate(
            (self.tx_topic, 0), consumed(subscription), self.options.batch_size, self.options.batch_bytes
        )
        expected = self.kafka.expected
        gate.assigned = lambda topic: [p for t, p in expected if t == topic]
        return TransactionLoop(
            self.target,
            self.preparer,
            self.kafka,
            self.topic_tables,
            self.stats,
            gate,
            self._reconnect,
            self._watch,
            self.options.batch_size,
            self.options.batch_bytes,
            self.options.batch_wait,
            schema=self.target.history,
            refresh_schema=self.target.refresh_schema,
        )

    def _wait_for_transaction_topic(self, admin: Any) -> None:
        """--consistency transaction: the change topics come with the transaction topic. Refused
        when change topics exist without it for --kafka-timeout (a source without
        --transaction-metadata); without either, the source has not created its topics yet."""
        while not self.stop:
            existing = admin.list_topics(timeout=10).topics
            if self.tx_topic in existing or not self._topics_in_scope(admin):
                return
            if self.tx_topic_watch.missing(time.monotonic()):
                raise SinkError(self.tx_topic_watch.refusal())
            self.stop.wait(1.0)

    def _topics_in_scope(self, admin: Any) -> list[str]:
        """Change topics that exist now and belong to the configured tables (all, by default)."""
        existing = admin.list_topics(timeout=10).topics
        return in_subscription(subscription_for(self.settings.topic_prefix, self.settings.selection), existing)

    def _copy_before_consuming(self, topics: list[str]) -> None:
        """Bulk copies before consuming, so that a long copy cannot stall the group: the tables named
        in --tables (whether or not the source created their topics yet), and those with a topic."""
        named = list(self.settings.selection.names)
        wanted = named + [t for t in map(self.topic_tables.table_of, topics) if t not in named]
        if self.options.snapshot == "copy":
            for table in wanted:
                if table not in self.options.rebuild:
                    self.preparer.prepare(table, None)

    def _claim(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int | None]:
        """At an assignment: never apply a table `cdc-sink rebuild` is replaying (but our own)."""
        check_not_rebuilding(
            self.target.conn, self.settings.topic_prefix, {t for t, _ in partitions}, self.options.rebuild
        )
        if self.options.transactional:
            subscription = [*subscription_for(self.settings.topic_prefix, self.settings.selection), self.tx_topic]
            check_assignment(
                self.admin,
                self.kafka.consumer,
                self.options.group,
                partitions,
                lambda topics: in_subscription(subscription, topics),
                self.options.instance_id,
                self.tx_topic,
            )
        return self.target.claim(partitions)

    def _subscribe(self) -> None:
        subscription = subscription_for(self.settings.topic_prefix, self.settings.selection)
        if self.options.transactional:
            subscription.append(self.tx_topic)
        self.kafka.subscribe(subscription)
        log.info(
            "consuming %s as group %s",
            ", ".join(subscription),
            self.options.group,
            extra={"group": self.options.group},
        )

    # --- the loop -----------------------------------------------------------------------------

    def loop(self, batches: OverlappedBatches, once: EndOffsets | None) -> None:
        """Consume and apply batches until stopped (or caught up, with --once)."""
        while not self.stop:
            if once is not None and self._caught_up(batches, once):
                log.info("caught up with the end offsets seen at start-up; exiting (--once)")
                return
            messages = self.kafka.consume(self.batch_count, self.options.batch_wait)
            self._watch()
            if not messages:
                if not batches.settle(self.stop):
                    return
                continue
            self.batch_count = batch_count(messages, self.options.batch_size, self.options.batch_bytes)
            batch = self.kafka.usable(messages)
            if batch and not batches.run(batch, self.stop):
                return

    def _caught_up(self, batches: OverlappedBatches, once: EndOffsets) -> bool:
        """--once: whether every partition reached its end, the batch being committed included
        (once it has committed; the target is read only when nothing is being committed)."""
        if batches.in_flight is not None and not once.reached_here(batches.pending()):
            return False
        return batches.settle(self.stop) and once.reached()

    def _settle(self, batches: OverlappedBatches) -> None:
        """Before a rebalance: the batch being committed ends (or is applied again) first."""
        batches.settle(self.stop)

    def _watch(self) -> None:
        """Every few seconds: consumer lag per partition, and whether Kafka is back."""
        now = time.monotonic()
        if now >= self.next_lag_check:
            self.next_lag_check = now + 2.0
            self.stats.lag = self.kafka.lag()
            if self.options.transactional and (self.tx_topic, 0) not in self.kafka.expected:
                self._check_transaction_topic(now)

    def _check_transaction_topic(self, now: float) -> None:
        """Change topics created by a source that publishes no transaction records: refused once
        they have stood without the transaction topic for --kafka-timeout."""
        try:
            existing = self.admin.list_topics(timeout=5).topics
        except Exception:  # Kafka unreachable: the consumer says so
            return
        if self.tx_topic in existing or not self._topics_in_scope(self.admin):
            self.tx_topic_watch.since = None
        elif self.tx_topic_watch.missing(now):
            raise SinkError(self.tx_topic_watch.refusal())

    def _reconnect(self, exc: BaseException, delay: float) -> None:
        self.stats.errors["target_connection"] += 1
        if self.stats.target_down_since is None:
            self.stats.target_down_since = time.monotonic()
        self.target.reconnect(exc, delay, self.stop.wait)
