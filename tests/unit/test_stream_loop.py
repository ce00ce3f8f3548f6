"""The source's stream loop against in-memory fakes of the replication cursor and the producer: the
slot is confirmed only past what Kafka acknowledged, a full producer queue pauses reading, a stop
confirms what was acknowledged and nothing more."""

import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from pg_kafka_cdc.common.settings import Settings
from pg_kafka_cdc.common.signals import StopFlag
from source_connector.confirm import Confirmer
from source_connector.ports import DeliveryCallback, Headers
from source_connector.publisher import Publisher
from source_connector.state import SourceState
from source_connector.stream import Stream
from tests.unit.test_events import builder, table
from tests.unit.wal2json_messages import bare, begin, change, commit, text

STATE_TOPIC = "cdc._cdc_source_state"


@dataclass
class Message:
    payload: bytes
    data_start: int


@dataclass
class FakeCursor:
    """Hands out `messages`, then nothing; `on_empty` runs when they are used up (a SIGTERM)."""

    messages: list[Message]
    on_empty: Callable[[], None]
    before_read: Callable[[], None] = lambda: None
    wal_end: int = 0
    feedback: list[tuple[int, int]] = field(default_factory=list)
    command: str = ""
    sockets: tuple[socket.socket, socket.socket] = field(default_factory=socket.socketpair)

    def start_replication_expert(self, command: str, decode: bool, status_interval: int) -> None:
        self.command = command

    def read_message(self) -> Message | None:
        self.before_read()
        if not self.messages:
            self.on_empty()
            return None
        message = self.messages.pop(0)
        self.wal_end = max(self.wal_end, message.data_start)
        return message

    def send_feedback(self, write_lsn: int = 0, flush_lsn: int = 0, force: bool = False) -> None:
        self.feedback.append((write_lsn, flush_lsn))

    def fileno(self) -> int:
        return self.sockets[0].fileno()

    def flushed(self) -> list[int]:
        return [flush for _, flush in self.feedback if flush]


class FakeConnection:
    def __init__(self, cursor: FakeCursor) -> None:
        self._cursor = cursor
        self.closed = False

    def cursor(self) -> FakeCursor:
        return self._cursor

    def close(self) -> None:
        self.closed = True
        for s in self._cursor.sockets:
            s.close()


@dataclass
class FakeProducer:
    """Delivers on poll/flush, unless `paused`; refuses more than `room` queued messages."""

    room: int = 1_000_000
    paused: bool = False
    queued: list[tuple[str, bytes | None, bytes | None, int, DeliveryCallback | None]] = field(
        default_factory=list
    )
    delivered: list[tuple[str, bytes | None, bytes | None, int]] = field(default_factory=list)
    full_count: int = 0
    on_full: Callable[["FakeProducer"], None] = lambda producer: None

    def produce(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int = -1,
        on_delivery: DeliveryCallback | None = None,
        headers: Headers | None = None,
    ) -> None:
        if len(self.queued) >= self.room:
            self.full_count += 1
            self.on_full(self)
            raise BufferError("queue full")
        self.queued.append((topic, value, key, partition, on_delivery))

    def poll(self, timeout: float = 0) -> int:
        if self.paused:
            return 0
        done, self.queued = self.queued, []
        for topic, value, key, partition, callback in done:
            self.delivered.append((topic, value, key, partition))
            if callback is not None:
                callback(None, None)
        return len(done)

    def flush(self, timeout: float = -1) -> int:
        self.poll()
        return len(self.queued)

    def __len__(self) -> int:
        return len(self.queued)

    def changes(self) -> list[dict[str, Any]]:
        return [orjson.loads(v) for t, v, _, _ in self.delivered if t != STATE_TOPIC and v is not None]


def transaction(xid: int, start: int, ids: list[int]) -> Iterator[Message]:
    """B, one insert per id, C; positions from `start` upwards, the commit ending at start + 0x100."""
    end = f"0/{start + 0x100:X}"
    yield Message(begin(xid=xid, lsn=f"0/{start + 0x90:X}", nextlsn=end), start)
    for i, key in enumerate(ids, 1):
        columns = [("id", "bigint", bare(key)), ("n", "numeric(12,2)", bare("1.50")), ("big", "text", text("x"))]
        yield Message(change("I", columns=columns, xid=xid, lsn=f"0/{start + i:X}"), start + i)
    yield Message(commit(xid=xid, lsn=f"0/{start + 0x90:X}", nextlsn=end), start + 0x90)


def stream_of(producer: FakeProducer, stop: StopFlag, start: int = 0x1000) -> Stream:
    state = SourceState("cdc_slot", "shop", "1", "done", start, start, start)
    events, _ = builder(table())
    publisher = Publisher(producer, stop)
    settings = Settings("", "", "", "cdc", ())
    return Stream(
        settings, "cdc_slot", ["public.probe"], events, publisher, Confirmer(producer, state, STATE_TOPIC), stop
    )


def run(stream: Stream, cursor: FakeCursor) -> None:
    stream.run(FakeConnection(cursor))


def test_every_row_is_published_in_order_and_the_commit_is_confirmed() -> None:
    stop, producer = StopFlag(), FakeProducer()
    messages = [*transaction(731, 0x2000, [1, 2, 3]), *transaction(732, 0x3000, [4])]
    count = len(messages)
    cursor = FakeCursor(messages, stop.set)
    stream = stream_of(producer, stop)
    run(stream, cursor)
    assert [c["after"]["id"] for c in producer.changes()] == [1, 2, 3, 4]
    assert [c["op"] for c in producer.changes()] == ["c"] * 4
    assert 'START_REPLICATION SLOT "cdc_slot" LOGICAL 0/1000' in cursor.command
    assert cursor.flushed()[-1] == 0x3100  # the end of the last commit
    assert stream.transactions == 2 and stream.messages == count


def test_nothing_is_confirmed_past_what_kafka_did_not_acknowledge() -> None:
    stop, producer = StopFlag(), FakeProducer(paused=True)
    cursor = FakeCursor(list(transaction(731, 0x2000, [1, 2])), lambda: None)
    while_unacknowledged: list[tuple[int, int]] = []
    idle_reads = [0]

    def later() -> None:  # idle reads for a while (the stream confirms twice a second), then Kafka answers
        idle_reads[0] += 1
        if idle_reads[0] <= 3:
            stop.wait(0.6)
            return
        while_unacknowledged[:] = list(cursor.feedback)
        producer.paused = False
        stop.set()

    cursor.on_empty = later
    run(stream_of(producer, stop), cursor)
    assert all(flush <= 0x1000 for _, flush in while_unacknowledged), while_unacknowledged
    assert cursor.flushed()[-1] == 0x2100  # acknowledged at last, then confirmed


def test_a_full_queue_pauses_reading_until_kafka_takes_more() -> None:
    stop, producer = StopFlag(), FakeProducer(room=2)
    reads: list[int] = []
    cursor = FakeCursor(list(transaction(731, 0x2000, [1, 2, 3, 4, 5])), stop.set)
    cursor.before_read = lambda: reads.append(len(producer.queued))
    run(stream_of(producer, stop), cursor)
    assert producer.full_count > 0
    assert max(reads) <= 2  # never read on while the queue was over its room
    assert [c["after"]["id"] for c in producer.changes()] == [1, 2, 3, 4, 5]
    assert cursor.flushed()[-1] == 0x2100


def test_a_stop_in_the_middle_of_a_transaction_confirms_only_the_transactions_before_it() -> None:
    stop, producer = StopFlag(), FakeProducer()
    first = list(transaction(731, 0x2000, [1]))
    second = list(transaction(732, 0x3000, [2, 3]))[:-1]  # its commit is never read
    cursor = FakeCursor([*first, *second], stop.set)
    run(stream_of(producer, stop), cursor)
    assert cursor.flushed()[-1] == 0x2100


def test_a_transaction_without_row_changes_is_reported() -> None:
    """ATTACH PARTITION commits without row changes: the catalog forgets the tables it found out of scope."""
    stop, producer = StopFlag(), FakeProducer()
    empty = [
        Message(begin(xid=740, lsn="0/2090", nextlsn="0/2100"), 0x2000),
        Message(commit(xid=740, lsn="0/2090", nextlsn="0/2100"), 0x2090),
    ]
    cursor = FakeCursor([*transaction(739, 0x1000, [1]), *empty], stop.set)
    stream = stream_of(producer, stop)
    seen: list[int] = []
    stream.empty_commit = lambda: seen.append(stream.transactions)
    run(stream, cursor)
    assert seen == [1], "once, for the second transaction only"


def test_a_read_transaction_is_settling_until_its_commit_is_confirmed() -> None:
    """What makes the stream confirm at once when it runs dry, instead of at its half-second pace."""
    producer = FakeProducer(paused=True)
    confirmer = Confirmer(
        producer, SourceState("cdc_slot", "shop", "1", "done", 0x1000, 0x1000, 0x1000), STATE_TOPIC
    )
    cursor = FakeCursor([], lambda: None)
    try:
        settles(confirmer, producer, cursor)
    finally:
        FakeConnection(cursor).close()


def settles(confirmer: Confirmer, producer: FakeProducer, cursor: FakeCursor) -> None:
    assert not confirmer.settling()
    tx = confirmer.tracker.begin(731, 0x2100)
    tx.outstanding += 1
    producer.produce("cdc.public.probe", b"{}", b"{}", on_delivery=tx.ack)
    confirmer.tracker.commit(tx)
    assert confirmer.settling(), "in flight"
    producer.paused = False
    producer.poll()
    confirmer.step(cursor, 0x2090, idle=True)  # queues the state record covering 0/2100
    assert confirmer.settling(), "acknowledged, not yet confirmed"
    producer.poll()
    confirmer.step(cursor, 0x2090, idle=True)
    assert cursor.flushed()[-1] == 0x2100
    assert not confirmer.settling()
