"""The transaction gate (sink_connector/transaction_gate.py): what `--consistency transaction`
releases, and when."""

import re
from collections.abc import Iterable

import pytest

from pg_kafka_cdc.common.errors import SinkError
from schemas import transactions
from sink_connector.changes import TOMBSTONE, Change
from sink_connector.transaction_gate import Cut, TransactionGate, consumed

TX = ("cdc.transaction", 0)
A, B = "cdc.public.a", "cdc.public.b"
S1, S2 = "S1", "S2"


class Feed:
    """Change messages and transaction records with offsets per partition."""

    def __init__(self, gate: TransactionGate) -> None:
        self.gate = gate
        self.offsets: dict[tuple[str, int], int] = {}

    def _next(self, tp: tuple[str, int]) -> int:
        offset = self.offsets.get(tp, 0)
        self.offsets[tp] = offset + 1
        return offset

    def change(
        self,
        topic: str,
        partition: int,
        key: int,
        commit_lsn: int | None,
        op: str = "u",
        stream: str = S1,
        xid: int | None = 1,
    ) -> Change:
        c = Change(
            topic, partition, self._next((topic, partition)), str(key).encode(), op, {"id": key}, None, ["id"]
        )
        c.xid = None if commit_lsn is None else xid
        c.commit_lsn, c.stream, c.seq = commit_lsn, stream, 1
        self.gate.push(c, 100)
        return c

    def begin(self, commit_lsn: int, stream: str = S1) -> None:
        value = transactions.encode_begin(stream, commit_lsn, commit_lsn, 1000)
        self.gate.push_record(self._next(TX), transactions.decode(value))

    def end(self, commit_lsn: int, counts: dict[str, int], stream: str = S1) -> None:
        value = transactions.encode_end(
            stream, commit_lsn, commit_lsn, 1000, 9, {t: (t[4:], n) for t, n in counts.items()}
        )
        self.gate.push_record(self._next(TX), transactions.decode(value))


def gate(limit: int = 100, byte_limit: int = 1 << 30, topics: Iterable[str] = (A, B)) -> TransactionGate:
    return TransactionGate(TX, consumed(list(topics)), limit, byte_limit)


def keys(cut: Cut) -> list[tuple[str, int, int]]:
    return [(c.topic, c.partition, int(c.key)) for c in cut.changes]


def lsns(cut: Cut) -> list[int]:
    return [t.commit_lsn for t in cut.transactions]


def test_a_transaction_waits_for_its_end_and_all_its_messages() -> None:
    g = gate()
    f = Feed(g)
    f.begin(10)
    f.change(A, 0, 1, 10)
    assert g.cut() is None
    f.end(10, {A: 1, B: 2})
    assert g.cut() is None  # B's messages not there yet
    f.change(B, 1, 2, 10)
    assert g.cut() is None
    f.change(B, 0, 3, 10)
    cut = g.cut()
    assert cut is not None and not cut.partial
    assert sorted(keys(cut)) == [(A, 0, 1), (B, 0, 3), (B, 1, 2)]
    assert cut.positions == {(A, 0): 1, (B, 0): 1, (B, 1): 1, TX: 2}
    assert lsns(cut) == [10]
    assert g.cut() is None


def test_transactions_go_in_commit_order_several_per_cut() -> None:
    g = gate()
    f = Feed(g)
    f.change(A, 0, 1, 10)  # the change topics are read ahead of the transaction topic
    f.change(A, 0, 2, 20)
    f.change(B, 0, 3, 30)
    for lsn, topic in ((10, A), (20, A)):
        f.begin(lsn)
        f.end(lsn, {topic: 1})
    f.begin(30)
    cut = g.cut()
    assert cut is not None and lsns(cut) == [10, 20] and keys(cut) == [(A, 0, 1), (A, 0, 2)]
    assert cut.positions[TX] == 4  # past the END of 20
    assert g.cut() is None
    f.end(30, {B: 1})
    cut = g.cut()
    assert cut is not None and lsns(cut) == [30] and cut.positions[TX] == 6


def test_a_later_transaction_never_passes_the_head() -> None:
    g = gate()
    f = Feed(g)
    f.begin(10)
    f.end(10, {A: 1})
    f.begin(20)
    f.change(B, 0, 2, 20)
    f.end(20, {B: 1})
    assert g.cut() is None  # 20 is complete, but 10 is not
    assert g.blocked() == [(B, 0)]
    f.change(A, 0, 1, 10)
    cut = g.cut()
    assert cut is not None and lsns(cut) == [10, 20]
    assert g.blocked() == []


def test_cuts_hold_at_most_the_limit_but_at_least_one_transaction() -> None:
    g = gate(limit=3)
    f = Feed(g)
    for lsn in (10, 20):
        f.begin(lsn)
        f.change(A, 0, lsn, lsn)
        f.change(A, 0, lsn + 1, lsn)
        f.end(lsn, {A: 2})
    first = g.cut()
    assert first is not None and lsns(first) == [10] and not first.partial
    second = g.cut()
    assert second is not None and lsns(second) == [20]


def test_snapshot_reads_and_changes_without_a_transaction_go_at_once() -> None:
    g = gate()
    f = Feed(g)
    f.change(A, 0, 1, None, op="r")
    f.change(A, 1, 2, 5, op="r", xid=None)
    cut = g.cut()
    assert cut is not None and sorted(keys(cut)) == [(A, 0, 1), (A, 1, 2)] and not cut.transactions
    assert TX not in cut.positions


def test_a_free_message_behind_a_waiting_one_waits() -> None:
    g = gate()
    f = Feed(g)
    f.begin(10)
    f.change(A, 0, 1, 10)
    f.change(A, 0, 2, None, op="r")
    f.change(A, 1, 3, None, op="r")
    cut = g.cut()
    assert cut is not None and keys(cut) == [(A, 1, 3)]
    assert cut.positions == {(A, 1): 1}
    f.end(10, {A: 1})
    cut = g.cut()
    assert cut is not None and keys(cut) == [(A, 0, 1), (A, 0, 2)] and cut.positions == {(A, 0): 2, TX: 2}


def test_changes_of_a_transaction_with_no_records_before_the_head_go_at_once() -> None:
    g = gate()
    f = Feed(g)
    f.change(A, 0, 1, 5)  # written before the source published transaction records
    assert g.cut() is None  # no head yet: it may be the first transaction's
    f.begin(10)
    cut = g.cut()
    assert cut is not None and keys(cut) == [(A, 0, 1)] and not cut.transactions


def test_tombstones_count_with_their_delete() -> None:
    g = gate()
    f = Feed(g)
    f.begin(10)
    f.change(A, 0, 1, 10, op="d")
    f.change(A, 0, 1, 10, op=TOMBSTONE)
    f.end(10, {A: 1})
    with pytest.raises(SinkError, match=re.escape("2 messages in topic cdc.public.a, more than the 1")):
        g.cut()


def test_more_messages_than_the_end_counts_is_an_error() -> None:
    g = gate()
    f = Feed(g)
    f.begin(10)
    f.change(B, 0, 1, 10)
    f.end(10, {A: 0})
    with pytest.raises(
        SinkError, match=re.escape("source transaction 10:10 of stream S1 has 1 messages in topic cdc.public.b")
    ):
        g.cut()


def test_topics_the_sink_does_not_consume_are_ignored() -> None:
    g = gate(topics=[A])
    f = Feed(g)
    f.begin(10)
    f.change(A, 0, 1, 10)
    f.end(10, {A: 1, B: 5})
    cut = g.cut()
    assert cut is not None and lsns(cut) == [10]
    f.begin(20)
    f.end(20, {B: 3})  # only tables of other topics: nothing to apply, the offset moves
    cut = g.cut()
    assert cut is not None and not cut.changes and lsns(cut) == [20] and cut.positions == {TX: 4}


def test_subscription_patterns() -> None:
    consumes = consumed(["cdc.public.a", r"^cdc\.s\.[a-z]+$"])
    assert consumes("cdc.public.a") and consumes("cdc.s.x") and not consumes("cdc.public.b")


def test_a_large_transaction_goes_in_pieces_then_completes() -> None:
    g = gate(limit=4)
    f = Feed(g)
    f.begin(10)
    for i in range(3):
        f.change(A, i % 2, i, 10)
    assert g.cut() is None  # 3 at the heads, fewer than the limit
    for i in range(3, 10):
        f.change(A, i % 2, i, 10)
    piece = g.cut()
    assert piece is not None and piece.partial and len(piece.changes) == 4 and not piece.transactions
    piece2 = g.cut()
    assert piece2 is not None and piece2.partial and len(piece2.changes) == 4
    assert g.cut() is None  # 2 left, END not read
    f.end(10, {A: 10})
    last = g.cut()
    assert last is not None and not last.partial and len(last.changes) == 2 and lsns(last) == [10]
    applied = {int(c.key) for cut in (piece, piece2, last) for c in cut.changes}
    assert applied == set(range(10))
    assert last.positions[TX] == 2


def test_a_piece_keeps_the_partial_mark_until_the_head_completes() -> None:
    g = gate(limit=2)
    f = Feed(g)
    f.begin(10)
    f.change(A, 0, 1, 10)
    f.change(A, 0, 2, 10)
    piece = g.cut()
    assert piece is not None and piece.partial
    f.change(B, 0, 3, None, op="r")  # a free message while the head is open
    free = g.cut()
    assert free is not None and free.partial and keys(free) == [(B, 0, 3)]
    f.change(A, 0, 4, 10)
    f.end(10, {A: 3})
    last = g.cut()
    assert last is not None and not last.partial and lsns(last) == [10]


def test_buffered_bytes_make_pieces_too() -> None:
    g = gate(limit=100, byte_limit=250)
    f = Feed(g)
    f.begin(10)
    for i in range(3):
        f.change(A, 0, i, 10)  # 100 bytes each
    piece = g.cut()
    assert piece is not None and piece.partial and len(piece.changes) == 3


def test_a_complete_transaction_larger_than_the_limit_goes_in_pieces() -> None:
    g = gate(limit=3)
    f = Feed(g)
    f.begin(10)
    for i in range(5):
        f.change(A, 0, i, 10)
    f.end(10, {A: 5})
    first = g.cut()
    assert first is not None and first.partial and len(first.changes) == 3
    second = g.cut()
    assert second is not None and not second.partial and len(second.changes) == 2 and lsns(second) == [10]


def test_streams_in_the_order_of_the_transaction_topic() -> None:
    g = gate()
    f = Feed(g)
    f.begin(50, stream=S1)
    f.end(50, {A: 1}, stream=S1)
    f.begin(10, stream=S2)
    f.change(A, 0, 2, 10, stream=S2)
    f.end(10, {A: 1}, stream=S2)
    f.change(A, 1, 3, 5, stream=S2)  # a later stream's change before the head: waits
    assert g.cut() is None
    f.change(A, 2, 1, 50, stream=S1)
    cut = g.cut()
    assert cut is not None and lsns(cut) == [50, 10]
    after = g.cut()  # the change freed once the head moved to S2
    assert after is not None and not after.partial
    assert sorted(keys(cut) + keys(after)) == [(A, 0, 2), (A, 1, 3), (A, 2, 1)]


def test_an_older_streams_changes_go_at_once() -> None:
    g = gate()
    f = Feed(g)
    f.begin(50, stream=S1)
    f.end(50, {A: 1}, stream=S1)
    f.change(A, 0, 1, 50, stream=S1)
    f.begin(10, stream=S2)
    assert g.cut() is not None
    f.change(A, 1, 9, 70, stream=S1)  # S1 came before S2 on the transaction topic: done with
    cut = g.cut()
    assert cut is not None and keys(cut) == [(A, 1, 9)]


def test_records_of_applied_transactions_only_move_the_offset() -> None:
    g = gate()
    g.reset({S1: 20})
    f = Feed(g)
    f.begin(20)
    f.end(20, {A: 1})
    f.change(A, 0, 1, 20)  # applied already: free (the position filter drops it)
    cut = g.cut()
    assert cut is not None and keys(cut) == [(A, 0, 1)] and cut.positions[TX] == 2 and not cut.transactions


def test_reset_forgets_everything_but_what_was_applied() -> None:
    g = gate()
    f = Feed(g)
    f.begin(10)
    f.change(A, 0, 1, 10)
    f.end(10, {A: 1})
    f.begin(20)
    f.change(A, 0, 2, 20)
    g.reset({S1: 10})
    assert g.buffered == 0 and g.head is None and g.cut() is None
    f.offsets.clear()
    f.change(A, 0, 2, 20)
    assert g.cut() is None  # 20 waits for its records again
    f.change(A, 0, 1, 10)  # (a duplicate behind it would be dropped by the position filter)
    f.begin(20)
    f.end(20, {A: 1})
    cut = g.cut()
    assert cut is not None and lsns(cut) == [20]


def test_a_stream_the_topic_did_not_show_since_the_start_compares_by_its_slots_creation() -> None:
    old, new, elsewhere = "7:slot_a:16B0000", "7:slot_b:16C0000", "8:slot_a:0"
    g = gate()
    g.reset({new: 5})  # restarted: the transaction topic shows `new` only
    f = Feed(g)
    f.begin(10, stream=new)
    f.change(A, 0, 1, 900, stream=old)  # a change of an older slot of the same server: done with
    f.change(A, 1, 2, 1, stream=elsewhere)  # another server's: cannot tell, waits
    cut = g.cut()
    assert cut is not None and keys(cut) == [(A, 0, 1)]
    assert g.blocked() == [(A, 1)]


def test_a_transaction_whose_missing_messages_lie_before_the_start_is_given_up() -> None:
    # the group applied its messages in A before (row mode, or cdc-sink rebuild): A's partition starts
    # with a later transaction, so they can never come
    g = gate()
    g.assigned = lambda topic: [0]
    f = Feed(g)
    f.begin(10)
    f.change(B, 0, 1, 10)
    f.end(10, {A: 1, B: 1})
    f.begin(20)
    f.change(A, 0, 2, 20)
    f.change(B, 0, 3, 20)
    f.end(20, {A: 1, B: 1})
    cut = g.cut()
    assert cut is not None
    assert [t.commit_lsn for t in g.dropped] == [10]
    assert sorted(keys(cut)) == [(A, 0, 2), (B, 0, 1), (B, 0, 3)]
    assert lsns(cut) == [20]
    assert cut.positions[TX] == 4


def test_a_transaction_is_not_given_up_while_a_partition_may_still_bring_its_messages() -> None:
    g = gate()
    g.assigned = lambda topic: [0, 1]
    f = Feed(g)
    f.begin(10)
    f.end(10, {A: 1})
    f.begin(20)
    f.change(A, 0, 2, 20)  # partition 0 is past it; partition 1 has brought nothing yet
    f.end(20, {A: 1})
    assert g.cut() is None
    assert g.dropped == []


def test_records_of_an_earlier_stream_after_a_later_ones_stop_the_sink() -> None:
    g = gate()
    f = Feed(g)
    f.begin(10, stream=S1)
    f.end(10, {A: 1}, stream=S1)
    f.begin(5, stream=S2)
    with pytest.raises(SinkError, match="two cdc-source processes"):
        f.begin(11, stream=S1)


def test_what_the_head_transaction_lacks() -> None:
    g = gate(limit=2)
    f = Feed(g)
    f.begin(10)
    f.change(A, 0, 1, 10)
    for key, lsn in ((2, 20), (3, 30), (4, 40)):
        f.change(A, 0, key, lsn)
    f.change(B, 0, 5, 10)
    assert g.lacking() is None
    f.end(10, {A: 1, B: 2})
    assert g.lacking() == {B: 1}
