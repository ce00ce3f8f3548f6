"""What the stream does when its replication connection fails: retry with backoff, or stop with the
error's one line when retrying cannot help, and what /healthz says meanwhile."""

import logging
import time
from dataclasses import dataclass

import psycopg2

from pg_kafka_cdc.common.errors import CdcError, SourceError
from pg_kafka_cdc.common.pg import error_reason, is_connection_loss, sqlstate
from pg_kafka_cdc.common.retry import Backoff
from pg_kafka_cdc.common.signals import StopFlag
from source_connector.plugin_allowlist import is_refusal
from source_connector.slot import replication_error

log = logging.getLogger("source.stream")

# How long a start waits for a slot that another process holds (the walsender of a previous run that
# was killed may still be exiting) before reporting it, rather than waiting forever.
SLOT_BUSY_TIMEOUT = 15.0
REFUSED_LOG_INTERVAL = 60.0  # seconds between log lines while the server refuses the plugin
DOWN_UNHEALTHY = 30.0  # seconds without a replication connection before /healthz says so


@dataclass(frozen=True)
class Failure:
    reason: str
    busy: bool  # the slot is active in another process
    refused: str | None  # the allow-list refuses the plugin: the line with the fix


class Reconnect:
    def __init__(self, slot: str, stop: StopFlag) -> None:
        self.slot = slot
        self.stop = stop
        self.backoff = Backoff(base=0.5, cap=15.0)
        self.has_streamed = False  # this process streamed from the slot at least once
        self.busy_since: float | None = None
        self.down_since: float | None = None  # when the replication connection was lost
        self.refused: str | None = None  # why the server refuses to stream (the fix), while it does
        self.refused_logged = 0.0

    def up(self) -> None:
        """Streaming (again)."""
        self.has_streamed = True
        self.backoff.reset()
        self.down_since = None
        if self.refused is not None:
            log.info("the source server allows wal2json again: streaming resumes from the slot")
            self.refused = None

    def down(self) -> None:
        self.down_since = self.down_since or time.monotonic()

    def failed(self, exc: psycopg2.Error) -> Failure:
        """A replication command failed: raises the error's one line when it is final."""
        known = replication_error(exc, self.slot)
        code, reason = sqlstate(exc), error_reason(exc)
        busy = known is not None and code == "55006"
        # The plugin allow-list changed under a running connector: wait for the fix, with the slot
        # holding every change, rather than exit into a restart loop.
        refused = str(known) if self.has_streamed and is_refusal(code, reason) else None
        transient = is_connection_loss(exc) or busy or refused is not None
        # The slot is active in another process. After this process streamed, that is most likely
        # its own old walsender, which the server ends (wal_sender_timeout): keep retrying. At
        # start-up it is usually another cdc-source on the same slot: wait a little, then fail with
        # the reason instead of retrying silently forever.
        if busy and not self.has_streamed:
            now = time.monotonic()
            self.busy_since = now if self.busy_since is None else self.busy_since
            transient = now - self.busy_since < SLOT_BUSY_TIMEOUT
        if not transient:
            raise known or SourceError(f"replication failed: {reason}") from None
        return Failure(reason, busy, refused)

    def wait(self, failure: Failure) -> None:
        """Before the next attempt."""
        delay = self.backoff.next_delay(time.monotonic()) or 1.0
        if self.busy_since is not None and not self.has_streamed:
            delay = min(delay, max(0.1, self.busy_since + SLOT_BUSY_TIMEOUT - time.monotonic()))
        if failure.refused is not None:
            now = time.monotonic()
            if self.refused is None or now - self.refused_logged >= REFUSED_LOG_INTERVAL:
                self.refused_logged = now
                log.error(
                    "%s (retrying; the slot keeps every change until then)",
                    failure.refused,
                    extra={"slot": self.slot},
                )
            self.refused = failure.refused
        else:
            log.warning(
                "%s (%s); reconnecting in %.1f s",
                "replication slot busy" if failure.busy else "replication connection lost",
                failure.reason,
                delay,
                extra={"slot": self.slot},
            )
        self.stop.wait(delay)

    def wait_to_connect(self, exc: CdcError) -> None:
        delay = self.backoff.next_delay(time.monotonic()) or 1.0
        log.warning("%s; retrying in %.1f s", exc, delay)
        self.stop.wait(delay)

    def problem(self) -> str | None:
        """Why the stream cannot make progress now, for /healthz; None when it can."""
        if self.refused is not None:
            return self.refused
        if self.down_since is not None and (down := time.monotonic() - self.down_since) > DOWN_UNHEALTHY:
            return f"replication connection lost for {down:.0f} s"
        return None
