"""The one confirm step: which position the slot may be told is flushed, and telling it.

Order, every time: the tracker gives the newest position whose transactions Kafka acknowledged in
full (or the server's WAL end when nothing is in flight and nothing was left unread); the gate
records what psycopg2 may have sent on its own; a state record bounding what could be confirmed
is queued when the bound grows; the position is sent once a state record covering it was
acknowledged. The stream calls `step` as it runs and `final` when it stops.
"""

import time
from dataclasses import replace
from typing import Any

from source_connector.feedback import FeedbackGate
from source_connector.flush import FlushTracker
from source_connector.ports import KafkaProducer, ReplicationCursor
from source_connector.state import SourceState

KEEPALIVE_INTERVAL = 10.0  # seconds between feedback messages when nothing moves
NO_START = 1 << 64


class Confirmer:
    def __init__(self, producer: KafkaProducer, state: SourceState, state_topic: str) -> None:
        self.producer = producer
        self.state = state
        self.state_topic = state_topic
        start = max(state.confirmed_lsn, state.snapshot_lsn)
        self.tracker = FlushTracker(start)
        self.gate = FeedbackGate(0, state.bound_lsn)
        self.received_lsn = start
        self.low_start = NO_START  # lowest data_start of a BEGIN since the last observation
        self.last_feedback = 0.0
        self.acked_to = 0  # where the tracker stood at the last step: Kafka acknowledged everything before it

    def begin_seen(self, data_start: int) -> None:
        """A BEGIN arrived (its transaction may be older than the ones confirmed)."""
        self.low_start = min(self.low_start, data_start)

    def step(self, cur: ReplicationCursor, last_start: int | None, idle: bool) -> None:
        """While streaming: `last_start` is the newest message read (None: none yet), `idle` that the
        last read found nothing, so the server's WAL end is safe once nothing is in flight."""
        target = self.acked_to = self.tracker.flushed_lsn
        if idle:
            target = self.tracker.caught_up_to(cur.wal_end)
        if last_start is not None:
            self.received_lsn = max(self.received_lsn, last_start)
        self._observe(cur, last_start or 0)
        requested = self.gate.requested
        bound = self.gate.needs_state(target)
        if bound is not None and not self._write_state(target, bound):
            self.gate.requested = requested  # the producer's queue is full: ask again next time
        self._send(cur, target)

    def settling(self) -> bool:
        """Transactions read are not all confirmed yet: some are in flight, or acknowledged and not
        yet sent (a state record covering them may still be on its way)."""
        return bool(self.tracker.pending) or self.gate.sent < self.acked_to

    def final(self, cur: ReplicationCursor, flush_timeout: float = 30) -> None:
        """At a stop, once everything read was acknowledged: confirm as far as that goes."""
        target = self.tracker.flushed_lsn
        if self.tracker.idle():
            target = self.tracker.caught_up_to(cur.wal_end)
        self._observe(cur, self.received_lsn)
        bound = self.gate.needs_state(target)
        if bound is not None:
            self._write_state(target, bound)
        self.producer.flush(flush_timeout)
        self._send(cur, target)

    def restart(self) -> None:
        """After a lost connection (everything sent acknowledged): a new cursor starts from the
        confirmed position; the cut transaction is forgotten."""
        self.tracker = FlushTracker(self.tracker.flushed_lsn)
        self.gate = FeedbackGate(0, self.gate.acked)

    def _observe(self, cur: ReplicationCursor, last_start: int) -> None:
        self.gate.observe(self.low_start, last_start, cur.wal_end)
        self.low_start = NO_START

    def _send(self, cur: ReplicationCursor, target: int) -> None:
        # Any position up to `target` is safe (every transaction before it is in Kafka); send the
        # newest one an acknowledged state record covers. Waiting until `target` itself was covered
        # would never confirm anything under sustained load, as `target` moves on each time.
        now = time.monotonic()
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

    def record(self, **changes: Any) -> None:
        """Change other fields of the state record (the incremental snapshots' progress) and queue it;
        records queued later (the confirmed positions) carry the change too."""
        self.state = replace(self.state, **changes)
        while True:
            try:
                self.producer.produce(self.state_topic, self.state.encode(), self.state.key())
                return
            except BufferError:
                self.producer.poll(0.1)

    def _write_state(self, confirmed: int, bound: int) -> bool:
        """Queue a state record; False when the producer's queue is full (Kafka is not keeping up)."""
        self.state = replace(self.state, confirmed_lsn=confirmed, bound_lsn=bound)
        gate = self.gate

        def acked(err: Any, msg: Any) -> None:
            if err is None:
                gate.state_acknowledged(bound)

        try:
            self.producer.produce(self.state_topic, self.state.encode(), self.state.key(), on_delivery=acked)
        except BufferError:
            return False
        return True
