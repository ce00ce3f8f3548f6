"""Reading table definitions from the source catalog (columns, types, key, replica identity)."""

import logging
from typing import Any

from cdc_common.errors import ConfigError, SourceError
from cdc_common.tables import TableName
from schemas.topics import topic_for
from source_connector.table_info import TableInfo, key_problem

log = logging.getLogger("source.catalog")

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
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull
FROM pg_attribute a
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


class Catalog:
    def __init__(self, conn: Any, prefix: str) -> None:
        self.conn = conn
        self.prefix = prefix
        self.cache: dict[tuple[str, str], TableInfo | None] = {}

    def tables(self, requested: tuple[TableName, ...]) -> list[TableName]:
        """The tables to replicate: those requested (each must exist), or every table of `public`."""
        with self.conn.cursor() as cur:
            if not requested:
                cur.execute(_TABLES_IN_SCHEMA, ("public",))
                return [TableName(s, t) for s, t in cur.fetchall()]
            missing = []
            for table in requested:
                cur.execute(_TABLE, (table.schema, table.name))
                if cur.fetchone() is None:
                    missing.append(str(table))
        if missing:
            raise ConfigError(
                f"table{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                f"{'do' if len(missing) > 1 else 'does'} not exist on the source (check --tables / TABLES; "
                'names are case-sensitive when quoted, e.g. public."Order")'
            )
        return list(requested)

    def read(self, table: TableName) -> TableInfo:
        """The table's definition; a SourceError when it cannot be replicated exactly."""
        with self.conn.cursor() as cur:
            cur.execute(_TABLE, (table.schema, table.name))
            found = cur.fetchone()
            if found is None:
                raise ConfigError(f"table {table} does not exist on the source")
            oid, replident = found
            cur.execute(_COLUMNS, (oid,))
            rows = cur.fetchall()
            cur.execute(_KEY, (oid,))
            key_row = cur.fetchone()
        has_pk = bool(key_row and key_row[0])
        key = tuple(key_row[1]) if key_row else ()
        problem = key_problem(table, key, has_pk, replident)
        if problem:
            raise SourceError(problem)
        return TableInfo(
            name=table,
            topic=topic_for(self.prefix, table),
            columns=tuple(r[0] for r in rows),
            types={r[0]: r[1] for r in rows},
            key=key,
            replica_identity=replident,
            not_null=frozenset(r[0] for r in rows if r[2]),
            key_from_pk=has_pk,
        )

    def lookup(self, schema: str, name: str, refresh: bool) -> TableInfo | None:
        """For the stream: cached definitions; a table that cannot be replicated is reported once
        and its changes skipped (at start-up such a table is refused instead)."""
        ident = (schema, name)
        if refresh or ident not in self.cache:
            try:
                self.cache[ident] = self.read(TableName(schema, name))
            except SourceError as exc:
                log.error("%s; its changes are NOT replicated", exc, extra={"table": str(TableName(schema, name))})
                self.cache[ident] = None
        return self.cache[ident]
