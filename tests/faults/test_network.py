"""Scenario 6: network faults between each connector and each service, through TCP proxies:

    cdc-source --(src-pg)---> source PostgreSQL   (its normal and its replication connection)
    cdc-source --(src-kafka)-> Kafka               (a private broker whose listener advertises the proxy)
    cdc-sink ----(sink-kafka)-> Kafka              (another listener, another proxy)
    cdc-sink ----(sink-pg)---> target PostgreSQL
    cdc-sink ----(sink-src)--> source PostgreSQL   (bulk copy)

Cuts (every connection reset, new ones refused), added latency, and cuts in the middle of a stream:
while the source reads a 50,000-row transaction or sends it to Kafka, and while the sink writes a
batch of it. The faults on the source's PostgreSQL link are a test of their own: they hit a bug."""

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from psycopg2.extensions import make_dsn, parse_dsn

from tests.conftest import Databases
from tests.faults.broker import FaultBroker
from tests.faults.harness import (
    Pipeline,
    ScenarioReport,
    Writer,
    final_check,
    populate_person,
    prepare_tables,
    settle,
)
from tests.faults.proxy import TcpProxy
from tests.helpers import CliProcess, wait_until
from tests.kafka_broker import free_port
from tests.pipeline import partition_ends, stop_cleanly, wait_for_output, while_running

BIG_TRANSACTION = 50_000


def through(dsn: str, proxy: TcpProxy) -> str:
    return make_dsn(dsn, host="127.0.0.1", port=str(proxy.port))


def port_of(dsn: str) -> int:
    return int(parse_dsn(dsn).get("port", "5432"))


@dataclass
class NetworkRig:
    """The pipeline with a proxy on every link, under the workload."""

    links: dict[str, TcpProxy]
    pipeline: Pipeline
    writer: Writer
    source: CliProcess
    sink: CliProcess
    report: ScenarioReport
    rng: random.Random = field(default_factory=random.Random)
    big_transactions: int = 0

    @property
    def processes(self) -> list[CliProcess]:
        return [self.source, self.sink, self.writer.process]

    def fault(self, kind: str, names: list[str], seconds: float, start: Callable[[TcpProxy], None]) -> None:
        """Start a fault on the named links, keep it `seconds`, restore, time the recovery."""
        settle(self.rng.uniform(0.5, 2.0), self.processes)
        for name in names:
            start(self.links[name])
        settle(seconds, self.processes)
        for name in names:
            self.links[name].restore()
        restored = time.time()
        recovery = self.pipeline.wait_recovered(restored, self.processes)
        self.report.add(f"{kind} {'+'.join(names)}", down=seconds, recovery=recovery)

    def cut_in_big_transaction(self, stream_link: str, budget: tuple[int, int]) -> None:
        """A 50,000-row transaction, with `stream_link` cut after a random part of it went through;
        then the sink's target link cut while the sink writes a batch of it (the sink is kept from
        Kafka until the whole transaction is there, so its batches are full ones)."""
        links, pipeline, processes = self.links, self.pipeline, self.processes
        settle(1.0, processes)
        links["sink-kafka"].cut()
        ends = sum(partition_ends(pipeline.bootstrap, pipeline.topics).values())
        links[stream_link].cut_after(self.rng.randint(*budget))
        populate_person(pipeline.direct.source_dsn, BIG_TRANSACTION)
        self.big_transactions += 1
        wait_until(
            while_running(processes, links[stream_link].cut_fired.is_set),
            timeout=120,
            message=f"the {stream_link} cut never fired",
        )
        cut_at = time.monotonic()
        settle(1.0, processes)
        links[stream_link].restore()
        wait_until(
            while_running(
                processes,
                lambda: (
                    sum(partition_ends(pipeline.bootstrap, pipeline.topics).values()) >= ends + BIG_TRANSACTION
                ),
            ),
            timeout=180,
            message="the big transaction never reached Kafka",
        )
        self.report.add(
            f"cut {stream_link} in the middle of a {BIG_TRANSACTION}-row transaction",
            down=1.0,
            recovery=time.monotonic() - cut_at,
        )
        links["sink-pg"].cut_after(self.rng.randint(500_000, 3_000_000))
        links["sink-kafka"].restore()
        wait_until(
            while_running(processes, links["sink-pg"].cut_fired.is_set),
            timeout=120,
            message="the sink-pg cut never fired",
        )
        settle(1.0, processes)
        links["sink-pg"].restore()
        restored = time.time()
        self.report.add(
            "cut sink-pg in the middle of a batch of the big transaction",
            down=1.0,
            recovery=pipeline.wait_recovered(restored, processes, timeout=180),
        )

    def finish(self) -> None:
        settle(2.0, self.processes)
        self.report.operations = self.writer.stop() + BIG_TRANSACTION * self.big_transactions
        final_check(self.pipeline, self.report, [self.source, self.sink])
        self.report.notes.append(
            "connections: " + ", ".join(f"{n} {p.connections} ({p.resets} reset)" for n, p in self.links.items())
        )
        stop_cleanly(self.sink, self.source)


def network_rig(
    dbs: Databases,
    private_broker: Callable[..., FaultBroker],
    proxies: Callable[..., TcpProxy],
    report: ScenarioReport,
) -> NetworkRig:
    source_kafka_port, sink_kafka_port = free_port(), free_port()
    links = {
        "src-pg": proxies(port_of(dbs.source_dsn), name="src-pg"),
        "src-kafka": proxies(source_kafka_port, name="src-kafka"),
        "sink-kafka": proxies(sink_kafka_port, name="sink-kafka"),
        "sink-pg": proxies(port_of(dbs.target_dsn), name="sink-pg"),
        "sink-src": proxies(port_of(dbs.source_dsn), name="sink-src"),
    }
    broker = private_broker(
        listeners={"DIRECT": free_port(), "SRC": source_kafka_port, "SNK": sink_kafka_port},
        advertised={"SRC": links["src-kafka"].port, "SNK": links["sink-kafka"].port},
    )
    pipeline = Pipeline(
        dbs,
        broker.bootstrap,
        "faults",
        source_dsn=through(dbs.source_dsn, links["src-pg"]),
        source_bootstrap=f"127.0.0.1:{links['src-kafka'].port}",
        sink_source_dsn=through(dbs.source_dsn, links["sink-src"]),
        sink_target_dsn=through(dbs.target_dsn, links["sink-pg"]),
        sink_bootstrap=f"127.0.0.1:{links['sink-kafka'].port}",
    )
    prepare_tables(dbs.source_dsn, dbs.target_dsn)
    writer = Writer(dbs.source_dsn, rate=300)
    source = pipeline.start_source()
    wait_for_output(source, "streaming from slot")
    sink = pipeline.start_sink()
    rig = NetworkRig(links, pipeline, writer, source, sink, report)
    pipeline.wait_applying(rig.processes, minimum=200)
    for name, proxy in links.items():
        assert proxy.connections > 0, f"nothing went through {name}"
    return rig


def test_network_faults_on_the_kafka_and_target_links(
    dbs: Databases,
    private_broker: Callable[..., FaultBroker],
    proxies: Callable[..., TcpProxy],
    long_run: bool,
    report: ScenarioReport,
) -> None:
    rig = network_rig(dbs, private_broker, proxies, report)
    rng = rig.rng
    links = ["src-kafka", "sink-kafka", "sink-pg"]
    for name in links:  # cuts, one link at a time
        rig.fault("cut", [name], rng.uniform(1.0, 20.0) if long_run else 2.0, TcpProxy.cut)
    if long_run:
        rig.fault("cut", links, 10.0, TcpProxy.cut)
    # latency on every link at once, the source's PostgreSQL link too (each alone in the long run)
    rig.fault("delay 300 ms", ["src-pg", *links], 3.0, lambda p: p.delay(0.3))
    if long_run:
        for name in ["src-pg", *links]:
            rig.fault("delay 1 s", [name], 10.0, lambda p: p.delay(1.0))
            rig.fault("throttle 50 kB/s", [name], 10.0, lambda p: p.throttle(50_000))
        # a black hole: nothing is reset, the connectors find out through their own timeouts
        for name in links:
            rig.fault("black hole", [name], 40.0, TcpProxy.hang)
    rig.cut_in_big_transaction("src-kafka", (1_000_000, 4_000_000))
    rig.finish()


def test_network_faults_on_the_source_replication_link(
    dbs: Databases,
    private_broker: Callable[..., FaultBroker],
    proxies: Callable[..., TcpProxy],
    long_run: bool,
    report: ScenarioReport,
) -> None:
    rig = network_rig(dbs, private_broker, proxies, report)
    rig.fault("cut", ["src-pg"], rig.rng.uniform(1.0, 20.0) if long_run else 2.0, TcpProxy.cut)
    if long_run:
        rig.fault("black hole", ["src-pg"], 40.0, TcpProxy.hang)
    rig.cut_in_big_transaction("src-pg", (2_000_000, 12_000_000))
    rig.finish()
