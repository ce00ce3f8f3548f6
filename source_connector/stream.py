"""The replication stream: wal2json messages in, Kafka messages out, the slot confirmed only past
what Kafka acknowledged.

Reading pauses while the producer's queue is full (backpressure: the walsender then waits on the
socket), the connection is re-established with backoff when it drops, and SIGTERM stops reading,
waits for Kafka to acknowledge what was sent, confirms that position and returns.
"""

import contextlib
import logging
import select
import time
from collections.abc import Callable
from typing import Any

import psycopg2

from cdc_common.errors import CdcError, ConnectError, SourceError
from cdc_common.lsn import int_to_lsn, lsn_to_int
from cdc_common.pg import connect_source, error_reason, is_connection_loss
from cdc_common.retry import Backoff
from cdc_common.settings import Settings
from cdc_common.signals import StopFlag
from source_connector.events import EventBuilder, Headers, TxContext, begin_context
from source_connector.feedback import FeedbackGate
from source_connector.flush import FlushTracker, Transaction
from source_connector.slot import replication_error
from source_connector.snapshot import raise_delivery_failure
from source_connector.state import SourceState
from source_connector.wal2json import (
    NUMBERS_AS_STRING_OPTION,
    WAL2JSON_OPTIONS,
    Decoder,
    escape_table_pattern,
)

log = logging.getLogger("source.stream")

HEARTBEAT_PREFIX = "cdc-heartbeat"
ROW_KINDS = frozenset({b"I", b"U", b"D"})
HOUSEKEEPING_EVERY = 512  # messages between producer polls and feedback checks
CONFIRM_INTERVAL = 0.5  # seconds between attempts to confirm a new position
KEEPALIVE_INTERVAL = 10.0  # seconds between feedback messages when nothing moves
STALL_LOG_INTERVAL = 10.0
PERIODIC_INTERVAL = 30.0
# How long a start waits for a slot that another process holds (the walsender of a previous run that
# was killed may still be exiting) before reporting it, rather than waiting forever.
SLOT_BUSY_TIMEOUT = 15.0


class Stream:
    def __init__(
        self,
        settings: Settings,
        slot: str,
        tables: list[str],
        builder: EventBuilder,
        producer: Any,
        state: SourceState,
        state_topic: str,
        stop: StopFlag,
        emit_heartbeat: Callable[[], None] | None = None,
        heartbeat_interval: float = 0.0,
    ) -> None:
        self.settings = settings
        self.slot = slot
        self.add_tables = tables
        self.builder = builder
        self.producer = producer
        self.state = state
        self.state_topic = state_topic
        self.stop = stop
        self.emit_heartbeat = emit_heartbeat
        self.heartbeat_interval = heartbeat_interval
        self.heartbeats_seen = 0
        self.numbers_as_strings: bool | None = None  # probed on the first start
        self.decoder = Decoder()
        start = max(state.confirmed_lsn, state.snapshot_lsn)
        self.tracker = FlushTracker(start)
        self.gate = FeedbackGate(0, state.bound_lsn)
        self.received_lsn = start
        self.low_start = 1 << 64  # lowest data_start of a BEGIN since the last observation
        self.last_feedback = 0.0
        self.next_confirm = 0.0
        self.next_heartbeat = time.monotonic() + heartbeat_interval
        self.stalled_since: float | None = None
        self.connected = False
        self.down_since: float | None = None  # when the replication connection was lost
        self.wal_end = 0  # the server's WAL end, as last reported
        self.last_commit_us: int | None = None  # source commit time of the newest transaction read
        self.periodic: Callable[[], None] | None = None  # called every PERIODIC_INTERVAL (slot checks)
        self.next_periodic = 0.0
        self.has_streamed = False  # this process streamed from the slot at least once
        self.transactions = 0
        self.messages = 0

    # --- connection -----------------------------------------------------------------------------

    def _options(self, with_numbers_as_strings: bool) -> dict[str, str]:
        options = dict(WAL2JSON_OPTIONS)
        options["add-tables"] = ",".join(self.add_tables)
        options["add-msg-prefixes"] = HEARTBEAT_PREFIX
        if with_numbers_as_strings:
            options[NUMBERS_AS_STRING_OPTION] = "1"
        return options

    def _open(self, conn: Any | None) -> tuple[Any, Any]:
        """A replication connection streaming from the confirmed position."""
        start_lsn = self.tracker.flushed_lsn
        for attempt in (True, False):
            if attempt and self.numbers_as_strings is False:
                continue
            if conn is None:
                conn = connect_source(
                    self.settings.source_dsn,
                    application_name="cdc-source",
                    replication=True,
                )
            cur = conn.cursor()
            try:
                cur.start_replication_expert(
                    start_replication_command(self.slot, start_lsn, self._options(attempt)),
                    decode=False,
                    status_interval=3600,
                )
            except psycopg2.Error as exc:
                conn.close()
                conn = None
                if attempt and NUMBERS_AS_STRING_OPTION in str(exc):
                    # Recorded (and logged) below once the fallback started: setting it here
                    # skipped that log line, so the operator never learnt NaN is lost.
                    continue
                raise
            if self.numbers_as_strings is None:
                self.numbers_as_strings = attempt
                if attempt:
                    log.info("wal2json sends every number as a string (numeric-data-types-as-string)")
                else:
                    log.info(
                        "wal2json here is older than 2.6 (no numeric-data-types-as-string): NaN and Infinity "
                        "in numeric, real and double precision columns arrive as null"
                    )
            self.decoder = Decoder(numbers_as_strings=attempt)
            log.info("streaming from slot %s at %s", self.slot, int_to_lsn(start_lsn), extra={"slot": self.slot})
            self.connected = True
            self.down_since = None
            return conn, cur
        raise AssertionError("unreachable")

    def run(self, conn: Any | None = None) -> None:
        """Stream until stopped; reconnects by itself when the source goes away."""
        backoff = Backoff(base=0.5, cap=15.0)
        busy_since: float | None = None
        while not self.stop:
            try:
                conn, cur = self._open(conn)
                self.has_streamed = True
                backoff.reset()
                self._loop(cur)
                self._shutdown(cur)
                conn.close()
                return
            except psycopg2.Error as exc:
                self._disconnected(conn)
                conn = cur = None
                known = replication_error(exc, self.slot)
                busy = known is not None and getattr(exc, "pgcode", "") == "55006"
                transient = is_connection_loss(exc) or busy
                # The slot is active in another process. After this process streamed, that is most
                # likely its own old walsender, which the server ends (wal_sender_timeout): keep
                # retrying. At start-up it is usually another cdc-source on the same slot: wait a
                # little, then fail with the reason instead of retrying silently forever.
                if busy and not self.has_streamed:
                    now = time.monotonic()
                    busy_since = now if busy_since is None else busy_since
                    if now - busy_since >= SLOT_BUSY_TIMEOUT:
                        transient = False
                if not transient:
                    if known is not None:
                        raise known from None
                    raise SourceError(f"replication failed: {error_reason(exc)}") from None
                self._settle()
                delay = backoff.next_delay(time.monotonic())
                if busy_since is not None and not self.has_streamed and delay is not None:
                    delay = min(delay, max(0.1, busy_since + SLOT_BUSY_TIMEOUT - time.monotonic()))
                log.warning(
                    "%s (%s); reconnecting in %.1f s",
                    "replication slot busy" if busy else "replication connection lost",
                    error_reason(exc),
                    delay or 0,
                    extra={"slot": self.slot},
                )
                self.stop.wait(delay or 1.0)
            except ConnectError as exc:
                # From connecting the stream, or from the connector's own connection inside the
                # loop (a table lookup reconnecting while the server is down), possibly in the
                # middle of a transaction: the cut transaction is forgotten as for a lost
                # connection, or it would stay open and hold the confirmed position back for good.
                self._disconnected(conn)
                conn = cur = None
                self._settle()
                delay = backoff.next_delay(time.monotonic())
                log.warning("%s; retrying in %.1f s", exc, delay or 0)
                self.stop.wait(delay or 1.0)

    def _disconnected(self, conn: Any | None) -> None:
        """The stream is down: close the replication connection now, as a half-dead connection left
        to the garbage collector keeps the server's walsender (so the slot, and a shutdown of the
        server) busy until wal_sender_timeout."""
        self.connected = False
        self.down_since = self.down_since or time.monotonic()
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    # --- the loop -------------------------------------------------------------------------------

    def _loop(self, cur: Any) -> None:
        read = cur.read_message
        decode = self.decoder.decode
        row = self.builder.row
        produce = self.producer.produce
        tracker = self.tracker
        stop = self.stop
        tx: Transaction | None = None
        ctx: TxContext | None = None
        msg: Any = None
        last: Any = None
        count = 0
        while not stop:
            msg = read()
            if msg is None:
                self._housekeeping(cur, last, idle=True)
                if tx is None:
                    select.select([cur], [], [], 0.2)
                continue
            last = msg
            payload = msg.payload
            kind = payload[11:12]
            if kind in ROW_KINDS:
                for topic, key, value, partition, headers in row(decode(payload), ctx):  # type: ignore[arg-type]
                    tx.outstanding += 1  # type: ignore[union-attr]
                    try:
                        produce(
                            topic,
                            value,
                            key,
                            -1 if partition is None else partition,
                            on_delivery=tx.ack,  # type: ignore[union-attr]
                            headers=headers,
                        )
                    except BufferError:
                        self._produce_when_room(cur, last, topic, value, key, partition, tx, headers)  # type: ignore[arg-type]
            elif kind == b"B":
                self.low_start = min(
                    self.low_start, msg.data_start
                )  # a transaction older than the last one confirmed
                doc = decode(payload)
                ctx = begin_context(doc)
                tx = tracker.begin(doc["xid"], lsn_to_int(doc["nextlsn"]))
            elif kind == b"C":
                tracker.commit(tx)  # type: ignore[arg-type]
                tx = None
                self.transactions += 1
                self.last_commit_us = ctx.ts_us  # type: ignore[union-attr]
            elif kind == b"T":
                for topic, key, value, partition, _ in self.builder.truncate(decode(payload), ctx):  # type: ignore[arg-type]
                    tx.outstanding += 1  # type: ignore[union-attr]
                    try:
                        produce(topic, value, key, partition, on_delivery=tx.ack)  # type: ignore[union-attr]
                    except BufferError:
                        self._produce_when_room(cur, last, topic, value, key, partition, tx)  # type: ignore[arg-type]
            elif kind == b"M":
                tracker.point(msg.data_start)
                self.heartbeats_seen += 1
            count += 1
            if count >= HOUSEKEEPING_EVERY:
                self.messages += count
                count = 0
                self._housekeeping(cur, last, idle=False)
        self.messages += count

    def _produce_when_room(
        self,
        cur: Any,
        last: Any,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        partition: int | None,
        tx: Transaction,
        headers: Headers | None = None,
    ) -> None:
        """Backpressure: the producer's queue is full, so stop reading WAL until Kafka takes more."""
        started = time.monotonic()
        next_log = started + STALL_LOG_INTERVAL
        while True:
            self.producer.poll(0.1)
            try:
                self.producer.produce(
                    topic, value, key, -1 if partition is None else partition, on_delivery=tx.ack, headers=headers
                )
                break
            except BufferError:
                pass
            now = time.monotonic()
            self.stalled_since = started
            self._housekeeping(cur, last, idle=False)
            if now >= next_log:
                log.warning(
                    "Kafka is not keeping up: %d messages waiting for acknowledgement for %.0f s; "
                    "WAL reading is paused (the slot keeps the WAL)",
                    self.tracker.in_flight(),
                    now - started,
                )
                next_log = now + STALL_LOG_INTERVAL
            if self.stop and now - started > 30:
                raise CdcError(
                    "stopped while Kafka was not accepting messages; unacknowledged changes will be re-read"
                )
        self.stalled_since = None

    # --- confirming positions -------------------------------------------------------------------

    def _housekeeping(self, cur: Any, last: Any, idle: bool) -> None:
        self.producer.poll(0)
        if self.tracker.failures:
            raise_delivery_failure(self.tracker)
        now = time.monotonic()
        if self.heartbeat_interval > 0 and now >= self.next_heartbeat and self.emit_heartbeat is not None:
            self.next_heartbeat = now + self.heartbeat_interval
            self.emit_heartbeat()
        if self.periodic is not None and now >= self.next_periodic:
            self.next_periodic = now + PERIODIC_INTERVAL
            self.periodic()
        if now < self.next_confirm:
            return
        self.next_confirm = now + CONFIRM_INTERVAL
        target = self.tracker.advance()
        wal_end = self.wal_end = cur.wal_end
        if idle:
            target = self.tracker.caught_up_to(wal_end)
        if last is not None:
            self.received_lsn = max(self.received_lsn, last.data_start)
        self.gate.observe(self.low_start, last.data_start if last is not None else 0, wal_end)
        self.low_start = 1 << 64
        requested = self.gate.requested
        bound = self.gate.needs_state(target)
        if bound is not None and not self._write_state(target, bound):
            self.gate.requested = requested  # the producer's queue is full: ask again next time
        # Send the newest position that an acknowledged state record already covers. Under
        # sustained load `target` has moved past the last acknowledged bound every time we look, so
        # waiting until `target` itself was covered meant never confirming anything until the stream
        # went idle: the slot held all WAL since the start, and a restart re-sent all of it. Any
        # position up to `target` is safe to confirm (every transaction before it is in Kafka).
        sendable = min(target, self.gate.acked)
        if self.gate.may_send(sendable):
            cur.send_feedback(write_lsn=max(self.received_lsn, sendable), flush_lsn=sendable, force=True)
            self.gate.mark_sent(sendable)
            self.last_feedback = now
        elif now - self.last_feedback >= KEEPALIVE_INTERVAL:
            # A reply every few seconds, whatever the state topic says: a server that hears nothing
            # for wal_sender_timeout/2 asks for a reply in the middle of a transaction, and psycopg2
            # would answer it with a flush position raised past that unfinished transaction.
            cur.send_feedback(write_lsn=self.received_lsn, force=True)
            self.last_feedback = now

    def health(self) -> tuple[bool, str]:
        """Can the stream make progress? Not when the source or Kafka has been gone for long."""
        now = time.monotonic()
        if self.down_since is not None and now - self.down_since > 30:
            return False, f"replication connection lost for {now - self.down_since:.0f} s"
        if self.stalled_since is not None and now - self.stalled_since > 60:
            return False, f"Kafka has not accepted messages for {now - self.stalled_since:.0f} s"
        return True, f"ok: confirmed {int_to_lsn(self.gate.sent)}, {self.transactions} transactions read"

    def _write_state(self, confirmed: int, bound: int) -> bool:
        """Queue a state record; False when the producer's queue is full (Kafka is not keeping up)."""
        self.state = SourceState(
            self.state.slot,
            self.state.database,
            self.state.system_id,
            self.state.snapshot,
            self.state.snapshot_lsn,
            confirmed,
            bound,
        )
        gate = self.gate

        def acked(err: Any, msg: Any) -> None:
            if err is None:
                gate.state_acknowledged(bound)

        try:
            self.producer.produce(self.state_topic, self.state.encode(), self.state.key(), on_delivery=acked)
        except BufferError:
            return False
        return True

    def _settle(self, timeout: float | None = None) -> None:
        """After a lost connection: wait until Kafka acknowledged everything sent, forget the
        transaction that was cut, and restart from the confirmed position."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.tracker.in_flight() and (deadline is None or time.monotonic() < deadline):
            self.producer.poll(0.2)
            if self.tracker.failures:
                raise_delivery_failure(self.tracker)
        flushed = self.tracker.advance()
        self.tracker = FlushTracker(flushed)
        self.gate = FeedbackGate(0, self.gate.acked)

    def _shutdown(self, cur: Any) -> None:
        """SIGTERM: everything read is acknowledged by Kafka, then confirmed to PostgreSQL."""
        log.info("stopping: waiting for Kafka to acknowledge %d messages", self.tracker.in_flight())
        while self.tracker.in_flight():
            self.producer.poll(0.2)
            if self.tracker.failures:
                raise_delivery_failure(self.tracker)
        target = self.tracker.advance()
        if self.tracker.idle():
            target = self.tracker.caught_up_to(cur.wal_end)
        self.gate.observe(self.low_start, self.received_lsn, cur.wal_end)
        bound = self.gate.needs_state(target)
        if bound is not None:
            self._write_state(target, bound)
        self.producer.flush(30)
        if self.gate.bound(target) <= self.gate.acked:
            cur.send_feedback(write_lsn=max(self.received_lsn, target), flush_lsn=target, force=True)
            self.gate.mark_sent(target)
        log.info("confirmed %s to the slot; stopped", int_to_lsn(self.gate.sent), extra={"slot": self.slot})


def _literal(value: str) -> str:
    """A SQL string literal. psycopg2's start_replication quotes option values as latin-1, which
    garbles a table name such as `ünïcödé`; the command is built here, in UTF-8, instead."""
    return "'" + value.replace("'", "''") + "'"


def start_replication_command(slot: str, start_lsn: int, options: dict[str, str]) -> str:
    """START_REPLICATION SLOT "s" LOGICAL 0/0 ("option" 'value', ...)."""
    ident = '"' + slot.replace('"', '""') + '"'
    opts = ", ".join('"' + k.replace('"', '""') + '" ' + _literal(v) for k, v in options.items())
    return f"START_REPLICATION SLOT {ident} LOGICAL {int_to_lsn(start_lsn)} ({opts})"


def add_tables_option(tables: list[Any]) -> list[str]:
    """wal2json's add-tables entries for the given TableNames (escaped)."""
    return [f"{escape_table_pattern(t.schema)}.{escape_table_pattern(t.name)}" for t in tables]
