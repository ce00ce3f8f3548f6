"""pgbench's TPC-B-like workload for the tests, and a reader that checks its invariant on the target.

Every TPC-B transaction adds the same delta to one account, one teller and one branch and inserts a
history row, so in any state that holds whole transactions only,
`sum(abalance) = sum(tbalance) = sum(bbalance)`. A target that shows part of a transaction breaks
it for as long as the part is visible.

    initialize(source_dsn, scale=1)        # pgbench -i, plus a primary key on pgbench_history
    create_empty(target_dsn)               # the same tables, empty (to add triggers before a sink)
    with Load(source_dsn, clients=4, seconds=20, rate=300) as load:
        ...
    result = load.result()                 # the transactions pgbench committed
    reader = BalanceReader(target_dsn).start()
    ...
    observed = reader.stop()               # observed.broken: every state seen with unequal sums
"""

import contextlib
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg2
from psycopg2 import sql

from tests.pg_cluster import PG_BIN

PGBENCH = PG_BIN / "pgbench"

# pgbench's tables and their keys (pgbench_history gets `hid`: it has no primary key of its own).
KEYS = {
    "pgbench_accounts": "aid",
    "pgbench_tellers": "tid",
    "pgbench_branches": "bid",
    "pgbench_history": "hid",
}
TABLES = tuple(f"public.{t}" for t in KEYS)
HISTORY_KEY = "ALTER TABLE public.pgbench_history ADD COLUMN hid bigserial PRIMARY KEY"

# The invariant in one statement, so in one snapshot; NULL sums (no rows yet) count as 0.
BALANCES = (
    "SELECT coalesce((SELECT sum(abalance) FROM public.pgbench_accounts), 0), "
    "coalesce((SELECT sum(tbalance) FROM public.pgbench_tellers), 0), "
    "coalesce((SELECT sum(bbalance) FROM public.pgbench_branches), 0)"
)


def _pgbench(dsn: str, *args: str, timeout: float = 300) -> str:
    """pgbench to the end; its output (it fails the test when pgbench fails)."""
    assert PGBENCH.exists(), f"{PGBENCH} does not exist: install postgresql-15 (or set PG_BIN)"
    result = subprocess.run(
        [str(PGBENCH), *args, dsn], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"pgbench {' '.join(args)} failed ({result.returncode}):\n{result.stderr}"
    return result.stdout + result.stderr


def _execute(dsn: str, *statements: str | sql.Composable) -> None:
    conn = psycopg2.connect(dsn, connect_timeout=10)
    try:
        with conn, conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()


def initialize(dsn: str, scale: int = 1) -> None:
    """pgbench's tables filled at `scale` (100,000 accounts each), pgbench_history with a key."""
    _pgbench(dsn, "-i", "-q", "-s", str(scale), "-I", "dtgvp")
    _execute(dsn, HISTORY_KEY)


def create_empty(dsn: str) -> None:
    """pgbench's tables with their primary keys and no rows (as initialize makes them)."""
    _pgbench(dsn, "-i", "-q", "-I", "dtp")
    _execute(dsn, HISTORY_KEY)


def balances(dsn: str) -> tuple[int, int, int]:
    """The three sums, now."""
    conn = psycopg2.connect(dsn, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute(BALANCES)
            row = cur.fetchone()
    finally:
        conn.close()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


# --- the load ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadResult:
    transactions: int  # committed by pgbench
    failed: int
    output: str


class Load:
    """pgbench's built-in tpcb-like script in the background for `seconds`, at most `rate`
    transactions per second over `clients` connections (no vacuum first). A context manager: leaving
    the block kills pgbench if it still runs (an interrupted transaction rolls back)."""

    def __init__(self, dsn: str, clients: int = 4, seconds: float = 20, rate: float = 300) -> None:
        assert PGBENCH.exists(), f"{PGBENCH} does not exist: install postgresql-15 (or set PG_BIN)"
        self.folder = Path(tempfile.mkdtemp(prefix="pgbench-"))
        self.args = [
            str(PGBENCH),
            "-n",
            "-b",
            "tpcb-like",
            "-c",
            str(clients),
            "-j",
            str(min(clients, 2)),
            "-T",
            str(max(1, round(seconds))),
            "-R",
            f"{rate:g}",
            dsn,
        ]
        self.seconds = seconds
        self.started = time.monotonic()
        with (self.folder / "out").open("w") as out:
            self.process = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, text=True)

    def output(self) -> str:
        return (self.folder / "out").read_text(errors="replace")

    def running(self) -> bool:
        return self.process.poll() is None

    def result(self, timeout: float = 60) -> LoadResult:
        """Waits for pgbench's end; what it committed (it fails the test when pgbench failed)."""
        left = self.seconds - (time.monotonic() - self.started)
        code = self.process.wait(timeout=max(0.0, left) + timeout)
        text = self.output()
        assert code == 0, f"pgbench exited with {code}:\n{text[-3000:]}"
        done = re.search(r"number of transactions actually processed: (\d+)", text)
        failed = re.search(r"number of failed transactions: (\d+)", text)
        assert done, f"pgbench did not say what it committed:\n{text[-3000:]}"
        return LoadResult(int(done.group(1)), int(failed.group(1)) if failed else 0, text)

    def __enter__(self) -> "Load":
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


# --- the reader --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    at: float  # seconds since the reader started
    accounts: int
    tellers: int
    branches: int
    witness: bool  # the extra condition (always true without one)

    @property
    def broken(self) -> bool:
        return not (self.accounts == self.tellers == self.branches and self.witness)

    def describe(self) -> str:
        extra = "" if self.witness else ", witness false"
        return f"at {self.at:.2f} s: accounts {self.accounts}, tellers {self.tellers}, branches {self.branches}{extra}"


@dataclass
class Observed:
    reads: int = 0
    seconds: float = 0.0
    broken: list[Observation] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.reads / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        first = "; first: " + "; ".join(o.describe() for o in self.broken[:3]) if self.broken else ""
        partial = sum(not o.witness for o in self.broken)
        witness = f" ({partial} with the witness false)" if partial else ""
        return (
            f"{self.reads} reads in {self.seconds:.1f} s ({self.rate:.0f}/s), "
            f"{len(self.broken)} broken{witness}{first}"
        )


class BalanceReader:
    """A thread that reads the three sums on `dsn` every `interval` seconds (one statement: one
    snapshot) and records every observation where they differ. `witness`: an SQL boolean expression
    evaluated in the same statement that must hold too (for example "a large transaction's rows are
    all there or none is")."""

    def __init__(self, dsn: str, interval: float = 0.01, witness: str = "true") -> None:
        self.dsn = dsn
        self.interval = interval
        self.query = f"{BALANCES}, ({witness})"
        self.observed = Observed()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="balance-reader", daemon=True)

    def start(self) -> "BalanceReader":
        self._started = time.monotonic()
        self._thread.start()
        return self

    def _run(self) -> None:
        conn: Any = None
        try:
            conn = psycopg2.connect(self.dsn, connect_timeout=10)
            conn.autocommit = True
            with conn.cursor() as cur:
                while not self._stop.is_set():
                    began = time.monotonic()
                    cur.execute(self.query)
                    row = cur.fetchone()
                    assert row is not None
                    seen = Observation(began - self._started, int(row[0]), int(row[1]), int(row[2]), bool(row[3]))
                    self.observed.reads += 1
                    if seen.broken:
                        self.observed.broken.append(seen)
                    self._stop.wait(max(0.0, self.interval - (time.monotonic() - began)))
        except Exception as exc:  # reported by stop(), in the test's thread
            self.observed.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            if conn is not None:
                conn.close()

    def stop(self) -> Observed:
        """Stops the thread; what it saw. Fails when a read failed."""
        self._stop.set()
        self._thread.join(timeout=30)
        self.observed.seconds = time.monotonic() - self._started
        assert not self._thread.is_alive(), "the balance reader did not stop"
        assert not self.observed.errors, f"the balance reader failed: {self.observed.errors}"
        return self.observed


@contextlib.contextmanager
def reading(dsn: str, interval: float = 0.01, witness: str = "true") -> Iterator[BalanceReader]:
    """A BalanceReader for the block; stopped on the way out also when the block fails."""
    reader = BalanceReader(dsn, interval, witness).start()
    try:
        yield reader
    finally:
        if reader._thread.is_alive():
            reader._stop.set()
            reader._thread.join(timeout=30)
