"""The soak test: the whole pipeline on private services (source and target PostgreSQL clusters, a
Kafka broker, a TCP proxy on every link), the writer at 1,000 changes/s, two sinks in one group, and
every 30 s a fault drawn at random from scenarios 1-7 of the fault suite:

    1 kill -9 cdc-source              5 SIGSTOP a sink past the session timeout, SIGCONT
    2 kill -9 a sink                  6 a network cut or delay on a random link
    3 kill -9 Kafka, start it again   7 Kafka slower than the source (throttled or black-holed link)
    4 restart the source or the target PostgreSQL (fast shutdown)

A supervisor restarts a connector that exits by itself (as systemd or Kubernetes would) and counts
it as a crash; a watchdog restarts the sinks when nothing is applied for 90 s after a fault. At the
end the writer stops, the pipeline catches up, and the target is checked as every fault scenario
is (tests/faults/harness.py: cdc-verify, row by row, every row write counted per key on both sides,
no step back to an older row version, no position twice in the topics). Prints a summary with those
figures; exit 1 when rows were lost, doubled or stepped back, or a message was published twice.

    python -m tests.faults.soak --minutes 10
"""

import argparse
import contextlib
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from psycopg2.extensions import make_dsn

from tests.conftest import Databases
from tests.faults.broker import FaultBroker
from tests.faults.harness import Pipeline, ScenarioReport, Writer, final_check, prepare_tables
from tests.faults.proxy import TcpProxy
from tests.helpers import CliProcess, reap_started, stop_process
from tests.kafka_broker import free_port
from tests.pg_cluster import PgCluster
from tests.pipeline import wait_for_output

RECOVERY_TIMEOUT = 180.0
WATCHDOG_AFTER = 90.0


@dataclass
class FaultRecord:
    at: float  # seconds since the start
    scenario: int
    kind: str
    down: float = 0.0
    recovery: float | None = None
    note: str = ""


@dataclass
class Crash:
    at: float
    name: str
    code: int | None
    error: str


@dataclass
class Rig:
    source_pg: PgCluster
    target_pg: PgCluster
    broker: FaultBroker
    links: dict[str, TcpProxy]
    pipeline: Pipeline
    writer: Writer
    source: CliProcess
    sinks: dict[str, CliProcess]
    started: float = field(default_factory=time.monotonic)
    crashes: list[Crash] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def start_source(self) -> None:
        self.source = self.pipeline.start_source("--partitions", "3")

    def start_sink(self, name: str) -> None:
        self.sinks[name] = self.pipeline.start_sink()

    def supervise(self) -> None:
        """Restart a connector that exited by itself, recording the crash."""
        if self.source.poll() is not None:
            self.crashes.append(
                Crash(self.elapsed(), "cdc-source", self.source.returncode, last_error(self.source))
            )
            say(self, f"cdc-source exited ({self.source.returncode}): {self.crashes[-1].error}; restarting it")
            self.start_source()
        for name, sink in list(self.sinks.items()):
            if sink.poll() is not None:
                self.crashes.append(Crash(self.elapsed(), f"cdc-sink {name}", sink.returncode, last_error(sink)))
                say(self, f"cdc-sink {name} exited ({sink.returncode}): {self.crashes[-1].error}; restarting it")
                self.start_sink(name)
        if self.writer.operations == 0 and self.writer.process.poll() is not None:
            raise SystemExit(f"the writer exited:\n{self.writer.process.stderr_text()[-3000:]}")

    def tick(self, seconds: float = 0.5) -> None:
        """Supervise and sample the lag for `seconds`."""
        deadline = time.monotonic() + seconds
        while True:
            self.supervise()
            lag = self.pipeline.lag_seconds()
            if lag is not None:
                self.lags.append(lag)
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.5, left))

    def recover(self, since: float) -> tuple[float | None, str]:
        """Seconds until a change committed after `since` (epoch) is applied; the watchdog restarts
        the sinks once if nothing comes for WATCHDOG_AFTER seconds."""
        started = time.monotonic()
        note = ""
        while time.monotonic() - started < RECOVERY_TIMEOUT:
            self.tick(0.2)
            last = self.pipeline.last_applied_commit()
            if last is not None and last >= since:
                return time.time() - since, note
            if not note and time.monotonic() - started > WATCHDOG_AFTER:
                note = "watchdog restarted the sinks"
                say(self, f"nothing applied for {WATCHDOG_AFTER:.0f} s: {note}")
                for name, sink in self.sinks.items():
                    stop_process(sink, signal.SIGKILL)
                    self.start_sink(name)
        return None, note or "not recovered"


def last_error(process: CliProcess) -> str:
    lines = [line for line in process.stderr_text().splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["(no output)"])[-1][:300]


def say(rig: Rig, text: str) -> None:
    minutes, seconds = divmod(int(rig.elapsed()), 60)
    print(f"[{minutes:02d}:{seconds:02d}] {text}", flush=True)


# --- the faults -----------------------------------------------------------------------------------


def kill_source(rig: Rig, rng: random.Random) -> tuple[str, float]:
    stop_process(rig.source, signal.SIGKILL)
    down = rng.uniform(0.0, 3.0)
    time.sleep(down)
    rig.start_source()
    return "kill -9 cdc-source", down


def kill_sink(rig: Rig, rng: random.Random) -> tuple[str, float]:
    name = rng.choice(sorted(rig.sinks))
    stop_process(rig.sinks[name], signal.SIGKILL)
    down = rng.uniform(0.0, 3.0)
    time.sleep(down)
    rig.start_sink(name)
    return f"kill -9 cdc-sink {name}", down


def kill_kafka(rig: Rig, rng: random.Random) -> tuple[str, float]:
    rig.broker.kill()
    down = rng.uniform(3.0, 10.0)
    rig.tick(down)
    rig.broker.start()
    return "kill -9 Kafka, start again", down


def restart_postgres(rig: Rig, rng: random.Random) -> tuple[str, float]:
    which = rng.choice(["source", "target"])
    cluster = rig.source_pg if which == "source" else rig.target_pg
    down = rng.uniform(0.0, 5.0)
    cluster.stop("fast")
    time.sleep(down)
    cluster.start()
    return f"restart {which} PostgreSQL (-m fast)", down


def freeze_sink(rig: Rig, rng: random.Random) -> tuple[str, float]:
    name = rng.choice(sorted(rig.sinks))
    sink = rig.sinks[name]
    down = rng.uniform(13.0, 20.0)  # past session.timeout.ms (10 s): the group moves its partitions
    sink.send_signal(signal.SIGSTOP)
    try:
        rig.tick(down)
    finally:
        sink.send_signal(signal.SIGCONT)
    return f"SIGSTOP cdc-sink {name}, SIGCONT", down


def network(rig: Rig, rng: random.Random) -> tuple[str, float]:
    name = rng.choice(["src-pg", "src-kafka", "sink-kafka", "sink-pg"])
    link = rig.links[name]
    if rng.random() < 0.5:
        down = rng.uniform(2.0, 8.0)
        link.cut()
        kind = f"network cut {name}"
    else:
        down = 5.0
        link.delay(0.3)
        kind = f"network delay 300 ms {name}"
    try:
        rig.tick(down)
    finally:
        link.restore()
    return kind, down


def slow_kafka(rig: Rig, rng: random.Random) -> tuple[str, float]:
    link = rig.links["src-kafka"]
    down = rng.uniform(8.0, 15.0)
    if rng.random() < 0.5:
        link.throttle(50_000)
        kind = "Kafka slower than the source (src-kafka throttled to 50 kB/s)"
    else:
        link.hang()
        kind = "Kafka accepts nothing (src-kafka black hole)"
    try:
        rig.tick(down)
    finally:
        link.restore()
    return kind, down


FAULTS: dict[int, Callable[[Rig, random.Random], tuple[str, float]]] = {
    1: kill_source,
    2: kill_sink,
    3: kill_kafka,
    4: restart_postgres,
    5: freeze_sink,
    6: network,
    7: slow_kafka,
}


# --- the run -------------------------------------------------------------------------------------


def build(workdir: Path, rate: float, cleanup: list[Callable[[], None]]) -> Rig:
    source_pg = PgCluster("soak-source").init().start()
    cleanup.append(source_pg.remove)
    target_pg = PgCluster("soak-target").init().start()
    cleanup.append(target_pg.remove)
    dbs = Databases("soak", source_pg.create_database("soak"), target_pg.create_database("soak"))
    source_kafka_port, sink_kafka_port = free_port(), free_port()
    links = {
        "src-pg": TcpProxy(source_pg.port, name="src-pg"),
        "src-kafka": TcpProxy(source_kafka_port, name="src-kafka"),
        "sink-kafka": TcpProxy(sink_kafka_port, name="sink-kafka"),
        "sink-pg": TcpProxy(target_pg.port, name="sink-pg"),
        "sink-src": TcpProxy(source_pg.port, name="sink-src"),
    }
    for link in links.values():
        cleanup.append(link.close)
    broker = FaultBroker(
        workdir / "kafka",
        listeners={"DIRECT": free_port(), "SRC": source_kafka_port, "SNK": sink_kafka_port},
        advertised={"SRC": links["src-kafka"].port, "SNK": links["sink-kafka"].port},
    )
    cleanup.append(broker.kill)
    cleanup.append(broker.resume)
    broker.start()

    def through(dsn: str, link: TcpProxy) -> str:
        return make_dsn(dsn, port=str(link.port))

    pipeline = Pipeline(
        dbs,
        broker.bootstrap,
        "soak",
        source_dsn=through(dbs.source_dsn, links["src-pg"]),
        source_bootstrap=f"127.0.0.1:{links['src-kafka'].port}",
        sink_source_dsn=through(dbs.source_dsn, links["sink-src"]),
        sink_target_dsn=through(dbs.target_dsn, links["sink-pg"]),
        sink_bootstrap=f"127.0.0.1:{links['sink-kafka'].port}",
    )
    prepare_tables(dbs.source_dsn, dbs.target_dsn)
    writer = Writer(dbs.source_dsn, rate=rate)
    rig = Rig(
        source_pg, target_pg, broker, links, pipeline, writer, pipeline.start_source("--partitions", "3"), {}
    )
    rig.start_sink("a")
    # not both at once: two sinks installing their bookkeeping schema on a fresh target together
    # race (CREATE SCHEMA IF NOT EXISTS -> unique violation; see the report)
    wait_for_output(rig.sinks["a"], "consuming", timeout=120)
    rig.start_sink("b")
    return rig


def summary(rig: Rig, report: ScenarioReport, faults: list[FaultRecord], seconds: float) -> str:
    lines = [
        "",
        f"soak: {seconds / 60:.1f} minutes, {report.operations} writer operations, {len(faults)} faults",
    ]
    for f in faults:
        recovery = "NOT RECOVERED" if f.recovery is None else f"recovered in {f.recovery:.1f} s"
        lines.append(
            f"  [{int(f.at) // 60:02d}:{int(f.at) % 60:02d}] {f.scenario}: {f.kind} ({f.down:.1f} s), {recovery}"
            + (f" - {f.note}" if f.note else "")
        )
    recoveries = [f.recovery for f in faults if f.recovery is not None]
    if recoveries:
        lines.append(
            f"recovery: max {max(recoveries):.1f} s, median {sorted(recoveries)[len(recoveries) // 2]:.1f} s"
        )
    lines.append(f"max lag: {max(rig.lags, default=0.0):.1f} s (newest source commit applied vs. now)")
    lines.append(f"connector crashes (restarted by the supervisor): {len(rig.crashes)}")
    for name, n in Counter(f"{c.name}: {c.error}" for c in rig.crashes).most_common():
        lines.append(f"  {n} x {name}")
    kills = sum("kill" in f.kind for f in faults)
    lines += [
        f"kills: {kills} (of them of cdc-source: {sum('cdc-source' in f.kind for f in faults)}, "
        f"of a sink: {sum('kill -9 cdc-sink' in f.kind for f in faults)})",
        f"row writes: source {report.source_writes}, target {report.target_writes}",
        f"rows lost: {report.rows_lost}, writes doubled: {report.rows_doubled}, steps back: {report.steps_back}",
        f"Kafka: {report.kafka_duplicates} duplicates (a position twice in a partition) of "
        f"{report.kafka_messages} messages; {report.republish_skipped} messages read again by a restarted "
        f"cdc-source and not published twice, {report.sink_skipped} changes a sink skipped as applied "
        "already (both from their log lines; a killed sink's last 10 s of skips are not logged)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to inject faults")
    parser.add_argument("--rate", type=float, default=1000.0, help="writer operations per second")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between two faults")
    parser.add_argument("--scenarios", default="1,2,3,4,5,6,7", help="which fault scenarios to draw from")
    parser.add_argument("--seed", type=int, default=None, help="random seed (printed when not given)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    scenarios = [int(s) for s in args.scenarios.split(",")]
    print(
        f"soak: {args.minutes:g} minutes, writer at {args.rate:g}/s, a fault every {args.interval:g} s "
        f"from scenarios {scenarios}, seed {seed}",
        flush=True,
    )

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    cleanup: list[Callable[[], None]] = []
    workdir = Path(tempfile.mkdtemp(prefix="cdc-soak-"))
    faults: list[FaultRecord] = []
    report = ScenarioReport("soak")
    try:
        rig = build(workdir, args.rate, cleanup)
        rig.started = time.monotonic()
        say(rig, f"pipeline up; first fault in {args.interval:g} s")
        end = rig.started + args.minutes * 60
        next_fault = rig.started + args.interval
        while time.monotonic() < end:
            rig.tick(max(0.0, min(next_fault, end) - time.monotonic()))
            if time.monotonic() >= end:
                break
            scenario = rng.choice(scenarios)
            at = rig.elapsed()
            kind, down = FAULTS[scenario](rig, rng)
            recovery, note = rig.recover(time.time())
            faults.append(FaultRecord(at, scenario, kind, down, recovery, note))
            say(
                rig,
                f"{scenario}: {kind} ({down:.1f} s): "
                f"{'NOT RECOVERED' if recovery is None else f'recovered in {recovery:.1f} s'} {note}".rstrip(),
            )
            next_fault = max(next_fault + args.interval, time.monotonic() + 5.0)
        say(rig, "stopping the writer; waiting for the pipeline to catch up")
        report.operations = rig.writer.stop()
        rig.tick(2.0)
        failure = ""
        try:
            final_check(rig.pipeline, report, [rig.source, *rig.sinks.values()])
        except AssertionError as exc:
            failure = str(exc)
        print(summary(rig, report, faults, time.monotonic() - rig.started), flush=True)
        if failure:
            print(f"\nFAILED: {failure[:5000]}", flush=True)
            return 1
        print("identical: yes", flush=True)
        return 0
    finally:
        reap_started()
        for step in reversed(cleanup):
            with contextlib.suppress(Exception):
                step()


if __name__ == "__main__":
    sys.exit(main())
