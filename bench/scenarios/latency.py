"""Scenario 4: end-to-end latency under load. cdc-writer writes at a steady rate while cdc-source and
cdc-sink run with their default options; the benchmark inserts a probe row every 50 ms on the source
and polls the target every 5 ms for its arrival. Latency = arrival - commit, both read from this
machine's clock (both servers run here)."""

import contextlib
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg2
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, TopicPartition
from psycopg2 import sql

from bench.config import scenario_tag
from bench.context import Context
from bench.kafka import delete_prefix, topics_with_prefix
from bench.pg import Scratch, connect, execute, slot_exists
from bench.procs import Proc, script
from bench.stats import summarize
from writer.schema import create_tables

log = logging.getLogger("bench.latency")

PROBE_DDL = (
    "CREATE TABLE public.probe (id bigint PRIMARY KEY, written_at timestamptz NOT NULL DEFAULT clock_timestamp())"
)
WROTE = re.compile(r"wrote (\d+) operations in ([0-9.]+) s")


@dataclass
class Probes:
    """Commit and arrival times (time.time()) of each probe id."""

    committed: dict[int, float] = field(default_factory=dict)
    arrived: dict[int, float] = field(default_factory=dict)
    received: dict[int, float] = field(default_factory=dict)  # by a plain consumer of the probe topic
    lock: threading.Lock = field(default_factory=threading.Lock)
    errors: list[str] = field(default_factory=list)


def _probe_writer(dsn: str, probes: Probes, first_id: int, interval: float, stop: threading.Event) -> None:
    try:
        with contextlib.closing(connect(dsn, application_name="cdc-bench probe")) as conn, conn.cursor() as cur:
            next_at = time.monotonic()
            probe_id = first_id
            while not stop.is_set():
                cur.execute("INSERT INTO public.probe (id) VALUES (%s)", (probe_id,))
                committed = time.time()  # autocommit: the INSERT returned after its commit
                with probes.lock:
                    probes.committed[probe_id] = committed
                probe_id += 1
                next_at += interval
                stop.wait(max(0.0, next_at - time.monotonic()))
    except psycopg2.Error as exc:
        probes.errors.append(f"probe writer: {exc}")


def _arrival_poller(dsn: str, probes: Probes, first_id: int, interval: float, stop: threading.Event) -> None:
    """Every `interval` seconds: which probes reached the target since the last look."""
    lowest_missing = first_id
    try:
        with contextlib.closing(connect(dsn, application_name="cdc-bench poll")) as conn, conn.cursor() as cur:
            while not stop.is_set():
                cur.execute("SELECT id FROM public.probe WHERE id >= %s", (lowest_missing,))
                rows = cur.fetchall()
                now = time.time()
                with probes.lock:
                    for (probe_id,) in rows:
                        probes.arrived.setdefault(probe_id, now)
                    while lowest_missing in probes.arrived:
                        lowest_missing += 1
                time.sleep(interval)
    except psycopg2.Error as exc:
        probes.errors.append(f"arrival poller: {exc}")


def _inserted_probe(message: Any) -> int | None:
    """The probe id of a probe's insert event (None for any other message)."""
    key, value = message.key(), message.value()
    if key is None or value is None or orjson.loads(value).get("op") != "c":
        return None
    return int(orjson.loads(key)["id"])


def _topic_watcher(
    bootstrap: str, topic: str, probes: Probes, ready: threading.Event, stop: threading.Event
) -> None:
    """A plain consumer of the probe topic beside cdc-sink (librdkafka's defaults): when each probe's
    event could first be read from Kafka."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "cdc-bench-watch",
            "enable.auto.commit": False,
            "log_level": 3,
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        consumer.assign([TopicPartition(topic, p, OFFSET_END) for p in metadata.topics[topic].partitions])
        ready.set()
        while not stop.is_set():
            message = consumer.poll(0.1)  # returns at the first message (consume(n) would wait for n)
            now = time.time()
            if message is None or message.error() is not None:
                continue
            probe_id = _inserted_probe(message)
            if probe_id is not None:
                with probes.lock:
                    probes.received.setdefault(probe_id, now)
    except Exception as exc:  # the figures of this split are left out, the rest stands
        log.warning("topic watcher: %s (Kafka -> target is not split further)", exc)
    finally:
        ready.set()
        consumer.close()


def _wait_for(condition: Any, timeout: float, what: str, procs: tuple[Proc, ...]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for proc in procs:
            if not proc.running():
                raise RuntimeError(f"{proc.name} exited while waiting for {what}; {proc.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}; " + "; ".join(p.tail(5) for p in procs))
        time.sleep(0.05)


def _target_has(dsn: str, probe_id: int) -> bool:
    try:
        with contextlib.closing(connect(dsn)) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1 FROM public.probe WHERE id = %s", (probe_id,))
            return cur.fetchone() is not None
    except psycopg2.errors.UndefinedTable:
        return False


def _probe(
    ctx: Context,
    tag: str,
    source_dsn: str,
    target_dsn: str,
    seconds: float,
    watched: tuple[Proc, ...],
    procs: list[Proc],
    topic: str | None = None,
) -> tuple[dict[str, Any], Probes]:
    """cdc-writer at the plan's rate on the source for `seconds`, a probe row every probe interval,
    the target polled for their arrival: the latency figures and samples, and the probes' times.
    `watched`: the programs that must keep running (the last one's log tail is given when no probe
    arrives); `topic`: the probes' topic, watched by a plain consumer as well."""
    plan = ctx.plan
    writer = Proc(
        f"cdc-writer-{tag}",
        [
            script("cdc-writer"),
            "--source-dsn",
            source_dsn,
            "--rate",
            f"{plan.writer_rate:g}",
            "--batch",
            "1",
            "--seed",
            "1",
            "--log-format",
            "text",
        ],
        ctx.log_dir,
    )
    procs.append(writer)
    stop_probes, stop_poll = threading.Event(), threading.Event()
    try:
        return _probes(ctx, source_dsn, target_dsn, seconds, watched, writer, stop_probes, stop_poll, topic)
    finally:
        stop_probes.set()
        stop_poll.set()


def _probes(
    ctx: Context,
    source_dsn: str,
    target_dsn: str,
    seconds: float,
    watched: tuple[Proc, ...],
    writer: Proc,
    stop_probes: threading.Event,
    stop_poll: threading.Event,
    topic: str | None,
) -> tuple[dict[str, Any], Probes]:
    plan = ctx.plan
    time.sleep(2.0)  # the writer connects and reaches its rate
    probes = Probes()
    if topic is not None:
        ready = threading.Event()
        threading.Thread(
            target=_topic_watcher, args=(ctx.bootstrap, topic, probes, ready, stop_poll), daemon=True
        ).start()
        ready.wait(30)
    threads = [
        threading.Thread(
            target=_arrival_poller, args=(target_dsn, probes, 1, plan.poll_interval, stop_poll), daemon=True
        ),
        threading.Thread(
            target=_probe_writer, args=(source_dsn, probes, 1, plan.probe_interval, stop_probes), daemon=True
        ),
    ]
    started_wall = time.time()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop_probes.set()
    threads[1].join()
    writer_code = writer.stop()
    last = max(probes.committed, default=0)
    with contextlib.suppress(TimeoutError, RuntimeError):
        _wait_for(lambda: last in probes.arrived, 30, "the last probes", watched)
    stop_poll.set()
    threads[0].join()
    if probes.errors:
        raise RuntimeError("; ".join(probes.errors))

    samples = sorted(
        (probes.committed[i] - started_wall, (probes.arrived[i] - probes.committed[i]) * 1000.0)
        for i in probes.committed
        if i in probes.arrived
    )
    latencies = [ms for _, ms in samples]
    if not latencies:
        raise RuntimeError("no probe reached the target" + "".join(f"; {p.tail(5)}" for p in watched))
    wrote = WROTE.search(writer.stdout_text())
    return {
        "seconds": seconds,
        "writer_rate_requested": plan.writer_rate,
        "writer_batch": 1,
        "writer_exit_code": writer_code,
        "writer_rate_achieved": round(int(wrote[1]) / float(wrote[2]), 1) if wrote else None,
        "probe_interval_ms": plan.probe_interval * 1000,
        "poll_interval_ms": plan.poll_interval * 1000,
        "probes_sent": len(probes.committed),
        "probes_arrived": len(latencies),
        "latency_ms": summarize(latencies),
        "samples": [[round(t, 3), round(ms, 2)] for t, ms in samples],
    }, probes


def stages(bootstrap: str, topic: str, probes: Probes) -> dict[str, Any]:
    """Each probe's latency split where its event entered Kafka (the message's timestamp, which
    cdc-source's producer sets when it hands the event over): commit -> Kafka is cdc-source's part
    (wal2json decoding at commit included), Kafka -> target is the broker's and cdc-sink's. That
    part split again where a plain consumer beside cdc-sink read the event: Kafka -> readable
    (the producer's linger, the broker, a fetch), readable -> target (cdc-sink's batch, its commit,
    the poll of the target)."""
    entered = probe_timestamps(bootstrap, topic)
    parts: dict[str, list[float]] = {
        "commit_to_kafka": [],
        "kafka_to_target": [],
        "kafka_to_readable": [],
        "readable_to_target": [],
    }
    for probe_id, committed in probes.committed.items():
        if probe_id in entered and probe_id in probes.arrived:
            parts["commit_to_kafka"].append((entered[probe_id] - committed) * 1000.0)
            parts["kafka_to_target"].append((probes.arrived[probe_id] - entered[probe_id]) * 1000.0)
            if probe_id in probes.received:
                parts["kafka_to_readable"].append((probes.received[probe_id] - entered[probe_id]) * 1000.0)
                parts["readable_to_target"].append((probes.arrived[probe_id] - probes.received[probe_id]) * 1000.0)
    return {name: summarize(values) for name, values in parts.items() if values}


def probe_timestamps(bootstrap: str, topic: str) -> dict[int, float]:
    """The timestamp (seconds) of each probe's insert event in the topic, by probe id."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "cdc-bench-stages",
            "enable.auto.commit": False,
            "log_level": 3,
        }
    )
    found: dict[int, float] = {}
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        partitions = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in metadata.topics[topic].partitions]
        ends = {p.partition: consumer.get_watermark_offsets(p, timeout=10)[1] for p in partitions}
        consumer.assign(partitions)
        done: set[int] = {p for p, end in ends.items() if end == 0}
        deadline = time.monotonic() + 60
        while len(done) < len(ends) and time.monotonic() < deadline:
            for message in consumer.consume(10_000, 1.0):
                if message.error() is not None:
                    continue
                partition, offset = message.partition() or 0, message.offset() or 0
                if offset + 1 >= ends[partition]:
                    done.add(partition)
                probe_id = _inserted_probe(message)
                if probe_id is not None:
                    found[probe_id] = message.timestamp()[1] / 1000.0
    finally:
        consumer.close()
    return found


def _log_latency(tag: str, system: str, result: dict[str, Any]) -> None:
    figures = result["latency_ms"]
    log.info(
        "%s: %s latency p50 %.1f ms, p99 %.1f ms, max %.1f ms (%d probes)",
        tag,
        system,
        figures["p50"],
        figures["p99"],
        figures["max"],
        result["probes_arrived"],
    )


def run(ctx: Context, seconds: float) -> dict[str, Any]:
    """The pipeline's latency, then native logical replication's under the same load (each alone)."""
    return {**pipeline(ctx, seconds), "native_lr": native_lr(ctx, seconds)}


def pipeline(ctx: Context, seconds: float) -> dict[str, Any]:
    plan = ctx.plan
    tag = scenario_tag("lat")
    prefix, slot, group = tag, f"{tag}_src", f"{tag}_sink"
    scratch = Scratch(ctx.endpoints)
    procs: list[Proc] = []
    try:
        source_dsn = scratch.source_db(tag)
        target_dsn = scratch.target_db(tag)
        with contextlib.closing(connect(source_dsn)) as conn:
            execute(conn, PROBE_DDL)
            with conn.cursor() as cur:
                create_tables(cur)  # the writer's person and orders, so the connectors start with them
        common = [
            "--source-dsn",
            source_dsn,
            "--target-dsn",
            target_dsn,
            "--bootstrap-servers",
            ctx.bootstrap,
            "--topic-prefix",
            prefix,
            "--slot",
            slot,
            "--log-format",
            "text",
        ]
        source = Proc(f"cdc-source-{tag}", [script("cdc-source"), "run", *common], ctx.log_dir, sample_rss=True)
        procs.append(source)
        probe_topic = f"{prefix}.public.probe"
        with contextlib.closing(connect(source_dsn)) as monitor:
            _wait_for(
                lambda: slot_exists(monitor, slot) and probe_topic in topics_with_prefix(ctx.bootstrap, prefix),
                120,
                "cdc-source to create its slot and topics",
                (source,),
            )
        sink = Proc(
            f"cdc-sink-{tag}", [script("cdc-sink"), "run", *common, "--group", group], ctx.log_dir, sample_rss=True
        )
        procs.append(sink)
        with contextlib.closing(connect(source_dsn)) as conn:
            execute(conn, "INSERT INTO public.probe (id) VALUES (0)")
        _wait_for(lambda: _target_has(target_dsn, 0), 180, "a first probe row to reach the target", (source, sink))
        log.info("%s: pipeline up; writer at %g/s, probing for %.0f s", tag, plan.writer_rate, seconds)

        figures, probes = _probe(ctx, tag, source_dsn, target_dsn, seconds, (source, sink), procs, probe_topic)
        result = {"tag": tag, **figures}
        result["source"], result["sink"] = source.resources(), sink.resources()
        _log_latency(tag, "cdc-source and cdc-sink", result)
        result["stages_ms"] = stages(ctx.bootstrap, probe_topic, probes)
        for stage, figures in result["stages_ms"].items():
            log.info("%s: %s p50 %.1f ms, p99 %.1f ms", tag, stage, figures["p50"], figures["p99"])
        return result
    finally:
        for proc in reversed(procs):
            proc.stop()
        scratch.cleanup()
        delete_prefix(ctx.bootstrap, prefix, (group,))


def native_lr(ctx: Context, seconds: float) -> dict[str, Any]:
    """The baseline: the same writer and probes through PostgreSQL's own logical replication (a
    subscription on the target to a publication of the same tables, apply worker defaults)."""
    tag = scenario_tag("latlr")
    scratch = Scratch(ctx.endpoints)
    procs: list[Proc] = []
    subscribed = None
    try:
        source_dsn = scratch.source_db(tag)
        target_dsn = scratch.target_db(tag)
        for dsn in (source_dsn, target_dsn):
            with contextlib.closing(connect(dsn)) as conn:
                execute(conn, PROBE_DDL)
                with conn.cursor() as cur:
                    create_tables(cur)
        with contextlib.closing(connect(source_dsn)) as conn:
            execute(
                conn,
                sql.SQL("CREATE PUBLICATION {} FOR TABLE public.probe, public.person, public.orders").format(
                    sql.Identifier(tag)
                ),
            )
        subscribed = connect(target_dsn)
        execute(
            subscribed,
            sql.SQL("CREATE SUBSCRIPTION {} CONNECTION %s PUBLICATION {} WITH (copy_data = false)").format(
                sql.Identifier(tag), sql.Identifier(tag)
            ),
            (source_dsn,),
        )
        with contextlib.closing(connect(source_dsn)) as conn:
            execute(conn, "INSERT INTO public.probe (id) VALUES (0)")
        _wait_for(lambda: _target_has(target_dsn, 0), 120, "a first probe row to reach the subscriber", ())
        figures, _ = _probe(ctx, tag, source_dsn, target_dsn, seconds, (), procs)
        result = {"tag": tag, **figures}
        _log_latency(tag, "native logical replication", result)
        return result
    finally:
        for proc in reversed(procs):
            proc.stop()
        if subscribed is not None:
            with contextlib.suppress(psycopg2.Error):
                execute(subscribed, sql.SQL("DROP SUBSCRIPTION IF EXISTS {}").format(sql.Identifier(tag)))
            subscribed.close()
        scratch.cleanup()
