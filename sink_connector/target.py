"""Target tables: created when missing (from the source catalog or from the types events carry),
widened when a column appears, never dropped or narrowed here (schema_changes.py applies the
source's schema-change events). A type change no event announced stops the sink."""

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from psycopg2 import sql

from pg_kafka_cdc.common.catalog import (
    ColumnFill,
    TableDef,
    column_fills,
    column_storage,
    read_table,
)
from pg_kafka_cdc.common.errors import SinkError
from pg_kafka_cdc.common.tables import TableName, quote_if_needed
from sink_connector.added_columns import (
    Fill,
    SourceAccess,
    asked_line,
    fill_for,
    refused_line,
    unknown_line,
)
from sink_connector.user_types import create_missing_types

log = logging.getLogger("sink.target")

# A type name as format_type prints it: optionally schema-qualified (quoted) identifiers, words such as
# `double precision` or `timestamp with time zone`, a typmod, array brackets. Nothing else can pass.
_IDENT = r'(?:[A-Za-z_][A-Za-z0-9_$]*|"(?:[^"]|"")+")'
_TYPE = re.compile(
    rf"^{_IDENT}(?:\.{_IDENT})?(?: [a-z]+)*(?:\(\d+(?:,\d+)?\))?(?: with(?:out)? time zone)?(?:\[\])*$"
)


def normalize_type(type_name: str) -> str:
    """Compare type names regardless of quoting (wal2json drops the quotes of a quoted type name)."""
    return type_name.replace('"', "")


def type_change_line(table: TableName, column: str, old: str, new: str) -> str:
    """The one line a type change the sink does not apply stops it with."""
    c = quote_if_needed(column)
    return (
        f"column {c} of {table} changed type on the source ({old} -> {new}), which the sink does not apply by "
        f"itself: run ALTER TABLE {table} ALTER COLUMN {c} TYPE {new} USING {c}::{new} on the target, then "
        "restart the sink"
    )


def checked_type(type_name: str, table: TableName, column: str) -> sql.Composable:
    """A type name from an event, as SQL, refusing anything that is not plainly a type name."""
    if not _TYPE.match(type_name):
        raise SinkError(f"column {column} of {table} has an unusable type name {type_name!r} in its events")
    return sql.SQL(type_name)


# Generated columns (stored; virtual ones too, on servers that have them): PostgreSQL refuses
# values for them, it computes them itself.
_GENERATED = """
SELECT attname FROM pg_attribute
WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped AND attgenerated <> ''
"""


@dataclass
class TargetTable:
    name: TableName
    columns: dict[str, str]  # name -> type as the target's format_type prints it
    key: tuple[str, ...]
    statements: dict[Any, sql.Composed] = field(default_factory=dict)
    staging: dict[tuple[str, ...], Any] = field(default_factory=dict)  # apply.Staging per column set
    generated: frozenset[str] = frozenset()  # columns the target computes: never written
    oid: int = 0  # the table's pg_class oid (0: not known)

    def written(self, shape: tuple[str, ...]) -> tuple[str, ...]:
        """The columns of a row the sink writes: the target's own, but none it generates."""
        return tuple(c for c in shape if c in self.columns and c not in self.generated)

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.name.schema, self.name.name)

    def type_sql(self, column: str) -> sql.Composable:
        return sql.SQL(self.columns[column])


def load(conn: Any, table: TableName) -> TargetTable | None:
    definition = read_table(conn, table)
    if definition is None:
        return None
    if not definition.has_pk:
        raise SinkError(
            f"target table {table} exists without a primary key, so changes cannot be applied by key: "
            f"add one (ALTER TABLE {table} ADD PRIMARY KEY (...)) matching the source's key"
        )
    return TargetTable(
        table,
        {c.name: c.type for c in definition.columns},
        definition.key,
        generated=generated_columns(conn, definition.oid),
        oid=definition.oid,
    )


def generated_columns(conn: Any, oid: int) -> frozenset[str]:
    with conn.cursor() as cur:
        cur.execute(_GENERATED, (oid,))
        return frozenset(r[0] for r in cur.fetchall())


def ensure_schema(cur: Any, schema: str) -> None:
    """Create the schema when it is missing. (CREATE SCHEMA IF NOT EXISTS would need the CREATE
    privilege on the database even when the schema exists.)"""
    cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
    if cur.fetchone() is None:
        cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))


def value_default(missing: str | None, type_sql: sql.Composable) -> sql.Composable:
    """` DEFAULT '<value>'::<type>` for a column whose source rows have a missing value, else nothing."""
    if missing is None:
        return sql.SQL("")
    return sql.SQL(" DEFAULT {}::{}").format(sql.Literal(missing), type_sql)


def create_from_source(source_conn: Any, conn: Any, definition: TableDef) -> TargetTable:
    """CREATE TABLE with the source's columns, types, NOT NULLs and key. A column the source added
    with a fast default gets the value its rows from before the ADD COLUMN read as its default, so
    inserts replayed from events older than the ALTER (which lack the column) get it too."""
    table = definition.name
    fills = column_fills(source_conn, table)
    with conn.cursor() as cur:
        ensure_schema(cur, table.schema)
        create_missing_types(source_conn, cur, table, definition.columns)
        cur.execute(
            sql.SQL("CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY ({}))").format(
                sql.Identifier(table.schema, table.name),
                sql.SQL(", ").join(
                    sql.SQL("{} {}{}{}").format(
                        sql.Identifier(c.name),
                        sql.SQL(c.type),
                        sql.SQL(" NOT NULL" if c.not_null else ""),
                        value_default(fills[c.name].missing if c.name in fills else None, sql.SQL(c.type)),
                    )
                    for c in definition.columns
                ),
                sql.SQL(", ").join(map(sql.Identifier, definition.key)),
            )
        )
        # the source's storage of each column that has another than its type's (large values kept
        # inline and uncompressed, say), so that the target stores its rows as the source does
        for name, storage in column_storage(source_conn, table).items():
            cur.execute(
                sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET STORAGE {}").format(
                    sql.Identifier(table.schema, table.name), sql.Identifier(name), sql.SQL(storage)
                )
            )
    log.info("created target table %s from the source catalog", table, extra={"table": str(table)})
    created = load(conn, table)
    assert created is not None
    return created


def create_from_event(conn: Any, table: TableName, columns: dict[str, str], key: list[str]) -> TargetTable:
    """CREATE TABLE from the column types an event carries (no access to the source needed)."""
    if not columns or not key or any(k not in columns for k in key):
        raise SinkError(f"cannot create target table {table}: its events carry no usable columns and key")
    with conn.cursor() as cur:
        ensure_schema(cur, table.schema)
        cur.execute(
            sql.SQL("CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY ({}))").format(
                sql.Identifier(table.schema, table.name),
                sql.SQL(", ").join(
                    sql.SQL("{} {}").format(sql.Identifier(name), checked_type(type_name, table, name))
                    for name, type_name in columns.items()
                ),
                sql.SQL(", ").join(map(sql.Identifier, key)),
            )
        )
    log.info("created target table %s from its events", table, extra={"table": str(table)})
    created = load(conn, table)
    assert created is not None
    return created


def reconcile(
    conn: Any, target: TargetTable, columns: dict[str, str], source: SourceAccess | None = None
) -> TargetTable:
    """Add the columns events carry that the target lacks; stop on a changed type. With access to the
    source, each is added so that the rows the target holds already read what the source's do (see
    added_columns.py); without it, as it comes, with a warning."""
    for name, type_name in columns.items():
        have = target.columns.get(name)
        if have is not None and normalize_type(have) != normalize_type(type_name):
            raise SinkError(type_change_line(target.name, name, have, type_name))
    missing = {n: t for n, t in columns.items() if n not in target.columns}
    if not missing:
        return target
    fills = None if source is None else source.fills(target.name, missing)
    snapshot: list[str] = []
    with conn.cursor() as cur:
        for name, type_name in missing.items():
            fill = None if fills is None else fills.get(name)
            how = fill_for(fill)
            cur.execute(add_column(target, name, checked_type(type_name, target.name, name), how, fill))
            if how is Fill.SNAPSHOT:
                snapshot.append(name)
            log.info(
                "added column %s %s to %s%s",
                name,
                type_name,
                target.name,
                fill_note(how, fill),
                extra={"table": str(target.name)},
            )
    if source is None or fills is None:
        reason = "the sink was given no source access" if source is None else source.reason
        log.warning("%s", unknown_line(None if source is None else source.slot, target.name, missing, reason))
    elif snapshot:
        refused = source.ask_for_snapshot(target.name, snapshot)
        if refused is None:
            log.warning("%s", asked_line(source.slot, target.name, snapshot), extra={"table": str(target.name)})
        else:
            log.warning(
                "%s", refused_line(source.slot, target.name, snapshot, refused), extra={"table": str(target.name)}
            )
    refreshed = load(conn, target.name)
    assert refreshed is not None
    return refreshed


def fill_note(how: Fill, fill: ColumnFill | None) -> str:
    """What the log line of an added column says beyond its name and type."""
    if how is not Fill.VALUE or fill is None:
        return ""
    not_null = " NOT NULL as on the source, and" if fill.not_null else ""
    return f",{not_null} with the value the source's rows got at its ADD COLUMN as its default"


def add_column(
    target: TargetTable, name: str, type_sql: sql.Composable, how: Fill, fill: ColumnFill | None
) -> sql.Composed:
    """ALTER TABLE ... ADD COLUMN for a column the source added: with the value its rows got (and NOT
    NULL if the source's is) when the source kept it, else nullable without a default."""
    constraint: sql.Composable = sql.SQL("")
    default: sql.Composable = sql.SQL("")
    if how is Fill.VALUE and fill is not None:
        default = value_default(fill.missing, type_sql)
        if fill.not_null:
            constraint = sql.SQL(" NOT NULL")
    return sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}{}{}").format(
        target.ident, sql.Identifier(name), type_sql, constraint, default
    )
