"""The whole pipeline under pgbench's TPC-B load, with a reader on the target that checks, many times
a second and in one snapshot, `sum(abalance) = sum(tbalance) = sum(bbalance)` (tests/pgbench.py).

- `--consistency row` (the default) lets the reader see half a transaction: the check can fail.
- `--consistency transaction` (the source with `--transaction-metadata`) never lets it, also across
  `kill -9` of the sink and of the source and with a 300,000-row transaction in the middle (the
  sink killed while it applies it); the target ends identical, with no row written twice or
  stepped back, and reports its consistent point (the last source transaction applied) in
  cdc-status and the metrics.

Each test fills the target (bulk copies) before the load starts, so the copies agree with each
other, and the reader starts with the load; three partitions per table everywhere.

"Written twice" is checked as tests/faults/harness.py does: the source stamps each row change with
a higher `cdc_version` from a sequence (a BEFORE trigger), both sides log every row write per key
(AFTER triggers, ENABLE ALWAYS on the target, where the sink applies as a replica), and the target
records an update that writes the version the row holds already (`again`) or a lower one (`back`).
Per key and kind (insert, update, delete) the target has at most the source's writes: the sink
merges a batch's changes of a key into one write, never makes more. pgbench changes no key and
deletes nothing, so the log needs no key-change kinds."""

import re
import signal
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import pytest

from pg_kafka_cdc.common.lsn import int_to_lsn, lsn_to_int
from schemas import transactions
from tests.conftest import Databases, Stack
from tests.helpers import CliProcess, psql_rows, run_cli, stop_process, wait_until
from tests.kafka_broker import free_port
from tests.pgbench import KEYS, Load, LoadResult, Observed, balances, create_empty, initialize, reading
from tests.pgbench import TABLES as PGBENCH_TABLES
from tests.pipeline import (
    assert_running,
    assert_same_rows,
    error_lines,
    execute,
    read_all,
    start_sink,
    start_source,
    stop_cleanly,
    stored_offsets,
    wait_for_output,
    wait_identical,
    wait_while_running,
)

AUDIT_SCHEMA = "tx_audit"
EXCLUDED = f"{AUDIT_SCHEMA}.*"
MIN_READS_PER_SECOND = 20
KILL_EVERY = 5.0  # seconds of load between two kills (plus the time to see the sink apply again)

# A table outside pgbench's, for the large transaction.
BULK_TABLE = "public.bulk"
BULK_ROWS = 300_000
BULK_DDL = f"CREATE TABLE {BULK_TABLE} (id integer PRIMARY KEY, v text NOT NULL)"
# The tables of every test (the bulk table stays empty but in the large transaction's test).
TABLES = (*PGBENCH_TABLES, BULK_TABLE)
# The audited tables and their keys.
AUDITED = {**KEYS, "bulk": "id"}

# One transfer (account 1, teller 1, branch 1 by the same delta, a history row) around 300,000
# inserts: applied in parts, the sums break for as long as the parts are apart.
BULK_TRANSACTION = [
    "UPDATE public.pgbench_accounts SET abalance = abalance + 777 WHERE aid = 1",
    f"INSERT INTO {BULK_TABLE} SELECT g, md5(g::text) FROM generate_series(1, {BULK_ROWS}) g",
    "UPDATE public.pgbench_tellers SET tbalance = tbalance + 777 WHERE tid = 1",
    "UPDATE public.pgbench_branches SET bbalance = bbalance + 777 WHERE bid = 1",
    "INSERT INTO public.pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 1, 777, now())",
]
# Both sides: the version column, the per-key log and its triggers (TG_ARGV[0]: the key column).
AUDIT_DDL = [
    f"CREATE SCHEMA {AUDIT_SCHEMA}",
    *(f"ALTER TABLE public.{t} ADD COLUMN cdc_version bigint NOT NULL DEFAULT 0" for t in AUDITED),
    f'CREATE TABLE {AUDIT_SCHEMA}.log (tbl text NOT NULL, op "char" NOT NULL, key text NOT NULL, version bigint)',
    f"""CREATE FUNCTION {AUDIT_SCHEMA}.record() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'DELETE' THEN
            INSERT INTO {AUDIT_SCHEMA}.log VALUES (TG_TABLE_NAME, 'd', to_jsonb(OLD) ->> TG_ARGV[0], OLD.cdc_version);
        ELSE
            INSERT INTO {AUDIT_SCHEMA}.log
                VALUES (TG_TABLE_NAME, lower(left(TG_OP, 1)), to_jsonb(NEW) ->> TG_ARGV[0], NEW.cdc_version);
        END IF;
        RETURN NULL;
    END $$""",
    *(
        f"CREATE TRIGGER tx_audit AFTER INSERT OR UPDATE OR DELETE ON public.{t} "
        f"FOR EACH ROW EXECUTE FUNCTION {AUDIT_SCHEMA}.record('{key}')"
        for t, key in AUDITED.items()
    ),
]

# The source: the rows pgbench -i made are logged as inserts (the target's copy inserts them), then
# every row change gets a higher version than all before it.
SOURCE_DDL = [
    *(
        f"INSERT INTO {AUDIT_SCHEMA}.log SELECT '{t}', 'i', {key}::text, cdc_version FROM public.{t}"
        for t, key in AUDITED.items()
    ),
    f"CREATE SEQUENCE {AUDIT_SCHEMA}.version",
    f"""CREATE FUNCTION {AUDIT_SCHEMA}.stamp() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        NEW.cdc_version := nextval('{AUDIT_SCHEMA}.version');
        RETURN NEW;
    END $$""",
    *(
        f"CREATE TRIGGER tx_stamp BEFORE INSERT OR UPDATE ON public.{t} "
        f"FOR EACH ROW EXECUTE FUNCTION {AUDIT_SCHEMA}.stamp()"
        for t in AUDITED
    ),
]

# The target: versions written again, steps back (an update to a lower version, a deleted key
# inserted again).
TARGET_DDL = [
    f"CREATE TABLE {AUDIT_SCHEMA}.deleted (tbl text, key text, version bigint, PRIMARY KEY (tbl, key))",
    f'CREATE TABLE {AUDIT_SCHEMA}.back (tbl text NOT NULL, key text NOT NULL, op "char" NOT NULL, '
    "old_version bigint, new_version bigint)",
    f"CREATE TABLE {AUDIT_SCHEMA}.again (tbl text NOT NULL, key text NOT NULL, version bigint)",
    f"""CREATE FUNCTION {AUDIT_SCHEMA}.guard() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        old_key text := CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) ->> TG_ARGV[0] END;
        new_key text := CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) ->> TG_ARGV[0] END;
        gone bigint;
    BEGIN
        IF TG_OP = 'DELETE' THEN
            INSERT INTO {AUDIT_SCHEMA}.deleted AS d VALUES (TG_TABLE_NAME, old_key, OLD.cdc_version)
                ON CONFLICT (tbl, key) DO UPDATE SET version = greatest(d.version, EXCLUDED.version);
            RETURN NULL;
        END IF;
        IF TG_OP = 'UPDATE' THEN
            IF NEW.cdc_version < OLD.cdc_version THEN
                INSERT INTO {AUDIT_SCHEMA}.back VALUES (TG_TABLE_NAME, new_key, 'u', OLD.cdc_version, NEW.cdc_version);
            ELSIF NEW.cdc_version = OLD.cdc_version THEN
                INSERT INTO {AUDIT_SCHEMA}.again VALUES (TG_TABLE_NAME, new_key, NEW.cdc_version);
            END IF;
            RETURN NULL;
        END IF;
        SELECT version INTO gone FROM {AUDIT_SCHEMA}.deleted
            WHERE tbl = (TG_TABLE_NAME::text COLLATE "default") AND key = new_key;
        IF FOUND THEN
            INSERT INTO {AUDIT_SCHEMA}.back VALUES (TG_TABLE_NAME, new_key, 'i', gone, NEW.cdc_version);
        END IF;
        RETURN NULL;
    END $$""",
    *(
        f"CREATE TRIGGER tx_guard AFTER INSERT OR UPDATE OR DELETE ON public.{t} "
        f"FOR EACH ROW EXECUTE FUNCTION {AUDIT_SCHEMA}.guard('{key}')"
        for t, key in AUDITED.items()
    ),
    *(
        f"ALTER TABLE public.{t} ENABLE ALWAYS TRIGGER {trigger}"
        for t in AUDITED
        for trigger in ("tx_audit", "tx_guard")
    ),
]

# A cdc-sink connection of the target database inside a transaction that has written and has been
# open for more than a second: a large source transaction being applied in pieces.
SINK_IN_LONG_TRANSACTION = (
    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'cdc-sink' "
    "AND backend_xid IS NOT NULL AND xact_start < now() - interval '1 second'"
)
PEAK_RSS_MB = 400  # a sanity bound on the sink's memory (--batch-size bounds it), not a timing


def bulk_witness() -> str:
    """The bulk rows are all there or none is: its first, middle and last rows, in one snapshot."""
    probes = [f"EXISTS (SELECT 1 FROM {BULK_TABLE} WHERE id = {i})" for i in (1, BULK_ROWS // 2, BULK_ROWS)]
    return f"({probes[0]} = {probes[1]} AND {probes[1]} = {probes[2]})"


# --- setting up -----------------------------------------------------------------------------------


def prepare(dbs: Databases) -> None:
    """pgbench's tables on the source (filled, scale 1) and on the target (empty), the bulk table
    (empty) on both, the audit on both."""
    initialize(dbs.source_dsn)
    create_empty(dbs.target_dsn)
    execute(dbs.source_dsn, BULK_DDL, *AUDIT_DDL, *SOURCE_DDL)
    execute(dbs.target_dsn, BULK_DDL, *AUDIT_DDL, *TARGET_DDL)


class Pipe:
    """cdc-source and cdc-sink of one test: the same prefix, slot, group and options at each
    (re)start."""

    def __init__(
        self, dbs: Databases, prefix: str, consistency: str, batch_size: int, metadata: bool = True
    ) -> None:
        self.dbs, self.prefix = dbs, prefix
        self.slot, self.group = f"slot_{dbs.name}", f"group_{prefix}"
        self.consistency = consistency  # cdc-sink --consistency
        self.metadata = metadata  # cdc-source --transaction-metadata
        self.batch_size = batch_size
        self.metrics_port = free_port()
        self.source: CliProcess | None = None
        self.sink: CliProcess | None = None

    def start_source(self) -> CliProcess:
        extra = ["--transaction-metadata"] if self.metadata else []
        self.source = start_source(
            self.dbs,
            self.prefix,
            self.slot,
            "--partitions",
            "3",
            "--snapshot",
            "never",
            "--exclude-tables",
            EXCLUDED,
            *extra,
            streaming=True,
        )
        return self.source

    def start_sink(self) -> CliProcess:
        extra = ["--consistency", self.consistency]
        self.sink = start_sink(
            self.dbs,
            self.prefix,
            self.slot,
            self.group,
            "--exclude-tables",
            EXCLUDED,
            "--batch-size",
            str(self.batch_size),
            "--instance-id",
            f"sink_{self.prefix}",
            "--metrics-port",
            str(self.metrics_port),
            *extra,
        )
        return self.sink

    @property
    def processes(self) -> tuple[CliProcess, ...]:
        return tuple(p for p in (self.source, self.sink) if p is not None)

    def start(self) -> None:
        """Both programs; returned once the target holds the source's rows (no load runs yet, so
        the bulk copies of the tables agree with each other)."""
        self.start_source()
        self.start_sink()
        wait_identical(self.dbs, TABLES, timeout=120, processes=self.processes)

    def applied(self) -> int:
        return sum(o or 0 for o in stored_offsets(self.dbs, self.group).values())

    def stop(self) -> None:
        stop_cleanly(*(p for p in (self.sink, self.source) if p is not None))


def settle(seconds: float, processes: Sequence[CliProcess]) -> None:
    """Sleep `seconds`, failing at once if one of `processes` exits meanwhile."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert_running(*processes)
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


def kill9(process: CliProcess) -> None:
    code = stop_process(process, signal.SIGKILL)
    assert code == -signal.SIGKILL, (
        f"{process.command} had exited ({code}) before the kill:\n{process.stderr_text()}"
    )


# --- what the target and the topics show ------------------------------------------------------------


def end_records(stack: Stack, prefix: str) -> list[transactions.TransactionRecord]:
    """The END records of the transaction topic, in topic order; fails when a transaction has not
    exactly one BEGIN before exactly one END."""
    records = [
        transactions.decode(m.value())
        for m in read_all(stack.bootstrap_servers, transactions.transaction_topic(prefix))
    ]
    seen: Counter[tuple[str, str]] = Counter((r["status"], r["id"]) for r in records)
    twice = [key for key, n in seen.items() if n > 1]
    assert not twice, f"{len(twice)} transaction records published more than once, e.g. {twice[:5]}"
    ends = [r for r in records if r["status"] == transactions.END]
    begun = {r["id"] for r in records if r["status"] == transactions.BEGIN}
    unbegun = [r["id"] for r in ends if r["id"] not in begun]
    assert not unbegun, f"{len(unbegun)} END records without a BEGIN, e.g. {unbegun[:5]}"
    assert len(begun) == len(ends), f"{len(begun)} BEGIN records, {len(ends)} END records"
    return ends


def metrics(port: int) -> dict[str, float]:
    """The sink's metrics without labels (name -> value)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = {}
    for line in text.splitlines():
        match = re.match(r"^([a-z_]+) (\S+)$", line)
        if match:
            found[match.group(1)] = float(match.group(2))
    return found


def check_consistent_point(pipe: Pipe, stack: Stack, ends: list[transactions.TransactionRecord]) -> str:
    """The sink reports the last source transaction as its consistent point, in its metrics and in
    cdc-status; returns cdc-status's line."""
    last = ends[-1]["source"]
    wanted = last["commit_lsn"]

    def reported() -> dict[str, float]:
        assert_running(*pipe.processes)
        found = metrics(pipe.metrics_port)
        return found if found.get("cdc_sink_consistent_commit_lsn") == wanted else {}

    try:
        found = wait_until(reported, timeout=30, message="the sink never reported the last transaction")
    except AssertionError as exc:
        latest = metrics(pipe.metrics_port)
        shown = {k: v for k, v in latest.items() if "consistent" in k or "transactions" in k}
        raise AssertionError(f"{exc} (commit {int_to_lsn(wanted)} = {wanted}); the sink shows {shown}") from None
    assert last["ts_us"] is not None
    assert abs(found["cdc_sink_consistent_commit_timestamp_seconds"] - last["ts_us"] / 1e6) < 0.001, found
    applied = found.get("cdc_sink_source_transactions_applied_total")
    assert applied is not None and applied >= 1, f"cdc_sink_source_transactions_applied_total: {applied}"

    dbs = pipe.dbs
    status = run_cli(
        [
            "cdc-status",
            "--source-dsn",
            dbs.source_dsn,
            "--target-dsn",
            dbs.target_dsn,
            "--bootstrap-servers",
            stack.bootstrap_servers,
            "--topic-prefix",
            pipe.prefix,
            "--slot",
            pipe.slot,
            "--group",
            pipe.group,
            "--exclude-tables",
            EXCLUDED,
            "--log-format",
            "text",
        ],
        timeout=60,
    )
    output = status.stdout + status.stderr
    assert status.returncode in (0, 1), f"cdc-status failed ({status.returncode}):\n{output}"
    match = re.search(r"consistent as of source commit (\S+) at (\S+)", output)
    assert match, f"cdc-status shows no consistent point:\n{output}"
    lsn, at = match.groups()
    shown_lsn = int(lsn) if lsn.isdigit() else lsn_to_int(lsn)
    assert shown_lsn == wanted, f"cdc-status shows commit {lsn}, the last transaction is {int_to_lsn(wanted)}"
    shown_at = datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()
    assert abs(shown_at - last["ts_us"] / 1e6) < 0.001, (
        f"cdc-status shows {at}, the last commit was at {last['ts_us']} us"
    )
    return match.group(0)


def key_writes(dsn: str) -> dict[tuple[str, str], Counter[str]]:
    found: dict[tuple[str, str], Counter[str]] = {}
    for tbl, key, op, n in psql_rows(
        dsn, f"SELECT tbl, key, op, count(*) FROM {AUDIT_SCHEMA}.log GROUP BY 1, 2, 3"
    ):
        found.setdefault((str(tbl), str(key)), Counter())[str(op)] += int(n)
    return found


def check_writes(dbs: Databases) -> str:
    """Nothing written twice, nothing stepped back; the figures, on one line."""
    source, target = key_writes(dbs.source_dsn), key_writes(dbs.target_dsn)
    excess = []
    for key, wrote in sorted(target.items()):
        had = source.get(key, Counter())
        if any(wrote[k] > had[k] for k in "iud") or wrote.total() > had.total():
            excess.append(f"{key[0]} {key[1]}: target {dict(wrote)}, source {dict(had)}")
    again = psql_rows(dbs.target_dsn, f"SELECT tbl, key, version FROM {AUDIT_SCHEMA}.again LIMIT 10")
    [(again_count,)] = psql_rows(dbs.target_dsn, f"SELECT count(*) FROM {AUDIT_SCHEMA}.again")
    back = psql_rows(
        dbs.target_dsn, f"SELECT tbl, key, op, old_version, new_version FROM {AUDIT_SCHEMA}.back LIMIT 10"
    )
    [(back_count,)] = psql_rows(dbs.target_dsn, f"SELECT count(*) FROM {AUDIT_SCHEMA}.back")
    source_total = sum(c.total() for c in source.values())
    target_total = sum(c.total() for c in target.values())
    assert not excess, f"{len(excess)} keys written more often on the target than on the source:\n" + "\n".join(
        excess[:10]
    )
    assert again_count == 0, f"{again_count} updates on the target wrote a version the row had already: {again}"
    assert back_count == 0, f"{back_count} steps back on the target (table, key, op, old, new): {back}"
    return f"row writes source {source_total} / target {target_total}, doubled 0, steps back 0"


def check_sums(dbs: Databases) -> None:
    """The sums are equal on both sides (identical, and pgbench's invariant)."""
    source, target = balances(dbs.source_dsn), balances(dbs.target_dsn)
    assert source == target, f"sums: source {source}, target {target}"
    assert source[0] == source[1] == source[2], f"the source's sums differ: {source}"


def report(name: str, observed: Observed, load: LoadResult, started: float, *more: str) -> None:
    """One line for the log (pytest -s, or in a failure's captured output)."""
    parts = [f"{load.transactions} pgbench transactions", f"reader: {observed.summary()}", *more]
    print(f"{name}: " + "; ".join(parts) + f"; {time.monotonic() - started:.0f} s")


def assert_never_broken(observed: Observed) -> None:
    assert not observed.broken, f"the reader saw half a transaction: {observed.summary()}"
    assert observed.rate >= MIN_READS_PER_SECOND, (
        f"the reader read {observed.rate:.1f} times a second, fewer than {MIN_READS_PER_SECOND}: "
        f"{observed.summary()}"
    )


# --- the tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("metadata", [False, True], ids=["plain source", "source with transaction metadata"])
def test_row_mode_lets_a_reader_see_half_a_transaction(
    dbs: Databases, stack: Stack, topic_prefix: str, metadata: bool
) -> None:
    """The default mode applies each table's partitions on their own, whether or not the source
    publishes transaction records: under the load the reader sees the sums broken at least once,
    so the check of the other tests can fail."""
    started = time.monotonic()
    prepare(dbs)
    pipe = Pipe(dbs, topic_prefix, "row", batch_size=20, metadata=metadata)
    pipe.start()
    with (
        reading(dbs.target_dsn, witness=bulk_witness()) as reader,
        Load(dbs.source_dsn, seconds=12, rate=300) as load,
    ):
        done = load.result()
        wait_identical(dbs, TABLES, processes=pipe.processes)
        observed = reader.stop()
    check_sums(dbs)
    pipe.stop()
    report(f"row mode (--transaction-metadata {'on' if metadata else 'off'})", observed, done, started)
    assert done.transactions > 0 and done.failed == 0, done.output
    assert observed.reads > 0, observed.summary()
    assert observed.broken, f"the reader never saw a broken sum in the default mode: {observed.summary()}"


def test_transaction_mode_never_shows_half_a_transaction(dbs: Databases, stack: Stack, topic_prefix: str) -> None:
    """Several small transactions per target transaction (--batch-size 50) over three partitions
    per table: the sums never differ, the target ends identical, nothing is written twice, and the
    consistent point is the last source transaction."""
    started = time.monotonic()
    prepare(dbs)
    pipe = Pipe(dbs, topic_prefix, "transaction", batch_size=50)
    pipe.start()
    with (
        reading(dbs.target_dsn, witness=bulk_witness()) as reader,
        Load(dbs.source_dsn, seconds=20, rate=300) as load,
    ):
        done = load.result()
        wait_identical(dbs, TABLES, processes=pipe.processes)
        observed = reader.stop()
    assert done.transactions > 0 and done.failed == 0, done.output
    assert_same_rows(dbs, TABLES)
    check_sums(dbs)
    writes = check_writes(dbs)
    ends = end_records(stack, topic_prefix)
    assert len(ends) == done.transactions, f"{len(ends)} END records for {done.transactions} pgbench transactions"
    point = check_consistent_point(pipe, stack, ends)
    applied = metrics(pipe.metrics_port)["cdc_sink_source_transactions_applied_total"]
    assert applied == len(ends), f"cdc_sink_source_transactions_applied_total {applied}, {len(ends)} transactions"
    pipe.stop()
    report("transaction mode", observed, done, started, writes, point)
    assert_never_broken(observed)


def test_transaction_mode_across_kill_9_of_the_sink_and_the_source(
    dbs: Databases, stack: Stack, topic_prefix: str
) -> None:
    """kill -9 of the sink, of the source, of the sink again and of both, each restarted at once,
    under the load: the sums never differ, nothing is lost or written twice, no row steps back,
    every transaction has one BEGIN and one END, and the target ends identical."""
    started = time.monotonic()
    prepare(dbs)
    pipe = Pipe(dbs, topic_prefix, "transaction", batch_size=50)
    pipe.start()
    kills = []
    with (
        reading(dbs.target_dsn, witness=bulk_witness()) as reader,
        Load(dbs.source_dsn, seconds=36, rate=250) as load,
    ):
        for victims in (("sink",), ("source",), ("sink",), ("source", "sink")):
            wanted = pipe.applied() + 200
            settle(KILL_EVERY, pipe.processes)
            wait_while_running(
                lambda: pipe.applied() > wanted,  # noqa: B023 - called before the next round
                pipe.processes,
                timeout=60,
                message="the sink applied nothing new before the next kill",
            )
            assert load.running(), "pgbench ended before the kills: the kills would miss the load"
            for victim in victims:
                process = pipe.sink if victim == "sink" else pipe.source
                assert process is not None
                kill9(process)
                kills.append(f"{victim} at {time.monotonic() - started:.0f} s")
            if "source" in victims:
                pipe.start_source()
            if "sink" in victims:
                pipe.start_sink()
        done = load.result()
        wait_identical(dbs, TABLES, timeout=120, processes=pipe.processes)
        observed = reader.stop()
    assert done.transactions > 0 and done.failed == 0, done.output
    assert_same_rows(dbs, TABLES)
    check_sums(dbs)
    writes = check_writes(dbs)
    ends = end_records(stack, topic_prefix)
    assert len(ends) == done.transactions, f"{len(ends)} END records for {done.transactions} pgbench transactions"
    point = check_consistent_point(pipe, stack, ends)
    pipe.stop()
    report("kill -9", observed, done, started, f"kills: {', '.join(kills)}", writes, point)
    assert_never_broken(observed)


def test_transaction_mode_applies_a_300000_row_transaction_at_once(
    dbs: Databases, stack: Stack, topic_prefix: str
) -> None:
    """A transfer around 300,000 inserts, in the middle of the load, with a kill -9 of the sink
    while it applies them (its target transaction open): the reader never sees the sums differ
    nor part of the inserts, nothing is written twice, and the sink's peak memory stays bounded."""
    started = time.monotonic()
    prepare(dbs)
    pipe = Pipe(dbs, topic_prefix, "transaction", batch_size=2000)
    pipe.start()
    with (
        reading(dbs.target_dsn, witness=bulk_witness()) as reader,
        Load(dbs.source_dsn, seconds=30, rate=200) as load,
    ):
        settle(4, pipe.processes)
        assert load.running(), load.output()
        execute(dbs.source_dsn, *BULK_TRANSACTION)
        committed = time.monotonic() - started
        wait_while_running(
            lambda: psql_rows(dbs.target_dsn, SINK_IN_LONG_TRANSACTION),
            pipe.processes,
            timeout=90,
            message="the sink never held a target transaction open for a second (the large one)",
        )
        assert pipe.sink is not None
        peaks = [peak_rss_mb(pipe.sink)]
        kill9(pipe.sink)
        killed = time.monotonic() - started
        assert bulk_rows(dbs) == 0, "the killed sink had committed part of the large transaction"
        pipe.start_sink()
        wait_while_running(
            lambda: bulk_rows(dbs) == BULK_ROWS,
            pipe.processes,
            timeout=150,
            interval=1,
            message="the large transaction never reached the target",
        )
        applied = time.monotonic() - started
        done = load.result()
        wait_identical(dbs, TABLES, timeout=120, processes=pipe.processes)
        observed = reader.stop()
    assert done.transactions > 0 and done.failed == 0, done.output
    assert_same_rows(dbs, TABLES)
    check_sums(dbs)
    writes = check_writes(dbs)
    ends = end_records(stack, topic_prefix)
    assert len(ends) == done.transactions + 1, f"{len(ends)} END records for {done.transactions} + 1 transactions"
    assert pipe.sink is not None
    peaks.append(peak_rss_mb(pipe.sink))
    point = check_consistent_point(pipe, stack, ends)
    pipe.stop()
    timeline = f"committed at {committed:.0f} s, sink killed at {killed:.0f} s, on the target at {applied:.0f} s"
    peak = max(peaks)
    report(
        "300,000-row transaction", observed, done, started, timeline, f"sink peak RSS {peak:.0f} MB", writes, point
    )
    assert_never_broken(observed)
    assert peak < PEAK_RSS_MB, f"cdc-sink's peak RSS was {peak:.0f} MB (sanity bound {PEAK_RSS_MB} MB)"


def bulk_rows(dbs: Databases) -> int:
    return int(psql_rows(dbs.target_dsn, f"SELECT count(*) FROM {BULK_TABLE}")[0][0])


def peak_rss_mb(process: CliProcess) -> float:
    """VmHWM of a running process, in MB."""
    assert_running(process)
    status = Path(f"/proc/{process.pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    assert match, status
    return int(match.group(1)) / 1024


def test_a_group_that_applied_in_row_mode_goes_on_in_transaction_mode(
    dbs: Databases, stack: Stack, topic_prefix: str
) -> None:
    """The group applies under load in row mode, then its sink is started again in transaction mode:
    restarted at once with the same --instance-id it is refused with the fix (Kafka hands it the
    assignment of its previous run); started again after the session timeout, the transactions its
    stored offsets are in the middle of (their first messages applied in row mode) are not waited
    for, the rest are applied whole, and the target ends identical with nothing
    written twice."""
    started = time.monotonic()
    prepare(dbs)
    pipe = Pipe(dbs, topic_prefix, "row", batch_size=20)
    pipe.start()
    with Load(dbs.source_dsn, seconds=36, rate=250) as load:
        wanted = pipe.applied() + 500
        wait_while_running(lambda: pipe.applied() > wanted, pipe.processes, timeout=60)
        assert pipe.sink is not None
        kill9(pipe.sink)
        pipe.consistency = "transaction"
        # restarted at once with the same --instance-id, Kafka hands it the row mode's assignment
        restarted = pipe.start_sink()
        assert restarted.wait(timeout=60) == 1
        assert any(
            "once its session timeout (10 s) has passed" in line for line in error_lines(restarted.stderr_text())
        )
        time.sleep(11)
        pipe.start_sink()
        assert pipe.sink is not None
        # the transactions the row mode applied part of go first, then the first whole ones
        wait_for_output(pipe.sink, "consistent as of", timeout=60)
        with reading(dbs.target_dsn, witness=bulk_witness()) as reader:
            settle(6, pipe.processes)
            done = load.result()
            wait_identical(dbs, TABLES, timeout=120, processes=pipe.processes)
            observed = reader.stop()
    assert done.transactions > 0 and done.failed == 0, done.output
    assert_same_rows(dbs, TABLES)
    check_sums(dbs)
    writes = check_writes(dbs)
    pipe.stop()
    report("row mode, then transaction mode", observed, done, started, writes)
    assert_never_broken(observed)
