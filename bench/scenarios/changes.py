"""Scenarios 1, 2 and 5: N changes already in the WAL, consumed by cdc-source (against
pg_recvlogical), then already in the topics, applied by cdc-sink (against native logical
replication of the same WAL); the peak RSS of both connectors on the way."""

import contextlib
import logging
from typing import Any

from bench import measure
from bench.config import Workload, scenario_tag
from bench.context import Context
from bench.kafka import delete_prefix, message_count
from bench.pg import Scratch, connect, create_logical_slot
from bench.workload import TABLE, create_schema, fingerprint, generate
from pg_kafka_cdc.common.lsn import int_to_lsn

log = logging.getLogger("bench.changes")


def run(ctx: Context, workload: Workload, baselines: bool = True, name: str = "chg") -> dict[str, Any]:
    tag = scenario_tag(name)
    prefix, group = tag, f"{tag}_sink"
    slot_source, slot_recv, slot_lr = f"{tag}_src", f"{tag}_rl", f"{tag}_lr"
    scratch = Scratch(ctx.endpoints)
    result: dict[str, Any] = {
        "tag": tag,
        "workload": {
            "changes": workload.changes,
            "tx_size": workload.tx_size,
            "pad_bytes": workload.pad_bytes,
            "mix_insert_update_delete_pct": list(workload.mix),
            "transactions": workload.transactions,
        },
    }
    try:
        source_dsn = scratch.source_db(tag)
        with contextlib.closing(connect(source_dsn)) as conn:
            create_schema(conn, publication=tag if baselines else None)
            create_logical_slot(conn, slot_source, "wal2json")
            if baselines:
                create_logical_slot(conn, slot_recv, "wal2json")
                create_logical_slot(conn, slot_lr, "pgoutput")
            log.info("%s: generating %d changes in transactions of %d", tag, workload.changes, workload.tx_size)
            generated = generate(conn, workload)
            expected = fingerprint(conn)
        result["generated"] = {**generated.describe(), "end_lsn": int_to_lsn(generated.end_lsn)}
        log.info(
            "%s: generated in %.1f s, %.1f MB of WAL",
            tag,
            generated.seconds,
            (generated.end_lsn - generated.start_lsn) / 1e6,
        )
        n = workload.changes

        if baselines:
            result["recvlogical"] = measure.recvlogical(ctx, source_dsn, slot_recv, generated.end_lsn, n)
            log.info("%s: pg_recvlogical %.0f events/s", tag, result["recvlogical"]["events_per_s"])

        result["source"] = measure.source(
            ctx, source_dsn, prefix, slot_source, generated.start_lsn, generated.end_lsn, n
        )
        result["topic_messages"] = message_count(ctx.bootstrap, f"{prefix}.public.{TABLE}")
        log.info(
            "%s: cdc-source %.0f events/s, peak RSS %.0f MB",
            tag,
            result["source"]["events_per_s"],
            result["source"]["peak_rss_mb"],
        )
        for what in ("recvlogical", "source"):
            if what in result:
                cpu = result[what]["cpu"]
                log.info(
                    "%s: while %s read the WAL: machine %.2f busy cores; CPU us per event %s",
                    tag,
                    what,
                    cpu["machine_busy_cores"],
                    ", ".join(f"{k} {v:.1f}" for k, v in cpu["cpu_us_per_event"].items()),
                )

        if baselines:
            lr_dsn = scratch.target_db(f"{tag}_lr")
            scratch.subscriptions.append((f"{tag}_lr", slot_lr))
            result["native_lr"] = measure.native_lr(ctx, tag, lr_dsn, tag, slot_lr, generated.end_lsn, n, expected)
            log.info("%s: native logical replication %.0f rows/s", tag, result["native_lr"]["rows_per_s"])

        sink_dsn = scratch.target_db(f"{tag}_sink")
        result["sink"] = measure.sink_once(ctx, source_dsn, sink_dsn, prefix, group, slot_source, n, expected)
        log.info(
            "%s: cdc-sink %.0f events/s, peak RSS %.0f MB",
            tag,
            result["sink"]["events_per_s"],
            result["sink"]["peak_rss_mb"],
        )
        return result
    finally:
        scratch.cleanup()
        delete_prefix(ctx.bootstrap, prefix, (group, f"{group}-once-probe"))
