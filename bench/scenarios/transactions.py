"""Scenario 8 (--full; alone: --only transactions): source transactions applied whole, against row
by row. pgbench's TPC-B-like transactions (bench/tpcb.py: an account, a teller and a branch updated
by the same delta and a history row inserted, 4 tables per transaction) already in the WAL, consumed
by cdc-source with --transaction-metadata against the same source without it (each from its own slot
into its own topics); then the topics with transaction metadata applied by cdc-sink with the default
`--consistency row` and with `--consistency transaction`, each with its own group and target
database; and native logical replication of the same WAL (which applies each transaction whole) as
the baseline of both. Every target starts from the rows the source started from (pgbench -i's
state, made on each) and must end with the source's.

Each measurement's failure is recorded (under `errors`) and the others still run."""

import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from psycopg2 import sql

from bench import measure, tpcb
from bench.config import TpcbWorkload, scenario_tag
from bench.context import Context
from bench.kafka import delete_prefix, message_count, topics_with_prefix
from bench.pg import Scratch, connect, create_logical_slot
from bench.report import dig, ratio
from pg_kafka_cdc.common.lsn import int_to_lsn

log = logging.getLogger("bench.transactions")

# The sink modes measured and their `cdc-sink` options: row is the default, passed as nothing, so it
# is what runs without the option.
SINK_MODES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("row", ()),
    ("transaction", ("--consistency", "transaction")),
)


@dataclass(frozen=True)
class Run:
    """What every measurement of one run of the scenario shares."""

    ctx: Context
    tag: str
    source_dsn: str
    workload: TpcbWorkload
    generated: tpcb.Generated
    expected: tuple[int, ...]


def with_rate(part: dict[str, Any], transactions: int, options: list[str]) -> dict[str, Any]:
    """`part` with its source transactions per second and the options it ran with."""
    part["transactions_per_s"] = round(transactions / part["seconds"], 1)
    part["options"] = options
    return part


def topic_messages(bootstrap: str, prefix: str) -> dict[str, int]:
    return {topic: message_count(bootstrap, topic) for topic in topics_with_prefix(bootstrap, prefix)}


def source(run: Run, prefix: str, slot: str, metadata: bool) -> dict[str, Any]:
    """cdc-source (with --transaction-metadata or without) until its slot confirmed the workload."""
    options = ["--partitions", str(run.workload.partitions)] + (["--transaction-metadata"] if metadata else [])
    g = run.generated
    result = measure.source(
        run.ctx,
        run.source_dsn,
        prefix,
        slot,
        g.start_lsn,
        g.end_lsn,
        g.changes,
        tables=tpcb.QUALIFIED,
        extra_args=tuple(options),
        progress_topic=f"{prefix}.public.pgbench_history",
    )
    with_rate(result, g.transactions, options)
    result["topic_messages"] = messages = topic_messages(run.ctx.bootstrap, prefix)
    if metadata:  # a BEGIN and an END per transaction
        got, want = messages.get(f"{prefix}.transaction"), 2 * g.transactions
        if got != want:
            raise RuntimeError(f"topic {prefix}.transaction holds {got} records, expected {want}")
    return result


def native_lr(run: Run, target_dsn: str, slot: str) -> dict[str, Any]:
    """A subscription of the publication, on the slot made before the workload, into pgbench -i's rows."""
    g = run.generated
    result = measure.native_lr(
        run.ctx,
        run.tag,
        target_dsn,
        run.tag,
        slot,
        g.end_lsn,
        g.changes,
        run.expected,
        prepare=functools.partial(tpcb.create_tables, scale=run.workload.scale),
        fingerprint=tpcb.fingerprint,
    )
    return with_rate(result, g.transactions, ["copy_data = false"])


def sink(
    run: Run, target_dsn: str, prefix: str, group: str, slot: str, options: tuple[str, ...]
) -> dict[str, Any]:
    """cdc-sink --once into pgbench -i's rows (--snapshot never: the stream applied to them)."""
    with contextlib.closing(connect(target_dsn)) as conn:
        tpcb.create_tables(conn, run.workload.scale)
    g = run.generated
    result = measure.sink_once(
        run.ctx,
        run.source_dsn,
        target_dsn,
        prefix,
        group,
        slot,
        g.changes,
        run.expected,
        tables=tpcb.QUALIFIED,
        snapshot="never",
        extra_args=options,
        fingerprint=tpcb.fingerprint,
    )
    with_rate(result, g.transactions, ["--snapshot", "never", *options])
    if "--consistency" in options:
        with contextlib.closing(connect(target_dsn)) as conn:
            result["consistent_point"] = consistent_point(conn, group)
    return result


def consistent_point(conn: Any, group: str) -> dict[str, Any] | None:
    """What the sink stored as the last source transaction applied whole (cdc_sink.consistency)."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('cdc_sink.consistency') IS NOT NULL")
        if not cur.fetchone()[0]:
            return None
        cur.execute(
            sql.SQL(
                "SELECT txid, commit_lsn, committed_at::text, transactions, reached FROM {} WHERE group_id = %s"
            ).format(sql.Identifier("cdc_sink", "consistency")),
            (group,),
        )
        row = cur.fetchone()
    if row is None:
        return None
    txid, lsn, committed_at, transactions, reached = row
    return {
        "txid": txid,
        "commit_lsn": int_to_lsn(int(lsn)),
        "committed_at": committed_at,
        "transactions_applied": transactions,
        "reached": reached,
    }


def run(ctx: Context, workload: TpcbWorkload) -> dict[str, Any]:
    tag = scenario_tag("txn")
    plain, meta = f"{tag}_plain", f"{tag}_meta"  # the two sources' topic prefixes
    slot_plain, slot_meta, slot_lr = f"{tag}_src", f"{tag}_srcm", f"{tag}_lr"
    groups = {mode: f"{tag}_{mode}" for mode, _ in SINK_MODES}
    scratch = Scratch(ctx.endpoints)
    errors: dict[str, str] = {}
    result: dict[str, Any] = {
        "tag": tag,
        "workload": {
            "kind": "pgbench tpcb-like",
            "transactions": workload.transactions,
            "changes": workload.changes,
            "changes_per_transaction": tpcb.CHANGES_PER_TRANSACTION,
            "tables": list(tpcb.TABLES),
            "scale": workload.scale,
            "accounts": 100_000 * workload.scale,
            "tellers": 10 * workload.scale,
            "branches": workload.scale,
            "partitions": workload.partitions,
        },
        "errors": errors,
    }

    def part(key: str, measurement: Callable[[], dict[str, Any]]) -> bool:
        try:
            result[key] = measurement()
        except Exception as exc:
            log.error("%s: %s failed: %s", tag, key, exc)
            errors[key] = str(exc)
            return False
        return True

    try:
        source_dsn = scratch.source_db(tag)
        with contextlib.closing(connect(source_dsn)) as conn:
            tpcb.create_tables(conn, workload.scale, publication=tag)
            create_logical_slot(conn, slot_plain, "wal2json")
            create_logical_slot(conn, slot_meta, "wal2json")
            create_logical_slot(conn, slot_lr, "pgoutput")
            log.info("%s: generating %d TPC-B-like transactions", tag, workload.transactions)
            generated = tpcb.generate(conn, workload)
            expected = tpcb.fingerprint(conn)
        result["generated"] = {**generated.describe(), "end_lsn": int_to_lsn(generated.end_lsn)}
        log.info(
            "%s: generated in %.1f s, %.1f MB of WAL",
            tag,
            generated.seconds,
            (generated.end_lsn - generated.start_lsn) / 1e6,
        )
        this = Run(ctx, tag, source_dsn, workload, generated, expected)

        part("source", functools.partial(source, this, plain, slot_plain, False))
        log.info("%s: cdc-source %s events/s", tag, dig(result, "source", "events_per_s"))
        with_metadata = part("source_metadata", functools.partial(source, this, meta, slot_meta, True))
        log.info(
            "%s: cdc-source --transaction-metadata %s events/s",
            tag,
            dig(result, "source_metadata", "events_per_s"),
        )
        # without metadata topics the sinks still run, on the other topics (transaction mode refuses them)
        sink_prefix, sink_slot = (meta, slot_meta) if with_metadata else (plain, slot_plain)
        result["sinks_consumed_prefix"] = sink_prefix

        lr_dsn = scratch.target_db(f"{tag}_lr")
        scratch.subscriptions.append((f"{tag}_lr", slot_lr))
        part("native_lr", functools.partial(native_lr, this, lr_dsn, slot_lr))
        log.info("%s: native logical replication %s rows/s", tag, dig(result, "native_lr", "rows_per_s"))

        for mode, options in SINK_MODES:
            dsn = scratch.target_db(groups[mode])
            key = f"sink_{mode}"
            if part(key, functools.partial(sink, this, dsn, sink_prefix, groups[mode], sink_slot, options)):
                log.info(
                    "%s: cdc-sink --consistency %s %.0f events/s, %.0f source transactions/s, peak RSS %.0f MB",
                    tag,
                    mode,
                    result[key]["events_per_s"],
                    result[key]["transactions_per_s"],
                    result[key]["peak_rss_mb"],
                )
        result["ratios"] = ratios(result)
        return result
    finally:
        scratch.cleanup()
        probes = tuple(f"{g}-once-probe" for g in groups.values())
        delete_prefix(ctx.bootstrap, plain)
        delete_prefix(ctx.bootstrap, meta, (*groups.values(), *probes))


def ratios(result: dict[str, Any]) -> dict[str, float | None]:
    """Each figure against its baseline measured in the same run."""
    lr = dig(result, "native_lr", "rows_per_s")
    return {
        "source_metadata_vs_plain": ratio(
            dig(result, "source_metadata", "events_per_s"), dig(result, "source", "events_per_s")
        ),
        "sink_transaction_vs_row": ratio(
            dig(result, "sink_transaction", "events_per_s"), dig(result, "sink_row", "events_per_s")
        ),
        "sink_row_vs_native_lr": ratio(dig(result, "sink_row", "events_per_s"), lr),
        "sink_transaction_vs_native_lr": ratio(dig(result, "sink_transaction", "events_per_s"), lr),
        "sink_transaction_vs_row_peak_rss": ratio(
            dig(result, "sink_transaction", "peak_rss_mb"), dig(result, "sink_row", "peak_rss_mb")
        ),
    }
