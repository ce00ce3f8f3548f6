"""Every 30 s while streaming: how much WAL the slot holds, and a warning when it is about to lose
some (wal_status extended or unreserved) or has lost some (lost)."""

import logging
from typing import Any

from source_connector.session import SourceSession

log = logging.getLogger("source")

_QUERY = (
    "SELECT wal_status, safe_wal_size, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint "
    "FROM pg_replication_slots WHERE slot_name = %s"
)


class SlotWatch:
    def __init__(self, session: SourceSession, slot: str) -> None:
        self.session = session
        self.slot = slot
        self.wal_status: str | None = None
        self.safe_wal_size: int | None = None
        self.retained: int | None = None
        self.warned: str | None = None

    def check(self) -> None:
        def read(conn: Any) -> Any:
            with conn.cursor() as cur:
                cur.execute(_QUERY, (self.slot,))
                return cur.fetchone()

        try:
            row = self.session.run(read)
        except Exception as exc:  # the stream reports a lost source; this check is only advisory
            log.debug("slot check failed: %s", exc)
            return
        if row is None:
            return
        self.wal_status, self.safe_wal_size, self.retained = row
        self._warn()

    def _warn(self) -> None:
        status = self.wal_status
        if status in ("extended", "unreserved", "lost") and status != self.warned:
            self.warned = status
            log.warning(
                "slot %s has wal_status %s: %s",
                self.slot,
                status,
                "its WAL is gone, changes were lost; rebuild with a new slot"
                if status == "lost"
                else "it holds more WAL than max_wal_size and may lose it (max_slot_wal_keep_size); "
                "check that Kafka keeps up",
                extra={"slot": self.slot},
            )
        elif status in ("reserved", None):
            self.warned = None
