"""FlushTracker: the flush position never passes a transaction Kafka has not fully acknowledged."""

from dataclasses import dataclass

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from source_connector.flush import FlushTracker, Transaction


def produce(tx: Transaction, count: int = 1) -> None:
    """What the stream does for each message it hands to the producer."""
    tx.outstanding += count


def test_starts_at_the_given_position() -> None:
    tracker = FlushTracker(100)
    assert tracker.flushed_lsn == 100
    assert tracker.advance() == 100
    assert tracker.idle()
    assert tracker.in_flight() == 0


def test_advances_over_a_committed_fully_acknowledged_transaction() -> None:
    tracker = FlushTracker(100)
    tx = tracker.begin(730, 200)
    produce(tx, 2)
    tracker.commit(tx)
    assert tracker.advance() == 100
    tx.ack(None, "m1")
    assert tracker.advance() == 100
    tx.ack(None, "m2")
    assert tracker.advance() == 200
    assert tracker.idle()


def test_does_not_advance_over_an_uncommitted_transaction() -> None:
    tracker = FlushTracker(100)
    tx = tracker.begin(730, 200)
    produce(tx)
    tx.ack(None, "m")
    assert tracker.advance() == 100  # its C message has not been read: more rows may follow
    assert not tracker.idle()
    tracker.commit(tx)
    assert tracker.advance() == 200


def test_acks_out_of_order_flush_in_commit_order() -> None:
    tracker = FlushTracker(0)
    txs = [tracker.begin(i, 100 * (i + 1)) for i in range(3)]
    for tx in txs:
        produce(tx)
        tracker.commit(tx)
    txs[2].ack(None, "c")
    assert tracker.advance() == 0
    txs[1].ack(None, "b")
    assert tracker.advance() == 0
    assert tracker.in_flight() == 1
    txs[0].ack(None, "a")
    assert tracker.advance() == 300
    assert tracker.in_flight() == 0


def test_partial_prefix() -> None:
    tracker = FlushTracker(0)
    a, b, c = (tracker.begin(i, end) for i, end in ((1, 10), (2, 20), (3, 30)))
    for tx in (a, b, c):
        produce(tx)
        tracker.commit(tx)
    a.ack(None, None)
    c.ack(None, None)
    assert tracker.advance() == 10
    b.ack(None, None)
    assert tracker.advance() == 30


def test_empty_transactions_flush_once_committed() -> None:
    tracker = FlushTracker(0)
    tx = tracker.begin(731, 50)
    assert tracker.advance() == 0
    tracker.commit(tx)
    assert tracker.advance() == 50
    # an empty transaction behind an unacknowledged one waits for it
    busy = tracker.begin(732, 60)
    produce(busy)
    tracker.commit(busy)
    empty = tracker.begin(733, 70)
    tracker.commit(empty)
    assert tracker.advance() == 50
    busy.ack(None, None)
    assert tracker.advance() == 70


def test_point_flushes_once_everything_before_it_has() -> None:
    tracker = FlushTracker(0)
    tx = tracker.begin(1, 100)
    produce(tx)
    tracker.commit(tx)
    point = tracker.point(150)
    assert point.committed
    assert point.xid is None
    assert tracker.advance() == 0
    tx.ack(None, None)
    assert tracker.advance() == 150
    assert tracker.point(160) is not None
    assert tracker.advance() == 160


def test_flush_position_never_goes_back() -> None:
    tracker = FlushTracker(500)
    tx = tracker.begin(1, 400)  # replayed from before the confirmed position
    tracker.commit(tx)
    assert tracker.advance() == 500


def test_idle_and_caught_up_to() -> None:
    tracker = FlushTracker(100)
    assert tracker.idle()
    assert tracker.caught_up_to(180) == 180
    assert tracker.caught_up_to(150) == 180  # never backwards
    tx = tracker.begin(1, 200)
    assert not tracker.idle()
    assert tracker.caught_up_to(300) == 180  # a transaction is half read
    tracker.commit(tx)  # nothing to acknowledge: flushable at once
    assert tracker.flushed_lsn == 200
    assert tracker.idle()
    assert tracker.caught_up_to(300) == 300


def test_idle_waits_for_acknowledgements() -> None:
    tracker = FlushTracker(0)
    tx = tracker.begin(1, 10)
    produce(tx)
    tracker.commit(tx)
    tracker.advance()
    assert not tracker.idle()
    assert tracker.caught_up_to(99) == 0
    tx.ack(None, None)
    tracker.advance()
    assert tracker.idle()


def test_in_flight_counts_unacknowledged_messages() -> None:
    tracker = FlushTracker(0)
    a = tracker.begin(1, 10)
    produce(a, 3)
    tracker.commit(a)
    b = tracker.begin(2, 20)
    produce(b, 2)
    assert tracker.in_flight() == 5
    a.ack(None, None)
    b.ack(None, None)
    assert tracker.in_flight() == 3
    assert tracker.open is b


def test_commit_closes_the_open_transaction() -> None:
    tracker = FlushTracker(0)
    tx = tracker.begin(1, 10)
    assert tracker.open is tx
    tracker.commit(tx)
    assert tracker.open is None
    assert tx.committed


def test_failures_are_recorded() -> None:
    tracker = FlushTracker(0)
    tx = tracker.begin(1, 10)
    produce(tx, 2)
    tracker.commit(tx)
    err = RuntimeError("_MSG_TIMED_OUT")
    tx.ack(err, "message 1")
    tx.ack(None, "message 2")
    assert tracker.failures == [(err, "message 1")]
    # a failed delivery is no longer in flight: the caller checks `failures` before it confirms anything
    assert tracker.in_flight() == 0


# --- property: random interleavings ---------------------------------------------------------------


@dataclass
class Model:
    tx: Transaction
    end_lsn: int
    unacked: int = 0
    committed: bool = False


class FlushMachine(RuleBasedStateMachine):
    """Begin/produce/ack/commit/point/advance/caught_up_to in any order the stream can issue them."""

    def __init__(self) -> None:
        super().__init__()
        self.start = 1000
        self.tracker = FlushTracker(self.start)
        self.lsn = self.start  # the newest position received
        self.txs: list[Model] = []  # every transaction and point, in commit order
        self.open: Model | None = None
        self.unacked: list[Model] = []  # one entry per message produced and not yet acknowledged
        self.failures = 0
        self.last_flushed = self.start
        self.last_server_lsn = self.start

    @precondition(lambda self: self.open is None)
    @rule(gap=st.integers(1, 100))
    def begin(self, gap: int) -> None:
        self.lsn += gap
        model = Model(self.tracker.begin(len(self.txs), self.lsn), self.lsn)
        self.txs.append(model)
        self.open = model

    @precondition(lambda self: self.open is not None)
    @rule(count=st.integers(1, 3))
    def produce(self, count: int) -> None:
        assert self.open is not None
        produce(self.open.tx, count)
        self.open.unacked += count
        self.unacked.extend([self.open] * count)

    @precondition(lambda self: self.open is not None)
    @rule()
    def commit(self) -> None:
        assert self.open is not None
        self.tracker.commit(self.open.tx)
        self.open.committed = True
        self.open = None

    @precondition(lambda self: bool(self.unacked))
    @rule(data=st.data(), failed=st.booleans())
    def ack(self, data: st.DataObject, failed: bool) -> None:
        index = data.draw(st.integers(0, len(self.unacked) - 1))
        model = self.unacked.pop(index)
        model.tx.ack(RuntimeError("delivery failed") if failed else None, object())
        model.unacked -= 1
        self.failures += failed

    @precondition(lambda self: self.open is None)
    @rule(gap=st.integers(1, 100))
    def point(self, gap: int) -> None:
        self.lsn += gap
        model = Model(self.tracker.point(self.lsn), self.lsn, committed=True)
        self.txs.append(model)

    @rule()
    def advance(self) -> None:
        before = self.tracker.flushed_lsn
        done = [m.end_lsn for m in self._done_prefix()]
        # a delivery failure holds the position: the stream stops before confirming anything
        assert self.tracker.advance() == (before if self.failures else max([before, *done]))

    @rule(ahead=st.integers(0, 100))
    def caught_up_to(self, ahead: int) -> None:
        # a keepalive's wal_end: at or past everything received; later changes come after it
        server_lsn = self.lsn + ahead
        before = self.tracker.flushed_lsn
        idle = self.tracker.idle()
        got = self.tracker.caught_up_to(server_lsn)
        assert got == (max(before, server_lsn) if idle else before)
        self.lsn = server_lsn

    def _done_prefix(self) -> list["Model"]:
        prefix = []
        for m in self.txs:
            if not (m.committed and m.unacked == 0):
                break
            prefix.append(m)
        return prefix

    @invariant()
    def never_past_an_unfinished_transaction(self) -> None:
        for m in self.txs:
            if not m.committed or m.unacked:
                assert self.tracker.flushed_lsn < m.end_lsn

    @invariant()
    def current_without_asking(self) -> None:
        """The flush position is kept up to date by the events themselves (no advance() needed)."""
        if not self.failures:
            done = [m.end_lsn for m in self._done_prefix()]
            assert self.tracker.flushed_lsn >= max(done, default=self.start)

    @invariant()
    def monotonic(self) -> None:
        assert self.tracker.flushed_lsn >= self.last_flushed
        self.last_flushed = self.tracker.flushed_lsn

    @invariant()
    def counts(self) -> None:
        assert self.tracker.in_flight() == len(self.unacked)
        assert len(self.tracker.failures) == self.failures
        assert (self.tracker.open is None) == (self.open is None)

    @invariant()
    def idle_means_nothing_left(self) -> None:
        if self.tracker.idle():
            assert self.open is None
            assert not self.unacked


FlushMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)
TestFlushMachine = FlushMachine.TestCase


def test_everything_acknowledged_flushes_to_the_last_end() -> None:
    tracker = FlushTracker(0)
    txs = []
    for i in range(50):
        tx = tracker.begin(i, (i + 1) * 10)
        produce(tx, i % 4)
        tracker.commit(tx)
        txs.append(tx)
    for tx in reversed(txs):
        for _ in range(tx.outstanding):
            tx.ack(None, None)
    assert tracker.advance() == 500
    assert tracker.idle()
