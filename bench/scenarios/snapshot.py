"""Scenario 3: a filled table copied by the sink's bulk snapshot (cdc-sink --snapshot copy --once),
against `psql COPY TO STDOUT (FORMAT binary) | psql COPY FROM STDIN (FORMAT binary)`."""

import contextlib
import logging
import re
import subprocess
import time
from typing import Any

from bench.config import scenario_tag
from bench.context import Context
from bench.kafka import create_topic, delete_prefix
from bench.pg import Scratch, connect, create_logical_slot
from bench.procs import Proc, environment, sink_args
from bench.workload import QUALIFIED, TABLE, create_schema, create_table_only, fill, fingerprint

log = logging.getLogger("bench.snapshot")

# "copied 1000000 rows of public.person in 4.2 s (238095 rows/s, binary COPY)"
COPIED = re.compile(r"copied (\d+) rows of (\S+) in ([0-9.]+) s \(([0-9.]+) rows/s, (\w+) COPY\)")


def parse_copied(text: str) -> tuple[int, float, float, str] | None:
    """(rows, seconds, rows/s, format) from the sink's log line, or None."""
    match = COPIED.search(text)
    if match is None:
        return None
    return int(match[1]), float(match[3]), float(match[4]), match[5]


def copy_pipe(ctx: Context, source_dsn: str, target_dsn: str, rows: int) -> dict[str, Any]:
    """psql | psql with binary COPY, into an empty copy of the table; wall clock of the pipe."""
    psql = "psql"
    out_cmd = [psql, "-X", "-q", "-d", source_dsn, "-c", f"COPY {QUALIFIED} TO STDOUT (FORMAT binary)"]
    in_cmd = [psql, "-X", "-q", "-d", target_dsn, "-c", f"COPY {QUALIFIED} FROM STDIN (FORMAT binary)"]
    env = environment()
    with open(ctx.log_dir / "copy-pipe.err", "wb") as err:
        started = time.monotonic()
        producer = subprocess.Popen(out_cmd, stdout=subprocess.PIPE, stderr=err, env=env)
        consumer = subprocess.Popen(in_cmd, stdin=producer.stdout, stdout=subprocess.DEVNULL, stderr=err, env=env)
        assert producer.stdout is not None
        producer.stdout.close()  # the consumer holds the read end now
        try:
            codes = consumer.wait(timeout=900), producer.wait(timeout=60)
        finally:
            for proc in (consumer, producer):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        seconds = time.monotonic() - started
    if codes != (0, 0):
        raise RuntimeError(f"the COPY pipe failed with exit codes {codes}; see {ctx.log_dir / 'copy-pipe.err'}")
    with contextlib.closing(connect(target_dsn)) as conn:
        copied = fingerprint(conn)[0]
    if copied != rows:
        raise RuntimeError(f"the COPY pipe copied {copied} rows, expected {rows}")
    return {"seconds": round(seconds, 3), "rows_per_s": round(rows / seconds, 1)}


def sink_copy(
    ctx: Context, source_dsn: str, target_dsn: str, prefix: str, slot: str, group: str, rows: int
) -> dict[str, Any]:
    args = sink_args(ctx.bootstrap, source_dsn, target_dsn, prefix, QUALIFIED, group, slot, "copy")
    proc = Proc(f"cdc-sink-{group}", args, ctx.log_dir, sample_rss=True)
    try:
        code = proc.wait(900)
    finally:
        proc.stop()  # a no-op once it exited; stops it when the wait was interrupted
    if code != 0:
        raise RuntimeError(f"cdc-sink exited with {code}; {proc.tail()}")
    wall = (proc.finished or time.monotonic()) - proc.started
    parsed = parse_copied(proc.stderr_text())
    if parsed is None:
        raise RuntimeError(f"cdc-sink did not log a 'copied N rows' line; {proc.tail()}")
    copied, seconds, rate, fmt = parsed
    if copied != rows:
        raise RuntimeError(f"cdc-sink copied {copied} rows, expected {rows}")
    with contextlib.closing(connect(target_dsn)) as conn:
        if fingerprint(conn)[0] != rows:
            raise RuntimeError("the sink's target does not hold the copied rows")
    return {
        "log_seconds": seconds,
        "log_rows_per_s": rate,
        "copy_format": fmt,
        "wall_seconds": round(wall, 3),
        "wall_rows_per_s": round(rows / wall, 1),
        **proc.resources(),
        "log": str(proc.stderr_path),
    }


def run(ctx: Context, rows: int) -> dict[str, Any]:
    tag = scenario_tag("snap")
    prefix, slot, group = tag, f"{tag}_src", f"{tag}_sink"
    scratch = Scratch(ctx.endpoints)
    try:
        source_dsn = scratch.source_db(tag)
        with contextlib.closing(connect(source_dsn)) as conn:
            create_schema(conn)
            log.info("%s: filling a table of %d rows", tag, rows)
            avg_row = fill(conn, rows)
            create_logical_slot(conn, slot, "wal2json")  # the bulk copy waits for the source's slot
        create_topic(ctx.bootstrap, f"{prefix}.public.{TABLE}")  # the sink copies the tables with topics

        pipe_dsn = scratch.target_db(f"{tag}_pipe")
        with contextlib.closing(connect(pipe_dsn)) as conn:
            create_table_only(conn)
        pipe = copy_pipe(ctx, source_dsn, pipe_dsn, rows)
        log.info("%s: COPY pipe %.0f rows/s", tag, pipe["rows_per_s"])

        sink_dsn = scratch.target_db(f"{tag}_sink")
        sink = sink_copy(ctx, source_dsn, sink_dsn, prefix, slot, group, rows)
        log.info(
            "%s: sink bulk copy %.0f rows/s (log), %.0f rows/s (wall)",
            tag,
            sink["log_rows_per_s"],
            sink["wall_rows_per_s"],
        )
        return {
            "tag": tag,
            "rows": rows,
            "columns": 11,
            "avg_row_bytes": round(avg_row, 1),
            "copy_pipe": pipe,
            "sink": sink,
        }
    finally:
        scratch.cleanup()
        delete_prefix(ctx.bootstrap, prefix, (group, f"{group}-once-probe"))
