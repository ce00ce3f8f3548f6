"""Heartbeats: a logical message written to the source's WAL every few seconds and read back through
the slot (wal2json's add-msg-prefixes), so a slot on a quiet database in a busy cluster keeps
advancing and does not hold the cluster's WAL."""

import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("source.heartbeat")

HEARTBEAT_PREFIX = "cdc-heartbeat"


def emit_heartbeat(conn: Any) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_logical_emit_message(false, %s, %s)", (HEARTBEAT_PREFIX, str(time.time())))


class Heartbeat:
    def __init__(self, interval: float, emit: Callable[[], None]) -> None:
        self.interval = interval
        self.emit = emit
        self.next = time.monotonic() + interval

    def tick(self, now: float) -> None:
        if now < self.next:
            return
        self.next = now + self.interval
        try:
            self.emit()
        except Exception as exc:  # best effort: the stream reports real failures of the source
            log.warning("heartbeat failed: %s", exc)
