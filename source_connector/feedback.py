"""When a flush position may be sent to PostgreSQL, so that the state topic always holds an upper
bound of the slot's confirmed_flush_lsn (which is how a slot recreated behind the connector's back
is detected: its confirmed_flush_lsn is then past that bound).

psycopg2 sends the flush position we give it, but also raises it on its own to the WAL end of a
server keepalive when everything received was confirmed. This gate mirrors that rule
conservatively, and lets a position be sent only once the state topic acknowledged a bound of
everything psycopg2 could then send. Pure: the caller reports observations.
"""


class FeedbackGate:
    def __init__(self, sent: int, bound: int) -> None:
        self.sent = sent  # the last flush position handed to this psycopg2 cursor (0 for a new one)
        self.auto = sent  # how far psycopg2 may have advanced it by itself
        self.last_start = 0  # data_start of the newest message seen at the previous observation
        self.requested = bound  # the newest bound written to the state topic
        self.acked = bound  # the newest bound the state topic acknowledged

    def observe(self, low_start: int, last_start: int, wal_end: int) -> None:
        """psycopg2 raises its flush position to a keepalive's WAL end when the position we gave it is
        at or past the start of the last message it received. Between two observations that last
        message was the one seen at the previous observation or one received since, the lowest of
        which starts at `low_start` (a BEGIN of a transaction older than the ones confirmed can start
        before them). So psycopg2 may have advanced to `wal_end` if `sent` covers either."""
        if self.sent >= min(self.last_start, low_start) and wal_end > self.auto:
            self.auto = wal_end
        self.last_start = last_start

    def bound(self, target: int) -> int:
        """The highest position PostgreSQL could be told if `target` were sent now."""
        return max(target, self.sent, self.auto)

    def needs_state(self, target: int) -> int | None:
        """A new bound to write to the state topic before `target` can be sent, or None."""
        bound = self.bound(target)
        if bound > self.requested:
            self.requested = bound
            return bound
        return None

    def state_acknowledged(self, bound: int) -> None:
        self.acked = max(self.acked, bound)

    def may_send(self, target: int) -> bool:
        return target > self.sent and self.bound(target) <= self.acked

    def mark_sent(self, target: int) -> None:
        self.sent = max(self.sent, target)
