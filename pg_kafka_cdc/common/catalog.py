"""Reading a table's definition from a PostgreSQL catalog: columns with their types, the key."""

from dataclasses import dataclass
from typing import Any

from psycopg2 import sql

from pg_kafka_cdc.common.tables import TableName

FIRST_USER_OID = 16384

_TABLES_IN_SCHEMA = """
SELECT n.nspname, c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname = %s AND NOT c.relispartition
ORDER BY c.relname
"""

_TABLE = """
SELECT c.oid, c.relreplident
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname = %s AND c.relname = %s
"""

_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, t.oid, t.typtype, tn.nspname, t.typname,
       t.typelem, coalesce(et.typtype, ''), coalesce(etn.nspname, ''), coalesce(et.typname, '')
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
JOIN pg_namespace tn ON tn.oid = t.typnamespace
LEFT JOIN pg_type et ON et.oid = t.typelem AND t.typelem <> 0
LEFT JOIN pg_namespace etn ON etn.oid = et.typnamespace
WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

# The primary key, else the replica identity index, with its columns in index order.
_KEY = """
SELECT i.indisprimary,
       array(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum ORDER BY k.ord)
FROM pg_index i
WHERE i.indrelid = %s AND (i.indisprimary OR i.indisreplident)
ORDER BY i.indisprimary DESC
LIMIT 1
"""


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # as format_type prints it: `numeric(12,2)`, `text[]`, `public.mood`
    not_null: bool
    type_oid: int
    kind: str  # pg_type.typtype: b base, e enum, d domain, c composite, r range...
    type_schema: str
    type_name: str
    element_oid: int  # for arrays, else 0
    element_kind: str
    element_schema: str
    element_name: str

    @property
    def user_defined(self) -> bool:
        return self.type_oid >= FIRST_USER_OID or self.element_oid >= FIRST_USER_OID


@dataclass(frozen=True)
class TableDef:
    name: TableName
    oid: int
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    has_pk: bool
    replica_identity: str  # d, f, i or n


def tables_in_schema(conn: Any, schema: str) -> list[TableName]:
    with conn.cursor() as cur:
        cur.execute(_TABLES_IN_SCHEMA, (schema,))
        return [TableName(s, t) for s, t in cur.fetchall()]


def table_exists(conn: Any, table: TableName) -> bool:
    with conn.cursor() as cur:
        cur.execute(_TABLE, (table.schema, table.name))
        return cur.fetchone() is not None


def estimated_rows(cur: Any, table: TableName) -> int | None:
    """The planner's estimate of the table's row count (for progress), None before it was first analyzed."""
    cur.execute(
        "SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass",
        (sql.Identifier(table.schema, table.name).as_string(cur),),
    )
    row = cur.fetchone()
    return int(row[0]) if row and row[0] >= 0 else None


def read_table(conn: Any, table: TableName) -> TableDef | None:
    """The table's definition, or None when it does not exist."""
    with conn.cursor() as cur:
        cur.execute(_TABLE, (table.schema, table.name))
        found = cur.fetchone()
        if found is None:
            return None
        oid, replident = found
        cur.execute(_COLUMNS, (oid,))
        columns = tuple(Column(*row) for row in cur.fetchall())
        cur.execute(_KEY, (oid,))
        key_row = cur.fetchone()
    return TableDef(
        name=table,
        oid=oid,
        columns=columns,
        key=tuple(key_row[1]) if key_row else (),
        has_pk=bool(key_row and key_row[0]),
        replica_identity=replident,
    )


def enum_labels(conn: Any, type_oid: int) -> list[str]:
    with conn.cursor() as cur:
        cur.execute("SELECT enumlabel FROM pg_enum WHERE enumtypid = %s ORDER BY enumsortorder", (type_oid,))
        return [r[0] for r in cur.fetchall()]
