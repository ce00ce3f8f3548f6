"""The sink's batch loop (batch.py, plan.py, commit.py, poison.py) against in-memory fakes of Kafka
and the target (tests/unit/sink_fakes.py): the code production runs, without the services."""

import pytest
from confluent_kafka import KafkaError

from pg_kafka_cdc.common.errors import SinkError
from pg_kafka_cdc.common.settings import Settings
from pg_kafka_cdc.common.signals import StopFlag
from pg_kafka_cdc.common.tables import TableName
from sink_connector.batch import BatchProcessor
from sink_connector.changes import PARKED, decode_batch
from sink_connector.commit import BatchCommit, fence_warning
from sink_connector.consumer import IDLE_WAIT, EndOffsets, KafkaLog
from sink_connector.handover import CopySnapshot
from sink_connector.metrics import SinkStats
from sink_connector.overlap import OverlappedBatches
from sink_connector.plan import TopicTables, plan_batch, positions_of
from sink_connector.poison import ErrorPolicy
from sink_connector.sink import Sink, SinkOptions
from tests.unit.sink_fakes import (
    PREFIX,
    ErrorMessage,
    FakeConsumer,
    FakeDeadLetters,
    FakeError,
    FakeLog,
    FakeRebalancingConsumer,
    FakeTarget,
    Partitions,
    topic_of,
)

PERSON = TableName("public", "person")
ORDERS = TableName("public", "orders")


class Loop:
    """One sink member's batch loop, wired to fakes."""

    def __init__(self, on_error: str = "fail", parked: set[tuple[str, bytes]] | None = None) -> None:
        self.events: list[str] = []
        self.target = FakeTarget(self.events)
        self.log = FakeLog(self.events)
        self.dead_letters = FakeDeadLetters(self.events)
        self.stats = SinkStats()
        self.reconnects: list[str] = []
        self.stream = Partitions()
        self.expected: dict[tuple[str, int], int | None] = {}
        commit = BatchCommit(
            self.target, self.log, self.log, self.dead_letters if on_error == "dlq" else None, self.expected
        )
        self.commit = commit
        self.processor = BatchProcessor(
            self.target,
            self.target,
            commit,
            ErrorPolicy(on_error, parked if parked is not None else set()),
            TopicTables(PREFIX),
            self.stats,
            lambda exc, delay: self.reconnects.append(str(exc)),
        )

    def assign(self, *partitions: tuple[str, int]) -> None:
        """What the rebalance callback does: claim the partitions, expect their stored offsets."""
        self.expected.update(self.target.claim(list(partitions)))

    def rows(self, table: TableName) -> dict[int, str]:
        return {i: row["n"] for i, row in self.target.db.rows.get(table, {}).items()}


PERSON_0 = (topic_of("person"), 0)
PERSON_1 = (topic_of("person"), 1)
ORDERS_0 = (topic_of("orders"), 0)


def test_a_batch_is_one_transaction_of_rows_offsets_and_progress_then_a_kafka_commit() -> None:
    loop = Loop()
    loop.assign(PERSON_0, ORDERS_0)
    s = loop.stream
    batch = [
        s.upsert("person", 1, "a"),
        s.upsert("orders", 7, "x"),
        s.upsert("person", 1, "b"),
        s.delete("person", 2),
    ]
    assert loop.processor.run(batch, StopFlag())
    assert loop.events == [
        f"prepare {PERSON}",
        f"prepare {ORDERS}",
        "begin",
        "fence",
        f"apply {PERSON}",
        f"apply {ORDERS}",
        "store offsets",
        "store progress",
        "commit",
        "kafka commit",
    ]
    assert loop.rows(PERSON) == {1: "b"}
    assert loop.rows(ORDERS) == {7: "x"}
    assert loop.target.db.offsets == {PERSON_0: 3, ORDERS_0: 1}
    assert loop.log.committed == {PERSON_0: 3, ORDERS_0: 1}
    assert loop.expected == {PERSON_0: 3, ORDERS_0: 1}
    assert loop.target.db.progress == {PERSON: 3, ORDERS: 1}
    assert loop.stats.batches == 1
    assert loop.stats.applied == {
        ("public.person", "c"): 2,
        ("public.person", "tombstone"): 1,
        ("public.orders", "c"): 1,
    }


def test_a_known_table_is_not_prepared_again() -> None:
    loop = Loop()
    loop.assign(PERSON_0)
    loop.processor.run([loop.stream.upsert("person", 1, "a")], StopFlag())
    loop.events.clear()
    loop.processor.run([loop.stream.upsert("person", 2, "b")], StopFlag())
    assert loop.events[0] == "begin"
    assert loop.rows(PERSON) == {1: "a", 2: "b"}


def test_a_fenced_batch_writes_nothing_and_reads_again_from_the_stored_offsets() -> None:
    loop = Loop()
    loop.assign(PERSON_0, PERSON_1)
    loop.target.db.offsets[PERSON_0] = 5  # another member applied up to 5 meanwhile
    s = loop.stream
    assert loop.processor.run([s.upsert("person", 1, "a"), s.upsert("person", 2, "b", partition=1)], StopFlag())
    assert loop.rows(PERSON) == {}
    assert "commit" not in loop.events
    assert "kafka commit" not in loop.events
    assert loop.stats.fenced == 1
    assert sorted(loop.log.seeks) == [(PERSON_0, 5), (PERSON_1, None)]
    assert loop.expected == {PERSON_0: 5, PERSON_1: None}


def test_a_refused_seek_fences_the_partition_until_a_seek_succeeds() -> None:
    loop = Loop()
    loop.assign(PERSON_0)
    loop.target.db.offsets[PERSON_0] = 5  # another member applied up to 5 meanwhile
    loop.log.refuse_seeks = True
    s = loop.stream
    assert loop.processor.run([s.upsert("person", 1, "a")], StopFlag())
    assert loop.expected[PERSON_0] not in (None, 5)  # nowhere: not where the consumer happens to be
    # the consumer goes on from where it is (past the stored offset): that batch is not applied
    assert loop.processor.run([s.upsert("person", 2, "b")], StopFlag())
    assert loop.rows(PERSON) == {} and loop.stats.fenced == 2
    loop.log.refuse_seeks = False
    assert loop.processor.run([s.upsert("person", 3, "c")], StopFlag())
    assert loop.expected[PERSON_0] == 5 and loop.log.seeks[-1] == (PERSON_0, 5)


def test_a_batch_of_partitions_this_member_lost_is_fenced() -> None:
    loop = Loop()
    loop.target.claim([PERSON_0])
    assert loop.processor.run([loop.stream.upsert("person", 1, "a")], StopFlag())
    assert loop.stats.fenced == 1
    assert loop.log.seeks == []  # not ours any more: nothing to read again
    assert loop.rows(PERSON) == {}


def test_changes_the_bulk_copy_holds_are_skipped() -> None:
    loop = Loop()
    loop.target.snapshots[PERSON] = CopySnapshot.parse("500:510:503", 9500)
    loop.assign(PERSON_0)
    s = loop.stream
    batch = [s.upsert("person", 1, "in copy", xid=501), s.upsert("person", 2, "running", xid=503)]
    loop.processor.run(batch, StopFlag())
    assert loop.rows(PERSON) == {2: "running"}
    assert loop.stats.skipped == 1
    assert loop.target.db.offsets[PERSON_0] == 2  # the skipped change's offset is passed too


def test_progress_another_member_holds_is_carried_to_the_next_batch() -> None:
    loop = Loop()
    loop.assign(PERSON_0)
    loop.target.progress_locked = True
    loop.processor.run([loop.stream.upsert("person", 1, "a")], StopFlag())
    assert loop.target.db.progress == {}
    assert loop.target.db.offsets[PERSON_0] == 1
    loop.target.progress_locked = False
    loop.processor.run([loop.stream.upsert("person", 2, "b"), loop.stream.upsert("person", 3, "c")], StopFlag())
    assert loop.target.db.progress == {PERSON: 3}
    assert loop.commit.unsaved_progress == []


def test_a_lost_connection_retries_the_batch_after_reconnecting() -> None:
    loop = Loop()
    loop.assign(PERSON_0)
    loop.target.lose_connection = 1
    assert loop.processor.run([loop.stream.upsert("person", 1, "a")], StopFlag())
    assert len(loop.reconnects) == 1
    assert loop.rows(PERSON) == {1: "a"}
    assert loop.target.db.offsets[PERSON_0] == 1
    assert loop.stats.batches == 1


def test_a_stop_during_a_retry_ends_the_loop() -> None:
    loop = Loop()
    loop.assign(PERSON_0)
    loop.target.lose_connection = 1
    stop = StopFlag()
    stop.set()
    assert not loop.processor.run([loop.stream.upsert("person", 1, "a")], stop)
    assert loop.rows(PERSON) == {}


# --- --on-error ---------------------------------------------------------------------------------


def test_fail_applies_what_came_before_an_undecodable_message_then_stops() -> None:
    loop = Loop("fail")
    loop.assign(PERSON_0, PERSON_1)
    s = loop.stream
    batch = [
        s.upsert("person", 1, "a"),
        s.upsert("person", 2, "b", partition=1),
        s.garbage("person", 3),
        s.upsert("person", 4, "d"),
    ]
    with pytest.raises(
        SinkError, match=r"cannot decode message cdc.public.person\[0\] at offset 1: value is not JSON"
    ):
        loop.processor.run(batch, StopFlag())
    assert loop.rows(PERSON) == {1: "a", 2: "b"}
    assert loop.target.db.offsets == {PERSON_0: 1, PERSON_1: 1}


def test_dlq_sends_an_undecodable_message_on_and_parks_its_key() -> None:
    parked: set[tuple[str, bytes]] = set()
    loop = Loop("dlq", parked)
    loop.assign(PERSON_0)
    s = loop.stream
    first = s.upsert("person", 1, "a")
    garbage = s.garbage("person", 3)
    batch = [first, garbage, s.upsert("person", 3, "later")]
    loop.processor.run(batch, StopFlag())
    assert loop.rows(PERSON) == {1: "a"}
    assert [(o, r.split(":")[0]) for _, _, o, r in loop.dead_letters.letters] == [
        (1, "undecodable"),
        (2, "parked"),
    ]
    assert set(loop.target.db.parked) == {(topic_of("person"), garbage.key_bytes)} == parked
    assert loop.target.db.offsets[PERSON_0] == 3
    assert loop.events.index("dead letters") < loop.events.index("begin")


def test_fail_applies_what_came_before_a_change_the_target_rejects_then_stops() -> None:
    loop = Loop("fail")
    loop.assign(PERSON_0)
    s = loop.stream
    batch = [s.upsert("person", 1, "a"), s.upsert("person", 2, "bad"), s.upsert("person", 3, "c")]
    with pytest.raises(
        SinkError, match=r"the target rejected message cdc.public.person\[0\] at offset 1: invalid input"
    ):
        loop.processor.run(batch, StopFlag())
    assert loop.rows(PERSON) == {1: "a"}
    assert loop.target.db.offsets[PERSON_0] == 1


def test_dlq_sets_a_rejected_change_and_the_later_changes_of_its_key_aside() -> None:
    loop = Loop("dlq")
    loop.assign(PERSON_0)
    s = loop.stream
    batch = [
        s.upsert("person", 1, "a"),
        s.upsert("person", 2, "bad"),
        s.upsert("person", 3, "c"),
        s.upsert("person", 2, "fixed"),
    ]
    loop.processor.run(batch, StopFlag())
    assert loop.rows(PERSON) == {1: "a", 3: "c"}
    assert [(o, r.split(":")[0]) for _, _, o, r in loop.dead_letters.letters] == [
        (1, "rejected by the target"),
        (3, "parked"),
    ]
    assert list(loop.target.db.parked) == [(topic_of("person"), b'{"id":2}')]
    assert loop.target.db.offsets[PERSON_0] == 4
    assert loop.stats.batches == 1


def test_a_parked_key_stays_parked() -> None:
    loop = Loop("dlq", {(topic_of("person"), b'{"id":2}')})
    loop.assign(PERSON_0)
    loop.processor.run([loop.stream.upsert("person", 2, "b"), loop.stream.upsert("person", 1, "a")], StopFlag())
    assert loop.rows(PERSON) == {1: "a"}
    assert [r for *_, r in loop.dead_letters.letters] == [PARKED]


def test_a_data_error_of_the_batch_but_of_no_single_change_stops() -> None:
    loop = Loop("dlq")
    loop.assign(PERSON_0)
    loop.processor.run([loop.stream.upsert("person", 1, "a")], StopFlag())
    loop.target.reject_batches = True
    with pytest.raises(SinkError, match="no single change of it does"):
        loop.processor.run([loop.stream.upsert("person", 2, "b")], StopFlag())
    assert loop.rows(PERSON) == {1: "a"}
    assert loop.target.db.offsets[PERSON_0] == 1


# --- the plan alone -----------------------------------------------------------------------------


def test_the_plan_names_the_positions_past_every_message() -> None:
    s = Partitions()
    messages = [s.upsert("person", 1, "a"), s.delete("person", 1), s.upsert("person", 2, "b", partition=1)]
    topics = TopicTables(PREFIX)
    decoded = decode_batch(messages, topics.table_of, set(), dead_letters=False)
    plan = plan_batch(decoded.changes, decoded.rejected, positions_of(messages), topics, {}, {})
    assert plan.positions == {PERSON_0: 2, PERSON_1: 1}
    [person] = plan.tables
    assert person.upserts.keys() == {b'{"id":2}'}
    assert person.deletes.keys() == {b'{"id":1}'}
    assert plan.progress == [(PERSON, person.max_ts_us, 9100, 3)]


# --- the sink's loop ----------------------------------------------------------------------------


def test_the_loop_applies_what_it_consumes_until_caught_up_with_once() -> None:
    loop = Loop()
    loop.assign(PERSON_0)
    s = loop.stream
    eof = ErrorMessage(topic_of("person"), 0, 2, None, None, failure=FakeError(KafkaError._PARTITION_EOF))
    batches = [[s.upsert("person", 1, "a")], [s.upsert("person", 2, "b"), eof], [], [s.delete("person", 1)]]
    settings = Settings("", "", "", PREFIX, ())
    sink = Sink(settings, SinkOptions(once=True), StopFlag())
    sink.kafka.expected = loop.expected
    sink.kafka.consumer = FakeConsumer(batches, {PERSON_0: 3})
    once = EndOffsets({PERSON_0: 3}, loop.expected, lambda: loop.target.db.offsets)
    batches_ = OverlappedBatches(loop.processor)
    sink.loop(batches_, once)
    batches_.close()
    assert loop.rows(PERSON) == {2: "b"}
    assert loop.target.db.offsets == {PERSON_0: 3}
    assert loop.stats.batches == 3
    assert sink.stats.lag == {PERSON_0: 3}  # as seen before the first batch was applied


# --- what the target already has ------------------------------------------------------------------


def test_a_change_the_target_already_has_is_skipped_and_counted() -> None:
    loop = Loop()
    loop.assign(PERSON_0)
    s = loop.stream
    assert loop.processor.run([s.upsert("person", 1, "a", seq=1), s.upsert("person", 2, "b", seq=2)], StopFlag())
    assert "store positions" in loop.events
    assert loop.target.db.positions == {(*PERSON_0, "S1"): (9100, 2, 2)}
    loop.target.db.rows[PERSON][1]["n"] = "changed on the target meanwhile"
    # the same two changes again (a topic holding them twice), then a new one
    again = [
        s.upsert("person", 1, "a", seq=1),
        s.upsert("person", 2, "b", seq=2),
        s.upsert("person", 3, "c", seq=3),
    ]
    assert loop.processor.run(again, StopFlag())
    assert loop.rows(PERSON) == {1: "changed on the target meanwhile", 2: "b", 3: "c"}
    assert loop.stats.duplicates == 2
    assert loop.target.db.offsets[PERSON_0] == 5  # the offsets move past the skipped ones too


def test_the_positions_applied_outlive_the_process() -> None:
    first = Loop()
    first.assign(PERSON_0)
    s = first.stream
    assert first.processor.run([s.upsert("person", 1, "a", seq=1)], StopFlag())
    second = Loop()
    second.target.db = first.target.db  # the same target database, another sink process (or group)
    second.assign(PERSON_0)
    second.expected[PERSON_0] = first.target.db.offsets[PERSON_0]
    assert second.processor.run([s.upsert("person", 1, "a", seq=1), s.upsert("person", 1, "b", seq=2)], StopFlag())
    assert second.rows(PERSON) == {1: "b"}
    assert second.stats.duplicates == 1


def test_changes_of_another_stream_and_without_positions_are_applied() -> None:
    loop = Loop()
    loop.assign(PERSON_0)
    s = loop.stream
    assert loop.processor.run([s.upsert("person", 1, "a", seq=5, commit_lsn=9500)], StopFlag())
    later = [
        s.upsert("person", 2, "b", seq=1, commit_lsn=100, stream="S2"),  # a new slot: its own positions
        s.upsert("person", 3, "c"),  # another producer: no position
        s.upsert("person", 1, "a", seq=5, commit_lsn=9500),  # S1's again
    ]
    assert loop.processor.run(later, StopFlag())
    assert loop.rows(PERSON) == {1: "a", 2: "b", 3: "c"}
    assert loop.stats.duplicates == 1
    assert loop.target.db.positions == {(*PERSON_0, "S1"): (9500, 5, 2), (*PERSON_0, "S2"): (100, 1, 2)}


def test_a_position_repeated_within_a_batch_is_applied_once() -> None:
    loop = Loop()
    loop.assign(PERSON_0)
    s = loop.stream
    batch = [
        s.upsert("person", 1, "a", seq=1),
        s.upsert("person", 1, "old", seq=1),
        s.upsert("person", 2, "b", seq=2),
    ]
    assert loop.processor.run(batch, StopFlag())
    assert loop.rows(PERSON) == {1: "a", 2: "b"}
    assert loop.stats.duplicates == 1


# --- one batch committing while the next is decoded (overlap.py) ------------------------------------


def test_overlapped_batches_apply_as_one_batch_after_another() -> None:
    loop = Loop()
    loop.assign(PERSON_0, ORDERS_0)
    s = loop.stream
    batches = OverlappedBatches(loop.processor)
    first = [s.upsert("person", 1, "a", seq=1), s.upsert("orders", 7, "x", seq=2)]
    assert batches.run(first, StopFlag())
    assert batches.pending() == {PERSON_0: 1, ORDERS_0: 1}
    # the same change again (a topic holding it twice) in the next batch: planned only once the
    # batch before has committed, so it is skipped, not written again
    second = [s.upsert("person", 1, "a", seq=1), s.upsert("person", 1, "b", seq=3), s.delete("orders", 7)]
    assert batches.run(second, StopFlag())
    # the first batch's offsets go to Kafka from this thread, once it has committed
    assert loop.log.committed == {PERSON_0: 1, ORDERS_0: 1}
    assert batches.settle(StopFlag())
    assert loop.log.committed == {PERSON_0: 3, ORDERS_0: 2}
    assert batches.pending() == {}
    assert loop.rows(PERSON) == {1: "b"} and loop.rows(ORDERS) == {}
    assert loop.stats.duplicates == 1 and loop.stats.batches == 2
    assert loop.target.db.offsets == {PERSON_0: 3, ORDERS_0: 2}
    assert loop.expected == {PERSON_0: 3, ORDERS_0: 2}
    batches.close()


def test_a_commit_that_failed_on_the_commit_thread_is_applied_again_before_the_next_batch() -> None:
    loop = Loop()
    loop.assign(PERSON_0)
    loop.target.lose_connection = 1
    s = loop.stream
    batches = OverlappedBatches(loop.processor)
    assert batches.run([s.upsert("person", 1, "a")], StopFlag())
    assert batches.run([s.upsert("person", 2, "b")], StopFlag())  # settles the first: retried there
    assert len(loop.reconnects) == 1
    batches.close()
    assert loop.rows(PERSON) == {1: "a", 2: "b"}
    assert loop.target.db.offsets[PERSON_0] == 2 and loop.stats.batches == 2
    assert loop.log.committed == {PERSON_0: 2}  # the last batch's offsets reach Kafka at close too


def test_after_a_fenced_commit_the_batch_decoded_meanwhile_is_read_again_from_the_stored_offsets() -> None:
    loop = Loop()
    loop.assign(PERSON_0, PERSON_1)
    s = loop.stream
    batches = OverlappedBatches(loop.processor)
    loop.target.db.offsets[PERSON_0] = 5  # another member applied up to 5 meanwhile
    assert batches.run([s.upsert("person", 1, "a")], StopFlag())
    # the next batch also holds a partition the fenced batch did not: it is read again too
    assert batches.run([s.upsert("person", 3, "c"), s.upsert("person", 2, "b", partition=1)], StopFlag())
    assert batches.pending() == {}
    assert loop.stats.fenced == 1 and loop.rows(PERSON) == {}
    assert sorted(loop.log.seeks) == [(PERSON_0, 5), (PERSON_0, 5), (PERSON_1, None)]
    assert loop.expected == {PERSON_0: 5, PERSON_1: None}
    batches.close()


def test_a_rebalance_waits_for_the_commit_under_way() -> None:
    loop = Loop()
    loop.assign(PERSON_0)
    settings = Settings("", "", "", PREFIX, ())
    sink = Sink(settings, SinkOptions(), StopFlag())
    batches = OverlappedBatches(loop.processor)

    def settle() -> None:
        batches.settle(StopFlag())

    sink.kafka.before_rebalance = settle
    assert batches.run([loop.stream.upsert("person", 1, "a")], StopFlag())
    sink.kafka.on_revoke(FakeRebalancingConsumer(), [])
    assert batches.in_flight is None and loop.target.db.offsets[PERSON_0] == 1
    batches.close()


def test_once_counts_the_batch_being_committed_without_reading_the_target() -> None:
    expected: dict[tuple[str, int], int | None] = {PERSON_0: 1}
    once = EndOffsets({PERSON_0: 3, PERSON_1: 0}, expected, lambda: {})
    assert not once.reached_here({})
    assert once.reached_here({PERSON_0: 3})
    assert not EndOffsets({PERSON_0: 3, PERSON_1: 2}, expected, lambda: {}).reached_here({PERSON_0: 3})


def test_offsets_stored_behind_what_this_member_committed_are_named_commits_the_target_lost() -> None:
    # a crash under synchronous_commit off (or a restore from a backup) takes the last commits back
    lost = fence_warning({("t", 0): 40, ("t", 1): None}, {("t", 0): 90, ("t", 1): 12, ("t", 2): 5})
    assert lost.startswith("the target's stored offsets of t[0], t[1] are behind what this sink committed")
    # another member applied more: the offsets moved ahead
    moved = fence_warning({("t", 0): 120}, {("t", 0): 90})
    assert moved == "another sink moved the offsets of t[0]: re-reading from the stored offsets"
    # a partition this member has applied nothing of yet is not a lost commit
    assert fence_warning({("t", 0): 3}, {}).startswith("another sink moved the offsets of t[0]")


def test_a_batch_waits_for_its_first_message_then_fills_for_the_batch_wait() -> None:
    asked: list[tuple[int, float]] = []

    class Recording:
        def __init__(self, handed: list[list[str]]) -> None:
            self.handed = handed

        def consume(self, num_messages: int, timeout: float) -> list[str]:
            asked.append((num_messages, timeout))
            return self.handed.pop(0) if self.handed else []

    kafka = KafkaLog(Settings("", "", "", PREFIX, ()), "g", None, lambda partitions: {}, SinkStats())
    kafka.consumer = Recording([["m1"], ["m2", "m3"]])
    handed: list[object] = list(kafka.consume(100, 0.02))
    assert handed == ["m1", "m2", "m3"]
    assert asked == [(1, IDLE_WAIT), (99, 0.02)]
    asked.clear()
    assert kafka.consume(100, 0.02) == []  # idle: one wait of IDLE_WAIT, no fill
    assert asked == [(1, IDLE_WAIT)]
