"""PostgreSQL connections with pinned session settings and one-line errors on failure."""

from typing import Any

import psycopg2
import psycopg2.errorcodes
import psycopg2.extensions
import psycopg2.extras

from pg_kafka_cdc.common.dsn import describe, mask, parse
from pg_kafka_cdc.common.errors import ConnectError

# Value text depends on these; every connection of the pipeline pins them so both ends agree.
SESSION_SETTINGS = {
    "DateStyle": "ISO",
    "TimeZone": "UTC",
    "IntervalStyle": "iso_8601",
    "extra_float_digits": "3",
    "bytea_output": "hex",
}
SESSION_OPTIONS = " ".join(f"-c {k}={v}" for k, v in SESSION_SETTINGS.items())

# Defaults that let a connector notice a dead peer in tens of seconds rather than hours.
_TCP_DEFAULTS = {
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",
}


def error_reason(exc: BaseException) -> str:
    """libpq's message condensed to one line, without the FATAL: prefix, passwords masked."""
    text = str(exc).strip() or type(exc).__name__
    for prefix in ("FATAL:", "ERROR:"):
        text = text.replace(prefix, "")
    # 'connection to server at "h", port p failed: Connection refused\n\tIs the server running...'
    if text.startswith("connection to server") and " failed: " in text:
        text = text.split(" failed: ", 1)[1].split("\n", 1)[0]
    return mask(" ".join(text.split()))


def connect(
    dsn: str,
    *,
    role: str,
    setting: str,
    application_name: str,
    replication: bool = False,
    autocommit: bool = True,
    **extra: Any,
) -> Any:
    """Open a connection to the `role` database ("source", "target"); a failure is a ConnectError
    that says where (password masked), why, and which setting to check."""
    parts = parse(dsn, setting)
    kwargs: dict[str, Any] = {k: v for k, v in _TCP_DEFAULTS.items() if k not in parts}
    kwargs["options"] = " ".join(
        filter(None, (parts.get("options", ""), SESSION_OPTIONS, extra.pop("options", "")))
    )
    kwargs["application_name"] = parts.get("application_name", application_name)
    if replication:
        kwargs["connection_factory"] = psycopg2.extras.LogicalReplicationConnection
    kwargs.update(extra)
    try:
        conn = psycopg2.connect(dsn, **kwargs)
    except psycopg2.OperationalError as exc:
        raise ConnectError(
            f"cannot connect to the {role} database at {describe(dsn)}: {error_reason(exc)} "
            f"(check {setting} and that the server is running)"
        ) from None
    if not replication:
        conn.autocommit = autocommit
    return conn


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a psycopg2 error, when the server sent one."""
    return getattr(exc, "pgcode", None)


def is_connection_loss(exc: BaseException) -> bool:
    """True for errors that mean "the connection is gone", worth a reconnect rather than a stop."""
    if isinstance(exc, psycopg2.InterfaceError):
        return True
    code = sqlstate(exc)
    if type(exc) is psycopg2.DatabaseError:
        # Raised by libpq, never by the server (whose errors carry a SQLSTATE): a replication stream
        # cut ("error with status PGRES_COPY_BOTH and no message from the libpq") or ended by a
        # server shutting down ("no COPY in progress").
        return code is None
    if not isinstance(exc, psycopg2.OperationalError):
        return False
    return code is None or code.startswith("08") or code in {"57P01", "57P02", "57P03", "57P05", "25P03"}


def connect_source(dsn: str, application_name: str, **extra: Any) -> Any:
    """A connection to the source database (`--source-dsn` / `SOURCE_DSN`)."""
    return connect(
        dsn, role="source", setting="--source-dsn / SOURCE_DSN", application_name=application_name, **extra
    )


def connect_target(dsn: str, application_name: str, **extra: Any) -> Any:
    """A connection to the target database (`--target-dsn` / `TARGET_DSN`)."""
    return connect(
        dsn, role="target", setting="--target-dsn / TARGET_DSN", application_name=application_name, **extra
    )
