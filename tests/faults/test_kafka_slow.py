"""Scenario 7: Kafka is slower than the source. cdc-source must pause reading WAL rather than buffer
without bound (its RSS, measured with psutil, stays bounded; the producer queue stops at
--max-in-flight), and the slot must keep the WAL until Kafka has acknowledged it: confirmed_flush_lsn
never passes what is in Kafka, and does not move at all while nothing is acknowledged. Afterwards
nothing is lost or doubled.

Two tests: the source's link to the (private) broker becomes a black hole for a while (Kafka accepts
and acknowledges nothing, as a frozen broker would), and the link is throttled so that Kafka keeps
acknowledging, only more slowly than the source reads (the source must pause, not fail, while its producer queue is full).

The black hole stands for the SIGSTOPped broker of the brief: freezing the private broker itself
also freezes the sink's consumer group, and librdkafka's consumer then sometimes never rejoins (a
bug of its own, see the report; the sink has no watchdog for it), which made this scenario fail at
random for a reason that has nothing to do with the source."""

import re
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

import orjson
import psutil

from pg_kafka_cdc.common.lsn import lsn_to_int
from tests.conftest import Databases
from tests.faults.broker import FaultBroker
from tests.faults.harness import (
    Pipeline,
    ScenarioReport,
    Writer,
    final_check,
    prepare_tables,
    settle,
)
from tests.faults.proxy import TcpProxy
from tests.helpers import CliProcess, psql_rows
from tests.kafka_broker import free_port
from tests.kafka_read import read_topics
from tests.pipeline import assert_running, partition_ends, stop_cleanly, wait_for_output

MAX_IN_FLIGHT = 1000  # the smallest allowed: backpressure sets in within seconds
MB = 1024 * 1024
THROTTLE = 50_000  # bytes/s: below what the workload needs (compressed), acknowledgements keep coming
RSS_HEADROOM = 150 * MB  # librdkafka's queue (<= 64 MB), decoded batches, Python's allocator


@dataclass
class Sample:
    at: float
    rss: int
    confirmed: int
    retained: int  # bytes of WAL the slot holds (current WAL position - restart_lsn)
    wal: int  # the server's current WAL position
    in_flight: float  # cdc_source_in_flight_messages
    received: float  # cdc_source_received_lsn: the newest position the source read
    ends: dict[tuple[str, int], int] | None  # high watermarks read right after `confirmed`


def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r"^(cdc_source_[a-z_]+) ([0-9.e+-]+)$", text, re.MULTILINE)}


def sample(pipeline: Pipeline, source: CliProcess, metrics_port: int, with_ends: bool) -> Sample:
    [(confirmed, retained, wal)] = psql_rows(
        pipeline.direct.source_dsn,
        "SELECT confirmed_flush_lsn::text, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, "
        "pg_current_wal_lsn()::text FROM pg_replication_slots WHERE slot_name = %s",
        (pipeline.slot,),
    )
    ends = partition_ends(pipeline.bootstrap, pipeline.topics) if with_ends else None
    try:
        rss = psutil.Process(source.pid).memory_info().rss
        found = metrics(metrics_port)
    except (OSError, psutil.Error):
        time.sleep(0.5)
        assert_running(source)  # it died: say how
        raise
    return Sample(
        time.monotonic(),
        rss,
        lsn_to_int(confirmed),
        int(retained),
        lsn_to_int(wal),
        found.get("cdc_source_in_flight_messages", 0.0),
        found.get("cdc_source_received_lsn", 0.0),
        ends,
    )


def watch(
    pipeline: Pipeline,
    source: CliProcess,
    metrics_port: int,
    processes: list[CliProcess],
    seconds: float,
    with_ends: bool,
) -> list[Sample]:
    samples = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert_running(*processes)
        samples.append(sample(pipeline, source, metrics_port, with_ends))
        time.sleep(0.5)
    return samples


def late_messages(pipeline: Pipeline, samples: list[Sample]) -> list[str]:
    """Messages of transactions the slot had confirmed (commit LSN below confirmed_flush_lsn) that
    were not in Kafka yet when that position was read: WAL the slot gave up too early."""
    first: dict[tuple[str, int, bytes | None, int, int], tuple[int, int]] = {}  # change -> (partition, offset)
    for record in read_topics(pipeline.bootstrap, pipeline.topics):
        if record.value is None:
            continue
        envelope = orjson.loads(record.value)
        source = envelope["source"]
        if source.get("snapshot"):
            continue
        change = (record.topic, int(source["commit_lsn"]), record.key, int(source["lsn"]), int(source["seq"]))
        first.setdefault(change, (record.partition, record.offset))
    problems = []
    for s in samples:
        assert s.ends is not None
        for (topic, commit_lsn, _key, _lsn, _seq), (partition, offset) in first.items():
            if commit_lsn < s.confirmed and offset >= s.ends.get((topic, partition), 0):
                problems.append(
                    f"{topic}[{partition}]@{offset} (commit {commit_lsn:X}) arrived after the slot confirmed "
                    f"{s.confirmed:X}"
                )
    return problems


@dataclass
class SlowRig:
    pipeline: Pipeline
    link: TcpProxy
    writer: Writer
    source: CliProcess
    sink: CliProcess
    metrics_port: int
    baseline: int = 0  # the source's RSS under normal load

    @property
    def processes(self) -> list[CliProcess]:
        return [self.source, self.sink, self.writer.process]

    def watch(self, seconds: float, with_ends: bool = True) -> list[Sample]:
        return watch(self.pipeline, self.source, self.metrics_port, self.processes, seconds, with_ends)


def slow_rig(
    dbs: Databases, private_broker: Callable[..., FaultBroker], proxies: Callable[..., TcpProxy]
) -> SlowRig:
    """The pipeline under load, cdc-source reaching a private broker through a proxy (the sink and
    the test reach the broker directly)."""
    source_port = free_port()
    link = proxies(source_port, name="src-kafka")
    broker = private_broker(listeners={"DIRECT": free_port(), "SRC": source_port}, advertised={"SRC": link.port})
    pipeline = Pipeline(dbs, broker.bootstrap, "faults", source_bootstrap=f"127.0.0.1:{link.port}")
    prepare_tables(dbs.source_dsn, dbs.target_dsn)
    writer = Writer(dbs.source_dsn, rate=600)
    metrics_port = free_port()
    source = pipeline.start_source("--max-in-flight", str(MAX_IN_FLIGHT), "--metrics-port", str(metrics_port))
    wait_for_output(source, "streaming from slot")
    sink = pipeline.start_sink()
    rig = SlowRig(pipeline, link, writer, source, sink, metrics_port)
    pipeline.wait_applying(rig.processes, minimum=500)
    rig.baseline = max(s.rss for s in rig.watch(3.0, with_ends=False))
    return rig


def check_bounded(rig: SlowRig, report: ScenarioReport, samples: list[Sample], nothing_acknowledged: bool) -> None:
    """After the final check: the source's memory and the slot behaved while Kafka lagged."""
    baseline = rig.baseline
    peak = max(s.rss for s in samples)
    retained = max(s.retained for s in samples)
    peak_in_flight = max(s.in_flight for s in samples)
    report.notes.append(
        f"source RSS {baseline / MB:.0f} MB before, peak {peak / MB:.0f} MB while Kafka lagged; "
        f"slot held up to {retained / MB:.1f} MB of WAL; up to {peak_in_flight:.0f} messages in flight"
    )
    # Backpressure: the producer queue filled up to --max-in-flight, and reading (nearly) stopped
    # while the writer kept writing WAL.
    assert MAX_IN_FLIGHT * 0.9 <= peak_in_flight <= MAX_IN_FLIGHT + 10, f"in flight peaked at {peak_in_flight}"
    stalled = [s for s in samples if s.in_flight >= MAX_IN_FLIGHT - 5]
    assert len(stalled) >= 4, "the producer queue was full for less than 2 s"
    read, written = stalled[-1].received - stalled[0].received, stalled[-1].wal - stalled[0].wal
    assert written > 0 and read <= written / (10 if nothing_acknowledged else 1.5), (
        f"the source kept reading WAL while its producer queue was full ({read:.0f} of {written} bytes)"
    )
    # RSS: bounded by the producer queue, not by how much WAL waits.
    assert peak <= baseline + RSS_HEADROOM, f"source RSS grew from {baseline / MB:.0f} MB to {peak / MB:.0f} MB"
    tail = samples[len(samples) // 2 :]
    assert max(s.rss for s in tail) <= min(s.rss for s in tail) + 30 * MB, (
        "the source's RSS kept growing while Kafka lagged: " + ", ".join(f"{s.rss / MB:.0f}" for s in samples)
    )
    # The slot keeps the WAL written meanwhile, and never confirms a transaction before all its
    # messages are in Kafka.
    assert samples[-1].retained > samples[0].retained, "the slot did not keep the WAL written meanwhile"
    if nothing_acknowledged:  # after the answers already on their way, the slot does not move at all
        settled = [s for s in samples if s.at >= samples[0].at + 3.0]
        assert len({s.confirmed for s in settled}) == 1, (
            "confirmed_flush_lsn moved while Kafka acknowledged nothing: "
            + ", ".join(f"{s.confirmed:X}" for s in settled)
        )
    late = late_messages(rig.pipeline, samples)
    assert not late, f"{len(late)} messages reached Kafka after the slot had confirmed them:\n" + "\n".join(
        late[:10]
    )


def test_kafka_accepting_nothing_pauses_the_source_and_the_slot_keeps_the_wal(
    dbs: Databases,
    private_broker: Callable[..., FaultBroker],
    proxies: Callable[..., TcpProxy],
    long_run: bool,
    report: ScenarioReport,
) -> None:
    rig = slow_rig(dbs, private_broker, proxies)
    stalls: list[list[Sample]] = []
    for n in range(2 if long_run else 1):
        hung_for = 60.0 if long_run else 15.0
        settle(1.0, rig.processes)
        rig.link.hang()
        try:
            stalls.append(rig.watch(hung_for))
        finally:
            rig.link.restore()
        resumed = time.time()
        recovery = rig.pipeline.wait_recovered(resumed, rig.processes)
        report.add("black hole cdc-source -> Kafka", f"#{n + 1}", down=hung_for, recovery=recovery)
    settle(2.0, rig.processes)
    report.operations = rig.writer.stop()
    final_check(rig.pipeline, report, [rig.source, rig.sink])
    stop_cleanly(rig.sink, rig.source)
    for samples in stalls:
        check_bounded(rig, report, samples, nothing_acknowledged=True)


def test_kafka_slower_than_the_source_pauses_the_source_and_the_slot_keeps_the_wal(
    dbs: Databases,
    private_broker: Callable[..., FaultBroker],
    proxies: Callable[..., TcpProxy],
    long_run: bool,
    report: ScenarioReport,
) -> None:
    rig = slow_rig(dbs, private_broker, proxies)
    throttled = 60.0 if long_run else 20.0
    rig.link.throttle(THROTTLE)
    try:
        samples = rig.watch(throttled)
    finally:
        rig.link.restore()
    restored = time.time()
    report.add(
        f"throttle cdc-source -> Kafka to {THROTTLE // 1000} kB/s",
        down=throttled,
        recovery=rig.pipeline.wait_recovered(restored, rig.processes),
    )
    settle(2.0, rig.processes)
    report.operations = rig.writer.stop()
    final_check(rig.pipeline, report, [rig.source, rig.sink])
    stop_cleanly(rig.sink, rig.source)
    check_bounded(rig, report, samples, nothing_acknowledged=False)
