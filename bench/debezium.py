"""Scenario 7, the Debezium baseline: the `changes` workload (same table, same N, same transaction
size) in the WAL once, then consumed one system at a time, each from its own slot into its own topics
or target database: cdc-source, the Debezium PostgreSQL source (pgoutput, JSON with schemas, as the
JDBC sink needs, and schemaless JSON), cdc-sink, and the Debezium JDBC sink (upserts, deletes,
primary.key.mode=record_key) reading what the Debezium source produced.

Kafka Connect runs standalone, one JVM per connector, against the stack's broker; its jars come from
Maven Central through bench/debezium/pom.xml into .stack/debezium/<hash of the pom>/ (fetched once).
Connect's start-up is timed apart from throughput: events/s of every system here runs from its first
event (first message in its topic, first row in its target) to its last (the topic holds every
message, the target table equals the source's), polled the same way for all four. Peak RSS and CPU
seconds are the whole process's; CPU is also given for the first-to-last-event span alone.

An artifact that Maven cannot fetch makes the scenario report `blocked: <artifact>: <error>`.
"""

import contextlib
import hashlib
import json
import logging
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from confluent_kafka import Consumer, TopicPartition
from psycopg2.extensions import parse_dsn

from bench import measure
from bench.config import REPO, Workload, scenario_tag
from bench.context import Context
from bench.kafka import delete_prefix, message_count
from bench.pg import Scratch, connect, create_logical_slot, scalar
from bench.procs import Proc
from bench.workload import QUALIFIED, TABLE, counts, create_schema, create_table_only, fingerprint, generate
from pg_kafka_cdc.common.lsn import int_to_lsn

log = logging.getLogger("bench.debezium")

POM_DIR = REPO / "bench" / "debezium"
POM = POM_DIR / "pom.xml"
LOG4J = POM_DIR / "log4j2.properties"
CACHE = REPO / ".stack" / "debezium"
# pom profile -> folder under the cache (the worker's classpath, or a plugin folder under plugins/)
PROFILES = {
    "runtime": "runtime",
    "postgres": "plugins/debezium-connector-postgres",
    "jdbc": "plugins/debezium-connector-jdbc",
}
# What the worker already provides, left out of the plugin folders: Kafka's own jars, slf4j, and
# Jackson (a plugin's Jackson clashes with Connect 4's jackson-module-blackbird).
PLUGIN_EXCLUDED_GROUPS = (
    "org.apache.kafka",
    "org.slf4j",
    "com.fasterxml.jackson.core",
    "com.fasterxml.jackson.datatype",
    "com.fasterxml.jackson.module",
    "com.fasterxml.jackson.dataformat",
    "com.fasterxml.jackson.jakarta.rs",
)
MAVEN_TIMEOUT = 1200.0

# kafka-run-class.sh's JVM options with connect-standalone.sh's heap
JVM_OPTIONS = (
    "-Xms256m",
    "-Xmx2g",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-Djava.awt.headless=true",
)
JSON_CONVERTER = "org.apache.kafka.connect.json.JsonConverter"
# The worker's producer, set like cdc-source's (source_connector/connector.py PRODUCER_TUNING)
PRODUCER = {
    "producer.acks": "all",
    "producer.enable.idempotence": "true",
    "producer.compression.type": "lz4",
    "producer.linger.ms": "5",
    "producer.batch.size": "1048576",
}
# The source at Debezium's own defaults, stated (and set) so that a rerun with a later version runs
# the same (8192/32768 were no faster here). The JDBC sink's batch.size and its consumer's
# max.poll.records raised from 500 to 2000: 8.6k events/s instead of 5.2k at 50,000 changes on this
# 2-core machine (5000 was no faster and took 1.5 GB), so it is measured at its better setting.
SOURCE_TUNING = {"max.batch.size": "2048", "max.queue.size": "8192", "poll.interval.ms": "500"}
SINK_TUNING = {"batch.size": "2000"}
SINK_CONSUMER = {"consumer.max.poll.records": "2000"}
# What the report says about the choices above (and what was found trying the others here).
NOTES = (
    "The JDBC sink runs with batch.size=2000 and consumer.max.poll.records=2000 instead of Debezium's "
    "500/500, which applied 5.2k instead of 8.6k events/s at 50,000 changes here (5000/5000 was no faster, "
    "and took 1.5 GB); the source's max.batch.size/max.queue.size at 8192/32768 were no faster than the "
    "defaults 2048/8192.",
    "Logging: log4j2 at INFO (bench/debezium/log4j2.properties), except the JDBC sink's two WARN lines "
    "for every tombstone it skips (io.debezium.connector.jdbc.JdbcChangeEventSink, "
    "io.debezium.sink.naming.DefaultCollectionNamingStrategy), set to ERROR.",
    "Heap: Connect's shipped -Xms256m -Xmx2g, so the JVMs' RSS follows the heap's ceiling more than their "
    "needs: with -Xmx512m, at 100,000 changes, the source peaked at 434 MB (1,499 MB with -Xmx2g) at the same "
    "events/s, and the JDBC sink at 571 MB (1,054 MB), 25 % slower.",
    "plugin.discovery=service_load: Connect's start to the task running takes 3-6 s here; hybrid_warn took "
    "8.6-9.1 s. With Jackson's jars in the plugin folders the JDBC sink fails at start (ServiceConfigurationError: "
    "BlackbirdModule not a subtype). With schemaless JSON the JDBC sink skips every record as not a "
    "Debezium record (it needs JSON with schemas).",
)
START_TIMEOUT = 180.0
POLL = 0.05  # seconds between progress checks (topic watermark, target's max(id))
STATUS_EVERY = 2.0  # seconds between checks of the connector's state while it streams


class Blocked(Exception):
    """An artifact could not be fetched (or a tool is missing): the scenario reports it."""


# --- jars ----------------------------------------------------------------------------------------------


def pom_versions() -> dict[str, str]:
    """The <properties> of the pom: the versions the baseline runs."""
    root = ET.parse(POM).getroot()
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    props = root.find("m:properties", ns)
    if props is None:
        return {}
    return {el.tag.split("}", 1)[1]: (el.text or "").strip() for el in props}


@dataclass(frozen=True)
class Jars:
    root: Path
    fetch_seconds: float
    cached: bool

    @property
    def classpath(self) -> str:
        return str(self.root / PROFILES["runtime"]) + "/*"

    @property
    def plugin_path(self) -> Path:
        return self.root / "plugins"

    def listing(self) -> dict[str, list[str]]:
        return {
            name: sorted(p.name for p in (self.root / folder).glob("*.jar")) for name, folder in PROFILES.items()
        }


def _cache_key() -> str:
    digest = hashlib.sha256(POM.read_bytes())
    digest.update(",".join(PLUGIN_EXCLUDED_GROUPS).encode())
    return digest.hexdigest()[:12]


def _maven_error(log_text: str) -> str:
    """`<artifact>: <the error>` from Maven's output."""
    errors = [line.split("[ERROR]", 1)[1].strip() for line in log_text.splitlines() if "[ERROR]" in line]
    first = next((e for e in errors if e), "no [ERROR] line; see the log")
    first = re.sub(r"\x1b\[[0-9;]*m", "", first)
    found = re.findall(r"\b([\w.\-]+:[\w.\-]+:(?:jar|pom):[\w.\-]+)", first)
    artifact = found[-1] if found else "unknown artifact"
    return f"{artifact}: {first[:600]}"


def fetch(log_dir: Path) -> Jars:
    """The worker's classpath and the two plugin folders, copied by Maven once per version of the pom."""
    root = CACHE / _cache_key()
    if (root / ".complete").exists():
        return Jars(root, 0.0, True)
    mvn = shutil.which("mvn")
    if mvn is None:
        raise Blocked("Maven (mvn): not installed (apt-get install maven)")
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    started = time.monotonic()
    for profile, folder in PROFILES.items():
        args = [
            mvn,
            "-B",
            "-f",
            str(POM),
            "-P",
            profile,
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={partial / folder}",
        ]
        if profile != "runtime":
            args.append("-DexcludeGroupIds=" + ",".join(PLUGIN_EXCLUDED_GROUPS))
        log_path = log_dir / f"mvn-{profile}.log"
        log.info("debezium: fetching the %s jars with Maven (log: %s)", profile, log_path)
        with open(log_path, "wb") as out:
            try:
                code = subprocess.run(
                    args, stdout=out, stderr=subprocess.STDOUT, cwd=POM_DIR, timeout=MAVEN_TIMEOUT, check=False
                ).returncode
            except subprocess.TimeoutExpired:
                raise Blocked(f"{profile} jars: Maven did not finish within {MAVEN_TIMEOUT:.0f} s") from None
        if code != 0:
            shutil.rmtree(partial, ignore_errors=True)
            raise Blocked(_maven_error(log_path.read_text(errors="replace")))
    seconds = time.monotonic() - started
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)
    (root / ".complete").write_text(f"fetched in {seconds:.1f} s\n")
    return Jars(root, seconds, False)


def java_version() -> str:
    java = shutil.which("java")
    if java is None:
        raise Blocked("java: not installed (Java 17 or newer is needed)")
    text = subprocess.run([java, "-version"], capture_output=True, text=True, check=False).stderr
    return text.splitlines()[0].strip() if text else "unknown"


# --- watching progress -----------------------------------------------------------------------------------


def process_cpu(pid: int) -> float | None:
    """User + system CPU seconds of a process and its children (None once it is gone)."""
    try:
        proc = psutil.Process(pid)
        times = proc.cpu_times()
        total = times.user + times.system
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                t = child.cpu_times()
                total += t.user + t.system
        return total
    except psutil.Error:
        return None


def child_cpu(marker: str) -> Callable[[], float | None]:
    """CPU seconds of the benchmark's child process whose command line contains `marker`."""
    found: list[int] = []

    def cpu() -> float | None:
        if not found:
            for child in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if marker in " ".join(child.cmdline()):
                        found.append(child.pid)
                        break
        return process_cpu(found[0]) if found else None

    return cpu


class Watch:
    """Polls `check()` -> (started, done) every POLL seconds in a thread: when the first event was
    seen and when the last one, with the watched process's CPU seconds at both moments."""

    def __init__(self, name: str, check: Callable[[], tuple[bool, bool]], cpu: Callable[[], float | None]) -> None:
        self.name = name
        self.check = check
        self.cpu = cpu
        self.first_at: float | None = None
        self.done_at: float | None = None
        self.first_cpu: float | None = None
        self.done_cpu: float | None = None
        self.errors = 0
        self.last_error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watch {name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                started, done = self.check()
            except Exception as exc:  # a topic not created yet, a table not there yet
                self.errors += 1
                self.last_error = str(exc)
                started, done = False, False
            now = time.monotonic()
            if (started or done) and self.first_at is None:
                self.first_at, self.first_cpu = now, self.cpu()
            if done:
                self.done_at, self.done_cpu = now, self.cpu()
                return
            self._stop.wait(POLL)

    def wait(self, timeout: float, alive: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + timeout
        while self.done_at is None:
            if not self._thread.is_alive():
                break
            if not alive():
                raise RuntimeError(f"{what} stopped before its last event ({self.last_error or 'no error seen'})")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{what}: no last event within {timeout:.0f} s ({self.last_error or 'no error'})"
                )
            time.sleep(POLL)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def figures(self, n: int, started: float) -> dict[str, Any]:
        """events/s from the first to the last event, and when those came after the process started."""
        if self.first_at is None or self.done_at is None:
            return {"first_to_last_s": None, "events_per_s": None}
        span = max(self.done_at - self.first_at, 1e-6)
        cpu = None if self.first_cpu is None or self.done_cpu is None else round(self.done_cpu - self.first_cpu, 2)
        return {
            "first_event_after_s": round(self.first_at - started, 3),
            "last_event_after_s": round(self.done_at - started, 3),
            "first_to_last_s": round(span, 3),
            "events_per_s": round(n / span, 1),
            "cpu_seconds_first_to_last": cpu,
            "cpu_seconds_until_first_event": None if self.first_cpu is None else round(self.first_cpu, 2),
        }


def topic_check(
    bootstrap: str, topic: str, goal: int
) -> tuple[Callable[[], tuple[bool, bool]], Callable[[], None]]:
    """(started, done) of a one-partition topic: any message yet, all `goal` messages there."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "cdc-bench-debezium-watch", "log_level": 3})

    def check() -> tuple[bool, bool]:
        _, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=2, cached=False)
        return high > 0, high >= goal

    return check, consumer.close


def table_check(
    dsn: str, last_id: int, expected: tuple[int, int, str]
) -> tuple[Callable[[], tuple[bool, bool]], Callable[[], None]]:
    """(started, done) of a target table: a row there; the last insert there and the table equal to
    the source's (checked only once max(id) reached the workload's last id: cheap until then)."""
    conn = connect(dsn)

    def check() -> tuple[bool, bool]:
        top = scalar(conn, f"SELECT max(id) FROM {QUALIFIED}")  # noqa: S608 - a constant name
        if top is None:
            return False, False
        return True, int(top) >= last_id and fingerprint(conn) == expected

    return check, conn.close


# --- Kafka Connect ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_properties(path: Path, values: dict[str, str]) -> None:
    def escape(v: str) -> str:
        return v.replace("\\", "\\\\").replace("\n", "\\n")

    path.write_text("".join(f"{k}={escape(v)}\n" for k, v in values.items()), encoding="utf-8")


def worker_settings(
    ctx: Context, jars: Jars, work: Path, name: str, port: int, clients: dict[str, str]
) -> dict[str, str]:
    return {
        "bootstrap.servers": ctx.bootstrap,
        "plugin.path": str(jars.plugin_path),
        "plugin.discovery": "service_load",
        "offset.storage.file.filename": str(work / f"{name}.offsets"),
        "offset.flush.interval.ms": "10000",
        "listeners": f"http://127.0.0.1:{port}",
        "key.converter": JSON_CONVERTER,
        "value.converter": JSON_CONVERTER,
        **clients,
    }


def public(settings: dict[str, str], tag: str) -> dict[str, str]:
    """The settings as the report states them: passwords replaced, the scenario's random tag as
    <tag>, paths relative to the checkout."""
    shown = {}
    for key, value in settings.items():
        if "password" in key:
            shown[key] = "<password of the DSN>"
        else:
            shown[key] = value.replace(str(REPO) + "/", "").replace(tag, "<tag>")
    return shown


class Connect:
    """A standalone Kafka Connect worker running one connector, its RSS and CPU sampled."""

    def __init__(self, ctx: Context, jars: Jars, work: Path, connector: dict[str, str]) -> None:
        self.name = connector["name"]
        self.port = free_port()
        sink = connector["connector.class"].endswith("SinkConnector")
        clients = SINK_CONSUMER if sink else PRODUCER  # the source worker's producer, the sink's consumer
        self.worker = worker_settings(ctx, jars, work, self.name, self.port, clients)
        self.connector = connector
        worker_path, connector_path = work / f"{self.name}-worker.properties", work / f"{self.name}.properties"
        write_properties(worker_path, self.worker)
        write_properties(connector_path, connector)
        self.args = [
            "java",
            *JVM_OPTIONS,
            f"-Dlog4j2.configurationFile={LOG4J}",
            "-cp",
            jars.classpath,
            "org.apache.kafka.connect.cli.ConnectStandalone",
            str(worker_path),
            str(connector_path),
        ]
        self.proc = Proc(f"connect-{self.name}", self.args, ctx.log_dir, sample_rss=True)
        self.running_at: float | None = None
        self._next_status = 0.0

    def status(self) -> dict[str, Any] | None:
        url = f"http://127.0.0.1:{self.port}/connectors/{self.name}/status"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                doc: dict[str, Any] = json.loads(response.read())
                return doc
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def _failed(self, doc: dict[str, Any] | None) -> str | None:
        if doc is None:
            return None
        for part in [doc.get("connector", {}), *doc.get("tasks", [])]:
            if part.get("state") == "FAILED":
                return str(part.get("trace", "no trace"))[:2000]
        return None

    def alive(self) -> bool:
        """Running, and (checked every few seconds) neither the connector nor its task failed."""
        if not self.proc.running():
            return False
        now = time.monotonic()
        if now >= self._next_status:
            self._next_status = now + STATUS_EVERY
            trace = self._failed(self.status())
            if trace is not None:
                raise RuntimeError(f"connector {self.name} failed: {trace}")
        return True

    def wait_running(self) -> float:
        """Seconds from the JVM's start until the connector's task is RUNNING."""
        deadline = self.proc.started + START_TIMEOUT
        while time.monotonic() < deadline:
            if not self.proc.running():
                raise RuntimeError(f"Kafka Connect ({self.name}) exited during start; {self.proc.tail(25)}")
            doc = self.status()
            trace = self._failed(doc)
            if trace is not None:
                raise RuntimeError(f"connector {self.name} failed: {trace}")
            tasks = (doc or {}).get("tasks", [])
            if tasks and all(t.get("state") == "RUNNING" for t in tasks):
                self.running_at = time.monotonic()
                return self.running_at - self.proc.started
            time.sleep(0.1)
        raise TimeoutError(
            f"Kafka Connect ({self.name}) not running after {START_TIMEOUT:.0f} s; {self.proc.tail(25)}"
        )

    def stop(self) -> float:
        """Stop the worker; seconds it took."""
        started = time.monotonic()
        self.proc.stop(grace=30)
        return time.monotonic() - started


def run_connect(
    ctx: Context,
    jars: Jars,
    work: Path,
    connector: dict[str, str],
    check: Callable[[], tuple[bool, bool]],
    n: int,
    tag: str,
) -> dict[str, Any]:
    """Start a worker with `connector`, time its start, then its first to last event."""
    worker = Connect(ctx, jars, work, connector)
    watch = Watch(connector["name"], check, lambda: process_cpu(worker.proc.pid))
    try:
        startup = worker.wait_running()
        log.info("debezium: %s running %.1f s after the JVM started", connector["name"], startup)
        watch.wait(measure._timeout(n), worker.alive, connector["name"])
    except (RuntimeError, TimeoutError) as exc:
        raise RuntimeError(f"{exc}; {worker.proc.tail(25)}") from None
    finally:
        watch.stop()
        stop_seconds = worker.stop()
    figures = watch.figures(n, worker.proc.started)
    return {
        **figures,
        "connect_start_s": round(startup, 3),
        "wall_s": round((watch.done_at or time.monotonic()) - worker.proc.started, 3),
        "wall_events_per_s": round(n / ((watch.done_at or time.monotonic()) - worker.proc.started), 1),
        "stop_s": round(stop_seconds, 2),
        **worker.proc.resources(),
        "worker_settings": public(worker.worker, tag),
        "connector_settings": public(connector, tag),
        "log": str(worker.proc.stderr_path),
    }


# --- the scenario ----------------------------------------------------------------------------------------


def _source_connector(
    ctx: Context, database: str, name: str, slot: str, publication: str, prefix: str, schemas: bool
) -> dict[str, str]:
    p = ctx.endpoints.source_params()
    return {
        "name": name,
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "tasks.max": "1",
        "plugin.name": "pgoutput",
        "slot.name": slot,
        "publication.name": publication,
        "publication.autocreate.mode": "disabled",
        "snapshot.mode": "no_data",
        "database.hostname": p.get("host", "127.0.0.1"),
        "database.port": p.get("port", "5432"),
        "database.user": p.get("user", "postgres"),
        "database.password": p.get("password", ""),
        "database.dbname": database,
        "topic.prefix": prefix,
        "table.include.list": QUALIFIED,
        "tombstones.on.delete": "true",
        "decimal.handling.mode": "precise",
        **SOURCE_TUNING,
        "topic.creation.default.replication.factor": "1",
        "topic.creation.default.partitions": "1",
        "key.converter": JSON_CONVERTER,
        "key.converter.schemas.enable": str(schemas).lower(),
        "value.converter": JSON_CONVERTER,
        "value.converter.schemas.enable": str(schemas).lower(),
    }


def _sink_connector(ctx: Context, database: str, name: str, topic: str) -> dict[str, str]:
    p = parse_dsn(ctx.endpoints.target_dsn)
    return {
        "name": name,
        "connector.class": "io.debezium.connector.jdbc.JdbcSinkConnector",
        "tasks.max": "1",
        "topics": topic,
        "connection.url": f"jdbc:postgresql://{p.get('host', '127.0.0.1')}:{p.get('port', '5433')}/{database}",
        "connection.username": p.get("user", "postgres"),
        "connection.password": p.get("password", ""),
        "insert.mode": "upsert",
        "delete.enabled": "true",
        "primary.key.mode": "record_key",
        "primary.key.fields": "id",
        "schema.evolution": "none",
        "collection.name.format": "${source.table}",
        **SINK_TUNING,
        "use.time.zone": "UTC",
        "key.converter": JSON_CONVERTER,
        "key.converter.schemas.enable": "true",
        "value.converter": JSON_CONVERTER,
        "value.converter.schemas.enable": "true",
    }


def describe_workload(workload: Workload) -> dict[str, Any]:
    return {
        "changes": workload.changes,
        "tx_size": workload.tx_size,
        "pad_bytes": workload.pad_bytes,
        "mix_insert_update_delete_pct": list(workload.mix),
        "transactions": workload.transactions,
    }


def _ours(measured: dict[str, Any], watch: Watch, n: int, started: float, whole: str) -> dict[str, Any]:
    """cdc-source's or cdc-sink's figures from bench.measure, with first-to-last-event events/s
    (the figure compared) beside measure's process-start figure (kept as `whole`)."""
    doc = {
        k: v for k, v in measured.items() if k not in {"events_per_s", "progress_s_confirmedbytes_topicmessages"}
    }
    doc[whole] = measured["events_per_s"]
    doc.update(watch.figures(n, started))
    if doc["events_per_s"] is None:
        raise RuntimeError(
            f"{watch.name}: its first or last event was not seen ({watch.last_error or 'no error'})"
        )
    return doc


def _debezium_source(
    ctx: Context,
    jars: Jars,
    work: Path,
    database: str,
    name: str,
    slot: str,
    publication: str,
    prefix: str,
    schemas: bool,
    messages: int,
    n: int,
) -> dict[str, Any]:
    """One run of the Debezium PostgreSQL source; `database` is the scenario's tag."""
    topic = f"{prefix}.public.{TABLE}"
    check, close = topic_check(ctx.bootstrap, topic, messages)
    try:
        doc = run_connect(
            ctx,
            jars,
            work,
            _source_connector(ctx, database, name, slot, publication, prefix, schemas),
            check,
            n,
            database,
        )
    finally:
        close()
    doc["topic_messages"] = message_count(ctx.bootstrap, topic)
    if doc["topic_messages"] != messages:
        raise RuntimeError(
            f"Debezium source {name}: {doc['topic_messages']} messages in {topic}, expected {messages}"
        )
    return doc


def ratios(result: dict[str, Any]) -> dict[str, float | None]:
    """ours / Debezium's: events/s (higher is better for us), peak RSS and CPU seconds (lower is)."""

    def r(ours: str, theirs: str, key: str) -> float | None:
        a, b = result.get(ours, {}).get(key), result.get(theirs, {}).get(key)
        if a is None or b is None or b <= 0:
            return None
        return round(float(a) / float(b), 3)

    out = {
        "source_events_per_s": r("cdc_source", "debezium_source", "events_per_s"),
        "source_peak_rss": r("cdc_source", "debezium_source", "peak_rss_mb"),
        "source_cpu_seconds": r("cdc_source", "debezium_source", "cpu_seconds"),
        "source_cpu_seconds_first_to_last": r("cdc_source", "debezium_source", "cpu_seconds_first_to_last"),
        "sink_events_per_s": r("cdc_sink", "debezium_jdbc_sink", "events_per_s"),
        "sink_peak_rss": r("cdc_sink", "debezium_jdbc_sink", "peak_rss_mb"),
        "sink_cpu_seconds": r("cdc_sink", "debezium_jdbc_sink", "cpu_seconds"),
        "sink_cpu_seconds_first_to_last": r("cdc_sink", "debezium_jdbc_sink", "cpu_seconds_first_to_last"),
    }
    if "debezium_source_schemaless" in result:
        out["source_events_per_s_vs_schemaless"] = r("cdc_source", "debezium_source_schemaless", "events_per_s")
    return out


def run(ctx: Context, workload: Workload, schemaless: bool = True) -> dict[str, Any]:
    """The whole baseline; {"blocked": ...} when the jars cannot be had."""
    result: dict[str, Any] = {"workload": describe_workload(workload), "versions": pom_versions()}
    try:
        result["java"] = java_version()
        jars = fetch(ctx.log_dir)
    except Blocked as exc:
        log.error("debezium: blocked: %s", exc)
        return {**result, "blocked": str(exc)}
    result["maven"] = {
        "fetch_seconds": round(jars.fetch_seconds, 1),
        "cached": jars.cached,
        "cache": str(jars.root.relative_to(REPO)),
        "pom": str(POM.relative_to(REPO)),
        "plugin_excluded_groups": list(PLUGIN_EXCLUDED_GROUPS),
        "jars": jars.listing(),
    }
    result["jvm_options"] = list(JVM_OPTIONS)
    result["notes"] = list(NOTES)
    log.info(
        "debezium: jars in %s (%s)",
        jars.root,
        "cached" if jars.cached else f"fetched in {jars.fetch_seconds:.0f} s",
    )

    tag = scenario_tag("dbz")
    result["tag"] = tag
    cdc_prefix, dbz_prefix, plain_prefix = f"{tag}_cdc", f"{tag}_dbz", f"{tag}_dbzplain"
    slot_cdc, slot_dbz, slot_plain = f"{tag}_cdc", f"{tag}_dbz", f"{tag}_dbzplain"
    publication, group, jdbc_name = f"{tag}_dbz", f"{tag}_sink", f"{tag}_jdbc"
    scratch = Scratch(ctx.endpoints)
    work = ctx.log_dir / f"{tag}-connect"
    work.mkdir(parents=True, exist_ok=True)
    try:
        source_dsn = scratch.source_db(tag)
        with contextlib.closing(connect(source_dsn)) as conn:
            create_schema(conn, publication=publication)
            create_logical_slot(conn, slot_cdc, "wal2json")
            create_logical_slot(conn, slot_dbz, "pgoutput")
            if schemaless:
                create_logical_slot(conn, slot_plain, "pgoutput")
            log.info("%s: generating %d changes in transactions of %d", tag, workload.changes, workload.tx_size)
            generated = generate(conn, workload)
            expected = fingerprint(conn)
        result["generated"] = {**generated.describe(), "end_lsn": int_to_lsn(generated.end_lsn)}
        n = workload.changes
        inserts, _, deletes = counts(n)
        messages = n + deletes  # every delete is followed by a tombstone, in both systems

        # 1. cdc-source, its own slot (wal2json) and topic prefix
        check, close = topic_check(ctx.bootstrap, f"{cdc_prefix}.public.{TABLE}", messages)
        watch = Watch("cdc-source", check, child_cpu(f"--slot {slot_cdc} "))
        started = time.monotonic()
        try:
            src = measure.source(ctx, source_dsn, cdc_prefix, slot_cdc, generated.start_lsn, generated.end_lsn, n)
            watch.wait(30.0, lambda: True, "cdc-source")
        finally:
            watch.stop()
            close()
        result["cdc_source"] = _ours(src, watch, n, started, "start_to_confirm_events_per_s")
        result["cdc_source"]["topic_messages"] = message_count(ctx.bootstrap, f"{cdc_prefix}.public.{TABLE}")
        log.info("%s: cdc-source %.0f events/s (first to last message)", tag, result["cdc_source"]["events_per_s"])

        # 2. the Debezium source, JSON with schemas (what the JDBC sink reads); 3. schemaless JSON
        result["debezium_source"] = _debezium_source(
            ctx, jars, work, tag, f"{tag}_pgsrc", slot_dbz, publication, dbz_prefix, True, messages, n
        )
        log.info("%s: Debezium source %.0f events/s", tag, result["debezium_source"]["events_per_s"])
        if schemaless:
            plain = _debezium_source(
                ctx,
                jars,
                work,
                tag,
                f"{tag}_pgsrcplain",
                slot_plain,
                publication,
                plain_prefix,
                False,
                messages,
                n,
            )
            result["debezium_source_schemaless"] = plain
            log.info("%s: Debezium source, schemaless JSON, %.0f events/s", tag, plain["events_per_s"])

        # 4. cdc-sink from cdc-source's topic, into an empty database
        sink_dsn = scratch.target_db(f"{tag}_sink")
        check, close = table_check(sink_dsn, inserts, expected)
        watch = Watch("cdc-sink", check, child_cpu(f"--group {group} "))
        started = time.monotonic()
        try:
            snk = measure.sink_once(ctx, source_dsn, sink_dsn, cdc_prefix, group, slot_cdc, n, expected)
            watch.wait(30.0, lambda: True, "cdc-sink")
        finally:
            watch.stop()
            close()
        result["cdc_sink"] = _ours(snk, watch, n, started, "start_to_exit_events_per_s")
        log.info("%s: cdc-sink %.0f events/s (first to last row)", tag, result["cdc_sink"]["events_per_s"])

        # 5. the Debezium JDBC sink from the Debezium source's topic, into a table made like the source's
        jdbc_db = f"{tag}_jdbc"
        jdbc_dsn = scratch.target_db(jdbc_db)
        with contextlib.closing(connect(jdbc_dsn)) as target:
            create_table_only(target)
        check, close = table_check(jdbc_dsn, inserts, expected)
        try:
            jdbc = run_connect(
                ctx,
                jars,
                work,
                _sink_connector(ctx, jdbc_db, jdbc_name, f"{dbz_prefix}.public.{TABLE}"),
                check,
                n,
                tag,
            )
        finally:
            close()
        with contextlib.closing(connect(jdbc_dsn)) as target:
            got = fingerprint(target)
        if got != expected:
            raise RuntimeError(f"the JDBC sink left (count, sum id, sum balance) {got}, expected {expected}")
        result["debezium_jdbc_sink"] = {
            **jdbc,
            "verified": True,
            "target_table": "created beforehand, DDL of bench/workload.py",
        }
        log.info("%s: Debezium JDBC sink %.0f events/s", tag, jdbc["events_per_s"])
        result["ratios"] = ratios(result)
        return result
    finally:
        scratch.cleanup()
        delete_prefix(ctx.bootstrap, cdc_prefix, (group, f"{group}-once-probe"))
        delete_prefix(ctx.bootstrap, dbz_prefix, (f"connect-{jdbc_name}",))
        if schemaless:
            delete_prefix(ctx.bootstrap, plain_prefix)
        shutil.rmtree(work, ignore_errors=True)
