"""Scenario 4: the (private) source PostgreSQL is restarted with a fast shutdown, and so is the
(private) target, while the connectors run; both reconnect by themselves (the same processes), the
target ends identical and nothing is applied twice.

The target is also crashed: its postmaster and backends get SIGKILL under load. The sink commits
with `synchronous_commit = off`, so the crash loses its last acknowledged commits, rows and stored
offsets together; the sink finds its stored offsets behind what it committed and reads again from
them, so nothing is lost and nothing is applied twice."""

import random
import time
from collections.abc import Callable

import pytest

from tests.conftest import Databases, Stack
from tests.faults.harness import (
    Pipeline,
    ScenarioReport,
    Writer,
    final_check,
    prepare_tables,
    settle,
)
from tests.pg_cluster import PgCluster
from tests.pipeline import stop_cleanly, wait_for_output

LOST_COMMITS = "are behind what this sink committed"


def restarts(
    stack: Stack,
    topic_prefix: str,
    pg_cluster: Callable[..., PgCluster],
    report: ScenarioReport,
    plan: list[str],
    long_run: bool,
) -> None:
    """Run the workload through private source and target clusters and restart them as planned
    ("source", "target" or "both", each a fast shutdown and a start after a random pause; "crash
    target", a SIGKILL of the target's postmaster and backends, and crash recovery at start)."""
    rng = random.Random()
    crashes = plan.count("crash target")
    # The commits of the last seconds stay in the WAL buffers, so each crash loses some for sure.
    lazy_wal = {"wal_writer_delay": "10s", "wal_writer_flush_after": "1GB"} if crashes else None
    source_pg, target_pg = pg_cluster("source"), pg_cluster("target", lazy_wal)
    dbs = Databases("faults", source_pg.create_database("faults"), target_pg.create_database("faults"))
    pipeline = Pipeline(dbs, stack.bootstrap_servers, topic_prefix)
    prepare_tables(dbs.source_dsn, dbs.target_dsn)
    writer = Writer(dbs.source_dsn, rate=300)
    source = pipeline.start_source()
    wait_for_output(source, "streaming from slot")
    sink = pipeline.start_sink()
    processes = [source, sink, writer.process]
    pipeline.wait_applying(processes, minimum=200)

    for n, which in enumerate(plan):
        settle(rng.uniform(1.0, 5.0 if long_run else 2.0), processes)
        down = rng.uniform(0.0, 10.0 if long_run else 2.0)
        if which == "crash target":
            target_pg.kill()
            time.sleep(down)
            target_pg.start()
            what = "kill -9 target PostgreSQL"
        else:
            clusters = {"source": [source_pg], "target": [target_pg], "both": [source_pg, target_pg]}[which]
            for cluster in clusters:
                cluster.stop("fast")
            time.sleep(down)
            for cluster in clusters:
                cluster.start()
            what = f"restart {which} PostgreSQL (-m fast)"
        restarted = time.time()
        recovery = pipeline.wait_recovered(restarted, processes, timeout=180)
        report.add(what, f"#{n + 1}", down, recovery)

    settle(2.0, processes)
    report.operations = writer.stop()
    final_check(pipeline, report, [source, sink])
    if crashes:  # the crashes did lose commits, and the sink read them again
        assert LOST_COMMITS in sink.stderr_text(), sink.stderr_text()[-3000:]
    stop_cleanly(sink, source)


@pytest.mark.parametrize("fault", ["target", "crash target"], ids=["fast shutdown", "kill -9"])
def test_target_postgres_restarts_under_running_connectors(
    stack: Stack,
    topic_prefix: str,
    pg_cluster: Callable[..., PgCluster],
    long_run: bool,
    report: ScenarioReport,
    fault: str,
) -> None:
    restarts(stack, topic_prefix, pg_cluster, report, [fault] * (4 if long_run else 2), long_run)


def test_source_postgres_restarts_under_running_connectors(
    stack: Stack,
    topic_prefix: str,
    pg_cluster: Callable[..., PgCluster],
    long_run: bool,
    report: ScenarioReport,
) -> None:
    plan = ["source", "target", "source", "both"] if long_run else ["source", "both"]
    restarts(stack, topic_prefix, pg_cluster, report, plan, long_run)
