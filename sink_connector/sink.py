"""cdc-sink: consume change topics in batches and apply them to the target, exactly once in effect.

Each batch is one target transaction that also moves the stored offsets of its partitions, after
checking they are still the ones this process started the batch from (a process that lost its
partitions while frozen cannot write behind its successor's back). Offsets are committed to Kafka
afterwards, for the tools that show a group's lag.
"""

import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import psycopg2
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from cdc_common.errors import CdcError, SinkError
from cdc_common.kafka import admin_client, wait_for_kafka
from cdc_common.pg import connect_target, error_reason, is_connection_loss, sqlstate
from cdc_common.retry import Backoff
from cdc_common.service import LATENCY_BUCKETS, SIZE_BUCKETS, FastHistogram, OpsServer
from cdc_common.settings import Settings
from cdc_common.signals import StopFlag
from cdc_common.tables import TableName
from schemas.topics import change_topic_pattern, table_for, topic_for
from sink_connector.apply import apply_table
from sink_connector.bookkeeping import Bookkeeping
from sink_connector.bookkeeping import TopicPartition as TP
from sink_connector.changes import BadMessage, Change, TableBatch, decode
from sink_connector.dlq import DeadLetters
from sink_connector.metrics import collect
from sink_connector.preparation import TablePreparer
from sink_connector.target import reconcile

log = logging.getLogger("sink")

# The consumer group's session timeout: a member silent for longer has lost its partitions.
SESSION_TIMEOUT_MS = 10_000

# Errors worth retrying the same batch for; other errors raised by a statement mean the data is bad.
RETRY_SQLSTATES = {"40001", "40P01", "55P03", "57014", "53100", "53200", "53300"}


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


Progress = tuple[TableName, int | None, int | None, int]  # table, newest commit µs, newest commit LSN, changes


def merge_progress(earlier: list[Progress], later: list[Progress]) -> list[Progress]:
    """Progress figures not written yet, combined with a new batch's: newest times, summed counts."""

    def newest(a: int | None, b: int | None) -> int | None:
        return a if b is None else b if a is None else max(a, b)

    merged: dict[TableName, Progress] = {}
    for item in [*earlier, *later]:
        table = item[0]
        old = merged.get(table)
        merged[table] = (
            item if old is None else (table, newest(old[1], item[1]), newest(old[2], item[2]), old[3] + item[3])
        )
    return list(merged.values())


def batch_count(messages: list[Any], most: int, budget: int) -> int:
    """How many messages to ask for next: `most`, or fewer when messages like these (sampled)
    would make a batch of more than `budget` bytes (memory grows with the bytes, not the count)."""
    sample = messages[:: max(1, len(messages) // 64)]
    size = sum(len(m.value() or b"") + len(m.key() or b"") for m in sample) / len(sample)
    return max(1, min(most, int(budget // max(size, 1.0))))


class Fenced(Exception):
    """Another member moved these partitions' offsets: the batch is dropped and read again."""

    def __init__(self, stored: dict[TP, int | None]) -> None:
        super().__init__("fenced")
        self.stored = stored


def classify(exc: BaseException) -> str:
    """'connection', 'retry' or 'data' for an error raised while applying a batch."""
    if is_connection_loss(exc):
        return "connection"
    code = sqlstate(exc) or ""
    if code in RETRY_SQLSTATES:
        return "retry"
    return "data"


class Sink:
    def __init__(self, settings: Settings, options: SinkOptions, stop: StopFlag) -> None:
        self.settings = settings
        self.options = options
        self.stop = stop
        self.book = Bookkeeping(options.state_schema, options.group)
        self.preparer = TablePreparer(settings, self.book, options.snapshot, options.rebuild, options.slot, stop)
        self.tables = self.preparer.tables
        self.topic_tables: dict[str, TableName] = {}
        self.expected: dict[TP, int | None] = {}
        self.parked: set[tuple[str, bytes]] = set()
        self.applied: Counter[tuple[str, str]] = Counter()
        self.skipped = 0
        self.batches = 0
        # Messages asked for at once (see batch_count); the first batch is small, until the size of
        # the messages is known.
        self.batch_count = min(options.batch_size, 500)
        self.unsaved_progress: list[Progress] = []
        self.conn: Any = None
        self.consumer: Any = None
        self.admin: Any = None
        self.dead_letters: DeadLetters | None = None
        self.end_offsets: dict[TP, int] = {}
        self.last_applied_ts_us: int | None = None
        self.latency = FastHistogram(LATENCY_BUCKETS)
        self.batch_sizes = FastHistogram(SIZE_BUCKETS)
        self.apply_seconds = FastHistogram(LATENCY_BUCKETS)
        self.errors: Counter[str] = Counter()
        self.lag: dict[TP, int] = {}
        self.next_lag_check = 0.0
        self.next_offsets_check = 0.0
        self.target_down_since: float | None = None
        self.kafka_down_since: float | None = None
        self.fenced = 0

    # --- connections ------------------------------------------------------------------------

    def _connect(self) -> None:
        self.conn = connect_target(
            self.settings.target_dsn,
            application_name="cdc-sink",
            autocommit=False,
            # Safe for exactly-once: a batch's rows and its offsets commit together, so a target crash
            # that loses the last commits loses both, and the sink re-applies them from the older
            # offsets. (PostgreSQL's own subscriptions commit the same way by default.)
            options="-c synchronous_commit=off",
        )

    def _reconnect(self, exc: BaseException, backoff: Backoff) -> None:
        self.errors["target_connection"] += 1
        if self.target_down_since is None:
            self.target_down_since = time.monotonic()
        delay = backoff.next_delay(time.monotonic()) or 1.0
        log.warning("target connection lost (%s); reconnecting in %.1f s", error_reason(exc), delay)
        self.stop.wait(delay)
        with contextlib.suppress(psycopg2.Error):
            self.conn.close()
        try:
            self._connect()
        except CdcError as again:
            log.warning("%s", again)

    # --- scope ------------------------------------------------------------------------------

    def _table_of(self, topic: str) -> TableName:
        table = self.topic_tables.get(topic)
        if table is None:
            table = table_for(self.settings.topic_prefix, topic)
            if table is None:
                raise BadMessage(f"topic {topic} is not a change topic of prefix {self.settings.topic_prefix}")
            self.topic_tables[topic] = table
        return table

    def _topics_in_scope(self) -> list[str]:
        """Change topics that exist now and belong to the configured tables (all, by default)."""
        existing = self.admin.list_topics(timeout=10).topics
        if self.settings.tables:
            wanted = [topic_for(self.settings.topic_prefix, t) for t in self.settings.tables]
            return [t for t in wanted if t in existing]
        return sorted(t for t in existing if table_for(self.settings.topic_prefix, t) is not None)

    # --- consumer ------------------------------------------------------------------------------

    def _consumer_config(self) -> dict[str, Any]:
        def on_error(err: Any) -> None:
            self.errors["kafka_" + err.name().lstrip("_").lower()] += 1
            if (
                err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT)
                and self.kafka_down_since is None
            ):
                self.kafka_down_since = time.monotonic()
            log.warning("Kafka: %s", err.str())

        static = {"group.instance.id": self.options.instance_id} if self.options.instance_id else {}
        return self.settings.kafka_config(
            **static,
            **{
                "group.id": self.options.group,
                "client.id": "cdc-sink",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "partition.assignment.strategy": "roundrobin",
                "session.timeout.ms": SESSION_TIMEOUT_MS,
                "heartbeat.interval.ms": 2_000,
                "max.poll.interval.ms": 900_000,
                "topic.metadata.refresh.interval.ms": 5_000,
                "queued.max.messages.kbytes": 16_384,
                "fetch.max.bytes": 16_777_216,
                "max.partition.fetch.bytes": 4_194_304,
                "error_cb": on_error,
            },
        )

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        stored = self.book.claim(self.conn, [(p.topic, p.partition) for p in partitions])
        for p in partitions:
            offset = stored.get((p.topic, p.partition))
            p.offset = OFFSET_BEGINNING if offset is None else offset
            self.expected[(p.topic, p.partition)] = offset
        consumer.assign(partitions)
        if partitions:
            log.info(
                "assigned %s",
                ", ".join(f"{p.topic}[{p.partition}]@{'start' if p.offset < 0 else p.offset}" for p in partitions),
            )

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        for p in partitions:
            self.expected.pop((p.topic, p.partition), None)
        consumer.unassign()
        if partitions:
            log.info("revoked %s", ", ".join(f"{p.topic}[{p.partition}]" for p in partitions))

    # --- the loop --------------------------------------------------------------------------------

    def run(self) -> None:
        server = (
            OpsServer(self.options.metrics_port, lambda: collect(self), self.health).start()
            if self.options.metrics_port
            else None
        )
        try:
            self._run()
        finally:
            if server is not None:
                server.stop()

    def _run(self) -> None:
        self._connect()
        self.book.install(self.conn)
        self.admin = admin_client(self.settings)
        wait_for_kafka(self.settings, self.options.kafka_timeout, self.stop)
        self.parked = self.book.parked(self.conn)
        if self.options.on_error == "dlq":
            self.dead_letters = DeadLetters(self.settings, self.admin)
        topics = self._topics_in_scope()
        # Bulk copies before consuming, so that a long copy cannot stall the group: the tables named
        # in --tables (whether or not the source created their topics yet), else those with a topic.
        wanted = list(self.settings.tables) or [self._table_of(t) for t in topics]
        if self.options.snapshot == "copy":
            for table in wanted:
                if table not in self.options.rebuild:
                    self.preparer.prepare(self.conn, table, None)
        if self.options.once:
            self.end_offsets = self._end_offsets(topics)
        self.consumer = Consumer(self._consumer_config())
        if self.settings.tables:
            subscription = [topic_for(self.settings.topic_prefix, t) for t in self.settings.tables]
        else:
            subscription = [change_topic_pattern(self.settings.topic_prefix)]
        self.consumer.subscribe(subscription, on_assign=self._on_assign, on_revoke=self._on_revoke)
        log.info(
            "consuming %s as group %s",
            ", ".join(subscription),
            self.options.group,
            extra={"group": self.options.group},
        )
        try:
            self._loop()
        finally:
            self.consumer.close()
            if self.dead_letters is not None:
                self.dead_letters.flush()
            self.conn.close()

    def _end_offsets(self, topics: list[str]) -> dict[TP, int]:
        """--once: the end of every partition when the sink started."""
        probe = Consumer(self.settings.kafka_config(**{"group.id": self.options.group + "-once-probe"}))
        try:
            ends: dict[TP, int] = {}
            metadata = probe.list_topics(timeout=10)
            for topic in topics:
                for p in metadata.topics[topic].partitions:
                    _, high = probe.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                    ends[(topic, p)] = high
            return ends
        finally:
            probe.close()

    def _caught_up(self) -> bool:
        """--once: every partition's applied offset reached its end at start-up. Our own partitions
        are known here; others' (another member's) are read from the target now and then."""
        pending = [tp for tp, high in self.end_offsets.items() if high and (self.expected.get(tp) or 0) < high]
        if not pending:
            return True
        if all(tp in self.expected for tp in pending) or time.monotonic() < self.next_offsets_check:
            return False
        self.next_offsets_check = time.monotonic() + 1.0
        stored = self.book.all_offsets(self.conn)
        return all((stored.get(tp) or 0) >= self.end_offsets[tp] for tp in pending)

    def _loop(self) -> None:
        backoff = Backoff(base=0.5, cap=15.0)
        while not self.stop:
            if self.options.once and self._caught_up():
                log.info("caught up with the end offsets seen at start-up; exiting (--once)")
                return
            messages = self.consumer.consume(self.batch_count, self.options.batch_wait)
            self._watch()
            if not messages:
                continue
            self.batch_count = batch_count(messages, self.options.batch_size, self.options.batch_bytes)
            self.kafka_down_since = None
            batch = [m for m in messages if m.error() is None]
            if len(batch) != len(messages):
                for m in messages:
                    if m.error() is not None:
                        self._usable(m)
            if not batch:
                continue
            while True:
                try:
                    self._process(batch)
                    backoff.reset()
                    break
                except Fenced as fenced:
                    self._resync(fenced.stored, batch)
                    break
                except psycopg2.Error as exc:
                    if not self.conn.closed:
                        self.conn.rollback()
                    kind = classify(exc)
                    if kind == "data":
                        raise SinkError(f"applying a batch failed: {error_reason(exc)}") from None
                    if kind == "connection":
                        self._reconnect(exc, backoff)
                    else:
                        self.stop.wait(backoff.next_delay(time.monotonic()) or 1.0)
                    if self.stop:
                        return

    def _watch(self) -> None:
        """Every few seconds: consumer lag per partition, and whether Kafka is back."""
        now = time.monotonic()
        if now < self.next_lag_check:
            return
        self.next_lag_check = now + 2.0
        lag = {}
        for tp, position in list(self.expected.items()):
            try:
                low, high = self.consumer.get_watermark_offsets(TopicPartition(tp[0], tp[1]), cached=True)
            except Exception:
                continue
            if high >= 0:
                lag[tp] = max(0, high - (low if position is None else position))
        self.lag = lag
        if self.kafka_down_since is not None:
            try:
                self.consumer.list_topics(timeout=2)
                self.kafka_down_since = None
            except Exception:
                pass

    def health(self) -> tuple[bool, str]:
        now = time.monotonic()
        if self.target_down_since is not None and now - self.target_down_since > 30:
            return False, f"target database unreachable for {now - self.target_down_since:.0f} s"
        if self.kafka_down_since is not None and now - self.kafka_down_since > 30:
            return False, f"Kafka unreachable for {now - self.kafka_down_since:.0f} s"
        return True, f"ok: {self.batches} batches applied"

    def _usable(self, message: Any) -> bool:
        err = message.error()
        if err is None:
            return True
        if err.code() == KafkaError._PARTITION_EOF:
            return False
        if err.code() == KafkaError._FATAL or err.fatal():
            if self.options.instance_id and "group.instance.id" in err.str():
                raise SinkError(
                    f"another cdc-sink joined group {self.options.group} with --instance-id "
                    f"{self.options.instance_id}, so Kafka stopped this one: give each sink its own id"
                )
            raise SinkError(f"Kafka stopped this consumer: {err.str()}")
        if err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            log.info("waiting for topic %s to exist", message.topic())
            return False
        log.warning("Kafka: %s", err.str())
        return False

    def _resync(self, stored: dict[TP, int | None], batch: list[Any]) -> None:
        """After a fencing conflict: continue every partition of the batch from what is stored."""
        self.fenced += 1
        log.warning(
            "another sink moved the offsets of %s: re-reading from the stored offsets",
            ", ".join(f"{t}[{p}]" for t, p in stored),
        )
        for tp in {(m.topic(), m.partition()) for m in batch}:
            if tp not in self.expected:
                continue
            offset = stored.get(tp, self.expected[tp])
            self.expected[tp] = offset
            self.consumer.seek(TopicPartition(tp[0], tp[1], OFFSET_BEGINNING if offset is None else offset))

    # --- one batch ----------------------------------------------------------------------------------

    def _decode(self, messages: list[Any]) -> tuple[list[Change], list[tuple[Any, str]]]:
        """Changes to apply, and messages to dead-letter (undecodable, or parked behind one)."""
        changes: list[Change] = []
        rejected: list[tuple[Any, str]] = []
        for m in messages:
            topic, key = m.topic(), m.key()
            if self.parked and (topic, key) in self.parked:
                rejected.append((m, "parked: an earlier change of this key is in the dead-letter topic"))
                continue
            try:
                self._table_of(topic)
                value = m.value()
                changes.append(
                    decode(
                        topic, m.partition(), m.offset(), key, value, None if value is not None else m.headers()
                    )
                )
            except BadMessage as exc:
                if self.options.on_error != "dlq":
                    self._commit_prefix(messages, m, changes)
                    raise SinkError(
                        f"cannot decode message {topic}[{m.partition()}] at offset {m.offset()}: {exc}; "
                        "nothing past it was applied (inspect it, or run with --on-error dlq)"
                    ) from None
                rejected.append((m, f"undecodable: {exc}"))
                if key is not None:
                    self.parked.add((topic, key))
        return changes, rejected

    def _commit_prefix(self, messages: list[Any], bad: Any, decoded: list[Change]) -> None:
        """--on-error fail: apply and commit what came before the bad message, then stop."""
        before = [
            c
            for c in decoded
            if (c.topic, c.partition) != (bad.topic(), bad.partition()) or c.offset < bad.offset()
        ]
        if before:
            self._apply(before, [], {})

    def _save_progress(self, cur: Any, progress: list[Progress]) -> bool:
        """The per-table progress rows are shared by the group's members: never wait for one that
        another member's open transaction holds (a frozen member would stall this one too); keep
        the figures for the next batch instead."""
        cur.execute("SAVEPOINT progress; SET LOCAL lock_timeout = '100ms'")
        try:
            self.book.progress(cur, progress)
        except psycopg2.errors.LockNotAvailable:
            cur.execute("ROLLBACK TO SAVEPOINT progress")  # also undoes the lock_timeout
            return False
        cur.execute("RELEASE SAVEPOINT progress; SET LOCAL lock_timeout = DEFAULT")
        return True

    def _process(self, messages: list[Any]) -> None:
        changes, rejected = self._decode(messages)
        positions: dict[TP, int] = {}
        for m in messages:
            positions[(m.topic(), m.partition())] = m.offset() + 1
        while True:
            try:
                self._apply(changes, rejected, positions)
                return
            except psycopg2.Error as exc:
                if classify(exc) != "data":
                    raise
                self.conn.rollback()
                index, reason = self._find_poison(changes)
                poison = changes[index]
                where = f"{poison.topic}[{poison.partition}] at offset {poison.offset}"
                if self.options.on_error != "dlq":
                    self._apply(changes[:index], [], {})
                    raise SinkError(
                        f"the target rejected message {where}: {reason}; nothing past it was applied "
                        "(fix the target or the data, or run with --on-error dlq)"
                    ) from None
                by_position = {(m.topic(), m.partition(), m.offset()): m for m in messages}
                rejected.append(
                    (
                        by_position[(poison.topic, poison.partition, poison.offset)],
                        f"rejected by the target: {reason}",
                    )
                )
                self.parked.add((poison.topic, poison.key))
                kept = []
                for c in changes:
                    if c is poison:
                        continue
                    if (c.topic, c.key) == (poison.topic, poison.key) and c.offset > poison.offset:
                        later = by_position[(c.topic, c.partition, c.offset)]
                        rejected.append((later, f"parked: behind offset {poison.offset} of this key"))
                        continue
                    kept.append(c)
                changes = kept

    def _find_poison(self, changes: list[Change]) -> tuple[int, str]:
        """Apply the changes one at a time (in a transaction that is rolled back) to find the first
        one the target rejects."""
        try:
            with self.conn.cursor() as cur:
                for index, change in enumerate(changes):
                    cur.execute("SAVEPOINT cdc_probe")
                    try:
                        self._apply_changes(cur, [change])
                    except psycopg2.Error as exc:
                        if classify(exc) != "data":
                            raise
                        return index, error_reason(exc)
                    cur.execute("RELEASE SAVEPOINT cdc_probe")
        finally:
            self.conn.rollback()
        raise SinkError("a batch failed but no single change of it does; giving up on it")

    def _apply_changes(self, cur: Any, changes: list[Change]) -> list[TableBatch]:
        """Group, filter and apply changes within the caller's transaction."""
        batches: dict[TableName, TableBatch] = {}
        for change in changes:
            table = self.topic_tables[change.topic]
            state = self.tables.get(table)
            if (
                state is not None
                and state.snapshot is not None
                and state.snapshot.contains(change.op, change.xid, change.lsn, change.commit_lsn)
            ):
                self.skipped += 1
                continue
            if change.op == "r" and state is not None and state.mode == "never":
                self.skipped += 1
                continue
            batch = batches.get(table)
            if batch is None:
                batch = batches[table] = TableBatch(table)
            batch.add(change)
        for table, batch in batches.items():
            state = self.tables.get(table)
            if state is None:
                continue
            if batch.columns:
                state.target = reconcile(self.conn, state.target, batch.columns)
            apply_table(cur, state.target, batch)
        return list(batches.values())

    def _apply(self, changes: list[Change], rejected: list[tuple[Any, str]], positions: dict[TP, int]) -> None:
        """One transaction: fence, apply, move offsets and progress; then commit to Kafka too."""
        for table in {self.topic_tables[c.topic] for c in changes}:
            if table not in self.tables:
                pending = TableBatch(table)
                for c in changes:
                    if self.topic_tables[c.topic] == table and c.columns:
                        pending.add(c)
                        break
                self.preparer.prepare(self.conn, table, pending)
        if rejected and self.dead_letters is not None:
            for m, reason in rejected:
                self.dead_letters.send(
                    m.topic(), m.partition(), m.offset(), m.key(), m.value(), reason, m.headers()
                )
            self.dead_letters.flush()
        if not positions:
            positions = {}
            for c in changes:
                tp = (c.topic, c.partition)
                positions[tp] = max(positions.get(tp, 0), c.offset + 1)
        started = time.monotonic()
        with self.conn.cursor() as cur:
            # A member frozen (SIGSTOP, a paused VM) inside this transaction holds its partitions'
            # offsets rows, which the member taking the partitions over needs: the server ends the
            # transaction once the member has been silent as long as the group waits for it.
            cur.execute("SET LOCAL idle_in_transaction_session_timeout = %s", (SESSION_TIMEOUT_MS,))
            stored = self.book.lock(cur, list(positions))
            if any(stored.get(tp) != self.expected.get(tp, -1) for tp in positions):
                self.conn.rollback()
                raise Fenced(stored)
            batches = self._apply_changes(cur, changes)
            for m, reason in rejected:
                if m.key() is not None:
                    self.book.park(cur, m.topic(), m.key(), m.offset(), reason)
            self.book.store(cur, positions)
            progress = merge_progress(
                self.unsaved_progress, [(b.table, b.max_ts_us, b.max_commit_lsn, b.changes) for b in batches]
            )
            saved = bool(progress) and self._save_progress(cur, progress)
        self.conn.commit()
        self.unsaved_progress = [] if saved else progress
        committed_us = time.time() * 1e6
        self.target_down_since = None
        self.expected.update(positions)
        self.batches += 1
        self.apply_seconds.observe(time.monotonic() - started)
        self.batch_sizes.observe(len(changes))
        # one observation per change, computed once per source transaction (they share a commit time)
        last_ts, same = None, 0
        for c in changes:
            if c.ts_us != last_ts:
                if last_ts is not None and same:
                    self.latency.observe((committed_us - last_ts) / 1e6, same)
                last_ts, same = c.ts_us, 0
            same += 1
        if last_ts is not None and same:
            self.latency.observe((committed_us - last_ts) / 1e6, same)
        for b in batches:
            name = str(b.table)
            for op, n in b.ops.items():
                self.applied[(name, op)] += n
            if b.max_ts_us is not None:
                self.last_applied_ts_us = max(self.last_applied_ts_us or 0, b.max_ts_us)
        try:
            self.consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in positions.items()], asynchronous=True
            )
        except Exception as exc:  # the target holds the truth; Kafka's copy is for tools
            log.debug("Kafka offset commit failed: %s", exc)
