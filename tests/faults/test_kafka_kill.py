"""Scenario 3: the (private) Kafka broker is killed with SIGKILL and started again while both
connectors run; they recover by themselves (the same processes), nothing is lost or doubled."""

import random
import time
from collections.abc import Callable

from tests.conftest import Databases
from tests.faults.broker import FaultBroker
from tests.faults.harness import Pipeline, ScenarioReport, Writer, final_check, prepare_tables, settle
from tests.kafka_broker import free_port
from tests.pipeline import stop_cleanly, wait_for_output


def test_kafka_killed_and_restarted_under_running_connectors(
    dbs: Databases,
    private_broker: Callable[..., FaultBroker],
    long_run: bool,
    report: ScenarioReport,
) -> None:
    rng = random.Random()
    broker = private_broker(listeners={"PLAINTEXT": free_port()})
    pipeline = Pipeline(dbs, broker.bootstrap, "faults")
    prepare_tables(dbs.source_dsn, dbs.target_dsn)
    writer = Writer(dbs.source_dsn, rate=300)
    source = pipeline.start_source()
    wait_for_output(source, "streaming from slot")
    sink = pipeline.start_sink()
    processes = [source, sink, writer.process]
    pipeline.wait_applying(processes, minimum=200)

    for n in range(3 if long_run else 1):
        settle(rng.uniform(1.0, 4.0), processes)
        broker.kill()
        down = rng.uniform(5.0, 30.0) if long_run else 3.0
        settle(down, processes)
        broker.start()
        restarted = time.time()
        recovery = pipeline.wait_recovered(restarted, processes, timeout=180)
        report.add("kill -9 Kafka, start again", f"#{n + 1}", down, recovery)

    settle(2.0, processes)
    report.operations = writer.stop()
    final_check(pipeline, report, [source, sink])
    stop_cleanly(sink, source)
