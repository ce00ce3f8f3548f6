"""Results: one JSON document per run (flat headline figures, ratios, targets, workload, machine,
per-scenario details) and its readable markdown table."""

import json
import os
from pathlib import Path
from typing import Any

from bench.config import RESULTS_DIR, TARGETS, Plan, Target


def dig(doc: Any, *keys: str) -> Any:
    """doc[k1][k2]..., or None as soon as a level is missing."""
    for key in keys:
        if not isinstance(doc, dict) or key not in doc:
            return None
        doc = doc[key]
    return doc


def ratio(value: float | None, baseline: float | None) -> float | None:
    if value is None or baseline is None or baseline <= 0:
        return None
    return round(value / baseline, 3)


def verdict(target: Target, value: float | None) -> str:
    if value is None:
        return "n/a"
    if target.higher_is_better:
        met_must, met_aim = value >= target.must, value >= target.aim
    else:
        met_must, met_aim = value <= target.must, value <= target.aim
    if not met_must:
        return "FAIL"
    return "pass, aim met" if met_aim else "pass"


def assemble(
    plan: Plan,
    machine: dict[str, Any],
    scenarios: dict[str, Any],
    errors: dict[str, str],
    duration_s: float,
    log_dir: Path,
) -> dict[str, Any]:
    chg = scenarios.get("changes")
    snap = scenarios.get("snapshot")
    lat = scenarios.get("latency")
    results: dict[str, Any] = {
        "mode": plan.mode,
        "date": machine["date"],
        "commit": machine["git"]["short"],
        "duration_s": round(duration_s, 1),
        "source_events_per_s": dig(chg, "source", "events_per_s"),
        "recvlogical_events_per_s": dig(chg, "recvlogical", "events_per_s"),
        "sink_events_per_s": dig(chg, "sink", "events_per_s"),
        "native_lr_rows_per_s": dig(chg, "native_lr", "rows_per_s"),
        "snapshot_rows_per_s": dig(snap, "sink", "log_rows_per_s"),
        "snapshot_wall_rows_per_s": dig(snap, "sink", "wall_rows_per_s"),
        "copy_pipe_rows_per_s": dig(snap, "copy_pipe", "rows_per_s"),
        "e2e_latency_ms": dig(lat, "latency_ms") or {"p50": None, "p99": None, "max": None},
        "native_lr_latency_ms": dig(lat, "native_lr", "latency_ms") or {"p50": None, "p99": None, "max": None},
        "latency_stages_ms": dig(lat, "stages_ms") or {},
        "wal_read_cpu": {
            "pg_recvlogical": dig(chg, "recvlogical", "cpu"),
            "cdc-source": dig(chg, "source", "cpu"),
        },
        "source_peak_rss_mb": dig(chg, "source", "peak_rss_mb"),
        "sink_peak_rss_mb": dig(chg, "sink", "peak_rss_mb"),
    }
    results["ratios"] = {
        "source_vs_recvlogical": ratio(results["source_events_per_s"], results["recvlogical_events_per_s"]),
        "sink_vs_native_lr": ratio(results["sink_events_per_s"], results["native_lr_rows_per_s"]),
        "snapshot_vs_copy_pipe": ratio(results["snapshot_rows_per_s"], results["copy_pipe_rows_per_s"]),
        "snapshot_wall_vs_copy_pipe": ratio(results["snapshot_wall_rows_per_s"], results["copy_pipe_rows_per_s"]),
    }
    results["targets"] = [
        {
            "figure": t.key,
            "label": t.label,
            "value": dig(results, *t.key.split(".")),
            "must_reach": t.must,
            "aim": t.aim,
            "comparison": ">=" if t.higher_is_better else "<=",
            "result": verdict(t, dig(results, *t.key.split("."))),
        }
        for t in TARGETS
    ]
    results["workload"] = {
        "changes": {
            "n": plan.changes.changes,
            "tx_size": plan.changes.tx_size,
            "mix_insert_update_delete_pct": list(plan.changes.mix),
            "pad_bytes": plan.changes.pad_bytes,
            "table_columns": 11,
            "avg_row_bytes": dig(chg, "generated", "avg_row_bytes"),
            "wal_bytes": dig(chg, "generated", "wal_bytes"),
            "topic_messages": dig(chg, "topic_messages"),
        },
        "snapshot": {
            "rows": plan.snapshot_rows,
            "table_columns": 11,
            "avg_row_bytes": dig(snap, "avg_row_bytes"),
        },
        "latency": {
            "seconds": plan.latency_seconds,
            "writer_rate": plan.writer_rate,
            "writer_rate_achieved": dig(lat, "writer_rate_achieved"),
            "writer_batch": 1,
            "probe_interval_ms": plan.probe_interval * 1000,
            "poll_interval_ms": plan.poll_interval * 1000,
            "probes": dig(lat, "probes_sent"),
        },
        "growth_cells": [
            {"tx_size": c.tx_size, "row_size": c.row_label, "pad_bytes": c.pad_bytes, "changes": c.changes}
            for c in plan.growth
        ],
    }
    results["growth"] = scenarios.get("growth")
    results["debezium"] = debezium_summary(scenarios.get("debezium"))
    if results["debezium"] and results["debezium"].get("ratios"):
        results["ratios"]["source_vs_debezium_source"] = results["debezium"]["ratios"].get("source_events_per_s")
        results["ratios"]["sink_vs_debezium_jdbc_sink"] = results["debezium"]["ratios"].get("sink_events_per_s")
    results["transactions"] = transactions_summary(scenarios.get("transactions"))
    txn_ratios = dig(results, "transactions", "ratios") or {}
    for key in ("source_metadata_vs_plain", "sink_transaction_vs_row", "sink_transaction_vs_native_lr"):
        if key in txn_ratios:
            results["ratios"][key] = txn_ratios[key]
    results["workload"]["transactions"] = {
        "kind": "pgbench tpcb-like",
        "transactions": plan.tpcb.transactions,
        "changes": plan.tpcb.changes,
        "scale": plan.tpcb.scale,
        "partitions": plan.tpcb.partitions,
        "wal_bytes": dig(scenarios.get("transactions"), "generated", "wal_bytes"),
    }
    results["machine"] = machine
    # a scenario that records failed measurements of its own (and returns the others) names them
    inner = {
        f"{name}.{part}": text
        for name, doc in scenarios.items()
        if isinstance(doc, dict)
        for part, text in (doc.get("errors") or {}).items()
    }
    results["errors"] = {**errors, **inner}
    results["logs"] = str(log_dir)
    results["scenarios"] = {k: v for k, v in scenarios.items() if k != "growth"}
    return results


# The systems of the Debezium baseline (scenario 7), as bench/debezium.py names them.
DEBEZIUM_SYSTEMS = (
    ("cdc_source", "cdc-source"),
    ("debezium_source", "Debezium PostgreSQL source (JSON with schemas)"),
    ("debezium_source_schemaless", "Debezium PostgreSQL source (schemaless JSON)"),
    ("cdc_sink", "cdc-sink"),
    ("debezium_jdbc_sink", "Debezium JDBC sink (JSON with schemas)"),
)
DEBEZIUM_FIGURES = (
    "events_per_s",
    "peak_rss_mb",
    "cpu_seconds",
    "cpu_seconds_first_to_last",
    "first_event_after_s",
    "first_to_last_s",
    "connect_start_s",
    "wall_events_per_s",
    "start_to_confirm_events_per_s",
    "start_to_exit_events_per_s",
)


def debezium_summary(dbz: Any) -> dict[str, Any] | None:
    """The headline figures of scenario 7 (its details stay under scenarios.debezium)."""
    if not dbz:
        return None
    if "blocked" in dbz:
        return {"blocked": dbz["blocked"], "versions": dbz.get("versions")}
    return {
        "systems": {
            key: {f: dbz[key].get(f) for f in DEBEZIUM_FIGURES if f in dbz[key]}
            for key, _ in DEBEZIUM_SYSTEMS
            if key in dbz
        },
        "ratios": dbz.get("ratios"),
        "versions": dbz.get("versions"),
        "java": dbz.get("java"),
        "maven_fetch_seconds": dig(dbz, "maven", "fetch_seconds"),
        "maven_cached": dig(dbz, "maven", "cached"),
    }


# The measurements of scenario 8 (bench/scenarios/transactions.py): key, label, and the baseline
# each is compared with (key, label), None for a baseline itself.
TRANSACTION_SYSTEMS: tuple[tuple[str, str, tuple[str, str] | None], ...] = (
    ("source", "cdc-source", None),
    ("source_metadata", "cdc-source --transaction-metadata", ("source", "cdc-source")),
    ("native_lr", "native logical replication", None),
    ("sink_row", "cdc-sink --consistency row (the default)", ("native_lr", "native logical replication")),
    ("sink_transaction", "cdc-sink --consistency transaction", ("sink_row", "cdc-sink --consistency row")),
)
TRANSACTION_FIGURES = ("events_per_s", "rows_per_s", "transactions_per_s", "seconds", "peak_rss_mb", "cpu_seconds")


def transactions_summary(txn: Any) -> dict[str, Any] | None:
    """The headline figures of scenario 8 (its details stay under scenarios.transactions)."""
    if not txn:
        return None
    return {
        "systems": {
            key: {f: txn[key][f] for f in TRANSACTION_FIGURES if f in txn[key]}
            for key, _, _ in TRANSACTION_SYSTEMS
            if key in txn
        },
        "ratios": txn.get("ratios"),
        "workload": txn.get("workload"),
    }


# --- markdown ------------------------------------------------------------------------------------------


def _num(value: float | None, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "n/a"
    text = f"{value:,.{digits}f}"
    return f"{text} {unit}".strip()


def _limit(target: Target, value: float) -> str:
    sign = "≥" if target.higher_is_better else "≤"
    return f"{sign} {value:g}" + ("" if target.unit == "x" else f" {target.unit}")


def main_table(results: dict[str, Any]) -> list[str]:
    """figure | value | baseline | ratio | must reach | aim | result."""
    by_key = {t.key: t for t in TARGETS}
    r = results
    lat = r["e2e_latency_ms"]

    lr = r.get("native_lr_latency_ms") or {}
    stages = r.get("latency_stages_ms") or {}

    def lr_lat(figure: str) -> str:
        return "" if lr.get(figure) is None else f"native logical replication {_num(lr[figure], 'ms', 1)}"

    def lat_ratio(figure: str) -> str:
        return _num(ratio(lat[figure], lr.get(figure)), digits=2) if lr.get(figure) else ""

    def targeted(key: str) -> tuple[str, str, str]:
        target = by_key[key]
        return _limit(target, target.must), _limit(target, target.aim), verdict(target, dig(r, *key.split(".")))

    rows = [
        (
            "cdc-source throughput",
            _num(r["source_events_per_s"], "events/s"),
            f"pg_recvlogical {_num(r['recvlogical_events_per_s'], 'events/s')}",
            _num(r["ratios"]["source_vs_recvlogical"], digits=3),
            *targeted("ratios.source_vs_recvlogical"),
        ),
        (
            "cdc-sink throughput",
            _num(r["sink_events_per_s"], "events/s"),
            f"native logical replication {_num(r['native_lr_rows_per_s'], 'rows/s')}",
            _num(r["ratios"]["sink_vs_native_lr"], digits=3),
            *targeted("ratios.sink_vs_native_lr"),
        ),
        (
            "bulk snapshot (sink's log line)",
            _num(r["snapshot_rows_per_s"], "rows/s"),
            f"COPY pipe {_num(r['copy_pipe_rows_per_s'], 'rows/s')}",
            _num(r["ratios"]["snapshot_vs_copy_pipe"], digits=3),
            *targeted("ratios.snapshot_vs_copy_pipe"),
        ),
        (
            "bulk snapshot (wall clock, process start to exit)",
            _num(r["snapshot_wall_rows_per_s"], "rows/s"),
            f"COPY pipe {_num(r['copy_pipe_rows_per_s'], 'rows/s')}",
            _num(r["ratios"]["snapshot_wall_vs_copy_pipe"], digits=3),
            "",
            "",
            "info",
        ),
        ("end-to-end latency p50", _num(lat["p50"], "ms", 1), lr_lat("p50"), lat_ratio("p50"), "", "", "info"),
        (
            "end-to-end latency p99",
            _num(lat["p99"], "ms", 1),
            lr_lat("p99"),
            lat_ratio("p99"),
            *targeted("e2e_latency_ms.p99"),
        ),
        ("end-to-end latency max", _num(lat["max"], "ms", 1), lr_lat("max"), lat_ratio("max"), "", "", "info"),
        *(
            (
                f"latency p50 / p99, {label}",
                f"{_num(part['p50'], 'ms', 1)} / {_num(part['p99'], 'ms', 1)}",
                "",
                "",
                "",
                "",
                "info",
            )
            for label, part in (
                ("source commit to Kafka (cdc-source)", stages.get("commit_to_kafka")),
                ("Kafka to target (broker, cdc-sink)", stages.get("kafka_to_target")),
                ("Kafka to readable by a plain consumer (linger, broker, fetch)", stages.get("kafka_to_readable")),
                ("readable to target (cdc-sink, the target poll)", stages.get("readable_to_target")),
            )
            if part
        ),
        *(
            (
                f"CPU per event while {who} read the WAL",
                ", ".join(f"{k} {v:.1f} us" for k, v in cpu["cpu_us_per_event"].items()),
                f"machine {cpu['machine_busy_cores']:.2f} busy cores",
                "",
                "",
                "",
                "info",
            )
            for who, cpu in (r.get("wal_read_cpu") or {}).items()
            if cpu
        ),
        (
            "cdc-source peak RSS (scenario 1)",
            _num(r["source_peak_rss_mb"], "MB", 1),
            "",
            "",
            *targeted("source_peak_rss_mb"),
        ),
        (
            "cdc-sink peak RSS (scenario 2)",
            _num(r["sink_peak_rss_mb"], "MB", 1),
            "",
            "",
            *targeted("sink_peak_rss_mb"),
        ),
    ]
    lines = [
        "| figure | value | baseline | ratio | must reach | aim | result |",
        "| --- | ---: | --- | ---: | --- | --- | --- |",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _ratio_text(value: float | None, baseline: float | None) -> str:
    r = ratio(value, baseline)
    return "-" if r is None else f"{r:.3f}"


def growth_table(results: dict[str, Any]) -> list[str]:
    """One row per cell, each with its own baselines (cells of runs before they were measured show -)."""
    growth = results.get("growth")
    if not growth:
        return []
    lines = [
        "| transaction size | row size | changes | avg row (B) | cdc-source events/s | pg_recvlogical events/s "
        "| ratio | cdc-sink events/s | native LR rows/s | ratio | peak RSS source / sink (MB) |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for cell in growth:
        if "error" in cell:
            lines.append(
                f"| {cell['tx_size']:,} | {cell['row_size']} | {cell['changes']:,} | "
                f"failed: {cell['error'][:80]} | | | | | | | |"
            )
            continue
        recv, lr = cell.get("recvlogical_events_per_s"), cell.get("native_lr_rows_per_s")
        lines.append(
            f"| {cell['tx_size']:,} | {cell['row_size']} | {cell['changes']:,} | {cell['avg_row_bytes']:,.0f} | "
            f"{_num(cell['source_events_per_s'])} | {_num(recv) if recv else '-'} | "
            f"{_ratio_text(cell['source_events_per_s'], recv)} | "
            f"{_num(cell['sink_events_per_s'])} | {_num(lr) if lr else '-'} | "
            f"{_ratio_text(cell['sink_events_per_s'], lr)} | "
            f"{_mb(cell.get('source_peak_rss_mb'))} / {_mb(cell.get('sink_peak_rss_mb'))} |"
        )
    return lines


CHANGES_KIND = "scenarios 1-2: process start to the end of the WAL or topic"
DEBEZIUM_KIND = "scenario 7: first to last event"


def throughput_panels(results: dict[str, Any]) -> list[tuple[str, list[tuple[str, float, str]]]]:
    """The bars of bench/results/throughput.png: events/s of every system of the run, readers of the WAL
    apart from appliers to the target; a system the run did not measure has no bar."""
    systems = dig(results, "debezium", "systems") or {}

    def bars(entries: list[tuple[str, Any, str]]) -> list[tuple[str, float, str]]:
        return [(label, float(value), kind) for label, value, kind in entries if value]

    reading = bars(
        [
            ("pg_recvlogical (to /dev/null)", results.get("recvlogical_events_per_s"), CHANGES_KIND),
            ("cdc-source", results.get("source_events_per_s"), CHANGES_KIND),
            ("cdc-source", dig(systems, "cdc_source", "events_per_s"), DEBEZIUM_KIND),
            *(
                (label, dig(systems, key, "events_per_s"), DEBEZIUM_KIND)
                for key, label in DEBEZIUM_SYSTEMS
                if key.startswith("debezium_source")
            ),
        ]
    )
    applying = bars(
        [
            ("native logical replication", results.get("native_lr_rows_per_s"), CHANGES_KIND),
            ("cdc-sink", results.get("sink_events_per_s"), CHANGES_KIND),
            ("cdc-sink", dig(systems, "cdc_sink", "events_per_s"), DEBEZIUM_KIND),
            ("Debezium JDBC sink", dig(systems, "debezium_jdbc_sink", "events_per_s"), DEBEZIUM_KIND),
        ]
    )
    return [
        (name, panel)
        for name, panel in (("reading the WAL (into Kafka)", reading), ("applying to the target", applying))
        if panel
    ]


def machine_line(results: dict[str, Any]) -> str:
    m = results["machine"]
    dirty = f" + {len(m['git']['modified_files'])} modified files" if m["git"]["modified_files"] else ""
    return (
        f"{m['cores_logical']} cores ({m['cpu_model']}{_clock(m)}), {m['ram_gb']} GB RAM; PostgreSQL {m['postgresql_source']}, "
        f"wal2json {m['wal2json']}, Kafka {m['kafka']}, Python {m['python']}, confluent-kafka "
        f"{m['confluent_kafka']} / librdkafka {m['librdkafka']}; commit {m['git']['short']}{dirty}; "
        f"load average at start {', '.join(str(x) for x in m['load_average_at_start'])}{_steal(m)}"
    )


def _clock(machine: dict[str, Any]) -> str:
    mhz, cache = machine.get("cpu_mhz"), machine.get("cpu_cache")
    return f", {float(mhz):.0f} MHz, {cache} cache" if mhz and cache else ""


def _steal(machine: dict[str, Any]) -> str:
    """The CPU time the host took (runs recorded before it was measured have none)."""
    shares = machine.get("cpu_steal_pct") or {}
    if shares.get("run") is None:
        return ""
    parts = ", ".join(f"{k} {v:g} %" for k, v in shares.items() if k != "run" and v is not None)
    return f"; busy CPU time the host took (steal): {shares['run']:g} % over the run ({parts})"


def workload_lines(results: dict[str, Any]) -> list[str]:
    w = results["workload"]
    c, s, lat = w["changes"], w["snapshot"], w["latency"]
    return [
        f"- Scenarios 1-2: {c['n']:,} changes ({'/'.join(map(str, c['mix_insert_update_delete_pct']))} % "
        f"insert/update/delete), {c['tx_size']} per transaction, {c['table_columns']}-column person table, "
        f"average row {_num(c['avg_row_bytes'])} B, {_num((c['wal_bytes'] or 0) / 1e6)} MB of WAL, "
        f"{_num(c['topic_messages'])} topic messages.",
        f"- Scenario 3: {s['rows']:,} rows, {s['table_columns']} columns, average row {_num(s['avg_row_bytes'])} B.",
        f"- Scenario 4: {lat['seconds']:g} s, cdc-writer --rate {lat['writer_rate']:g} --batch 1 "
        f"(achieved {_num(lat['writer_rate_achieved'])} ops/s), a probe every {lat['probe_interval_ms']:g} ms "
        f"({_num(lat['probes'])} probes), target polled every {lat['poll_interval_ms']:g} ms.",
    ]


def _cores(part: Any) -> str:
    cpu, seconds = dig(part, "cpu_seconds"), dig(part, "seconds")
    if cpu is None or not seconds:
        return "n/a"
    return f"{cpu:.1f} CPU-s in {seconds:.1f} s (~{cpu / seconds:.2f} cores)"


def resource_lines(results: dict[str, Any]) -> list[str]:
    chg = dig(results, "scenarios", "changes")
    lat = dig(results, "scenarios", "latency")
    lines = []
    if chg:
        lines.append(
            f"- CPU: cdc-source {_cores(chg.get('source'))} in scenario 1, "
            f"cdc-sink {_cores(chg.get('sink'))} in scenario 2."
        )
    if lat:
        secs = lat.get("seconds") or 0
        src, snk = dig(lat, "source", "cpu_seconds"), dig(lat, "sink", "cpu_seconds")
        if secs and src is not None and snk is not None:
            lines.append(
                f"- CPU under the latency load: cdc-source ~{src / secs:.2f} cores, "
                f"cdc-sink ~{snk / secs:.2f} cores (whole process lifetime / probing time)."
            )
    return lines


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _settings(values: dict[str, str]) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in values.items())


def debezium_table(results: dict[str, Any]) -> list[str]:
    """Scenario 7: the four systems side by side, the ratios, and every setting used."""
    dbz = dig(results, "scenarios", "debezium")
    if not dbz:
        return []
    if "blocked" in dbz:
        return [f"- blocked: {dbz['blocked']}"]
    lines = [
        "| system | events/s (first to last event) | peak RSS (MB) | CPU s (whole process) "
        "| CPU s (first to last event) | first event after start (s) | Connect start (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, label in DEBEZIUM_SYSTEMS:
        part = dbz.get(key)
        if not part:
            continue
        lines.append(
            f"| {label} | {_num(part.get('events_per_s'))} | {_num(part.get('peak_rss_mb'))} "
            f"| {_num(part.get('cpu_seconds'), digits=1)} | {_num(part.get('cpu_seconds_first_to_last'), digits=1)} "
            f"| {_num(part.get('first_event_after_s'), digits=1)} "
            f"| {_num(part.get('connect_start_s'), digits=1) if 'connect_start_s' in part else '-'} |"
        )
    r = dbz.get("ratios") or {}
    lines += [
        "",
        "| ours / Debezium's | events/s | peak RSS | CPU s (whole process) | CPU s (first to last event) |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| cdc-source / Debezium source (JSON with schemas) | {_x(r.get('source_events_per_s'))} "
        f"| {_x(r.get('source_peak_rss'))} | {_x(r.get('source_cpu_seconds'))} "
        f"| {_x(r.get('source_cpu_seconds_first_to_last'))} |",
        f"| cdc-sink / Debezium JDBC sink | {_x(r.get('sink_events_per_s'))} | {_x(r.get('sink_peak_rss'))} "
        f"| {_x(r.get('sink_cpu_seconds'))} | {_x(r.get('sink_cpu_seconds_first_to_last'))} |",
    ]
    if r.get("source_events_per_s_vs_schemaless") is not None:
        lines.append(
            f"| cdc-source / Debezium source (schemaless JSON) | {_x(r['source_events_per_s_vs_schemaless'])} | | | |"
        )
    lines += ["", *debezium_settings(dbz)]
    return lines


def debezium_settings(dbz: dict[str, Any]) -> list[str]:
    """How scenario 7 ran, every setting stated (enough to rerun it by hand)."""
    v, w, g = dbz.get("versions") or {}, dbz.get("workload") or {}, dbz.get("generated") or {}
    mvn = dbz.get("maven") or {}
    fetch = "cached" if mvn.get("cached") else f"fetched in {mvn.get('fetch_seconds', 0):.0f} s"
    lines = [
        f"- Workload: the `changes` scenario's, {_num(w.get('changes'))} changes "
        f"({'/'.join(map(str, w.get('mix_insert_update_delete_pct', [])))} % insert/update/delete), "
        f"{w.get('tx_size')} per transaction, average row {_num(g.get('avg_row_bytes'))} B, "
        f"{_num((g.get('wal_bytes') or 0) / 1e6)} MB of WAL, in the WAL before any consumer starts; each system "
        "has its own slot, topics (own prefix) and target database, dropped afterwards; one system runs at a time.",
        "- Measured: events/s = changes / (last event - first event): for sources the first message in the "
        "topic until all changes and tombstones are there, for sinks the first row in the target table until "
        "it equals the source's table (polled every 50 ms for all four); peak RSS and CPU seconds of the whole "
        "process (the JVM, or the Python process), CPU also for the first-to-last-event span alone. "
        "cdc-source's and cdc-sink's figures from process start (as in scenarios 1-2): "
        f"{_num(dig(dbz, 'cdc_source', 'start_to_confirm_events_per_s'))} and "
        f"{_num(dig(dbz, 'cdc_sink', 'start_to_exit_events_per_s'))} events/s.",
        f"- Versions: io.debezium:debezium-connector-postgres {v.get('debezium.version')}, "
        f"io.debezium:debezium-connector-jdbc {v.get('debezium.jdbc.version')} (with "
        f"org.hibernate.orm:hibernate-core and hibernate-agroal {v.get('hibernate.version')}), "
        f"org.apache.kafka:connect-runtime {v.get('connect.version')} (standalone mode, one worker per "
        f"connector), log4j {v.get('log4j.version')}; {dbz.get('java')}; jars from Maven Central by "
        f"`{mvn.get('pom', 'bench/debezium/pom.xml')}` ({fetch}; plugin folders without the groups "
        f"{', '.join(mvn.get('plugin_excluded_groups', []))}).",
        f"- JVM: `java {' '.join(dbz.get('jvm_options', []))} "
        "-Dlog4j2.configurationFile=bench/debezium/log4j2.properties -cp <runtime>/* "
        "org.apache.kafka.connect.cli.ConnectStandalone worker.properties connector.properties`.",
    ]
    for key, label in DEBEZIUM_SYSTEMS:
        part = dbz.get(key) or {}
        if "connector_settings" in part:
            lines.append(f"- {label}, connector: {_settings(part['connector_settings'])}.")
    lines += [f"- {note}" for note in dbz.get("notes", [])]
    for key, label in (("debezium_source", "source"), ("debezium_jdbc_sink", "JDBC sink")):
        worker = dig(dbz, key, "worker_settings")
        if worker:
            worker = {k: v for k, v in worker.items() if k not in {"listeners", "offset.storage.file.filename"}}
            lines.append(
                f"- Worker of the {label}: {_settings(worker)}, `listeners=http://127.0.0.1:<free port>`, "
                "`offset.storage.file.filename=<scratch file>`."
            )
    return lines


def _rate(part: dict[str, Any]) -> float | None:
    """Changes applied or published per second (native replication's are rows)."""
    value = part.get("events_per_s", part.get("rows_per_s"))
    return None if value is None else float(value)


def _plural(count: Any, noun: str) -> str:
    if count is None:
        return f"n/a {noun}s"
    plural = noun + ("es" if noun.endswith("ch") else "s")
    return f"{count:,} {noun if count == 1 else plural}"


def transactions_table(results: dict[str, Any]) -> list[str]:
    """Scenario 8: both sources and both sink modes side by side, with native replication."""
    txn = dig(results, "scenarios", "transactions")
    if not txn:
        return []
    lines = [
        "| system | events/s | source transactions/s | against | peak RSS (MB) | CPU s |",
        "| --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for key, label, baseline in TRANSACTION_SYSTEMS:
        part = txn.get(key)
        if not part:
            lines.append(
                f"| {label} | failed | | | | |"
                if key in (txn.get("errors") or {})
                else f"| {label} | n/a | | | | |"
            )
            continue
        against = "baseline"
        if baseline is not None:
            against = f"{_x(ratio(_rate(part), _rate(txn.get(baseline[0]) or {})))} {baseline[1]}"
        if key == "sink_transaction":
            against += f", {_x(dig(txn, 'ratios', 'sink_transaction_vs_native_lr'))} native logical replication"
        lines.append(
            f"| {label} | {_num(_rate(part))} | {_num(part.get('transactions_per_s'))} | {against} "
            f"| {_num(part.get('peak_rss_mb'), digits=1) if 'peak_rss_mb' in part else '-'} "
            f"| {_num(part.get('cpu_seconds'), digits=1) if 'cpu_seconds' in part else '-'} |"
        )
    w, g = txn.get("workload") or {}, txn.get("generated") or {}
    lines += [
        "",
        f"- Workload: {_num(w.get('transactions'))} transactions of pgbench's built-in tpcb-like script "
        f"(each adds one delta to an account, a teller and a branch and inserts a history row: "
        f"{w.get('changes_per_transaction')} changes on 4 tables), scale {w.get('scale')} "
        f"({_num(w.get('accounts'))} accounts, {_num(w.get('tellers'))} tellers, "
        f"{_plural(w.get('branches'), 'branch')}), "
        f"{_num(w.get('changes'))} changes, {_num((g.get('wal_bytes') or 0) / 1e6)} MB of WAL, in the WAL before "
        f"any consumer starts; topics of {_plural(w.get('partitions'), 'partition')}.",
        "- Measured as in scenarios 1-2: a source from process start until its slot confirms the end of the "
        "workload, a sink from process start to exit (`--once`, `--snapshot never`: every target starts "
        "with pgbench -i's rows, the source's before the workload), native logical replication from "
        "enabling its subscription until the target equals the source; each has its own slot or group and "
        "target database, one at a time. Both sinks read the topics of the source with "
        "--transaction-metadata; events/s count changes (native replication's are rows), not the "
        "transaction topic's records.",
    ]
    point = dig(txn, "sink_transaction", "consistent_point")
    if point:
        state = "consistent" if point.get("reached") else "not yet consistent"
        lines.append(
            f"- cdc-sink --consistency transaction ended {state} as of source commit {point.get('commit_lsn')} "
            f"at {point.get('committed_at')} ({_num(point.get('transactions_applied'))} source transactions "
            "applied, as it reports them)."
        )
    for key, text in (txn.get("errors") or {}).items():
        lines.append(f"- {key} failed: {text.splitlines()[0] if text else '?'}")
    return lines


def render(results: dict[str, Any]) -> str:
    lines = [
        f"# Benchmark: {results['mode']} run of {results['date']} (commit {results['commit']})",
        "",
        machine_line(results),
        "",
        *main_table(results),
        "",
        *workload_lines(results),
        *resource_lines(results),
        f"- The run took {results['duration_s']:.0f} s. Child process logs: {results['logs']}",
    ]
    if results.get("growth"):
        lines += ["", "## Growth", "", *growth_table(results)]
    if dig(results, "scenarios", "debezium"):
        lines += ["", "## Debezium baseline (scenario 7)", "", *debezium_table(results)]
    if dig(results, "scenarios", "transactions"):
        lines += ["", "## Source transactions applied whole (scenario 8)", "", *transactions_table(results)]
    if results.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {k}: {v}" for k, v in results["errors"].items()]
    lines += ["", "Latency over time and its histogram: bench/results/latency.png"]
    if results.get("throughput_plot"):
        lines += [f"Events/s per system: {results['throughput_plot']}"]
    lines += [""]
    return "\n".join(lines)


# --- files ---------------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write(results: dict[str, Any], stamp: str) -> list[Path]:
    """latest.json, <stamp>-<commit>.json (earlier ones kept) and latest.md."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    doc = json.dumps(results, indent=2, default=str) + "\n"
    paths = [
        RESULTS_DIR / "latest.json",
        RESULTS_DIR / f"{stamp}-{results['commit']}.json",
        RESULTS_DIR / "latest.md",
    ]
    _write(paths[0], doc)
    _write(paths[1], doc)
    _write(paths[2], render(results))
    return paths


def load_latest() -> dict[str, Any]:
    with open(RESULTS_DIR / "latest.json", encoding="utf-8") as fh:
        doc: dict[str, Any] = json.load(fh)
    return doc
