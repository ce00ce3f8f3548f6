"""cdc-source's Prometheus metrics, read from the connector's plain counters at scrape time."""

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pg_kafka_cdc.common.service import counter, gauge, samples, single_counter

if TYPE_CHECKING:
    from source_connector.connector import SourceConnector
    from source_connector.stream import Stream


def collect(connector: "SourceConnector") -> Iterator[Any]:
    yield from _counts(connector)
    yield from _oversized(connector)
    yield from _incremental(connector)
    yield from _slot(connector)
    stream = connector.stream
    if stream is not None:
        yield from _stream(connector, stream)
    yield gauge(
        "cdc_source_up", "1 while the source connector can make progress.", 1.0 if connector.health()[0] else 0.0
    )


def _counts(connector: "SourceConnector") -> Iterator[Any]:
    builder = connector.builder
    if builder is not None:
        yield counter(
            "cdc_source_events_total",
            "Change events published, by table and op (c u d r t s).",
            ["table", "op"],
            samples(builder.events),
        )
        yield counter(
            "cdc_source_bytes_total",
            "Bytes of event values published, by table.",
            ["table"],
            samples(builder.bytes),
        )
    yield counter(
        "cdc_source_snapshot_rows_total",
        "Rows published by the initial snapshot, by table.",
        ["table"],
        samples(connector.snapshot_rows),
    )
    yield counter(
        "cdc_source_nan_nulls_total",
        "NOT NULL numeric/float values wal2json turned into null (NaN, Infinity), by table and column.",
        ["table", "column"],
        samples(connector.nan.counts),
    )
    yield counter(
        "cdc_source_refetched_total",
        "Key changes whose unchanged TOASTed columns were read back from the table, by table.",
        ["table"],
        samples(connector.readback.counts) if connector.readback else [],
    )
    yield counter(
        "cdc_source_errors_total",
        "Errors by kind (Kafka client errors by their code).",
        ["kind"],
        samples(connector.kafka_errors),
    )


def _oversized(connector: "SourceConnector") -> Iterator[Any]:
    publisher = connector.publisher
    if publisher is None:
        return
    yield counter(
        "cdc_source_oversized_messages_total",
        "Messages Kafka refused as too large (each counted once, not per retry), by table.",
        ["table"],
        samples(publisher.oversized),
    )
    yield gauge(
        "cdc_source_oversized_blocked",
        "1 while a message refused as too large holds the stream back (retried until a limit is raised).",
        0.0 if publisher.refused is None else 1.0,
    )


def _incremental(connector: "SourceConnector") -> Iterator[Any]:
    incremental = connector.incremental
    if incremental is None:
        return
    yield counter(
        "cdc_source_incremental_snapshot_rows_total",
        "Rows published by snapshots taken while streaming (tables added later, cdc-source snapshot), by table.",
        ["table"],
        samples(incremental.rows),
    )
    yield single_counter(
        "cdc_source_incremental_snapshot_dropped_total",
        "Rows left out of a snapshot chunk because a change of theirs came between its watermarks.",
        incremental.dropped,
    )
    yield gauge(
        "cdc_source_incremental_snapshots_pending",
        "Tables whose snapshot while streaming is not finished.",
        float(len({r.table for r in incremental.queue} | {p.started.table for p in incremental.published})),
    )


def _slot(connector: "SourceConnector") -> Iterator[Any]:
    watch = connector.watch
    if watch is None:
        return
    wal_status, safe_wal_size, retained = watch.wal_status, watch.safe_wal_size, watch.retained
    if retained is not None:
        yield gauge(
            "cdc_source_slot_retained_wal_bytes",
            "WAL the slot holds on the source (restart_lsn to now).",
            float(retained),
        )
    if safe_wal_size is not None:
        yield gauge(
            "cdc_source_slot_safe_wal_size_bytes",
            "WAL that can be written before the slot loses some.",
            float(safe_wal_size),
        )
    if wal_status is not None:
        yield gauge(
            "cdc_source_slot_wal_status",
            "The slot's wal_status (1 for the current one).",
            labels=["status"],
            values=[
                ((s,), 1.0 if s == wal_status else 0.0) for s in ("reserved", "extended", "unreserved", "lost")
            ],
        )


def _stream(connector: "SourceConnector", stream: "Stream") -> Iterator[Any]:
    for name, doc, value in (
        ("cdc_source_transactions_total", "Source transactions read.", stream.transactions),
        ("cdc_source_messages_total", "wal2json messages read.", stream.messages),
        ("cdc_source_heartbeats_total", "Heartbeat messages read back from the WAL.", stream.heartbeats_seen),
        (
            "cdc_source_duplicates_skipped_total",
            "Messages read again from the slot after a restart that the topics held already (not published twice).",
            stream.duplicates_skipped + (stream.replay.skipped if stream.replay else 0),
        ),
    ):
        yield single_counter(name, doc, value)
    if stream.records is not None:
        yield single_counter(
            "cdc_source_transactions_published_total",
            "END records published on the transaction topic (--transaction-metadata).",
            stream.records.published,
        )
    yield gauge(
        "cdc_source_confirmed_lsn",
        "The position confirmed to the slot (flushed to Kafka).",
        float(stream.confirmed_lsn),
    )
    yield gauge("cdc_source_received_lsn", "The newest position read from the slot.", float(stream.received_lsn))
    if stream.wal_end:
        yield gauge(
            "cdc_source_slot_lag_bytes",
            "Server WAL end minus the confirmed position.",
            float(max(0, stream.wal_end - stream.confirmed_lsn)),
        )
    yield gauge(
        "cdc_source_in_flight_messages",
        "Messages handed to Kafka and not yet acknowledged.",
        float(len(connector.producer)),
    )
    if stream.last_commit_us is not None:
        yield gauge(
            "cdc_source_last_commit_timestamp_seconds",
            "Commit time of the newest transaction read.",
            stream.last_commit_us / 1e6,
        )
