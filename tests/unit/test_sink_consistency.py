"""The `--consistency transaction` loop (sink_connector/consistent.py) against the in-memory fakes of
Kafka and the target (tests/unit/sink_fakes.py): pieces of a transaction in one target
transaction, offsets stored with the rows, starting over after a failure; and the one-member
verdicts of sole_member.py."""

from dataclasses import dataclass, field
from typing import Any, cast

import psycopg2
import pytest
from confluent_kafka import TopicPartition as KafkaPartition

from pg_kafka_cdc.common.errors import SinkError
from pg_kafka_cdc.common.signals import StopFlag
from pg_kafka_cdc.common.tables import TableName
from schemas import transactions
from sink_connector.bookkeeping import ConsistentPoint, TopicPartition
from sink_connector.consistent import TransactionLoop
from sink_connector.group_members import Member
from sink_connector.handover import CopySnapshot
from sink_connector.metrics import SinkStats
from sink_connector.plan import TopicTables
from sink_connector.sole_member import missing_partitions, others, refusal
from sink_connector.transaction_gate import TransactionGate, consumed
from tests.unit.sink_fakes import PREFIX, FakeMessage, FakeTarget, Partitions, topic_of

PERSON = TableName("public", "person")
TX = (transactions.transaction_topic(PREFIX), 0)
P0, P1 = (topic_of("person"), 0), (topic_of("person"), 1)


class Target(FakeTarget):
    """FakeTarget with the consistent point."""

    def __init__(self, events: list[str]) -> None:
        super().__init__(events)
        self.point: ConsistentPoint | None = None
        self.storing: ConsistentPoint | None = None
        self.fail_apply = 0  # applies to fail with a lost connection

    def consistent_point(self) -> ConsistentPoint | None:
        return self.point

    def store_consistency(self, point: ConsistentPoint) -> None:
        self.events.append("store consistency")
        self.storing = point

    def commit(self) -> None:
        super().commit()
        if self.storing is not None:
            self.point, self.storing = self.storing, None

    def rollback(self) -> None:
        self.storing = None
        super().rollback()

    def apply(self, batch: Any) -> None:
        if self.fail_apply:
            self.fail_apply -= 1
            raise psycopg2.OperationalError("server closed the connection unexpectedly")
        super().apply(batch)

    def explain(self, exc: BaseException, table: TableName | None = None) -> str | None:
        return None


@dataclass
class Kafka:
    """KafkaLog as the loop uses it: hands out the batches in turn."""

    events: list[str]
    batches: list[list[FakeMessage]] = field(default_factory=list)
    expected: dict[TopicPartition, int | None] = field(default_factory=dict)
    generation: int = 0
    seeks: list[tuple[TopicPartition, int | None]] = field(default_factory=list)
    paused: list[TopicPartition] = field(default_factory=list)
    consumer: Any = None

    def __post_init__(self) -> None:
        self.consumer = self

    def consume(self, count: int, wait: float) -> list[FakeMessage]:
        return self.batches.pop(0) if self.batches else []

    def usable(self, messages: list[FakeMessage]) -> list[FakeMessage]:
        return messages

    def seek(self, tp: TopicPartition, offset: int | None) -> bool:
        self.seeks.append((tp, offset))
        return True

    def pause(self, partitions: list[TopicPartition], resume: bool = False) -> None:
        if resume:
            self.paused = [p for p in self.paused if p not in partitions]
        else:
            self.paused += partitions

    def commit(self, *, offsets: list[KafkaPartition], asynchronous: bool) -> None:
        self.events.append("kafka commit")


class Records:
    """BEGIN and END records on the transaction topic."""

    def __init__(self) -> None:
        self.offset = 0

    def record(self, value: bytes) -> FakeMessage:
        m = FakeMessage(TX[0], 0, self.offset, b"k", value)
        self.offset += 1
        return m

    def begin(self, lsn: int) -> FakeMessage:
        return self.record(transactions.encode_begin("S1", 900, lsn, 1_700_000_000_000_000))

    def end(self, lsn: int, n: int) -> FakeMessage:
        counts = {topic_of("person"): ("public.person", n)}
        return self.record(transactions.encode_end("S1", 900, lsn, 1_700_000_000_000_000, n + 1, counts))


class Loop:
    def __init__(self, batch_size: int = 100) -> None:
        self.events: list[str] = []
        self.target = Target(self.events)
        self.kafka = Kafka(self.events)
        self.stop = StopFlag()
        self.reconnects: list[str] = []
        gate = TransactionGate(TX, consumed([topic_of("person")]), batch_size, 1 << 30)
        self.loop = TransactionLoop(
            cast(Any, self.target),
            self.target,
            cast(Any, self.kafka),
            TopicTables(PREFIX),
            SinkStats(),
            gate,
            lambda exc, delay: self.reconnects.append(str(exc)),
            lambda: None,
            batch_size,
            1 << 30,
            0.0,
            pause_at=0,
        )
        self.kafka.expected.update(self.target.claim([P0, P1, TX]))

    def run(self, *batches: list[FakeMessage]) -> None:
        self.kafka.batches = list(batches)
        self.kafka.generation = self.loop.generation = 0
        self.loop.point = self.target.point
        for _ in batches:
            messages = self.kafka.consume(0, 0)
            self.loop.feed(messages)
            assert self.loop.drain(self.stop)
            self.loop.flow()

    def rows(self) -> dict[int, str]:
        return {i: row["n"] for i, row in self.target.db.rows.get(PERSON, {}).items()}


def test_pieces_of_a_large_transaction_commit_once_with_their_offsets() -> None:
    loop = Loop(batch_size=2)
    s, r = Partitions(), Records()
    changes = [s.upsert("person", i, f"v{i}", partition=i % 2, seq=i + 1, commit_lsn=500) for i in range(5)]
    loop.run([r.begin(500), *changes[:3]], [changes[3], changes[4]])
    assert loop.loop.open is not None and "commit" not in loop.events
    assert loop.target.tx is not None and loop.rows() == {}  # nothing committed yet
    loop.run([r.end(500, 5)])
    assert loop.events.count("begin") == 1 and loop.events.count("commit") == 1
    assert loop.events.count("fence") == 1
    assert loop.rows() == {i: f"v{i}" for i in range(5)}
    assert loop.target.db.offsets == {P0: 3, P1: 2, TX: 2}
    assert loop.kafka.expected == {P0: 3, P1: 2, TX: 2}
    assert loop.target.point is not None and loop.target.point.commit_lsn == 500 and loop.target.point.reached


def test_a_connection_lost_inside_a_transaction_starts_over_from_the_stored_offsets() -> None:
    loop = Loop()
    s, r = Partitions(), Records()
    first = [r.begin(500), s.upsert("person", 1, "a", seq=1, commit_lsn=500), r.end(500, 1)]
    loop.run(first)
    assert loop.rows() == {1: "a"}
    loop.target.fail_apply = 1
    second = [r.begin(600), s.upsert("person", 2, "b", seq=1, commit_lsn=600), r.end(600, 1)]
    loop.run(second)
    assert loop.reconnects and loop.rows() == {1: "a"}
    assert sorted(loop.kafka.seeks) == sorted([(P0, 1), (P1, None), (TX, 2)])
    assert loop.loop.gate.buffered == 0
    loop.run(second)  # read again
    assert loop.rows() == {1: "a", 2: "b"} and loop.target.db.offsets[TX] == 4


def test_a_rejected_transaction_stops_the_sink_naming_it() -> None:
    loop = Loop()
    s, r = Partitions(), Records()
    with pytest.raises(SinkError, match="applying source transaction 900:500 of stream S1 failed"):
        loop.run([r.begin(500), s.upsert("person", 1, "bad", seq=1, commit_lsn=500), r.end(500, 1)])
    assert "commit" not in loop.events


def test_a_transaction_completed_later_is_paused_behind_the_head() -> None:
    loop = Loop(batch_size=1)
    s, r = Partitions(), Records()
    head = s.upsert("person", 1, "a", partition=0, seq=1, commit_lsn=500)
    later = [s.upsert("person", 2 + i, "b", partition=1, seq=1 + i, commit_lsn=600) for i in range(3)]
    loop.run([r.begin(500), *later])
    assert loop.kafka.paused == [P1]
    loop.run([r.end(500, 1), head])
    assert loop.rows() == {1: "a"}
    assert loop.kafka.paused == [P1]  # waiting for their records still: the transaction topic goes on
    loop.run([r.begin(600), r.end(600, 3)])
    assert loop.kafka.paused == [] and loop.rows() == {1: "a", 2: "b", 3: "b", 4: "b"}


def test_one_member_verdicts() -> None:
    me = Member("g", "cdc-sink", "/10.0.0.1", "sink-1", (("cdc.public.a", 0),))
    other = Member("g", "cdc-sink", "/10.0.0.2", None, (("cdc.public.a", 1),))
    assert others([me, other], "sink-1") == [other]
    assert missing_partitions([("cdc.public.a", 0)], ["cdc.public.a", "cdc.transaction"], lambda t: range(2)) == [
        ("cdc.public.a", 1),
        ("cdc.transaction", 0),
        ("cdc.transaction", 1),
    ]
    assert refusal("g", [other]) == (
        "--consistency transaction needs one cdc-sink to hold every partition: group g has another member holding "
        "cdc.public.a[1] (cdc-sink on /10.0.0.2); run a single cdc-sink in this group"
    )


def test_the_consistent_point_waits_for_the_stream_to_pass_the_bulk_copies() -> None:
    loop = Loop()
    loop.target.snapshots[PERSON] = CopySnapshot.parse("1000:1000:", 550)  # holds every commit before 550
    s, r = Partitions(), Records()
    loop.run([r.begin(500), s.upsert("person", 1, "a", seq=1, commit_lsn=500), r.end(500, 1)])
    point = loop.target.point
    assert point is not None and point.commit_lsn == 500 and not point.reached
    assert loop.rows() == {}  # the copy has it
    loop.run([r.begin(600), s.upsert("person", 2, "b", seq=1, commit_lsn=600), r.end(600, 1)])
    point = loop.target.point
    assert point is not None and point.commit_lsn == 600 and point.reached and point.transactions == 2
    assert loop.rows() == {2: "b"}
