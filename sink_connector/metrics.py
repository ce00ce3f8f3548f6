"""cdc-sink's Prometheus metrics, read from the sink's plain counters at scrape time."""

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pg_kafka_cdc.common.service import (
    LATENCY_BUCKETS,
    SIZE_BUCKETS,
    FastHistogram,
    counter,
    gauge,
    samples,
    single_counter,
)
from sink_connector.bookkeeping import ConsistentPoint, TopicPartition
from sink_connector.plan import BatchPlan

if TYPE_CHECKING:
    from sink_connector.sink import Sink


@dataclass
class SinkStats:
    """The sink's plain counters, read by collect at scrape time."""

    applied: Counter[tuple[str, str]] = field(default_factory=Counter)
    skipped: int = 0
    duplicates: int = 0  # changes the target already had (applied.py)
    schema_changes: Counter[str] = field(default_factory=Counter)  # applied schema-change events, by table
    schema_skipped: int = 0  # schema-change events not applied (--schema-changes none)
    batches: int = 0
    fenced: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    lag: dict[TopicPartition, int] = field(default_factory=dict)
    last_applied_ts_us: int | None = None
    latency: FastHistogram = field(default_factory=lambda: FastHistogram(LATENCY_BUCKETS))
    batch_sizes: FastHistogram = field(default_factory=lambda: FastHistogram(SIZE_BUCKETS))
    apply_seconds: FastHistogram = field(default_factory=lambda: FastHistogram(LATENCY_BUCKETS))
    target_down_since: float | None = None  # monotonic time the target connection was lost
    # --consistency transaction: the last source transaction applied whole, and how many were
    consistency_mode: bool = False
    consistency: ConsistentPoint | None = None
    transactions_applied: int = 0

    def committed(self, plan: BatchPlan, started: float) -> None:
        """A batch plan committed to the target; `started` is when its commit step began (monotonic)."""
        committed_us = time.time() * 1e6
        self.target_down_since = None
        self.batches += 1
        self.skipped += plan.skipped
        self.duplicates += plan.duplicates
        self.schema_skipped += plan.schema_skipped
        self.apply_seconds.observe(time.monotonic() - started)
        self.batch_sizes.observe(len(plan.changes))
        # one observation per change, computed once per source transaction (they share a commit time)
        last_ts, same = None, 0
        for c in plan.changes:
            if c.ts_us != last_ts:
                if last_ts is not None and same:
                    self.latency.observe((committed_us - last_ts) / 1e6, same)
                last_ts, same = c.ts_us, 0
            same += 1
        if last_ts is not None and same:
            self.latency.observe((committed_us - last_ts) / 1e6, same)
        for b in plan.tables:
            name = str(b.table)
            if b.schema_changes:
                self.schema_changes[name] += len(b.schema_changes)
            for op, n in b.ops.items():
                self.applied[(name, op)] += n
            if b.max_ts_us is not None:
                self.last_applied_ts_us = max(self.last_applied_ts_us or 0, b.max_ts_us)


def _timings(stats: SinkStats) -> Iterator[Any]:
    yield stats.latency.family(
        "cdc_sink_end_to_end_latency_seconds", "From source commit to target commit, per change."
    )
    yield stats.batch_sizes.family("cdc_sink_batch_size_messages", "Messages per applied batch.")
    yield stats.apply_seconds.family("cdc_sink_apply_seconds", "Time to apply and commit one batch.")


def _consistency(stats: SinkStats) -> Iterator[Any]:
    """--consistency transaction: the target is consistent as of the source commit these name."""
    yield single_counter(
        "cdc_sink_source_transactions_applied_total",
        "Source transactions applied whole (--consistency transaction).",
        stats.transactions_applied,
    )
    point = stats.consistency
    if point is None or not point.reached:
        return
    yield gauge(
        "cdc_sink_consistent_commit_lsn",
        "The target is consistent as of the source commit at this LSN (--consistency transaction).",
        float(point.commit_lsn),
    )
    if point.ts_us is not None:
        yield gauge(
            "cdc_sink_consistent_commit_timestamp_seconds",
            "Commit time of the source transaction the target is consistent as of (--consistency transaction).",
            point.ts_us / 1e6,
        )


def collect(sink: "Sink") -> Iterator[Any]:
    stats = sink.stats
    yield counter(
        "cdc_sink_changes_applied_total",
        "Changes applied to the target, by table and op.",
        ["table", "op"],
        samples(stats.applied),
    )
    for name, doc, value in (
        ("cdc_sink_batches_total", "Batches committed to the target.", stats.batches),
        ("cdc_sink_skipped_total", "Events skipped because the bulk copy already held them.", stats.skipped),
        (
            "cdc_sink_duplicates_skipped_total",
            "Changes skipped because the target already had them (a topic holding a change twice, or read again).",
            stats.duplicates,
        ),
        (
            "cdc_sink_dlq_messages_total",
            "Messages sent to a dead-letter topic.",
            sink.dead_letters.sent if sink.dead_letters else 0,
        ),
        ("cdc_sink_fenced_total", "Batches dropped because another member moved the offsets.", stats.fenced),
        (
            "cdc_sink_schema_changes_skipped_total",
            "Schema-change events not applied (--schema-changes none).",
            stats.schema_skipped,
        ),
    ):
        yield single_counter(name, doc, value)
    yield counter(
        "cdc_sink_schema_changes_applied_total",
        "Schema-change events applied to the target, by table.",
        ["table"],
        samples(stats.schema_changes),
    )
    yield counter("cdc_sink_errors_total", "Errors by kind.", ["kind"], samples(stats.errors))
    yield counter(
        "cdc_sink_snapshot_rows_total",
        "Rows bulk-copied from the source, by table.",
        ["table"],
        samples(sink.preparer.copied_rows),
    )
    yield from _timings(stats)
    yield gauge(
        "cdc_sink_consumer_lag_messages",
        "Messages not yet applied, by topic and partition.",
        labels=["topic", "partition"],
        values=[((t, str(p)), n) for (t, p), n in list(stats.lag.items())],
    )
    if stats.last_applied_ts_us is not None:
        yield gauge(
            "cdc_sink_last_applied_commit_timestamp_seconds",
            "Source commit time of the newest change applied.",
            stats.last_applied_ts_us / 1e6,
        )
    if stats.consistency_mode:
        yield from _consistency(stats)
    yield gauge("cdc_sink_up", "1 while the sink can make progress.", 1.0 if sink.health()[0] else 0.0)
