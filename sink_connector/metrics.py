"""cdc-sink's Prometheus metrics, read from the sink's plain counters at scrape time."""

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from cdc_common.service import counter, gauge, samples, single_counter

if TYPE_CHECKING:
    from sink_connector.sink import Sink


def collect(sink: "Sink") -> Iterator[Any]:
    yield counter(
        "cdc_sink_changes_applied_total",
        "Changes applied to the target, by table and op.",
        ["table", "op"],
        samples(sink.applied),
    )
    yield single_counter("cdc_sink_batches_total", "Batches committed to the target.", sink.batches)
    yield single_counter(
        "cdc_sink_skipped_total", "Events skipped because the bulk copy already held them.", sink.skipped
    )
    yield single_counter(
        "cdc_sink_dlq_messages_total",
        "Messages sent to a dead-letter topic.",
        sink.dead_letters.sent if sink.dead_letters else 0,
    )
    yield single_counter(
        "cdc_sink_fenced_total", "Batches dropped because another member moved the offsets.", sink.fenced
    )
    yield counter("cdc_sink_errors_total", "Errors by kind.", ["kind"], samples(sink.errors))
    yield counter(
        "cdc_sink_snapshot_rows_total",
        "Rows bulk-copied from the source, by table.",
        ["table"],
        samples(sink.preparer.copied_rows),
    )
    yield from _timings(sink)
    yield from _gauges(sink)


def _timings(sink: "Sink") -> Iterator[Any]:
    yield sink.latency.family(
        "cdc_sink_end_to_end_latency_seconds", "From source commit to target commit, per change."
    )
    yield sink.batch_sizes.family("cdc_sink_batch_size_messages", "Messages per applied batch.")
    yield sink.apply_seconds.family("cdc_sink_apply_seconds", "Time to apply and commit one batch.")


def _gauges(sink: "Sink") -> Iterator[Any]:
    yield gauge(
        "cdc_sink_consumer_lag_messages",
        "Messages not yet applied, by topic and partition.",
        labels=["topic", "partition"],
        values=[((t, str(p)), n) for (t, p), n in list(sink.lag.items())],
    )
    if sink.last_applied_ts_us is not None:
        yield gauge(
            "cdc_sink_last_applied_commit_timestamp_seconds",
            "Source commit time of the newest change applied.",
            sink.last_applied_ts_us / 1e6,
        )
    yield gauge("cdc_sink_up", "1 while the sink can make progress.", 1.0 if sink.health()[0] else 0.0)
