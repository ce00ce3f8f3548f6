"""`--consistency transaction`: which consumed changes may be applied now so that the target never
holds part of a source transaction, and source transactions reach it in commit order. Pure.

The gate keeps the change messages of each partition in a FIFO queue and the records of the
transaction topic (schemas/transactions.py) in another, and releases *cuts*: per-partition prefixes
of the queues, with the next offsets they move the partitions to.

- Transactions are applied in the order of the transaction topic (commit order). The head
  transaction H is the first one read there and not applied yet. A change belongs to H when its
  (stream, commit_lsn) is H's. H is complete when its END was read and, for each topic the sink
  consumes, the messages of H received from that topic equal the END's count (more is an error).
- A change that belongs to no transaction (a snapshot read, a truncate before a snapshot, a message
  without a position) is released as soon as it is at the head of its queue; so is a change of a
  transaction ordering before H (same stream, lower commit LSN: a transaction with no records) or
  of a stream the transaction topic showed before H's. Other changes wait.
- A cut holds every complete transaction in order from H on (up to `limit` messages, at least one
  transaction) and the free changes at the queue heads. When H is not complete but its messages at
  the heads reach `limit` (or the buffered bytes reach `byte_limit`), the gate releases a *piece*
  of H, marked partial: the caller applies pieces inside one target transaction and commits it
  with the cut that completes H, so memory stays bounded by the batch size, not the transaction's.
- `blocked()`: the partitions whose head waits for a later transaction than H (the caller may pause
  them while the gate holds many messages); `reset()` forgets everything.
"""

import re
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from pg_kafka_cdc.common.errors import SinkError
from schemas import transactions
from schemas.transactions import TransactionRecord
from sink_connector.bookkeeping import TopicPartition
from sink_connector.changes import Change

Identity = tuple[str, int]  # (stream, commit_lsn) of a source transaction

FREE, HEAD, WAIT = 0, 1, 2


class Transaction(NamedTuple):
    """A source transaction as its records tell it."""

    stream: str
    tx_id: int | None
    commit_lsn: int
    ts_us: int | None

    @property
    def identity(self) -> Identity:
        return self.stream, self.commit_lsn

    def describe(self) -> str:
        return f"source transaction {transactions.transaction_id(self.tx_id, self.commit_lsn)} of stream {self.stream}"


@dataclass
class _Pending:
    """A transaction read on the transaction topic, not applied yet."""

    tx: Transaction
    begin_offset: int
    end_offset: int | None = None
    counts: dict[str, int] | None = None  # from the END


@dataclass
class Cut:
    """Changes to apply now, per-partition prefixes of the queues, in queue order per partition."""

    changes: list[Change]
    positions: dict[TopicPartition, int]  # the next offset of every partition the cut moves
    transactions: list[Transaction]  # completed by this cut, in commit order
    partial: bool  # a piece of the head transaction: keep the target transaction open

    @property
    def last(self) -> Transaction | None:
        return self.transactions[-1] if self.transactions else None


@dataclass
class TransactionGate:
    tx_topic: TopicPartition
    consumes: Callable[[str], bool]  # whether the sink consumes a change topic
    limit: int  # most messages per cut (--batch-size)
    byte_limit: int  # buffered bytes that make the head transaction go in pieces (--batch-bytes)
    # the last transaction applied per stream, and the streams in the order the transaction topic
    # showed them (earlier ones are done with)
    done: dict[str, int] = field(default_factory=dict)
    streams: list[str] = field(default_factory=list)
    queues: dict[TopicPartition, deque[tuple[Change, int]]] = field(default_factory=dict)
    records: deque[_Pending] = field(default_factory=deque)
    skipped_records: int = -1  # the offset past the last record not belonging to a pending transaction
    # the messages queued of each transaction, per partition
    received: dict[Identity, dict[TopicPartition, int]] = field(default_factory=dict)
    released: Counter[str] = field(default_factory=Counter)  # of the head transaction, per topic
    buffered: int = 0
    buffered_bytes: int = 0
    # the assigned partitions of a topic: with it, a head transaction whose missing messages lie
    # before the offsets the sink started from is given up (stale()) and named in `dropped`
    assigned: Callable[[str], list[int]] | None = None
    dropped: list[Transaction] = field(default_factory=list)

    # --- input ------------------------------------------------------------------------------------

    def push(self, change: Change, size: int) -> None:
        """A change message, in partition order."""
        tp = (change.topic, change.partition)
        queue = self.queues.get(tp)
        if queue is None:
            queue = self.queues[tp] = deque()
        queue.append((change, size))
        self.buffered += 1
        self.buffered_bytes += size
        ident = identity(change)
        if ident is not None:
            counter = self.received.get(ident)
            if counter is None:
                self.received[ident] = {tp: 1}
            else:
                counter[tp] = counter.get(tp, 0) + 1

    def push_record(self, offset: int, record: TransactionRecord) -> None:
        """A record of the transaction topic, in offset order."""
        source = record["source"]
        tx = Transaction(source["stream"], source["txId"], source["commit_lsn"], source["ts_us"])
        if tx.stream not in self.streams:
            self.streams.append(tx.stream)
        elif tx.stream != self.streams[-1]:
            raise SinkError(
                f"the transaction topic holds records of stream {tx.stream} after records of stream "
                f"{self.streams[-1]}: two cdc-source processes (two slots, or two servers) write to the same topics; "
                "run one cdc-source per --topic-prefix"
            )
        last = self.done.get(tx.stream)
        if last is not None and tx.commit_lsn <= last:  # applied already (the topic holds it twice)
            self._skip_record(offset)
            return
        if record["status"] == transactions.BEGIN:
            if self.records and self.records[-1].tx.identity == tx.identity:
                self._skip_record(offset)  # a BEGIN read twice
                return
            self.records.append(_Pending(tx, offset))
            return
        pending = self.records[-1] if self.records and self.records[-1].tx.identity == tx.identity else None
        if pending is None:  # an END whose BEGIN came before the offsets the sink started from
            pending = _Pending(tx, offset)
            self.records.append(pending)
        if pending.end_offset is None:
            pending.end_offset, pending.counts = offset, transactions.counts(record)
        else:
            self._skip_record(offset)

    def _skip_record(self, offset: int) -> None:
        if not self.records:
            self.skipped_records = max(self.skipped_records, offset + 1)

    # --- state ------------------------------------------------------------------------------------

    @property
    def head(self) -> _Pending | None:
        return self.records[0] if self.records else None

    def state(self, change: Change, head: Transaction | None) -> int:
        """FREE, HEAD (belongs to the head transaction) or WAIT."""
        ident = identity(change)
        if ident is None:
            return FREE
        stream, commit_lsn = ident
        if head is not None:
            if stream == head.stream:
                if commit_lsn == head.commit_lsn:
                    return HEAD
                return FREE if commit_lsn < head.commit_lsn else WAIT
            return FREE if self.before(stream, head.stream) else WAIT
        last = self.done.get(stream)
        if last is not None and commit_lsn <= last:
            return FREE
        newest = self.streams[-1] if self.streams else None
        return FREE if newest is not None and stream != newest and self.before(stream, newest) else WAIT

    def before(self, stream: str, other: str) -> bool:
        """Whether `stream` is done with when `other` is read: it came first on the transaction topic,
        or (one the topic did not show since the sink started) it is a slot of the same server
        created earlier."""
        if stream in self.streams and other in self.streams:
            return self.streams.index(stream) < self.streams.index(other)
        return created_before(stream, other)

    def complete(self, pending: _Pending) -> bool:
        """Every message of the transaction in the consumed topics received (released or queued)."""
        if pending.counts is None:
            return False
        have: dict[str, int] = dict(self.released) if self.released else {}
        for (topic, _), n in self.received.get(pending.tx.identity, {}).items():
            have[topic] = have.get(topic, 0) + n
        whole = True
        counts = pending.counts
        for topic in counts.keys() | have.keys() if have.keys() - counts.keys() else counts:
            if not self.consumes(topic):
                continue
            want, got = counts.get(topic, 0), have.get(topic, 0)
            if got > want:
                raise SinkError(
                    f"{pending.tx.describe()} has {got} messages in topic {topic}, more than the {want} its END "
                    "record counts: the topics do not match the transaction records (were they written by "
                    "another source?); the transaction was not applied"
                )
            whole = whole and got == want
        return whole

    def outstanding(self, pending: _Pending) -> int:
        """Messages of the transaction queued now."""
        return sum(self.received.get(pending.tx.identity, {}).values())

    def at_heads(self, head: Transaction, most: int) -> int:
        """The messages of `head` reachable at the queue heads (through free ones), up to `most`."""
        found = 0
        for tp in self.received.get(head.identity, {}):
            for change, _ in self.queues[tp]:
                s = self.state(change, head)
                if s == WAIT:
                    break
                if s == HEAD:
                    found += 1
                    if found >= most:
                        return found
        return found

    def blocked(self) -> list[TopicPartition]:
        """The partitions whose head waits for a later transaction than the head one."""
        pending = self.head
        head = None if pending is None else pending.tx
        return [tp for tp, q in self.queues.items() if q and self.state(q[0][0], head) == WAIT]

    def stale(self, assigned: Callable[[str], list[int]]) -> bool:
        """The head transaction can never complete from what comes: its END is read, and every
        assigned partition of each topic it still lacks messages in holds a later transaction at its
        queue head, so its missing messages lie before the offsets the sink started from (applied
        by the group in row mode, or by `cdc-sink rebuild`, or deleted by retention)."""
        pending = self.head
        lacking = self.lacking()
        if pending is None or not lacking:
            return False
        for topic in lacking:
            partitions = assigned(topic)
            if not partitions:
                return False
            for p in partitions:
                queue = self.queues.get((topic, p))
                if not queue or self.state(queue[0][0], pending.tx) != WAIT:
                    return False
        return True

    def lacking(self) -> dict[str, int] | None:
        """What the head transaction still lacks: messages per consumed topic (None: its END not read)."""
        pending = self.head
        if pending is None or pending.counts is None:
            return None
        have: Counter[str] = Counter(self.released)
        for (topic, _), n in self.received.get(pending.tx.identity, {}).items():
            have[topic] += n
        return {t: n - have[t] for t, n in pending.counts.items() if self.consumes(t) and have[t] < n}

    def drop_head(self) -> Transaction:
        """Give up the stale head transaction (see stale()): its received messages go with the next
        cut as changes of an earlier transaction, and the cut moves the transaction topic past it."""
        pending = self.records.popleft()
        self.received.pop(pending.tx.identity, None)
        self.released.clear()
        self.done[pending.tx.stream] = pending.tx.commit_lsn
        offset = pending.end_offset if pending.end_offset is not None else pending.begin_offset
        if not self.records:
            self.skipped_records = max(self.skipped_records, offset + 1)
        self.dropped.append(pending.tx)
        return pending.tx

    def reset(self, done: dict[str, int]) -> None:
        """Forget everything consumed; `done`: the last transaction applied per stream (committed)."""
        self.done = dict(done)
        self.streams = [s for s in self.streams if s in done] + [s for s in done if s not in self.streams]
        self.queues.clear()
        self.records.clear()
        self.skipped_records = -1
        self.received.clear()
        self.released.clear()
        self.buffered = self.buffered_bytes = 0

    # --- output -----------------------------------------------------------------------------------

    def cut(self) -> Cut | None:
        """The changes to apply next, or None when nothing can go yet."""
        out: list[Change] = []
        positions: dict[TopicPartition, int] = {}
        done: list[Transaction] = []
        partial = False
        heads: list[TopicPartition] = list(self.queues)  # the queues whose head may have changed
        while True:
            pending = self.head
            room = self.limit - len(out)
            if pending is None or room <= 0:
                self._release(out, positions, None, FREE, room, heads)
                break
            head = pending.tx
            whole = self.complete(pending)
            need = self.outstanding(pending)
            if whole and need <= room:
                mine = list(self.received.get(head.identity, {}))
                # the head's messages, and the free ones before and among them
                self._release(out, positions, head, HEAD, need, [*heads, *(tp for tp in mine if tp not in heads)])
                heads = mine
                if self.outstanding(pending) == 0:
                    self._finish(pending, positions)
                    done.append(head)
                    continue
                partial = True  # some are stuck behind waiting messages: they come later
                break
            self._release(out, positions, head, FREE, room, heads)
            room = self.limit - len(out)
            if done:
                break  # the next cut starts it
            if not whole and self.assigned is not None and not self.released and self.stale(self.assigned):
                self.drop_head()
                heads = list(self.queues)
                continue
            if whole or self.at_heads(head, self.limit) >= self.limit or self.buffered_bytes >= self.byte_limit:
                self._release(out, positions, head, HEAD, room, list(self.received.get(head.identity, {})))
            partial = bool(self.released)
            break
        if self.skipped_records >= 0 and not self.records:
            positions[self.tx_topic] = max(positions.get(self.tx_topic, 0), self.skipped_records)
            self.skipped_records = -1
        if not out and not done and not positions:
            return None
        return Cut(out, positions, done, partial)

    def _release(
        self,
        out: list[Change],
        positions: dict[TopicPartition, int],
        head: Transaction | None,
        kind: int,
        most: int,
        queues: Iterable[TopicPartition],
    ) -> None:
        """Pop free changes off the heads of `queues` (kind FREE), or the head transaction's and the
        free ones among them (kind HEAD); at most `most` of that kind."""
        if most <= 0:
            return
        stream, commit_lsn = (None, None) if head is None else head.identity
        released = self.released
        for tp in queues:
            queue = self.queues.get(tp)
            if not queue:
                continue
            moved = False
            while queue:
                change, size = queue[0]
                if change.xid is None or change.op == "r" or change.stream is None or change.commit_lsn is None:
                    s = FREE
                elif change.commit_lsn == commit_lsn and change.stream == stream:
                    s = HEAD
                else:
                    s = self.state(change, head)
                if s == WAIT or (s == HEAD and kind != HEAD):
                    break
                queue.popleft()
                out.append(change)
                moved = True
                self.buffered -= 1
                self.buffered_bytes -= size
                if s == HEAD or kind == FREE:
                    most -= 1
                if s != FREE or (ident := identity(change)) is not None:
                    ident = (change.stream or "", change.commit_lsn or 0)
                    self._forget(ident, tp)
                    if s == HEAD:
                        released[change.topic] += 1
                if most <= 0:
                    break
            if moved:
                positions[tp] = out[-1].offset + 1
            if most <= 0:
                break

    def _forget(self, ident: Identity, tp: TopicPartition) -> None:
        counter = self.received.get(ident)
        if counter is not None:
            n = counter.get(tp, 0) - 1
            if n > 0:
                counter[tp] = n
            else:
                counter.pop(tp, None)
            if not counter:
                del self.received[ident]

    def _finish(self, pending: _Pending, positions: dict[TopicPartition, int]) -> None:
        self.records.popleft()
        self.received.pop(pending.tx.identity, None)
        self.released.clear()
        self.done[pending.tx.stream] = pending.tx.commit_lsn
        assert pending.end_offset is not None
        positions[self.tx_topic] = pending.end_offset + 1


def created_before(stream: str, other: str) -> bool:
    """Streams `<system identifier>:<slot>:<LSN the slot was created at, hex>` (schemas.envelope) of
    one server: the first slot was created before the other. Streams of two servers do not compare."""
    mine, theirs = stream.split(":"), other.split(":")
    if len(mine) != 3 or len(theirs) != 3 or mine[0] != theirs[0]:
        return False
    try:
        return int(mine[2], 16) < int(theirs[2], 16)
    except ValueError:
        return False


def identity(change: Change) -> Identity | None:
    """The source transaction a change belongs to; None for snapshot reads and changes without a
    position (they belong to none)."""
    if change.xid is None or change.op == "r" or change.stream is None or change.commit_lsn is None:
        return None
    return change.stream, change.commit_lsn


def consumed(subscription: Iterable[str]) -> Callable[[str], bool]:
    """Whether a subscription (topics and `^` regular expressions) takes a topic, remembered per topic."""
    entries = list(subscription)
    names = {s for s in entries if not s.startswith("^")}
    patterns = [re.compile(s) for s in entries if s.startswith("^")]
    known: dict[str, bool] = {}

    def consumes(topic: str) -> bool:
        found = known.get(topic)
        if found is None:
            found = known[topic] = topic in names or any(p.search(topic) for p in patterns)
        return found

    return consumes
