"""Scenario 2: cdc-sink is killed with SIGKILL during its bulk snapshot (200,000 rows copied with
--snapshot copy), in the middle of a batch while it works through a large backlog, and at random
moments; restarted each time (five kills, eleven with --long). Nothing is lost and no row is
written twice: the bulk copy's rows are not written again by the stream, and no batch the sink was
killed in is applied twice after its restart."""

import random
import time

from tests.conftest import Databases, Stack
from tests.faults.harness import (
    Pipeline,
    ScenarioReport,
    Writer,
    burst,
    final_check,
    kill9,
    populate_person,
    prepare_tables,
    settle,
)
from tests.helpers import CliProcess, psql_rows, wait_until
from tests.pipeline import stop_cleanly, wait_for_output, while_running

PREEXISTING = 200_000


def copy_progress(target_dsn: str) -> int:
    """Rows the target's COPY FROM has taken so far (0 when no copy runs)."""
    rows = psql_rows(
        target_dsn,
        "SELECT coalesce(max(tuples_processed), 0) FROM pg_stat_progress_copy "
        "WHERE datid = (SELECT oid FROM pg_database WHERE datname = current_database()) AND command = 'COPY FROM'",
    )
    return int(rows[0][0])


def writing_batch(target_dsn: str) -> bool:
    """The sink's target session is inside a batch transaction that has written rows already."""
    rows = psql_rows(
        target_dsn,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'cdc-sink' "
        "AND backend_xid IS NOT NULL AND state IN ('active', 'idle in transaction') AND query !~* 'copy'",
    )
    return int(rows[0][0]) > 0


def target_rows(target_dsn: str, table: str) -> int:
    return int(psql_rows(target_dsn, f"SELECT count(*) FROM {table}")[0][0])


def test_sink_killed_in_copy_mid_batch_and_at_random(
    dbs: Databases, stack: Stack, topic_prefix: str, long_run: bool, report: ScenarioReport
) -> None:
    rng = random.Random()
    pipeline = Pipeline(dbs, stack.bootstrap_servers, topic_prefix)
    prepare_tables(dbs.source_dsn, dbs.target_dsn)
    populate_person(dbs.source_dsn, PREEXISTING)
    # The copy fills the target from the source itself: the source publishes only what changes.
    source = pipeline.start_source("--snapshot", "never")
    wait_for_output(source, "streaming from slot")
    writer = Writer(dbs.source_dsn, rate=300)
    running: list[CliProcess] = [source, writer.process]

    # 1. During the bulk snapshot, once part of the 200,000 rows is in the target's COPY.
    for n in range(3 if long_run else 1):
        sink = pipeline.start_sink("--snapshot", "copy")
        threshold = rng.randint(20_000, PREEXISTING // 2)  # well before the end: the copy takes ~0.5 s
        wait_until(
            while_running([sink, *running], lambda: copy_progress(dbs.target_dsn) >= threshold),  # noqa: B023
            timeout=120,
            interval=0.02,
            message="the bulk copy never got going",
        )
        copied = copy_progress(dbs.target_dsn)
        kill9(sink)
        # the copy's transaction is rolled back with the connection: nothing half-copied stays
        wait_until(lambda: copy_progress(dbs.target_dsn) == 0, timeout=30, message="the killed COPY lingers")
        assert target_rows(dbs.target_dsn, "public.person") == 0, "a half-done bulk copy was committed"
        report.add("kill -9 cdc-sink during the bulk copy", f"#{n + 1} after {copied} of {PREEXISTING} rows")

    restarted = time.time()
    sink = pipeline.start_sink("--snapshot", "copy")
    wait_for_output(sink, "copied", timeout=180)
    report.faults[-1].recovery_seconds = round(pipeline.wait_recovered(restarted, [sink, *running]), 2)

    # 2. In the middle of a batch of a large backlog (the sink was down while a burst was written).
    for n in range(3 if long_run else 2):
        settle(rng.uniform(0.5, 2.0), [sink, *running])
        kill9(sink)
        report.operations += burst(dbs.source_dsn, 20_000 if long_run else 8_000)
        sink = pipeline.start_sink("--snapshot", "copy")
        wait_until(
            while_running([sink, *running], lambda: writing_batch(dbs.target_dsn)),
            timeout=60,
            interval=0.01,
            message="the sink never started a batch",
        )
        time.sleep(rng.uniform(0.0, 0.2))  # somewhere in the batch's statements
        mid_batch = writing_batch(dbs.target_dsn)
        kill9(sink)
        restarted = time.time()
        sink = pipeline.start_sink("--snapshot", "copy")
        recovery = pipeline.wait_recovered(restarted, [sink, *running], timeout=180)
        report.add(
            "kill -9 cdc-sink in a batch of a backlog",
            f"#{n + 1} ({'inside' if mid_batch else 'just after'} a batch transaction)",
            recovery=recovery,
        )

    # 3. At random moments under the steady workload.
    for n in range(5 if long_run else 2):
        settle(rng.uniform(0.2, 4.0), [sink, *running])
        kill9(sink)
        down = rng.uniform(0.0, 2.0)
        time.sleep(down)
        restarted = time.time()
        sink = pipeline.start_sink("--snapshot", "copy")
        report.add(
            "kill -9 cdc-sink at random", f"#{n + 1}", down, pipeline.wait_recovered(restarted, [sink, *running])
        )

    settle(1.0, [sink, *running])
    report.operations += writer.stop()
    final_check(pipeline, report, [source, sink])
    stop_cleanly(sink, source)
