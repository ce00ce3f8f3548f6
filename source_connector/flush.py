"""Which WAL position may be confirmed to PostgreSQL: never past a transaction whose messages Kafka
has not all acknowledged.

Transactions are tracked in commit order. Each counts the messages it produced that are not yet
acknowledged; the flush position (`flushed_lsn`, kept current as events arrive) is the end LSN of
the newest transaction that, with every transaction before it, is committed and fully
acknowledged. Pure: the caller feeds it events.
"""

from collections import deque
from typing import Any


class Transaction:
    """One source transaction (or a logical message) in flight."""

    __slots__ = ("committed", "end_lsn", "outstanding", "tracker", "xid")

    def __init__(self, tracker: "FlushTracker", xid: int | None, end_lsn: int) -> None:
        self.tracker = tracker
        self.xid = xid
        self.end_lsn = end_lsn
        self.outstanding = 0
        self.committed = False

    def ack(self, err: Any, msg: Any) -> None:
        """Kafka delivery callback of one of this transaction's messages."""
        self.outstanding -= 1
        if err is not None:
            self.tracker.failures.append((err, msg))
        elif self.outstanding == 0 and self.committed:
            self.tracker.advance()


class FlushTracker:
    def __init__(self, flushed_lsn: int) -> None:
        self.flushed_lsn = flushed_lsn
        self.pending: deque[Transaction] = deque()
        self.open: Transaction | None = None
        self.failures: list[tuple[Any, Any]] = []
        # Messages counted but never handed to the producer (a stop while Kafka refused one as too
        # large): they hold the flush position back for good, but nobody waits for them.
        self.abandoned = 0

    def begin(self, xid: int | None, end_lsn: int) -> Transaction:
        """A transaction starts; `end_lsn` is the end of its commit record (wal2json's nextlsn)."""
        tx = Transaction(self, xid, end_lsn)
        self.pending.append(tx)
        self.open = tx
        return tx

    def commit(self, tx: Transaction) -> None:
        """Every message of `tx` has been handed to the producer."""
        tx.committed = True
        if self.open is tx:
            self.open = None
        if tx.outstanding == 0:
            self.advance()

    def point(self, lsn: int) -> Transaction:
        """A position with nothing to send (a logical message): flushable once all before it are."""
        tx = Transaction(self, None, lsn)
        tx.committed = True
        self.pending.append(tx)
        self.advance()
        return tx

    def advance(self) -> int:
        """Drop the fully acknowledged prefix; returns the new flush position (which a delivery
        failure holds where it is)."""
        if self.failures:
            return self.flushed_lsn
        pending = self.pending
        while pending and pending[0].committed and pending[0].outstanding == 0:
            tx = pending.popleft()
            self.flushed_lsn = max(self.flushed_lsn, tx.end_lsn)
        return self.flushed_lsn

    def idle(self) -> bool:
        """Nothing in flight and no transaction half-read: every position received is handled."""
        return not self.pending and self.open is None

    def caught_up_to(self, server_lsn: int) -> int:
        """When idle, the server's sent position (from a keepalive) is safe to confirm too."""
        if self.idle() and server_lsn > self.flushed_lsn:
            self.flushed_lsn = server_lsn
        return self.flushed_lsn

    def in_flight(self) -> int:
        """Messages handed to the producer and not yet acknowledged."""
        return sum(tx.outstanding for tx in self.pending) - self.abandoned
