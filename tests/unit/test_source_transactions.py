"""Transaction metadata of the source (--transaction-metadata): the BEGIN and END records the stream
loop publishes around each transaction, the END's count of messages per topic (row events,
tombstones, truncate events on every partition; what an earlier run published, after a restart),
and nothing for a transaction without messages in the topics."""

import json
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator

import schemas
from pg_kafka_cdc.common.errors import ConfigError, SourceError
from pg_kafka_cdc.common.signals import StopFlag
from schemas import transactions
from schemas.codec import position
from schemas.envelope import TOMBSTONE_HEADER
from schemas.partitioner import partition_for
from source_connector import held
from source_connector.change_topics import ChangeTopics
from source_connector.events import Message, TxContext
from source_connector.flush import FlushTracker
from source_connector.ports import DeliveryCallback, Headers
from source_connector.replay import Replay
from source_connector.stream import Stream
from source_connector.transactions import TransactionRecords, message_transaction, tail_counts
from tests.unit.test_events import builder, table
from tests.unit.test_stream_loop import FakeCursor, FakeProducer, run, stream_of
from tests.unit.test_stream_loop import Message as Read
from tests.unit.wal2json_messages import bare, begin, change, commit, text, truncate

PREFIX = "cdc"
RECORDS = "cdc.transaction"
PROBE = "cdc.public.probe"
OTHER = "cdc.public.other"
STATE = "cdc._cdc_source_state"
SCHEMA = json.loads((Path(schemas.__file__).parent / "transaction.schema.json").read_text())
Draft202012Validator.check_schema(SCHEMA)
VALIDATOR = Draft202012Validator(SCHEMA)


class Producer(FakeProducer):
    """The fake producer, keeping each delivered message's headers too."""

    def __init__(self) -> None:
        super().__init__()
        self.headers: list[Headers | None] = []

    def produce(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int = -1,
        on_delivery: DeliveryCallback | None = None,
        headers: Headers | None = None,
    ) -> None:
        super().produce(topic, value, key, partition, on_delivery, headers)
        self.headers.append(headers)

    def published(self) -> list[Message]:
        """What Kafka got, as (topic, key, value, partition, headers), the state topic left out."""
        out = []
        for (topic, value, key, partition), headers in zip(self.delivered, self.headers, strict=True):
            if topic != STATE:
                out.append((topic, key, value, None if partition == -1 else partition, headers))
        return out


def record(message: Message) -> transactions.TransactionRecord:
    topic, key, value, partition, _ = message
    assert topic == RECORDS and partition == 0
    doc = orjson.loads(value or b"null")
    errors = sorted(str(e) for e in VALIDATOR.iter_errors(doc))
    assert not errors, errors
    decoded = transactions.decode(value)
    assert key == transactions.encode_key(decoded["source"]["txId"], decoded["source"]["commit_lsn"])
    return decoded


def at(message: Message) -> tuple[int, int, int]:
    """The message's position in its partition."""
    found = position(message[2], message[4])
    assert found is not None, message
    return found


def records_of(published: list[Message]) -> list[transactions.TransactionRecord]:
    return [record(m) for m in published if m[0] == RECORDS]


def columns(key: int) -> list[Any]:
    return [("id", "bigint", bare(key)), ("n", "numeric(12,2)", bare("1.50")), ("big", "text", text("x"))]


def a_transaction(xid: int, start: int, *changes: bytes) -> list[Read]:
    """B, `changes`, C at positions from `start` on; commit LSN start + 0x90."""
    lsn, end = f"0/{start + 0x90:X}", f"0/{start + 0x100:X}"
    return [
        Read(begin(xid=xid, lsn=lsn, nextlsn=end), start),
        *(Read(c, start + i) for i, c in enumerate(changes, 1)),
        Read(commit(xid=xid, lsn=lsn, nextlsn=end), start + 0x90),
    ]


def insert(key: int, xid: int, table_name: str = "probe") -> bytes:
    return change("I", columns=columns(key), xid=xid, table=table_name, lsn="0/2001")


def update_key(old: int, new: int, xid: int) -> bytes:
    return change("U", columns=columns(new), identity=[("id", "bigint", bare(old))], xid=xid, lsn="0/2002")


def delete(key: int, xid: int) -> bytes:
    return change("D", identity=[("id", "bigint", bare(key))], xid=xid, lsn="0/2003")


def recorded_stream(producer: FakeProducer, stop: StopFlag, *infos: Any, partitions: int = 3) -> Stream:
    stream = stream_of(producer, stop)
    events, _ = builder(*(infos or (table(),)), partitions=partitions)
    stream.builder = events
    stream.records = TransactionRecords(PREFIX, RECORDS)
    stream.records.stream = events.stream
    return stream


def streamed(messages: list[Read], *infos: Any, partitions: int = 3) -> tuple[Stream, list[Message]]:
    stop, producer = StopFlag(), Producer()
    stream = recorded_stream(producer, stop, *infos, partitions=partitions)
    run(stream, FakeCursor(list(messages), stop.set))
    return stream, producer.published()


def transaction_of(message: Message) -> tuple[str, int] | None:
    return message_transaction(message[2], message[4])


# --- the records around a transaction ------------------------------------------------------------


def test_begin_comes_before_the_first_message_and_end_after_the_last_with_the_counts() -> None:
    stream, published = streamed(
        a_transaction(731, 0x2000, insert(1, 731), update_key(1, 2, 731), delete(2, 731), truncate(xid=731))
    )
    assert [m[0] for m in published] == [RECORDS, *[PROBE] * 9, RECORDS]  # c; d, tombstone, c; d, tombstone; 3 t
    first, last = records_of(published)
    assert first["status"] == "BEGIN" and last["status"] == "END"
    assert first["id"] == last["id"] == f"731:{0x2090}"
    assert transactions.counts(last) == {PROBE: 9}
    assert last["data_collections"] == [{"data_collection": "public.probe", "topic": PROBE, "event_count": 9}]
    assert last["event_count"] == 9
    changes = [m for m in published if m[0] == PROBE]
    assert {transaction_of(m) for m in changes} == {(stream.builder.stream, 0x2090)}
    assert last["source"]["seq"] == max(at(m)[1] for m in changes) + 1 and first["source"]["seq"] == 0
    assert [at(m) for m in published] == sorted(at(m) for m in published)
    assert stream.records is not None and stream.records.published == 1


def test_the_truncate_events_of_every_partition_are_counted() -> None:
    _, published = streamed(a_transaction(731, 0x2000, truncate(xid=731)), partitions=5)
    [_, end] = records_of(published)
    assert transactions.counts(end) == {PROBE: 5}
    assert sorted(m[3] or 0 for m in published if m[0] == PROBE) == [0, 1, 2, 3, 4]


def test_each_topic_of_a_multi_table_transaction_has_its_count() -> None:
    _, published = streamed(
        a_transaction(
            731, 0x2000, insert(1, 731), insert(2, 731, "other"), delete(1, 731), insert(3, 731, "other")
        ),
        table(),
        table("other"),
    )
    [_, end] = records_of(published)
    assert transactions.counts(end) == {PROBE: 3, OTHER: 2}
    assert [c["data_collection"] for c in end["data_collections"] or ()] == ["public.other", "public.probe"]


def test_a_transaction_only_on_tables_out_of_scope_gets_no_records() -> None:
    messages = [
        *a_transaction(731, 0x2000, insert(1, 731, "elsewhere")),
        *a_transaction(732, 0x3000, insert(2, 732)),
        *a_transaction(733, 0x4000),  # no change at all (a DDL)
    ]
    _, published = streamed(messages)
    found = records_of(published)
    assert [(r["status"], r["source"]["txId"]) for r in found] == [("BEGIN", 732), ("END", 732)]


def test_without_the_option_no_record_is_published() -> None:
    stop, producer = StopFlag(), Producer()
    stream = stream_of(producer, stop)
    run(stream, FakeCursor(a_transaction(731, 0x2000, insert(1, 731), delete(1, 731)), stop.set))
    assert [m[0] for m in producer.published()] == [PROBE] * 3


def test_the_slot_is_confirmed_only_once_the_end_is_acknowledged() -> None:
    stop, producer = StopFlag(), Producer()
    stream = recorded_stream(producer, stop)
    cursor = FakeCursor(a_transaction(731, 0x2000, insert(1, 731)), stop.set)
    run(stream, cursor)
    assert cursor.flushed()[-1] == 0x2100
    assert stream.confirmer.tracker.in_flight() == 0


# --- after a restart -----------------------------------------------------------------------------


def first_run(messages: list[Read], *infos: Any) -> list[Message]:
    return streamed(messages, *infos)[1]


def held_by(published: list[Message], partitions: int = 3) -> dict[tuple[str, int], tuple[int, int, int]]:
    """The last position of each partition, for `published` as the topics got it."""
    held: dict[tuple[str, int], tuple[int, int, int]] = {}
    for topic, key, value, partition, headers in published:
        p = partition if partition is not None else partition_for(key or b"", partitions)
        here = position(value, headers)
        assert here is not None
        held[(topic, p)] = here
    return held


def in_topics(published: list[Message], since: int) -> dict[int, Counter[str]]:
    found: dict[int, Counter[str]] = {}
    for topic in {m[0] for m in published if m[0] != RECORDS}:
        part = [(m[2], m[4]) for m in published if m[0] == topic]
        counts, _ = tail_counts(part, builder()[0].stream, since)
        for lsn, n in counts.items():
            found.setdefault(lsn, Counter())[topic] += n
    return found


def restarted(messages: list[Read], got: list[Message], since: int = 0x1000) -> list[Message]:
    """The stream read again from the start, the topics holding `got` (an earlier run's, cut)."""
    stop, producer = StopFlag(), Producer()
    stream = recorded_stream(producer, stop)
    held = held_by(got)
    stream.held = lambda: Replay(held, lambda topic: 3)
    stream.held_transactions = lambda lsn: in_topics(got, lsn)
    run(stream, FakeCursor(list(messages), stop.set))
    return producer.published()


def with_ack_order(published: list[Message], lost: set[int]) -> list[Message]:
    """The messages Kafka kept when those at indexes `lost` (and every later one of their partition)
    were never acknowledged: what a kill -9 leaves."""
    gone: set[tuple[str, int]] = set()
    kept = []
    for i, (topic, key, value, partition, headers) in enumerate(published):
        p = partition if partition is not None else partition_for(key or b"", 3)
        if i in lost:
            gone.add((topic, p))
        if (topic, p) not in gone:
            kept.append((topic, key, value, partition, headers))
    return kept


def stream_messages() -> list[Read]:
    return [
        *a_transaction(731, 0x2000, insert(1, 731), insert(2, 731), delete(1, 731)),
        *a_transaction(732, 0x3000, insert(3, 732), update_key(2, 4, 732), truncate(xid=732)),
        *a_transaction(733, 0x4000, insert(5, 733)),
    ]


def whole(published: list[Message]) -> tuple[Counter[tuple[str, int]], list[transactions.TransactionRecord]]:
    """Change messages per (topic, commit LSN), and the records, of what the topics hold."""
    changes: Counter[tuple[str, int]] = Counter()
    for m in published:
        if m[0] != RECORDS:
            key = transaction_of(m)
            assert key is not None
            changes[(m[0], key[1])] += 1
    return changes, records_of(published)


@pytest.mark.parametrize(
    "lost",
    [
        set(),
        {0},  # the first BEGIN lost, its messages kept
        {1},
        {5},  # the first END lost
        {6},  # the second BEGIN
        {8, 10},
        {len(first_run(stream_messages())) - 1},  # the last END
    ],
)
def test_after_a_crash_each_transaction_has_one_begin_and_one_end_counting_what_the_topics_hold(
    lost: set[int],
) -> None:
    messages = stream_messages()
    complete = first_run(messages)
    got = with_ack_order(complete, lost)
    again = restarted(messages, got)
    topics = got + again
    changes, found = whole(topics)
    assert whole(complete)[0] == changes  # every change message once
    statuses = Counter((r["status"], r["source"]["commit_lsn"]) for r in found)
    assert statuses == Counter({(s, lsn): 1 for s in ("BEGIN", "END") for lsn in (0x2090, 0x3090, 0x4090)})
    for end in (r for r in found if r["status"] == "END"):
        lsn = end["source"]["commit_lsn"]
        assert transactions.counts(end) == {t: n for (t, c), n in changes.items() if c == lsn}
    positions = [at(m) for m in topics if m[0] == RECORDS]
    assert positions == sorted(positions)  # strictly increasing along the transaction topic
    assert len(set(positions)) == len(positions)


def test_an_end_counts_messages_an_earlier_run_published_that_this_one_does_not_give_again() -> None:
    """A schema-change event the first reading showed and the second does not: still in the topic."""
    messages = a_transaction(731, 0x2000, insert(1, 731), insert(2, 731))
    complete = first_run(messages)
    extra = (PROBE, None, complete[1][2], 1, None)  # as if the earlier run gave one more message
    got = [complete[0], extra]
    again = restarted(messages, got)
    [end] = [r for r in records_of(again) if r["status"] == "END"]
    assert [r["status"] for r in records_of(again)] == ["END"]  # BEGIN held
    assert transactions.counts(end)[PROBE] == 1 + len([m for m in again if m[0] == PROBE])


def test_a_transaction_before_the_start_position_while_replaying_stops_the_stream() -> None:
    sent: list[Message] = []
    records = TransactionRecords(PREFIX, RECORDS, lambda tx, message: sent.append(message))
    tracker = FlushTracker(0)
    records.held({}, 0x3000, None)
    with pytest.raises(SourceError, match="came before the position streaming started from"):
        records.start(tracker.begin(731, 0x2100), TxContext(731, 0x2090, 0))
    records.held({}, None, None)
    records.start(tracker.begin(731, 0x2100), TxContext(731, 0x2090, 0))
    assert sent == []


def test_records_the_transaction_topic_holds_are_not_sent_again() -> None:
    sent: list[Message] = []
    records = TransactionRecords(PREFIX, RECORDS, lambda tx, message: sent.append(message))
    tracker = FlushTracker(0)
    records.held({0x2090: Counter({PROBE: 2})}, 0x2000, (0x2090, 0, 0))  # its BEGIN is there
    tx = tracker.begin(731, 0x2100)
    records.start(tx, TxContext(731, 0x2090, 0))
    change_message = (PROBE, b"{}", b"{}", None, None)
    records.publish(tx, change_message)
    records.end(tx)
    assert [m[0] for m in sent] == [PROBE, RECORDS]
    assert transactions.counts(record(sent[1])) == {PROBE: 3} and records.published == 1


# --- counting what the topics hold --------------------------------------------------------------


def envelope(op: str, commit_lsn: int, seq: int, tx_id: int | None = 731, stream: str = "s") -> bytes:
    source = {"commit_lsn": commit_lsn, "seq": seq, "txId": tx_id, "stream": stream, "snapshot": op == "r"}
    return orjson.dumps({"op": op, "source": source})


def tombstone(commit_lsn: int, seq: int, stream: str = "s") -> Headers:
    header = {"txId": 731, "lsn": commit_lsn, "commit_lsn": commit_lsn, "ts_us": 0, "seq": seq, "stream": stream}
    return [(TOMBSTONE_HEADER, orjson.dumps(header))]


def test_tail_counts_stop_at_the_first_older_message() -> None:
    part: list[tuple[bytes | None, Headers | None]] = [
        (envelope("c", 0x100, 1), None),  # before `since`
        (envelope("d", 0x200, 1), None),
        (None, tombstone(0x200, 1)),
        (envelope("r", 0x2FF, 1, None), None),  # an incremental snapshot's row in between
        (envelope("t", 0x300, 1), None),
        (envelope("u", 0x300, 2), None),
    ]
    counts, reached = tail_counts(part, "s", 0x200)
    assert counts == Counter({0x200: 2, 0x300: 2}) and reached
    counts, reached = tail_counts(part[1:], "s", 0x200)
    assert counts == Counter({0x200: 2, 0x300: 2}) and not reached  # read further back


def test_tail_counts_stop_at_another_streams_message_and_an_initial_snapshot() -> None:
    assert tail_counts(
        [(envelope("c", 0x900, 1, stream="old"), None), (envelope("c", 0x300, 1), None)], "s", 0x200
    ) == (
        Counter({0x300: 1}),
        True,
    )
    snapshot = [(envelope("r", 0x1FF, 1, None), None), (envelope("c", 0x300, 1), None)]
    assert tail_counts(snapshot, "s", 0x200) == (Counter({0x300: 1}), True)


def test_message_transaction_reads_envelopes_and_tombstones() -> None:
    assert message_transaction(envelope("u", 0x300, 2), None) == ("s", 0x300)
    assert message_transaction(None, tombstone(0x300, 2)) == ("s", 0x300)
    assert message_transaction(envelope("r", 0x300, 2, None), None) is None
    assert message_transaction(b"not json", None) is None
    assert message_transaction(None, None) is None


class Delivered:
    def __init__(self, offset: int, value: bytes | None) -> None:
        self._offset, self._value = offset, value

    def error(self) -> None:
        return None

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> None:
        return None


class TailConsumer:
    """One partition holding `values` at offsets 0..n-1, handed out a few at a time."""

    def __init__(self, values: list[bytes]) -> None:
        self.values = values
        self.at: int | None = None
        self.read = 0

    def get_watermark_offsets(self, tp: Any, timeout: float) -> tuple[int, int]:
        return 0, len(self.values)

    def assign(self, partitions: list[Any]) -> None:
        self.at = partitions[0].offset

    def unassign(self) -> None:
        self.at = None

    def consume(self, n: int, timeout: float) -> list[Delivered]:
        assert self.at is not None
        batch = [Delivered(o, self.values[o]) for o in range(self.at, min(self.at + min(n, 7), len(self.values)))]
        self.at += len(batch)
        self.read += len(batch)
        return batch


def test_a_partition_is_read_back_in_growing_chunks_until_an_older_message() -> None:
    values = [envelope("c", 0x100 + i // 10, i % 10 + 1) for i in range(3000)]  # 300 transactions of 10
    consumer = TailConsumer(values)
    counts = held.partition_transactions(consumer, "cdc.public.t", 0, "s", 0x100 + 250)
    assert counts == Counter({0x100 + t: 10 for t in range(250, 300)})
    assert consumer.read < 1300  # chunks of 16, 128 and 1024 (and a batch beyond their ends), not all 3000
    everything = TailConsumer(values)
    assert sum(held.partition_transactions(everything, "cdc.public.t", 0, "s", 0).values()) == 3000


class Metadata:
    def __init__(self, topics: dict[str, int]) -> None:
        self.topics = {t: type("T", (), {"partitions": dict.fromkeys(range(n))})() for t, n in topics.items()}


class Admin:
    """Topics that exist already, by partition count; nothing is created."""

    def __init__(self, topics: dict[str, int]) -> None:
        self.existing = topics

    def list_topics(self, topic: str | None = None, timeout: float = 10) -> Metadata:
        return Metadata(self.existing)


def test_a_transaction_topic_of_several_partitions_is_refused() -> None:
    topics = ChangeTopics(Admin({PROBE: 3, RECORDS: 2}), 3, 1, ())
    topics.transactions = RECORDS
    with pytest.raises(ConfigError, match=f"topic {RECORDS} has 2 partitions: .* Delete it"):
        topics.ensure([table()])
    fine = ChangeTopics(Admin({PROBE: 3, RECORDS: 1}), 3, 1, ())
    fine.transactions = RECORDS
    fine.ensure([table()])
    assert fine.counts == {PROBE: 3, RECORDS: 1}
