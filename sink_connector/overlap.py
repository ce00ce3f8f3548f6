"""Row mode's batches in two stages: while the target commits one batch (psycopg2 waits for the
server without holding the GIL), the next is consumed, decoded and planned, and its commit queued
behind it. It is planned against the target as the commit under way will leave it (with the source
positions that commit stores: BatchProcessor.planned_after), so it gets the same plan, the same
positions checked, as one batch after another. A queued commit starts only once the one before it
has committed; if that one did not, the queued one ends unstarted and its batch is planned again
after the one before has been dealt with. A batch with tables to prepare, or after a batch that
changes schemas, is planned once the one before has committed.

A commit that fails is not retried here: the batch goes through BatchProcessor.run, the path that
retries, reconnects, searches for poison and re-reads a fenced batch. After a fenced batch the
batch decoded meanwhile is dropped: its partitions are read again from the stored offsets. The
rebalance callbacks wait for the commit under way first (KafkaLog.before_rebalance), so a
partition is never claimed or given up while a batch of it is being committed. The offsets a
batch stored are committed to Kafka from the consuming thread once the batch has committed:
librdkafka's commit on the other thread would wait for a rebalance callback that waits for it.

With --on-error dlq the batches run one after another: whether a key is parked depends on the
batch before."""

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import psycopg2

from pg_kafka_cdc.common.signals import StopFlag
from sink_connector.batch import UNSYNCED, BatchProcessor
from sink_connector.bookkeeping import TopicPartition
from sink_connector.commit import Fenced
from sink_connector.plan import BatchPlan
from sink_connector.ports import Message
from sink_connector.session import classify

log = logging.getLogger("sink")


@dataclass
class InFlight:
    """A batch whose commit runs on the commit thread."""

    messages: Sequence[Message]
    plan: BatchPlan
    done: "Future[None]"


class Abandoned(Exception):
    """A queued commit not started: the one before it did not commit."""


def _after(earlier: "Future[None]", apply: Callable[[BatchPlan, bool], None], plan: BatchPlan) -> None:
    """On the commit thread, once `earlier` has ended (one thread: in the order submitted)."""
    if earlier.exception() is not None:
        raise Abandoned()
    apply(plan, False)


@dataclass
class OverlappedBatches:
    processor: BatchProcessor
    in_flight: InFlight | None = None
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="cdc-sink-commit")
    )

    def run(self, messages: Sequence[Message], stop: StopFlag) -> bool:
        """Decode the batch while the one before commits, then start its own commit. False when
        the sink was stopped meanwhile."""
        processor = self.processor
        if processor.policy.dead_letters:
            return self.settle(stop) and processor.run(messages, stop)
        decoded = processor.decode(messages)
        fenced = processor.stats.fenced
        earlier = self.in_flight
        ahead = None if earlier is None else processor.planned_after(decoded, messages, earlier.plan)
        if earlier is not None and ahead is not None:
            queued = InFlight(messages, ahead, self.executor.submit(_after, earlier.done, processor.apply, ahead))
            settled = self.settle(stop)
            if earlier.done.exception() is None:  # committed: the queued commit goes on
                self.in_flight = queued
                return settled
            with contextlib.suppress(Abandoned):  # it ends unstarted: the batch is planned again
                queued.done.result()
            if not settled:
                return False
        elif not self.settle(stop):
            return False
        if processor.stats.fenced != fenced:
            self.read_again(messages)  # the batch before was fenced: this one follows it again
            return True
        if decoded.bad is not None:
            return processor.run(messages, stop)  # commits what precedes the bad message, then stops
        try:
            plan = processor.planned(decoded, messages)
        except psycopg2.Error:
            return processor.run(messages, stop)  # preparing a table failed: retried there
        self.in_flight = InFlight(messages, plan, self.executor.submit(processor.apply, plan, False))
        return True

    def settle(self, stop: StopFlag) -> bool:
        """Wait for the commit under way. A batch whose commit failed is applied again through
        BatchProcessor.run; False when the sink was stopped meanwhile."""
        flight, self.in_flight = self.in_flight, None
        if flight is None:
            return True
        processor = self.processor
        try:
            flight.done.result()
        except Fenced as fenced:
            processor.resync(fenced.stored, flight.messages)
            return True
        except psycopg2.Error as exc:
            log.debug("committing a batch failed (%s): applying it again", exc)
            with contextlib.suppress(psycopg2.Error):
                processor.target.rollback()
            if classify(exc) == "connection":
                processor.reconnect(exc, processor.backoff.next_delay(time.monotonic()) or 1.0)
                if stop:
                    return False
            return processor.run(flight.messages, stop)
        processor.backoff.reset()
        processor.commit.commit_to_kafka(flight.plan)
        return True

    def read_again(self, messages: Sequence[Message]) -> None:
        """Drop a batch: each of its partitions is read again from the offset this member expects
        next (a refused seek leaves it expected nowhere, as BatchProcessor.resync does)."""
        expected = self.processor.commit.expected
        for tp in {(m.topic(), m.partition()) for m in messages}:
            if tp in expected and not self.processor.commit.messages.seek(tp, expected[tp]):
                expected[tp] = UNSYNCED

    def pending(self) -> dict[TopicPartition, int]:
        """The next offsets of the batch being committed (none when nothing is)."""
        return {} if self.in_flight is None else self.in_flight.plan.positions

    def close(self) -> None:
        """At exit: wait for the commit under way (its outcome, if it failed, is what the target
        holds: nothing of it; the batch is read again at the next start)."""
        flight, self.in_flight = self.in_flight, None
        if flight is not None:
            try:
                flight.done.result()
            except (Fenced, psycopg2.Error) as exc:
                log.debug("the last batch did not commit (%s): it is read again at the next start", exc)
                with contextlib.suppress(psycopg2.Error):
                    self.processor.target.rollback()
            else:
                self.processor.commit.commit_to_kafka(flight.plan)
        self.executor.shutdown(wait=True)
