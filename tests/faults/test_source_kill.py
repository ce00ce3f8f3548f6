"""Scenario 1: cdc-source is killed with SIGKILL while the workload runs, and restarted each time;
nothing is lost, nothing applied twice, nothing published twice (three partitions per topic).

The kills: at random moments; inside a 50,000-row transaction (one INSERT ... SELECT), once part of
it is in Kafka, so the restarted source reads it again from its slot and must skip exactly what the
topics hold of it; and while the source's link to Kafka is throttled (the producer's queue is full,
requests are half sent), the source restarted while it still is. The source reaches a private
broker through a TCP proxy (as in test_kafka_slow.py); the sink and the checks reach it directly."""

import random
import time
from collections.abc import Callable

from pg_kafka_cdc.common.tables import TableName
from schemas.topics import topic_for
from tests.conftest import Databases
from tests.faults.broker import FaultBroker
from tests.faults.harness import (
    Pipeline,
    ScenarioReport,
    Writer,
    final_check,
    kill9,
    populate_person,
    prepare_tables,
    settle,
)
from tests.faults.positions import EndOffsets
from tests.faults.proxy import TcpProxy
from tests.helpers import CliProcess, wait_until
from tests.kafka_broker import free_port
from tests.pipeline import stop_cleanly, wait_for_output, while_running

BIG_TRANSACTION = 50_000
THROTTLE = 50_000  # bytes/s: below what the workload needs, so the producer's queue fills

DEFAULT_PLAN = ["moment", "big transaction", "moment", "throttled", "moment"]
LONG_PLAN = [*DEFAULT_PLAN, "throttled", "moment", "big transaction", "moment", "moment"]


def test_source_killed_at_random_in_a_big_transaction_and_while_kafka_is_slow(
    dbs: Databases,
    private_broker: Callable[..., FaultBroker],
    proxies: Callable[..., TcpProxy],
    long_run: bool,
    report: ScenarioReport,
) -> None:
    rng = random.Random()
    source_port = free_port()
    link = proxies(source_port, name="src-kafka")
    broker = private_broker(listeners={"DIRECT": free_port(), "SRC": source_port}, advertised={"SRC": link.port})
    pipeline = Pipeline(dbs, broker.bootstrap, "faults", source_bootstrap=f"127.0.0.1:{link.port}")
    prepare_tables(dbs.source_dsn, dbs.target_dsn)
    writer = Writer(dbs.source_dsn, rate=300)
    source = pipeline.start_source("--partitions", "3")
    wait_for_output(source, "streaming from slot")
    sink = pipeline.start_sink()
    pipeline.wait_applying([source, sink, writer.process], minimum=200)
    big = 0

    def restart(down: float) -> CliProcess:
        time.sleep(down)
        return pipeline.start_source("--partitions", "3")

    for n, kind in enumerate(LONG_PLAN if long_run else DEFAULT_PLAN):
        running = [source, sink, writer.process]
        settle(rng.uniform(1.0, 6.0 if long_run else 3.0), running)
        down = rng.uniform(0.0, 3.0)
        if kind == "moment":
            kill9(source)
            restarted = time.time()
            source = restart(down)
            detail = f"#{n + 1}"
        elif kind == "big transaction":
            person = topic_for(pipeline.prefix, TableName("public", "person"))
            ends = EndOffsets(pipeline.bootstrap, [person])
            try:
                before = ends.total()
                populate_person(dbs.source_dsn, BIG_TRANSACTION)  # returns once committed
                big += 1
                goal = before + rng.randint(3_000, 20_000)
                wait_until(
                    while_running(running, lambda: ends.total() >= goal),  # noqa: B023
                    timeout=120,
                    interval=0.01,
                    message="the big transaction never reached Kafka",
                )
                kill9(source)
                grown = ends.total() - before
            finally:
                ends.close()
            # the writer's changes are in that growth too: below the transaction's size, the kill
            # certainly left part of it unpublished
            assert grown < BIG_TRANSACTION, f"the whole transaction was in Kafka before the kill ({grown})"
            restarted = time.time()
            source = restart(down)
            detail = f"#{n + 1} with {grown} messages of the {BIG_TRANSACTION}-row transaction in Kafka"
        else:
            link.throttle(THROTTLE)
            try:
                settle(rng.uniform(2.0, 5.0), running)
                kill9(source)
                source = restart(down)
                settle(rng.uniform(2.0, 5.0), [source, sink, writer.process])
            finally:
                link.restore()
            restarted = time.time()
            detail = f"#{n + 1} throttled to {THROTTLE // 1000} kB/s, restarted while throttled"
        recovery = pipeline.wait_recovered(restarted, [source, sink, writer.process], timeout=180)
        report.add(f"kill -9 cdc-source ({kind})", detail, down=down, recovery=recovery)

    settle(2.0, [source, sink, writer.process])
    report.operations = writer.stop() + big * BIG_TRANSACTION
    final_check(pipeline, report, [source, sink])
    stop_cleanly(sink, source)
