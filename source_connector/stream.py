"""The replication stream: wal2json messages in, Kafka messages out, the slot confirmed only past
what Kafka acknowledged.

Reading pauses while the producer's queue is full (backpressure: the walsender then waits on the
socket), the connection is re-established with backoff when it drops, and SIGTERM stops reading,
waits for Kafka to acknowledge what was sent, confirms that position and returns.

With transaction metadata (`records`, see transactions.py), each transaction that has messages in
the change topics also gets a BEGIN record, published just before its first message, and an END
record, published at its `C` with its messages per topic; both go through the publisher like the
changes (the slot is confirmed only past acknowledged records), and after a restart neither is
published again when the transaction topic holds it already.
"""

import contextlib
import logging
import select
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg2
from confluent_kafka import KafkaException

from pg_kafka_cdc.common.errors import ConnectError, SourceError
from pg_kafka_cdc.common.kafka import kafka_reason
from pg_kafka_cdc.common.lsn import int_to_lsn, lsn_to_int
from pg_kafka_cdc.common.pg import connect_source
from pg_kafka_cdc.common.settings import Settings
from pg_kafka_cdc.common.signals import StopFlag
from schemas.signals import SNAPSHOT_PREFIX
from source_connector.confirm import Confirmer
from source_connector.events import EventBuilder, Message, TxContext, begin_context
from source_connector.flush import Transaction
from source_connector.heartbeat import HEARTBEAT_PREFIX, Heartbeat
from source_connector.incremental import Incremental
from source_connector.ports import ReplicationCursor, ReplicationMessage
from source_connector.publisher import Publisher, raise_delivery_failure
from source_connector.reconnect import Reconnect
from source_connector.replay import Replay
from source_connector.transactions import TRANSACTION_PARTITION, TransactionRecords
from source_connector.wal2json import (
    NUMBERS_AS_STRING_OPTION,
    WAL2JSON_OPTIONS,
    Decoder,
)

log = logging.getLogger("source.stream")

CHANGE_KINDS = frozenset({b"I", b"U", b"D", b"T"})  # a row change, or a TRUNCATE
HOUSEKEEPING_EVERY = 512  # messages between producer polls and feedback checks
CONFIRM_INTERVAL = 0.5  # seconds between attempts to confirm a new position
# ... once the stream has run dry with transactions read and not yet confirmed: the slot then
# catches up with what Kafka holds within tens of milliseconds, not half a second or two.
SETTLE_CONFIRM_INTERVAL = 0.05
PERIODIC_INTERVAL = 30.0


@dataclass
class Stream:
    settings: Settings
    slot: str
    add_tables: list[str]  # wal2json's add-tables entries
    builder: EventBuilder
    publisher: Publisher
    confirmer: Confirmer
    stop: StopFlag
    heartbeat: Heartbeat | None = None
    # What the topics hold already, read again before each start of streaming (see replay.py).
    held: Callable[[], Replay] | None = None
    # Called at the commit of a transaction without row changes (DDL, such as ATTACH PARTITION).
    empty_commit: Callable[[], None] | None = None
    # Snapshots taken while streaming (tables added to the scope, `cdc-source snapshot`).
    incremental: Incremental | None = None
    # Transaction metadata (--transaction-metadata): BEGIN and END records around each transaction.
    records: TransactionRecords | None = None
    # What the topics hold of each transaction committed at or after a position (see held.py).
    held_transactions: Callable[[int], Mapping[int, Mapping[str, int]]] | None = None

    def __post_init__(self) -> None:
        self.producer = self.publisher.producer
        self.reconnect = Reconnect(self.slot, self.stop)
        self.decoder = Decoder()
        self.numbers_as_strings: bool | None = None  # probed on the first start
        self.heartbeats_seen = self.transactions = self.messages = 0
        self.next_confirm = self.next_periodic = self.last_confirm = 0.0
        self.wal_end = 0  # the server's WAL end, as last reported
        self.last_commit_us: int | None = None  # source commit time of the newest transaction read
        self.periodic: Callable[[], None] | None = None  # called every PERIODIC_INTERVAL (slot checks)
        self.cur: ReplicationCursor | None = None
        self.last: ReplicationMessage | None = None  # the newest message read
        self.replay: Replay | None = None
        self.duplicates_skipped = 0  # messages read again that the topics held already
        self.publisher.while_full = self._while_full

    @property
    def confirmed_lsn(self) -> int:
        return self.confirmer.gate.sent

    @property
    def received_lsn(self) -> int:
        return self.confirmer.received_lsn

    # --- connection -----------------------------------------------------------------------------

    def _open(self, conn: Any | None) -> tuple[Any, Any]:
        """A replication connection streaming from the confirmed position."""
        start_lsn = self.confirmer.tracker.flushed_lsn
        self._read_held(start_lsn)
        for attempt in (True, False):
            if attempt and self.numbers_as_strings is False:
                continue
            if conn is None:
                conn = connect_source(self.settings.source_dsn, application_name="cdc-source", replication=True)
            cur = conn.cursor()
            try:
                cur.start_replication_expert(
                    start_replication_command(self.slot, start_lsn, wal2json_options(self.add_tables, attempt)),
                    decode=False,
                    status_interval=3600,
                )
            except psycopg2.Error as exc:
                conn.close()
                conn = None
                if attempt and NUMBERS_AS_STRING_OPTION in str(exc):
                    continue
                raise
            self._streaming(attempt, start_lsn)
            return conn, cur
        raise AssertionError("unreachable")

    def _streaming(self, numbers_as_strings: bool, start_lsn: int) -> None:
        if self.numbers_as_strings is None:
            self.numbers_as_strings = numbers_as_strings
            if numbers_as_strings:
                log.info("wal2json sends every number as a string (numeric-data-types-as-string)")
            else:
                log.info(
                    "wal2json here is older than 2.6 (no numeric-data-types-as-string): NaN and Infinity "
                    "in numeric, real and double precision columns arrive as null"
                )
        self.decoder = Decoder(numbers_as_strings=numbers_as_strings)
        self.builder.wal2json_numbers(numbers_as_strings)
        log.info("streaming from slot %s at %s", self.slot, int_to_lsn(start_lsn), extra={"slot": self.slot})

    def run(self, conn: Any | None = None) -> None:
        """Stream until stopped; reconnects by itself when the source goes away."""
        while not self.stop:
            try:
                conn, cur = self._open(conn)
                self.reconnect.up()
                self.cur = cur
                self._loop(cur)
                self._shutdown(cur)
                conn.close()
                return
            except psycopg2.Error as exc:
                self._disconnected(conn)
                conn = None
                failure = self.reconnect.failed(exc)
                self._settle()
                self.reconnect.wait(failure)
            except ConnectError as exc:
                # From connecting the stream, or from the connector's own connection inside the
                # loop (a table lookup reconnecting while the server is down), possibly in the
                # middle of a transaction: the cut transaction is forgotten as for a lost
                # connection, or it would stay open and hold the confirmed position back for good.
                self._disconnected(conn)
                conn = None
                self._settle()
                self.reconnect.wait_to_connect(exc)

    def _disconnected(self, conn: Any | None) -> None:
        """The stream is down: close the replication connection now, as a half-dead connection left
        to the garbage collector keeps the server's walsender (so the slot, and a shutdown of the
        server) busy until wal_sender_timeout."""
        self.cur = None
        self.reconnect.down()
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    # --- the loop -------------------------------------------------------------------------------

    def _loop(self, cur: ReplicationCursor) -> None:
        read = cur.read_message
        decode = self.decoder.decode
        row = self.builder.row
        row_payload = self.builder.row_payload
        records = self.records
        publish = self.publisher.publish
        if records is not None:  # each change message is counted, and follows its transaction's BEGIN
            records.send, publish = publish, records.publish
        confirmer = self.confirmer
        stop = self.stop
        tx: Transaction | None = None
        ctx: TxContext | None = None
        replay, count = self.replay, 0
        changed = False
        incremental = self.incremental
        while not stop:
            msg = read()
            if msg is None:
                self._housekeeping(cur, idle=True)
                if tx is None:
                    select.select([cur], [], [], SETTLE_CONFIRM_INTERVAL if confirmer.settling() else 0.2)
                continue
            self.last = msg
            payload = msg.payload
            kind = payload[11:12]
            if kind in CHANGE_KINDS:
                if tx is None or ctx is None:
                    raise outside_transaction(payload)
                changed = True
                found = row_payload(payload, ctx) if kind != b"T" else None
                if found is not None:
                    messages = found
                else:
                    doc = decode(payload)
                    messages = row(doc, ctx) if kind != b"T" else self.builder.truncate(doc, ctx)
                if incremental is not None and (incremental.window is not None or incremental.chunk is not None):
                    messages_seen(incremental, messages, kind == b"T")
                for message in messages:
                    if replay is None or replay.keep(message):
                        publish(tx, message)
                if replay is not None and replay.done:
                    replay = self._replayed(replay)
            elif kind == b"B":
                confirmer.begin_seen(msg.data_start)
                doc = decode(payload)
                ctx = begin_context(doc)
                tx = confirmer.tracker.begin(doc["xid"], lsn_to_int(doc["nextlsn"]))
                if records is not None:
                    records.start(tx, ctx)
            elif kind == b"C":
                if tx is None or ctx is None:
                    raise outside_transaction(payload)
                if records is not None:
                    if records.begun and confirmer.tracker.failures:  # lost, a message would be miscounted
                        raise_delivery_failure(confirmer.tracker)
                    records.end(tx)
                self._committed(tx, ctx, changed)
                tx, changed = None, False
            elif kind == b"M":
                doc = orjson.loads(payload)
                if doc.get("prefix") == SNAPSHOT_PREFIX and incremental is not None:
                    incremental.message(doc, msg.data_start)
                else:
                    confirmer.tracker.point(msg.data_start)
                    self.heartbeats_seen += 1
            count += 1
            if count >= HOUSEKEEPING_EVERY:
                self.messages += count
                count = 0
                self._housekeeping(cur, idle=False)
        self.messages += count

    def _committed(self, tx: Transaction, ctx: TxContext, changed: bool) -> None:
        self.confirmer.tracker.commit(tx)
        if not changed and self.empty_commit is not None:
            self.empty_commit()  # a DDL such as ATTACH PARTITION may have changed what is in scope
        self.transactions += 1
        self.last_commit_us = ctx.ts_us

    def _read_held(self, start_lsn: int) -> None:
        """Before streaming from the confirmed position: what the topics hold of what comes after it
        (everything sent is acknowledged by now), so that none of it is published twice; with
        transaction records, how many messages of each transaction from there on, for their ENDs."""
        try:
            self.replay = None if self.held is None else self.held()
            if self.records is not None:
                self._read_held_transactions(self.records, start_lsn)
        except KafkaException as exc:
            raise ConnectError(f"cannot read the topics' last positions from Kafka: {kafka_reason(exc)}") from None

    def _read_held_transactions(self, records: TransactionRecords, start_lsn: int) -> None:
        """While the stream reads again what the topics hold: the messages they hold of each
        transaction from `start_lsn` on, and the transaction topic's last position."""
        replay = self.replay
        if replay is None or replay.done:
            records.held({}, None, None)
            return
        held = self.held_transactions(start_lsn) if self.held_transactions is not None else {}
        records.held(held, start_lsn, replay.held.get((records.topic, TRANSACTION_PARTITION)))

    def _replayed(self, replay: Replay) -> Replay | None:
        """The stream is past what the topics held: from here on every message is new (None)."""
        self.duplicates_skipped += replay.skipped
        log.info("past what the topics held: %d messages read again were not published twice", replay.skipped)
        self.replay = None
        return self.replay

    def _while_full(self) -> None:
        if self.cur is not None:
            self._housekeeping(self.cur, idle=False)

    # --- confirming positions -------------------------------------------------------------------

    def _housekeeping(self, cur: ReplicationCursor, idle: bool) -> None:
        self.producer.poll(0)
        tracker = self.confirmer.tracker
        if tracker.failures:
            raise_delivery_failure(tracker)
        now = time.monotonic()
        if self.heartbeat is not None:
            self.heartbeat.tick(now)
        if self.incremental is not None:
            self.incremental.step()
        if self.periodic is not None and now >= self.next_periodic:
            self.next_periodic = now + PERIODIC_INTERVAL
            self.periodic()
        if now < self.next_confirm and not (
            idle and now >= self.last_confirm + SETTLE_CONFIRM_INTERVAL and self.confirmer.settling()
        ):
            return
        self.next_confirm = now + CONFIRM_INTERVAL
        self.last_confirm = now
        self.wal_end = cur.wal_end
        self.confirmer.step(cur, None if self.last is None else self.last.data_start, idle)

    def health(self) -> tuple[bool, str]:
        """Can the stream make progress? Not when the source or Kafka has been gone for long."""
        problem = self.reconnect.problem()
        if problem is not None:
            return False, problem
        stalled = self.publisher.stalled_since
        if stalled is not None and time.monotonic() - stalled > 60:
            return False, f"Kafka has not accepted messages for {time.monotonic() - stalled:.0f} s"
        return True, f"ok: confirmed {int_to_lsn(self.confirmed_lsn)}, {self.transactions} transactions read"

    def _wait_acknowledged(self, timeout: float | None = None) -> None:
        """Until Kafka acknowledged everything sent (or `timeout` passed)."""
        tracker = self.confirmer.tracker
        deadline = None if timeout is None else time.monotonic() + timeout
        while tracker.in_flight() and (deadline is None or time.monotonic() < deadline):
            self.producer.poll(0.2)
            if tracker.failures:
                raise_delivery_failure(tracker)

    def _settle(self) -> None:
        """After a lost connection: wait until Kafka acknowledged everything sent, forget the
        transaction that was cut, and restart from the confirmed position."""
        self._wait_acknowledged()
        self.confirmer.restart()
        self.last = None
        if self.incremental is not None:
            self.incremental.reset()

    def _shutdown(self, cur: ReplicationCursor) -> None:
        """SIGTERM: everything read is acknowledged by Kafka, then confirmed to PostgreSQL."""
        log.info("stopping: waiting for Kafka to acknowledge %d messages", self.confirmer.tracker.in_flight())
        self._wait_acknowledged()
        if self.incremental is not None:
            self.incremental.acknowledged()  # the snapshots' progress goes out with the last state record
        self.confirmer.final(cur)
        log.info("confirmed %s to the slot; stopped", int_to_lsn(self.confirmed_lsn), extra={"slot": self.slot})


def messages_seen(incremental: Incremental, messages: list[Message], truncate: bool) -> None:
    """The messages of one change, told to the snapshot chunk under way. A row change's messages
    without a key are its table's schema-change event: a chunk of that table read with the old
    shape is read again with the new one (its watermarks are then ignored)."""
    if not truncate and messages and messages[0][1] is None:
        chunk = incremental.window or incremental.chunk
        if chunk is not None and chunk.info.topic == messages[0][0]:
            incremental.reset()
            return
        messages = [m for m in messages if m[1] is not None]
    if incremental.window is not None:
        incremental.window.saw(messages)


def outside_transaction(payload: bytes) -> SourceError:
    return SourceError(f"wal2json sent a change outside a transaction: {payload[:200]!r}")


def _literal(value: str) -> str:
    """A SQL string literal. psycopg2's start_replication quotes option values as latin-1, which
    garbles a table name such as `ünïcödé`; the command is built here, in UTF-8, instead."""
    return "'" + value.replace("'", "''") + "'"


def wal2json_options(add_tables: list[str], numbers_as_strings: bool) -> dict[str, str]:
    options = dict(WAL2JSON_OPTIONS)
    options["add-tables"] = ",".join(add_tables)
    options["add-msg-prefixes"] = f"{HEARTBEAT_PREFIX},{SNAPSHOT_PREFIX}"
    if numbers_as_strings:
        options[NUMBERS_AS_STRING_OPTION] = "1"
    return options


def start_replication_command(slot: str, start_lsn: int, options: dict[str, str]) -> str:
    """START_REPLICATION SLOT "s" LOGICAL 0/0 ("option" 'value', ...)."""
    ident = '"' + slot.replace('"', '""') + '"'
    opts = ", ".join('"' + k.replace('"', '""') + '" ' + _literal(v) for k, v in options.items())
    return f"START_REPLICATION SLOT {ident} LOGICAL {int_to_lsn(start_lsn)} ({opts})"
