"""Scenario 6 (--full): source and sink events/s as transactions and rows grow: transactions of 1,
100 and 10,000 changes, rows of ~100 B and ~4 KB; each cell in fresh databases and topics, with its
own baselines (pg_recvlogical and native logical replication of the same WAL)."""

import logging
from typing import Any

from bench.config import GrowthCell, Workload
from bench.context import Context
from bench.scenarios import changes

log = logging.getLogger("bench.growth")


def run_cell(ctx: Context, cell: GrowthCell) -> dict[str, Any]:
    workload = Workload(cell.changes, tx_size=cell.tx_size, pad_bytes=cell.pad_bytes)
    base: dict[str, Any] = {"tx_size": cell.tx_size, "row_size": cell.row_label, "changes": cell.changes}
    try:
        result = changes.run(ctx, workload, baselines=True, name="grw")
    except Exception as exc:  # one cell failing must not lose the others
        log.error("growth cell %s rows x %s failed: %s", cell.tx_size, cell.row_label, exc)
        return {**base, "error": str(exc)}
    return {
        **base,
        "avg_row_bytes": result["generated"]["avg_row_bytes"],
        "wal_bytes": result["generated"]["wal_bytes"],
        "source_events_per_s": result["source"]["events_per_s"],
        "sink_events_per_s": result["sink"]["events_per_s"],
        "recvlogical_events_per_s": result["recvlogical"]["events_per_s"],
        "native_lr_rows_per_s": result["native_lr"]["rows_per_s"],
        "source_peak_rss_mb": result["source"]["peak_rss_mb"],
        "sink_peak_rss_mb": result["sink"]["peak_rss_mb"],
        "source_seconds": result["source"]["seconds"],
        "sink_seconds": result["sink"]["seconds"],
    }


def run(ctx: Context, cells: tuple[GrowthCell, ...]) -> list[dict[str, Any]]:
    results = []
    for cell in cells:
        log.info("growth: %d changes, transactions of %d, rows %s", cell.changes, cell.tx_size, cell.row_label)
        results.append(run_cell(ctx, cell))
    return results
