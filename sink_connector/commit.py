"""Committing a batch plan, in this order:

1. dead letters: sent and acknowledged by Kafka (before any offset past them is stored);
2. fence: lock the partitions' offsets rows; they must hold what this member started from;
3. apply: each table's net effect;
4. park: the keys of the dead letters, so their later changes follow them;
5. store: the partitions' next offsets, the source positions applied, the tables' progress;
6. commit the target transaction (rows, offsets and progress together: exactly once in effect);
7. commit the offsets to Kafka (for the tools that show a group's lag; the target holds the truth).
"""

import logging
from collections.abc import MutableMapping
from dataclasses import dataclass, field

from confluent_kafka import TopicPartition as KafkaPartition

from sink_connector.bookkeeping import TopicPartition
from sink_connector.plan import BatchPlan, Progress, merge_progress
from sink_connector.ports import DeadLetterSink, GroupOffsets, MessageLog, Target

log = logging.getLogger("sink")


class Fenced(Exception):
    """Another member moved these partitions' offsets: the batch is dropped and read again."""

    def __init__(self, stored: dict[TopicPartition, int | None]) -> None:
        super().__init__("fenced")
        self.stored = stored


@dataclass
class BatchCommit:
    target: Target
    messages: MessageLog
    group: GroupOffsets
    dead_letters: DeadLetterSink | None
    # The next offset this member expects per assigned partition (None: nothing applied yet).
    expected: MutableMapping[TopicPartition, int | None]
    unsaved_progress: list[Progress] = field(default_factory=list)

    def run(self, plan: BatchPlan, to_kafka: bool = True) -> None:
        """Steps 1-6, and 7 unless `to_kafka` is false (the caller commits to Kafka from the thread
        that consumes: librdkafka's commit waits for a rebalance that thread is in)."""
        self.send_dead_letters(plan)
        self.target.begin()
        self.fence(plan)
        for table in plan.tables:
            self.target.apply(table)
        self.park(plan)
        progress = merge_progress(self.unsaved_progress, plan.progress)
        self.target.store_offsets(plan.positions)
        if plan.applied:
            self.target.store_positions(plan.applied)
        saved = bool(progress) and self.target.save_progress(progress)
        self.target.commit()
        self.unsaved_progress = [] if saved else progress
        self.expected.update(plan.positions)
        if to_kafka:
            self.commit_to_kafka(plan)

    def send_dead_letters(self, plan: BatchPlan) -> None:
        if plan.rejected and self.dead_letters is not None:
            for r in plan.rejected:
                self.dead_letters.send(r.message, r.reason)
            self.dead_letters.flush()

    def fence(self, plan: BatchPlan) -> None:
        stored = self.target.lock_offsets(list(plan.positions))
        if any(stored.get(tp) != self.expected.get(tp, -1) for tp in plan.positions):
            self.target.rollback()
            raise Fenced(stored)

    def park(self, plan: BatchPlan) -> None:
        for r in plan.rejected:
            key = r.message.key()
            if key is not None:
                self.target.park(r.message.topic(), key, r.message.offset(), r.reason)

    def commit_to_kafka(self, plan: BatchPlan) -> None:
        commit_to_kafka(self.group, plan.positions)


def fence_warning(
    stored: dict[TopicPartition, int | None], expected: MutableMapping[TopicPartition, int | None]
) -> str:
    """The warning of a fenced batch: offsets stored behind what this member committed are commits
    the target lost (a crash loses the last ones under synchronous_commit off, as a restore from a
    backup does), offsets elsewhere were moved by another member."""
    moved = {tp: offset for tp, offset in stored.items() if offset != expected.get(tp, -1)}
    names = ", ".join(f"{t}[{p}]" for t, p in sorted(moved or stored))
    behind = bool(moved) and all(
        expected.get(tp) is not None and (offset is None or offset < (expected.get(tp) or 0))
        for tp, offset in moved.items()
    )
    if behind:
        return (
            f"the target's stored offsets of {names} are behind what this sink committed (the target lost "
            "its last commits in a crash, or was restored from a backup): re-reading from the stored offsets"
        )
    return f"another sink moved the offsets of {names}: re-reading from the stored offsets"


def commit_to_kafka(group: GroupOffsets, positions: dict[TopicPartition, int]) -> None:
    """The offsets a committed target transaction stored, committed to Kafka too (asynchronously)."""
    try:
        offsets = [KafkaPartition(t, p, o) for (t, p), o in positions.items()]
        group.commit(offsets=offsets, asynchronous=True)
    except Exception as exc:  # the target holds the truth; Kafka's copy is for tools
        log.debug("Kafka offset commit failed: %s", exc)
