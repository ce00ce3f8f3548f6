"""Timing one consumer of a prepared WAL or topic: cdc-source, pg_recvlogical, native logical
replication, cdc-sink --once. Each returns seconds and a JSON-ready dict."""

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from psycopg2 import sql

from bench.config import PG_BIN
from bench.context import Context
from bench.cpu import CpuShare
from bench.pg import confirmed_flush, connect, execute
from bench.procs import Proc, script, sink_args
from bench.workload import QUALIFIED, TABLE, create_table_only, fingerprint
from pg_kafka_cdc.common.lsn import int_to_lsn
from source_connector.wal2json import WAL2JSON_OPTIONS

log = logging.getLogger("bench.measure")

POLL = 0.05  # seconds between checks of a slot's position


def _run_to_exit(proc: Proc, what: str, n: int) -> float:
    """Wait for `proc` (a run over `n` events) to exit 0; the seconds it ran."""
    try:
        code = proc.wait(_timeout(n))
    finally:
        proc.stop()  # a no-op once it exited; stops it when the wait was interrupted
    if code != 0:
        raise RuntimeError(f"{what} exited with {code}; {proc.tail()}")
    return (proc.finished or time.monotonic()) - proc.started


def _timeout(n: int) -> float:
    """A generous limit for consuming n changes (a stuck run fails instead of hanging)."""
    return 180.0 + n / 500.0


def _wait_for_slot(
    conn: Any,
    slot: str,
    end_lsn: int,
    timeout: float,
    alive: Callable[[], bool],
    what: str,
    trace: Callable[[int | None], None] | None = None,
) -> float:
    """Poll the slot until its confirmed_flush_lsn reaches end_lsn; returns time.monotonic() then."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        confirmed = confirmed_flush(conn, slot)
        now = time.monotonic()
        if trace is not None:
            trace(confirmed)
        if confirmed is not None and confirmed >= end_lsn:
            return now
        last = confirmed
        if not alive():
            raise RuntimeError(f"{what} stopped before slot {slot} reached {int_to_lsn(end_lsn)}")
        if now > deadline:
            raise TimeoutError(
                f"{what}: slot {slot} is at {int_to_lsn(last or 0)} after {timeout:.0f} s, "
                f"short of {int_to_lsn(end_lsn)}"
            )
        time.sleep(POLL)


class Progress:
    """Once a second: how far the slot confirmed (bytes past its start) and how many messages the
    topic holds, to tell a slow stream from a slow confirmation afterwards."""

    def __init__(self, bootstrap: str, topic: str, start_lsn: int, started: float) -> None:
        self.consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": "cdc-bench-progress", "log_level": 3}
        )
        self.topic = topic
        self.start_lsn = start_lsn
        self.started = started
        self.next_at = 0.0
        self.points: list[list[float]] = []

    def __call__(self, confirmed: int | None) -> None:
        now = time.monotonic()
        if now < self.next_at:
            return
        self.next_at = now + 1.0
        try:
            _, high = self.consumer.get_watermark_offsets(TopicPartition(self.topic, 0), timeout=2)
        except Exception:  # the topic may not exist yet
            high = 0
        self.points.append([round(now - self.started, 2), (confirmed or self.start_lsn) - self.start_lsn, high])

    def close(self) -> None:
        self.consumer.close()


def recvlogical(ctx: Context, dsn: str, slot: str, end_lsn: int, n: int) -> dict[str, Any]:
    """pg_recvlogical decoding the slot's WAL with the connector's wal2json options to /dev/null."""
    options = {**WAL2JSON_OPTIONS, "add-tables": QUALIFIED}
    args = [
        str(PG_BIN / "pg_recvlogical"),
        "-d",
        dsn,
        "-S",
        slot,
        "--start",
        "-E",
        int_to_lsn(end_lsn),
        "-f",
        "/dev/null",
        "--no-loop",
    ]
    for key, value in options.items():
        args += ["-o", f"{key}={value}"]
    with CpuShare(dsn, slot) as cpu:
        proc = Proc(f"pg_recvlogical-{slot}", args, ctx.log_dir, sample_rss=True)
        seconds = _run_to_exit(proc, "pg_recvlogical", n)
    return {
        "seconds": round(seconds, 3),
        "events_per_s": round(n / seconds, 1),
        "options": options,
        "end_lsn": int_to_lsn(end_lsn),
        "cpu": cpu.figures(n, proc.resources().get("cpu_seconds")),
    }


def source(
    ctx: Context,
    dsn: str,
    prefix: str,
    slot: str,
    start_lsn: int,
    end_lsn: int,
    n: int,
    tables: str = QUALIFIED,
    extra_args: tuple[str, ...] = (),
    progress_topic: str | None = None,
) -> dict[str, Any]:
    """cdc-source from process start until its slot confirms end_lsn (it confirms only what Kafka
    acknowledged), adopting the slot created before the workload; `n` events in that WAL.
    `progress_topic` (default: the person table's) is the topic whose first partition the
    progress points count."""
    args = [
        script("cdc-source"),
        "run",
        "--source-dsn",
        dsn,
        "--bootstrap-servers",
        ctx.bootstrap,
        "--topic-prefix",
        prefix,
        "--slot",
        slot,
        "--snapshot",
        "never",
        "--tables",
        tables,
        "--log-format",
        "text",
        *extra_args,
    ]
    with contextlib.closing(connect(dsn)) as monitor, CpuShare(dsn, slot) as cpu:
        proc = Proc(f"cdc-source-{slot}", args, ctx.log_dir, sample_rss=True)
        topic = progress_topic or f"{prefix}.public.{TABLE}"
        progress = Progress(ctx.bootstrap, topic, start_lsn, proc.started)
        try:
            reached = _wait_for_slot(monitor, slot, end_lsn, _timeout(n), proc.running, "cdc-source", progress)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}; {proc.tail()}") from None
        finally:
            progress.close()
            code = proc.stop()
    seconds = reached - proc.started
    resources = proc.resources()
    return {
        "seconds": round(seconds, 3),
        "events_per_s": round(n / seconds, 1),
        **resources,
        "cpu": cpu.figures(n, resources.get("cpu_seconds")),
        "exit_code": code,
        "log": str(proc.stderr_path),
        "progress_s_confirmedbytes_topicmessages": progress.points,
    }


def native_lr(
    ctx: Context,
    source_db: str,
    target_dsn: str,
    publication: str,
    slot: str,
    end_lsn: int,
    n: int,
    expected: Any,
    prepare: Callable[[Any], None] = create_table_only,
    fingerprint: Callable[[Any], Any] = fingerprint,
) -> dict[str, Any]:
    """A disabled subscription on the slot created before the workload, enabled and timed until the
    slot confirms end_lsn and the target holds the same rows (`fingerprint` equal to `expected`);
    `prepare` makes the target's tables first. The caller drops the subscription."""
    subscription = slot
    conninfo = ctx.endpoints.source(source_db)
    with (
        contextlib.closing(connect(target_dsn)) as target,
        contextlib.closing(connect(ctx.endpoints.source(source_db))) as monitor,
    ):
        prepare(target)
        execute(
            target,
            sql.SQL(
                "CREATE SUBSCRIPTION {} CONNECTION %s PUBLICATION {} "
                "WITH (create_slot = false, slot_name = %s, copy_data = false, enabled = false)"
            ).format(sql.Identifier(subscription), sql.Identifier(publication)),
            (conninfo, slot),
        )
        started = time.monotonic()
        execute(target, sql.SQL("ALTER SUBSCRIPTION {} ENABLE").format(sql.Identifier(subscription)))
        deadline = started + _timeout(n)
        slot_reached = _wait_for_slot(monitor, slot, end_lsn, _timeout(n), lambda: True, "native replication")
        while True:
            got = fingerprint(target)
            if got == expected:
                done = time.monotonic()
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"native replication: target has {got}, expected {expected}")
            time.sleep(POLL)
    seconds = done - started
    return {
        "seconds": round(seconds, 3),
        "rows_per_s": round(n / seconds, 1),
        "slot_confirmed_after_s": round(slot_reached - started, 3),
    }


def sink_once(
    ctx: Context,
    source_dsn: str,
    target_dsn: str,
    prefix: str,
    group: str,
    slot: str,
    n: int,
    expected: Any,
    tables: str = QUALIFIED,
    snapshot: str = "topic",
    extra_args: tuple[str, ...] = (),
    fingerprint: Callable[[Any], Any] = fingerprint,
) -> dict[str, Any]:
    """cdc-sink --snapshot <snapshot> --once from process start to exit (by default into an empty
    target database), the target's `fingerprint` then checked against `expected`."""
    args = [*sink_args(ctx.bootstrap, source_dsn, target_dsn, prefix, tables, group, slot, snapshot), *extra_args]
    proc = Proc(f"cdc-sink-{group}", args, ctx.log_dir, sample_rss=True)
    seconds = _run_to_exit(proc, "cdc-sink", n)
    with contextlib.closing(connect(target_dsn)) as target:
        got = fingerprint(target)
    if got != expected:
        raise RuntimeError(f"cdc-sink left the target at {got} (fingerprint), expected {expected}")
    return {
        "seconds": round(seconds, 3),
        "events_per_s": round(n / seconds, 1),
        **proc.resources(),
        "verified": True,
        "log": str(proc.stderr_path),
    }
