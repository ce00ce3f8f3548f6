"""Running the pipeline as an operator does: the connectors' Prometheus metrics and health checks,
`cdc-status --json` field by field (caught up, then lagging behind a stopped sink), and the source's
heartbeat keeping the slot's WAL bounded while only another database writes (the demo is in
test_demo.py).

Figures a report needs (WAL held by the slot, end-to-end latency) are printed: run with `-s`.
"""

import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg2
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg2 import sql
from psycopg2.extensions import make_dsn

from pg_kafka_cdc.common.lsn import lsn_to_int
from pg_kafka_cdc.common.tables import TableName
from sink_connector.bookkeeping import Bookkeeping
from tests.conftest import Databases, Stack
from tests.helpers import psql_rows, run_cli, start_cli, wait_until
from tests.kafka_broker import free_port
from tests.pipeline import (
    assert_running,
    execute,
    partition_ends,
    run_writer,
    start_sink,
    start_source,
    stop_cleanly,
    stored_offsets,
    wait_applied,
    wait_for_output,
    wait_identical,
)

TABLES = ("public.person", "public.orders")
Samples = dict[str, list[tuple[dict[str, str], float]]]


def new_names() -> tuple[str, str]:
    return f"t_ops_{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"


def topics_of(prefix: str) -> list[str]:
    return [f"{prefix}.public.person", f"{prefix}.public.orders"]


# --- (a) metrics and health ------------------------------------------------------------------


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status), str(response.read().decode())
    except urllib.error.HTTPError as exc:
        return int(exc.code), str(exc.read().decode())


def scrape(port: int) -> Samples:
    status, text = http_get(port, "/metrics")
    assert status == 200, f"/metrics answered {status}: {text}"
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for found, v in samples.get(name, []) if all(found.get(k) == w for k, w in labels.items()))


def test_metrics_move_and_health_is_ok(stack: Stack, dbs: Databases, topic_prefix: str) -> None:
    slot, group = new_names()
    run_writer(dbs, "--count", "50", "--rate", "0", "--seed", "11")
    source_port, sink_port = free_port(), free_port()
    source = start_source(dbs, topic_prefix, slot, "--metrics-port", str(source_port))
    wait_for_output(source, "streaming from slot", timeout=90)
    sink = start_sink(dbs, topic_prefix, slot, group, "--metrics-port", str(sink_port))
    wait_applied(dbs, stack.bootstrap_servers, group, topics_of(topic_prefix), processes=[source, sink])
    before_source, before_sink = scrape(source_port), scrape(sink_port)

    run_writer(dbs, "--count", "300", "--rate", "0", "--seed", "12")
    wait_applied(dbs, stack.bootstrap_servers, group, topics_of(topic_prefix), processes=[source, sink])
    # The sink's counters are read at scrape time: wait for the batch that stored the offsets.
    wait_until(
        lambda: (
            total(scrape(sink_port), "cdc_sink_changes_applied_total")
            >= total(before_sink, "cdc_sink_changes_applied_total") + 300
        ),
        timeout=30,
        message="cdc_sink_changes_applied_total did not count the writer's changes",
    )
    after_source, after_sink = scrape(source_port), scrape(sink_port)

    published = total(after_source, "cdc_source_events_total") - total(before_source, "cdc_source_events_total")
    assert published >= 300, f"cdc_source_events_total moved by {published}"
    for op in ("c", "u", "d"):
        assert total(after_source, "cdc_source_events_total", table="public.person", op=op) > 0, op
    assert total(after_source, "cdc_source_snapshot_rows_total") > 0  # the initial snapshot's rows
    applied = total(after_sink, "cdc_sink_changes_applied_total") - total(
        before_sink, "cdc_sink_changes_applied_total"
    )
    assert applied >= 300, f"cdc_sink_changes_applied_total moved by {applied}"
    assert total(after_sink, "cdc_sink_changes_applied_total", table="public.orders") > 0

    # End-to-end latency: a histogram with cumulative buckets ending in +Inf == _count.
    count = total(after_sink, "cdc_sink_end_to_end_latency_seconds_count")
    assert count > 0, "no latency observed"
    buckets = sorted(
        (float(labels["le"]), value) for labels, value in after_sink["cdc_sink_end_to_end_latency_seconds_bucket"]
    )
    assert len(buckets) >= 10 and buckets[-1][0] == float("inf"), buckets
    assert [v for _, v in buckets] == sorted(v for _, v in buckets), f"buckets are not cumulative: {buckets}"
    assert buckets[-1][1] == count, (buckets, count)
    assert total(after_sink, "cdc_sink_end_to_end_latency_seconds_sum") > 0
    assert total(after_sink, "cdc_sink_up") == 1 and total(after_source, "cdc_source_up") == 1
    assert total(after_source, "cdc_source_confirmed_lsn") > 0

    for port in (source_port, sink_port):
        status, body = http_get(port, "/healthz")
        assert status == 200 and body.startswith("ok"), (port, status, body)
        assert http_get(port, "/nothing-here")[0] == 404
    stop_cleanly(source, sink)


# --- (b) cdc-status --json ------------------------------------------------------------------------


def status_json(dbs: Databases, prefix: str, slot: str, group: str, *extra: str) -> tuple[int, dict[str, Any]]:
    result = run_cli(
        [
            "cdc-status",
            "--source-dsn",
            dbs.source_dsn,
            "--target-dsn",
            dbs.target_dsn,
            "--topic-prefix",
            prefix,
            "--slot",
            slot,
            "--group",
            group,
            "--json",
            "--log-format",
            "text",
            *extra,
        ]
    )
    assert result.returncode in (0, 1), f"cdc-status could not tell (exit {result.returncode}):\n{result.stderr}"
    assert result.stderr == "", result.stderr
    return result.returncode, orjson.loads(result.stdout)


def slot_row(stack: Stack, slot: str) -> tuple[Any, ...]:
    [row] = psql_rows(
        stack.source_admin_dsn,
        "SELECT active, active_pid, confirmed_flush_lsn::text, database FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    )
    return row


def settled_ends(bootstrap_servers: str, topics: list[str], quiet: float) -> dict[tuple[str, int], int]:
    """The partition ends once they have not moved for `quiet` seconds."""
    last, since = partition_ends(bootstrap_servers, topics), time.monotonic()
    deadline = since + 60
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, f"the partition ends kept moving for 60 s: {last}"
        time.sleep(0.25)
        now = partition_ends(bootstrap_servers, topics)
        if now != last:
            last, since = now, time.monotonic()
    return last


def test_status_json_field_by_field(stack: Stack, dbs: Databases, topic_prefix: str) -> None:
    slot, group = new_names()
    started = datetime.now(UTC)
    run_writer(dbs, "--count", "40", "--rate", "0", "--seed", "21")
    source = start_source(dbs, topic_prefix, slot, "--partitions", "2")
    wait_for_output(source, "streaming from slot", timeout=90)
    sink = start_sink(dbs, topic_prefix, slot, group)
    wait_for_output(sink, "assigned", timeout=90)  # bulk copy done: the writer's changes are streamed
    run_writer(dbs, "--count", "200", "--rate", "0", "--seed", "22")
    topics = topics_of(topic_prefix)
    wait_identical(dbs, TABLES, processes=[source, sink])
    wait_applied(dbs, stack.bootstrap_servers, group, topics, processes=[source, sink])  # and the tombstones

    # --- caught up: exit 0, every field checked against the services themselves
    before = slot_row(stack, slot)
    code, report = status_json(dbs, topic_prefix, slot, group)
    after = slot_row(stack, slot)
    assert code == 0 and report["ok"] is True and report["problems"] == [], report
    s = report["slot"]
    assert s["name"] == slot and s["exists"] is True and s["active"] is True, s
    assert s["active_pid"] == before[1] == after[1], (s, before, after)
    assert s["plugin"] == "wal2json" and s["database"] == dbs.name, s
    assert re.fullmatch(r"[0-9A-F]+/[0-9A-F]+", s["confirmed_flush_lsn"]), s
    confirmed = lsn_to_int(s["confirmed_flush_lsn"])
    assert lsn_to_int(before[2]) <= confirmed <= lsn_to_int(after[2]), (s, before, after)
    assert isinstance(s["retained_wal_bytes"], int) and s["retained_wal_bytes"] >= 0, s
    assert s["wal_status"] == "reserved", s
    # consistency: null, as the sink runs in row mode (--consistency transaction fills it)
    sink_report = {"group": group, "lag_messages": 0, "lag_seconds": 0.0, "consistency": None}
    assert report["sink"] == sink_report, report["sink"]

    ends = partition_ends(stack.bootstrap_servers, topics)
    stored = stored_offsets(dbs, group)
    progress = {
        f"{schema}.{name}": (commit_at, changes)
        for schema, name, commit_at, changes in psql_rows(
            dbs.target_dsn,
            "SELECT schema_name, table_name, last_commit_at, changes FROM cdc_sink.tables WHERE group_id = %s",
            (group,),
        )
    }
    by_table = {t["table"]: t for t in report["tables"]}
    assert sorted(by_table) == sorted(TABLES), report["tables"]
    for table, topic in zip(TABLES, topics, strict=True):
        t = by_table[table]
        assert t["topic"] == topic and t["partitions"] == 2, t
        assert t["end_offsets"] == {str(p): ends[(topic, p)] for p in (0, 1)}, (t, ends)
        assert t["applied_offsets"] == {str(p): stored[(topic, p)] for p in (0, 1)}, (t, stored)
        assert t["applied_offsets"] == t["end_offsets"], t
        assert t["lag_messages"] == 0 and t["lag_seconds"] == 0.0, t
        commit_at, changes = progress[table]
        last = datetime.fromisoformat(t["last_applied_commit"])
        assert last == commit_at, (t, commit_at)
        assert started - timedelta(seconds=5) <= last <= datetime.now(UTC), (started, last)
        assert t["changes_applied"] == changes > 0, t

    # --- the sink stops, the writer goes on: lag builds, exit 1 naming the tables
    stop_cleanly(sink)
    applied_before = {tp: o for tp, o in stored_offsets(dbs, group).items()}
    run_writer(dbs, "--count", "120", "--rate", "0", "--seed", "23")
    wait_until(
        lambda: sum(partition_ends(stack.bootstrap_servers, topics).values()) >= sum(ends.values()) + 120,
        timeout=60,
        message="the source did not publish the writer's changes",
    )
    # every change published (tombstones too), and the oldest one older than --max-lag-seconds 1
    ends = settled_ends(stack.bootstrap_servers, topics, quiet=1.5)
    code, report = status_json(dbs, topic_prefix, slot, group, "--max-lag-messages", "10")
    assert code == 1 and report["ok"] is False, report
    lagging = []
    for t in report["tables"]:
        expected = sum(ends[(t["topic"], p)] - (applied_before[(t["topic"], p)] or 0) for p in (0, 1))
        assert t["lag_messages"] == expected, (t, ends, applied_before)
        assert t["applied_offsets"] == {str(p): applied_before[(t["topic"], p)] for p in (0, 1)}, t
        if t["lag_messages"] > 10:
            lagging.append(t)
            assert t["lag_seconds"] > 1.0, t
            assert any(
                p.startswith(f"sink group {group} is behind on {t['table']}: {t['lag_messages']} messages")
                for p in report["problems"]
            ), report["problems"]
    assert lagging, report
    assert report["sink"]["lag_messages"] == sum(t["lag_messages"] for t in report["tables"]) > 10, report
    code, by_seconds = status_json(dbs, topic_prefix, slot, group, "--max-lag-seconds", "1")
    assert code == 1 and any("is behind on public.person" in p for p in by_seconds["problems"]), by_seconds
    # Below the quotas the same lag is no problem.
    code, relaxed = status_json(dbs, topic_prefix, slot, group)
    assert code == 0 and relaxed["problems"] == [], relaxed

    # --- the sink catches up: exit 0 again
    sink = start_sink(dbs, topic_prefix, slot, group)
    wait_applied(dbs, stack.bootstrap_servers, group, topics, processes=[source, sink])
    code, report = status_json(
        dbs, topic_prefix, slot, group, "--max-lag-messages", "10", "--max-lag-seconds", "1"
    )
    assert code == 0 and all(t["lag_messages"] == 0 for t in report["tables"]), report
    stop_cleanly(source, sink)
    # A stopped source: the slot is reported inactive (no problem while it holds less than --max-slot-lag).
    code, report = status_json(dbs, topic_prefix, slot, group)
    assert report["slot"]["active"] is False and report["slot"]["active_pid"] is None, report
    code, report = status_json(dbs, topic_prefix, slot, group, "--max-slot-lag", "0")
    assert code == 1 and any(f"slot {slot} is inactive" in p for p in report["problems"]), report


# --- (c) the heartbeat -----------------------------------------------------------------------------


@pytest.fixture
def noise_database(stack: Stack, dbs: Databases) -> Iterator[str]:
    """A second database on the same source server (dropped after the test), for WAL noise."""
    name = dbs.name + "_noise"
    psql_rows(stack.source_admin_dsn, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_dsn(stack.source_admin_dsn, dbname=name)
    finally:
        psql_rows(
            stack.source_admin_dsn, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def wal_sample(stack: Stack, slot: str) -> tuple[int, int, int]:
    """(current WAL position, the slot's restart_lsn, its confirmed_flush_lsn) as integers."""
    [(current, restart, confirmed)] = psql_rows(
        stack.source_admin_dsn,
        "SELECT pg_current_wal_lsn()::text, restart_lsn::text, confirmed_flush_lsn::text "
        "FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    )
    return lsn_to_int(current), lsn_to_int(restart), lsn_to_int(confirmed)


WINDOW = 60  # seconds of noise: four running-xacts records


class BulkNoise(threading.Thread):
    """Inserts (and deletes) 500 rows of 1 KB every second into another database until stopped."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            conn = psycopg2.connect(self.dsn)
            conn.autocommit = True
            with conn.cursor() as cur:  # not `with conn`: that opens a transaction even in autocommit
                cur.execute("CREATE TABLE IF NOT EXISTS bulk_noise (id serial PRIMARY KEY, filler text)")
                while not self.stopping.wait(1):
                    cur.execute(
                        "INSERT INTO bulk_noise (filler) SELECT repeat(md5(g::text), 32) FROM generate_series(1, 500) g"
                    )
                    cur.execute("DELETE FROM bulk_noise")
            conn.close()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def stop(self) -> None:
        self.stopping.set()
        if self.is_alive():
            self.join(timeout=30)


@pytest.mark.parametrize("heartbeat", [1.0, 0.0], ids=["heartbeat-1s", "no-heartbeat"])
def test_heartbeat_keeps_the_slot_moving_while_another_database_writes(
    stack: Stack, dbs: Databases, topic_prefix: str, noise_database: str, heartbeat: float
) -> None:
    execute(
        dbs.source_dsn, "CREATE TABLE quiet (id int PRIMARY KEY, label text)", "INSERT INTO quiet VALUES (1, 'a')"
    )
    slot, _ = new_names()
    port = free_port()
    source = start_source(
        dbs, topic_prefix, slot, "--tables", "public.quiet", "--heartbeat-interval", str(heartbeat),
        "--metrics-port", str(port),
    )  # fmt: skip
    wait_for_output(source, "streaming from slot", timeout=90)
    # The writer at a visible rate, plus bulk rows of 1 KB: about 0.5 MiB of WAL a second whatever
    # the machine, so the slot has something to hold.
    noise = start_cli(
        ["cdc-writer", "--source-dsn", noise_database, "--rate", "100", "--batch", "10", "--log-format", "text"]
    )
    bulk = BulkNoise(noise_database)
    try:
        wait_for_output(noise, "writing to", timeout=60)
        start = wal_sample(stack, slot)
        bulk.start()
        samples = []
        deadline = time.monotonic() + WINDOW
        while time.monotonic() < deadline:
            time.sleep(1)
            assert_running(source, noise)
            assert bulk.error is None, bulk.error
            samples.append(wal_sample(stack, slot))
    finally:
        bulk.stop()
        stop_cleanly(noise)
    end = samples[-1]
    generated = end[0] - start[0]
    retained = [current - restart for current, restart, _ in samples]
    unconfirmed = [current - confirmed for current, _, confirmed in samples]
    heartbeats = total(scrape(port), "cdc_source_heartbeats_total")
    print(
        f"\n[heartbeat {heartbeat:g} s] WAL written in {WINDOW} s: {generated / 2**20:.1f} MiB; "
        f"retained by the slot (current - restart_lsn) first/max/last: {retained[0] / 2**20:.2f}/"
        f"{max(retained) / 2**20:.2f}/{retained[-1] / 2**20:.2f} MiB; "
        f"unconfirmed (current - confirmed_flush_lsn) max of the last 10 s: {max(unconfirmed[-10:]) / 2**20:.2f} MiB; "
        f"confirmed_flush_lsn advanced {(end[2] - start[2]) / 2**20:.1f} MiB, restart_lsn {(end[1] - start[1]) / 2**20:.1f} MiB; "
        f"heartbeats read back: {heartbeats:g}"
    )
    stop_cleanly(source)
    assert generated > 4 * 2**20, f"the noise wrote only {generated} bytes of WAL"
    # Either way the confirmed position follows the WAL although the replicated table never changes
    # (without a heartbeat, through the idle keepalives).
    assert end[2] - start[2] > generated / 2, (start, end)
    assert max(unconfirmed[-10:]) < generated / 3, unconfirmed
    if heartbeat:
        assert heartbeats >= 10, heartbeats
        # With the heartbeat the slot lets go of the WAL: restart_lsn follows. It moves only at the
        # running-xacts records PostgreSQL logs every 15 s, and to the one before when a transaction
        # (of any database) is open at that moment, so it trails by 15 to 45 s of WAL: bounded, not
        # growing with what was written.
        assert end[1] - start[1] > generated / 5, f"restart_lsn moved {end[1] - start[1]} of {generated} bytes"
        assert min(retained[-30:]) < generated * 3 / 4, retained
        assert max(unconfirmed[-10:]) < generated / 8, unconfirmed  # a few seconds of WAL at most
    else:
        assert heartbeats == 0, heartbeats


# --- cdc-verify ----------------------------------------------------------------------------------


def test_verify_without_tables_checks_what_the_sink_filled(dbs: Databases) -> None:
    """No --tables: the tables in the sink's bookkeeping on the target, else every table of the
    source's public schema."""
    for dsn in (dbs.source_dsn, dbs.target_dsn):
        execute(dsn, "CREATE TABLE filled (id integer PRIMARY KEY)", "CREATE TABLE other (id integer PRIMARY KEY)")
    execute(dbs.source_dsn, "INSERT INTO filled VALUES (1)", "INSERT INTO other VALUES (1)")
    execute(dbs.target_dsn, "INSERT INTO filled VALUES (1)")
    base = ["cdc-verify", "--source-dsn", dbs.source_dsn, "--target-dsn", dbs.target_dsn, "--log-format", "text"]

    every = run_cli(base)
    assert every.returncode == 1 and "DIFFERENT: 1 of 2 tables match" in every.stdout, every

    conn = psycopg2.connect(dbs.target_dsn)
    try:
        book = Bookkeeping("cdc_sink", "g")
        book.install(conn)
        with conn.cursor() as cur:
            book.record_initialized(cur, TableName("public", "filled"), "copy", None, None, 1)
        conn.commit()
    finally:
        conn.close()
    filled = run_cli(base)
    assert filled.returncode == 0 and "identical: 1 of 1 tables match" in filled.stdout, filled
    assert "public.other" not in filled.stdout, filled.stdout
