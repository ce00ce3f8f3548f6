"""What every fault scenario shares: the writer's tables on both sides with per-key audit triggers
and a version column, the workload, the connectors pointed at (possibly proxied) endpoints, recovery
timing, and the final check: catch-up, cdc-verify, a row-by-row comparison as text, "nothing applied
twice", "never a step back" and "nothing published twice".

**Every row write is logged.** AFTER INSERT/UPDATE/DELETE row triggers on person and orders, on the
source (before the writer starts) and on the target (before the sink starts), log every row write
in `faults_audit.log` under its key, with the row's version (below):

    i  an insert                     u  an update that keeps the key
    d  a delete                      x  an update that changed the key: logged under the old key ...
                                     k  ... and under the new one (one row write, two lines)

A side's *row writes* are its lines other than `k`.

**The per-key rule: target writes <= source writes, for each kind and in total.** The sink applies
a key change as a delete of the old key and an upsert of the new key (the source publishes it as
`d` + tombstone + `c`), an upsert as INSERT ... ON CONFLICT DO UPDATE (an insert trigger when the
row is absent, an update trigger when it is there), and all of a batch's changes of a key as one
net write. So a source write counts, for the key it is logged under, as what the target can turn it
into: an *insert* (`i`, and `k`: the key arrives), an *update* (`u`) or a *delete* (`d`, and `x`:
the key leaves). Each target write of a key comes from one batch that holds a source write of the
same kind of that key:

- an insert: the row was absent and the batch's net change of the key is an upsert, so the batch
  holds the key's arrival (keys are never reused: person ids come from a sequence, also for a key
  change, order ids are fresh random UUIDs; so an upsert of an absent key is its arrival). The bulk
  copy inserts each row its snapshot holds once, and the source logged that row's arrival before;
- an update: the row was there (an earlier batch or the copy wrote it), so the batch holds a change
  of the key after its arrival, that is an update that kept the key;
- a delete: the row was there and the batch ends the key with a delete or a key change away (the
  delete's tombstone in a later batch, or any second delete, finds no row and fires nothing).

Batches are disjoint, so per key and kind the target has at most the source's number. Merging
gives fewer, never more; a batch applied twice, a change published twice and applied in two
batches, a streamed change the copy held already, or a fenced-off sink writing behind its
successor gives more. The former "arrivals" check (inserts plus key changes to a key) is the insert
kind of this rule.

A doubled write can hide behind merging (source i u u, target i u plus the last u again). The
version column catches it: the source's BEFORE INSERT OR UPDATE trigger sets `cdc_version` to the
next value of a sequence, so every row change (ON UPDATE CASCADE updates of orders included)
carries a higher version than every change before it; the column replicates like any other, so the
comparisons and cdc-verify see it equal on both sides. On the target, AFTER row triggers record

- in `faults_audit.again`: an update that writes the version the row holds already, the same
  source change written a second time (an equal version is no other change: each has its own);
- in `faults_audit.back`: an update to a lower version (a step back in time), and an insert of a
  key the target deleted before (`faults_audit.deleted` keeps deleted keys with their last
  version). Such a re-insert is a step back unless the source inserted the key again too: the
  final check excuses it only when the source's log has an insert of that key with a version above
  the deleted row's and not above the inserted row's (never the case with cdc-writer, which does not
  reuse keys).

AFTER rather than BEFORE triggers: a BEFORE INSERT trigger also fires for an upsert's row that then
updates the existing row, and a BEFORE INSERT row trigger turns the sink's bulk COPY into row-by-row
inserts (AFTER row triggers leave COPY's batched inserts alone).

`doubled` is the writes the target made beyond the rule, summed over keys (per key the larger of
the excess over the source's counts and the rewrites of a version), `steps back` the unexcused rows
of `faults_audit.back`, `Kafka duplicates` the messages of the writer's change topics whose position
(schemas.codec.position) repeats within their partition (tests/faults/positions.py).
"""

import contextlib
import dataclasses
import random
import re
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
import psycopg2
from psycopg2 import sql

from pg_kafka_cdc.common.lsn import lsn_to_int
from pg_kafka_cdc.common.tables import TableName
from schemas.topics import topic_for
from tests.conftest import Databases
from tests.faults.positions import Repeat, out_of_order, read_positioned, repeated_positions
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

AUDITED = ("person", "orders")

# Both sides: the version column, the log and its triggers.
AUDIT_DDL = [
    "CREATE SCHEMA IF NOT EXISTS faults_audit",
    *(f"ALTER TABLE public.{t} ADD COLUMN IF NOT EXISTS cdc_version bigint" for t in AUDITED),
    'CREATE TABLE faults_audit.log (tbl text NOT NULL, op "char" NOT NULL, key text NOT NULL, version bigint)',
    """CREATE FUNCTION faults_audit.record() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO faults_audit.log VALUES (TG_TABLE_NAME, 'i', NEW.id::text, NEW.cdc_version);
        ELSIF TG_OP = 'DELETE' THEN
            INSERT INTO faults_audit.log VALUES (TG_TABLE_NAME, 'd', OLD.id::text, OLD.cdc_version);
        ELSIF NEW.id IS DISTINCT FROM OLD.id THEN
            INSERT INTO faults_audit.log VALUES
                (TG_TABLE_NAME, 'x', OLD.id::text, OLD.cdc_version),
                (TG_TABLE_NAME, 'k', NEW.id::text, NEW.cdc_version);
        ELSE
            INSERT INTO faults_audit.log VALUES (TG_TABLE_NAME, 'u', NEW.id::text, NEW.cdc_version);
        END IF;
        RETURN NULL;
    END $$""",
    *(
        f"CREATE TRIGGER faults_audit AFTER INSERT OR UPDATE OR DELETE ON public.{t} "
        "FOR EACH ROW EXECUTE FUNCTION faults_audit.record()"
        for t in AUDITED
    ),
]

# The source: every row change gets a higher version than all before it.
SOURCE_DDL = [
    "CREATE SEQUENCE faults_audit.version",
    """CREATE FUNCTION faults_audit.stamp() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        NEW.cdc_version := nextval('faults_audit.version');
        RETURN NEW;
    END $$""",
    *(
        f"CREATE TRIGGER faults_stamp BEFORE INSERT OR UPDATE ON public.{t} "
        "FOR EACH ROW EXECUTE FUNCTION faults_audit.stamp()"
        for t in AUDITED
    ),
]

# The target: steps back in time and versions written twice.
TARGET_DDL = [
    "CREATE TABLE faults_audit.deleted (tbl text, key text, version bigint, PRIMARY KEY (tbl, key))",
    'CREATE TABLE faults_audit.back (tbl text NOT NULL, key text NOT NULL, op "char" NOT NULL, '
    "old_version bigint, new_version bigint)",
    "CREATE TABLE faults_audit.again (tbl text NOT NULL, key text NOT NULL, version bigint)",
    """CREATE FUNCTION faults_audit.guard() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        gone bigint;
    BEGIN
        IF TG_OP = 'DELETE' THEN
            INSERT INTO faults_audit.deleted AS d VALUES (TG_TABLE_NAME, OLD.id::text, OLD.cdc_version)
                ON CONFLICT (tbl, key) DO UPDATE SET version = greatest(d.version, EXCLUDED.version);
            RETURN NULL;
        END IF;
        IF TG_OP = 'UPDATE' THEN
            IF NEW.id IS NOT DISTINCT FROM OLD.id THEN
                IF NEW.cdc_version < OLD.cdc_version THEN
                    INSERT INTO faults_audit.back
                        VALUES (TG_TABLE_NAME, NEW.id::text, 'u', OLD.cdc_version, NEW.cdc_version);
                ELSIF NEW.cdc_version = OLD.cdc_version THEN
                    INSERT INTO faults_audit.again VALUES (TG_TABLE_NAME, NEW.id::text, NEW.cdc_version);
                END IF;
                RETURN NULL;
            END IF;
            -- the sink never changes a key; should it, the old key is deleted, the new one inserted
            INSERT INTO faults_audit.deleted AS d VALUES (TG_TABLE_NAME, OLD.id::text, OLD.cdc_version)
                ON CONFLICT (tbl, key) DO UPDATE SET version = greatest(d.version, EXCLUDED.version);
        END IF;
        -- TG_TABLE_NAME is a name (collation "C"): compared as is, the primary key could not be used
        SELECT version INTO gone FROM faults_audit.deleted
            WHERE tbl = (TG_TABLE_NAME::text COLLATE "default") AND key = NEW.id::text;
        IF FOUND THEN
            INSERT INTO faults_audit.back VALUES (TG_TABLE_NAME, NEW.id::text, 'i', gone, NEW.cdc_version);
        END IF;
        RETURN NULL;
    END $$""",
    *(
        f"CREATE TRIGGER faults_guard AFTER INSERT OR UPDATE OR DELETE ON public.{t} "
        "FOR EACH ROW EXECUTE FUNCTION faults_audit.guard()"
        for t in AUDITED
    ),
    # The sink applies as a replica (session_replication_role), under which ordinary triggers do not
    # fire: these count its writes on purpose.
    *(
        f"ALTER TABLE public.{t} ENABLE ALWAYS TRIGGER {trigger}"
        for t in AUDITED
        for trigger in ("faults_audit", "faults_guard")
    ),
]


def prepare_tables(source_dsn: str, target_dsn: str) -> None:
    """The writer's tables on the source, the same (empty) on the target, each with the version
    column and the audit triggers; the version stamp on the source, the guards on the target.

    The target's orders table does not get the foreign key to person: the two tables travel in two
    topics consumed independently, so an order may legitimately be applied before its person (every
    CDC sink of per-table topics has this; the end state is still identical)."""
    for dsn, own in ((source_dsn, SOURCE_DDL), (target_dsn, TARGET_DDL)):
        conn = psycopg2.connect(dsn, connect_timeout=10)
        try:
            with conn, conn.cursor() as cur:
                create_tables(cur)
                if dsn == target_dsn:
                    cur.execute("ALTER TABLE public.orders DROP CONSTRAINT orders_person_id_fkey")
                for statement in (*AUDIT_DDL, *own):
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


# --- counting the row writes ---------------------------------------------------------------------

KINDS = ("insert", "update", "delete")
KIND_OF = {"i": "insert", "k": "insert", "u": "update", "d": "delete", "x": "delete"}
Key = tuple[str, str]  # (table, key as text)


def key_writes(dsn: str) -> dict[Key, Counter[str]]:
    """(table, key) -> its writes by kind (insert, update, delete; see the module's docstring)."""
    found: dict[Key, Counter[str]] = {}
    for tbl, key, op, n in psql_rows(dsn, "SELECT tbl, key, op, count(*) FROM faults_audit.log GROUP BY 1, 2, 3"):
        found.setdefault((str(tbl), str(key)), Counter())[KIND_OF[str(op)]] += int(n)
    return found


def row_writes(dsn: str) -> int:
    """Row writes on person and orders (a key change is one write, logged twice)."""
    return int(psql_rows(dsn, "SELECT count(*) FROM faults_audit.log WHERE op <> 'k'")[0][0])


@dataclass
class Excess:
    """A key the target wrote more often than the source, in one kind or in total."""

    key: Key
    target: Counter[str]
    source: Counter[str]

    @property
    def writes(self) -> int:
        """The target's writes beyond the source's, summed over the kinds."""
        return sum(max(0, self.target[k] - self.source[k]) for k in KINDS)

    def describe(self) -> str:
        def show(c: Counter[str]) -> str:
            return " ".join(f"{k}s {c[k]}" for k in KINDS)

        return f"{self.key[0]} {self.key[1]}: target {show(self.target)}; source {show(self.source)}"


def excess_writes(source: Mapping[Key, Counter[str]], target: Mapping[Key, Counter[str]]) -> list[Excess]:
    """The keys breaking "target writes <= source writes", per kind or in total."""
    found = []
    for key, wrote in sorted(target.items()):
        had = source.get(key, Counter())
        if any(wrote[k] > had[k] for k in KINDS) or wrote.total() > had.total():
            found.append(Excess(key, wrote, had))
    return found


def rewrites(target_dsn: str) -> Counter[Key]:
    """(table, key) -> updates on the target that wrote the version the row held already."""
    return Counter(
        {
            (str(t), str(k)): int(n)
            for t, k, n in psql_rows(target_dsn, "SELECT tbl, key, count(*) FROM faults_audit.again GROUP BY 1, 2")
        }
    )


@dataclass
class StepBack:
    key: Key
    op: str  # u: an update to a lower version; i: a re-insert of a deleted key
    old_version: int | None  # the row's version before (u), the deleted row's version (i)
    new_version: int | None

    def describe(self) -> str:
        what = "update from version" if self.op == "u" else "re-insert after the delete of version"
        return f"{self.key[0]} {self.key[1]}: {what} {self.old_version} to version {self.new_version}"


def steps_back(dbs: Databases) -> list[StepBack]:
    """The target's faults_audit.back, less the re-inserts the source made too."""
    found = []
    for tbl, key, op, old, new in psql_rows(
        dbs.target_dsn, "SELECT tbl, key, op, old_version, new_version FROM faults_audit.back ORDER BY ctid"
    ):
        step = StepBack((str(tbl), str(key)), str(op), old, new)
        if step.op == "i" and old is not None and new is not None:
            [(reinserted,)] = psql_rows(
                dbs.source_dsn,
                "SELECT count(*) FROM faults_audit.log WHERE tbl = %s AND key = %s AND op IN ('i', 'k') "
                "AND version > %s AND version <= %s",
                (tbl, key, old, new),
            )
            if reinserted:
                continue
        found.append(step)
    return found


def doubled_writes(excess: Iterable[Excess], again: Counter[Key]) -> int:
    """Per key the larger of its excess over the source and its rewrites of a version, summed."""
    per_key = Counter(again)
    for e in excess:
        per_key[e.key] = max(per_key[e.key], e.writes)
    return sum(per_key.values())


SOURCE_SKIPPED = re.compile(r"past what the topics held: (\d+) messages read again were not published twice")
# logged at most every 10 s: what a killed sink skipped since its last such line is not counted
SINK_SKIPPED = re.compile(r"skipped (\d+) changes the target already had")


def logged_count(processes: Iterable[CliProcess], pattern: re.Pattern[str]) -> int:
    """The sum of the numbers `pattern` finds in the programs' logs."""
    return sum(int(m.group(1)) for p in processes for m in pattern.finditer(p.stderr_text()))


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
    # every connector started, killed ones included (their logs are read by the final check)
    sources: list[CliProcess] = field(default_factory=list)
    sinks: list[CliProcess] = field(default_factory=list)

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
        process = start_cli(
            source_args(
                dbs,
                self.prefix,
                self.slot,
                "--bootstrap-servers",
                self.source_bootstrap,
                "--exclude-tables",
                "faults_audit.*",
                *extra,
            )
        )
        self.sources.append(process)
        return process

    def start_sink(self, *extra: str, target_dsn: str | None = None) -> CliProcess:
        dbs = dataclasses.replace(
            self.direct, source_dsn=self.sink_source_dsn, target_dsn=target_dsn or self.sink_target_dsn
        )
        process = start_cli(
            sink_args(dbs, self.prefix, self.slot, self.group, "--bootstrap-servers", self.sink_bootstrap, *extra)
        )
        self.sinks.append(process)
        return process

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
    faults: list[Fault] = field(default_factory=list)
    source_writes: int | None = None  # row writes on the source's person and orders (audit triggers)
    target_writes: int | None = None  # the same on the target
    rows_lost: int | None = None  # rows missing, different or left over on the target
    rows_doubled: int | None = None  # target row writes beyond the per-key rule (see the docstring)
    steps_back: int | None = None  # target writes back to an older version of a row
    kafka_messages: int | None = None  # messages in the writer's change topics
    kafka_duplicates: int | None = None  # of them, at a position their partition holds already
    republish_skipped: int | None = None  # read again by a restarted source, not published twice
    sink_skipped: int | None = None  # changes a sink skipped as already applied (its log lines)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def add(self, kind: str, detail: str = "", down: float = 0.0, recovery: float | None = None) -> Fault:
        fault = Fault(kind, detail, round(down, 2), None if recovery is None else round(recovery, 2))
        self.faults.append(fault)
        return fault

    @property
    def kills(self) -> int:
        return sum("kill" in f.kind for f in self.faults)

    def figures(self) -> str:
        """Kills, writes on each side, and the checks' figures, on one line."""
        return (
            f"kills {self.kills}, row writes source {self.source_writes} / target {self.target_writes}, "
            f"lost {self.rows_lost}, doubled {self.rows_doubled}, steps back {self.steps_back}, "
            f"Kafka duplicates {self.kafka_duplicates} of {self.kafka_messages} messages "
            f"(re-read by the source, not republished: {self.republish_skipped}; "
            f"skipped by the sink as applied already: {self.sink_skipped})"
        )

    def summary(self) -> str:
        kinds = Counter(f.kind for f in self.faults)
        recoveries = [f.recovery_seconds for f in self.faults if f.recovery_seconds is not None]
        recovery = f", recovery max {max(recoveries):.1f} s" if recoveries else ""
        return (
            f"{self.name}: {self.operations} writer ops, {self.figures()}, "
            f"faults {sum(kinds.values())} ({', '.join(f'{k} x{n}' for k, n in kinds.items())}){recovery}, "
            f"{self.seconds:.0f} s" + (f" [{'; '.join(self.notes)}]" if self.notes else "")
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
        details = [f"version={after['cdc_version']}"] if "cdc_version" in after else []
        details += [
            f"note={'null' if v is None else f'{len(str(v))} chars'}" for c, v in after.items() if c == "note"
        ]
        details += [f"{extra}={envelope[extra]}" for extra in ("unchanged", "refetched") if envelope.get(extra)]
        source = envelope["source"]
        lines.append(
            f"  @{offset} {envelope['op']} lsn={source.get('lsn')} commit={source.get('commit_lsn')} "
            f"seq={source.get('seq')} {' '.join(details)}"
        )
    return lines


def audit_history(dsn: str, table: str, key: str) -> str:
    """The key's writes in the order they were logged: op and version (`u@17 d@17`)."""
    rows = psql_rows(
        dsn,
        "SELECT string_agg(op::text || '@' || coalesce(version::text, '-'), ' ' ORDER BY ctid) "
        "FROM faults_audit.log WHERE tbl = %s AND key = %s",
        (table.rsplit(".", maxsplit=1)[-1], key),
    )
    return str(rows[0][0])


def explain_keys(pipeline: Pipeline, keys: Iterable[Key], limit: int = 3) -> list[str]:
    """What happened to some keys, for a failure message: their writes on each side, their messages."""
    chosen = list(dict.fromkeys(keys))[:limit]
    dbs, lines = pipeline.direct, []
    for table, key in chosen:
        qualified = table if "." in table else f"public.{table}"
        events = key_events(pipeline, qualified, {key})[key]
        lines.append(
            f"{qualified} {key}: source writes {audit_history(dbs.source_dsn, table, key)!r}, target writes "
            f"{audit_history(dbs.target_dsn, table, key)!r}; in Kafka:\n" + "\n".join(describe_events(events))
        )
    return lines


def check_writes(pipeline: Pipeline, report: ScenarioReport) -> list[str]:
    """The per-key write counts, the versions' steps back and the topics' repeated positions, on a
    pipeline that has caught up: fills the report's figures; a failure message for each check that
    found something."""
    dbs = pipeline.direct
    excess = excess_writes(key_writes(dbs.source_dsn), key_writes(dbs.target_dsn))
    again = rewrites(dbs.target_dsn)
    back = steps_back(dbs)
    messages = read_positioned(pipeline.bootstrap, pipeline.topics)
    repeats = repeated_positions(messages)
    report.source_writes = row_writes(dbs.source_dsn)
    report.target_writes = row_writes(dbs.target_dsn)
    report.rows_doubled = doubled_writes(excess, again)
    report.steps_back = len(back)
    report.kafka_messages = len(messages)
    report.kafka_duplicates = len(repeats)
    report.republish_skipped = logged_count(pipeline.sources, SOURCE_SKIPPED)
    report.sink_skipped = logged_count(pipeline.sinks, SINK_SKIPPED)
    disordered = out_of_order(messages)
    if disordered:
        report.notes.append(f"{len(disordered)} messages below their partition's previous position")
    failures = []
    if excess or again:
        failures.append(doubled_message(pipeline, excess, again))
    if back:
        failures.append(
            f"{len(back)} steps back on the target:\n"
            + "\n".join([b.describe() for b in back[:10]] + explain_keys(pipeline, [b.key for b in back]))
        )
    if repeats:
        failures.append(repeats_message(pipeline, repeats))
    return failures


def final_check(
    pipeline: Pipeline,
    report: ScenarioReport,
    processes: Sequence[CliProcess],
    tables: Sequence[str] = WRITER_TABLES,
    exclude: dict[str, set[str]] | None = None,
    verify_tables: Sequence[str] | None = None,
) -> None:
    """Catch-up (everything in Kafka, everything applied), then cdc-verify exit 0, the row-by-row
    comparison and check_writes; fills the report's figures and asserts each is 0."""
    wait_published(pipeline, processes)
    wait_applied_all(pipeline, processes)
    dbs = pipeline.direct
    differences = compare_rows(dbs, tables, exclude)
    report.rows_lost = len(differences)
    failures = check_writes(pipeline, report)

    # cdc-verify must agree with the row-by-row comparison
    samples = [d.describe() for d in differences[:5]]
    samples += explain_keys(pipeline, [(d.table.rsplit(".", maxsplit=1)[-1], d.key) for d in differences])
    message = f"{len(differences)} rows lost, different or extra on the target; e.g.\n" + "\n".join(samples)
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
    assert not differences, message
    assert not failures, "\n\n".join(failures)


def doubled_message(pipeline: Pipeline, excess: list[Excess], again: Counter[Key]) -> str:
    lines = [
        f"{len(excess)} keys written more often on the target than on the source, "
        f"{sum(again.values())} updates writing a version again ({len(again)} keys):"
    ]
    lines += [e.describe() for e in excess[:10]]
    lines += [f"{t} {k}: version written again {n} x" for (t, k), n in again.most_common(10)]
    return "\n".join(lines + explain_keys(pipeline, [e.key for e in excess] + list(again)))


def repeats_message(pipeline: Pipeline, repeats: list[Repeat]) -> str:
    lines = [f"{len(repeats)} messages at a position their partition holds already:"]
    lines += [r.describe() for r in repeats[:10]]
    keys: list[Key] = []
    for r in repeats[:3]:
        if r.message.key is not None:
            table = r.message.topic.rsplit(".", maxsplit=1)[-1]
            keys.append((table, str(next(iter(orjson.loads(r.message.key).values())))))
    return "\n".join(lines + explain_keys(pipeline, keys))


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
