"""Scenario 1: cdc-source is killed with SIGKILL at random moments while the workload runs, and
restarted each time; nothing is lost, nothing applied twice."""

import random
import time

from tests.conftest import Databases, Stack
from tests.faults.harness import (
    Pipeline,
    ScenarioReport,
    Writer,
    final_check,
    kill9,
    prepare_tables,
    settle,
)
from tests.pipeline import stop_cleanly, wait_for_output


def test_source_killed_at_random_moments(
    dbs: Databases, stack: Stack, topic_prefix: str, long_run: bool, report: ScenarioReport
) -> None:
    rng = random.Random()
    kills = 8 if long_run else 3
    pipeline = Pipeline(dbs, stack.bootstrap_servers, topic_prefix)
    prepare_tables(dbs.source_dsn, dbs.target_dsn)
    writer = Writer(dbs.source_dsn, rate=300)
    source = pipeline.start_source()
    wait_for_output(source, "streaming from slot")
    sink = pipeline.start_sink()
    pipeline.wait_applying([source, sink, writer.process], minimum=200)

    for n in range(kills):
        settle(rng.uniform(1.0, 6.0 if long_run else 3.0), [source, sink, writer.process])
        kill9(source)
        down = rng.uniform(0.0, 3.0)
        time.sleep(down)
        restarted = time.time()
        source = pipeline.start_source()
        recovery = pipeline.wait_recovered(restarted, [source, sink, writer.process])
        report.add("kill -9 cdc-source", f"#{n + 1}", down=down, recovery=recovery)

    settle(2.0, [source, sink, writer.process])
    report.operations = writer.stop()
    final_check(pipeline, report, [source, sink])
    stop_cleanly(sink, source)
