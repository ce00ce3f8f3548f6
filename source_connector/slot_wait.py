"""What a slot being created waits for. CREATE_REPLICATION_SLOT returns only once every transaction
that was running on the server when it started has ended (before that the slot has no consistent
point), which with a session left idle in a transaction is forever. While it waits, a thread polls
pg_stat_activity on a connection of its own and logs every few seconds which transactions are
open, oldest first, so the operator knows which session to end."""

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg2

from pg_kafka_cdc.common.errors import CdcError
from pg_kafka_cdc.common.pg import connect_source

log = logging.getLogger("source.slot")

REPORT_INTERVAL = 5.0  # seconds between two lines
SHOWN = 3  # transactions named per line
QUERY_CHARS = 60  # of each one's query

# The open transactions other than ours, oldest first, with how many there are in all.
_OPEN_TRANSACTIONS = """
SELECT pid, extract(epoch FROM now() - xact_start)::float8, coalesce(state, ''), coalesce(query, ''),
       count(*) OVER ()
FROM pg_stat_activity
WHERE (backend_xid IS NOT NULL OR backend_xmin IS NOT NULL) AND pid <> pg_backend_pid() AND pid <> ALL(%s)
ORDER BY xact_start NULLS LAST, pid
LIMIT %s
"""


@dataclass(frozen=True)
class OpenTransaction:
    pid: int
    age: float | None  # seconds since it began
    state: str  # `active`, `idle in transaction`...
    query: str  # its current or last statement


def shorten(query: str, limit: int = QUERY_CHARS) -> str:
    """The query on one line, cut to `limit` characters."""
    flat = " ".join(query.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def describe(t: OpenTransaction) -> str:
    """`pid 1234, open for 35 s (idle in transaction: UPDATE ...)`."""
    age = "" if t.age is None else f", open for {t.age:.0f} s"
    detail = ": ".join(p for p in (t.state, shorten(t.query)) if p)
    return f"pid {t.pid}{age}" + (f" ({detail})" if detail else "")


def waiting_line(slot: str, shown: Sequence[OpenTransaction], total: int) -> str:
    """The line logged while the slot waits; `shown` are the oldest of `total` open transactions."""
    if total == 0:
        return (
            f"creating slot {slot}: waiting for the transactions open on the server to end; none is visible "
            "to this role (pg_read_all_stats would let it see other roles' sessions)"
        )
    more = f"; and {total - len(shown)} more" if total > len(shown) else ""
    noun = "transaction" if total == 1 else "transactions"
    return (
        f"creating slot {slot}: waiting for {total} open {noun} to end: " + "; ".join(map(describe, shown)) + more
    )


def open_transactions(conn: Any, ours: Sequence[int]) -> tuple[list[OpenTransaction], int]:
    """The oldest open transactions of the server (up to SHOWN) other than `ours`, and their number."""
    with conn.cursor() as cur:
        cur.execute(_OPEN_TRANSACTIONS, (list(ours), SHOWN))
        rows = cur.fetchall()
    return [OpenTransaction(pid, age, state, query) for pid, age, state, query, _ in rows], (
        int(rows[0][4]) if rows else 0
    )


class WaitReporter:
    """The thread that logs what the slot waits for, until stopped."""

    def __init__(self, connect: Callable[[], Any], slot: str, ours: Sequence[int], interval: float) -> None:
        self.connect = connect
        self.slot = slot
        self.ours = list(ours)
        self.interval = interval
        self.done = threading.Event()
        self.conn: Any = None
        self.thread = threading.Thread(target=self._run, name=f"slot-wait-{slot}", daemon=True)

    def _run(self) -> None:
        try:
            while not self.done.wait(self.interval):
                line = self._poll()
                if line is not None and not self.done.is_set():
                    log.warning("%s", line, extra={"slot": self.slot})
        finally:
            if self.conn is not None:
                with contextlib.suppress(Exception):
                    self.conn.close()

    def _poll(self) -> str | None:
        """One look at the server; None when it cannot be had (the slot creation reports its own failure)."""
        try:
            if self.conn is None or self.conn.closed:
                self.conn = self.connect()
            shown, total = open_transactions(self.conn, self.ours)
        except (psycopg2.Error, CdcError) as exc:
            log.debug("cannot list the open transactions: %s", exc)
            return None
        return waiting_line(self.slot, shown, total)

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=15)  # at most one poll (connect_timeout 10 s) to finish


@contextlib.contextmanager
def reporting_waits(
    dsn: str, slot: str, ours: Sequence[int], interval: float = REPORT_INTERVAL
) -> Iterator[WaitReporter]:
    """While the block runs (creating the slot), log every `interval` seconds what it waits for;
    `ours`: the connector's own backends, never named."""
    reporter = WaitReporter(
        lambda: connect_source(dsn, application_name="cdc-source slot wait"), slot, ours, interval
    )
    reporter.thread.start()
    try:
        yield reporter
    finally:
        reporter.stop()
