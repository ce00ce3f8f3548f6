"""The source server and its replication slot: checks, creation, lookup, drop; errors with fixes."""

from dataclasses import dataclass
from typing import Any

import psycopg2

from pg_kafka_cdc.common.errors import CdcError, SourceError
from pg_kafka_cdc.common.lsn import lsn_to_int
from pg_kafka_cdc.common.pg import error_reason, sqlstate
from source_connector import plugin_allowlist


@dataclass(frozen=True)
class ServerInfo:
    database: str
    system_id: str
    version: int
    wal_level: str
    max_replication_slots: int


@dataclass(frozen=True)
class SlotInfo:
    name: str
    plugin: str | None
    database: str | None
    active: bool
    active_pid: int | None
    restart_lsn: int | None
    confirmed_flush_lsn: int | None
    wal_status: str | None
    safe_wal_size: int | None


def server_info(conn: Any) -> ServerInfo:
    """Facts about the source server; a SourceError when logical decoding is impossible there."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT current_database(), (SELECT system_identifier::text FROM pg_control_system()), "
            "current_setting('server_version_num')::int, current_setting('wal_level'), "
            "current_setting('max_replication_slots')::int"
        )
        database, system_id, version, wal_level, max_slots = cur.fetchone()
    if wal_level != "logical":
        raise SourceError(
            f"the source server has wal_level = {wal_level}, logical decoding needs wal_level = logical: "
            "run ALTER SYSTEM SET wal_level = logical (or set it in postgresql.conf) and restart PostgreSQL"
        )
    if max_slots == 0:
        raise SourceError(
            "the source server has max_replication_slots = 0: set it to at least 1 "
            "(ALTER SYSTEM SET max_replication_slots = 10) and restart PostgreSQL"
        )
    return ServerInfo(database, system_id, version, wal_level, max_slots)


def plugin_setting(conn: Any) -> str | None:
    """The output-plugin allow-list as this role sees it; None on a server without the setting and
    for a role that may not read it (neither superuser nor pg_read_all_settings)."""
    with conn.cursor() as cur:
        cur.execute("SELECT setting FROM pg_settings WHERE name = %s", (plugin_allowlist.SETTING,))
        row = cur.fetchone()
    return None if row is None else str(row[0])


def check_plugin_allowed(conn: Any) -> None:
    """Refuse, before any slot is created or read, a server whose allow-list refuses wal2json."""
    value = plugin_setting(conn)
    if not plugin_allowlist.allows(value):
        raise SourceError(plugin_allowlist.refused(value))


_SLOT = """
SELECT slot_name, plugin, database, active, active_pid, restart_lsn::text, confirmed_flush_lsn::text,
       wal_status, safe_wal_size
FROM pg_replication_slots WHERE slot_name = %s
"""


def get_slot(conn: Any, name: str) -> SlotInfo | None:
    with conn.cursor() as cur:
        cur.execute(_SLOT, (name,))
        row = cur.fetchone()
    if row is None:
        return None
    name, plugin, database, active, pid, restart, confirmed, wal_status, safe = row
    return SlotInfo(
        name,
        plugin,
        database,
        bool(active),
        pid,
        lsn_to_int(restart) if restart else None,
        lsn_to_int(confirmed) if confirmed else None,
        wal_status,
        safe,
    )


def slot_mismatch(slot: SlotInfo, database: str) -> str | None:
    """Why the slot of that name cannot be this connector's, or None when it can."""
    if slot.plugin != "wal2json":
        return (
            f"the replication slot {slot.name} uses the plugin {slot.plugin}, not wal2json: "
            "pick another name with --slot / SOURCE_SLOT, or drop it if it is unused"
        )
    if slot.database != database:
        return (
            f"the replication slot {slot.name} belongs to database {slot.database}, not {database}: "
            "each source database needs its own slot; pick another name with --slot / SOURCE_SLOT"
        )
    return None


def replication_error(exc: BaseException, slot: str) -> CdcError | None:
    """The one-line error (with its fix) for a failure of a replication command, when it is known."""
    code = sqlstate(exc)
    reason = error_reason(exc)
    if code == "58P01" or ("wal2json" in reason and "could not access file" in reason):
        return SourceError(
            "the wal2json output plugin is not installed on the source server: install it on the database host "
            "(Debian/Ubuntu: apt-get install postgresql-15-wal2json, for your PostgreSQL version)"
        )
    if code == "53400":
        return SourceError(
            f"no free replication slot on the source ({reason}): drop an unused one with "
            "pg_drop_replication_slot(name) (the inactive ones are listed in pg_replication_slots), "
            "or raise max_replication_slots and restart PostgreSQL"
        )
    if code == "55006":
        return SourceError(
            f"the replication slot {slot} is in use by another process ({reason}): another cdc-source is "
            "probably running on it; stop it, or choose another slot with --slot / SOURCE_SLOT"
        )
    if code == "53300":
        return SourceError(
            f"the source refuses more replication connections ({reason}): raise max_wal_senders and restart PostgreSQL"
        )
    if plugin_allowlist.is_refusal(code, reason):
        return SourceError(plugin_allowlist.refused(None))
    if code in {"42501", "28000"}:
        return SourceError(
            f"the source role may not replicate ({reason}): grant it with ALTER ROLE <role> REPLICATION, "
            "and allow replication connections for it in pg_hba.conf"
        )
    if code == "42704":
        return SourceError(f"the replication slot {slot} does not exist on the source")
    return None


def create_slot(repl_cur: Any, name: str) -> tuple[int, str]:
    """Create the logical slot; returns its consistent point and exported snapshot name."""
    try:
        repl_cur.create_replication_slot(name, output_plugin="wal2json")
        _, consistent_point, snapshot_name, _ = repl_cur.fetchone()
    except psycopg2.Error as exc:
        raise replication_error(exc, name) or SourceError(
            f"cannot create the replication slot {name}: {error_reason(exc)}"
        ) from None
    return lsn_to_int(consistent_point), snapshot_name


def drop_slot(conn: Any, name: str) -> bool:
    """Drop the slot if it exists and is not in use; True when it was dropped."""
    slot = get_slot(conn, name)
    if slot is None:
        return False
    if slot.active:
        raise SourceError(
            f"the replication slot {name} is in use by process {slot.active_pid}: stop the cdc-source using it first"
        )
    with conn.cursor() as cur:
        try:
            cur.execute("SELECT pg_drop_replication_slot(%s)", (name,))
        except psycopg2.Error as exc:
            raise replication_error(exc, name) or SourceError(
                f"cannot drop the replication slot {name}: {error_reason(exc)}"
            ) from None
    return True
