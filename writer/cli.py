"""cdc-writer: keeps writing inserts, updates and deletes to the source database."""

import logging
import random
import time
from collections.abc import Callable
from typing import Any

import click
import psycopg2

from pg_kafka_cdc.common.cli import program
from pg_kafka_cdc.common.errors import ConnectError
from pg_kafka_cdc.common.options import option, with_options
from pg_kafka_cdc.common.pg import connect_source, error_reason, is_connection_loss
from pg_kafka_cdc.common.retry import Backoff
from pg_kafka_cdc.common.settings import Settings, common_options
from pg_kafka_cdc.common.signals import StopFlag
from pg_kafka_cdc.common.terminal import StatusLine
from writer.operations import Workload
from writer.pacing import MixSchedule, Pacer, parse_mix
from writer.rows import RowMaker, make_pools
from writer.schema import create_tables

log = logging.getLogger("writer")


WRITER_OPTIONS = [
    option(
        "--rate", "WRITER_RATE", 1.0, "Operations per second (0: as fast as possible).", click.FloatRange(min=0)
    ),
    option("--mix", "WRITER_MIX", "70,20,10", "Weights of insert,update,delete."),
    option("--batch", "WRITER_BATCH", 1, "Operations per transaction.", click.IntRange(min=1)),
    option(
        "--count",
        "WRITER_COUNT",
        None,
        "Stop after this many operations (default: run until stopped).",
        click.IntRange(min=0),
    ),
    option("--schema", "WRITER_SCHEMA", "public", "Schema of the writer's tables."),
    option(
        "--key-change-ratio",
        "WRITER_KEY_CHANGE_RATIO",
        0.0,
        "Share of updates that also change the primary key.",
        click.FloatRange(0, 1),
    ),
    option(
        "--big-ratio",
        "WRITER_BIG_RATIO",
        0.0,
        "Share of order writes that carry a large (TOASTed) note.",
        click.FloatRange(0, 1),
    ),
    option("--seed", "WRITER_SEED", None, "Random seed, for repeatable runs.", int),
]


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@common_options
@with_options(WRITER_OPTIONS)
def main(**kwargs: Any) -> None:
    """Write realistic random data to the source database at a chosen rate.

    Creates the tables person and orders when missing. SIGINT or SIGTERM stop it after the current
    transaction.
    """
    with program("cdc-writer", kwargs) as settings:
        run(settings, **kwargs)


Connection = tuple[Any, Workload]


def open_workload(settings: Settings, schema: str, make: Callable[[Any], Workload]) -> Connection:
    """A connection to the source with the tables created, and the workload writing through it."""
    conn = connect_source(settings.source_dsn, application_name="cdc-writer", autocommit=False)
    cur = conn.cursor()
    create_tables(cur, schema)
    conn.commit()
    return conn, make(cur)


def reconnect(
    exc: psycopg2.Error, backoff: Backoff, stop: StopFlag, reopen: Callable[[], Connection], current: Connection
) -> Connection:
    """After a failed batch: a new connection when the old one was lost (the same one if the new
    one fails too, to try again later); any other error is raised."""
    if not is_connection_loss(exc):
        raise exc
    delay = backoff.next_delay(time.monotonic())
    if delay is None:
        raise ConnectError(f"lost the source database and could not reconnect: {error_reason(exc)}") from None
    log.warning("source connection lost (%s); reconnecting in %.1f s", error_reason(exc), delay)
    stop.wait(delay)
    try:
        return reopen()
    except ConnectError as again:
        log.warning("%s", again)
        return current


# Another session changed the rows the batch picked between its read and its write (a key changed
# or a row deleted under an order being inserted, a deadlock): the batch is dropped, not the writer.
LOST_RACE = frozenset({"23503", "23505", "40001", "40P01"})


def lost_race(exc: psycopg2.Error) -> bool:
    return getattr(exc, "pgcode", None) in LOST_RACE


def operations(done: int, totals: dict[str, int], seconds: float) -> str:
    return (
        f"{done} operations ({totals['insert']} inserts, {totals['update']} updates, "
        f"{totals['delete']} deletes), {done / max(seconds, 1e-9):.1f}/s"
    )


def run(
    settings: Settings,
    rate: float,
    mix: str,
    batch: int,
    count: int | None,
    schema: str,
    key_change_ratio: float,
    big_ratio: float,
    seed: int | None,
) -> None:
    schedule, stop, rng = MixSchedule(parse_mix(mix)), StopFlag().install(), random.Random(seed)
    rows = RowMaker(make_pools(seed), rng)
    pacer, status, backoff = Pacer(rate, batch), StatusLine(), Backoff(deadline=120)

    def reopen() -> Connection:
        return open_workload(
            settings, schema, lambda cur: Workload(cur, rows, rng, schema, key_change_ratio, big_ratio)
        )

    conn, work = reopen()
    done, started = 0, time.monotonic()
    log.info("writing to %s at %s", schema, f"{rate:g} operations/s" if rate else "full speed")
    while not stop and (count is None or done < count):
        if stop.wait(pacer.delay(time.monotonic())):
            break
        size = batch if count is None else min(batch, count - done)
        counted = work.counts.copy()
        try:
            for _ in range(size):
                work.run(schedule.next())
            conn.commit()
        except psycopg2.Error as exc:
            if lost_race(exc):
                log.debug("batch dropped, another session changed its rows: %s", error_reason(exc))
                conn.rollback()
                work.counts = counted
                continue
            conn, work = reconnect(exc, backoff, stop, reopen, (conn, work))
            continue
        done += size
        backoff.reset()
        status.update(f"writer: {operations(done, work.totals(), time.monotonic() - started)}", time.monotonic())
    status.close()
    conn.close()
    elapsed, totals = time.monotonic() - started, work.totals()
    click.echo(
        f"wrote {done} operations in {elapsed:.1f} s ({done / max(elapsed, 1e-9):.1f}/s): "
        f"{totals['insert']} inserts, {totals['update']} updates, {totals['delete']} deletes"
        + (f" (stopped by {stop.signal_name})" if stop.signal_name else "")
    )
