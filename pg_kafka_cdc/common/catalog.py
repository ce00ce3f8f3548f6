"""Reading a table's definition from a PostgreSQL catalog: columns with their types, the key."""

from collections.abc import Iterable
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
SELECT c.oid, c.relreplident, c.relfilenode
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname = %s AND c.relname = %s
"""

_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, t.oid, t.typtype, tn.nspname, t.typname,
       t.typelem, coalesce(et.typtype, ''), coalesce(etn.nspname, ''), coalesce(et.typname, ''), a.attnum
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
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum ORDER BY k.ord),
       array(SELECT k.attnum::int FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ORDER BY k.ord)
FROM pg_index i
WHERE i.indrelid = %s AND (i.indisprimary OR i.indisreplident)
ORDER BY i.indisprimary DESC
LIMIT 1
"""


# What a column's rows were given when it was added, and its default: PostgreSQL's fast default
# (atthasmissing: every row the table had at the ADD COLUMN reads attmissingval, a one-element array,
# without the table being rewritten) and the default expression.
_FILLS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
       CASE WHEN a.atthasmissing THEN a.attmissingval::text END, pg_get_expr(d.adbin, d.adrelid)
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped
  AND (%s::text[] IS NULL OR a.attname = ANY (%s::text[]))
ORDER BY a.attnum
"""

# A relation's kind and persistence, for the source's choice of what to replicate.
_RELATION = """
SELECT c.oid, c.relkind, c.relpersistence, c.relispartition
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname = %s AND c.relname = %s
"""

# The relation itself, then its parent, and so on up to the root of its partition tree.
_ANCESTORS = """
SELECT n.nspname, c.relname
FROM pg_partition_ancestors(%s::oid::regclass) WITH ORDINALITY AS a(relid, ord)
JOIN pg_class c ON c.oid = a.relid JOIN pg_namespace n ON n.oid = c.relnamespace
ORDER BY a.ord
"""

# Every partition below a partitioned table, at every level.
_PARTITIONS = """
SELECT c.oid, n.nspname, c.relname, c.relkind, c.relpersistence, c.relispartition
FROM pg_partition_tree(%s::oid::regclass) t
JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE t.level > 0
ORDER BY t.level, n.nspname, c.relname
"""


@dataclass(frozen=True)
class Relation:
    """What kind of table a name is: plain or partitioned, logged or not, a partition or not."""

    name: TableName
    oid: int
    kind: str  # pg_class.relkind: r table, p partitioned table
    persistence: str  # pg_class.relpersistence: p permanent, u unlogged, t temporary
    is_partition: bool

    @property
    def partitioned(self) -> bool:
        return self.kind == "p"


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
    attnum: int = 0  # pg_attribute.attnum: kept by a rename, never reused after a drop

    @property
    def user_defined(self) -> bool:
        return self.type_oid >= FIRST_USER_OID or self.element_oid >= FIRST_USER_OID


@dataclass(frozen=True)
class ColumnFill:
    """What a column holds for rows that never wrote it, and its default."""

    name: str
    type: str  # as format_type prints it
    not_null: bool
    # The value every row the table had at the ADD COLUMN got (PostgreSQL's fast default, evaluated
    # once: a constant, now() at the ALTER...), as its type's output function prints it; None when
    # the column has none (no default, a volatile one that rewrote the table, or a rewrite since).
    missing: str | None
    default: str | None  # the default expression (pg_get_expr), None without one


@dataclass(frozen=True)
class TableDef:
    name: TableName
    oid: int
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    has_pk: bool
    replica_identity: str  # d, f, i or n
    relfilenode: int = 0  # the table's storage when it was read: another one after a rewrite
    key_attnums: tuple[int, ...] = ()  # the key's columns by attnum, in key order


def tables_in_schema(conn: Any, schema: str) -> list[TableName]:
    with conn.cursor() as cur:
        cur.execute(_TABLES_IN_SCHEMA, (schema,))
        return [TableName(s, t) for s, t in cur.fetchall()]


def table_exists(conn: Any, table: TableName) -> bool:
    with conn.cursor() as cur:
        cur.execute(_TABLE, (table.schema, table.name))
        return cur.fetchone() is not None


def relation(conn: Any, table: TableName) -> Relation | None:
    """The table's kind and persistence, or None when it does not exist."""
    with conn.cursor() as cur:
        cur.execute(_RELATION, (table.schema, table.name))
        row = cur.fetchone()
    return None if row is None else Relation(table, row[0], row[1], row[2], bool(row[3]))


def ancestors(conn: Any, rel: Relation) -> list[TableName]:
    """The relation, then the tables it is a partition of, up to the root (just itself when it is no partition)."""
    if not rel.is_partition:
        return [rel.name]
    with conn.cursor() as cur:
        cur.execute(_ANCESTORS, (rel.oid,))
        return [TableName(s, t) for s, t in cur.fetchall()] or [rel.name]


def partitions(conn: Any, rel: Relation) -> list[Relation]:
    """Every partition below a partitioned table, level by level (none for a plain table)."""
    if not rel.partitioned:
        return []
    with conn.cursor() as cur:
        cur.execute(_PARTITIONS, (rel.oid,))
        return [Relation(TableName(s, t), oid, k, p, bool(i)) for oid, s, t, k, p, i in cur.fetchall()]


def estimated_rows(cur: Any, table: TableName) -> int | None:
    """The planner's estimate of the table's row count (for progress), None before it was first analyzed."""
    cur.execute(
        "SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass",
        (sql.Identifier(table.schema, table.name).as_string(cur),),
    )
    row = cur.fetchone()
    return int(row[0]) if row and row[0] >= 0 else None


def _read(conn: Any, table: TableName, columns: str) -> tuple[tuple[Any, ...], list[Any], Any] | None:
    """The table's pg_class row (oid, replica identity, relfilenode), its rows of the `columns` query
    and its key row; None when it does not exist."""
    with conn.cursor() as cur:
        cur.execute(_TABLE, (table.schema, table.name))
        found = cur.fetchone()
        if found is None:
            return None
        cur.execute(columns, (found[0],))
        rows = cur.fetchall()
        cur.execute(_KEY, (found[0],))
        return tuple(found), rows, cur.fetchone()


def read_table(conn: Any, table: TableName) -> TableDef | None:
    """The table's definition, or None when it does not exist."""
    read = _read(conn, table, _COLUMNS)
    if read is None:
        return None
    (oid, replident, relfilenode), rows, key_row = read
    return TableDef(
        name=table,
        oid=oid,
        columns=tuple(Column(*row) for row in rows),
        key=tuple(key_row[1]) if key_row else (),
        has_pk=bool(key_row and key_row[0]),
        replica_identity=replident,
        relfilenode=relfilenode,
        key_attnums=tuple(key_row[2]) if key_row else (),
    )


# Every attribute of the table by attnum, dropped ones included, with what a schema change needs.
_ATTRIBUTES = """
SELECT a.attnum, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, a.attisdropped,
       CASE WHEN a.atthasmissing THEN a.attmissingval::text END, pg_get_expr(d.adbin, d.adrelid)
FROM pg_attribute a
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = %s AND a.attnum > 0
ORDER BY a.attnum
"""


@dataclass(frozen=True)
class Attribute:
    """One pg_attribute row of a table, as the catalog holds it now (a dropped column too)."""

    attnum: int
    name: str  # `........pg.dropped.N........` once dropped
    type: str  # as format_type prints it
    not_null: bool
    dropped: bool
    missing: str | None  # as ColumnFill.missing
    default: str | None  # as ColumnFill.default


@dataclass(frozen=True)
class TableNow:
    """The catalog's facts of a table now, by attnum: what a shape read from the stream is completed with."""

    oid: int
    relfilenode: int
    replica_identity: str
    has_pk: bool
    key_attnums: tuple[int, ...]
    attributes: dict[int, Attribute]


def table_now(conn: Any, table: TableName) -> TableNow | None:
    """The table's attributes by attnum (dropped ones included), key and storage; None when it does not exist."""
    read = _read(conn, table, _ATTRIBUTES)
    if read is None:
        return None
    (oid, replident, relfilenode), rows, key_row = read
    attributes = {
        attnum: Attribute(
            attnum,
            name,
            type_name,
            bool(not_null),
            bool(dropped),
            None if missing is None else array_element(missing),
            default,
        )
        for attnum, name, type_name, not_null, dropped, missing, default in rows
    }
    return TableNow(
        oid, relfilenode, replident, bool(key_row and key_row[0]), tuple(key_row[2]) if key_row else (), attributes
    )


def array_element(text: str) -> str | None:
    """The element of a one-element array as array_out prints it (`{5}`, `{"a,b \\"q\\""}`,
    `{(1,1),(0,0)}` for a box, whose delimiter is `;`): exactly its type's output text. Without
    a delimiter to split on, this holds for every element type, arrays included (`{"{1,2}"}`)."""
    if text.startswith("[") and "=" in text:  # bounds other than [1:1]: `[0:0]={5}`
        text = text[text.index("=") + 1 :]
    if len(text) < 2 or text[0] != "{" or text[-1] != "}":
        raise ValueError(f"not an array literal: {text!r}")
    inner = text[1:-1]
    if not inner.startswith('"'):
        return None if inner.upper() == "NULL" else inner
    if len(inner) < 2 or not inner.endswith('"'):
        raise ValueError(f"unterminated element in {text!r}")
    out: list[str] = []
    chars = iter(inner[1:-1])
    for char in chars:
        out.append(next(chars, "") if char == "\\" else char)
    return "".join(out)


def column_fills(conn: Any, table: TableName, names: Iterable[str] | None = None) -> dict[str, ColumnFill]:
    """The table's columns (or those of `names` it has) with their missing values and defaults; empty
    when the table does not exist. Read under the pipeline's pinned session settings (connect_source),
    so that a timestamptz prints in UTC with every digit."""
    wanted = None if names is None else list(names)
    with conn.cursor() as cur:
        cur.execute(_FILLS, (table.schema, table.name, wanted, wanted))
        rows = cur.fetchall()
    return {
        name: ColumnFill(
            name, type_name, bool(not_null), None if missing is None else array_element(missing), default
        )
        for name, type_name, not_null, missing, default in rows
    }


STORAGE = {"p": "PLAIN", "e": "EXTERNAL", "m": "MAIN", "x": "EXTENDED"}
_STORAGE = """
SELECT a.attname, a.attstorage
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_type t ON t.oid = a.atttypid
WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped AND a.attstorage <> t.typstorage
ORDER BY a.attnum
"""


def column_storage(conn: Any, table: TableName) -> dict[str, str]:
    """The columns whose storage (ALTER COLUMN ... SET STORAGE) is not their type's default, and the
    storage they have: PLAIN, EXTERNAL, MAIN or EXTENDED."""
    with conn.cursor() as cur:
        cur.execute(_STORAGE, (table.schema, table.name))
        rows = cur.fetchall()
    return {name: STORAGE[storage] for name, storage in rows}


def enum_labels(conn: Any, type_oid: int) -> list[str]:
    with conn.cursor() as cur:
        cur.execute("SELECT enumlabel FROM pg_enum WHERE enumtypid = %s ORDER BY enumsortorder", (type_oid,))
        return [r[0] for r in cur.fetchall()]
