"""What every fault scenario shares: the writer's tables on both sides with per-key audit triggers,
the workload, the connectors pointed at (possibly proxied) endpoints, recovery timing, and the final
check: catch-up, cdc-verify, a row-by-row comparison as text, and "no row applied twice".

"No row applied twice" is checked with AFTER INSERT/UPDATE/DELETE row triggers on person and orders,
on the source (before the writer starts) and on the target (before the sink starts), logging every
row operation per key in `faults_audit.log`. A key *arrives* in a table through an INSERT, or an
UPDATE that changes the primary key to it. The sink may merge changes (fewer arrivals on the target)
but must never make a key arrive more often than it did on the source: a re-applied batch, or a
zombie sink writing behind its successor, would re-insert rows that were deleted since.
"""

import contextlib
import dataclasses
import random
import re
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
import psycopg2
from psycopg2 import sql

from pg_kafka_cdc.common.lsn import lsn_to_int
from pg_kafka_cdc.common.tables import TableName
from schemas.topics import topic_for
from tests.conftest import Databases
from tests.helpers import CliProcess, psql_rows, run_cli, start_cli, stop_process, wait_until
from tests.kafka_read import read_topics
from tests.pipeline import (
    WRITER_TABLES,
    assert_running,
    execute,
    partition_ends,
    rows_as_text,
    sink_args,
    source_args,
    stored_offsets,
    verify,
    while_running,
    writer_args,
)
from writer.schema import create_tables

AUDIT_DDL = [
    "CREATE SCHEMA IF NOT EXISTS faults_audit",
    'CREATE TABLE faults_audit.log (tbl text NOT NULL, op "char" NOT NULL, key text NOT NULL)',
    """CREATE FUNCTION faults_audit.record() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO faults_audit.log VALUES (TG_TABLE_NAME, 'i', NEW.id::text);
        ELSIF TG_OP = 'UPDATE' THEN
            INSERT INTO faults_audit.log VALUES (TG_TABLE_NAME, 'u', OLD.id::text);
            IF NEW.id IS DISTINCT FROM OLD.id THEN
                INSERT INTO faults_audit.log VALUES (TG_TABLE_NAME, 'k', NEW.id::text);
            END IF;
        ELSE
            INSERT INTO faults_audit.log VALUES (TG_TABLE_NAME, 'd', OLD.id::text);
        END IF;
        RETURN NULL;
    END $$""",
    *(
        f"CREATE TRIGGER faults_audit AFTER INSERT OR UPDATE OR DELETE ON public.{t} "
        "FOR EACH ROW EXECUTE FUNCTION faults_audit.record()"
        for t in ("person", "orders")
    ),
]


def prepare_tables(source_dsn: str, target_dsn: str) -> None:
    """The writer's tables on the source, the same (empty) on the target, audit triggers on both.

    The target's orders table does not get the foreign key to person: the two tables travel in two
    topics consumed independently, so an order may legitimately be applied before its person (every
    CDC sink of per-table topics has this; the end state is still identical)."""
    for dsn in (source_dsn, target_dsn):
        conn = psycopg2.connect(dsn, connect_timeout=10)
        try:
            with conn, conn.cursor() as cur:
                create_tables(cur)
                if dsn == target_dsn:
                    cur.execute("ALTER TABLE public.orders DROP CONSTRAINT orders_person_id_fkey")
                for statement in AUDIT_DDL:
                    cur.execute(statement)
        finally:
            conn.close()


def populate_person(dsn: str, rows: int) -> None:
    """`rows` people in one statement (through the audit trigger, like any insert)."""
    execute(
        dsn,
        sql.SQL(
            "INSERT INTO public.person (first_name, last_name, email, phone, address, birth_date, balance, "
            "active, tags, profile) "
            "SELECT 'First' || g, 'Last' || g, 'p' || g || '@example.org', '+1-555-' || g, g || ' Main Street', "
            "date '1950-01-01' + (g % 20000), (g % 100000) / 100.0, g % 7 <> 0, ARRAY['bulk', 't' || (g % 10)], "
            "jsonb_build_object('n', g, 'note', repeat('x', g % 50)) "
            "FROM generate_series(1, {}) g"
        ).format(sql.Literal(rows)),
    )


def arrivals(dsn: str) -> Counter[tuple[str, str]]:
    """(table, key) -> how often the key arrived (insert, or key change to it)."""
    found: Counter[tuple[str, str]] = Counter()
    for tbl, key, n in psql_rows(
        dsn, "SELECT tbl, key, count(*) FROM faults_audit.log WHERE op IN ('i', 'k') GROUP BY tbl, key"
    ):
        found[(tbl, key)] = int(n)
    return found


def operation_counts(dsn: str) -> Counter[str]:
    found: Counter[str] = Counter()
    for op, n in psql_rows(dsn, "SELECT op, count(*) FROM faults_audit.log GROUP BY op"):
        found[str(op)] = int(n)
    return found


# --- the workload -----------------------------------------------------------------------------


def workload_args(source_dsn: str, rate: float, batch: int, seed: int, *extra: str) -> list[str]:
    """cdc-writer with the fault suite's mix: inserts, updates, deletes, key changes, TOASTed
    values, multi-operation transactions over person and orders."""
    return writer_args(
        Databases("-", source_dsn, "-"),
        "--rate",
        f"{rate:g}",
        "--batch",
        str(batch),
        "--key-change-ratio",
        "0.05",
        "--big-ratio",
        "0.05",
        "--seed",
        str(seed),
        *extra,
    )


def written(stdout: str) -> int:
    found = re.search(r"wrote (\d+) operations", stdout)
    assert found, f"the writer did not say what it wrote:\n{stdout}"
    return int(found.group(1))


def burst(source_dsn: str, count: int, batch: int = 10) -> int:
    """cdc-writer as fast as it goes for `count` operations (a backlog); returns the operations."""
    result = run_cli(
        workload_args(source_dsn, 0, batch, random.randrange(1 << 30), "--count", str(count)), timeout=300
    )
    assert result.returncode == 0, f"cdc-writer failed:\n{result.stderr}"
    return written(result.stdout)


class Writer:
    """The workload in the background (see workload_args), until stop()."""

    def __init__(self, source_dsn: str, rate: float, seed: int | None = None, batch: int = 5) -> None:
        self.seed = random.randrange(1 << 30) if seed is None else seed
        self.process = start_cli(workload_args(source_dsn, rate, batch, self.seed))
        wait_until(
            lambda: "writing to" in self.process.stderr_text() or self.process.poll() is not None,
            timeout=60,
            message="the writer never started writing",
        )
        assert self.process.poll() is None, f"the writer exited early:\n{self.process.stderr_text()}"
        self.operations = 0

    def stop(self) -> int:
        """SIGTERM, exit 0 expected; the number of operations it wrote."""
        running = self.process.poll() is None
        code = stop_process(self.process, timeout=60) if running else self.process.returncode
        assert code == 0, f"the writer exited with {code}:\n{self.process.stderr_text()[-3000:]}"
        self.operations = written(self.process.stdout_text())
        return self.operations


# --- the pipeline -------------------------------------------------------------------------------


@dataclass
class Pipeline:
    """Where the connectors connect (possibly through proxies) and where the test checks (direct)."""

    direct: Databases  # the test's own view: the real servers
    bootstrap: str  # the test's own Kafka address
    prefix: str
    source_dsn: str = ""  # cdc-source's --source-dsn (default: direct)
    source_bootstrap: str = ""  # cdc-source's Kafka (default: direct)
    sink_source_dsn: str = ""  # cdc-sink's --source-dsn (bulk copy)
    sink_target_dsn: str = ""
    sink_bootstrap: str = ""
    slot: str = ""
    group: str = ""

    def __post_init__(self) -> None:
        self.source_dsn = self.source_dsn or self.direct.source_dsn
        self.sink_source_dsn = self.sink_source_dsn or self.direct.source_dsn
        self.sink_target_dsn = self.sink_target_dsn or self.direct.target_dsn
        self.source_bootstrap = self.source_bootstrap or self.bootstrap
        self.sink_bootstrap = self.sink_bootstrap or self.bootstrap
        self.slot = self.slot or f"slot_{self.prefix}"
        self.group = self.group or f"group_{self.prefix}"

    @property
    def topics(self) -> list[str]:
        return [topic_for(self.prefix, TableName("public", t)) for t in ("person", "orders")]

    def start_source(self, *extra: str) -> CliProcess:
        dbs = dataclasses.replace(self.direct, source_dsn=self.source_dsn)
        return start_cli(
            source_args(dbs, self.prefix, self.slot, "--bootstrap-servers", self.source_bootstrap, *extra)
        )

    def start_sink(self, *extra: str, target_dsn: str | None = None) -> CliProcess:
        dbs = dataclasses.replace(
            self.direct, source_dsn=self.sink_source_dsn, target_dsn=target_dsn or self.sink_target_dsn
        )
        return start_cli(
            sink_args(dbs, self.prefix, self.slot, self.group, "--bootstrap-servers", self.sink_bootstrap, *extra)
        )

    # --- progress -------------------------------------------------------------------------------

    def last_applied_commit(self) -> float | None:
        """Source commit time (epoch seconds) of the newest change the sink applied; None when the
        target cannot tell (nothing applied yet, or it is down)."""
        try:
            rows = psql_rows(
                self.direct.target_dsn,
                "SELECT CASE WHEN to_regclass('cdc_sink.tables') IS NULL THEN NULL ELSE "
                "(SELECT extract(epoch FROM max(last_commit_at))::float8 FROM cdc_sink.tables "
                "WHERE group_id = %s) END",
                (self.group,),
            )
        except psycopg2.Error:
            return None
        return None if rows[0][0] is None else float(rows[0][0])

    def applied_total(self) -> int:
        try:
            return sum(o or 0 for o in stored_offsets(self.direct, self.group).values())
        except psycopg2.Error:
            return 0

    def wait_recovered(self, since: float, processes: Sequence[CliProcess], timeout: float = 120) -> float:
        """Seconds from `since` (epoch) until a change committed on the source after `since` was
        applied to the target (the writer must be running)."""

        def applied_after() -> bool:
            assert_running(*processes)
            last = self.last_applied_commit()
            return last is not None and last >= since

        wait_logged(applied_after, timeout, "no change committed after the fault reached the target", processes)
        return time.time() - since

    def wait_applying(self, processes: Sequence[CliProcess], minimum: int = 1, timeout: float = 120) -> None:
        """Until the sink has applied at least `minimum` more messages than now."""
        before = self.applied_total()
        wait_logged(
            while_running(processes, lambda: self.applied_total() >= before + minimum),
            timeout,
            "the sink applied nothing",
            processes,
        )

    def lag_seconds(self) -> float | None:
        last = self.last_applied_commit()
        return None if last is None else max(0.0, time.time() - last)


def logs(processes: Iterable[CliProcess], tail: int = 3000) -> str:
    return "\n".join(f"--- {p.command[:200]}\n{p.stderr_text()[-tail:]}" for p in processes)


T = TypeVar("T")


def wait_logged(
    predicate: Callable[[], T],
    timeout: float,
    message: str,
    processes: Iterable[CliProcess],
    interval: float = 0.2,
) -> T:
    """wait_until, with the programs' latest logs (as of the time-out) in the failure message."""
    try:
        return wait_until(predicate, timeout=timeout, interval=interval, message=message)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{logs(processes)}") from None


def kill9(process: CliProcess) -> None:
    code = stop_process(process, signal.SIGKILL)
    assert code == -signal.SIGKILL, f"{process.command} had already exited ({code}):\n{process.stderr_text()}"


def confirmed_flush(dsn: str, slot: str) -> int | None:
    rows = psql_rows(
        dsn, "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (slot,)
    )
    return lsn_to_int(rows[0][0]) if rows and rows[0][0] else None


# --- the final check ------------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    detail: str = ""
    down_seconds: float = 0.0
    recovery_seconds: float | None = None  # from the end of the fault to a new change applied


@dataclass
class ScenarioReport:
    name: str
    operations: int = 0  # the writer's operations (each a row change; cascades come on top)
    row_changes: int = 0  # row changes on the source's person and orders (audit triggers)
    faults: list[Fault] = field(default_factory=list)
    rows_lost: int | None = None
    rows_doubled: int | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def add(self, kind: str, detail: str = "", down: float = 0.0, recovery: float | None = None) -> Fault:
        fault = Fault(kind, detail, round(down, 2), None if recovery is None else round(recovery, 2))
        self.faults.append(fault)
        return fault

    def summary(self) -> str:
        kinds = Counter(f.kind for f in self.faults)
        recoveries = [f.recovery_seconds for f in self.faults if f.recovery_seconds is not None]
        recovery = f", recovery max {max(recoveries):.1f} s" if recoveries else ""
        return (
            f"{self.name}: {self.operations} writer ops ({self.row_changes} row changes), "
            f"faults {sum(kinds.values())} ({', '.join(f'{k} x{n}' for k, n in kinds.items())}){recovery}, "
            f"lost {self.rows_lost}, doubled {self.rows_doubled}, {self.seconds:.0f} s"
            + (f" [{'; '.join(self.notes)}]" if self.notes else "")
        )


def wait_published(pipeline: Pipeline, processes: Sequence[CliProcess], timeout: float = 120) -> None:
    """Until the slot confirmed everything written so far: every change is in Kafka."""
    [(now,)] = psql_rows(pipeline.direct.source_dsn, "SELECT pg_current_wal_lsn()::text")
    goal = lsn_to_int(now)

    def published() -> bool:
        assert_running(*processes)
        confirmed = confirmed_flush(pipeline.direct.source_dsn, pipeline.slot)
        return confirmed is not None and confirmed >= goal

    wait_logged(published, timeout, f"the slot never confirmed {now}", processes, interval=0.3)


def wait_applied_all(pipeline: Pipeline, processes: Sequence[CliProcess], timeout: float = 180) -> None:
    """Until the sink's stored offsets reach the end of every partition of the change topics."""
    topics = [t for t in partition_ends(pipeline.bootstrap, pipeline.topics)]
    ends = {tp: high for tp, high in partition_ends(pipeline.bootstrap, pipeline.topics).items() if high > 0}
    assert topics, "the change topics do not exist"

    def applied() -> bool:
        assert_running(*processes)
        try:
            stored = stored_offsets(pipeline.direct, pipeline.group)
        except psycopg2.Error:
            return False
        return all((stored.get(tp) or 0) >= high for tp, high in ends.items())

    wait_logged(applied, timeout, f"the sink never reached {ends}", processes, interval=0.3)


def _short(row: dict[str, str | None] | None) -> str:
    """A row for a failure message: long values cut (TOASTed notes are kilobytes)."""
    if row is None:
        return "(none)"
    return str({k: v if v is None or len(v) <= 40 else f"{v[:20]}...({len(v)} chars)" for k, v in row.items()})


Row = dict[str, str | None]


@dataclass
class Difference:
    table: str
    key: str
    source: Row | None  # None: only on the target
    target: Row | None  # None: missing on the target

    def describe(self) -> str:
        return f"{self.table} {self.key}: source {_short(self.source)}\n    target {_short(self.target)}"


def compare_rows(
    dbs: Databases, tables: Iterable[str], exclude: dict[str, set[str]] | None = None
) -> list[Difference]:
    """Row-by-row comparison as PostgreSQL text (keys in `exclude` left out)."""
    found = []
    for table in tables:
        skip = (exclude or {}).get(table, set())
        source = {str(r["id"]): r for r in rows_as_text(dbs.source_dsn, table) if r["id"] not in skip}
        target = {str(r["id"]): r for r in rows_as_text(dbs.target_dsn, table) if r["id"] not in skip}
        found += [Difference(table, k, row, target.get(k)) for k, row in source.items() if target.get(k) != row]
        found += [Difference(table, k, None, target[k]) for k in target.keys() - source.keys()]
    return found


def key_events(pipeline: Pipeline, table: str, keys: set[str]) -> dict[str, list[tuple[int, Any]]]:
    """The messages of the change topic for `keys`: key -> [(offset, envelope or None for a tombstone)]."""
    topic = topic_for(pipeline.prefix, TableName(*table.split(".")))
    found: dict[str, list[tuple[int, Any]]] = {k: [] for k in keys}
    for record in read_topics(pipeline.bootstrap, [topic], quiet=0.5):
        if record.key is None:
            continue
        key = str(next(iter(orjson.loads(record.key).values())))
        if key in found:
            found[key].append((record.offset, None if record.value is None else orjson.loads(record.value)))
    return found


def describe_events(events: list[tuple[int, Any]]) -> list[str]:
    lines = []
    for offset, envelope in events:
        if envelope is None:
            lines.append(f"  @{offset} tombstone")
            continue
        after = envelope.get("after") or {}
        details = [
            f"note={'null' if v is None else f'{len(str(v))} chars'}" for c, v in after.items() if c == "note"
        ]
        details += [f"{extra}={envelope[extra]}" for extra in ("unchanged", "refetched") if envelope.get(extra)]
        source = envelope["source"]
        lines.append(
            f"  @{offset} {envelope['op']} lsn={source.get('lsn')} commit={source.get('commit_lsn')} {' '.join(details)}"
        )
    return lines


def audit_history(dsn: str, table: str, key: str) -> str:
    rows = psql_rows(
        dsn,
        "SELECT string_agg(op::text, '' ORDER BY ctid) FROM faults_audit.log WHERE tbl = %s AND key = %s",
        (table.rsplit(".", maxsplit=1)[-1], key),
    )
    return str(rows[0][0])


def doubled_keys(dbs: Databases) -> list[tuple[tuple[str, str], int, int]]:
    """Keys that arrived on the target more often than on the source: (key, target, source)."""
    source, target = arrivals(dbs.source_dsn), arrivals(dbs.target_dsn)
    return sorted((k, n, source.get(k, 0)) for k, n in target.items() if n > source.get(k, 0))


def final_check(
    pipeline: Pipeline,
    report: ScenarioReport,
    processes: Sequence[CliProcess],
    tables: Sequence[str] = WRITER_TABLES,
    exclude: dict[str, set[str]] | None = None,
    verify_tables: Sequence[str] | None = None,
) -> None:
    """Catch-up (everything in Kafka, everything applied), then cdc-verify exit 0, the row-by-row
    comparison and the arrival counts; fills the report's lost/doubled figures and asserts they are 0."""
    wait_published(pipeline, processes)
    wait_applied_all(pipeline, processes)
    dbs = pipeline.direct
    differences = compare_rows(dbs, tables, exclude)
    events: dict[str, list[tuple[int, Any]]] = {}
    for table in {d.table for d in differences}:
        events.update(key_events(pipeline, table, {d.key for d in differences if d.table == table}))
    real = differences
    doubled = doubled_keys(dbs)
    report.rows_lost = sum(d.source is not None for d in real)
    report.rows_doubled = len(doubled) + sum(d.source is None for d in real)
    counts = operation_counts(dbs.source_dsn)
    report.row_changes = counts["i"] + counts["u"] + counts["d"]
    samples = [d.describe() for d in real[:5]]
    for d in real[:3]:  # what happened to them, for the failure message
        samples.append(
            f"{d.table} {d.key}: source operations {audit_history(dbs.source_dsn, d.table, d.key)!r}, target "
            f"operations {audit_history(dbs.target_dsn, d.table, d.key)!r}; in Kafka:\n"
            + "\n".join(describe_events(events.get(d.key, [])))
        )
    message = f"{len(real)} rows lost, different or extra on the target; e.g.\n" + "\n".join(samples)
    # cdc-verify must agree
    result = verify(dbs, list(tables if verify_tables is None else verify_tables), "--json", "--limit", "100000")
    assert result.returncode in (0, 1), f"cdc-verify exit {result.returncode}:\n{result.stdout}{result.stderr}"
    tables_report = orjson.loads(result.stdout)
    problems = [f"{r['table']}: {r['problem']}" for r in tables_report if r.get("problem")]
    assert not problems, f"cdc-verify could not compare: {problems}"
    flagged = {
        (r["table"], key.strip("()"))
        for r in tables_report
        for kind in ("missing", "changed", "extra")
        for key in r[kind]
    }
    assert not flagged, f"cdc-verify found differences: {sorted(flagged)[:10]}\n{message}"
    assert result.returncode == 0, f"cdc-verify exit {result.returncode}:\n{result.stdout}"
    assert not real, message
    assert not doubled, (
        f"{len(doubled)} keys arrived on the target more often than on the source (key, target, source): "
        f"{doubled[:10]}"
    )


def settle(seconds: float, processes: Sequence[CliProcess], step: float = 0.2) -> None:
    """Sleep `seconds`, failing at once if one of `processes` exits meanwhile."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert_running(*processes)
        time.sleep(min(step, max(0.0, deadline - time.monotonic())))


@contextlib.contextmanager
def timed() -> Any:
    """`with timed() as t:` ... `t()` gives the seconds since the block started."""
    started = time.monotonic()
    yield lambda: time.monotonic() - started


Predicate = Callable[[], bool]
