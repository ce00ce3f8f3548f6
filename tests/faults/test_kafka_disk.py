"""Scenario 9: the (private) broker's log directory runs out of space, then turns read-only, while
both connectors run. The broker stops serving (Kafka shuts itself down when its only log directory
fails); the operator frees space / repairs the file system and starts it again. The connectors, the
same processes throughout, carry on by themselves: nothing lost, nothing doubled.

The log directory is an ext4 file system in a file, loop-mounted (tests/faults/disk.py); the KRaft
metadata log stays on the ordinary disk, so the failure is purely one of the data directory.

The read-only switch happens at a quiet moment: the writer is paused (SIGSTOP), the pipeline caught
up and the file system synced first. A single broker acknowledges from the page cache (durability
comes from replication), so a file system that turns read-only under load loses the acknowledged
messages not yet written back; the idempotent producer then sees a sequence gap (OutOfOrderSequence)
and fails fatally, and cdc-source dies with a traceback. Flushing every append instead
(log.flush.interval.messages=1) makes the broker answer UNKNOWN_SERVER_ERROR (its msync of the index
throws an UncheckedIOException) and cdc-source stops on that delivery failure. Both are limits of a
replication-factor-1 broker on a failing disk, described in the report, not what this scenario is
about: whether the connectors ride out a broker that stops on a bad log directory."""

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Databases
from tests.faults.broker import FaultBroker
from tests.faults.disk import LoopDisk
from tests.faults.harness import (
    Pipeline,
    ScenarioReport,
    Writer,
    final_check,
    prepare_tables,
    settle,
    wait_applied_all,
    wait_published,
)
from tests.helpers import wait_until
from tests.kafka_broker import free_port
from tests.pipeline import stop_cleanly, wait_for_output, while_running


@pytest.fixture
def kafka_disk(tmp_path: Path) -> Iterator[LoopDisk]:
    disk = LoopDisk(tmp_path / "kafka-disk.img", tmp_path / "kafka-disk").create()
    yield disk
    disk.remove()


def test_kafka_log_disk_full_then_read_only(
    dbs: Databases,
    private_broker: Callable[..., FaultBroker],
    kafka_disk: LoopDisk,
    tmp_path: Path,
    long_run: bool,
    report: ScenarioReport,
) -> None:
    broker = private_broker(
        listeners={"PLAINTEXT": free_port()},
        extra={
            "log.dirs": str(kafka_disk.mountpoint / "kafka"),
            "metadata.log.dir": str(tmp_path / "kafka-meta"),
        },
    )
    pipeline = Pipeline(dbs, broker.bootstrap, "faults")
    prepare_tables(dbs.source_dsn, dbs.target_dsn)
    writer = Writer(dbs.source_dsn, rate=300)
    source = pipeline.start_source()
    wait_for_output(source, "streaming from slot")
    sink = pipeline.start_sink()
    processes = [source, sink, writer.process]
    pipeline.wait_applying(processes, minimum=200)

    def broker_fails(what: str) -> float:
        """Until the broker gave up on its log directory (it exits); seconds it took."""
        started = time.monotonic()
        wait_until(
            while_running(processes, lambda: not broker.running()),
            timeout=90,
            message=f"the broker kept running on a {what} log directory:\n{broker.log_text()[-3000:]}",
        )
        assert "all log dirs" in broker.log_text(), broker.log_text()[-3000:]
        return time.monotonic() - started

    for n in range(2 if long_run else 1):
        # 1. Full: something else takes the space; the broker's next appends fail with ENOSPC.
        settle(1.0, processes)
        kafka_disk.fill(leave=32 * 1024)
        failed_after = broker_fails("full")
        down = 15.0 if long_run else 2.0
        settle(down, processes)
        kafka_disk.release()
        broker.start()
        restarted = time.time()
        report.add(
            "Kafka log disk full (broker stops), space freed, broker started",
            f"#{n + 1}, broker gave up after {failed_after:.1f} s",
            down,
            pipeline.wait_recovered(restarted, processes, timeout=180),
        )

        # 2. Read-only: an ext4 error turns the file system read-only under the running broker, at
        # a quiet moment; the writer goes on right after, so the broker's next appends fail.
        settle(1.0, processes)
        writer.process.send_signal(signal.SIGSTOP)
        try:
            wait_published(pipeline, processes)
            wait_applied_all(pipeline, processes)
            os.sync()
            kafka_disk.make_read_only()
        finally:
            writer.process.send_signal(signal.SIGCONT)
        assert kafka_disk.read_only(), "the file system did not turn read-only"
        failed_after = broker_fails("read-only")
        settle(down, processes)
        kafka_disk.repair()
        broker.start()
        restarted = time.time()
        report.add(
            "Kafka log disk read-only (broker stops), fsck, broker started",
            f"#{n + 1}, broker gave up after {failed_after:.1f} s",
            down,
            pipeline.wait_recovered(restarted, processes, timeout=180),
        )

    settle(2.0, processes)
    report.operations = writer.stop()
    final_check(pipeline, report, [source, sink])
    stop_cleanly(sink, source)
